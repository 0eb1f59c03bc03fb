"""GPU idle time per kernel launch inside one jit: why the kernels' wall times trail their GPU
times at small selections (the latency floor of benchmarks/kernels.py).

    python benchmarks/launch_gap.py --out benchmarks/results

Each case chains --chain dependent calls of one small operation in one jit (each call's input
is the previous call's output, so nothing overlaps or is hoisted): the score_select margins
kernel (Mosaic GPU) and its jnp reference (XLA), the gathered attention kernel without and
with its merge, its jnp reference, and one XLA elementwise kernel behind an optimization
barrier. Per call: wall time (median of --reps calls of the chain, divided by its length),
GPU busy time (the sum of the kernels' durations in a profiler trace), and the kernels
launched. (wall - GPU busy) / kernels is the GPU's idle time per launch. Shapes are tiny on
purpose (8 kv heads, G 4, d 128, 256 blocks of 32, 8 kept per head): the kernels' own time is
the floor, not bandwidth. Writes JSON and a PNG.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from alaya_jax.pallas import gathered_attention as ga  # noqa: E402
from alaya_jax.pallas import score_select as ss  # noqa: E402
from gpu_trace import kernel_events  # noqa: E402

B, K, G, D, N, P, CAP = 1, 8, 4, 128, 256, 32, 8


def inputs():
  ks = jax.random.split(jax.random.key(0), 4)
  return dict(
      q=jax.random.normal(ks[0], (B, K * G, D)),
      cent=jax.random.normal(ks[1], (B, K, N, D)).astype(jnp.bfloat16),
      keys=jax.random.normal(ks[2], (B, K, N, P, D)).astype(jnp.bfloat16),
      vals=jax.random.normal(ks[3], (B, K, N, P, D)).astype(jnp.bfloat16),
      nb=jnp.full((B, K), N, jnp.int32), thr=jnp.zeros((B, K * G)),
      blen=jnp.full((B, K, N), P, jnp.int32),
      kept=jnp.broadcast_to(jnp.arange(CAP, dtype=jnp.int32), (B, K, CAP)),
      cnt=jnp.full((B, K), CAP, jnp.int32))


def cases(x):
  """name -> one call: q [B, H, D] -> something the next call can add to q."""
  attn = lambda impl: (lambda q: ga.gathered_attention(
      q, x["keys"], x["vals"], x["blen"], x["kept"], x["cnt"], x["thr"], impl=impl)[0])
  return {
      "margins (Mosaic GPU)": lambda q: ss.block_margins_mgpu(q, x["cent"], x["nb"], x["thr"])
      [..., :1].mean(),
      "margins (XLA)": lambda q: ss.block_margins_reference(q, x["cent"], x["nb"], x["thr"])
      [..., :1].mean(),
      "attention kernel (Mosaic GPU)": lambda q: ga._launch(
          q, x["keys"], x["vals"], x["blen"], x["kept"], x["cnt"], x["thr"],
          config=ga.GatheredAttentionConfig(), interpret=False)[1].mean(),
      "attention + merge (Mosaic GPU)": attn("pallas"),
      "attention (XLA)": attn("xla"),
      "one elementwise kernel (XLA)": lambda q: jax.lax.optimization_barrier(jnp.sin(q)),
  }


def chained(one, n):
  def f(q):
    acc = q
    for _ in range(n):
      acc = acc + 1e-3 * one(acc)
    return acc
  return jax.jit(f)


def plot(rows, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(10, 4.5))
  names = [r["case"] for r in rows]
  y = np.arange(len(rows))
  ax.barh(y - 0.2, [r["wall_us"] for r in rows], 0.4, label="wall per call")
  ax.barh(y + 0.2, [r["gpu_us"] for r in rows], 0.4, label="GPU busy per call")
  for i, r in enumerate(rows):
    ax.text(r["wall_us"] + 0.3, i - 0.2, f'{r["kernels"]:.1f} kernels, '
            f'{r["idle_us_per_kernel"]:.1f} us idle each', va="center", fontsize=8)
  ax.set_yticks(y, names)
  ax.invert_yaxis()
  ax.set_xlabel("microseconds per call (chain of dependent calls in one jit)")
  ax.set_title("GPU idle time per kernel launch")
  ax.legend(loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", default="benchmarks/results")
  ap.add_argument("--chain", type=int, default=32, help="dependent calls per jit")
  ap.add_argument("--reps", type=int, default=30)
  args = ap.parse_args()
  dev = jax.devices()[0]
  if dev.platform != "gpu":
    sys.exit("launch_gap.py measures GPU launches: run it on a machine with an NVIDIA GPU")
  meta = dict(jax=jax.__version__, device=dev.device_kind, python=platform.python_version(),
              date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              command="python " + " ".join(sys.argv), chain=args.chain, reps=args.reps,
              shapes=dict(B=B, K=K, G=G, D=D, N=N, P=P, cap=CAP))
  x = inputs()
  rows = []
  for name, one in cases(x).items():
    f = chained(one, args.chain)
    jax.block_until_ready(f(x["q"]))
    walls = []
    for _ in range(args.reps):
      t = time.perf_counter()
      jax.block_until_ready(f(x["q"]))
      walls.append(time.perf_counter() - t)
    events = kernel_events(f, x["q"])
    busy, launches = sum(t for _, t in events), len(events)
    n = args.chain
    wall, gpu, kern = float(np.median(walls)) / n, busy / n, launches / n
    rows.append(dict(case=name, wall_us=wall * 1e6, gpu_us=gpu * 1e6, kernels=kern,
                     idle_us_per_kernel=(wall - gpu) * 1e6 / kern))
    print(json.dumps(rows[-1]), flush=True)
  os.makedirs(args.out, exist_ok=True)
  stem = os.path.join(args.out, "launch_gap")
  with open(stem + ".json", "w") as f:
    json.dump(dict(meta, rows=rows), f, indent=1)
  plot(rows, stem + ".png")
  print("wrote", stem + ".json")


if __name__ == "__main__":
  main()
