"""How the gathered-attention kernel's split of the kept list into programs sets its speed
(GPU; Llama-3-8B layer shapes: 8 kv heads, G 4, d 128, bf16, blocks of 32 keys).

    PYTHONUNBUFFERED=1 python benchmarks/kernel_waves.py --out benchmarks/results

Each kv head keeps `cap` uniformly random blocks of 8192 (the kernel's cost does not depend on
the context, only on the blocks it reads). For blocks-per-program choices (the default, the
previous default of ~4 programs an SM) and steps in flight 4 (and 2 for the default), the GPU
time from the profiler of (a) the attention kernel alone and (b) the whole `gathered_attention`
call (kernel + the log-sum-exp merge of the splits), per call: one trace of 8 calls in a jit.
Bandwidth is the kept K+V bytes over the time, against the read and copy rooflines measured
in the same run (benchmarks/kernels.py's `roofline`).
Writes kernel_waves.json and kernel_waves.png.
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
from alaya_jax.pallas import gathered_attention as ga  # noqa: E402
from bench_io import run_meta, write_json  # noqa: E402
from gpu_trace import kernel_events  # noqa: E402
from kernels import roofline  # noqa: E402

B, K, G, D, P, N = 1, 8, 4, 128, 32, 8192
REPS = 8


def random_layer():
  """(keys, values [B,K,N,P,D] bf16, block_len [B,K,N] all full, threshold [B,H] keeping all)."""
  keys = jax.random.normal(jax.random.key(0), (B, K, N, P, D), jnp.bfloat16)
  vals = jax.random.normal(jax.random.key(1), (B, K, N, P, D), jnp.bfloat16)
  return keys, vals, jnp.full((B, K, N), P, jnp.int32), jnp.full((B, K * G), -1e30, jnp.float32)


def random_kept(rng, cap: int):
  """(kept [B,K,cap] sorted uniformly random distinct blocks per kv head, kept_count [B,K])."""
  kept = np.stack([np.sort(rng.choice(N, cap, replace=False)) for _ in range(K)])[None]
  return jnp.asarray(kept.astype(np.int32)), jnp.full((B, K), cap, jnp.int32)


def timed(f, args):
  """(GPU us per call of the attention kernel alone, GPU us per call of everything (the sum of
  kernel times), {name: GPU us per call} of the other kernels, the split merge's among them,
  and the span: first kernel start to last kernel end over the REPS calls, per call (launch
  gaps and overlap included, e.g. a dependent launch's))."""
  jax.block_until_ready(f(*args))
  ev = kernel_events(f, *args, starts=True)
  attn = lambda n: any(k in n for k in ("alaya_gathered", "alaya_select", "alaya_kept"))
  kern = sum(t for n, t, _ in ev if attn(n)) / REPS
  tot = sum(t for _, t, _ in ev) / REPS
  span = (max(s + t for _, t, s in ev) - min(s for _, _, s in ev)) / REPS
  rest = {}
  for n, t, _ in ev:
    if not attn(n):  # the merge kernel (alaya_split_merge) among them
      rest[n[:60]] = rest.get(n[:60], 0.0) + t * 1e6 / REPS
  return kern * 1e6, tot * 1e6, {n: round(t, 2) for n, t in rest.items()}, span * 1e6


def setup(script: str):
  """(random_layer(), REPS query sets, (read, copy) rooflines measured now); GPU only."""
  if jax.default_backend() != "gpu":
    raise SystemExit(f"{script} times the Mosaic GPU kernel: it needs an NVIDIA GPU")
  qs = jax.random.normal(jax.random.key(2), (REPS, B, K * G, D), jnp.bfloat16)
  read_tbps, copy_tbps = roofline()
  print(f"read {read_tbps:.2f} TB/s, copy {copy_tbps:.2f} TB/s", flush=True)
  return random_layer(), qs, (read_tbps, copy_tbps)


def time_config(cfg, layer, qs, kept, cnt):
  """`timed` of REPS `gathered_attention` calls with config cfg on layer = random_layer()."""
  # the layer goes in as arguments: closed over, its constant block lengths and thresholds
  # were rebuilt by two broadcast kernels a call (0.23 us on an H200), not the call's work
  @jax.jit
  def f(qs, kept, cnt, keys, vals, blen, thr):  # every output returned: no consumer kernels
    return [ga.gathered_attention(qs[r], keys, vals, blen, kept, cnt, thr, config=cfg)
            for r in range(REPS)]

  return timed(f, (qs, kept, cnt, *layer))


def count_cases(rng, caps, names=("full", "ragged")):
  """(cap, counts name, kept, kept_count, MB of kept K+V) for each capacity: counts all at the
  capacity ("full") or each kv head keeping a uniformly random 50-100% of it ("ragged"); only
  the cases in `names` (the same random draws whichever are asked for)."""
  for cap in caps:
    kept, full = random_kept(rng, cap)
    ragged = jnp.asarray(np.round(cap * rng.uniform(0.5, 1.0, (B, K))).astype(np.int32))
    for name, cnt in (("full", full), ("ragged", ragged)):
      if name in names:
        yield cap, name, kept, cnt, int(cnt.sum()) * P * D * 2 * 2 / 1e6


def timed_row(cfg, layer, qs, kept, cnt, mb, copy_tbps, **fields) -> dict:
  """`time_config` as a printed row: fields, the bandwidth figures, the other kernels."""
  kern_us, call_us, rest, span_us = time_config(cfg, layer, qs, kept, cnt)
  r = dict(fields, kept_blocks=int(cnt.sum()), MB=round(mb, 1),
           **bandwidth(mb, kern_us, call_us, copy_tbps, span_us), other_kernels_us=rest)
  print(json.dumps(r), flush=True)
  return r


def finish(out: str, name: str, rows, rooflines, plot_fn):
  """Writes out/name.json (rows with the run's metadata and rooflines) and out/name.png."""
  meta = run_meta(sms=ga._sm_count(), read_TBps=rooflines[0], copy_TBps=rooflines[1],
                  note="GPU time per call from the profiler; random kept blocks, 8B layer shapes")
  write_json(out, name, meta, rows)
  plot_fn(rows, meta, os.path.join(out, name + ".png"))


def bandwidth(mb: float, kern_us: float, call_us: float, copy_tbps: float,
              span_us: float) -> dict:
  """The row fields of a kept selection of `mb` MB read by the kernel / the whole call (the
  sum of its kernel times, and its span)."""
  return dict(kernel_us=round(kern_us, 2), call_us=round(call_us, 2),
              span_us=round(span_us, 2),
              kernel_TBps=round(mb / kern_us, 3), call_TBps=round(mb / call_us, 3),
              kernel_vs_copy=round(mb / kern_us / copy_tbps, 3),
              call_vs_copy=round(mb / call_us / copy_tbps, 3),
              span_vs_copy=round(mb / span_us / copy_tbps, 3))


def parse_caps(default, extra=None):
  """--caps (kept blocks per kv head, at most: the capacity), --counts and --out; extra(ap)
  adds a script's own arguments."""
  ap = argparse.ArgumentParser()
  if extra:
    extra(ap)
  ap.add_argument("--caps", type=int, nargs="*", default=default,
                  help="capacity: kept blocks per kv head (at most)")
  ap.add_argument("--counts", nargs="*", default=["full", "ragged"], choices=["full", "ragged"],
                  help="kept counts: all at the capacity, or a random 50-100%% of it")
  ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  return ap.parse_args()


def main():
  args = parse_caps([328, 656, 2048])
  layer, qs, (read_tbps, copy_tbps) = setup("kernel_waves.py")
  rng = np.random.default_rng(0)
  rows = []
  for cap in args.caps:
    kept, cnt = random_kept(rng, cap)
    mb = cap * K * P * D * 2 * 2 / 1e6
    new = ga.default_blocks_per_program(cap, K)
    old = ga.default_blocks_per_program(cap, K, per_sm=2 * ga.PROGRAMS_PER_SM)
    for chunk, sif in sorted({(old, 4), (new, 4), (new, 2)}):
      cfg = ga.GatheredAttentionConfig(blocks_per_program=chunk, steps_in_flight=sif)

      kern_us, call_us, rest, span_us = time_config(cfg, layer, qs, kept, cnt)
      r = dict(cap=cap, MB=round(mb, 1), blocks_per_program=chunk, steps_in_flight=sif,
               programs=K * -(-cap // chunk), default=chunk == new and sif == 4,
               previous_default=chunk == old and sif == 4,
               **bandwidth(mb, kern_us, call_us, copy_tbps, span_us), other_kernels_us=rest)
      rows.append(r)
      print(json.dumps(r), flush=True)
  finish(args.out, "kernel_waves", rows, (read_tbps, copy_tbps), plot)


def plot(rows, meta, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
  for ax, key, title in ((axes[0], "kernel_TBps", "kernel alone"),
                         (axes[1], "call_TBps", "kernel + merge of the splits")):
    for cap in sorted({r["cap"] for r in rows}):
      for sif, ls in ((4, "-"), (2, ":")):
        rs = sorted((r for r in rows if r["cap"] == cap and r["steps_in_flight"] == sif),
                    key=lambda r: r["programs"])
        line, = ax.plot([r["programs"] for r in rs], [r[key] for r in rs], ls, marker="o",
                        label=f"{rs[0]['MB']:.0f} MB, {sif} in flight")
        for r in rs:
          if r["default"]:
            ax.plot(r["programs"], r[key], "k*", ms=12)
    ax.axhline(meta["copy_TBps"], color="gray", lw=1)
    ax.axhline(0.8 * meta["copy_TBps"], color="gray", lw=1, ls="--")
    ax.axvline(2 * meta["sms"], color="gray", lw=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("programs (kv heads x splits); vertical line: 2 per SM")
    ax.set_title(title)
  axes[0].set_ylabel("TB/s on the kept K+V bytes")
  axes[1].legend(fontsize=7)
  fig.suptitle(f"gathered attention by blocks per program ({meta['device']}; * default; "
               f"gray: copy roofline, dashed 80% of it)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


if __name__ == "__main__":
  main()
