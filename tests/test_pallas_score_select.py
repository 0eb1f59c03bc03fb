"""Block scoring + DIPR selection: the jnp reference against brute force and hand-made cases,
and the Mosaic GPU margins kernel against the reference (CPU interpreter / native GPU)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alaya_jax.index.cluster import to_fp8
from alaya_jax.pallas import score_select as ss
from alaya_jax.pallas._mgpu import MASK_VALUE

ON_GPU = jax.default_backend() == "gpu"
INTERPRET = not ON_GPU


def brute_force(q, cent, n_blocks, beta, delta, m_lower, cap):
  """Python loops over (batch, kv head, block, head): the criterion as written."""
  b, h, d = q.shape
  k, n = cent.shape[1], cent.shape[2]
  g = h // k
  q64, c64 = np.asarray(q, np.float64), np.asarray(cent, np.float64)
  kept = np.zeros((b, k, cap), np.int32)
  count = np.zeros((b, k), np.int32)
  passing = np.zeros((b, k), np.int32)
  for bi in range(b):
    for ki in range(k):
      ids = [j for j in range(int(n_blocks[bi, ki]))
             if any(q64[bi, hi] @ c64[bi, ki, j] / math.sqrt(d)
                    >= float(m_lower[bi, hi]) - beta - delta
                    for hi in range(ki * g, (ki + 1) * g))]
      passing[bi, ki] = len(ids)
      count[bi, ki] = min(len(ids), cap)
      kept[bi, ki, : count[bi, ki]] = ids[:cap]
  return kept, count, passing


reference = jax.jit(ss.score_select_reference, static_argnames="cap")


def make(b=2, k=2, g=4, n=40, d=64, seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((b, k * g, d)), jnp.float32)
  cent = jnp.asarray(rng.standard_normal((b, k, n, d)), dtype)
  m_lower = jnp.asarray(rng.standard_normal((b, k * g)) + 2.0, jnp.float32)
  return q, cent, m_lower


def bf16_exact(q):
  """q rounded to bf16 values (kept f32) on the host. The kernel rounds q to the centroid
  dtype; XLA on a GPU may skip that rounding in the jnp reference (excess precision allowed
  by default), which moved the margins by up to 5e-3 on an H200."""
  return jnp.asarray(np.asarray(q).astype(jnp.bfloat16).astype(np.float32))


def assert_selection_equal(sel, kept, count, passing):
  np.testing.assert_array_equal(sel.kept_count, count)
  np.testing.assert_array_equal(sel.n_passing, passing)
  np.testing.assert_array_equal(sel.truncated, passing > kept.shape[-1])
  for bi in range(kept.shape[0]):
    for ki in range(kept.shape[1]):
      c = int(count[bi, ki])
      np.testing.assert_array_equal(sel.kept[bi, ki, :c], kept[bi, ki, :c])


def test_reference_matches_brute_force_with_truncation():
  q, cent, m_lower = make(b=2, k=2, g=3, n=50)
  n_blocks = jnp.array([[50, 31], [0, 7]], jnp.int32)
  for cap in (64, 8):  # 8 truncates the first head
    sel = reference(q, cent, n_blocks, 0.5, 0.25, m_lower, cap=cap)
    assert_selection_equal(sel, *brute_force(q, cent, n_blocks, 0.5, 0.25, m_lower, cap))
  assert bool(sel.truncated[0, 0]) and int(sel.kept_count[1, 0]) == 0
  assert np.all(np.asarray(sel.margin[1, 0]) == MASK_VALUE)   # no valid blocks


def test_hand_made_selection():
  """d=4, one kv head of two query heads, five blocks; scores written out."""
  q = jnp.array([[[2.0, 0, 0, 0], [0, 2.0, 0, 0]]])            # sqrt(d) = 2: s = c[0] / c[1]
  cent = jnp.array([[[[3.0, 0, 0, 0], [0.9, 0.9, 0, 0], [0, 2.5, 0, 0], [-1, -1, 0, 0],
                      [5.0, 5.0, 0, 0]]]])
  # head 0 scores [3, .9, 0, -1, 5], head 1 [0, .9, 2.5, -1, 5]; block 4 is past n_blocks
  m_lower = jnp.array([[3.0, 3.0]])
  sel = reference(q, cent, jnp.array([[4]]), 0.4, 0.1, m_lower, cap=4)
  # threshold 2.5 for both heads: block 0 (head 0: 3) and block 2 (head 1: 2.5, ties kept)
  np.testing.assert_array_equal(sel.kept[0, 0, :2], [0, 2])
  assert int(sel.kept_count[0, 0]) == 2 and not bool(sel.truncated[0, 0])
  np.testing.assert_allclose(sel.margin[0, 0, :4], [0.5, -1.6, 0.0, -3.5], rtol=1e-6)
  sel = reference(q, cent, jnp.array([[5]]), 10.0, 0.0, m_lower, cap=3)
  np.testing.assert_array_equal(sel.kept[0, 0], [0, 1, 2])     # all 5 pass, first 3 kept
  assert bool(sel.truncated[0, 0]) and int(sel.n_passing[0, 0]) == 5


def test_compact_positions_cross_tiles():
  """More than one 128-row tile of the two-level prefix sum, with a ragged last tile."""
  margin = jnp.asarray(np.where(np.random.default_rng(5).random((2, 3, 300)) < 0.3, 1.0, -1.0),
                       jnp.float32)
  fn = jax.jit(ss.compact, static_argnames=("cap", "width"))
  dense = jnp.asarray(np.where(np.random.default_rng(6).random((1, 2, 1000)) < 0.95, 1.0, -1.0),
                      jnp.float32)  # full 128-row tiles, 8 tiles
  for margin, cap, width in ((margin, 64, None), (margin, 61, 64), (dense, 999, 1000),
                             (dense, 500, None)):
    sel = fn(margin, cap=cap, width=width)
    assert sel.kept.shape[-1] == (width or cap)
    m = np.asarray(margin)
    for bi in range(m.shape[0]):
      for ki in range(m.shape[1]):
        ids = np.nonzero(m[bi, ki] >= 0)[0]
        c = min(len(ids), cap)
        assert int(sel.kept_count[bi, ki]) == c and int(sel.n_passing[bi, ki]) == len(ids)
        np.testing.assert_array_equal(sel.kept[bi, ki, :c], ids[:c])
        assert not np.any(np.asarray(sel.kept[bi, ki, c:]))  # zeros past the count


def test_dispatch_rules():
  q, cent, m_lower = make(b=1, k=1, g=2, n=8)
  nb = jnp.array([[8]], jnp.int32)
  a = jax.jit(ss.score_select, static_argnames=("cap", "impl"))(q, cent, nb, 1.0, 0.0, m_lower,
                                                                 cap=4, impl="xla")
  r = reference(q, cent, nb, 1.0, 0.0, m_lower, cap=4)
  np.testing.assert_array_equal(a.kept, r.kept)
  if not ON_GPU:
    with pytest.raises(NotImplementedError, match="needs an NVIDIA GPU"):
      ss.score_select(q, cent, nb, 1.0, 0.0, m_lower, cap=4, impl="pallas")
  q9, c9, m9 = make(b=1, k=1, g=10, n=8)
  with pytest.raises(NotImplementedError, match="group size G=10"):
    ss.score_select(q9, c9, nb, 1.0, 0.0, m9, cap=4, impl="pallas", interpret=True)


@pytest.mark.parametrize("dtype", [jnp.float32, pytest.param(jnp.bfloat16, marks=pytest.mark.slow)])
def test_kernel_margins_and_selection(dtype):
  """G 3 (group windows at row offsets 0, 3, 6, 1), n_blocks ragged (0, partial tiles, all),
  N not a multiple of 64 (padded), several tiles per program."""
  q, cent, m_lower = make(b=2, k=2, g=3, n=200, d=64, seed=1)
  q = bf16_exact(q) if dtype == jnp.bfloat16 else q
  nb = jnp.array([[200, 0], [65, 131]], jnp.int32)
  for c, tol in ((cent.astype(dtype), 1e-5),):
    sel = ss.score_select(q, c, nb, 1.0, 0.5, m_lower, cap=48, impl="pallas",
                          interpret=INTERPRET,
                          config=ss.ScoreSelectConfig(tiles_per_program=2, steps_in_flight=2))
    ref = reference(q, c, nb, 1.0, 0.5, m_lower, cap=48)
    valid = np.asarray(ref.margin) > MASK_VALUE / 2
    if ON_GPU and c.dtype == jnp.float32:
      tol = 5e-2  # tf32 on the tensor cores
    np.testing.assert_allclose(np.asarray(sel.margin)[valid], np.asarray(ref.margin)[valid],
                               rtol=tol, atol=tol)
    assert np.all(np.asarray(sel.margin)[~valid] == MASK_VALUE)
    if not ON_GPU:
      np.testing.assert_array_equal(sel.kept, ref.kept)
      np.testing.assert_array_equal(sel.kept_count, ref.kept_count)


@pytest.mark.slow
def test_kernel_group4_d128():
  q, cent, m_lower = make(b=1, k=4, g=4, n=128, d=128, seed=2)
  q = bf16_exact(q)
  nb = jnp.array([[128, 100, 64, 1]], jnp.int32)
  sel = ss.score_select(q, cent.astype(jnp.bfloat16), nb, 0.5, 0.5, m_lower, cap=32,
                        impl="pallas", interpret=INTERPRET)
  ref = reference(q, cent.astype(jnp.bfloat16), nb, 0.5, 0.5, m_lower, cap=32)
  np.testing.assert_allclose(sel.margin, ref.margin, rtol=1e-5, atol=1e-5)


def test_kernel_fp8_centroids():
  """float8_e4m3fn centroids (a quarter of f32's bytes): q goes to fp8 as well, saturated at
  448 (one head's q is scaled past it; a plain cast would make NaN), the products are exact in
  f32. On the GPU the fp8 WGMMA accumulates with fewer mantissa bits than f32."""
  q, cent, m_lower = make(b=1, k=2, g=4, n=128, d=128, seed=4)
  q = q.at[0, 1].multiply(1000.0)
  q8 = jnp.asarray(np.asarray(to_fp8(q)).astype(np.float32))  # host-rounded (see bf16_exact)
  c8 = to_fp8(cent * 3.0)
  nb = jnp.array([[128, 70]], jnp.int32)
  sel = ss.score_select(q8, c8, nb, 0.5, 0.5, m_lower, cap=32, impl="pallas",
                        interpret=INTERPRET)
  ref = reference(q8, c8, nb, 0.5, 0.5, m_lower, cap=32)
  assert np.all(np.isfinite(np.asarray(ref.margin)))
  valid = np.asarray(ref.margin) > MASK_VALUE / 2
  tol = 2e-3 if ON_GPU else 1e-5
  np.testing.assert_allclose(np.asarray(sel.margin)[valid], np.asarray(ref.margin)[valid],
                             rtol=tol, atol=tol * 100)
  # the reference saturates q itself: the unrounded q gives the same margins
  np.testing.assert_array_equal(reference(q, c8, nb, 0.5, 0.5, m_lower, cap=32).margin,
                                ref.margin)


def test_quest_reference_bound_and_kernel():
  """Quest's bound sum_d max(q kmin, q kmax) is an upper bound of every member's score, and
  the two-product kernel (q+ . kmax + q- . kmin) matches the reference."""
  rng = np.random.default_rng(7)
  b, k, g, n, p, d = 1, 2, 3, 70, 8, 64
  keys = rng.standard_normal((b, k, n, p, d)).astype(np.float32)
  kmin, kmax = jnp.asarray(keys.min(3)), jnp.asarray(keys.max(3))
  q = jnp.asarray(rng.standard_normal((b, k * g, d)), jnp.float32)
  nb = jnp.array([[70, 33]], jnp.int32)
  zero = jnp.zeros((b, k * g), jnp.float32)
  bound = jax.jit(ss.quest_margins_reference)(q, kmin, kmax, nb, zero)     # threshold 0
  s = np.einsum("bkgd,bknpd->bkgnp", np.asarray(q).reshape(b, k, g, d), keys) / math.sqrt(d)
  best = s.max(axis=(2, 4))                                                 # [B,K,N]
  valid = np.arange(n)[None, None] < np.asarray(nb)[..., None]
  assert np.all(np.asarray(bound)[valid] >= best[valid] - 1e-5)
  m_lower = jnp.asarray(best.max(-1).repeat(g, axis=1), jnp.float32)        # the true max
  sel = ss.quest_select(q, kmin, kmax, nb, 0.5, 0.0, m_lower, cap=64, impl="pallas",
                        interpret=INTERPRET)
  ref = jax.jit(ss.quest_select_reference, static_argnames="cap")(q, kmin, kmax, nb, 0.5, 0.0,
                                                                  m_lower, cap=64)
  tol = 5e-2 if ON_GPU else 1e-5
  np.testing.assert_allclose(np.asarray(sel.margin)[valid], np.asarray(ref.margin)[valid],
                             rtol=tol, atol=tol)
  if not ON_GPU:
    np.testing.assert_array_equal(sel.kept, ref.kept)


@pytest.mark.parametrize("k,g,tiles", [(2, 4, 2), (3, 3, None), (2, 8, 1)])
def test_margins_from_max_subtract_beta_and_delta_in_the_kernel(k, g, tiles):
  """`block_margins_from_max` (m_lower straight from the kernel before it; beta and the
  per-head delta subtracted in the kernel) against the reference at m_lower - beta - delta:
  per-head deltas, a head whose m_lower is below MASK_VALUE (floored), ragged n_blocks, N not a
  multiple of 64; H = 9 takes the XLA threshold (delta's copy needs H % 4 == 0)."""
  q, cent, m_lower = make(b=2, k=k, g=g, n=200, d=64, seed=7)
  q = bf16_exact(q)
  cent = cent.astype(jnp.bfloat16)
  h = k * g
  m_lower = m_lower.at[1, 0].set(-jnp.inf)
  delta = jnp.asarray(np.random.default_rng(8).uniform(0, 2, (h,)), jnp.float32)
  nb = jnp.array([[200, 0, 70][:k], [65, 131, 1][:k]], jnp.int32)
  got = ss.block_margins_from_max(q, cent, nb, m_lower, 1.5, delta, interpret=INTERPRET,
                                  config=ss.ScoreSelectConfig(tiles_per_program=tiles))
  want = ss.block_margins_reference(
      q, cent, nb, jnp.maximum(m_lower, MASK_VALUE) - 1.5 - delta[None])
  valid = np.asarray(want) > MASK_VALUE / 2
  assert valid.any() and (~valid).any()
  np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], rtol=1e-5,
                             atol=1e-5)
  assert np.all(np.asarray(got)[~valid] == MASK_VALUE)


def test_margins_from_max_reject_a_wrong_shape():
  q, cent, m_lower = make(b=1, k=2, g=4, n=64, d=64)
  with pytest.raises(ss.ShapeError, match="m_lower"):
    ss.block_margins_from_max(q, cent, jnp.array([[64, 64]], jnp.int32), m_lower[:, :4], 1.0,
                              0.0, interpret=INTERPRET)


@pytest.mark.parametrize("n_tiles,bk,target", [(512, 8, 256), (512, 8, 528), (64, 8, 256),
                                               (100, 3, 7), (1, 1, 256), (4096, 64, 256)])
def test_default_tiles_per_program(n_tiles, bk, target):
  """The largest divisor of a head's tiles at or below min(32, n_tiles * bk // target), at
  least 1: against a brute-force search over the divisors."""
  want = max([t for t in range(1, n_tiles + 1) if n_tiles % t == 0
              and t <= max(1, min(32, n_tiles * bk // target))])
  assert ss.default_tiles_per_program(n_tiles, bk, target_programs=target) == want


def test_config_target_programs_sets_the_tiles_and_rejects_bad_values():
  """`ScoreSelectConfig.target_programs` reaches the kernel: with 4 tiles a head and 2 kv heads,
  target 2 gives 4 tiles a program (2 programs), target 8 one (8 programs): the margins agree
  with the reference either way."""
  q, cent, m_lower = make(b=1, k=2, g=4, n=256, d=64, seed=3)
  q, cent = bf16_exact(q), cent.astype(jnp.bfloat16)
  nb = jnp.array([[256, 130]], jnp.int32)
  thr = m_lower - 1.0
  want = ss.block_margins_reference(q, cent, nb, thr)
  for target in (2, 8):
    got = ss.block_margins_mgpu(q, cent, nb, thr, interpret=INTERPRET,
                                config=ss.ScoreSelectConfig(target_programs=target))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  assert ss.default_tiles_per_program(4, 2, target_programs=2) == 4
  assert ss.default_tiles_per_program(4, 2, target_programs=8) == 1
  with pytest.raises(ss.ConfigError, match="target_programs"):
    ss.ScoreSelectConfig(target_programs=0)
