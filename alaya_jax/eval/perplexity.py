"""Teacher-forced perplexity of decode methods on a long natural text.

The first `prefill` tokens go through the full chunked prefill once; then the next `score`
tokens are fed one by one through each decode method (the model's decode path with
`attention=method.decode`, exactly as generation runs it) and the log-probability of each
given next token is recorded. Prefill is full attention for every method, so the difference
in mean NLL is what sparse decode attention costs.

    alaya eval-ppl --methods full,dipr-flat:8,dipr:8,topk:256 --prefill 6144 --score 1024
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import platform
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alaya_jax.errors import ConfigError, ContextLengthError
from alaya_jax.eval.harness import _copy, _queries_for, parse_method, plan_line
from alaya_jax.generate import calibration_queries, prefill
from alaya_jax.model.llama import KVCache

DEFAULT_TEXT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                            "examples", "data", "gpl-3.0.txt")


@dataclasses.dataclass(frozen=True)
class _Static:
    graphdef: Any
    attention: Any


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
def _teacher_forced(static: _Static, state, carry, inputs, targets):
    """Feeds inputs [B, N] one step at a time; returns (carry, log p(targets) [B, N]).

    carry: dict(cache, and for a stateful method attn (its per-layer state) and stats)."""
    model = nnx.merge(static.graphdef, state)
    stateful = hasattr(static.attention, "prepare")
    attn = static.attention.decode if stateful else static.attention.decode_fn()

    def step(c, xs):
        tok, target = xs  # [B], [B]
        cache = c["cache"]
        if stateful:
            hidden, cache, attn_state, st = model(tok[:, None], cache.lengths[:, None], cache,
                                                  attention=attn, attn_state=c["attn"])
            acc = c["stats"]
            c = dict(c, attn=attn_state, stats=dict(
                attended=acc["attended"] + st["attended"].sum(-1),
                read=acc["read"] + st["read"].sum(-1), context=acc["context"] + st["context"],
                truncated=acc["truncated"] + st["truncated"], steps=acc["steps"] + 1))
        else:
            hidden, cache = model(tok[:, None], cache.lengths[:, None], cache, attention=attn)
        cache = cache.replace(lengths=cache.lengths + 1)
        logp = jax.nn.log_softmax(model.logits(hidden[:, 0]), axis=-1)
        return dict(c, cache=cache), jnp.take_along_axis(logp, target[:, None], axis=-1)[:, 0]

    carry, logp = jax.lax.scan(step, carry, (inputs.T, targets.T))
    return carry, logp.T


def score_method(model, cache: KVCache, first_logits, tokens: np.ndarray, attention,
                 queries=None) -> dict:
    """Teacher-forced log-probs of tokens [B, N] given a cache that ends just before them.

    first_logits [B, V]: the prefill's logits at its last token (they predict tokens[:, 0]).
    queries: the prefill's `PrefillQueries` (the method calibrates on its last n of them).
    The cache is consumed. Returns dict(logp [B, N], stats (summed, [L, B]) or None, build_s,
    loop_s) with compile included in the times of a first call.
    """
    cfg = model.cfg
    B, N = tokens.shape
    graphdef, state = nnx.split(model)
    lp0 = jnp.take_along_axis(jax.nn.log_softmax(first_logits, -1), jnp.asarray(tokens[:, :1]), -1)
    carry = dict(cache=cache)
    t0 = time.perf_counter()
    if hasattr(attention, "prepare"):
        L = cfg.n_layers
        carry["attn"] = jax.block_until_ready(attention.prepare(
            cache, cfg.n_heads, queries=_queries_for(attention, queries)))
        carry["stats"] = dict(attended=jnp.zeros((L, B)), read=jnp.zeros((L, B)),
                              context=jnp.zeros((L, B)), truncated=jnp.zeros((L, B), jnp.int32),
                              steps=jnp.zeros((B,)))
    t1 = time.perf_counter()
    report = (attention.report(cache, cfg.n_heads, carry["attn"])
              if hasattr(attention, "report") else {})
    carry, logp = _teacher_forced(_Static(graphdef, attention), state, carry,
                                  jnp.asarray(tokens[:, :-1]), jnp.asarray(tokens[:, 1:]))
    logp = np.concatenate([np.asarray(lp0), np.asarray(logp)], axis=1)
    t2 = time.perf_counter()
    stats = jax.device_get(carry["stats"]) if "stats" in carry else None
    return dict(logp=logp, stats=stats, build_s=t1 - t0, loop_s=t2 - t1, report=report)


def run_perplexity(model, tokenizer, methods: Sequence[str], *, text_path: str = DEFAULT_TEXT,
                   prefill_tokens: int = 6144, score_tokens: int = 1024, out_dir: str | None = None,
                   name: str = "eval_ppl", label: str = "", progress: bool = True,
                   parallel: bool = False, command: str | None = None) -> dict:
    """Mean NLL (nats/token) and perplexity of the `score_tokens` tokens after the first
    `prefill_tokens` tokens of the text, per decode method, with keys attended/read.
    parallel: run the methods at once on threads (compiles overlap; times then overlap too)."""
    from tqdm import tqdm

    from alaya_jax.eval.harness import per_sequence_stats

    parsed = [parse_method(m) for m in methods]
    cfg = model.cfg
    with open(text_path, encoding="utf-8") as f:
        ids = tokenizer.encode(f.read())
    need = prefill_tokens + score_tokens
    if need > len(ids):
        raise ConfigError(f"the text has {len(ids)} tokens; prefill {prefill_tokens} + score "
                          f"{score_tokens} = {need} asked")
    if need > cfg.max_seq_len:
        raise ContextLengthError(f"prefill + score = {need} tokens exceeds the model's context of "
                                 f"{cfg.max_seq_len}")
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if progress else (lambda s: None)
    log(f"[eval-ppl] jax {jax.__version__} on {jax.devices()[0].device_kind} | model {cfg.name} | "
        f"{os.path.basename(text_path)}: {len(ids)} tokens; prefill {prefill_tokens}, score "
        f"{score_tokens} | methods {', '.join(methods)}")
    max_len = -(-need // 256) * 256
    t = time.perf_counter()
    n_q = max(calibration_queries(m.attention) for m in parsed)
    out = prefill(model, np.asarray([ids[:prefill_tokens]], np.int32),
                  np.asarray([prefill_tokens], np.int32), KVCache.zeros(cfg, 1, max_len, model.dtype),
                  collect_queries=n_q)
    first_logits, cache, queries = out if n_q else (*out, None)
    jax.block_until_ready(first_logits)
    log(f"[eval-ppl] prefill {prefill_tokens} tokens in {time.perf_counter() - t:.1f}s")
    scored = np.asarray([ids[prefill_tokens:need]], np.int32)
    run = lambda m: score_method(model, _copy(cache), first_logits, scored, m.attention,  # noqa: E731
                                 queries)
    if parallel:  # every method at once on threads: the compiles overlap
        from concurrent.futures import ThreadPoolExecutor

        t = time.perf_counter()
        with ThreadPoolExecutor(len(parsed)) as ex:
            results = list(ex.map(run, parsed))
        log(f"[eval-ppl] {len(parsed)} methods in parallel in {time.perf_counter() - t:.1f}s")
    else:
        results = [run(m) for m in tqdm(parsed, desc="eval-ppl", unit="method",
                                        disable=not progress, file=sys.stderr)]
    rows = {}
    for m, r in zip(parsed, results):
        nll = -r["logp"][0]
        st = per_sequence_stats(r["stats"], cfg, [prefill_tokens], [score_tokens - 1])[0]
        rows[m.name] = dict(nll=float(nll.mean()), ppl=float(np.exp(nll.mean())),
                            nll_first_half=float(nll[:score_tokens // 2].mean()),
                            nll_second_half=float(nll[score_tokens // 2:].mean()),
                            attended_keys=st["attended_fraction"] * st["context"],
                            read_keys=st["read_fraction"] * st["context"],
                            ms_per_step_with_compile=1e3 * r["loop_s"] / max(score_tokens - 1, 1),
                            index_build_s_with_compile=r["build_s"], parallel=parallel,
                            **r["report"], **st)
    base = rows[parsed[0].name]["nll"]
    for r in rows.values():
        r["delta_nll_vs_first"] = r["nll"] - base
    result = dict(label=label, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  command=command or " ".join(sys.argv), device=str(jax.devices()[0].device_kind),
                  backend=jax.default_backend(), jax=jax.__version__, python=platform.python_version(),
                  model=cfg.name, dtype=np.dtype(model.dtype).name, text=os.path.basename(text_path),
                  text_tokens=len(ids), prefill_tokens=prefill_tokens, score_tokens=score_tokens,
                  methods=list(methods), rows=rows)
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        base_path = os.path.join(out_dir, name)
        with open(base_path + ".json", "w") as f:
            json.dump(result, f, indent=1)
        with open(base_path + ".md", "w") as f:
            f.write(markdown(result))
        plot(result, base_path + ".png")
    return result


def plot(result: dict, path: str):
    """Δ NLL against keys per head: hollow = attended, filled = read (index rows included)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, m in enumerate(result["methods"]):
        r = result["rows"][m]
        c = f"C{i % 10}"
        xa, xr, y = 100 * r["attended_fraction"], 100 * r["read_fraction"], r["delta_nll_vs_first"]
        ax.plot([xa, xr], [y, y], color=c, alpha=0.35, lw=1)
        ax.scatter([xa], [y], facecolors="none", edgecolors=c, s=22)
        ax.scatter([xr], [y], color=c, s=30, label=m)
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("keys per head, % of context (hollow: attended, filled: read incl. index)", fontsize=8)
    ax.set_ylabel(f"Δ NLL vs {result['methods'][0]} (nats/token)")
    import textwrap

    title = textwrap.fill(result["label"] or "alaya eval-ppl", 100)
    ax.set_title(f"{title}\n{result['text']}: {result['prefill_tokens']} "
                 f"prefilled, {result['score_tokens']} scored, {result['device']}", fontsize=8)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(result: dict) -> str:
    first = result["methods"][0]
    lines = []
    if result["label"]:
        lines += [f"**{result['label']}**", ""]
    lines += [f"Teacher-forced decoding of {result['text']} ({result['text_tokens']} tokens) with "
              f"{result['model']} ({result['dtype']}) on {result['device']}, jax {result['jax']}, "
              f"{result['date']}: the first {result['prefill_tokens']} tokens prefilled with full "
              f"attention, the next {result['score_tokens']} scored one decode step at a time "
              f"through each method. Δ NLL against `{first}`; keys attended per query head, read "
              f"per kv head (index rows included), averaged over steps and layers.", "",
              "| method | NLL (nats/token) | perplexity | Δ NLL | attended % | attended keys | "
              "read % | read keys |", "|---|---|---|---|---|---|---|---|"]
    for m in result["methods"]:
        r = result["rows"][m]
        lines.append(f"| {m} | {r['nll']:.4f} | {r['ppl']:.3f} | {r['delta_nll_vs_first']:+.4f} | "
                     f"{100 * r['attended_fraction']:.1f} | {r['attended_keys']:.0f} | "
                     f"{100 * r['read_fraction']:.1f} | {r['read_keys']:.0f} |")
    plans = [(m, result["rows"][m]) for m in result["methods"] if result["rows"][m].get("plan")]
    if plans:
        lines += ["", "Plans run and calibrated margins:", ""]
        lines += [plan_line(m, r) for m, r in plans]
    lines += ["", f"Command: `{result['command']}`", ""]
    return "\n".join(lines)
