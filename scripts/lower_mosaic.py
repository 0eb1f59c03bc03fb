#!/usr/bin/env python3
"""Lower every Mosaic GPU kernel of alaya_jax for an sm90 GPU on a machine without one.

Mosaic GPU infers its register and shared-memory layouts while lowering, so a kernel that
passes the CPU interpreter (which ignores layouts) can still fail on the GPU with "Layout
inference failed to find a solution" or a missing broadcast rule. Lowering for CUDA runs that
inference here, in seconds, without device time. It does not compile to PTX, run, or time
anything: a kernel that lowers can still fail later on the GPU.

Needs the jax the GPU machines run (0.11.2; Python >= 3.12). The project's CPU install (jax
0.10.2) lowers these kernels differently and fails on TMA copies that 0.11.2 accepts. E.g.:

    python3.12 -m venv /tmp/v312 && /tmp/v312/bin/pip install jax==0.11.2 flax orbax-checkpoint \\
        chex tokenizers gguf tqdm
    PYTHONPATH=$PWD /tmp/v312/bin/python scripts/lower_mosaic.py [--quick]

Prints one line per kernel and shape; exits 1 if any fails to lower.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from alaya_jax.pallas import _mgpu  # noqa: E402
from alaya_jax.pallas import exact_attention as ea  # noqa: E402
from alaya_jax.pallas import gathered_attention as ga  # noqa: E402
from alaya_jax.pallas import score_select as ss  # noqa: E402
from alaya_jax.pallas import split_merge as sm  # noqa: E402
from alaya_jax.pallas import top_cut as tc  # noqa: E402

_mgpu.on_gpu = lambda: True  # dispatch as on a GPU: we lower for one
S = jax.ShapeDtypeStruct


def cases(quick: bool):
  """(name, function, abstract args) to lower."""
  for rows, n in ((8, 8256), (64, 33024)):
    yield (f"top_cut {rows} rows of {n}", lambda m: tc.top_cap_cut_mgpu(m, 413),
           (S((rows, n), jnp.float32),))
  shapes = [(4, 128)] if quick else [(4, 128), (1, 64), (3, 128), (8, 64), (8, 128)]
  B, K, P, N, cap = 2, 4, 32, 512, 64
  for g, d in shapes:
    keys, blen = S((B, K, N, P, d), jnp.bfloat16), S((B, K, N), jnp.int32)
    q, thr = S((B, K * g, d), jnp.bfloat16), S((B, K * g), jnp.float32)
    kept, cnt = S((B, K, cap), jnp.int32), S((B, K), jnp.int32)
    for balanced, merge, pdl in ((True, "kernel", False), (False, "kernel", False),
                                 (True, "xla", False), (True, "kernel", True)):
      cfg = ga.GatheredAttentionConfig(balanced=balanced, split_merge=merge, pdl=pdl)
      yield (f"gathered_attention g={g} d={d} balanced={balanced} split_merge={merge}"
             + (" pdl" if pdl else ""),
             lambda q, k, bl, kp, c, t, cfg=cfg: ga.gathered_attention(
                 q, k, k, bl, kp, c, t, impl="pallas", config=cfg),
             (q, keys, blen, kept, cnt, thr))
    cfg = ga.GatheredAttentionConfig()
    chunk, splits = ga._ranges(N, B * K, cfg, True)
    margin = S((B, K, splits * chunk), jnp.float32)
    yield (f"select_attention g={g} d={d}",
           lambda q, k, bl, mar, cut, t: ga.select_attention(
               q, k, k, bl, mar, cut, t, impl="pallas", interleaved=True),
           (q, keys, blen, margin, S((B, K), jnp.float32), thr))
    yield (f"kept_max g={g} d={d}",
           lambda q, k, bl, kp, c: ga.kept_max(q, k, bl, kp, c, impl="pallas"),
           (q, keys, blen, kept, cnt))
    yield (f"block_margins g={g} d={d}",
           lambda q, c, t: ss.block_margins_mgpu(q, c, jnp.full((B, K), N, jnp.int32), t),
           (q, S((B, K, N, d), jnp.bfloat16), thr))
    if (K * g) % 4 == 0:
      yield (f"block_margins_from_max g={g} d={d}",
             lambda q, c, t, dl: ss.block_margins_from_max(
                 q, c, jnp.full((B, K), N, jnp.int32), t, 8.0, dl),
             (q, S((B, K, N, d), jnp.bfloat16), thr, S((K * g,), jnp.float32)))
    if g % 4 == 0:
      for tail in (192, 40):
        cache = S((B, 1024, K, d), jnp.bfloat16)
        yield (f"exact_attention g={g} d={d} tail={tail}",
               lambda q, k, t, l, x, tail=tail: ea.exact_attention(
                   q, k, k, t, l, x, sink=4, tail_size=tail, beta=8.0, keep_sink=4,
                   keep_window=64, impl="pallas"),
               (q, cache, S((B,), jnp.int32), S((B,), jnp.int32), thr))
    w = sm.merge_width(g, d, 33)
    if w is not None:
      yield (f"split_merge g={g} d={d} W={w}",
             lambda o, lb, c: sm.merge_partials(o, lb, c, impl="pallas"),
             (S((8, 33, g, d), jnp.float32), S((8, 33, g, w), jnp.float32),
              S((8,), jnp.int32)))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true", help="Llama-3-8B's G 4, d 128 only")
  args = ap.parse_args()
  failed = 0
  for name, fn, abstract in cases(args.quick):
    t = time.time()
    try:
      text = jax.jit(fn).trace(*abstract).lower(lowering_platforms=("cuda",)).as_text()
      res = f"lowered ({len(text)} chars)"
    except Exception as e:  # noqa: BLE001 (report every kernel, then exit non-zero)
      failed += 1
      res = f"FAILED {type(e).__name__}: {str(e)[:300]}"
    print(f"{name}: {res} [{time.time() - t:.1f} s]", flush=True)
  sys.exit(1 if failed else 0)


if __name__ == "__main__":
  main()
