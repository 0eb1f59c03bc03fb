"""The GPU time of a Mosaic GPU kernel that does (almost) nothing: the floor under the split
merge's ~2.8 us (issue 10: what keeps the ragged 68 MB attention call below 80% of copy).

    PYTHONUNBUFFERED=1 python benchmarks/kernel_floor.py --out benchmarks/results

Each case runs --calls independent calls in one jit (every output returned) and reads each
kernel's duration from the profiler (GPU time, launch gaps excluded):
  - "mosaic empty": a Mosaic GPU kernel of --programs programs of one warpgroup, each storing
    one f32 row of 128 from registers (its only work);
  - "mosaic empty + smem": the same with 128 KB of shared memory scratch allocated;
  - "xla elementwise": x * (i + 2) on 128 x --programs f32 (XLA fuses the calls into one
    kernel);
  - "merge": the split merge (`split_merge.merge_partials_rows`) on the ragged case's shapes
    (8 kv heads, 44 partial rows, G 4, D 128; 33 counted), alone: not after the attention
    kernel (its inputs come from an XLA kernel just before it, so they sit in L2 as well).
  - "empty after attention" / "merge after attention": the ragged 68 MB attention kernel
    (kernel_waves' layer and counts, cap 656) and right after it, reading its output, the
    empty kernel or the merge: what a kernel costs when it follows the attention kernel.
Writes kernel_floor.json and kernel_floor.png (median us a kernel); --replot JSON redraws the
plot of a committed run. The committed run (2026-11-27) timed the merge variant tried on branch
`merge-registers` (its rows say "merge registers"); its first_run also the merge on main
("merge tma": one TMA copy into shared memory, two passes).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kernel_waves as kw  # noqa: E402
from alaya_jax.pallas import gathered_attention as ga  # noqa: E402
from alaya_jax.pallas import split_merge as sm  # noqa: E402
from bench_io import run_meta, write_json  # noqa: E402
from gpu_trace import kernel_events  # noqa: E402


def empty_kernel(programs: int, smem_kb: int):
  from jax.experimental.pallas import mosaic_gpu as plgpu

  def body(x_gmem, o_gmem, *scratch):
    pid = jax.lax.axis_index("p")
    o_gmem.at[pid][...] = jnp.full((128,), 1.0, jnp.float32) + x_gmem[pid, 0]

  scratch = [plgpu.SMEM((smem_kb * 256,), jnp.float32)] if smem_kb else []
  return plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((programs, 128), jnp.float32),
                      grid=(programs,), grid_names=("p",), scratch_types=scratch,
                      kernel_name="floor_empty" + ("_smem" if smem_kb else ""))


def durations(f, args, calls: int, match: str) -> list[float]:
  """us of each kernel named like `match` in one traced run of `calls` calls of f in a jit
  (compiled and run once before the trace)."""
  chain = jax.jit(lambda *a: [f(*a, i) for i in range(calls)])
  jax.block_until_ready(chain(*args))
  ts = [t * 1e6 for n, t in kernel_events(chain, *args) if match in n]
  if not ts:
    raise SystemExit(f"kernel_floor.py: no kernel named like {match!r} in the trace")
  return ts


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--programs", type=int, default=32)
  ap.add_argument("--calls", type=int, default=16)
  ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  ap.add_argument("--replot", metavar="JSON", help="redraw the plot of a written run and exit")
  args = ap.parse_args()
  if args.replot:
    with open(args.replot) as fh:
      run = json.load(fh)
    plot(run["rows"], run, os.path.splitext(args.replot)[0] + ".png")
    return
  if jax.default_backend() != "gpu":
    raise SystemExit("kernel_floor.py times Mosaic GPU kernels: it needs an NVIDIA GPU")
  p = args.programs
  x = jnp.ones((p, 128), jnp.float32)
  bk, s, g, d = 8, 44, 4, 128
  rng = np.random.default_rng(0)
  o_part = jnp.asarray(rng.standard_normal((bk, s, g, d)), jnp.float32)
  lb = jnp.asarray(np.broadcast_to(rng.standard_normal((bk, s, g, 1)),
                                   (bk, s, g, sm.merge_width(g, d, s))), jnp.float32)
  rows = jnp.full((bk, 4), 33, jnp.int32)
  cases = {
      "mosaic empty": (lambda x, i: empty_kernel(p, 0)(x + i), (x,), "floor_empty"),
      "mosaic empty + smem": (lambda x, i: empty_kernel(p, 128)(x + i), (x,), "floor_empty_smem"),
      "xla elementwise": (lambda x, i: x * (i + 2.0), (x,), "fusion"),
      "merge": (lambda o, l, c, i: sm.merge_partials_rows(o + i, l, c), (o_part, lb, rows),
                "alaya_split_merge"),
  }
  layer = kw.random_layer()
  _, _, kept, cnt, _ = next(c for c in kw.count_cases(np.random.default_rng(0), [656])
                            if c[1] == "ragged")
  cfg = ga.GatheredAttentionConfig()

  def partials(q, kept, cnt, keys, vals, blen, thr):
    return ga._launch(q, keys, vals, blen, kept, cnt, thr, config=cfg, interpret=False)

  def empty_after(q, kept, cnt, keys, vals, blen, thr, i):
    part = partials(q + i, kept, cnt, keys, vals, blen, thr)
    return empty_kernel(p, 0)(part.o_part.reshape(-1, 128))  # (a bitcast: no copy between)

  def merge_after(q, kept, cnt, keys, vals, blen, thr, i):
    part = partials(q + i, kept, cnt, keys, vals, blen, thr)
    return sm.merge_partials_rows(part.o_part, part.lb_part, part.count)

  q = jax.random.normal(jax.random.key(2), (kw.B, kw.K * kw.G, kw.D), jnp.bfloat16)
  att_args = (q, kept, cnt, *layer)
  cases["empty after attention"] = (empty_after, att_args, "floor_empty")
  cases["merge after attention"] = (merge_after, att_args, "alaya_split_merge")
  out = []
  for name, (f, fargs, match) in cases.items():
    ts = durations(f, fargs, args.calls, match)
    r = dict(case=name, kernels=len(ts), median_us=round(float(np.median(ts)), 3),
             min_us=round(float(np.min(ts)), 3))
    print(r, flush=True)
    out.append(r)
  meta = run_meta(programs=p, calls=args.calls)
  write_json(args.out, "kernel_floor", meta, out)
  plot(out, meta, os.path.join(args.out, "kernel_floor.png"))


def plot(rows, meta, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 3))
  ax.barh([r["case"] for r in rows], [r["median_us"] for r in rows], color="#4c72b0")
  for i, r in enumerate(rows):
    ax.text(r["median_us"], i, f" {r['median_us']:.2f}", va="center", fontsize=8)
  ax.set_xlabel("GPU us a kernel (median)")
  ax.set_title(f"kernel floors ({meta['device']}, {meta['programs']} programs)", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


if __name__ == "__main__":
  main()
