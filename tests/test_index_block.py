"""The block (Quest) index: a true upper bound, exact DIPR through it, appends, Quest selection."""

import jax
import jax.numpy as jnp
import numpy as np

from alaya_jax.attention import IndexConfig, Plan, append_kv, build_store, sparse_attention
from alaya_jax.dipr import dipr_reference, scaled_scores
from alaya_jax.index.block import BlockConfig, build_block_index, page_upper_bounds
from alaya_jax.index.synthetic import synthetic_kv

ICFG = IndexConfig(cluster=None, block=BlockConfig(page_size=8))
attend_jit = jax.jit(sparse_attention, static_argnames=("plan",))
dipr_jit = jax.jit(dipr_reference)  # beta, sink, window traced: one compile per shape


def _case(G=3, B=2, S=45, K=2, D=16):
    q, k, v = synthetic_kv(B, S, K * G, K, D, seed=1)
    lengths = jnp.asarray([S, 19], jnp.int32)  # not multiples of the page size
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), lengths


def test_upper_bound_covers_every_key_of_the_page():
    q, k, v, lengths = _case()
    idx = build_block_index(k, lengths, BlockConfig(8))
    ub = np.asarray(page_upper_bounds(q, idx))  # [B,H,N]
    s = np.asarray(scaled_scores(q, k))  # [B,H,S]
    for b in range(2):
        L = int(lengths[b])
        for i in range(L):
            assert (ub[b, :, i // 8] >= s[b, :, i] - 1e-4).all()
        assert (ub[b, :, -(-L // 8):] < -1e29).all()  # pages past the length are empty


def test_dipr_through_the_bound_is_exact():
    q, k, v, lengths = _case()
    st = jax.jit(build_store, static_argnames="config")(k, v, lengths, ICFG)
    plan = Plan.dipr(1.5, index="block", sink=2, window=4)  # delta 0: the bound is exact
    o, stats = attend_jit(q, st, plan)
    ref = dipr_jit(q, k, v, 1.5, 2, 4, lengths)
    np.testing.assert_allclose(np.asarray(o), np.asarray(ref.o), atol=2e-5)
    np.testing.assert_array_equal(np.asarray(stats.keys_attended), np.asarray(ref.kept).sum(-1))


def test_append_equals_rebuild():
    q, k, v, lengths = _case()
    B, S, K, D = k.shape
    st = build_store(k, v, lengths - 5, ICFG)
    st, overflow = append_kv(st, k[:, 14:19], v[:, 14:19])  # refill positions 14..18 of seq 1
    rebuilt = build_block_index(st.k, st.lengths, BlockConfig(8))
    assert not np.asarray(overflow).any()
    np.testing.assert_allclose(np.asarray(st.block.kmin), np.asarray(rebuilt.kmin))
    np.testing.assert_allclose(np.asarray(st.block.kmax), np.asarray(rebuilt.kmax))


def test_quest_reads_the_top_pages_by_the_bound():
    # hand-made: one kv head, D=2, q = (sqrt(2), 0): score = k[0]; pages of 2 tokens
    k = np.zeros((1, 12, 1, 2), np.float32)
    k[0, :, 0, 0] = [0, 0, 1, 9, 0, 5, 2, 2, 7, 0, 0, 0]  # pages: 0:[0,0] 1:[1,9] 2:[0,5] 3:[2,2] 4:[7,0] 5:[0,0]
    v = np.ones_like(k)
    q = jnp.asarray([[[np.sqrt(2.0), 0.0]]], jnp.float32)
    st = build_store(jnp.asarray(k), jnp.asarray(v), jnp.asarray([12]),
                     IndexConfig(cluster=None, block=BlockConfig(2)))
    plan = Plan.quest(2, sink=0, window=2, return_mask=True)
    _, stats = attend_jit(q, st, plan)
    # middle = pages 0..4 (page 5 is the window); top 2 by max: page 1 (9) and page 4 (7)
    assert np.nonzero(np.asarray(stats.attended[0, 0]))[0].tolist() == [2, 3, 8, 9, 10, 11]
    assert int(stats.groups_kept[0, 0]) == 2
