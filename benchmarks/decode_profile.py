"""Per-kernel GPU time of a few decode steps of a Llama-3-8B-shaped model with few layers,
for kernel-level A/B comparisons of the sparse decode path (GPU).

    python benchmarks/decode_profile.py --out OUT --contexts 4096 131072 \\
        --method dipr-auto:8:0.05:compact:onepass --layers 2 \\
        --variants base exact_kernel=0 pdl=1 nostats

Each variant decodes `--steps` steps through the library's jitted decode loop (as
`sparse_decode.py`, structured keys) after a compiling call; one more call runs under the
profiler. Prints and writes, per variant and context, wall and GPU ms per step, kernel
launches per step and every kernel's GPU us per step (kernels_<variant>_<context>.txt), and
with --hlo the compiled HLO (to map fusion names to what they compute); --calib calibrates
the index on the queries of a real prefill of the context's last positions first.

Variants: "base"; "nostats" (init_decode_loop(attention_stats=False)); and key=value sets of
`SparseDecodeConfig` fields for the Mosaic GPU path (exact_kernel=0|1, cut_kernel=0|1,
in_kernel=0|1, select=...) or `GatheredAttentionConfig` fields (pdl=0|1, split_merge=xla|kernel),
joined with "+", e.g. "exact_kernel=0+pdl=1". A variant's config replaces the path's default
for that run only (the module function is wrapped while the variant is traced and compiled).
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import sparse_decode as SD  # noqa: E402
from decode_speed import calibration_prefill, random_model  # noqa: E402
from gpu_trace import kernel_events  # noqa: E402

from alaya_jax.generate import _decode_loop, init_decode_loop  # noqa: E402
from alaya_jax.model.config import llama3_8b_config  # noqa: E402


def parse_variant(spec: str):
    """(attention_stats, SparseDecodeConfig or None: the path's default) of a variant name."""
    items = spec.split("+")
    stats = "nostats" not in items
    return stats, SD.path_overrides([i for i in items if i not in ("base", "nostats")])


def profile(model, method, context: int, steps: int, stats: bool, cfg, hlo_path=None,
            calibrate: bool = False, trace: bool = True, timeline_path=None):
    cache = SD.structured_cache(model, context, steps)
    cache, queries = calibration_prefill(model, cache, context, method if calibrate else None)
    with SD.path_config(cfg):  # (clears jax's caches: the loop's key does not see the config)
        static, state, loop = init_decode_loop(model, cache, jnp.zeros((1,), jnp.int32), steps,
                                               jax.random.PRNGKey(0), attention=method,
                                               attention_stats=stats, queries=queries)
        del cache
        if hlo_path:
            with open(hlo_path, "w") as f:
                f.write(_decode_loop.lower(static, state, loop, jnp.int32(steps)).compile()
                        .as_text())
        run = lambda lp: _decode_loop(static, state, dict(lp, step=jnp.int32(0),
                                      done=jnp.zeros((1,), bool)), jnp.int32(steps))
        loop = run(loop)
        jax.block_until_ready(loop)
    t = time.perf_counter()
    loop = run(loop)
    jax.block_until_ready(loop)
    wall = (time.perf_counter() - t) / steps
    tot, cnt = collections.Counter(), collections.Counter()
    events = sorted(kernel_events(run, loop, starts=True) if trace else (), key=lambda e: e[2])
    for name, sec, _ in events:
        tot[name] += sec * 1e6 / steps
        cnt[name] += 1 / steps
    if timeline_path and events:  # the last events/steps GPU events: about the last step
        # (with the run's trailing copies); start, end and the gap before each
        per_step = round(len(events) / steps)
        t0, prev_end = events[-per_step][2], None
        with open(timeline_path, "w") as f:
            f.write("# start_us end_us gap_us name (the run's last events/steps GPU events: "
                    "about the last step, with the run's trailing copies; gap: start - the "
                    "previous kernel's end, negative where they overlap)\n")
            for name, sec, start in events[-per_step:]:
                gap = 0.0 if prev_end is None else (start - prev_end) * 1e6
                f.write(f"{(start - t0) * 1e6:9.2f} {(start + sec - t0) * 1e6:9.2f} "
                        f"{gap:7.2f} {name}\n")
                prev_end = start + sec
    return wall, tot, cnt


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/decode_profile")
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 131072])
    ap.add_argument("--method", default="dipr-auto:8:0.05:compact:onepass")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--variants", nargs="+", default=["base"])
    ap.add_argument("--hlo", action="store_true", help="also write the compiled HLO")
    ap.add_argument("--calib", action="store_true",
                    help="calibrate the index on a real prefill's queries (sparse_decode's :calib)")
    ap.add_argument("--timeline", action="store_true",
                    help="also write the last step's kernels in order with their start, end "
                         "and the gap before each (timeline_<variant>_<context>.txt): shows "
                         "launch gaps and where a dependent launch overlaps")
    ap.add_argument("--no-trace", action="store_true",
                    help="no profiler trace (wall time only): for running under Nsight Compute, "
                         "whose CUPTI session the jax profiler's would collide with")
    args = ap.parse_args()
    if jax.default_backend() != "gpu":
        raise SystemExit("decode_profile.py reads GPU kernel times: it needs an NVIDIA GPU")
    os.makedirs(args.out, exist_ok=True)
    model = random_model(dataclasses.replace(llama3_8b_config(), n_layers=args.layers),
                         jnp.bfloat16)
    method = SD.parse_method(args.method)
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}; {args.method}, "
          f"{args.layers} layers", flush=True)
    for variant in args.variants:
        stats, cfg = parse_variant(variant)
        for ctx in args.contexts:
            tag = f"{variant.replace('=', '').replace('+', '_')}_{ctx}"
            hlo = os.path.join(args.out, f"hlo_{tag}.txt") if args.hlo else None
            timeline = (os.path.join(args.out, f"timeline_{tag}.txt") if args.timeline
                        else None)
            wall, tot, cnt = profile(model, method, ctx, args.steps, stats, cfg, hlo, args.calib,
                                     not args.no_trace, timeline)
            lines = [f"# {variant} @ {ctx}: wall {wall * 1e3:.3f} ms/step, GPU "
                     f"{sum(tot.values()) / 1e3:.3f} ms/step, launches "
                     f"{sum(cnt.values()):.1f}/step"]
            lines += [f"{us:9.2f} us {cnt[n]:5.1f}x  {n}" for n, us in tot.most_common()]
            print(lines[0], flush=True)
            with open(os.path.join(args.out, f"kernels_{tag}.txt"), "w") as f:
                f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
