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
from alaya_jax.index.cluster import ClusterConfig, ClusterIndex, gathered_attention
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


def test_abstract_matches_build():
    q, k, v, lengths, st = _store(3)
    B, S, K, D = k.shape
    abstract = KVStore.abstract(ICFG, B, S, q.shape[1], K, D, dtype=k.dtype)
    got = jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), st)
    want = jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), abstract)
    assert got == want
    shaped = jax.eval_shape(functools.partial(build_store, config=ICFG, n_heads=q.shape[1]),
                            k, v, lengths)
    assert jax.tree_util.tree_structure(shaped) == jax.tree_util.tree_structure(abstract)


EXACT = Plan.dipr(2.0, index="cluster", sink=3, window=5, delta=float("inf"), return_mask=True)


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
