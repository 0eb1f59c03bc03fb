"""A workload for Nsight Compute: the gathered-attention kernel alone at Llama-3-8B layer shapes
(8 kv heads, G 4, d 128, bf16, blocks of 32), `kept` uniformly random blocks a kv head.

    ncu --clock-control none -k regex:alaya --launch-skip 3 --launch-count 1 \\
        --section SpeedOfLight --section Occupancy --section LaunchStats \\
        --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis \\
        --csv --page details python benchmarks/ncu_attention.py 20992 > ncu.csv

    python benchmarks/ncu_attention.py KEPT_TOKENS [BLOCKS_PER_PROGRAM [STEPS_IN_FLIGHT]]

The kernels are named for the profiler (`alaya_gathered_attention`, `alaya_select_attention`,
`alaya_kept_max`, `alaya_block_margins`). Summary of one run: ncu_attention_h200.json.
"""
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from alaya_jax.pallas import gathered_attention as ga  # noqa: E402
from kernel_waves import B, D, G, K, P, random_kept, random_layer  # noqa: E402


def main():
  kept_tokens = int(sys.argv[1])
  bpp = int(sys.argv[2]) if len(sys.argv) > 2 and sys.argv[2] != "0" else None
  sif = int(sys.argv[3]) if len(sys.argv) > 3 else 4
  keys, values, blen, thr = random_layer()
  q = jax.random.normal(jax.random.key(2), (B, K * G, D), jnp.bfloat16)
  cap = kept_tokens // P
  kept, cnt = random_kept(np.random.default_rng(0), cap)
  cfg = ga.GatheredAttentionConfig(blocks_per_program=bpp, steps_in_flight=sif)
  f = jax.jit(lambda *a: ga.gathered_attention(*a, impl="pallas", config=cfg))
  args = (q, keys, values, blen, kept, cnt, thr)
  for _ in range(3):
    jax.block_until_ready(f(*args))
  t = time.perf_counter()
  for _ in range(20):
    o = f(*args)
  jax.block_until_ready(o)
  print(f"kept {kept_tokens} tokens a kv head ({cap * K * P * D * 4 / 1e6:.1f} MB of K+V): "
        f"{(time.perf_counter() - t) / 20 * 1e6:.1f} us a call (wall)")


if __name__ == "__main__":
  main()
