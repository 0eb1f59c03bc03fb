"""Registers per thread of the Mosaic GPU kernels, from ptxas (what bounds how many programs of
the gathered-attention kernel share an SM: 128 threads a program, 64K registers an SM).

    python benchmarks/kernel_registers.py --out benchmarks/results

Compiles each kernel at Llama-3-8B layer shapes (8 kv heads, G 4, d 128, blocks of 32) with
MOSAIC_GPU_DUMP_PTXAS=1, reads the "Used N registers" and spill lines ptxas's report prints,
and writes JSON: per kernel and config, registers, spill bytes and the
programs an SM can hold by registers (65536 // (128 * registers rounded up to 8)).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ["MOSAIC_GPU_DUMP_PTXAS"] = "1"  # read when a kernel compiles

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from alaya_jax.pallas import exact_attention as ea  # noqa: E402
from alaya_jax.pallas import gathered_attention as ga  # noqa: E402
from alaya_jax.pallas import score_select as ss  # noqa: E402
from alaya_jax.pallas import top_cut as tc  # noqa: E402

B, K, G, D, P, N, CAP = 1, 8, 4, 128, 32, 1024, 64
CONFIGS = (ga.GatheredAttentionConfig(), ga.GatheredAttentionConfig(8, 2, 2),
           ga.GatheredAttentionConfig(8, 4, 2))


def ptxas_lines(fn):
  """Runs fn with the process's stdout and stderr (fds 1 and 2, where the compiler's C++ side
  prints ptxas's report) captured; returns the lines."""
  sys.stdout.flush()
  sys.stderr.flush()
  saved = [os.dup(1), os.dup(2)]
  with tempfile.TemporaryFile(mode="w+") as tmp:
    os.dup2(tmp.fileno(), 1)
    os.dup2(tmp.fileno(), 2)
    try:
      jax.block_until_ready(fn())
    finally:
      sys.stdout.flush()
      sys.stderr.flush()
      for fd, s in zip((1, 2), saved):
        os.dup2(s, fd)
        os.close(s)
    tmp.seek(0)
    return tmp.read().splitlines()


def parse(lines):
  regs = [int(m.group(1)) for l in lines if (m := re.search(r"Used (\d+) registers", l))]
  spills = [int(m.group(1)) + int(m.group(2)) for l in lines
            if (m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", l))]
  if not regs:
    raise RuntimeError("ptxas printed no register count: " + " | ".join(lines[-5:]))
  r = max(regs)
  return dict(registers=r, spill_bytes=max(spills, default=0),
              programs_per_sm_by_registers=65536 // (128 * (-(-r // 8) * 8)))


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", default="benchmarks/results")
  args = ap.parse_args()
  dev = jax.devices()[0]
  key = jax.random.PRNGKey(0)
  q = jax.random.normal(key, (B, K * G, D), jnp.bfloat16)
  keys = jax.random.normal(key, (B, K, N, P, D), jnp.bfloat16)
  blen = jnp.full((B, K, N), P, jnp.int32)
  thr = jnp.zeros((B, K * G), jnp.float32)
  kept = jnp.tile(jnp.arange(CAP, dtype=jnp.int32), (B, K, 1))
  cnt = jnp.full((B, K), CAP, jnp.int32)
  margin = jax.random.normal(key, (B, K, N), jnp.float32)
  cut = jnp.full((B, K), 1.5, jnp.float32)
  cent = jax.random.normal(key, (B, K, N, D), jnp.bfloat16)
  cases = [("margins (score_select)", None, lambda: ss.block_margins_mgpu(
      q, cent, jnp.full((B, K), N, jnp.int32), thr))]
  for cfg in CONFIGS:
    cases.append(("gathered_attention", cfg, lambda cfg=cfg: ga.gathered_attention(
        q, keys, keys, blen, kept, cnt, thr, impl="pallas", config=cfg)))
    cases.append(("select_attention", cfg, lambda cfg=cfg: ga.select_attention(
        q, keys, keys, blen, margin, cut, thr, impl="pallas", config=cfg)))
  S = 4096  # the exact region's kernel reads the positional cache [B, S, K, D]
  kc = jax.random.normal(key, (B, S, K, D), jnp.bfloat16)
  at = lambda x: jnp.full((B,), x, jnp.int32)
  cases.append(("exact_attention (tail 192)", None, lambda: ea.exact_attention(
      q, kc, kc, at(S - 150), at(S), jnp.full((B, K * G), -1e30), sink=4, tail_size=192,
      beta=8.0, keep_sink=4, keep_window=64, impl="pallas")))
  cases.append(("top_cut", None, lambda: tc.top_cap_cut_mgpu(margin.reshape(B * K, N), CAP)))
  rows = []
  for name, cfg, fn in cases:
    row = dict(kernel=name, **({} if cfg is None else dict(
        blocks_per_program=cfg.blocks_per_program, steps_in_flight=cfg.steps_in_flight,
        blocks_per_step=cfg.blocks_per_step)), **parse(ptxas_lines(fn)))
    rows.append(row)
    print(json.dumps(row), flush=True)
  meta = dict(jax=jax.__version__, device=dev.device_kind, python=platform.python_version(),
              date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              command="python " + " ".join(sys.argv),
              shapes=dict(batch=B, kv_heads=K, group=G, head_dim=D, block=P, blocks=N))
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "kernel_registers.json")
  with open(path, "w") as f:
    json.dump(dict(meta, rows=rows), f, indent=1)
  print("wrote", path)


if __name__ == "__main__":
  main()
