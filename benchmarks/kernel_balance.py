"""The gathered-attention kernel's balanced split against a fixed share of the capacity per kv
head, side by side (GPU; Llama-3-8B layer shapes: 8 kv heads, G 4, d 128, bf16, P 32).

    PYTHONUNBUFFERED=1 python benchmarks/kernel_balance.py --out benchmarks/results

For each capacity, kept counts either all at the capacity ("full") or ragged, each kv head
keeping a uniformly random 50-100% of it ("ragged": what a dynamic rule such as DIPR's under a
capacity gives). Two splits of the kept lists into programs, both one wave of 2 programs an
SM: "static" (`blocks_per_program` from the capacity, the same share for every head) and
"balanced" (`GatheredAttentionConfig()`'s default: shares from the total kept, read from the
counts in the kernel). GPU time from the profiler of the attention kernel alone and of the
whole `gathered_attention` call (kernel + the merge of the splits), per call (one trace of 8
calls in a jit); bandwidth is the kept K+V bytes over it, against the copy roofline measured
in the same run. Writes kernel_balance.json and kernel_balance.png.

    --sweep: the balanced split's knobs instead (programs launched 1-3 an SM, steps in flight,
    blocks per step; the default first), rows split="balanced:PROGRAMS:SIF:BPS", written to
    kernel_balance_sweep.{json,png}.
"""
from __future__ import annotations

import dataclasses
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from alaya_jax.pallas import gathered_attention as ga  # noqa: E402
from kernel_waves import K, count_cases, finish, parse_caps, setup, timed_row  # noqa: E402


def sweep_configs():
  """(name, config) of the balanced split's knobs, the default first."""
  sms = ga._sm_count()
  out = [("balanced", ga.GatheredAttentionConfig())]
  for per_sm in (1, 2, 3):
    for sif in (2, 4, 6, 8):
      for bps in (1, 2):
        cfg = ga.GatheredAttentionConfig(programs=per_sm * sms, steps_in_flight=sif,
                                         blocks_per_step=bps)
        if cfg != dataclasses.replace(out[0][1], programs=ga.PROGRAMS_PER_SM * sms):
          out.append((f"balanced:{per_sm * sms}:{sif}:{bps}", cfg))
  return out


def main():
  args = parse_caps([656, 2048], lambda ap: ap.add_argument(
      "--sweep", action="store_true", help="the balanced split's knobs (see the docstring)"))
  layer, qs, (read_tbps, copy_tbps) = setup("kernel_balance.py")
  name, plot_fn = ("kernel_balance_sweep", plot_sweep) if args.sweep else ("kernel_balance", plot)
  rows = []
  rng = np.random.default_rng(0)
  for cap, counts_name, kept, cnt, mb in count_cases(rng, args.caps, args.counts):
    static = ga.GatheredAttentionConfig(blocks_per_program=ga.default_blocks_per_program(cap, K))
    configs = (sweep_configs() if args.sweep else
               (("static", static), ("balanced", ga.GatheredAttentionConfig())))
    for split, cfg in configs:
      try:
        rows.append(timed_row(cfg, layer, qs, kept, cnt, mb, copy_tbps, cap=cap,
                              counts=counts_name, split=split))
      except Exception as e:  # a knob the kernel cannot take (shared memory, registers)
        if not args.sweep:
          raise
        print(f"{split}: {type(e).__name__}: {str(e)[:200]}", flush=True)
      if args.sweep:  # written as it goes: a long sweep cut short keeps its rows
        finish(args.out, name, rows, (read_tbps, copy_tbps), plot_fn)
  if not args.sweep:
    finish(args.out, name, rows, (read_tbps, copy_tbps), plot_fn)


def plot_sweep(rows, meta, path):
  """The whole call's fraction of copy per config, one bar group per case."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  cases = list(dict.fromkeys((r["cap"], r["counts"]) for r in rows))
  fig, axes = plt.subplots(len(cases), 1, figsize=(10, 2.6 * len(cases)), squeeze=False)
  for ax, case in zip(axes[:, 0], cases):
    mine = [r for r in rows if (r["cap"], r["counts"]) == case]
    ax.bar(range(len(mine)), [r["call_vs_copy"] for r in mine], color=[
        "tab:red" if r["split"] == "balanced" else "tab:blue" for r in mine])
    ax.axhline(0.8, color="gray", ls="--", lw=1)
    ax.set_xticks(range(len(mine)), [r["split"].replace("balanced:", "") for r in mine],
                  rotation=90, fontsize=6)
    ax.set_ylabel("call / copy")
    ax.set_title(f"cap {case[0]}, {case[1]} ({mine[0]['MB']:.0f} MB); red: the default; "
                 "labels programs:steps in flight:blocks per step", fontsize=8)
  fig.suptitle(f"balanced split knobs ({meta['device']})", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def plot(rows, meta, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4))
  cases = [(r["cap"], r["counts"]) for r in rows if r["split"] == "static"]
  x = np.arange(len(cases))
  for i, (split, key) in enumerate((("static", "kernel_vs_copy"), ("static", "call_vs_copy"),
                                    ("balanced", "kernel_vs_copy"),
                                    ("balanced", "call_vs_copy"))):
    vals = [next(r[key] for r in rows if (r["cap"], r["counts"]) == c and r["split"] == split)
            for c in cases]
    ax.bar(x + (i - 1.5) * 0.2, vals, 0.2,
           label=f"{split}, {'kernel' if key.startswith('kernel') else 'whole call'}")
  ax.axhline(0.8, color="gray", ls="--", lw=1)
  ax.set_xticks(x, [f"cap {c}, {n}\n{next(r['MB'] for r in rows if (r['cap'], r['counts']) == (c, n)):.0f} MB"
                    for c, n in cases], fontsize=8)
  ax.set_ylabel("fraction of the copy roofline")
  ax.set_title(f"gathered attention: balanced vs static split ({meta['device']})", fontsize=9)
  ax.legend(fontsize=7, loc="lower center", ncol=2, framealpha=0.9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


if __name__ == "__main__":
  main()
