"""The cluster DIPR path on the Mosaic GPU kernels (`alaya_jax.pallas.sparse_decode`) against
the jnp path of `attention.sparse_attention` on the same store and plan: outputs within bf16
rounding, stats equal. In jax's GPU interpreter on the CPU, natively on a GPU.

Each interpreter kernel compiles for several seconds on the CPU, so each test packs its
conditions into few kernel shapes: batch 2 with different lengths, kept counts that differ
across sequences and kv heads (ragged, truncated by the capacity), none and all kept.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alaya_jax.attention import IndexConfig, Plan, build_store_jit, sparse_attention_jit
from alaya_jax.errors import ConfigError
from alaya_jax.index.cluster import ClusterConfig
from alaya_jax.index.synthetic import synthetic_kv
from alaya_jax.pallas import gathered_attention as ga
from alaya_jax.pallas import sparse_decode as sd

ON_GPU = jax.default_backend() == "gpu"
INTERPRET = not ON_GPU
TOL = 2e-2  # bf16 keys and values; the kernels cast q to bf16 for the products
DELTA_RAGGED = 30.0  # with capacity 12: kept 12, 12, 8, 11 of needed 18, 14, 8, 11


# jitted whole: eager ops racing the interpreter's callbacks deadlocked the CPU client
_pallas_jit = jax.jit(sd.sparse_attention_pallas, static_argnames=("plan", "config", "interpret"))
# One split per kv head: the interpreter runs each program serially, so few programs is fast.
CONFIG = sd.SparseDecodeConfig(select="radix",
                               attention=ga.GatheredAttentionConfig(blocks_per_program=16))
# The grid select, whose cut the attention kernel selects against (in_kernel)
BINS = dataclasses.replace(CONFIG, select="bins")
# A capacity that truncates some kv heads, the probe's forced blocks
RAGGED_PLAN = Plan.dipr(4.0, "cluster", sink=4, window=32, probe=2, delta=DELTA_RAGGED,
                        capacity=12)


@pytest.fixture(scope="module")
def data():
    """A bf16 store (2 kv heads, lengths 320 and 203) with a cluster index over structured
    keys, and bf16-exact queries of 8 heads (G = 4); heads 0 and 4 alone give G = 1."""
    B, S, H, K, D = 2, 320, 8, 2, 64
    q, k, v = synthetic_kv(B, S, H, K, D, seed=0)
    k, v = jnp.asarray(k, jnp.bfloat16), jnp.asarray(v, jnp.bfloat16)
    q = jnp.asarray(q, jnp.bfloat16).astype(jnp.float32)
    cfg = ClusterConfig(cluster_size=16, block_size=32, sink=4, window=32, tail_capacity=64)
    store = build_store_jit(k, v, jnp.asarray([320, 203], jnp.int32),
                            IndexConfig(cluster=cfg, block=None), n_heads=H)
    return q, store


def run_both(q, store, plan):
    o_ref, st_ref = sparse_attention_jit(q, store, dataclasses.replace(plan, impl="xla"))
    o, st = _pallas_jit(q, store, plan, config=CONFIG, interpret=INTERPRET)
    return (o, st), (o_ref, st_ref)


def assert_same(got, want):
    (o, st), (o_ref, st_ref) = got, want
    o, o_ref = np.asarray(o, np.float64), np.asarray(o_ref, np.float64)
    assert np.all(np.isfinite(o))
    err = np.linalg.norm(o - o_ref) / np.linalg.norm(o_ref)
    assert err < TOL, err
    for name in ("keys_attended", "keys_read", "rows_scored", "groups_kept", "groups_needed",
                 "truncated", "context"):
        np.testing.assert_array_equal(np.asarray(getattr(st, name)),
                                      np.asarray(getattr(st_ref, name)), err_msg=name)
    np.testing.assert_allclose(np.asarray(st.threshold), np.asarray(st_ref.threshold),
                               rtol=1e-4, atol=1e-4)


def test_gqa4_probe_threshold_capacity_remainder(data):
    """G = 4: the probe, the DIPR threshold from the keys-only pass, a capacity that truncates
    some kv heads and not others, with and without the remainder estimate."""
    q, store = data
    plan = Plan.dipr(4.0, "cluster", sink=4, window=32, probe=2, delta=DELTA_RAGGED, capacity=12)
    got, want = run_both(q, store, plan)
    kept = np.asarray(want[1].groups_kept)
    needed = np.asarray(want[1].groups_needed)
    assert (needed > kept).any() and (needed == kept).any(), (kept, needed)  # ragged, truncated
    assert len(set(kept.ravel().tolist())) > 1
    assert_same(got, want)
    assert_same(*run_both(q, store, dataclasses.replace(plan, remainder=True, remainder_var=0.5)))
    # one_pass: threshold m' - beta, no keys-only pass; probe 0 so that m' (the exact region's
    # max) is below the max read and the kernel's mask is tested off the exact threshold
    one = dataclasses.replace(plan, one_pass=True, probe=0)
    got, want = run_both(q, store, one)
    exact = sparse_attention_jit(q, store, dataclasses.replace(one, one_pass=False, impl="xla"))[1]
    assert (np.asarray(want[1].keys_attended) > np.asarray(exact.keys_attended)).any()
    assert_same(got, want)


@pytest.mark.parametrize("summary", ["bfloat16", "float8_e4m3fn"])
def test_16_and_8_bit_summaries(data, summary):
    """Centroids stored in bf16 or fp8 (ClusterConfig.summary_dtype), read by the margins
    kernel (G = 4, probe 0): the same answers as the jnp path."""
    q, store = data
    cfg = dataclasses.replace(store.cluster.config, summary_dtype=summary)
    store = build_store_jit(store.k, store.v, store.lengths, IndexConfig(cluster=cfg, block=None),
                            n_heads=q.shape[1])
    assert store.cluster.centroid.dtype == jnp.dtype(summary)
    plan = Plan.dipr(4.0, "cluster", sink=4, window=32, probe=0, delta=2.0)
    got, want = run_both(q, store, plan)
    assert 0 < np.asarray(want[1].groups_kept).sum() < np.asarray(store.cluster.block_len > 0).sum()
    assert_same(got, want)


def test_gqa1_margins_kernel_none_and_all_kept(data):
    """G = 1 through the score_select margins kernel (probe 0, no remainder): every block kept
    (delta = inf) and none kept (a negative delta no block reaches), attending all read keys."""
    q, store = data
    q = q[:, ::4]  # heads 0 and 4: one per kv head
    plan = Plan.dipr(4.0, "cluster", sink=4, window=32, probe=0, attend_read=True,
                     delta=float("inf"))
    got, want = run_both(q, store, plan)
    nonempty = np.asarray((store.cluster.block_len > 0).sum(-1))
    np.testing.assert_array_equal(np.asarray(want[1].groups_kept), nonempty)
    assert_same(got, want)
    got, want = run_both(q, store, dataclasses.replace(plan, delta=-1e4))
    assert np.all(np.asarray(want[1].groups_kept) == 0)
    assert_same(got, want)


def test_in_kernel_selection_equals_the_compacted_list(data):
    """select="bins": the attention kernel selecting its blocks against the cut (in_kernel)
    answers as the compaction path on the same set (a truncating capacity with the probe's
    forced blocks; the keys-only threshold pass; the remainder over the unread blocks), whose
    cut from the cut kernel equals the XLA cut's, and as the jnp path where no capacity binds
    (one_pass)."""
    q, store = data
    inside = BINS
    compacted = dataclasses.replace(inside, in_kernel=False)  # the cut kernel's cut
    xla_cut = dataclasses.replace(compacted, cut_kernel=False)  # the cut in XLA
    base = dataclasses.replace(RAGGED_PLAN, remainder=True)
    got = _pallas_jit(q, store, base, config=inside, interpret=INTERPRET)
    want = _pallas_jit(q, store, base, config=compacted, interpret=INTERPRET)
    assert (np.asarray(want[1].groups_needed) > np.asarray(want[1].groups_kept)).any()
    assert_same(got, want)
    assert_same(want, _pallas_jit(q, store, base, config=xla_cut, interpret=INTERPRET))
    jaxpr = str(jax.make_jaxpr(functools.partial(
        sd.sparse_attention_pallas, plan=base, config=compacted, interpret=INTERPRET))(q, store))
    assert "alaya_top_cut" in jaxpr and "alaya_select_attention" not in jaxpr
    plan = dataclasses.replace(base, capacity=None, delta=2.0, remainder=False, one_pass=True)
    got = _pallas_jit(q, store, plan, config=inside, interpret=INTERPRET)
    assert_same(got, sparse_attention_jit(q, store, dataclasses.replace(plan, impl="xla")))


def test_top_cap_mask_matches_top_k():
    """The radix select keeps the set lax.top_k keeps: ties, forced rows, few passing, -0.0."""
    rng = np.random.default_rng(0)
    m = rng.normal(0, 2, (6, 300)).astype(np.float32)
    m[1, :40] = 1.5  # ties at the cut
    m[2, ::7] = 1e30  # forced
    m[3] = -np.abs(m[3])  # none passing
    m[3, :3] = [0.0, -0.0, 2.0]
    m[4, :] = np.round(m[4], 1)  # many ties
    for cap in (1, 5, 37, 300):
        keep, needed = jax.jit(sd.top_cap_mask, static_argnums=1)(jnp.asarray(m), cap)
        vals, ids = jax.lax.top_k(jnp.asarray(m + 0.0), cap)
        want = np.zeros(m.shape, bool)
        for r in range(m.shape[0]):
            want[r, np.asarray(ids[r])[np.asarray(vals[r]) >= 0]] = True
        np.testing.assert_array_equal(np.asarray(keep), want, err_msg=f"cap {cap}")
        np.testing.assert_array_equal(np.asarray(needed), (m >= 0).sum(-1))


def test_top_cap_bins_keeps_a_near_full_top_set():
    """The grid select: all passing rows when they fit; else a top set of at most cap rows,
    short of cap only by rows within one grid step (best / 32**2) of the cut; forced rows
    (margin 1e30) first; more than cap ties at the best all kept."""
    rng = np.random.default_rng(1)
    m = rng.normal(0, 2, (7, 300)).astype(np.float32)
    m[1, :40] = 1.5  # ties
    m[2, ::7] = 1e30  # forced
    m[3] = -np.abs(m[3])  # none passing
    m[4, :] = np.round(m[4], 1)  # many ties
    m[5, :] = np.abs(m[5]) * 1e-3 + 50.0  # all passing, packed in a narrow band far from 0
    m[6, :60] = 3.0  # 60 ties at the best, the rest below 0
    m[6, 60:] = -1.0
    fn = jax.jit(sd.top_cap_bins, static_argnums=1)
    for cap in (1, 5, 37, 299, 300):
        keep, needed = map(np.asarray, fn(jnp.asarray(m), cap))
        np.testing.assert_array_equal(needed, (m >= 0).sum(-1))
        for r in range(m.shape[0]):
            passing = m[r] >= 0
            k = keep[r]
            assert not np.any(k & ~passing), (cap, r)
            if passing.sum() <= cap:
                np.testing.assert_array_equal(k, passing, err_msg=f"cap {cap} row {r}")
                continue
            best = m[r][passing & (m[r] < 1e29)].max()
            v = np.where(passing, np.minimum(m[r], best), -1.0)
            if (v == best).sum() > cap:  # ties at the best overflow: all of them
                np.testing.assert_array_equal(k, v == best, err_msg=f"cap {cap} row {r}")
                continue
            assert 1 <= k.sum() <= cap, (cap, r, k.sum())
            assert v[k].min() > v[~k].max(), (cap, r)  # a top set
            assert np.all(k[m[r] >= 1e29]), (cap, r)  # forced rows kept
            x_next = np.sort(v)[::-1][cap]  # the best row that cannot fit
            assert k.sum() >= (v >= x_next + 1.001 * best / 32**2).sum(), (cap, r, k.sum())
        # without forced rows, the forced=False form (fewer kernels) picks the same set
        free = np.delete(m, 2, axis=0)
        keep_f, needed_f = jax.jit(functools.partial(sd.top_cap_bins, forced=False),
                                   static_argnums=1)(jnp.asarray(free), cap)
        np.testing.assert_array_equal(np.asarray(keep_f), np.delete(keep, 2, axis=0))
        np.testing.assert_array_equal(np.asarray(needed_f), np.delete(needed, 2, axis=0))


def test_dispatch(data):
    q, store = data
    with pytest.raises(ConfigError):
        Plan.dipr(4.0, impl="triton")
    plan = Plan.dipr(4.0, "cluster", sink=4, window=32, rank_std=1.0)
    assert "rank_std" in sd.kernel_supports(q, store, plan)
    if not ON_GPU:
        with pytest.raises(NotImplementedError):
            sparse_attention_jit(q, store, dataclasses.replace(plan, rank_std=0.0, impl="pallas"))
    assert sd.kernel_supports(q, store, Plan.dipr(4.0, "cluster", window=32)) is None


def test_exact_region_kernel_answers_one_pass_and_attend_read(data):
    """one_pass / attend_read plans run the exact region in its kernel (`exact_attention`,
    visible in the jaxpr) where the shapes allow, and answer as the jnp path; the exact
    threshold plan, and exact_kernel=False, keep the XLA form."""
    q, store = data
    plan = Plan.dipr(4.0, "cluster", sink=4, window=32, probe=2, delta=2.0, one_pass=True)
    jaxpr = lambda p, c: str(jax.make_jaxpr(functools.partial(
        sd.sparse_attention_pallas, plan=p, config=c, interpret=INTERPRET))(q, store))
    assert "alaya_exact_attention" in jaxpr(plan, CONFIG)
    assert "alaya_exact_attention" in jaxpr(dataclasses.replace(plan, one_pass=False,
                                                                attend_read=True), CONFIG)
    assert "alaya_exact_attention" not in jaxpr(dataclasses.replace(plan, one_pass=False),
                                                CONFIG)
    assert "alaya_exact_attention" not in jaxpr(plan, dataclasses.replace(CONFIG,
                                                                          exact_kernel=False))
    assert_same(*run_both(q, store, plan))


def test_in_kernel_selection_cut_kernel_equals_the_xla_cut(data):
    """The grid select's cut in one kernel (`top_cut`, SparseDecodeConfig.cut_kernel) where a
    capacity binds: the same answer and stats as the XLA cut, and the kernel in the jaxpr."""
    q, store = data
    with_kernel = BINS
    xla_cut = dataclasses.replace(with_kernel, cut_kernel=False)
    plan = dataclasses.replace(RAGGED_PLAN, one_pass=True)
    jaxpr = str(jax.make_jaxpr(functools.partial(
        sd.sparse_attention_pallas, plan=plan, config=with_kernel, interpret=INTERPRET))(q, store))
    assert "alaya_top_cut" in jaxpr
    got = _pallas_jit(q, store, plan, config=with_kernel, interpret=INTERPRET)
    want = _pallas_jit(q, store, plan, config=xla_cut, interpret=INTERPRET)
    assert (np.asarray(want[1].groups_needed) > np.asarray(want[1].groups_kept)).any()
    assert_same(got, want)


def test_probe0_plans_take_the_margins_threshold_in_the_kernel(data):
    """Probe 0 with the exact region's kernel: m' goes from that kernel straight into the
    margins kernel (beta and delta subtracted there, no XLA threshold): the jnp path's answer
    and stats for one_pass (a binding capacity, the index's per-head delta) and attend_read."""
    q, store = data
    for plan in (Plan.dipr(4.0, "cluster", sink=4, window=32, probe=0, capacity=12,
                           one_pass=True),
                 Plan.dipr(4.0, "cluster", sink=4, window=32, probe=0, delta=2.0,
                           attend_read=True)):
        jaxpr = str(jax.make_jaxpr(functools.partial(
            sd.sparse_attention_pallas, plan=plan, config=BINS, interpret=INTERPRET))(q, store))
        assert "alaya_block_margins" in jaxpr and "alaya_exact_attention" in jaxpr
        o_ref, st_ref = sparse_attention_jit(q, store, dataclasses.replace(plan, impl="xla"))
        assert_same(_pallas_jit(q, store, plan, config=BINS, interpret=INTERPRET),
                    (o_ref, st_ref))
