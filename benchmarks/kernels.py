"""GPU benchmark of the DIPR kernels: scoring + selection + gathered attention, Mosaic GPU vs
the jnp path under XLA vs cuDNN full attention, on Llama-3-8B layer shapes.

    PYTHONUNBUFFERED=1 python benchmarks/kernels.py --out benchmarks/results
    python benchmarks/kernels.py --check            # correctness only (GPU, or CPU interpreter)

Shapes: 32 q heads, 8 kv heads, d 128, bf16 keys/values, 32-key blocks (one cluster-ordered
block = one index row), batch 1 and 8, contexts 32K..1M. Keys are generated on the device
with structure: per-head bias, clustered blocks, a few outlier channels, a few hot blocks,
RoPE at random positions; partial blocks. Selections keep 1-5% of the blocks: the per-head
thresholds are set from quantiles of the centroid scores, so the fraction is what we ask.

Timing: each path runs inside one jit over `--layers` layers (lax.fori_loop; each layer uses
another copy of the arrays where memory allows and shifts its query, so nothing is hoisted
and small selections do not sit in L2), median of `--reps` runs, divided by the layers.
Bytes: full attention reads K and V; attention alone reads the kept blocks of K and V;
scoring reads the centroids. Bandwidth is those bytes over the time; the roofline is a large
device copy measured in the same run.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from alaya_jax.index.cluster import to_fp8  # noqa: E402
from alaya_jax.pallas import gathered_attention as ga  # noqa: E402
from alaya_jax.pallas import score_select as ss  # noqa: E402
from gpu_trace import kernel_events  # noqa: E402

H, K, D, P = 32, 8, 128, 32
FULL_IMPL = "cudnn" if jax.default_backend() == "gpu" else None
PATHS: set[str] = set()  # --paths: measure only these (empty: all)
G = H // K
DT = jnp.bfloat16


def log(*a):
  print(*a, flush=True)


# ----------------------------------------------------------------------------- inputs


def rope(x, pos):
  """x [..., D], pos [...] int -> RoPE (theta 500000, Llama-3) applied pairwise."""
  d = x.shape[-1]
  inv = 500000.0 ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)
  ang = pos[..., None].astype(jnp.float32) * inv
  c, s = jnp.cos(ang), jnp.sin(ang)
  x1, x2 = x[..., : d // 2], x[..., d // 2:]
  return jnp.concatenate([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)


@functools.partial(jax.jit, static_argnames=("b", "n"))
def make_layer(key, *, b, n):
  """One layer's cluster index: keys, values [b,K,n,P,D] bf16, block_len [b,K,n], centroids
  [b,K,n,D] f32, generated head by head in place (peak memory ~ the result)."""
  s = n * P
  bk = b * K

  def head(i, carry):
    keys, vals, blen, cent = carry
    kh = jax.random.fold_in(key, i)
    k1, k2, k3, k4, k5, k6 = jax.random.split(kh, 6)
    scale = jnp.where(jnp.arange(D) % 37 == 5, 6.0, 1.0)                  # outlier channels
    bias = jax.random.normal(k1, (D,)) * 1.5
    centers = jax.random.normal(k2, (n, D)) * scale
    hot = jax.random.uniform(k3, (n, 1)) < 0.002                             # a few hot blocks
    centers = jnp.where(hot, centers * 3.0, centers)
    x = bias + centers[:, None, :] + 0.6 * jax.random.normal(k4, (n, P, D)) * scale
    pos = jax.random.randint(k5, (n, P), 0, s)
    x = rope(x, pos)
    bl = jnp.where(jax.random.uniform(k6, (n,)) < 0.1,
                   jax.random.randint(k6, (n,), P // 2, P + 1), P).astype(jnp.int32)
    member = (jnp.arange(P) < bl[:, None])[..., None]
    c = jnp.sum(jnp.where(member, x, 0.0), axis=1) / bl[:, None]
    v = jax.random.normal(jax.random.fold_in(k4, 1), (n, P, D))
    bi, ki = i // K, i % K
    keys = keys.at[bi, ki].set(x.astype(DT))
    vals = vals.at[bi, ki].set(v.astype(DT))
    blen = blen.at[bi, ki].set(bl)
    cent = cent.at[bi, ki].set(c)
    return keys, vals, blen, cent

  init = (jnp.zeros((b, K, n, P, D), DT), jnp.zeros((b, K, n, P, D), DT),
          jnp.zeros((b, K, n), jnp.int32), jnp.zeros((b, K, n, D), jnp.float32))
  return jax.lax.fori_loop(0, bk, head, init)


def make_query(key, b, cent):
  """Queries aligned with the keys' bias direction (as real queries are), plus noise."""
  mean = cent.mean(axis=2)                                                  # [b,K,D]
  q = jnp.repeat(mean, G, axis=1) * 0.3 + jax.random.normal(key, (b, H, D))
  return q.astype(DT)


def thresholds_for_fraction(q, cent, frac):
  """m_lower [b,H] such that, with beta = delta = 0, about `frac` of each kv head's blocks
  pass the group-max criterion (a quantile of max_g q_g.c / sqrt(D))."""
  b = q.shape[0]
  n = cent.shape[2]
  qg = q.astype(jnp.float32).reshape(b, K, G, D)
  s = jnp.einsum("bkgd,bknd->bkgn", qg, cent) / math.sqrt(D)
  smax = s.max(axis=2)                                                      # [b,K,n]
  t = jnp.quantile(smax, 1.0 - frac, axis=-1)                               # [b,K]
  return jnp.repeat(t, G, axis=1)


# ----------------------------------------------------------------------------- timing


def bench(f, *args, reps=5):
  jax.block_until_ready(f(*args))
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    ts.append(time.perf_counter() - t0)
  return float(np.median(ts))


def gpu_seconds(f, *args):
  """GPU time of one call: the sum of the kernels' durations in a profiler trace (launch gaps
  excluded), or None where the trace cannot be read."""
  try:
    tot = sum(t for _, t in kernel_events(f, *args))
    return tot or None
  except Exception:
    traceback.print_exc()
    return None


def kernel_times(f, *args):
  """{kernel name: GPU microseconds} of one call, from a profiler trace."""
  tot = collections.defaultdict(float)
  for name, t in kernel_events(f, *args):
    tot[name[:60]] += t * 1e6
  return dict(sorted(tot.items(), key=lambda kv: -kv[1]))


def profile(results, frac=0.02):
  """Per-kernel GPU times of each path at 1M context, batch 1: where the time goes."""
  n = (1 << 20) // P
  keys, vals, blen, cent = make_layer(jax.random.key(11), b=1, n=n)
  cent16 = cent.astype(DT)
  q = make_query(jax.random.key(12), 1, cent)
  nb = jnp.full((1, K), n, jnp.int32)
  cap = int(math.ceil(frac * n * 1.15 / 4) * 4)
  ml = thresholds_for_fraction(q, cent, frac)
  sel = ss.score_select_reference(q, cent, nb, 0.0, 0.0, ml, cap=cap)
  thr = ml - 3.0
  att = lambda impl: jax.jit(functools.partial(ga.gathered_attention, impl=impl))
  sc = jax.jit(lambda q, c, ml: ss.score_select(q, c, nb, 0.0, 0.0, ml, cap=cap, impl="pallas"))
  cases = {
      "attention_pallas": (att("pallas"), (q, keys, vals, blen, sel.kept, sel.kept_count, thr)),
      "attention_pallas_count0": (att("pallas"), (q, keys, vals, blen, sel.kept,
                                                  jnp.zeros_like(sel.kept_count), thr)),
      "attention_xla": (att("xla"), (q, keys, vals, blen, sel.kept, sel.kept_count, thr)),
      "score_select_pallas_bf16": (sc, (q, cent16, ml)),
      "score_select_pallas_f32": (sc, (q, cent, ml)),
  }
  for name, (f, args) in cases.items():
    jax.block_until_ready(f(*args))
    kt = kernel_times(f, *args)
    r = dict(path="profile_" + name, context=1 << 20, batch=1, frac=frac,
             gpu_us=sum(kt.values()), kernels_us=kt)
    results.append(r); log(json.dumps(r))


def roofline(reps=5):
  """Device bandwidth ceilings (GPU time where the profiler is readable): a 4 GiB read (sum)
  and a 2 GiB copy (read + write)."""
  x = jnp.ones((1 << 31,), DT)
  read = jax.jit(lambda a: a.astype(jnp.float32).sum())
  t_read = bench(read, x, reps=reps)
  t_read = gpu_seconds(read, x) or t_read  # one call's wall time carries host overhead
  y = x[: 1 << 30]
  copy = jax.jit(lambda a: a + 1)
  t_copy = bench(copy, y, reps=reps)
  t_copy = gpu_seconds(copy, y) or t_copy
  return x.nbytes / t_read / 1e12, 2 * y.nbytes / t_copy / 1e12


def layered(one):
  """jit of sum over layers of one(*layer_args): the layers are unrolled and each gets its own
  (static) arguments, so no per-layer slicing or index arithmetic runs between kernels."""
  def run(per_layer, shared):
    acc = jnp.float32(0)
    for args in per_layer:
      acc = acc + one(*args, *shared)
    return acc
  return jax.jit(run)


def check(interpret: bool):
  """Kernel vs reference at small shapes; returns a list of result dicts."""
  rows = []
  rng = np.random.default_rng(0)
  cases = [(1, 4, 4, 64, 16, 16, 64, jnp.bfloat16), (2, 2, 3, 128, 32, 40, 8, jnp.bfloat16),
           (2, 8, 4, 128, 32, 64, 24, jnp.bfloat16), (1, 2, 8, 64, 64, 12, 5, jnp.float16),
           (2, 3, 1, 128, 32, 33, 17, jnp.bfloat16)]
  for (b, k, g, d, p, n, cap, dt) in cases:
    h = k * g
    key = jax.random.key(int(rng.integers(1 << 30)))
    ks = jax.random.split(key, 8)
    q = jax.random.normal(ks[0], (b, h, d)).astype(dt)
    keys = jax.random.normal(ks[1], (b, k, n, p, d)).astype(dt)
    vals = jax.random.normal(ks[2], (b, k, n, p, d)).astype(dt)
    blen = jax.random.randint(ks[3], (b, k, n), 0, p + 1)
    kept = jnp.argsort(jax.random.uniform(ks[4], (b, k, n)), axis=-1)[..., :cap].astype(jnp.int32)
    cnt = jax.random.randint(ks[5], (b, k), 0, cap + 1).at[0, 0].set(cap)
    thr = jax.random.normal(ks[6], (b, h)) - 1.0
    rem = (jax.random.normal(ks[7], (b, h, d)), jnp.abs(jax.random.normal(ks[7], (b, h))) * 5,
           jax.random.normal(ks[6], (b, h)))
    for remainder in (None, rem):
      ref = ga.gathered_attention_reference(q, keys, vals, blen, kept, cnt, thr,
                                            remainder=remainder)
      try:
        out = ga.gathered_attention(q, keys, vals, blen, kept, cnt, thr, remainder=remainder,
                                    impl="pallas", interpret=interpret)
        err_o = float(jnp.linalg.norm(out[0] - ref[0]) / (jnp.linalg.norm(ref[0]) + 1e-9))
        err_l = float(jnp.max(jnp.abs(out[1] - ref[1])))
        ok = bool(err_o < 2e-2 and err_l < 2e-2 and np.isfinite(err_o))
        rows.append(dict(op="gathered_attention", shape=[b, k, g, d, p, n, cap], dtype=str(dt.__name__ if hasattr(dt, "__name__") else dt),
                         remainder=remainder is not None, rel_err_o=err_o, max_err_lse=err_l, ok=ok))
      except Exception as e:  # report and go on
        rows.append(dict(op="gathered_attention", shape=[b, k, g, d, p, n, cap], ok=False,
                         error=f"{type(e).__name__}: {str(e)[:3000]}"))
        traceback.print_exc()
      log(json.dumps(rows[-1]))
  for (b, k, g, d, n, cdt) in [(1, 2, 4, 128, 256, jnp.float32), (2, 2, 3, 64, 200, jnp.bfloat16),
                               (1, 8, 4, 128, 1024, jnp.bfloat16), (1, 1, 8, 128, 64, jnp.float32)]:
    h = k * g
    ks = jax.random.split(jax.random.key(int(rng.integers(1 << 30))), 3)
    q = jax.random.normal(ks[0], (b, h, d))
    c = jax.random.normal(ks[1], (b, k, n, d)).astype(cdt)
    nb = jax.random.randint(ks[2], (b, k), 0, n + 1)
    ml = jnp.full((b, h), 1.5)
    ref = ss.score_select_reference(q, c, nb, 0.5, 0.5, ml, cap=n // 4)
    try:
      out = ss.score_select(q, c, nb, 0.5, 0.5, ml, cap=n // 4, impl="pallas",
                            interpret=interpret)
      valid = np.asarray(ref.margin) > -1e29
      err = float(np.max(np.abs(np.asarray(out.margin) - np.asarray(ref.margin))[valid], initial=0))
      same = float(np.mean(np.asarray(out.kept) == np.asarray(ref.kept)))
      rows.append(dict(op="score_select", shape=[b, k, g, d, n], dtype=jnp.dtype(cdt).name,
                       max_err_margin=err, kept_equal_frac=same,
                       ok=bool(err < (5e-2 if cdt == jnp.float32 else 1e-3))))
    except Exception as e:
      rows.append(dict(op="score_select", shape=[b, k, g, d, n], ok=False,
                       error=f"{type(e).__name__}: {str(e)[:3000]}"))
      traceback.print_exc()
    log(json.dumps(rows[-1]))
  # Quest's bound (two products per tile)
  ks = jax.random.split(jax.random.key(int(rng.integers(1 << 30))), 3)
  keys = jax.random.normal(ks[0], (1, 2, 96, 16, 128))
  kmin, kmax = keys.min(3).astype(jnp.bfloat16), keys.max(3).astype(jnp.bfloat16)
  q = jax.random.normal(ks[1], (1, 8, 128))
  nb = jnp.array([[96, 50]], jnp.int32)
  ml = jnp.full((1, 8), 3.0)
  try:
    out = ss.quest_select(q, kmin, kmax, nb, 0.5, 0.5, ml, cap=32, impl="pallas",
                          interpret=interpret)
    ref = ss.quest_select_reference(q, kmin, kmax, nb, 0.5, 0.5, ml, cap=32)
    valid = np.asarray(ref.margin) > -1e29
    err = float(np.max(np.abs(np.asarray(out.margin) - np.asarray(ref.margin))[valid]))
    rows.append(dict(op="quest_select", shape=[1, 2, 4, 128, 96], dtype="bfloat16",
                     max_err_margin=err, ok=bool(err < 1e-3)))
  except Exception as e:
    rows.append(dict(op="quest_select", ok=False, error=f"{type(e).__name__}: {str(e)[:3000]}"))
    traceback.print_exc()
  log(json.dumps(rows[-1]))
  return rows


# ----------------------------------------------------------------------------- bench


def run_config(b, ctx, fracs, layers, reps, copies, tune, results, cudnn_std=True,
               tune_margins=False):
  n = ctx // P
  log(f"--- batch {b} context {ctx} ({n} blocks/head), {copies} layer copies")
  key = jax.random.key(ctx + b)
  lay = [make_layer(jax.random.fold_in(key, c), b=b, n=n) for c in range(copies)]
  cent16 = [x[3].astype(DT) for x in lay]
  cents = {"f32": [x[3] for x in lay], "bf16": cent16, "fp8": [to_fp8(x[3]) for x in lay]}
  nb = jnp.full((b, K), n, jnp.int32)
  kv_bytes = 2 * b * ctx * K * D * 2
  row0 = dict(batch=b, context=ctx, blocks_per_head=n, layers=layers, copies=copies)
  qs = [make_query(jax.random.fold_in(key, 1000 + i), b, lay[i % copies][3]) for i in range(layers)]

  # full attention: cuDNN on the standard [B, S, K, D] layout, distinct K and V arrays
  ks = jax.random.normal(key, (b, ctx, K, D), DT)
  vs = jax.random.normal(jax.random.fold_in(key, 1), (b, ctx, K, D), DT)

  def full_one(q, ks, vs):
    o = jax.nn.dot_product_attention(q[:, None], ks, vs, implementation=FULL_IMPL)
    return o.astype(jnp.float32).sum()
  f_full = layered(full_one)
  t_full = bench(f_full, [(q,) for q in qs], (ks, vs), reps=reps) / layers
  t_full_gpu = (gpu_seconds(f_full, [(q,) for q in qs], (ks, vs)) or t_full * layers) / layers
  r = dict(row0, path="full_cudnn", ms=t_full * 1e3, bytes=kv_bytes,
           TBps=kv_bytes / t_full / 1e12, gpu_ms=t_full_gpu * 1e3)
  results.append(r); log(json.dumps(r))
  del ks, vs

  for frac in fracs:
    cap = int(math.ceil(frac * n * 1.15 / 4) * 4)
    per = []  # per layer: (q, m_lower, attention threshold, kept, count, copy)
    n_kept = 0
    trunc = 0
    for i, q in enumerate(qs):
      c = i % copies
      m_lower = thresholds_for_fraction(q, lay[c][3], frac)
      sel = ss.score_select_reference(q, lay[c][3], nb, 0.0, 0.0, m_lower, cap=cap)
      per.append((q, m_lower, m_lower - 3.0, sel.kept, sel.kept_count, c))
      n_kept += int(sel.kept_count.sum())
      trunc += int(sel.truncated.sum())
    n_kept /= layers
    att_bytes = n_kept * P * D * 2 * 2
    base = dict(row0, frac=frac, cap=cap, kept_blocks=n_kept, truncated_heads=trunc,
                full_ms=t_full * 1e3, full_gpu_ms=t_full_gpu * 1e3)
    log(f"frac {frac}: cap {cap}, kept blocks/layer {n_kept:.0f} ({n_kept / (b * K * n):.3%}),"
        f" truncated heads {trunc}")

    def attn(impl, cfg):
      def one(q, thr, kept, cnt, keys, vals, blen):
        o, lse = ga.gathered_attention(q, keys, vals, blen, kept, cnt, thr, impl=impl,
                                       config=cfg)
        return o.sum() + lse.sum() * 1e-30
      args = [(q, thr, kept, cnt, *lay[c][:3]) for (q, _, thr, kept, cnt, c) in per]
      return layered(one), args

    def select_attend(impl, cfg, cname):
      def one(q, ml, thr, keys, vals, blen, cent):
        s = ss.score_select(q, cent, nb, 0.0, 0.0, ml, cap=cap, impl=impl)
        o, lse = ga.gathered_attention(q, keys, vals, blen, s.kept, s.kept_count, thr,
                                       impl=impl, config=cfg)
        return o.sum() + lse.sum() * 1e-30
      args = [(q, ml, thr, *lay[c][:3], cents[cname][c]) for (q, ml, thr, _, _, c) in per]
      return layered(one), args

    def select_attend_inkernel(cfg):
      def one(q, ml, thr, keys, vals, blen, cent):  # margins + select_attention
        m = ss.block_margins_mgpu(q, cent, nb, ss._thresholds(ml, 0.0, 0.0))
        o, lse = ga.select_attention(q, keys, vals, blen, m, jnp.zeros(nb.shape), thr,
                                     impl="pallas", config=cfg)
        return o.sum() + lse.sum() * 1e-30
      args = [(q, ml, thr, *lay[c][:3], cent16[c]) for (q, ml, thr, _, _, c) in per]
      return layered(one), args

    def select(impl, cname, margins_only, config=ss.ScoreSelectConfig()):
      def one(q, ml, cent):
        thr = ss._thresholds(ml, 0.0, 0.0)
        if impl == "pallas":
          m = ss.block_margins_mgpu(q, cent, nb, thr, config=config)
        else:
          m = ss.block_margins_reference(q, cent, nb, thr)
        if margins_only:
          return m[..., 0].sum()
        return ss.compact(m, cap).kept_count.sum().astype(jnp.float32)
      args = [(q, ml, cents[cname][c]) for (q, ml, _, _, _, c) in per]
      return layered(one), args

    def timed(name, fn_args, nbytes, **extra):
      if PATHS and name not in PATHS:
        return {}
      fn, args = fn_args
      try:
        t = bench(fn, args, (), reps=reps) / layers
        g = gpu_seconds(fn, args, ())
        r = dict(base, path=name, ms=t * 1e3, bytes=nbytes, TBps=nbytes / t / 1e12,
                 vs_full=t_full / t, **extra)
        if g:
          g /= layers
          r.update(gpu_ms=g * 1e3, gpu_TBps=nbytes / g / 1e12, gpu_vs_full=t_full_gpu / g)
      except Exception as e:
        traceback.print_exc()
        r = dict(base, path=name, error=f"{type(e).__name__}: {str(e)[:1500]}", **extra)
      results.append(r); log(json.dumps(r))
      return r

    cfgs = [ga.GatheredAttentionConfig()]
    if tune:
      cfgs += [ga.GatheredAttentionConfig(bpp, sif, bps) for bpp in (8, 16, 40)
               for sif in (2, 3, 4) for bps in (1, 2)]
    best = None
    for cfg in cfgs:
      r = timed("attention_pallas", attn("pallas", cfg), att_bytes,
                blocks_per_program=cfg.blocks_per_program or (
                    "balanced" if cfg.balanced else ga.default_blocks_per_program(cap, b * K)),
                steps_in_flight=cfg.steps_in_flight, blocks_per_step=cfg.blocks_per_step)
      if "ms" in r and (best is None or r["ms"] < best[0]):
        best = (r["ms"], cfg)
    pdl = dataclasses.replace(cfgs[0], pdl=True)  # the merge launched as a dependent
    timed("attention_pallas_pdl", attn("pallas", pdl), att_bytes, blocks_per_program="balanced")
    timed("attention_xla", attn("xla", None), att_bytes)
    c_bytes = {name: c[0].nbytes for name, c in cents.items()}
    timed("margins_pallas_bf16", select("pallas", "bf16", True), c_bytes["bf16"])
    timed("margins_pallas_fp8", select("pallas", "fp8", True), c_bytes["fp8"])
    if tune_margins and frac == fracs[0]:  # the margins kernel's knobs (the default first)
      n_tiles = -(-n // 64)
      default = ss.default_tiles_per_program(n_tiles, b * K)
      for cname in ("bf16", "fp8"):
        for tiles in (1, 2, 4, 8, 16, 32, 64):
          for sif in (2, 3, 4, 6):
            if n_tiles % tiles or sif > tiles and sif != 2:
              continue
            timed(f"margins_pallas_{cname}_tuned",
                  select("pallas", cname, True, ss.ScoreSelectConfig(tiles, sif)),
                  c_bytes[cname], tiles_per_program=tiles, steps_in_flight=sif,
                  default_tiles_per_program=default)
    timed("score_select_pallas_bf16", select("pallas", "bf16", False), c_bytes["bf16"])
    timed("score_select_xla_f32", select("xla", "f32", False), c_bytes["f32"])
    cfg = best[1] if best else ga.GatheredAttentionConfig()
    for cname in ("f32", "bf16", "fp8"):
      timed(f"select_attend_pallas_{cname}", select_attend("pallas", cfg, cname),
            att_bytes + c_bytes[cname])
    for cname in ("bf16", "fp8"):
      timed(f"select_attend_pallas_{cname}_pdl",
            select_attend("pallas", dataclasses.replace(cfg, pdl=True), cname),
            att_bytes + c_bytes[cname])
    timed("select_attend_inkernel_bf16", select_attend_inkernel(ga.GatheredAttentionConfig()),
          att_bytes + c_bytes["bf16"])
    timed("select_attend_xla_f32", select_attend("xla", None, "f32"), att_bytes + c_bytes["f32"])


def latency_sweep(results, layers, reps):
  """Attention alone at 1M, batch 1, kept tokens per kv head from 32 to 64K (distinct blocks
  every layer): the latency floor of small selections and the bandwidth of large ones."""
  n = (1 << 20) // P
  keys, vals, blen, cent = make_layer(jax.random.key(7), b=1, n=n)
  q = make_query(jax.random.key(8), 1, cent)
  thr = jnp.full((1, H), -1e30)
  for tok in (0, 32, 1024, 4096, 16384, 65536):
    nblk = max(tok // P, 4)
    per = []
    for i in range(layers):
      ids = jax.random.permutation(jax.random.key(i), n)[:nblk].astype(jnp.int32)
      per.append((jnp.broadcast_to(ids, (1, K, nblk)), jnp.full((1, K), tok // P, jnp.int32)))
    byt = K * (tok // P) * P * D * 2 * 2
    for cfg in [ga.GatheredAttentionConfig()] + ([None] if tok in (0, 4096, 65536) else []):
      def one(kept, cnt, keys, vals, blen, cfg=cfg):
        o, lse = ga.gathered_attention(q, keys, vals, blen, kept, cnt, thr,
                                       impl="xla" if cfg is None else "pallas", config=cfg)
        return o.sum()
      try:
        f = layered(one)
        t = bench(f, per, (keys, vals, blen), reps=reps) / layers
        g = (gpu_seconds(f, per, (keys, vals, blen)) or float("nan")) / layers
        r = dict(path="latency_sweep_" + ("xla" if cfg is None else "pallas"), context=1 << 20,
                 batch=1, kept_tokens_per_head=tok, bytes=byt, ms=t * 1e3, TBps=byt / t / 1e12,
                 gpu_ms=g * 1e3, gpu_TBps=byt / g / 1e12,
                 blocks_per_program=ga.default_blocks_per_program(nblk, K),
                 blocks_per_step=cfg.blocks_per_step if cfg else None)
      except Exception as e:
        traceback.print_exc()
        r = dict(path="latency_sweep", kept_tokens_per_head=tok,
                 error=f"{type(e).__name__}: {str(e)[:1000]}")
      results.append(r); log(json.dumps(r))


def plot(results, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  ok = [r for r in results if "ms" in r]
  fig, axes = plt.subplots(2, 2, figsize=(15, 10))
  paths = (("select_attend_pallas_bf16", "C0"), ("select_attend_pallas_f32", "C1"),
           ("select_attend_xla_f32", "C2"), ("attention_pallas", "C3"), ("attention_xla", "C4"))
  for ax, b in zip(axes[0], (1, 8)):
    rows = [r for r in ok if r.get("batch") == b]
    ctxs = sorted({r["context"] for r in rows})
    for name, c in paths:
      first = {}  # the first row per context: the default config (tuning rows follow it)
      for r in rows:
        if r["path"] == name and r.get("frac") == 0.02:
          first.setdefault(r["context"], (r["context"], r["ms"], r.get("gpu_ms")))
      pts = sorted(first.values())
      if pts:
        ax.plot([x[0] for x in pts], [x[1] for x in pts], "o-", color=c, label=name + " (wall)")
        if all(x[2] for x in pts):
          ax.plot([x[0] for x in pts], [x[2] for x in pts], "o:", color=c, alpha=0.6,
                  label=name + " (GPU)")
    full = sorted((r["context"], r["ms"], r.get("gpu_ms")) for r in rows
                  if r["path"] == "full_cudnn")
    if full:
      ax.plot([x[0] for x in full], [x[1] for x in full], "k-", lw=3, label="full, cuDNN (wall)")
    ax.set_xscale("log", base=2); ax.set_yscale("log")
    ax.set_xlabel("context (tokens)"); ax.set_ylabel("ms / layer")
    ax.set_title(f"Llama-3-8B layer, batch {b}, 2% of blocks kept"); ax.legend(fontsize=6)
  ax = axes[1][0]
  for frac, c in ((0.01, "C0"), (0.02, "C1"), (0.05, "C2")):
    pts = sorted((r["context"], r["vs_full"], r.get("gpu_vs_full")) for r in ok
                 if r.get("batch") == 1 and r["path"] == "select_attend_pallas_bf16"
                 and r.get("frac") == frac)
    if pts:
      ax.plot([x[0] for x in pts], [x[1] for x in pts], "o-", color=c, label=f"{frac:.0%} wall")
      if all(x[2] for x in pts):
        ax.plot([x[0] for x in pts], [x[2] for x in pts], "o:", color=c, label=f"{frac:.0%} GPU")
  ax.axhline(20, color="gray", ls="--", lw=1); ax.axhline(5, color="gray", ls="--", lw=1)
  ax.set_xscale("log", base=2); ax.set_xlabel("context (tokens)")
  ax.set_ylabel("speedup vs cuDNN full attention")
  ax.set_title("scoring + selection + attention (Pallas, bf16 centroids), batch 1")
  ax.legend(fontsize=7)
  ax = axes[1][1]
  ax2 = ax.twinx()
  for sweep, st in (("latency_sweep_pallas", "o-"), ("latency_sweep_xla", "x--")):
    sw = [r for r in ok if r.get("path") == sweep and r["bytes"] > 0]
    if sw:
      lab = sweep.replace("latency_sweep_", "")
      ax.plot([r["bytes"] / 1e6 for r in sw], [r["ms"] * 1e3 for r in sw], st, label=lab + " wall")
      ax.plot([r["bytes"] / 1e6 for r in sw], [r["gpu_ms"] * 1e3 for r in sw], st, alpha=0.5,
              label=lab + " GPU")
      ax2.plot([r["bytes"] / 1e6 for r in sw], [r["gpu_TBps"] for r in sw], st, color="r",
               alpha=0.4)
  ax.set_xscale("log"); ax.set_yscale("log"); ax.set_xlabel("K+V bytes read per layer (MB)")
  ax.set_ylabel("us / layer"); ax2.set_ylabel("GPU-time TB/s (red)", color="r")
  ax.set_title("attention alone, 1M context, batch 1"); ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", default="benchmarks/results", help="folder for JSON + PNG")
  ap.add_argument("--tag", default="kernels", help="file name stem")
  ap.add_argument("--check", action="store_true", help="correctness only")
  ap.add_argument("--contexts", default="32768,131072,524288,1048576")
  ap.add_argument("--batches", default="1,8")
  ap.add_argument("--fracs", default="0.01,0.02,0.05")
  ap.add_argument("--fracs-b8", default="0.02", help="fractions elsewhere")
  ap.add_argument("--wide", default="131072,1048576", help="batch-1 contexts with --fracs")
  ap.add_argument("--layers", type=int, default=8)
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--tune", action="store_true", help="sweep the attention kernel's knobs")
  ap.add_argument("--tune-margins", action="store_true",
                  help="sweep the margins kernel's tiles_per_program / steps_in_flight")
  ap.add_argument("--sweep", action="store_true", help="latency/bandwidth sweep at 1M")
  ap.add_argument("--profile", action="store_true", help="per-kernel GPU times at 1M, 2%%")
  ap.add_argument("--max-gb", type=float, default=24.0, help="memory for layer copies")
  ap.add_argument("--no-check", action="store_true", help="skip the correctness checks")
  ap.add_argument("--paths", default="", help="comma-separated paths to measure (default all)")
  args = ap.parse_args()
  PATHS.update(p for p in args.paths.split(",") if p)

  dev = jax.devices()[0]
  meta = dict(jax=jax.__version__, device=dev.device_kind, platform=dev.platform,
              python=platform.python_version(),
              date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              command="python " + " ".join(sys.argv), shapes=dict(H=H, K=K, D=D, P=P, dtype="bf16"))
  log(json.dumps(meta))
  on_gpu = dev.platform == "gpu"
  results = []
  os.makedirs(args.out, exist_ok=True)
  stem = os.path.join(args.out, args.tag)
  checks = [] if args.no_check else check(interpret=not on_gpu)
  log(f"check: {sum(r['ok'] for r in checks)}/{len(checks)} ok")
  if args.check or not on_gpu:
    with open(stem + "_check.json", "w") as f:
      json.dump(dict(meta, checks=checks), f, indent=1)
    return
  meta["read_TBps"], meta["copy_TBps"] = roofline()
  log(f"read {meta['read_TBps']:.2f} TB/s, copy {meta['copy_TBps']:.2f} TB/s")

  def save():
    with open(stem + ".json", "w") as f:
      json.dump(dict(meta, checks=checks, results=results), f, indent=1)
    try:
      plot(results, stem + ".png")
    except Exception:
      traceback.print_exc()

  if args.profile:
    profile(results)
    save()
  if args.sweep:
    latency_sweep(results, args.layers, args.reps)
    save()
  for b in map(int, args.batches.split(",")):
    for ctx in map(int, args.contexts.split(",")):
      wide = b == 1 and ctx in map(int, args.wide.split(","))
      fracs = [float(x) for x in (args.fracs if wide else args.fracs_b8).split(",")]
      layer_gb = (2 * b * ctx * K * D * 2 + b * ctx // P * K * D * 6) / 1e9
      copies = int(max(1, min(4, args.max_gb // max(layer_gb, 1e-9))))
      copies = 4 if copies >= 4 else (2 if copies >= 2 else 1)  # divides --layers
      try:
        run_config(b, ctx, fracs, args.layers, args.reps, copies,
                   args.tune and ctx == 1 << 20 and b == 1, results,
                   tune_margins=args.tune_margins)
      except Exception as e:
        traceback.print_exc()
        results.append(dict(batch=b, context=ctx, error=f"{type(e).__name__}: {str(e)[:2000]}"))
      save()
  save()
  log("done")


if __name__ == "__main__":
  main()
