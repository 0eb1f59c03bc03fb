"""The CPU's dense decode attention, side by side: the jnp reference (products batched over
(B, K), so XLA transposes each layer's cache slice every step) against the flat-cache form
(`decode_attention_flat`, the CPU default), in the library's decode loop on the default model.

    python benchmarks/cpu_decode_attention.py --contexts 512 4096 7680

Each context runs the two forms alternately `--rounds` times in one process (the machine is
shared and noisy: only ratios measured side by side are reported), `--steps` greedy steps a
timing after a compile run, batch 1, random cache contents (they do not change the cost).
Writes cpu_decode_attention.json and .png.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import alaya_jax as aj  # noqa: E402
from alaya_jax.model.llama import decode_attention_flat, decode_attention_reference  # noqa: E402
from decode_speed import time_decode  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Dense:
  """Full attention through one given dense decode function."""
  fn: object
  name: str

  def decode_fn(self):
    return self.fn

  def describe(self) -> str:
    return self.name


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--contexts", type=int, nargs="+", default=[512, 4096, 7680])
  ap.add_argument("--steps", type=int, default=8)
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  args = ap.parse_args()
  model, _ = aj.load_model(dtype="float32")
  forms = (Dense(decode_attention_reference, "reference"), Dense(decode_attention_flat, "flat"))
  rows = []
  for ctx in args.contexts:
    times = {f.name: [] for f in forms}
    for _ in range(args.rounds):
      for f in forms:
        s, _ = time_decode(model, 1, ctx, args.steps, 1, attention=f)
        times[f.name].append(s * 1e3)
    r = dict(context=ctx, **{f"{k}_ms": float(np.median(v)) for k, v in times.items()},
             runs_ms=times)
    r["speedup"] = r["reference_ms"] / r["flat_ms"]
    rows.append(r)
    print(f"context {ctx}: reference {r['reference_ms']:.1f} ms/token, flat {r['flat_ms']:.1f}"
          f" ({r['speedup']:.2f}x)", flush=True)
  meta = dict(device=f"CPU, {os.cpu_count()} cores", backend=jax.default_backend(),
              jax=jax.__version__, python=platform.python_version(),
              model="SmolLM2-135M-Instruct (f32)",
              date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              command="python " + " ".join(sys.argv),
              note="median ms per decode step (batch 1) of rounds run alternately in one process")
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "cpu_decode_attention.json"), "w") as fh:
    json.dump(dict(meta=meta, rows=rows), fh, indent=1)
  plot(rows, meta, os.path.join(args.out, "cpu_decode_attention.png"))


def plot(rows, meta, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  x = [r["context"] for r in rows]
  for key, label in (("reference_ms", "reference (transposed cache slice)"),
                     ("flat_ms", "flat cache (CPU default)")):
    ax.plot(x, [r[key] for r in rows], marker="o", label=label)
  for r in rows:
    ax.annotate(f"{r['speedup']:.2f}x", (r["context"], r["flat_ms"]), textcoords="offset points",
                xytext=(0, -14), ha="center", fontsize=8)
  ax.set_xlabel("cached tokens")
  ax.set_ylabel("ms per decode step")
  ax.set_title(f"SmolLM2 dense decode on the CPU ({meta['device']})", fontsize=9)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


if __name__ == "__main__":
  main()
