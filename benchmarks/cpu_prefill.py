"""Chunked prefill on the CPU, side by side: later chunks attending over power-of-two spans of
the cache (`prefill(span_buckets=True)`, the CPU's default) against the whole cache (False).

    python benchmarks/cpu_prefill.py --tokens 2048 4096

The default model (SmolLM2-135M, f32) prefills the first N tokens of the GPL-3 text shipped in
examples/data into a cache of N + 256 positions (room to generate), in chunks of 512, batch 1.
The two settings alternate `--rounds` times in one process (the machine is shared and noisy:
only ratios measured side by side are reported); each setting's first run, which compiles its
chunk shapes (one per span), is reported apart from the later ones. Prints progress lines.
Writes cpu_prefill.json and cpu_prefill.png.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import alaya_jax as aj  # noqa: E402
from bench_io import run_meta, write_json  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
CHUNK = 512


def run(model, ids, buckets: bool) -> float:
  cache = aj.KVCache.zeros(model.cfg, 1, len(ids) + 256, model.dtype)
  t = time.perf_counter()
  logits, _ = aj.prefill(model, np.asarray([ids], np.int32), np.array([len(ids)]), cache,
                         chunk=CHUNK, span_buckets=buckets)
  jax.block_until_ready(logits)
  return time.perf_counter() - t


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096])
  ap.add_argument("--rounds", type=int, default=2)
  ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  args = ap.parse_args()
  model, tok = aj.load_model(dtype="float32")
  text = open(os.path.join(ROOT, "examples", "data", "gpl-3.0.txt")).read()
  all_ids = tok.encode(text)
  rows = []
  for n in args.tokens:
    if n > len(all_ids):
      raise SystemExit(f"the text has {len(all_ids)} tokens, fewer than {n}")
    ids = all_ids[:n]
    times = {True: [], False: []}
    for r in range(args.rounds + 1):  # round 0 compiles
      for buckets in (True, False):
        s = run(model, ids, buckets)
        times[buckets].append(s)
        print(f"{n} tokens, span_buckets={buckets}, round {r}: {s:.1f} s", flush=True)
    warm = {b: float(np.median(t[1:])) for b, t in times.items()}
    row = dict(tokens=n, chunk=CHUNK, first_run_s={str(b): round(t[0], 2) for b, t in times.items()},
               warm_s={str(b): round(v, 2) for b, v in warm.items()},
               warm_runs_s={str(b): [round(x, 2) for x in t[1:]] for b, t in times.items()},
               speedup_warm=round(warm[False] / warm[True], 3),
               speedup_first_run=round(times[False][0] / times[True][0], 3))
    rows.append(row)
    print(row, flush=True)
  meta = run_meta(cpus=os.cpu_count(), note="batch 1, f32 SmolLM2-135M, wall seconds")
  write_json(args.out, "cpu_prefill", meta, rows)
  plot(rows, meta, os.path.join(args.out, "cpu_prefill.png"))


def plot(rows, meta, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  x = np.arange(len(rows))
  for i, (key, label) in enumerate((("True", "power-of-two spans"), ("False", "whole cache"))):
    ax.bar(x + (i - 0.5) * 0.35, [r["warm_s"][key] for r in rows], 0.35, label=label)
  ax.set_xticks(x, [f"{r['tokens']} tokens\n{r['speedup_warm']:.2f}x" for r in rows])
  ax.set_ylabel("prefill seconds (after the compile run)")
  ax.set_title(f"CPU prefill, SmolLM2-135M f32, chunks of {CHUNK} ({meta['cpus']} CPUs)",
               fontsize=9)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)


if __name__ == "__main__":
  main()
