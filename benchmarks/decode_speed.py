"""Prefill tokens/s and decode ms/token, with the roofline ratio for decode.

    python benchmarks/decode_speed.py                      # CPU: the default SmolLM2 model
    python benchmarks/decode_speed.py --eight-b            # GPU: also Llama-3-8B shapes

Decode is timed as the library runs it (`generate`'s jitted while_loop over `--steps`
tokens, full attention, no early stop) after a warm-up, median of `--repeats`. The KV cache
is filled with random values for decode timing (its values do not change the cost); prefill
is timed on real token ids through the library's chunked prefill. The roofline is the time to
read the weights and the KV cache once at the read bandwidth measured in the same run.
On the GPU the default model's 98 MB file cannot travel to the machine, so the SmolLM2 row
there uses random weights of its exact shapes (speed does not depend on the values).
Writes JSON and a PNG under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

import alaya_jax as aj
from alaya_jax.generate import (_decode_loop, calibration_queries, init_decode_loop, prefill,
                                summarize_stats)
from alaya_jax.model.config import LlamaConfig, llama3_8b_config

SMOLLM2 = LlamaConfig(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3,
                      head_dim=64, ffn_dim=1536, rope_theta=100000.0, max_seq_len=8192,
                      name="SmolLM2-135M-shaped (random weights)")


def random_model(cfg: LlamaConfig, dtype) -> aj.Llama:
    """Random weights made on the device, one array at a time, in the layout `load_model` picks
    for the backend (per-layer arrays on a GPU, stacked for `lax.scan` on the CPU: with
    per-layer weights the CPU ran the layers unrolled over its stacked cache, and the block
    index's step then copied the whole cache twice a layer, 60 copies a step in the optimized
    HLO; SmolLM2 shapes at 7.7K: 511 ms/step against full attention's 85)."""
    from alaya_jax.model.load import default_stack_layers

    model = nnx.eval_shape(lambda: aj.Llama(cfg, dtype=dtype, stack_layers=default_stack_layers()))
    keys = iter(jax.random.split(jax.random.PRNGKey(0), 4096))

    def rand(sds):
        scale = 1.0 if len(sds.shape) == 1 else 0.02
        return jax.jit(lambda k: jax.random.normal(k, sds.shape, dtype) * scale)(next(keys))

    for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            value = var.get_value()
            var.set_value(tuple(map(rand, value)) if isinstance(value, tuple) else rand(value))
    model.rope_inv_freq.set_value(jnp.asarray(aj.model.llama.rope_inv_freq(cfg)))
    return model


def read_bandwidth(nbytes: int = 2 << 30, reps: int = 10) -> float:
    """Bytes read per second by a reduction over a large random array, `reps` times inside
    one jit (the multiply by a loop-dependent 1 keeps XLA from hoisting the sum)."""
    x = jax.random.normal(jax.random.PRNGKey(3), (nbytes // 2,), jnp.bfloat16)

    def reps_of_sum(x):
        def body(i, acc):
            return acc + jnp.sum(x * (1 + i * 0).astype(x.dtype), dtype=jnp.float32)

        return jax.lax.fori_loop(0, reps, body, jnp.float32(0))

    f = jax.jit(reps_of_sum)
    f(x).block_until_ready()
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        f(x).block_until_ready()
        ts.append(time.perf_counter() - t)
    return reps * x.nbytes / float(np.median(ts))


def calibration_prefill(model, cache, context: int, attention):
    """(cache, queries): the last n = `calibration_queries(attention)` of the cache's `context`
    positions prefilled through the model (random tokens) with their queries collected, for
    the method to calibrate its index on, as after a prompt in `aj.generate`; (cache, None)
    when the method takes none (or attention is None)."""
    n_q = calibration_queries(attention) if attention is not None else 0
    if not n_q:
        return cache, None
    batch = cache.lengths.shape[0]
    ids = np.random.default_rng(2).integers(3, model.cfg.vocab_size, (batch, n_q))
    _, cache, queries = prefill(model, ids.astype(np.int32), np.full((batch,), n_q), cache,
                                start=context - n_q, chunk=n_q, collect_queries=n_q)
    return cache, queries


def time_decode(model, batch: int, context: int, steps: int, repeats: int, attention=None,
                fill_cache=None, attention_stats: bool = True, calibrate: bool = False):
    """Median seconds per decode step at `context` cached tokens, batch `batch`.

    fill_cache(cache) may replace the random cache (e.g. keys with realistic structure); a
    stateful `attention` method builds its indexes over the cache before the timing (not
    timed). attention_stats=False times the loop without the method's statistics.
    calibrate: the last n = `calibration_queries(attention)` positions are a real prefill
    through the model (random tokens, on top of the filled cache) whose queries calibrate the
    method's index, as `aj.generate` does after a prompt (no-op for a method without).
    Returns (seconds per step, attention stats or None)."""
    cfg = model.cfg
    max_len = -(-(context + steps * (repeats + 1) + 1) // 256) * 256
    abstract = aj.KVCache.abstract(cfg, batch, max_len, model.dtype)  # the backend's layout
    keys = iter(jax.random.split(jax.random.PRNGKey(1), 2 * cfg.n_layers + 2))
    fill = lambda s: jax.jit(lambda k: jax.random.normal(k, s.shape, s.dtype))(next(keys))
    cache = aj.KVCache(k=jax.tree.map(fill, abstract.k), v=jax.tree.map(fill, abstract.v),
                       lengths=jnp.full((batch,), context, jnp.int32))
    if fill_cache is not None:
        cache = fill_cache(cache)
    cache, queries = calibration_prefill(model, cache, context, attention if calibrate else None)
    static, state, loop = init_decode_loop(model, cache, jnp.zeros((batch,), jnp.int32), steps,
                                           jax.random.PRNGKey(0), attention=attention,
                                           attention_stats=attention_stats, queries=queries)
    times = []
    for r in range(repeats + 1):  # the first run compiles; each run appends `steps` tokens
        loop = dict(loop, step=jnp.int32(0), done=jnp.zeros((batch,), bool))
        jax.block_until_ready(loop)
        t = time.perf_counter()
        loop = _decode_loop(static, state, loop, jnp.int32(steps))
        jax.block_until_ready(loop)
        if r:
            times.append((time.perf_counter() - t) / steps)
    assert int(loop["step"]) == steps
    stats = None
    if "stats" in loop:
        stats = summarize_stats(jax.device_get(loop["stats"]), cfg)
    return float(np.median(times)), stats


def time_prefill(model, context: int, chunk: int, repeats: int) -> float:
    """Median seconds to prefill `context` tokens (batch 1) through the library's prefill."""
    cfg = model.cfg
    ids = np.random.default_rng(0).integers(3, cfg.vocab_size, (1, context)).astype(np.int32)
    times = []
    for r in range(repeats + 1):
        cache = aj.KVCache.zeros(cfg, 1, -(-context // chunk) * chunk, model.dtype)
        t = time.perf_counter()
        logits, cache = prefill(model, ids, np.array([context]), cache, chunk=chunk)
        logits.block_until_ready()
        if r:
            times.append(time.perf_counter() - t)
    return float(np.median(times))


def weight_bytes(model) -> int:
    """Bytes of weights one decode step must read: every parameter, except that an untied
    embedding table is read one row per token (it counts only when it is also the head)."""
    total = sum(a.nbytes for _, v in nnx.iter_graph(model) if isinstance(v, nnx.Param)
                for a in jax.tree.leaves(v.get_value()))
    if model.lm_head is not None:
        total -= model.embed.get_value().nbytes
    return total


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--eight-b", action="store_true", help="also Llama-3-8B shapes (GPU)")
    ap.add_argument("--contexts", type=int, nargs="+", default=None,
                    help="decode contexts (default: 4096 32768 on GPU, 1024 4096 on CPU)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--steps", type=int, default=32, help="decode steps per timing")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tag", default=None, help="file name tag (default: backend)")
    args = ap.parse_args(argv)

    backend = jax.default_backend()
    device = str(jax.devices()[0].device_kind)
    print(f"jax {jax.__version__} on {backend}: {device}; python {platform.python_version()}")
    on_gpu = backend == "gpu"
    contexts = args.contexts or ([4096, 32768] if on_gpu else [1024, 4096])
    bw = read_bandwidth(2 << 30 if on_gpu else 256 << 20)
    print(f"read bandwidth: {bw / 1e9:.0f} GB/s")

    models = []
    if on_gpu:
        models.append(("smollm2-135m", lambda: random_model(SMOLLM2, jnp.bfloat16),
                       [c for c in contexts if c <= 8192] or [4096]))
    else:
        models.append(("smollm2-135m", lambda: aj.load_model(dtype="float32")[0],
                       [c for c in contexts if c <= 8192]))
    if args.eight_b:
        models.append(("llama3-8b-shaped", lambda: random_model(llama3_8b_config(), jnp.bfloat16),
                       contexts))

    rows = []
    for name, make, ctxs in models:
        model = make()
        wb = weight_bytes(model)
        cfg = model.cfg
        print(f"{name}: {cfg.param_count() / 1e9:.3f}B params, weights {wb / 2**30:.2f} GiB "
              f"{np.dtype(model.dtype).name}")
        pre_ctx = min(ctxs)
        chunk = pre_ctx if on_gpu else 512
        pre_s = time_prefill(model, pre_ctx, chunk, max(1, args.repeats - 1))
        print(f"  prefill {pre_ctx} tokens: {pre_s * 1e3:.1f} ms = {pre_ctx / pre_s:,.0f} tok/s")
        combos = [(b, c) for c in ctxs for b in args.batches]
        for b, c in tqdm(combos, desc=f"{name} decode", file=sys.stdout):
            try:
                s, _ = time_decode(model, b, c, args.steps, args.repeats)
            except Exception as e:  # e.g. out of memory at batch 8 x 32K on a small card
                tqdm.write(f"  batch {b} context {c}: FAILED {type(e).__name__}: {str(e)[:200]}")
                continue
            kv = cfg.kv_bytes_per_token(model.dtype) * b * c
            roof = (wb + kv) / bw  # reading weights and cache once at the measured read rate
            rows.append(dict(model=name, batch=b, context=c, decode_ms=s * 1e3,
                             tokens_per_s=b / s, weight_bytes=wb, kv_bytes=kv,
                             roofline_ms=roof * 1e3, ratio_to_roofline=s / roof,
                             prefill_tokens=pre_ctx, prefill_ms=pre_s * 1e3,
                             prefill_tok_s=pre_ctx / pre_s))
            tqdm.write(f"  batch {b} context {c}: {s * 1e3:.2f} ms/step, roofline "
                       f"{roof * 1e3:.2f} ms, ratio {s / roof:.2f}")
        del model

    tag = args.tag or backend
    os.makedirs(args.out, exist_ok=True)
    meta = dict(device=device, backend=backend, jax=jax.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                command="python " + " ".join(sys.argv), read_bandwidth_GBps=bw / 1e9,
                note="roofline = (weight bytes, an untied embedding table excluded, + KV bytes) / read bandwidth measured in the same "
                     "run (a reduction over 2 GiB, 10 times in one jit)")
    path = os.path.join(args.out, f"decode_speed_{tag}.json")
    with open(path, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print("wrote", path)
    plot(rows, meta, os.path.join(args.out, f"decode_speed_{tag}.png"))


def plot(rows, meta, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        return
    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [f"{r['model'].split('-')[0]}\nB{r['batch']} {r['context'] // 1024}K" for r in rows]
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["decode_ms"] for r in rows], 0.4, label="decode (measured)")
    ax.bar(x + 0.2, [r["roofline_ms"] for r in rows], 0.4, label="read weights + KV once")
    for i, r in enumerate(rows):
        ax.text(i, r["decode_ms"], f"{r['ratio_to_roofline']:.2f}x", ha="center", va="bottom",
                fontsize=8)
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("ms per decode step")
    ax.set_title(f"Decode step vs roofline — {meta['device']} ({meta['date'][:10]})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print("wrote", path)


if __name__ == "__main__":
    main()
