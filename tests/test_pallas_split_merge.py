"""The merge of split-attention partials: the jnp reference against whole-row softmax attention
(a row's keys split into chunks, each chunk's normalized partial computed alone), and the
Mosaic GPU kernel against the reference (the GPU interpreter on the CPU, natively on a GPU)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alaya_jax.errors import ShapeError
from alaya_jax.pallas import split_merge as sm
from alaya_jax.pallas._mgpu import EMPTY_LSE

INTERPRET = jax.default_backend() != "gpu"


def partials(bk, s, g, d, count, seed=0, keys_per_split=5):
  """Per (head, query row): keys split into s chunks; partial j = softmax attention over
  chunk j alone (o_j normalized, lse_j), chunks at or past count[head] left out of the whole
  row's softmax (whole = (o, lse) over the counted chunks, in float64; none counted: o 0,
  lse EMPTY_LSE) and filled with NaN."""
  rng = np.random.default_rng(seed)
  sc = rng.standard_normal((bk, s, g, keys_per_split)) * 3
  sc[0, 1] = -60.0  # a split whose keys carry almost no mass
  v = rng.standard_normal((bk, s, keys_per_split, d))
  mx = sc.max(-1, keepdims=True)
  e = np.exp(sc - mx)
  o_part = np.einsum("bsgk,bskd->bsgd", e, v) / e.sum(-1)[..., None]
  lse_part = mx[..., 0] + np.log(e.sum(-1))                       # [bk, s, g]
  live = np.arange(s)[None, :] < np.asarray(count)[:, None]       # [bk, s]
  m = np.max(np.where(live[..., None, None], sc, -np.inf), axis=(1, 3))  # [bk, g]
  ew = np.where(live[..., None, None], np.exp(sc - m[:, None, :, None]), 0.0)
  whole_l = ew.sum(axis=(1, 3))
  some = whole_l > 0  # a head with no counted partial: o 0, lse EMPTY_LSE
  safe_l = np.where(some, whole_l, 1.0)
  whole_o = np.einsum("bsgk,bskd->bgd", np.nan_to_num(ew), v) / safe_l[..., None]
  whole_lse = np.where(some, np.where(some, m, 0.0) + np.log(safe_l), EMPTY_LSE)
  o_part[~live] = np.nan
  lse_part[~live] = np.nan
  return o_part, lse_part, (whole_o, whole_lse)


def lb(lse_part, w):
  return np.broadcast_to(lse_part[..., None], lse_part.shape + (w,)).copy()


def test_merge_width():
  assert sm.merge_width(4, 128, 33) == 32
  assert sm.merge_width(8, 128, 33) == 16
  assert sm.merge_width(1, 128, 9) == 128
  assert sm.merge_width(3, 128, 9) == 128
  assert sm.merge_width(1, 64, 9) is None       # G*D < 128: no warpgroup layout
  assert sm.merge_width(3, 64, 9) is None
  assert sm.merge_width(4, 128, 100000) is None  # the partials overflow shared memory


def test_reference_is_whole_row_softmax():
  count = np.array([7, 3, 1, 7])
  o_part, lse_part, (o, lse) = partials(4, 7, 4, 64, count)
  got_o, got_lse = sm.merge_partials(jnp.asarray(o_part, jnp.float32),
                                     jnp.asarray(lb(lse_part, 16), jnp.float32),
                                     jnp.asarray(count, jnp.int32), impl="xla")
  np.testing.assert_allclose(np.asarray(got_o), o, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(got_lse), lse, rtol=1e-5, atol=1e-5)


def test_empty_partials_merge_to_empty():
  """Heads whose partials are all empty (o 0, lse EMPTY_LSE) give o 0, lse EMPTY_LSE."""
  o_part = jnp.zeros((2, 3, 4, 64), jnp.float32)
  lbp = jnp.full((2, 3, 4, 16), EMPTY_LSE, jnp.float32)
  o, lse = sm.merge_partials(o_part, lbp, jnp.array([3, 1], jnp.int32), impl="xla")
  assert np.all(np.asarray(o) == 0.0) and np.all(np.asarray(lse) == EMPTY_LSE)


@pytest.mark.parametrize("g,d,s,count", [
    (4, 128, 9, [9, 1, 6, 0, 9]),   # W 32: 4 programs a head; counts all, 1, ragged, none
    (3, 128, 5, [2, 5, 4]),          # W 128, 3 values a thread; count 2 of 5
    (8, 64, 70, [70, 33, 32, 64]),   # W 16: 70 partials, 18 loop steps of 4 (a count at a
                                     # step's edge, one past it)
])
def test_kernel_matches_reference(g, d, s, count):
  """Kernel vs reference and vs the whole-row softmax; rows past the count are NaN (never
  written in the attention kernel's balanced split) and must not leak; a head with one
  empty partial among live ones."""
  bk = len(count)
  o_part, lse_part, (o, lse) = partials(bk, s, g, d, count, seed=g)
  w = sm.merge_width(g, d, s)
  args = (jnp.asarray(o_part, jnp.float32), jnp.asarray(lb(lse_part, w), jnp.float32),
          jnp.asarray(count, jnp.int32))
  got = sm.merge_partials(*args, impl="pallas", interpret=INTERPRET)
  want = sm.merge_partials(*args, impl="xla")
  for a, b in zip(got, want):
    assert np.all(np.isfinite(np.asarray(a)))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(np.asarray(got[0]), o, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(got[1]), lse, rtol=1e-4, atol=1e-4)


def test_bad_shapes_raise():
  o = jnp.zeros((2, 3, 4, 128), jnp.float32)
  with pytest.raises(ShapeError, match="W = merge_width"):
    sm.merge_partials(o, jnp.zeros((2, 3, 4, 16), jnp.float32), jnp.ones((2,), jnp.int32),
                      impl="pallas", interpret=True)
  with pytest.raises(ShapeError, match="count"):
    sm.merge_partials(o, jnp.zeros((2, 3, 4, 32), jnp.float32), jnp.ones((3,), jnp.int32),
                      impl="xla")
