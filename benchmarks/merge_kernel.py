"""The merge of the gathered-attention kernel's splits: the Mosaic GPU merge kernel
(`split_merge`, the default) against the XLA reduction (`merge_splits`), side by side in one
run (GPU; Llama-3-8B layer shapes: 8 kv heads, G 4, d 128, bf16, P 32, random kept blocks).

    PYTHONUNBUFFERED=1 python benchmarks/merge_kernel.py --out benchmarks/results

For each capacity, kept counts all at the capacity ("full") or each kv head keeping a uniformly
random 50-100% of it ("ragged"); the balanced split (the default). "kernel+pdl": the merge
kernel launched as a programmatic dependent of the attention kernel
(`GatheredAttentionConfig(pdl=True)`). GPU time from the profiler
per `gathered_attention` call (one trace of 8 calls in a jit, every output returned): the
attention kernel alone, the whole call, and the other kernels by name (the merge kernel
`alaya_split_merge`, XLA's reduction `input_reduce_fusion`, the slice of the lse out of its
broadcast), and the span (first kernel start to last kernel end, per call: launch gaps
included, and the overlap a dependent launch buys; the sum of kernel times leaves both out).
Bandwidth is the kept K+V bytes over the time, against the copy roofline measured in the same
run; max_abs_diff compares o and lse with the XLA merge's.
Writes merge_kernel.json and merge_kernel.png.
"""
from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from alaya_jax.pallas import gathered_attention as ga  # noqa: E402
from kernel_waves import count_cases, finish, parse_caps, setup, timed_row  # noqa: E402


def max_abs_diff(cfg, want, layer, q, kept, cnt):
  keys, vals, blen, thr = layer
  got = jax.jit(lambda q, kept, cnt: ga.gathered_attention(q, keys, vals, blen, kept, cnt, thr,
                                                           config=cfg))(q, kept, cnt)
  return max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(got, want))


def main():
  args = parse_caps([656, 2048], lambda ap: ap.add_argument(
      "--merges", nargs="*", default=["xla", "kernel", "kernel+pdl"],
      choices=["xla", "kernel", "kernel+pdl"], help="the rows (merges) to time"))
  layer, qs, (read_tbps, copy_tbps) = setup("merge_kernel.py")
  keys, vals, blen, thr = layer
  rows = []
  rng = np.random.default_rng(0)
  for cap, counts_name, kept, cnt, mb in count_cases(rng, args.caps, args.counts):
    xla = ga.GatheredAttentionConfig(split_merge="xla")
    want = ga.gathered_attention(qs[0], keys, vals, blen, kept, cnt, thr, config=xla)
    for merge in args.merges:
      cfg = ga.GatheredAttentionConfig(split_merge=merge.split("+")[0], pdl="pdl" in merge)
      rows.append(timed_row(cfg, layer, qs, kept, cnt, mb, copy_tbps, cap=cap,
                            counts=counts_name, split_merge=merge,
                            max_abs_diff=max_abs_diff(cfg, want, layer, qs[0], kept, cnt)))
  finish(args.out, "merge_kernel", rows, (read_tbps, copy_tbps), plot)


def plot(rows, meta, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(8, 4))
  labels, kern, rest = [], [], []
  for r in rows:
    labels.append(f"{r['MB']:.0f} MB {r['counts']}\n{r['split_merge']}"
                  + (f"\n{r['build']}" if r.get("build") else ""))
    mosaic = r["kernel_us"] + sum(t for n, t in r["other_kernels_us"].items() if "alaya" in n)
    kern.append(mosaic)
    rest.append(r["call_us"] - mosaic)
  x = np.arange(len(rows))
  ax.bar(x, kern, color="#4c72b0", label="Mosaic GPU kernels (attention; merge)")
  ax.bar(x, rest, bottom=kern, color="#dd8452", label="XLA kernels (merge; lse slice)")
  for i, r in enumerate(rows):
    ax.text(i, r["call_us"] + 0.3, f"{r['call_vs_copy']:.0%}", ha="center", fontsize=8)
  ax.set_xticks(x, labels, fontsize=7)
  ax.set_ylabel("GPU us per call")
  ax.set_ylim(0, 1.3 * max(r["call_us"] for r in rows))
  ax.legend(fontsize=8, loc="upper center", ncol=2)
  ax.set_title(f"split merge: XLA reduction vs Mosaic GPU kernel ({meta['device']}; "
               f"labels: whole call / copy)", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


if __name__ == "__main__":
  main()
