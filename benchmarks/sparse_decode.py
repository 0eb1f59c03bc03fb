"""End-to-end decode ms/token with DIPR vs full attention as the context grows (GPU).

    python benchmarks/sparse_decode.py                       # Llama-3-8B shapes, 4K/32K/128K
    python benchmarks/sparse_decode.py --contexts 4096 131072 --profile 131072   # + GPU profile
    python benchmarks/sparse_decode.py --contexts --profile 4096 131072   # profiles only
    python benchmarks/sparse_decode.py --small --contexts 1024 2048   # CPU smoke run

A Llama-3-8B-shaped model with random bf16 weights decodes `--steps` tokens per timing,
batch 1, through the library's jitted decode loop (the same code as `aj.generate`). The
cache holds keys with realistic structure (`alaya_jax.index.synthetic`: topic clusters,
outlier channels, hot keys, RoPE), one synthetic layer copied into every layer; the DIPR
cluster index is built over it before timing (build time reported apart). Reports ms per
step, the ratio of each context to the smallest, and the fractions of keys attended/read.
DIPR runs through the jnp path under XLA (`dipr:BETA:CAP:xla`) and through the Mosaic GPU
kernels (`dipr:BETA:CAP:pallas`, `alaya_jax.pallas.sparse_decode`) side by side.
`--profile CONTEXT` adds, per DIPR variant at that context, a profiler trace of one decode
call: GPU kernel time per step (launch gaps excluded) against the wall time, the top kernels,
and the copies of large arrays in the compiled loop (none should run per step).
Writes benchmarks/results/sparse_decode_<backend>.{json,png}.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode_speed import SMOLLM2, calibration_prefill, random_model, time_decode  # noqa: E402
from kernels import kernel_times  # noqa: E402

import alaya_jax as aj  # noqa: E402
from alaya_jax import methods as M  # noqa: E402
from alaya_jax.index.synthetic import synthetic_kv  # noqa: E402
from alaya_jax.model.config import llama3_8b_config  # noqa: E402


def structured_fill(context: int, seed: int = 0):
    """Returns fill_cache(cache): every layer's first `context` positions get one synthetic
    layer of structured keys and values."""
    def fill(cache):
        B = cache.lengths.shape[0]
        k0, v0 = cache.layer(0)
        _, S, K, D = k0.shape
        _, k, v = synthetic_kv(B, context, K * 4, K, D, seed=seed)
        k = jnp.asarray(k, k0.dtype)
        v = jnp.asarray(v, k0.dtype)
        put = jax.jit(lambda buf, x: jax.lax.dynamic_update_slice(buf, x, (0, 0, 0, 0)))
        if cache.stacked:
            ks = jnp.stack([put(cache.k[i], k) for i in range(cache.n_layers)])
            vs = jnp.stack([put(cache.v[i], v) for i in range(cache.n_layers)])
        else:
            ks = tuple(put(a, k) for a in cache.k)
            vs = tuple(put(a, v) for a in cache.v)
        return cache.replace(k=ks, v=vs)
    return fill


def structured_cache(model, context: int, steps: int):
    """A batch-1 decode cache of `context` structured tokens (`structured_fill`) with room
    for a few decode calls of `steps` steps."""
    max_len = -(-(context + 3 * steps + 1) // 256) * 256
    abstract = aj.KVCache.abstract(model.cfg, 1, max_len, model.dtype)
    zeros = lambda s: jnp.zeros(s.shape, s.dtype)
    cache = aj.KVCache(k=jax.tree.map(zeros, abstract.k), v=jax.tree.map(zeros, abstract.v),
                       lengths=jnp.full((1,), context, jnp.int32))
    return structured_fill(context)(cache)


#: flag "compact": blocks of cluster_size slots and 4 balance rounds (~1x the cache, not ~3x)
COMPACT_LAYOUT = dict(block_size=32, balance_rounds=4)


def parse_method(spec: str):
    if spec == "full":
        return aj.FullAttention()
    name, _, arg = spec.partition(":")
    if name == "dipr":  # dipr:beta[:capacity_fraction[:impl[:flag...]]]
        beta, cap, impl, *flags = (arg.split(":") + ["", ""])
        unknown = {f for f in flags if f} - {"compact", "onepass", "f32", "noprobe"}
        if unknown:
            raise SystemExit(f"unknown dipr flags {sorted(unknown)}")
        # compact: COMPACT_LAYOUT; onepass: Plan.one_pass (threshold m' - beta, no keys-only
        # pass over the kept blocks);
        # f32: the cluster summaries stored in f32 (DIPR's default: bf16); noprobe: probe 0 (m'
        # from the exact region alone; the margins come from the score_select kernel)
        # (explicit, whatever DIPR's defaults: no flag is probe 2 with the exact threshold)
        kw = dict(COMPACT_LAYOUT) if "compact" in flags else {}
        if "f32" in flags:
            kw["summary_dtype"] = "float32"
        return M.DIPR(float(beta), "cluster", capacity_fraction=float(cap) if cap else None,
                      impl=impl or "auto", one_pass="onepass" in flags,
                      probe=0 if "noprobe" in flags else 2, **kw)
    if name == "dipr-auto":  # dipr-auto:beta[:capacity_fraction[:compact][:onepass]]: the
        # optimizer's plan for each context with DIPR's default plan options
        beta, cap, *flags = arg.split(":") + [""]
        if {f for f in flags if f} - {"compact", "onepass"}:
            raise SystemExit(f"unknown dipr-auto flags {flags}")
        kw = dict(COMPACT_LAYOUT) if "compact" in flags else {}
        return M.DIPR(float(beta), "auto", capacity_fraction=float(cap) if cap else None,
                      one_pass="onepass" in flags, **kw)
    if name in ("dipr-flat", "dipr-block"):  # dipr-flat:beta / dipr-block:beta: that index
        return M.DIPR(float(arg), name.removeprefix("dipr-"))
    if name == "quest":
        return M.Quest(int(arg))
    raise SystemExit(f"unknown method {spec!r}")


def parse_spec(spec: str):
    """(method, attention_stats, calibrate, config) of a method spec. Flags at its end, in
    any order: ":nostats" times it without the statistics (`init_decode_loop(
    attention_stats=False)`); ":calib" calibrates its index on the queries of a real prefill of
    the context's last positions (`time_decode(calibrate=True)`, as `aj.generate` does after a
    prompt; without it the index keeps its uncalibrated margin). "@key=val+key=val" at the
    very end runs the Mosaic GPU path with those `SparseDecodeConfig` /
    `GatheredAttentionConfig` fields (config None: the path's default), e.g.
    "dipr-auto:8:0.05:nostats@exact_kernel=0"."""
    spec, _, over = spec.partition("@")
    flags = set()
    while spec.endswith((":nostats", ":calib")):
        spec, _, flag = spec.rpartition(":")
        flags.add(flag)
    return (parse_method(spec), "nostats" not in flags, "calib" in flags,
            path_overrides(over.split("+") if over else []))


def path_overrides(items):
    """The Mosaic GPU path's config with `key=value` items set (None when there are none)."""
    from alaya_jax.pallas import gathered_attention as ga
    from alaya_jax.pallas import score_select as ss
    from alaya_jax.pallas import sparse_decode as sd

    dec_fields = {f.name: str(f.type) for f in dataclasses.fields(sd.SparseDecodeConfig)}
    att_fields = {f.name: str(f.type) for f in dataclasses.fields(ga.GatheredAttentionConfig)}
    mar_fields = {"margins." + f.name: str(f.type) for f in dataclasses.fields(ss.ScoreSelectConfig)}
    dec, att, mar = {}, {}, {}
    for item in items:
        key, _, val = item.partition("=")
        kind = dec_fields.get(key) or att_fields.get(key) or mar_fields.get(key)
        if kind is None:
            raise SystemExit(f"unknown config field {key!r} in {item!r}")
        try:  # by the field's annotation: "bool", "int | None", "str", ...
            value = (val.lower() in ("1", "true") if kind.startswith("bool") else
                     int(val) if kind.startswith("int") else val)
        except ValueError:
            raise SystemExit(f"{item!r}: {key} takes {kind}") from None
        if key in mar_fields:
            mar[key.split(".", 1)[1]] = value
        else:
            (dec if key in dec_fields else att)[key] = value
    if not dec and not att and not mar:
        return None
    cfg = sd.SparseDecodeConfig(**dec)
    if mar:  # margins.FIELD: the margins kernel's ScoreSelectConfig
        cfg = dataclasses.replace(cfg, margins=dataclasses.replace(cfg.margins, **mar))
    if att:
        cfg = dataclasses.replace(cfg, attention=dataclasses.replace(cfg.attention, **att))
    return cfg


@contextlib.contextmanager
def path_config(cfg):
    """The Mosaic GPU path traced with `cfg` while the block runs (None: its default). Clears
    jax's caches on entry (a jitted loop's cache key does not see the config), not on exit: a
    loop compiled in the block keeps its config when it runs after it."""
    from alaya_jax.pallas import sparse_decode as sd

    orig = sd.sparse_attention_pallas
    jax.clear_caches()
    if cfg is not None:
        sd.sparse_attention_pallas = functools.partial(orig, config=cfg)
    try:
        yield
    finally:
        sd.sparse_attention_pallas = orig


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", type=int, nargs="*", default=[4096, 32768, 131072],
                    help="contexts to time (none: only --profile)")
    ap.add_argument("--methods", nargs="+",
                    default=["full", "dipr:4:0.05:xla", "dipr:4:0.05:pallas"],
                    help="full | dipr:BETA:CAPACITY_FRACTION[:auto|xla|pallas"
                         "[:compact][:onepass][:f32][:noprobe]] | "
                         "dipr-auto:BETA[:CAPACITY_FRACTION[:compact][:onepass]] | dipr-flat:BETA | "
                         "dipr-block:BETA | quest:PAGES; "
                         "any sparse method[:nostats][:calib]: timed without its statistics / "
                         "with its index calibrated on a real prefill's queries; "
                         "[@key=val+key=val]: Mosaic GPU path config fields (margins.FIELD: the margins kernel's)")
    ap.add_argument("--profile", type=int, nargs="*", default=[],
                    help="contexts at which to profile one decode call of each DIPR method")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--small", action="store_true", help="SmolLM2 shapes instead of 8B (CPU)")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)

    backend = jax.default_backend()
    device = str(jax.devices()[0].device_kind)
    print(f"jax {jax.__version__} on {backend}: {device}", flush=True)
    cfg = SMOLLM2 if args.small else llama3_8b_config()
    model = random_model(cfg, jnp.bfloat16 if backend == "gpu" else jnp.float32)
    rows = []
    for spec in args.methods:
        method, with_stats, calib, path_cfg = parse_spec(spec)
        for ctx in args.contexts:
            t = time.perf_counter()
            try:
                with path_config(path_cfg):
                    s, stats = time_decode(model, 1, ctx, args.steps, args.repeats,
                                           attention=method, fill_cache=structured_fill(ctx),
                                           attention_stats=with_stats, calibrate=calib)
            except Exception as e:  # out of memory at the largest context, say
                print(f"{spec} @ {ctx}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
                continue
            row = dict(method=spec, describe=method.describe(), context=ctx, decode_ms=s * 1e3,
                       wall_s=time.perf_counter() - t)
            if stats:
                row.update(attended_fraction=stats["attended_fraction"],
                           read_fraction=stats["read_fraction"],
                           truncated_layer_steps=stats["truncated_layer_steps"])
            rows.append(row)
            _write(args, rows, cfg)  # after every row: a run cut short keeps what it measured
            print(f"{spec} @ {ctx}: {s * 1e3:.2f} ms/step "
                  + (f"attended {stats['attended_fraction']:.3f} read {stats['read_fraction']:.3f} "
                     f"truncated {stats['truncated_layer_steps']}" if stats else ""), flush=True)
    profiles = []
    for ctx in args.profile:
        for spec in args.methods:
            if not spec.startswith("dipr"):
                continue
            try:
                method, with_stats, calib, path_cfg = parse_spec(spec)
                with path_config(path_cfg):
                    prof = profile_decode(model, ctx, args.steps, method, with_stats, calib)
            except Exception as e:
                print(f"profile {spec} @ {ctx}: FAILED {type(e).__name__}: {str(e)[:300]}")
                continue
            prof.update(method=spec, context=ctx)
            profiles.append(prof)
            _write(args, rows, cfg, profiles)
            print(f"profile {spec} @ {ctx}: wall {prof['wall_ms_per_step']:.2f} ms/step, GPU "
                  f"kernels {prof['gpu_ms_per_step']:.2f} ms/step, {prof['copies_over_1MB']} "
                  "large copies in the loop; top kernels (us/step):", flush=True)
            for name, us in list(prof["kernels_us_per_step"].items())[:12]:
                print(f"    {us:9.1f}  {name}")
    for spec in args.methods:
        mine = [r for r in rows if r["method"] == spec]
        if mine:
            base = min(mine, key=lambda r: r["context"])["decode_ms"]
            for r in mine:
                r["ratio_to_smallest_context"] = r["decode_ms"] / base
    meta = _write(args, rows, cfg, profiles)
    plot(rows, meta, os.path.join(args.out, f"sparse_decode_{jax.default_backend()}.png"))


def profile_decode(model, context: int, steps: int, method, attention_stats: bool = True,
                   calibrate: bool = False) -> dict:
    """One decode call of `steps` steps under the profiler (after a compiling call): wall and
    GPU-kernel ms per step, kernel us per step by name, and the copies of arrays over 1 MB
    in the compiled loop (the index and cache must stay in place)."""
    import re

    from alaya_jax.generate import _decode_loop, init_decode_loop

    cache = structured_cache(model, context, steps)
    cache, queries = calibration_prefill(model, cache, context, method if calibrate else None)
    static, state, loop = init_decode_loop(model, cache, jnp.zeros((1,), jnp.int32), steps,
                                           jax.random.PRNGKey(0), attention=method,
                                           attention_stats=attention_stats, queries=queries)
    del cache
    hlo = _decode_loop.lower(static, state, loop, jnp.int32(steps)).compile().as_text()
    copies = []
    for line in hlo.splitlines():
        m = re.search(r"= (\w+)\[([\d,]*)\][^ ]* copy\(", line)
        if m:
            n = int(np.prod([int(x) for x in m.group(2).split(",") if x] or [1]))
            nbytes = n * {"bf16": 2, "f16": 2, "f32": 4, "s32": 4, "pred": 1}.get(m.group(1), 4)
            if nbytes > 1 << 20:
                op = re.search(r'op_name="([^"]*)"', line)
                copies.append(line.strip()[:120] + (" | " + op.group(1)[-200:] if op else ""))
    run = lambda lp: _decode_loop(static, state, dict(lp, step=jnp.int32(0),
                                                      done=jnp.zeros((1,), bool)), jnp.int32(steps))
    loop = run(loop)  # compile + warm up
    jax.block_until_ready(loop)
    t = time.perf_counter()
    loop = run(loop)
    jax.block_until_ready(loop)
    wall = (time.perf_counter() - t) / steps
    holder = {}

    def once(lp):
        holder["loop"] = run(lp)
        return holder["loop"]

    per_kernel = kernel_times(once, loop)
    per_step = {k: v / steps for k, v in per_kernel.items()}
    return dict(wall_ms_per_step=wall * 1e3, gpu_ms_per_step=sum(per_step.values()) / 1e3,
                kernels_us_per_step=dict(list(per_step.items())[:40]),
                copies_over_1MB=len(copies), copies=copies[:20])


def _write(args, rows, cfg, profiles=()):
    backend = jax.default_backend()
    meta = dict(device=str(jax.devices()[0].device_kind), backend=backend, jax=jax.__version__,
                model=cfg.name, steps=args.steps, batch=1, command="python " + " ".join(sys.argv),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"sparse_decode_{backend}.json")
    with open(path, "w") as f:
        json.dump(dict(meta=meta, rows=rows, profiles=list(profiles)), f, indent=1)
    return meta


def plot(rows, meta, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for spec in dict.fromkeys(r["method"] for r in rows):
        mine = sorted((r for r in rows if r["method"] == spec), key=lambda r: r["context"])
        ax.plot([r["context"] for r in mine], [r["decode_ms"] for r in mine], "o-", label=spec)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("ms per decode step (batch 1)")
    ax.set_title(f"{meta['model']} decode — {meta['device']} ({meta['date'][:10]})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print("wrote", path)


if __name__ == "__main__":
    main()
