"""Text generation: chunked jitted prefill, then a jitted decode loop with static shapes.

Prompts of a batch are right-padded; every sequence keeps its own length, so a prompt gives
the same tokens alone or in a batch. The decode loop is one `lax.while_loop` over a fixed
token buffer; streaming runs it a few steps at a time and prints what came out.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
import warnings
from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alaya_jax.errors import ContextLengthError, ShapeError
from alaya_jax.model.llama import AttentionFn, KVCache, Llama, full_decode_attention


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy; top_p < 1 keeps the smallest set of tokens reaching p."""

    temperature: float = 0.0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclasses.dataclass(frozen=True)
class FullAttention:
    """Dense decode attention over the whole cache (the default)."""

    def decode_fn(self) -> AttentionFn:
        return full_decode_attention

    def describe(self) -> str:
        return "full"


@dataclasses.dataclass
class GenerationResult:
    texts: list[str]
    tokens: list[list[int]]  # generated ids per prompt (the stop token excluded)
    prompt_lengths: list[int]
    last_prompt_logits: np.ndarray  # [B, V] f32: logits at each prompt's last token
    prefill_s: float
    decode_s: float
    steps: int
    attention_stats: dict | None = None  # sparse methods: fractions of the context attended/read

    @property
    def text(self) -> str:
        return self.texts[0]


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def sample_next(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """logits [B, V] f32 -> next ids [B] int32."""
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if sampling.top_p < 1:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly better tokens
        sorted_logits = jnp.where(before < sampling.top_p, sorted_logits, -jnp.inf)
        choice = jax.random.categorical(key, sorted_logits, axis=-1)
        return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# --- jitted pieces (graphdef static; state a pytree) --------------------------------------
@functools.partial(jax.jit, static_argnames=("graphdef", "first_chunk", "kv_span"),
                   donate_argnames=("cache",))
def prefill_chunk(graphdef, state, tokens, start, cache: KVCache, query_index=None, *,
                  first_chunk: bool, kv_span: int | None = None):
    """tokens [B, C] at positions start..start+C-1 -> (hidden [B, C, E], cache), plus the
    post-RoPE queries at the chunk-local positions query_index [B, n] when given
    ([L, B, n, H, D]). kv_span: the cache positions the chunk attends over (see Llama)."""
    model = nnx.merge(graphdef, state)
    B, C = tokens.shape
    positions = jnp.broadcast_to(start + jnp.arange(C, dtype=jnp.int32), (B, C))
    return model(tokens, positions, cache, first_chunk=first_chunk, query_index=query_index,
                 kv_span=kv_span)


def kv_span_for(end: int, chunk: int, max_len: int) -> int:
    """The cache span a prefill chunk ending at position `end` attends over: the chunk size
    times the power of two at or above end / chunk, at most max_len: fewer than twice the
    positions up to the chunk's end. Each span is a compile of the chunk; over a prompt of n
    chunks there are ~log2(n) of them."""
    return min(max_len, chunk * (1 << max(0, math.ceil(math.log2(-(-end // chunk))))))


@flax.struct.dataclass
class PrefillQueries:
    """The queries of each sequence's last n prompt positions, every layer: what a sparse
    method calibrates its index on (`SparseMethod.prepare(..., queries=)`)."""

    q: jax.Array  # [L, B, n, H, D] post-RoPE, the model's dtype
    lengths: jax.Array  # [B, n] int32: causal lengths (position + 1) of those queries

    def last(self, n: int) -> "PrefillQueries":
        """The last n of the collected queries (all of them when n >= their count)."""
        return PrefillQueries(self.q[:, :, -n:], self.lengths[:, -n:]) if n > 0 else self


@functools.partial(jax.jit, static_argnames=("graphdef",))
def logits_at(graphdef, state, hidden, index):
    """hidden [B, C, E], index [B] -> logits [B, V] at each sequence's index."""
    model = nnx.merge(graphdef, state)
    h = jnp.take_along_axis(hidden, index[:, None, None], axis=1)[:, 0]
    return model.logits(h)


def prefill(model: Llama, tokens: np.ndarray, lengths: np.ndarray, cache: KVCache, *,
            start: int = 0, chunk: int = 512, progress: Callable[[int, int], None] | None = None,
            collect_queries: int = 0, span_buckets: bool | None = None):
    """Chunked prefill of right-padded new tokens [B, T] with valid counts lengths [B].

    The tokens go to positions start..start+T-1 of every sequence (the cache already holds
    `start` tokens of each, e.g. a reused prefix). Returns (logits at each sequence's last
    new token [B, V] f32, cache with lengths = start + lengths). Memory stays bounded by the
    chunk; a chunk at position 0 attends causally to itself, later ones to the cache.
    collect_queries n > 0: also return the `PrefillQueries` of each sequence's own last n new
    tokens (a sequence with fewer repeats its first), as a third element.
    span_buckets: a later chunk attends over the cache positions up to a power-of-two multiple
    of the chunk covering it (`kv_span_for`), not the whole cache (False). None: on the CPU
    only (measured there, benchmarks/cpu_prefill.py; on a GPU each span is a compile of the
    unrolled layers, not measured against the attention it saves).
    """
    if span_buckets is None:
        span_buckets = jax.default_backend() == "cpu"
    graphdef, state = nnx.split(model)
    B, T = tokens.shape
    n_chunks = max(1, math.ceil(T / chunk))
    C = min(chunk, _round_up(T, 16))
    if start + n_chunks * C > cache.max_len:
        raise ContextLengthError(f"{start} cached + {T} new tokens (padded to {n_chunks * C}) do "
                                 f"not fit a cache of {cache.max_len} positions")
    padded = np.zeros((B, n_chunks * C), np.int32)
    padded[:, :T] = tokens
    last_logits = None
    lengths = np.asarray(lengths, np.int32)
    n_q = int(collect_queries)
    if n_q < 0:
        raise ShapeError(f"collect_queries must be >= 0, got {collect_queries}")
    if n_q:  # token index (among the new ones) of each collected query, [B, n]
        q_tok = np.maximum(lengths[:, None] - n_q + np.arange(n_q)[None, :], 0).astype(np.int32)
        queries = None
    for c in range(n_chunks):
        args = (graphdef, state, jnp.asarray(padded[:, c * C:(c + 1) * C]),
                jnp.int32(start + c * C), cache)
        first = start == 0 and c == 0
        kw = dict(first_chunk=first, kv_span=kv_span_for(start + (c + 1) * C, C, cache.max_len)
                  if span_buckets and not first else None)
        if n_q:
            q_local = q_tok - c * C
            hidden, cache, q_at = prefill_chunk(*args, jnp.asarray(np.clip(q_local, 0, C - 1)),
                                                **kw)
            q_here = jnp.asarray((q_local >= 0) & (q_local < C))[None, :, :, None, None]
            queries = q_at if queries is None else jnp.where(q_here, q_at, queries)
        else:
            hidden, cache = prefill_chunk(*args, **kw)
        # Each sequence's last token lies in exactly one chunk: take its logits there.
        local = lengths - 1 - c * C
        here = (local >= 0) & (local < C)
        if here.any():
            lg = logits_at(graphdef, state, hidden, jnp.asarray(np.clip(local, 0, C - 1)))
            last_logits = lg if last_logits is None else jnp.where(jnp.asarray(here)[:, None], lg,
                                                                   last_logits)
        if progress is not None:
            progress(min((c + 1) * C, T), T)
    cache = cache.replace(lengths=jnp.asarray(start + lengths, jnp.int32))
    if n_q:
        return last_logits, cache, PrefillQueries(queries, jnp.asarray(start + q_tok + 1))
    return last_logits, cache


@dataclasses.dataclass(frozen=True)
class _LoopStatic:
    graphdef: Any
    sampling: Sampling
    attention: Any
    stop_ids: tuple[int, ...]
    chunk: int = 8  # decode steps per fixed-trip inner loop (see _decode_loop_impl)


def _decode_loop_impl(static: _LoopStatic, state, loop, n_steps):
    """Runs up to n_steps decode steps (stopping early when every sequence is done).

    Steps run in chunks of `static.chunk` under a fixed-trip `fori_loop`, inside a while loop
    that checks for the end once per chunk; the last steps (fewer than a chunk) run one by
    one. On a GPU a while loop's predicate is a device-to-host copy that stalls the launch
    queue, so checking per chunk keeps the GPU fed. A chunk runs to its end even when every
    sequence stopped inside it (the done mask keeps those steps from writing anything: at
    most chunk - 1 wasted steps). A method with a cluster index folds its tail into the index
    once per chunk (`SparseMethod.fold`), not per layer and step.
    """
    model = nnx.merge(static.graphdef, state)
    stateful = hasattr(static.attention, "prepare")
    folds = stateful and hasattr(static.attention, "fold")
    if folds:
        attn = functools.partial(static.attention.decode, fold=False)
    else:
        attn = static.attention.decode if stateful else static.attention.decode_fn()
    stop = jnp.asarray(static.stop_ids or (-1,), jnp.int32)
    limit = loop["step"] + n_steps
    width = loop["out"].shape[1]
    chunk = max(1, static.chunk)

    def step(lp):
        cache = lp["cache"]
        tok = lp["next"]  # [B] the token to feed now (already sampled)
        out = lp["out"].at[:, lp["step"]].set(jnp.where(lp["done"], -1, tok), mode="drop")
        done = lp["done"] | jnp.isin(tok, stop) | (lp["step"] + 1 >= lp["max_new"])
        extra = {}
        if stateful:
            hidden, cache, attn_state, st = model(tok[:, None], cache.lengths[:, None], cache,
                                                  attention=attn, attn_state=lp["attn"])
            extra = dict(attn=attn_state)
            if "stats" in lp:  # else the stats' reductions are dead code (XLA drops them)
                live = (~lp["done"]).astype(jnp.float32)  # count steps of live sequences only
                acc = lp["stats"]
                extra["stats"] = dict(
                    attended=acc["attended"] + st["attended"].sum(-1) * live,
                    read=acc["read"] + st["read"].sum(-1) * live,
                    context=acc["context"] + st["context"] * live,
                    truncated=acc["truncated"] + st["truncated"] * live.astype(jnp.int32),
                    steps=acc["steps"] + live)
        else:
            hidden, cache = model(tok[:, None], cache.lengths[:, None], cache, attention=attn)
        cache = cache.replace(lengths=cache.lengths + jnp.where(lp["done"], 0, 1))
        logits = model.logits(hidden[:, 0])
        key, sub = jax.random.split(lp["key"])
        nxt = sample_next(logits, sub, static.sampling)
        return dict(lp, cache=cache, next=nxt, out=out, done=done, key=key, step=lp["step"] + 1,
                    **extra)

    def fold(lp):
        return dict(lp, attn=static.attention.fold(lp["attn"], lp["cache"], chunk)) if folds else lp

    def whole_chunks(lp):
        return ((lp["step"] + chunk <= limit) & (lp["step"] + chunk <= width)
                & ~jnp.all(lp["done"]))

    def run_chunk(lp):
        return jax.lax.fori_loop(0, chunk, lambda _, x: step(x), fold(lp))

    def one_by_one(lp):
        return (lp["step"] < limit) & (lp["step"] < width) & ~jnp.all(lp["done"])

    loop = jax.lax.while_loop(whole_chunks, run_chunk, loop)
    loop = fold(loop)  # covers the < chunk steps left
    return jax.lax.while_loop(one_by_one, step, loop)


_decode_loop = jax.jit(_decode_loop_impl, static_argnums=(0,), donate_argnums=(2,))


def init_decode_loop(model: Llama, cache: KVCache, first: jax.Array, max_new_tokens: int, key, *,
                     sampling: Sampling = Sampling(), attention=None, stop_ids=(),
                     queries: PrefillQueries | None = None, attention_stats: bool = True):
    """(static, weights state, loop state) for `_decode_loop`: first [B] is the first token to
    feed. A stateful attention method builds its indexes over the cache here, calibrated on
    the prefill's `queries` when it asks for them (`attention.calibration_queries`).
    attention_stats: accumulate the sparse method's per-layer statistics (keys attended and
    read, truncation) in the loop; False leaves their reductions out of the step (several
    small kernels a layer on a GPU)."""
    attention = attention or FullAttention()
    graphdef, state = nnx.split(model)
    horizon = attention.fold_horizon() if hasattr(attention, "fold_horizon") else 1 << 30
    static = _LoopStatic(graphdef, sampling, attention, tuple(stop_ids), chunk=min(8, horizon))
    B = first.shape[0]
    buf = _round_up(max(max_new_tokens, 1), 64)
    loop = dict(cache=cache, next=first, out=jnp.full((B, buf), -1, jnp.int32),
                done=jnp.zeros((B,), bool), key=key, step=jnp.int32(0),
                max_new=jnp.int32(max_new_tokens))
    if hasattr(attention, "prepare"):  # build the indexes over the prefilled cache
        loop["attn"] = attention.prepare(cache, model.cfg.n_heads, queries=queries)
        if attention_stats:
            L = model.cfg.n_layers
            loop["stats"] = dict(attended=jnp.zeros((L, B)), read=jnp.zeros((L, B)),
                                 context=jnp.zeros((L, B)),
                                 truncated=jnp.zeros((L, B), jnp.int32), steps=jnp.zeros((B,)))
    return static, state, loop


def calibration_queries(attention) -> int:
    """How many of each prompt's last queries the method calibrates on (0: none)."""
    return int(getattr(attention, "calibration_queries", 0) or 0)


# --- the public entry ----------------------------------------------------------------------
def _as_prompts(tokenizer, prompt_or_messages) -> list[list[int]]:
    """str | messages | token ids, or a list of those (a batch) -> one id list per prompt."""
    def one(p):
        if isinstance(p, str):
            return tokenizer.encode(p)
        if isinstance(p, (list, tuple)) and p and isinstance(p[0], dict):
            return tokenizer.apply_chat_template(list(p), add_generation_prompt=True, tokenize=True)
        if isinstance(p, (list, tuple, np.ndarray)) and (len(p) == 0 or isinstance(p[0], (int, np.integer))):
            return [int(i) for i in p]
        raise TypeError(f"a prompt must be a string, a list of chat messages or a list of token "
                        f"ids, got {type(p).__name__}")

    is_messages = (isinstance(prompt_or_messages, (list, tuple)) and prompt_or_messages
                   and isinstance(prompt_or_messages[0], dict))
    is_ids = (isinstance(prompt_or_messages, (list, tuple, np.ndarray)) and len(prompt_or_messages)
              and isinstance(prompt_or_messages[0], (int, np.integer)))
    if isinstance(prompt_or_messages, str) or is_messages or is_ids:
        return [one(prompt_or_messages)]
    return [one(p) for p in prompt_or_messages]


def generate(model: Llama, tokenizer, prompt_or_messages, max_new_tokens: int = 64, *,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, attention=None,
             stream: Callable[[int, str], None] | bool | None = None, prefill_chunk_size: int = 512,
             stop_at_eos: bool = True, attention_stats: bool = True) -> GenerationResult:
    """Generates a continuation for one prompt or a batch of prompts.

    prompt_or_messages: a string, a list of chat messages ({"role", "content"} dicts, rendered
    with the model's chat template), a list of token ids, or a list of any of those (a batch).
    attention: the decode attention method (default `FullAttention()`).
    attention_stats: a sparse method's statistics in `GenerationResult.attention_stats`;
    False leaves them out of the decode step (a little faster; attention_stats is then None).
    stream: True prints the first sequence's text as it comes; a callable gets
    (sequence index, new text piece) for every sequence.
    """
    attention = attention or FullAttention()
    sampling = Sampling(temperature, top_p)
    prompts = _as_prompts(tokenizer, prompt_or_messages)
    if any(len(p) == 0 for p in prompts):
        raise ShapeError("a prompt has no tokens")
    cfg = model.cfg
    lengths = np.array([len(p) for p in prompts], np.int32)
    longest = int(lengths.max())
    if longest > cfg.max_seq_len:
        raise ContextLengthError(f"the prompt has {longest} tokens, longer than the model's context "
                                 f"of {cfg.max_seq_len} tokens")
    if longest + max_new_tokens > cfg.max_seq_len:
        new = cfg.max_seq_len - longest
        warnings.warn(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                      f"context of {cfg.max_seq_len}; generating at most {new} tokens")
        max_new_tokens = new
    B = len(prompts)
    tokens = np.zeros((B, longest), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    C = min(prefill_chunk_size, _round_up(longest, 16))
    padded = math.ceil(longest / C) * C  # the prefill writes whole chunks
    max_len = max(min(_round_up(max(padded, longest + max_new_tokens), 256),
                      _round_up(cfg.max_seq_len, 256)), padded)
    cache = KVCache.zeros(cfg, B, max_len, model.dtype, stacked=model.stacked)

    t0 = time.perf_counter()
    n_q = calibration_queries(attention)
    out = prefill(model, tokens, lengths, cache, chunk=C, collect_queries=n_q)
    logits, cache, queries = out if n_q else (*out, None)
    logits.block_until_ready()
    t1 = time.perf_counter()
    gen, steps, stats = decode(model, tokenizer, cache, logits, max_new_tokens, sampling=sampling,
                               attention=attention, seed=seed, stream=stream,
                               stop_at_eos=stop_at_eos, queries=queries,
                               attention_stats=attention_stats)
    t2 = time.perf_counter()
    texts = [tokenizer.decode(g, skip_special_tokens=True) for g in gen]
    return GenerationResult(texts=texts, tokens=gen, prompt_lengths=lengths.tolist(),
                            last_prompt_logits=np.asarray(logits), prefill_s=t1 - t0,
                            decode_s=t2 - t1, steps=steps, attention_stats=stats)


def decode(model: Llama, tokenizer, cache: KVCache, logits: jax.Array, max_new_tokens: int, *,
           sampling: Sampling = Sampling(), attention=None, seed: int = 0, stream=None,
           stop_at_eos: bool = True, queries: PrefillQueries | None = None,
           attention_stats: bool = True) -> tuple[list[list[int]], int, dict | None]:
    """Decodes from a filled cache, given the logits at each sequence's last token [B, V].

    The cache needs room for max_new_tokens more positions. A stateful attention method
    (`alaya_jax.methods`) builds its indexes over the cache first, calibrated on `queries`
    (from `prefill(..., collect_queries=calibration_queries(attention))`) when it uses them.
    Returns (generated ids per sequence, stop token excluded; decode steps run; attention
    stats, or None for full attention or attention_stats=False: see `init_decode_loop`).
    """
    attention = attention or FullAttention()
    B = logits.shape[0]
    if int(jnp.max(cache.lengths)) + max_new_tokens > cache.max_len:
        raise ContextLengthError(f"{int(jnp.max(cache.lengths))} cached + {max_new_tokens} new "
                                 f"tokens do not fit a cache of {cache.max_len} positions")
    key = jax.random.PRNGKey(seed)
    key, sub = jax.random.split(key)
    first = sample_next(logits, sub, sampling)
    stop_ids = tuple(sorted(tokenizer.stop_ids())) if stop_at_eos else ()
    static, state, loop = init_decode_loop(model, cache, first, max_new_tokens, key,
                                           sampling=sampling, attention=attention,
                                           stop_ids=stop_ids, queries=queries,
                                           attention_stats=attention_stats)
    report = (attention.report(cache, model.cfg.n_heads, loop["attn"])
              if hasattr(attention, "report") else {})
    printer = _Streamer(tokenizer, B, stream) if stream else None
    step_chunk = 4 if printer else max_new_tokens
    while max_new_tokens > 0:
        loop = _decode_loop(static, state, loop, jnp.int32(step_chunk))
        if printer:
            printer.update(np.asarray(loop["out"]))
        if bool(jnp.all(loop["done"])) or int(loop["step"]) >= max_new_tokens:
            break
    out = np.asarray(loop["out"])
    if printer:
        printer.finish()
    gen = []
    for row in out:
        ids = [int(t) for t in row[:max_new_tokens] if t >= 0]
        if stop_at_eos and ids and ids[-1] in stop_ids:
            ids = ids[:-1]
        gen.append(ids)
    stats = None
    if "stats" in loop:
        stats = dict(summarize_stats(jax.device_get(loop["stats"]), model.cfg), **report)
    return gen, int(loop["step"]), stats


def summarize_stats(acc, cfg) -> dict:
    """Decode-attention statistics as fractions of the context, averaged over steps/layers."""
    ctx = np.maximum(acc["context"], 1)  # [L, B] summed context over live steps
    attended = acc["attended"] / cfg.n_heads / ctx  # mean over heads
    read = acc["read"] / cfg.n_kv_heads / ctx
    return dict(attended_fraction=float(attended.mean()), read_fraction=float(read.mean()),
                attended_fraction_per_layer=attended.mean(-1).tolist(),
                read_fraction_per_layer=read.mean(-1).tolist(),
                mean_context=float((acc["context"].sum(0) / np.maximum(acc["steps"], 1) / cfg.n_layers).mean()),
                truncated_layer_steps=int(acc["truncated"].sum()), steps=acc["steps"].tolist())


class _Streamer:
    """Decodes the growing token lists and emits only the new text (UTF-8 safe)."""

    def __init__(self, tokenizer, batch: int, stream):
        self.tok = tokenizer
        self.stop = tokenizer.stop_ids()
        self.sent = [""] * batch
        self.fn = stream if callable(stream) else self._print_first

    @staticmethod
    def _print_first(i: int, piece: str):
        if i == 0:
            print(piece, end="", flush=True)

    def update(self, out: np.ndarray):
        for i, row in enumerate(out):
            ids = [int(t) for t in row if t >= 0 and int(t) not in self.stop]
            text = self.tok.decode(ids, skip_special_tokens=True)
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the rest
                continue
            if len(text) > len(self.sent[i]):
                self.fn(i, text[len(self.sent[i]):])
                self.sent[i] = text

    def finish(self):
        if self.fn is self._print_first:
            print(flush=True)
