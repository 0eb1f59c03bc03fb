"""Workloads for Nsight Compute: one Mosaic GPU kernel alone at Llama-3-8B layer shapes (8 kv
heads, G 4, d 128, bf16, blocks of 32), on random inputs built on the GPU.

    ncu --clock-control none -k regex:alaya --launch-skip 3 --launch-count 1 \\
        --section SpeedOfLight --section Occupancy --section LaunchStats \\
        --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis \\
        --csv --page details python benchmarks/ncu_attention.py 20992 > ncu.csv

    python benchmarks/ncu_attention.py KEPT_TOKENS [BLOCKS_PER_PROGRAM [STEPS_IN_FLIGHT]]
    python benchmarks/ncu_attention.py --kernel select|exact|cut|margins [--blocks 4096]
        [--kept 205] [--tail 192]

The first form: the gathered-attention kernel over KEPT_TOKENS uniformly random tokens (whole
blocks) a kv head. --kernel: the kernels of one 128K decode layer (the Nsight Compute run of
the whole decode loop segfaulted): `select` the in-kernel-selection attention over --blocks
blocks a kv head, --kept of them at or above the cut; `exact` the exact region (sink 4,
--tail slots) of a 128K cache; `cut` the grid select's cut of [8, --blocks] margins at
capacity --kept; `margins` the block margins of --blocks bf16 centroids a kv head.

The kernels are named for the profiler (`alaya_gathered_attention`, `alaya_select_attention`,
`alaya_exact_attention`, `alaya_top_cut`, `alaya_block_margins`, ...). Summary of one run:
ncu_attention_h200.json.
"""
import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from alaya_jax.pallas import exact_attention as ea  # noqa: E402
from alaya_jax.pallas import gathered_attention as ga  # noqa: E402
from alaya_jax.pallas import score_select as ss  # noqa: E402
from alaya_jax.pallas import top_cut as tc  # noqa: E402
from kernel_waves import B, D, G, K, P, random_kept, random_layer  # noqa: E402

H = K * G
CONTEXT = 131072


def gathered(kept_tokens: int, bpp, sif: int):
  keys, values, blen, thr = random_layer()
  q = jax.random.normal(jax.random.key(2), (B, H, D), jnp.bfloat16)
  cap = kept_tokens // P
  kept, cnt = random_kept(np.random.default_rng(0), cap)
  cfg = ga.GatheredAttentionConfig(blocks_per_program=bpp, steps_in_flight=sif)
  f = jax.jit(lambda *a: ga.gathered_attention(*a, impl="pallas", config=cfg))
  desc = f"kept {kept_tokens} tokens a kv head ({cap * K * P * D * 4 / 1e6:.1f} MB of K+V)"
  return f, (q, keys, values, blen, kept, cnt, thr), desc


def even_kept(blocks: int, kept: int) -> np.ndarray:
  """[blocks] bool: `kept` blocks spread so that every program of `select_attention` (program s
  scans blocks s, s + S, s + 2S, ...) finds floor or ceil of kept / S of them."""
  chunk, splits = ga._ranges(blocks, B * K, ga.GatheredAttentionConfig(), True)
  keep = np.zeros(blocks, bool)
  for s in range(splits):
    mine = np.arange(s, blocks, splits)
    n = kept // splits + (s < kept % splits)
    keep[mine[np.linspace(0, len(mine) - 1, n).astype(int)] if n else []] = True
  return keep


def decode_layer_kernel(kernel: str, blocks: int, kept: int, tail: int, context: int = CONTEXT,
                        interpret: bool = False, even: bool = False, bpp: int | None = None,
                        sif: int = 4, bins: int = tc.BINS, rounds: int = tc.ROUNDS,
                        over: float = 4.0):
  """(jitted call, args, description) of one kernel of a decode layer's sparse chain;
  interpret=True runs it in the CPU interpreter (a smoke test of the workload); even: the
  select workload's kept blocks spread evenly over its programs (`even_kept`) instead of
  uniformly at random, to tell the programs' imbalance apart from their per-block cost.
  bpp, sif: the select kernel's blocks a program and steps in flight; bins, rounds: the cut's
  grid; over: the cut's margins passing, a multiple of its capacity (at most 1: the early exit)."""
  rng = jax.random.split(jax.random.key(3), 4)
  q = jax.random.normal(rng[0], (B, H, D), jnp.bfloat16)
  # margins with exactly `kept` blocks a kv head at or above the cut 0
  order = jax.vmap(lambda r: jax.random.permutation(r, blocks))(jax.random.split(rng[1], B * K))
  if even:
    order = jnp.where(jnp.asarray(even_kept(blocks, kept)), 0, kept + 1) + jnp.zeros_like(order)
  margin = jnp.where(order < kept, 1.0 + order, -1.0 - order).astype(jnp.float32)
  margin = margin.reshape(B, K, blocks)
  if kernel == "select":
    keys = jax.random.normal(rng[2], (B, K, blocks, P, D), jnp.bfloat16)
    vals = jax.random.normal(rng[3], (B, K, blocks, P, D), jnp.bfloat16)
    blen = jnp.full((B, K, blocks), P, jnp.int32)
    thr = jnp.full((B, H), -1e30, jnp.float32)
    cfg = ga.GatheredAttentionConfig(blocks_per_program=bpp, steps_in_flight=sif)
    f = jax.jit(lambda *a: ga.select_attention(*a, impl="pallas", interpret=interpret,
                                               config=cfg))
    return (f, (q, keys, vals, blen, margin, jnp.zeros((B, K), jnp.float32), thr),
            f"select-attention: {kept} of {blocks} blocks a kv head"
            + (", spread evenly over the programs" if even else ", uniformly at random"))
  if kernel == "cut":
    f = jax.jit(lambda m: tc.top_cap_cut_mgpu(m, kept, bins=bins, rounds=rounds, forced=False,
                                              interpret=interpret))
    passing = int(over * kept)
    m = jnp.where(order < passing, 1.0 + order, -1.0 - order).astype(jnp.float32)
    return f, (m.reshape(B * K, blocks),), (
        f"cut: [{B * K}, {blocks}] margins at capacity {kept}, {passing} passing "
        + (f"({rounds} rounds of {bins} bins)" if passing > kept else "(early exit)"))
  if kernel == "margins":
    cent = jax.random.normal(rng[2], (B, K, blocks, D), jnp.bfloat16)
    f = jax.jit(lambda q, c, t: ss.block_margins_mgpu(q, c, jnp.full((B, K), blocks, jnp.int32),
                                                      t, interpret=interpret))
    return f, (q, cent, jnp.zeros((B, H), jnp.float32)), f"margins: {blocks} centroids a kv head"
  if kernel == "exact":
    cache = jax.random.normal(rng[2], (B, context, K, D), jnp.bfloat16)
    length = jnp.full((B,), context, jnp.int32)
    f = jax.jit(lambda q, k, v, t, n, x: ea.exact_attention(
        q, k, v, t, n, x, sink=4, tail_size=tail, beta=8.0, keep_sink=4, keep_window=64,
        impl="pallas", interpret=interpret))
    return (f, (q, cache, cache, length - tail, length, jnp.full((B, H), -1e30, jnp.float32)),
            f"exact region: sink 4 + {tail} tail slots of a {context}-token cache")
  raise SystemExit(f"unknown kernel {kernel!r}")


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("kept_tokens", nargs="?", type=int, help="gathered attention: kept tokens")
  ap.add_argument("bpp", nargs="?", type=int, default=0, help="blocks a program (0: default)")
  ap.add_argument("sif", nargs="?", type=int, default=4, help="steps in flight")
  ap.add_argument("--kernel", choices=("select", "exact", "cut", "margins"))
  ap.add_argument("--blocks", type=int, default=4096, help="blocks a kv head (128K / 32)")
  ap.add_argument("--kept", type=int, default=205, help="kept blocks a kv head (5%%)")
  ap.add_argument("--tail", type=int, default=192, help="exact region's tail slots")
  ap.add_argument("--context", type=int, default=CONTEXT, help="exact: the cache's tokens")
  ap.add_argument("--even", action="store_true",
                  help="select: the kept blocks spread evenly over the kernel's programs")
  ap.add_argument("--bpp", dest="sel_bpp", type=int, default=None,
                  help="select: blocks a program")
  ap.add_argument("--sif", dest="sel_sif", type=int, default=4, help="select: steps in flight")
  ap.add_argument("--bins", type=int, default=tc.BINS, help="cut: bins a round")
  ap.add_argument("--rounds", type=int, default=tc.ROUNDS, help="cut: rounds")
  ap.add_argument("--over", type=float, default=4.0,
                  help="cut: passing margins, a multiple of the capacity (<= 1: early exit)")
  ap.add_argument("--gpu", action="store_true",
                  help="also the GPU time of each kernel of a call (profiler trace, best of 3)")
  ap.add_argument("--interpret", action="store_true",
                  help="--kernel in the CPU interpreter (a smoke test with small sizes)")
  args = ap.parse_args()
  if args.kernel:
    f, fargs, desc = decode_layer_kernel(args.kernel, args.blocks, args.kept, args.tail,
                                         args.context, args.interpret, args.even, args.sel_bpp,
                                         args.sel_sif, args.bins, args.rounds, args.over)
  elif args.kept_tokens:
    f, fargs, desc = gathered(args.kept_tokens, args.bpp or None, args.sif)
  else:
    raise SystemExit("give KEPT_TOKENS or --kernel")
  for _ in range(3):
    jax.block_until_ready(f(*fargs))
  t = time.perf_counter()
  for _ in range(20):
    o = f(*fargs)
  jax.block_until_ready(o)
  line = f"{desc}: {(time.perf_counter() - t) / 20 * 1e6:.1f} us a call (wall)"
  if args.gpu:  # wall time of a lone call is mostly dispatch: the kernels' own time
    from gpu_trace import kernel_events
    best = {}
    for _ in range(3):
      run = {}
      for name, sec in kernel_events(f, *fargs):
        run[name] = run.get(name, 0.0) + sec
      best = {k: min(v, best.get(k, v)) for k, v in run.items()}
    line += "; GPU " + ", ".join(f"{k} {v * 1e6:.2f} us" for k, v in
                                 sorted(best.items(), key=lambda kv: -kv[1]))
  print(line)


if __name__ == "__main__":
  main()
