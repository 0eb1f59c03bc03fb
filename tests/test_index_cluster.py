"""The cluster index: layout invariants, exactness limits, appends, truncation, the kernel contract."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alaya_jax.attention import (IndexConfig, KVStore, Plan, append_kv, build_store,
                                 calibrate_delta, sparse_attention)
from alaya_jax.dipr import dipr_reference, full_attention
from alaya_jax.errors import ConfigError, PlanError
from alaya_jax.index.cluster import (ClusterConfig, ClusterIndex, gathered_attention,
                                    variance_summary)
from alaya_jax.index.synthetic import synthetic_kv

CFG = ClusterConfig(cluster_size=8, block_size=8, iters=4, sink=3, window=5, tail_capacity=16)
ICFG = IndexConfig(cluster=CFG, block=None)

build_jit = jax.jit(build_store, static_argnames=("config", "n_heads"))
attend_jit = jax.jit(sparse_attention, static_argnames=("plan",))
append_jit = jax.jit(append_kv)
dipr_jit = jax.jit(dipr_reference)  # beta, sink, window traced: one compile per shape


@functools.lru_cache(maxsize=None)
def _case(G, B=2, S=61, K=2, D=8, seed=0):
    q, k, v = synthetic_kv(B, S, K * G, K, D, seed=seed)
    lengths = np.array([S, S - 22][:B], np.int32)  # neither a multiple of the block size 8
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(lengths)


def _store(G, config=ICFG, **kw):
    q, k, v, lengths = _case(G, **kw)
    return q, k, v, lengths, build_jit(k, v, lengths, config, n_heads=q.shape[1])


def _member_positions(idx: ClusterIndex):
    pos = np.asarray(idx.positions)
    blen = np.asarray(idx.block_len)
    P = pos.shape[-1]
    occupied = pos >= 0
    np.testing.assert_array_equal(occupied, np.arange(P) < blen[..., None])  # valid prefix
    return pos


def test_every_key_in_exactly_one_block_and_positions_round_trip():
    q, k, v, lengths, st = _store(2)
    idx = st.cluster
    pos = _member_positions(idx)
    B, K = pos.shape[:2]
    for b in range(B):
        end = int(idx.end[b])
        assert end == max(CFG.sink, int(lengths[b]) - CFG.window)
        for kh in range(K):
            p = pos[b, kh][pos[b, kh] >= 0]
            assert sorted(p.tolist()) == list(range(CFG.sink, end))  # each middle key once
            # keys and values sit at their positions' cache entries
            blk, slot = np.nonzero(pos[b, kh] >= 0)
            src = pos[b, kh][blk, slot]
            np.testing.assert_array_equal(np.asarray(idx.keys[b, kh])[blk, slot],
                                          np.asarray(k[b, src, kh]))
            np.testing.assert_array_equal(np.asarray(idx.values[b, kh])[blk, slot],
                                          np.asarray(v[b, src, kh]))
    # a block belongs to one cluster; every non-empty block has a cluster id
    cid = np.asarray(idx.cluster_id)
    assert ((cid >= 0) == (np.asarray(idx.block_len) > 0)).all()


@pytest.mark.parametrize("config", [ICFG, IndexConfig(cluster=dataclasses.replace(
    CFG, var_summary="scalar", super_size=2, summary_dtype="bfloat16"), block=None)],
    ids=["default", "super+bf16"])
def test_abstract_matches_build(config):
    q, k, v, lengths, st = _store(3, config=config)
    B, S, K, D = k.shape
    abstract = KVStore.abstract(config, B, S, q.shape[1], K, D, dtype=k.dtype)
    got = jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), st)
    want = jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), abstract)
    assert got == want
    shaped = jax.eval_shape(functools.partial(build_store, config=config, n_heads=q.shape[1]),
                            k, v, lengths)
    assert jax.tree_util.tree_structure(shaped) == jax.tree_util.tree_structure(abstract)


EXACT = Plan.dipr(2.0, index="cluster", sink=3, window=5, delta=float("inf"), return_mask=True)


def test_block_count_is_a_whole_number_of_kernel_tiles_for_large_indexes():
    """Large indexes get N a multiple of the margins kernel's 64-row tile (no padded copy of
    the centroids per call); small ones keep the blocks they need."""
    for cfg in (ClusterConfig(), ClusterConfig(block_size=32, balance_rounds=4)):
        for S in (131072 + 256, 40000, 1 << 20):
            n = -(-S // cfg.block_size) + cfg.num_clusters(S)
            assert cfg.num_blocks(S) % 64 == 0 and n <= cfg.num_blocks(S) < n + 64
    assert CFG.num_blocks(61) == 8 + 8  # ceil(61 / 8) + ceil(61 / 8) clusters


@pytest.mark.parametrize("summary,tol", [("bfloat16", 2 ** -7), ("float8_e4m3fn", 2 ** -3)])
def test_narrow_summaries_are_stored_narrow_and_follow_appends(summary, tol):
    """summary_dtype="bfloat16" / "float8_e4m3fn" stores centroid and value_mean as bf16 / fp8
    (a half / a quarter of the bytes the centroid scores read): the f32 index's summaries
    rounded, through builds and folds; the abstract tree says so; with an unlimited margin the
    path stays exact."""
    bcfg = IndexConfig(cluster=dataclasses.replace(CFG, summary_dtype=summary), block=None)
    q, k, v, lengths = _case(2)
    B, S, K, D = k.shape
    S_cap = 96
    kc = jnp.zeros((B, S_cap, K, D), k.dtype).at[:, :S].set(k)
    vc = jnp.zeros((B, S_cap, K, D), v.dtype).at[:, :S].set(v)
    st32 = build_jit(kc, vc, lengths, ICFG, n_heads=q.shape[1])
    st16 = build_jit(kc, vc, lengths, bcfg, n_heads=q.shape[1])
    abstract = KVStore.abstract(bcfg, B, S_cap, q.shape[1], K, D, dtype=k.dtype)
    shape_dtype = lambda t: jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), t)
    assert shape_dtype(st16) == shape_dtype(abstract)
    new_k = jnp.asarray(np.random.default_rng(1).normal(size=(B, 23, K, D)), k.dtype)
    end0 = np.asarray(st16.cluster.end)
    for step in range(2):
        for name in ("centroid", "value_mean"):
            a16, a32 = getattr(st16.cluster, name), getattr(st32.cluster, name)
            assert a16.dtype == jnp.dtype(summary) and a32.dtype == jnp.float32
            # the f32 running means differ from the narrow ones only by the rounding of each
            # fold (fp8: after the build only; folds assign appended keys to the nearest
            # rounded centroid, and at 3 mantissa bits some go to another block)
            if step == 0 or summary == "bfloat16":
                np.testing.assert_allclose(np.asarray(a16, np.float32), np.asarray(a32),
                                           rtol=tol, atol=tol)
        o, stats = attend_jit(q, st16, EXACT)
        ref = dipr_jit(q, st16.k, st16.v, 2.0, 3, 5, st16.lengths)
        np.testing.assert_allclose(np.asarray(o), np.asarray(ref.o), atol=2e-5)
        np.testing.assert_array_equal(np.asarray(stats.attended), np.asarray(ref.kept))
        st16, _ = append_jit(st16, new_k, new_k)  # passes tail_capacity: folds
        st32, _ = append_jit(st32, new_k, new_k)
    assert (np.asarray(st16.cluster.end) > end0).all()  # the appends folded into the index


# GQA groups here 1 and 8; 3 and 4 run through the cluster path in the other tests
@pytest.mark.parametrize("G", [1, 8])
def test_unlimited_margin_and_capacity_equals_flat_exactly(G):
    q, k, v, lengths, st = _store(G)
    o, stats = attend_jit(q, st, EXACT)
    ref = dipr_jit(q, k, v, 2.0, 3, 5, lengths)
    np.testing.assert_allclose(np.asarray(o), np.asarray(ref.o), atol=2e-5)
    np.testing.assert_array_equal(np.asarray(stats.attended), np.asarray(ref.kept))
    np.testing.assert_array_equal(np.asarray(stats.keys_attended), np.asarray(ref.kept).sum(-1))
    np.testing.assert_allclose(np.asarray(stats.threshold), np.asarray(ref.threshold), atol=1e-5)
    assert not np.asarray(stats.truncated).any()


def test_output_equals_attention_restricted_to_the_attended_set():
    q, k, v, lengths, st = _store(4)
    plan = Plan.dipr(2.0, index="cluster", sink=3, window=5, delta=0.5, return_mask=True)
    o, stats = attend_jit(q, st, plan)
    from alaya_jax.dipr import masked_attention, scaled_scores
    ref = masked_attention(scaled_scores(q, k), stats.attended, v)
    np.testing.assert_allclose(np.asarray(o), np.asarray(ref.o), atol=2e-5)


def test_clusters_of_one_key_make_the_remainder_estimate_exact():
    cfg = ClusterConfig(cluster_size=1, block_size=1, iters=1, sink=3, window=5, tail_capacity=16)
    q, k, v, lengths, st = _store(3, config=IndexConfig(cluster=cfg, block=None))
    # a tiny margin and capacity: most clusters are unread, estimated from (centroid, mean value)
    plan = Plan.dipr(0.5, index="cluster", sink=3, window=5, delta=0.0, capacity=4, probe=1,
                     remainder=True, attend_read=True)
    o, stats = attend_jit(q, st, plan)
    full = jax.jit(full_attention)(q, k, v, lengths)
    np.testing.assert_allclose(np.asarray(o), np.asarray(full.o), atol=2e-5)
    assert (np.asarray(stats.groups_kept) <= 4).all()


def test_truncation_is_reported():
    q, k, v, lengths, st = _store(2)
    inf = float("inf")
    _, stats = attend_jit(q, st, dataclasses.replace(EXACT, capacity=2))
    assert np.asarray(stats.truncated).all()
    assert (np.asarray(stats.groups_kept) == 2).all()
    assert (np.asarray(stats.groups_needed) > 2).all()
    _, stats = attend_jit(q, st, EXACT)
    assert not np.asarray(stats.truncated).any()
    assert (np.asarray(stats.groups_needed) == np.asarray(stats.groups_kept)).all()


def test_appended_tokens_are_never_lost():
    q, k, v, lengths = _case(2, S=61)
    B, S, K, D = k.shape
    S_cap = 96
    kc = jnp.zeros((B, S_cap, K, D), k.dtype).at[:, :S].set(k)
    vc = jnp.zeros((B, S_cap, K, D), v.dtype).at[:, :S].set(v)
    st = build_jit(kc, vc, lengths, ICFG, n_heads=q.shape[1])
    rng = np.random.default_rng(5)
    new_k = jnp.asarray(rng.normal(size=(B, 30, K, D)), k.dtype)
    new_v = jnp.asarray(rng.normal(size=(B, 30, K, D)), k.dtype)
    # 1 token, then 22: the tail passes tail_capacity (16) and folds several times at once
    for a, b_ in ((0, 1), (1, 23)):
        st, overflow = append_jit(st, new_k[:, a:b_], new_v[:, a:b_])
        assert not np.asarray(overflow).any()
        L = np.asarray(st.lengths)
        end = np.asarray(st.cluster.end)
        assert (L - end <= CFG.tail_capacity).all() and (L - end >= CFG.window).all()
        pos = _member_positions(st.cluster)
        for bb in range(B):
            for kh in range(K):
                p = pos[bb, kh][pos[bb, kh] >= 0]
                assert sorted(p.tolist()) == list(range(CFG.sink, int(end[bb])))
        o, _ = attend_jit(q, st, EXACT)
        ref = dipr_jit(q, st.k, st.v, 2.0, 3, 5, st.lengths)
        np.testing.assert_allclose(np.asarray(o), np.asarray(ref.o), atol=2e-5)
    assert np.asarray(st.lengths).tolist() == [84, 62]
    # past the cache capacity: reported, never silent
    st, overflow = append_jit(st, new_k[:, 1:23], new_v[:, 1:23])
    assert np.asarray(overflow).tolist() == [True, False]


def test_gathered_attention_equals_dense_attention_over_densified_blocks():
    q, k, v, lengths, st = _store(4)
    idx = st.cluster
    B, K, N = idx.block_len.shape
    rng = np.random.default_rng(0)
    cap = 5
    nonempty = [[np.nonzero(np.asarray(idx.block_len[b, kh]) > 0)[0] for kh in range(K)]
                for b in range(B)]
    kept = np.zeros((B, K, cap), np.int32)
    count = np.zeros((B, K), np.int32)
    for b in range(B):
        for kh in range(K):
            ids = rng.choice(nonempty[b][kh], size=3, replace=False)
            n = 3 if kh == 0 else 0 if b == 0 else 1  # a full, an empty and a one-block selection
            kept[b, kh, :n] = ids[:n]
            count[b, kh] = n
    threshold = jnp.asarray(rng.normal(size=(B, q.shape[1])), jnp.float32) * 2
    o, lse = gathered_attention(q, idx.keys, idx.values, idx.block_len, jnp.asarray(kept),
                                jnp.asarray(count), threshold)
    # dense attention over the positional cache, masked to the kept blocks' members >= threshold
    from alaya_jax.dipr import masked_attention, scaled_scores
    s = np.asarray(scaled_scores(q, k))
    G = q.shape[1] // K
    mask = np.zeros(s.shape, bool)
    pos = np.asarray(idx.positions)
    for b in range(B):
        for h in range(q.shape[1]):
            members = pos[b, h // G][kept[b, h // G, :count[b, h // G]]]
            members = members[members >= 0]
            mask[b, h, members] = s[b, h, members] >= float(threshold[b, h])
    ref = masked_attention(jnp.asarray(s), jnp.asarray(mask), v)
    np.testing.assert_allclose(np.asarray(o), np.asarray(ref.o), atol=2e-5)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(ref.lse), rtol=1e-5)
    assert (np.asarray(o)[0, G:2 * G] == 0).all()  # the empty selection returns 0


def test_calibrated_delta_reaches_target_recall_on_its_queries():
    q, k, v, lengths, st = _store(3)
    rng = np.random.default_rng(3)
    queries = [q + jnp.asarray(rng.normal(size=q.shape), q.dtype) for _ in range(3)]
    delta = calibrate_delta(st, queries, beta=2.0, target_recall=0.99)
    assert delta.shape == (q.shape[1],)
    st = st.replace(cluster=st.cluster.replace(delta=delta))
    plan = Plan.dipr(2.0, index="cluster", sink=3, window=5, return_mask=True)
    hit = tot = 0
    for qq in queries:
        _, stats = attend_jit(qq, st, plan)
        ref = dipr_jit(qq, k, v, 2.0, 3, 5, lengths)
        hit += int((np.asarray(stats.attended) & np.asarray(ref.kept)).sum())
        tot += int(np.asarray(ref.kept).sum())
    assert hit / tot >= 0.99


def test_errors():
    with pytest.raises(ConfigError, match="tail_capacity"):
        ClusterConfig(window=64, tail_capacity=64)
    with pytest.raises(ConfigError, match="metric"):
        ClusterConfig(metric="dot")
    q, k, v, lengths, st = _store(2)
    with pytest.raises(PlanError, match="exceed"):
        sparse_attention(q, st, Plan.dipr(1.0, index="cluster", sink=3, window=64))
    with pytest.raises(PlanError, match="block index"):
        sparse_attention(q, st, Plan.quest(2))


def _brute_block_variance(idx, k):
    """Per block, from the members' cache entries: mean over members of |k - c|^2 / D."""
    pos, blen = np.asarray(idx.positions), np.asarray(idx.block_len)
    k = np.asarray(k, np.float64)
    out = np.zeros(blen.shape)
    for b, kh, n in zip(*np.nonzero(blen > 0)):
        x = k[b, pos[b, kh, n, :blen[b, kh, n]], kh]  # [members, D]
        out[b, kh, n] = np.mean(np.square(x - x.mean(0)))
    return out


def _check_super_summaries(idx, k, v):
    """Super summaries equal the pooled statistics of the member keys, brute force (the
    variance by its channel mean: with var_summary="scalar" it is stored rank 1)."""
    pos, blen, sid = (np.asarray(a) for a in (idx.positions, idx.block_len, idx.super_id))
    k, v = np.asarray(k, np.float64), np.asarray(v, np.float64)
    assert ((sid >= 0) == (blen > 0)).all()  # every non-empty block sits in one super-cluster
    for b in range(blen.shape[0]):
        for kh in range(blen.shape[1]):
            for s in range(idx.super_len.shape[-1]):
                members = [pos[b, kh, n, :blen[b, kh, n]] for n in np.nonzero(sid[b, kh] == s)[0]]
                members = np.concatenate(members + [np.zeros((0,), int)]).astype(int)
                assert int(idx.super_len[b, kh, s]) == len(members)
                if not len(members):
                    continue
                x, y = k[b, members, kh], v[b, members, kh]
                np.testing.assert_allclose(idx.super_centroid[b, kh, s], x.mean(0), atol=1e-5)
                np.testing.assert_allclose(idx.super_value_mean[b, kh, s], y.mean(0), atol=1e-5)
                np.testing.assert_allclose(np.mean(idx.super_key_var[b, kh, s]),
                                           np.mean(x.var(0)), rtol=1e-4, atol=1e-6)


# the scalar variance summary and the super level (2 blocks per super-cluster) in one index
SCALAR = dataclasses.replace(CFG, var_summary="scalar", super_size=2)


def _check_scalar_variance(idx, k):
    var = np.asarray(idx.key_var, np.float64)  # [B,K,N,D]
    live = np.asarray(idx.block_len) > 0
    np.testing.assert_allclose(var.mean(-1)[live], _brute_block_variance(idx, k)[live],
                               rtol=1e-3, atol=1e-5)
    scale, profile = (np.asarray(a) for a in variance_summary(idx))
    np.testing.assert_allclose(profile.mean(-1), 1.0, rtol=1e-5)  # one profile per kv head
    np.testing.assert_allclose(var, scale[..., None] * profile[:, :, None, :], rtol=1e-4,
                               atol=1e-7)
    return profile


def test_scalar_variance_summary_is_the_mean_per_key_variance_times_a_profile():
    q, k, v, lengths, st = _store(2, config=IndexConfig(cluster=SCALAR, block=None))
    profile = _check_scalar_variance(st.cluster, k)
    # the profile is the member-weighted pooled per-channel variance (from the channel index)
    _, _, _, _, ch = _store(2)
    n = np.asarray(ch.cluster.block_len, np.float64)
    pooled = np.einsum("bkn,bknd->bkd", n, np.asarray(ch.cluster.key_var, np.float64))
    np.testing.assert_allclose(profile, pooled / pooled.mean(-1, keepdims=True), rtol=1e-4)
    _check_super_summaries(st.cluster, k, v)
    with pytest.raises(ConfigError, match="var_summary"):
        ClusterConfig(var_summary="diag")


def test_scalar_variance_costs_no_row_and_clusters_of_one_key_stay_exact():
    one = ClusterConfig(cluster_size=1, block_size=1, iters=1, sink=3, window=5, tail_capacity=16,
                        var_summary="scalar")
    q, k, v, lengths, st = _store(3, config=IndexConfig(cluster=one, block=None))
    plan = Plan.dipr(0.5, index="cluster", sink=3, window=5, delta=0.0, capacity=4, probe=1,
                     remainder=True, remainder_var=0.5, rank_var=1.0, attend_read=True)
    o, stats = attend_jit(q, st, plan)
    full = jax.jit(full_attention)(q, k, v, lengths)  # one key per cluster: zero variance
    np.testing.assert_allclose(np.asarray(o), np.asarray(full.o), atol=2e-5)
    np.testing.assert_array_equal(np.asarray(stats.rows_scored),
                                  np.sum(np.asarray(st.cluster.block_len) > 0, -1))


def test_opening_every_super_cluster_equals_the_flat_cluster_path():
    q, k, v, lengths, st = _store(2, config=IndexConfig(cluster=SCALAR, block=None))
    flat = st.replace(cluster=st.cluster.replace(  # the same blocks without the super level
        super_id=None, super_len=None, super_centroid=None, super_key_var=None,
        super_value_mean=None))
    NS = st.cluster.super_len.shape[-1]
    plan = Plan.dipr(1.0, index="cluster", sink=3, window=5, delta=0.5, probe=1, remainder=True,
                     remainder_var=0.5, attend_read=True, super_probe=NS, return_mask=True)
    o_s, s_s = attend_jit(q, st, plan)
    o_f, s_f = attend_jit(q, flat, plan)
    np.testing.assert_allclose(np.asarray(o_s), np.asarray(o_f), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(s_s.attended), np.asarray(s_f.attended))
    np.testing.assert_array_equal(np.asarray(s_s.rows_scored) - np.asarray(s_f.rows_scored),
                                  np.sum(np.asarray(st.cluster.super_len) > 0, -1))
    # one super-cluster opened per head (and no DIPR rule): fewer rows, and only the blocks of
    # the opened super-clusters are read; the attended set is still exact over what was read
    o1, s1 = attend_jit(q, st, dataclasses.replace(plan, super_probe=1, delta=-100.0))
    assert (np.asarray(s1.rows_scored) < np.asarray(s_s.rows_scored)).all()
    idx = st.cluster
    sc = np.einsum("bkgd,bksd->bkgs", np.asarray(q).reshape(2, 2, 2, -1),
                   np.asarray(idx.super_centroid))
    sc = np.where(np.asarray(idx.super_len)[:, :, None] > 0, sc, -np.inf)
    pos, sid, end = np.asarray(idx.positions), np.asarray(idx.super_id), np.asarray(idx.end)
    att = np.asarray(s1.attended)
    for b in range(2):
        for kh in range(2):
            opened = set(np.argmax(sc[b, kh], -1).tolist())  # the best super of each head
            allowed = np.zeros(att.shape[-1], bool)
            allowed[:3] = True
            allowed[end[b]:] = True
            for n in np.nonzero(np.isin(sid[b, kh], list(opened)))[0]:
                allowed[pos[b, kh, n][pos[b, kh, n] >= 0]] = True
            assert not (att[b, 2 * kh:2 * kh + 2] & ~allowed).any()


def test_scalar_variance_and_super_level_follow_appends():
    q, k, v, lengths = _case(2)
    B, S, K, D = k.shape
    kc = jnp.zeros((B, 96, K, D), k.dtype).at[:, :S].set(k)
    vc = jnp.zeros((B, 96, K, D), v.dtype).at[:, :S].set(v)
    st = build_jit(kc, vc, lengths, IndexConfig(cluster=SCALAR, block=None), n_heads=q.shape[1])
    new = jnp.asarray(np.random.default_rng(9).normal(size=(2, B, 23, K, D)), k.dtype)
    st, _ = append_jit(st, new[0], new[1])  # folds the tail into the blocks
    assert (np.asarray(st.cluster.end) > np.asarray(lengths) - CFG.window).all()
    _check_scalar_variance(st.cluster, st.k)  # the scalar's running update is exact
    _check_super_summaries(st.cluster, st.k, st.v)
    abstract = ClusterIndex.abstract(SCALAR, B, 96, q.shape[1], K, D, k.dtype)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), abstract) == jax.tree.map(
        lambda a: (a.shape, a.dtype), st.cluster)
