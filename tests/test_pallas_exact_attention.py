"""DIPR attention over the exact region (sink + tail window): the jnp reference against a
float64 brute force over the positions, and the Mosaic GPU kernel against the reference (the
GPU interpreter on the CPU, natively on a GPU)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alaya_jax.errors import ShapeError
from alaya_jax.pallas import exact_attention as ea
from alaya_jax.pallas._mgpu import EMPTY_LSE, MASK_VALUE

INTERPRET = jax.default_backend() != "gpu"


def make(b=2, s=256, k=2, g=4, d=64, dtype=jnp.bfloat16, seed=0):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((b, k * g, d)) * 2, dtype)
  kc = jnp.asarray(rng.standard_normal((b, s, k, d)), dtype)
  vc = jnp.asarray(rng.standard_normal((b, s, k, d)), dtype)
  return q, kc, vc


def brute(q, k, v, tail_start, lengths, extra, sink, tail_size, beta, keep_sink, keep_window):
  """Per (sequence, head), in float64 over the exact region's positions."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  B, S, K, D = k.shape
  H = q.shape[1]
  o = np.zeros((B, H, D))
  lse = np.full((B, H), EMPTY_LSE)
  m_out = np.full((B, H), MASK_VALUE)
  n = np.zeros((B, H), np.int64)
  for b in range(B):
    st = min(max(int(tail_start[b]), 0), S - tail_size)
    s0 = min(sink, S)
    pos = [p for p in range(s0) if p < lengths[b]]
    pos += [p for p in range(st, st + tail_size)
            if p >= tail_start[b] and p >= s0 and p < lengths[b]]
    pos = np.array(pos, np.int64)
    for h in range(H):
      kh = h // (H // K)
      if len(pos) == 0:
        continue
      sc = k[b, pos, kh] @ q[b, h] / math.sqrt(D)
      m = sc.max()
      m_out[b, h] = m
      thr = max(m, float(extra[b, h])) - beta
      always = (pos < keep_sink) | (pos >= lengths[b] - keep_window)
      mask = (sc >= thr) | always
      n[b, h] = mask.sum()
      if not mask.any():
        continue
      mm = sc[mask].max()
      e = np.exp(sc[mask] - mm)
      o[b, h] = e @ v[b, pos[mask], kh] / e.sum()
      lse[b, h] = mm + np.log(e.sum())
  return o, lse, m_out, n


CASES = {  # (tail_start, lengths, extra, beta)
    "middle": ([100, 60], [180, 130], None, 2.0),
    "window clamped at the end": ([240, 250], [256, 253], None, 3.0),
    "short context": ([2, 0], [3, 1], None, 1.0),
    "another part's max dominates": ([100, 60], [180, 130], 1e3, 2.0),
    "beta inf keeps every valid key": ([100, 60], [180, 130], None, float("inf")),
    "beta 0": ([100, 60], [180, 130], None, 0.0),
}


def run_case(name, fn, q, kc, vc, tail_size, sink=4):
  ts, ln, ex, beta = CASES[name]
  b, h = q.shape[:2]
  extra = jnp.full((b, h), MASK_VALUE if ex is None else ex, jnp.float32)
  args = (q, kc, vc, jnp.asarray(ts, jnp.int32), jnp.asarray(ln, jnp.int32), extra)
  kw = dict(sink=sink, tail_size=tail_size, beta=beta, keep_sink=sink, keep_window=8)
  return fn(*args, **kw), (args, kw)


@pytest.mark.parametrize("name", list(CASES))
def test_reference_matches_brute_force(name):
  q, kc, vc = make(dtype=jnp.float32)
  (o, lse, m, n), (args, kw) = run_case(name, jax.jit(ea.exact_attention_reference,
                                                      static_argnames=("sink", "tail_size",
                                                                       "beta", "keep_sink",
                                                                       "keep_window")),
                                        q, kc, vc, tail_size=40)
  bo, blse, bm, bn = brute(*[np.asarray(a) for a in args], **kw)
  np.testing.assert_allclose(np.asarray(o), bo, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(lse), blse, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(m), bm, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(n), bn)


@pytest.mark.parametrize("g,d,tail,dtype", [(4, 64, 40, jnp.bfloat16), (8, 128, 48, jnp.float16),
                                            (4, 128, 192, jnp.bfloat16)])
@pytest.mark.parametrize("name", ["middle", "window clamped at the end", "short context",
                                  "another part's max dominates"])
def test_kernel_matches_reference(g, d, tail, dtype, name):
  q, kc, vc = make(g=g, d=d, dtype=dtype, seed=g + d)
  kern = lambda *a, **kw: ea.exact_attention(*a, **kw, impl="pallas", interpret=INTERPRET)
  (o, lse, m, n), (args, kw) = run_case(name, kern, q, kc, vc, tail_size=tail)
  ro, rlse, rm, rn = ea.exact_attention_reference(*args, **kw)
  tol = 2e-2 if dtype == jnp.bfloat16 else 5e-3
  np.testing.assert_allclose(np.asarray(o), np.asarray(ro), atol=tol)
  np.testing.assert_allclose(np.asarray(lse), np.asarray(rlse), atol=tol, rtol=1e-3)
  np.testing.assert_allclose(np.asarray(m), np.asarray(rm), atol=tol, rtol=1e-3)
  # a key at the threshold may fall either side under the kernel's rounding
  assert np.abs(np.asarray(n) - np.asarray(rn)).max() <= 1


def test_bad_input_raises():
  q, kc, vc = make()
  z = jnp.zeros((2,), jnp.int32)
  extra = jnp.zeros(q.shape[:2], jnp.float32)
  kw = dict(sink=4, tail_size=32, beta=1.0, keep_sink=4, keep_window=8)
  with pytest.raises(ShapeError, match="lengths"):
    ea.exact_attention(q, kc, vc, z, jnp.zeros((3,), jnp.int32), extra, **kw)
  with pytest.raises(ShapeError, match="tail_size"):
    ea.exact_attention(q, kc, vc, z, z, extra, **dict(kw, tail_size=1000))
  with pytest.raises(ShapeError, match="v "):
    ea.exact_attention(q, kc, vc[:, :10], z, z, extra, **kw)
  assert "G=3" in ea.kernel_supports(jnp.zeros((1, 6, 64), jnp.bfloat16), kc[:1, :, :2], 32)
  assert "256 slots" in ea.kernel_supports(q, kc, 250)
