"""Gathered sparse decode attention: the jnp reference against brute force, and the Mosaic GPU
kernel against the reference (in jax's GPU interpreter on the CPU, natively on a GPU).

Each interpreter call compiles for ~5-10 s on a 2-core CPU, so the kernel cases pack many
conditions into one call: ragged kept counts across batch and heads (0, 1, some, all),
thresholds that keep every or no key of a block, partly filled and empty blocks.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alaya_jax.errors import ShapeError
from alaya_jax.pallas import gathered_attention as ga
from alaya_jax.pallas._mgpu import EMPTY_LSE, MASK_VALUE

ON_GPU = jax.default_backend() == "gpu"
INTERPRET = not ON_GPU
TOL = {jnp.bfloat16: 2e-2, jnp.float16: 1e-2, jnp.float32: 1e-5}


def make(b=2, k=2, g=4, n=12, p=16, d=64, cap=6, dtype=jnp.bfloat16, seed=0):
  """Random inputs (numpy, no per-op compiles): counts all, 0, 1 first, then random."""
  rng = np.random.default_rng(seed)
  h = k * g
  q = jnp.asarray(rng.standard_normal((b, h, d)), dtype)
  keys = jnp.asarray(rng.standard_normal((b, k, n, p, d)), dtype)
  vals = jnp.asarray(rng.standard_normal((b, k, n, p, d)), dtype)
  blen = rng.integers(1, p + 1, (b, k, n)).astype(np.int32)
  blen[..., 0] = p
  kept = np.argsort(rng.random((b, k, n)), axis=-1)[..., :cap].astype(np.int32)
  cnt = rng.integers(0, cap + 1, b * k).astype(np.int32)
  cnt[:3] = [cap, 0, 1][: min(3, b * k)]
  thr = jnp.full((b, h), MASK_VALUE, jnp.float32)  # attend every valid key
  return (q, keys, vals, jnp.asarray(blen), jnp.asarray(kept), jnp.asarray(cnt.reshape(b, k)),
          thr)


def dense_attention(q, keys, vals, mask):
  """Brute force in float64 numpy. q [H,D], keys/vals [H,M,D], mask [H,M] -> o [H,D], lse [H]."""
  q, keys, vals = (np.asarray(x, np.float64) for x in (q, keys, vals))
  s = np.einsum("hd,hmd->hm", q, keys) / math.sqrt(q.shape[-1])
  s = np.where(mask, s, -np.inf)
  mx = np.max(s, axis=-1, keepdims=True, initial=-np.inf)
  mx = np.where(np.isfinite(mx), mx, 0.0)
  e = np.where(mask, np.exp(s - mx), 0.0)
  l = e.sum(-1)
  o = np.einsum("hm,hmd->hd", e, vals) / np.where(l > 0, l, 1.0)[:, None]
  lse = np.where(l > 0, mx[:, 0] + np.log(np.where(l > 0, l, 1.0)), EMPTY_LSE)
  return o, lse


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12)


reference = jax.jit(ga.gathered_attention_reference)


# ----------------------------------------------------------------------------- reference


def test_reference_equals_dense_attention_over_kept_blocks():
  q, keys, vals, blen, kept, cnt, thr = make(b=2, k=2, g=3, dtype=jnp.float32)
  thr = thr.at[0, 1].set(0.3).at[1, 4].set(-0.2)
  o, lse = reference(q, keys, vals, blen, kept, cnt, thr)
  q, keys, vals, blen, kept, cnt, thr = map(np.asarray, (q, keys, vals, blen, kept, cnt, thr))
  b, h, d = q.shape
  k, p = keys.shape[1], keys.shape[3]
  g = h // k
  for bi in range(b):
    for hi in range(h):
      ki = hi // g
      ids = kept[bi, ki, : cnt[bi, ki]]
      kk, vv = keys[bi, ki, ids].reshape(-1, d), vals[bi, ki, ids].reshape(-1, d)
      member = (np.arange(p)[None] < blen[bi, ki, ids][:, None]).reshape(-1)
      s = kk.astype(np.float64) @ q[bi, hi] / math.sqrt(d)
      mask = member & (s >= thr[bi, hi])
      eo, else_ = dense_attention(q[bi, hi][None], kk[None], vv[None], mask[None])
      np.testing.assert_allclose(o[bi, hi], eo[0], rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(lse[bi, hi], else_[0], rtol=1e-6, atol=1e-6)


def test_reference_all_kept_equals_full_attention():
  """Every block kept and threshold off: sparse == dense attention over the whole cache."""
  q, keys, vals, blen, _, _, thr = make(b=1, k=2, g=4, n=5, dtype=jnp.float32)
  blen = jnp.full(blen.shape, keys.shape[3], jnp.int32)
  kept = jnp.broadcast_to(jnp.arange(5, dtype=jnp.int32), (1, 2, 5))
  o, lse = reference(q, keys, vals, blen, kept, jnp.full((1, 2), 5, jnp.int32), thr)
  kk = np.repeat(np.asarray(keys).reshape(1, 2, -1, 64), 4, axis=1)[0]
  vv = np.repeat(np.asarray(vals).reshape(1, 2, -1, 64), 4, axis=1)[0]
  eo, else_ = dense_attention(q[0], kk, vv, np.ones(kk.shape[:2], bool))
  np.testing.assert_allclose(o[0], eo, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(lse[0], else_, rtol=1e-6)


def test_reference_empty_rows_and_remainder_merge():
  q, keys, vals, blen, kept, cnt, thr = make(b=1, k=2, g=2, dtype=jnp.float32)
  cnt = jnp.array([[0, 3]], jnp.int32)
  thr = thr.at[0, 3].set(1e9)                      # head 3 reads blocks but keeps no key
  o, lse = reference(q, keys, vals, blen, kept, cnt, thr)
  empty = np.float32(EMPTY_LSE)
  assert np.all(np.asarray(o[0, :2]) == 0) and np.all(np.asarray(lse[0, :2]) == empty)
  assert np.all(np.asarray(o[0, 3]) == 0) and lse[0, 3] == empty
  assert np.all(np.isfinite(np.asarray(o))) and np.all(np.isfinite(np.asarray(lse)))
  # remainder: exp(max) * (denominator, numerator) merges by log-sum-exp
  num = jnp.asarray(np.random.default_rng(3).standard_normal((1, 4, 64)), jnp.float32)
  den = jnp.array([[2.0, 0.0, 1.5, 4.0]])
  mx = jnp.array([[0.5, 7.0, -1.0, 2.0]])
  o2, lse2 = jax.jit(ga.gathered_attention_reference)(q, keys, vals, blen, kept, cnt, thr,
                                                      remainder=(num, den, mx))
  # empty exact part: the result is the remainder alone
  np.testing.assert_allclose(o2[0, 0], num[0, 0] / 2.0, rtol=1e-6)
  np.testing.assert_allclose(lse2[0, 0], 0.5 + math.log(2.0), rtol=1e-6)
  assert lse2[0, 1] == empty and np.all(np.asarray(o2[0, 1]) == 0)  # denominator 0
  # non-empty: total mass = exp(lse) + exp(max) * denominator, numerators likewise
  m_exact = float(lse[0, 2])
  tot = math.exp(m_exact) + math.exp(-1.0) * 1.5
  np.testing.assert_allclose(float(lse2[0, 2]), math.log(tot), rtol=1e-5)
  want = (np.asarray(o[0, 2]) * math.exp(m_exact) + np.asarray(num[0, 2]) * math.exp(-1.0)) / tot
  np.testing.assert_allclose(o2[0, 2], want, rtol=1e-4, atol=1e-6)


def test_merge_splits_equals_softmax_over_the_union():
  """Partials of disjoint key sets (some empty) merge to attention over their union, the
  remainder included; an all-empty row stays empty (o 0, lse EMPTY_LSE)."""
  rng = np.random.default_rng(5)
  b, k, s, g, d, m = 2, 2, 5, 3, 16, 7
  q = rng.standard_normal((b, k, g, d))
  keys = rng.standard_normal((b, k, s, m, d)) * 2
  vals = rng.standard_normal((b, k, s, m, d))
  mask = rng.random((b, k, s, g, m)) < 0.6
  mask[0, 0, 1:] = False                       # head row (0,0): one split holds every key
  mask[1, 1] = False                           # head row (1,1): nothing at all
  o_part, lse_part = np.zeros((b, k, s, g, d)), np.zeros((b, k, s, g))
  for i in np.ndindex(b, k, s):
    kq = np.repeat(keys[i][None], g, 0)
    o_part[i], lse_part[i] = dense_attention(q[i[:2]], kq, np.repeat(vals[i][None], g, 0),
                                             mask[i])
  for remainder in (None, (rng.standard_normal((b, k * g, d)), np.abs(rng.standard_normal(
      (b, k * g))), rng.standard_normal((b, k * g)))):
    rem = None if remainder is None else tuple(jnp.asarray(x, jnp.float32) for x in remainder)
    o, lse = jax.jit(ga.merge_splits)(jnp.asarray(o_part, jnp.float32),
                                      jnp.asarray(lse_part, jnp.float32), rem)
    for i in np.ndindex(b, k):
      kq = np.repeat(keys[i].reshape(1, s * m, d), g, 0)
      vq = np.repeat(vals[i].reshape(1, s * m, d), g, 0)
      full_mask = np.moveaxis(mask[i], 0, 1).reshape(g, s * m)
      want_o, want_lse = dense_attention(q[i], kq, vq, full_mask)
      rows = slice(i[1] * g, (i[1] + 1) * g)
      if remainder is not None:  # mass exp(max) * den, numerator exp(max) * num
        r_num, r_den, r_max = (np.asarray(x)[i[0], rows] for x in remainder)
        has = want_lse > EMPTY_LSE / 2
        e_mass = np.where(has, np.exp(np.where(has, want_lse, 0.0)), 0.0)
        tot = e_mass + np.exp(r_max) * r_den
        want_o = (want_o * e_mass[:, None] + r_num * np.exp(r_max)[:, None]) / tot[:, None]
        want_lse = np.log(tot)
      np.testing.assert_allclose(np.asarray(o[i[0], rows]), want_o, rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(np.asarray(lse[i[0], rows]), want_lse, rtol=1e-5, atol=1e-6)
    if remainder is None:
      assert np.all(np.asarray(o[1, 3:6]) == 0) and np.all(np.asarray(lse[1, 3:6]) == EMPTY_LSE)


def test_exact_dipr_threshold_matches_flat_dipr():
  """threshold = max over read - beta makes the kernel's mask exact DIPR over what was read."""
  q, keys, vals, blen, kept, cnt, _ = make(b=1, k=1, g=2, n=6, cap=6, dtype=jnp.float32)
  cnt = jnp.array([[6]], jnp.int32)
  beta = 0.7
  thr = jax.jit(ga.exact_dipr_threshold)(q, keys, blen, kept, cnt, beta)
  o, _ = reference(q, keys, vals, blen, kept, cnt, thr)
  q, keys, vals, blen = map(np.asarray, (q, keys, vals, blen))
  d, p = q.shape[-1], keys.shape[3]
  member = (np.arange(p)[None] < blen[0, 0][:, None]).reshape(-1)
  s = np.einsum("hd,md->hm", q[0], keys[0, 0].reshape(-1, d)) / math.sqrt(d)
  s = np.where(member[None], s, -np.inf)
  np.testing.assert_allclose(thr[0], s.max(-1) - beta, rtol=1e-5)
  dipr = member[None] & (s >= s.max(-1, keepdims=True) - beta)
  assert 1 <= int(dipr.sum()) < s.size  # a real DIPR set, not all or nothing
  kk = np.broadcast_to(keys[0, 0].reshape(-1, d), (2, p * 6, d))
  vv = np.broadcast_to(vals[0, 0].reshape(-1, d), (2, p * 6, d))
  eo, _ = dense_attention(q[0], kk, vv, dipr)
  np.testing.assert_allclose(o[0], eo, rtol=1e-5, atol=1e-6)


def test_dispatch_rules():
  args = make(b=1, k=1, g=1, n=4, cap=2)
  dispatch = jax.jit(ga.gathered_attention, static_argnames=("impl",))
  o_x, _ = dispatch(*args, impl="xla")
  o_r, _ = reference(*args)
  np.testing.assert_array_equal(o_x, o_r)
  if not ON_GPU:
    with pytest.raises(NotImplementedError, match="needs an NVIDIA GPU"):
      ga.gathered_attention(*args, impl="pallas")
    o_auto, _ = dispatch(*args)                     # None: the reference off the GPU
    np.testing.assert_array_equal(o_auto, o_r)
  with pytest.raises(NotImplementedError, match="block size P=12"):
    ga.gathered_attention(*make(b=1, k=1, g=1, n=4, p=12, cap=2), impl="pallas", interpret=True)
  with pytest.raises(NotImplementedError, match="float32"):
    ga.gathered_attention(*make(b=1, k=1, g=1, n=4, cap=2, dtype=jnp.float32), impl="pallas",
                          interpret=True)
  with pytest.raises(ValueError):
    ga.GatheredAttentionConfig(blocks_per_program=6)


# ----------------------------------------------------------------------------- kernel


def check_kernel(args, *, remainder=None, config=ga.GatheredAttentionConfig(), tol=None):
  q, keys = args[0], args[1]
  o, lse = ga.gathered_attention(*args, remainder=remainder, impl="pallas", config=config,
                                 interpret=INTERPRET)
  ro, rlse = jax.jit(ga.gathered_attention_reference)(*args, remainder=remainder)
  tol = tol or TOL[keys.dtype.type]
  assert np.all(np.isfinite(np.asarray(o))) and np.all(np.isfinite(np.asarray(lse)))
  assert rel(o, ro) < tol, rel(o, ro)
  np.testing.assert_allclose(np.asarray(lse), np.asarray(rlse), rtol=tol, atol=tol)
  # rows with nothing attended: exactly 0 and EMPTY_LSE, like the reference
  empty = np.asarray(rlse) == np.float32(EMPTY_LSE)
  assert np.all(np.asarray(o)[empty] == 0) and np.all(np.asarray(lse)[empty] == np.float32(EMPTY_LSE))
  return o, lse


def test_kernel_ragged_counts_thresholds_partial_blocks():
  """d 64, G 4, bf16; counts all/0/1/random; per-head thresholds keep all, none, some; P 16
  with partly filled and empty blocks (also first in a program); two splits per kv head
  (blocks_per_program 4)."""
  q, keys, vals, blen, kept, cnt, thr = make(b=2, k=2, g=4, n=12, p=16, d=64, cap=7)
  blen = blen.at[1, 1, :].set(0).at[1, 0, ::2].set(3)
  # both programs of kv head (0, 0) start on an empty block: rows with no kept key yet, whose
  # junk the softmax rescale must clear when the first kept key comes
  blen = blen.at[0, 0, kept[0, 0, 0]].set(0).at[0, 0, kept[0, 0, 4]].set(0)
  thr = thr.at[0, 0].set(1e9)                          # keeps none (blocks still read)
  thr = thr.at[1].set(jnp.array([-0.1, 0.0, 0.2, MASK_VALUE, 0.1, -0.3, 0.05, 0.4]))
  rng = np.random.default_rng(1)
  den = np.abs(rng.standard_normal(q.shape[:2]))
  den[0, 1] = 0.0                                      # one head with an empty remainder
  rem = tuple(jnp.asarray(x, jnp.float32) for x in
              (rng.standard_normal(q.shape), den, rng.standard_normal(q.shape[:2])))
  check_kernel((q, keys, vals, blen, kept, cnt, thr), remainder=rem,
               config=ga.GatheredAttentionConfig(blocks_per_program=4, steps_in_flight=2))


@pytest.mark.parametrize("programs", [1, 5])
def test_kernel_balanced_split(programs):
  """The balanced split (the default kept-list path): programs sized by the total kept, not
  the capacity: 1 program (one a head), 5 (a head's second program starts mid-window at an
  unaligned entry); counts cap/0/1/random, a head with nothing kept still writes its row;
  kept_max through the same split against its reference."""
  q, keys, vals, blen, kept, cnt, thr = make(b=2, k=2, g=4, n=12, p=16, d=64, cap=7, seed=6)
  cnt = cnt.at[1, 1].set(5)
  thr = thr.at[1].set(jnp.array([-0.1, 0.0, 0.2, MASK_VALUE, 0.1, -0.3, 0.05, 0.4]))
  args = (q, keys, vals, blen, kept, cnt, thr)
  cfg = ga.GatheredAttentionConfig(programs=programs, steps_in_flight=2)
  check_kernel(args, config=cfg)
  mx = ga.kept_max(q, keys, blen, kept, cnt, impl="pallas", config=cfg, interpret=INTERPRET)
  np.testing.assert_allclose(np.asarray(mx), np.asarray(ga.kept_max_reference(
      q, keys, blen, kept, cnt)), rtol=2e-2, atol=2e-2)


def test_kernel_d128_group3_no_remainder():
  """d 128, G 3, P 32, f16, one split covering the whole kept list."""
  args = make(b=2, k=2, g=3, n=9, p=32, d=128, cap=5, dtype=jnp.float16, seed=4)
  check_kernel(args)


@pytest.mark.slow
@pytest.mark.parametrize("g,d,p,dtype", [(1, 128, 16, jnp.bfloat16), (8, 64, 64, jnp.bfloat16),
                                         (4, 128, 32, jnp.bfloat16)])
def test_kernel_more_shapes(g, d, p, dtype):
  args = make(b=2, k=2, g=g, n=10, p=p, d=d, cap=8, dtype=dtype, seed=g)
  check_kernel(args, config=ga.GatheredAttentionConfig(blocks_per_program=4))


def test_select_attention_reference_is_gathered_attention_over_the_blocks_at_the_cut():
  q, keys, vals, blen, _, _, thr = make(b=2, k=2, g=3, n=12, cap=12, dtype=jnp.float32)
  rng = np.random.default_rng(8)
  margin = jnp.asarray(rng.standard_normal((2, 2, 12)), jnp.float32)
  cut = jnp.array([[0.0, -9.0], [9.0, 0.7]], jnp.float32)  # some, all, none, few
  o, lse = ga.select_attention(q, keys, vals, blen, margin, cut, thr, impl="xla")
  m = np.asarray(margin) >= np.asarray(cut)[..., None]
  kept = np.zeros((2, 2, 12), np.int32)
  cnt = m.sum(-1).astype(np.int32)
  for i in np.ndindex(2, 2):
    kept[i][: cnt[i]] = np.nonzero(m[i])[0]
  want = reference(q, keys, vals, blen, jnp.asarray(kept), jnp.asarray(cnt), thr)
  np.testing.assert_allclose(o, want[0], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(lse, want[1], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(ga.select_max(q, keys, blen, margin, cut, impl="xla"),
                             ga.kept_max_reference(q, keys, blen, jnp.asarray(kept),
                                                   jnp.asarray(cnt)), rtol=1e-6)
  # the interleaved order (program s of S reads blocks s, s + S, ...): a permutation of the
  # margins padded with MASK_VALUE, which the references undo
  for cfg in (ga.GatheredAttentionConfig(), ga.GatheredAttentionConfig(4)):
    il = np.asarray(ga.interleave_margins(margin, cfg))
    np.testing.assert_array_equal(np.sort(il[il > -1e29]), np.sort(np.asarray(margin).ravel()))
    got = ga.select_attention(q, keys, vals, blen, jnp.asarray(il), cut, thr, impl="xla",
                              interleaved=True, config=cfg)
    np.testing.assert_array_equal(got[0], o)
    with pytest.raises(ShapeError, match="interleave_margins"):
      ga.select_max(q, keys, blen, margin, cut, impl="xla", interleaved=True, config=cfg)


@pytest.mark.parametrize("dtype,g,d,n,cfg", [
    (jnp.bfloat16, 4, 64, 37, ga.GatheredAttentionConfig()),
    (jnp.float16, 3, 128, 37, ga.GatheredAttentionConfig(8, 2, 2)),
    (jnp.bfloat16, 4, 64, 150, ga.GatheredAttentionConfig(128)),  # 2 steps a range, 2 ranges
])
def test_select_attention_kernel(dtype, g, d, n, cfg):
  """The in-kernel selection: interleaved ranges of blocks (N not a multiple of the range;
  one or two 64-block steps a range), cuts that keep some, all, none and a few blocks,
  partial and empty blocks, the remainder merged; the keys-only max pass. (Margins
  interleaved by the caller: the decode path's test, test_pallas_sparse_decode.)"""
  rng = np.random.default_rng(9)
  b, k, p = 2, 2, 16
  q, keys, vals, blen, _, _, thr = make(b=b, k=k, g=g, n=n, p=p, d=d, cap=4, dtype=dtype)
  blen = blen.at[0, 0, 3].set(0)
  thr = jnp.asarray(rng.standard_normal((b, k * g)) - 1.0, jnp.float32)
  margin = jnp.asarray(rng.standard_normal((b, k, n)), jnp.float32)
  cut = jnp.array([[0.5, -10.0], [10.0, 1.5]], jnp.float32)
  rem = (jnp.asarray(rng.standard_normal((b, k * g, d)), jnp.float32),
         jnp.asarray(np.abs(rng.standard_normal((b, k * g))), jnp.float32),
         jnp.asarray(rng.standard_normal((b, k * g)), jnp.float32))
  with pytest.raises(ShapeError, match="margin"):
    ga.select_attention(q, keys, vals, blen, margin[..., 1:], cut, thr, impl="xla")
  # the remainder once (one block a step, one range step: it merges after the kernel)
  for remainder in (rem,) if cfg.blocks_per_step == 1 and n <= 64 else (None,):
    want = ga.select_attention(q, keys, vals, blen, margin, cut, thr, impl="xla",
                               remainder=remainder, with_counts=True)
    got = ga.select_attention(q, keys, vals, blen, margin, cut, thr, impl="pallas",
                              interpret=INTERPRET, config=cfg, remainder=remainder,
                              with_counts=True)
    assert rel(got[0], want[0]) < TOL[dtype]
    np.testing.assert_allclose(got[1], want[1], atol=TOL[dtype] * 5)
    np.testing.assert_array_equal(got[2], want[2])
  if cfg.blocks_per_step == 2:
    return  # the keys-only pass: with one block a step (it shares the selection above)
  want_max = ga.select_max(q, keys, blen, margin, cut, impl="xla")
  got_max = ga.select_max(q, keys, blen, margin, cut, impl="pallas", interpret=INTERPRET,
                          config=cfg)
  np.testing.assert_allclose(got_max, want_max, atol=TOL[dtype] * 5)



@pytest.mark.gpu
def test_pdl_launch_matches_the_reference():
  """GatheredAttentionConfig(pdl=True): the merge kernel launched as a programmatic dependent
  of the attention kernel (it waits for that grid before reading the partials) gives the
  reference's answer over ragged counts, on enough programs that both grids overlap. GPU only:
  the interpreter runs one grid after the other whatever the flag."""
  q, keys, vals, blen, kept, cnt, thr = make(b=2, k=8, g=4, n=96, p=32, d=128, cap=80, seed=7)
  cfg = ga.GatheredAttentionConfig(pdl=True)
  o, lse = jax.jit(lambda *a: ga.gathered_attention(*a, config=cfg))(
      q, keys, vals, blen, kept, cnt, thr)
  ro, rlse = reference(q, keys, vals, blen, kept, cnt, thr)
  assert rel(o, ro) < TOL[jnp.bfloat16]
  np.testing.assert_allclose(np.asarray(lse), np.asarray(rlse), atol=5e-2)
