"""The capacity's cut as one Mosaic GPU kernel (`top_cut.top_cap_cut_mgpu`) against the XLA
form `sparse_decode.top_cap_cut` (the CPU interpreter: the same cut; natively on a GPU the
same up to an edge's rounding), over rows with ties, forced blocks, none passing, all passing
in a narrow band, and capacities from 1 to all."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alaya_jax.pallas import sparse_decode as sd
from alaya_jax.pallas import top_cut as tc

INTERPRET = jax.default_backend() != "gpu"


def margins(n=300, seed=1, forced=True):
  rng = np.random.default_rng(seed)
  m = rng.normal(0, 2, (7, n)).astype(np.float32)
  m[1, :40] = 1.5  # ties
  m[2, ::7] = 1e30 if forced else 5.0  # forced
  m[3] = -np.abs(m[3])  # none passing
  m[4, :] = np.round(m[4], 1)  # many ties
  m[5, :] = np.abs(m[5]) * 1e-3 + 50.0  # all passing, packed in a narrow band far from 0
  m[6, :60] = 3.0  # 60 ties at the best, the rest below 0
  m[6, 60:] = -1.0
  return m


@pytest.mark.parametrize("n,forced", [(300, True), (300, False), (1100, True), (576, True)])
def test_kernel_matches_the_xla_cut(n, forced):
  m = jnp.asarray(margins(n, seed=n, forced=forced))
  for cap in (1, 5, 37, n - 1, n):
    cut, needed = tc.top_cap_cut_mgpu(m, cap, forced=forced, interpret=INTERPRET)
    want_cut, want_needed = jax.jit(sd.top_cap_cut, static_argnums=(1, 2, 3, 4))(
        m, cap, tc.BINS, tc.ROUNDS, forced)
    np.testing.assert_array_equal(np.asarray(needed), np.asarray(want_needed))
    kept = np.asarray(m >= cut[:, None]).sum(-1)
    want_kept = np.asarray(m >= want_cut[:, None]).sum(-1)
    if INTERPRET:  # the same arithmetic: the same cut
      np.testing.assert_array_equal(np.asarray(cut), np.asarray(want_cut), err_msg=f"cap {cap}")
    else:  # an edge may round differently: within a few blocks, and never over when it fits
      assert np.abs(kept - want_kept).max() <= 3, (cap, kept, want_kept)
      assert np.all((kept <= cap) | (want_kept > cap)), (cap, kept)


@pytest.mark.parametrize("n", [300, 4096])
def test_default_grid_has_the_xla_forms_levels(n):
  """The kernel's default grid (4 bins, 5 rounds) and the XLA form's (32 bins, 2 rounds) are
  the same 1024 levels over (0, best]: the same kept sets wherever no margin lies within
  rounding of a level (random margins), and cuts equal up to that rounding."""
  assert tc.BINS ** tc.ROUNDS == 32 ** 2
  m = jnp.asarray(np.random.default_rng(n).normal(0, 2, (6, n)).astype(np.float32))
  for cap in (1, 7, n // 20, n // 3):
    cut, needed = tc.top_cap_cut_mgpu(m, cap, interpret=INTERPRET)
    want_cut, want_needed = jax.jit(sd.top_cap_cut, static_argnums=(1, 2, 3, 4))(
        m, cap, 32, 2, True)
    np.testing.assert_array_equal(np.asarray(needed), np.asarray(want_needed))
    np.testing.assert_allclose(np.asarray(cut), np.asarray(want_cut), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(m >= cut[:, None]).sum(-1),
                                  np.asarray(m >= want_cut[:, None]).sum(-1), err_msg=f"{cap}")


def test_rows_past_shared_memory_are_refused():
  assert tc.kernel_supports(tc.MAX_BLOCKS) is None
  assert "shared memory" in tc.kernel_supports(tc.MAX_BLOCKS + 1)


@pytest.mark.parametrize("bins,rounds", [(8, 2), (16, 2), (64, 2), (32, 2), (2, 7)])
def test_other_grids_match_the_xla_cut(bins, rounds):
  m = jnp.asarray(margins(700, seed=bins))
  for cap in (3, 100):
    cut, needed = tc.top_cap_cut_mgpu(m, cap, bins=bins, rounds=rounds, interpret=INTERPRET)
    want_cut, want_needed = jax.jit(sd.top_cap_cut, static_argnums=(1, 2, 3, 4))(
        m, cap, bins, rounds, True)
    np.testing.assert_array_equal(np.asarray(needed), np.asarray(want_needed))
    kept = np.asarray(m >= cut[:, None]).sum(-1)
    want_kept = np.asarray(m >= want_cut[:, None]).sum(-1)
    assert np.abs(kept - want_kept).max() <= (0 if INTERPRET else 3), (bins, rounds, cap)

