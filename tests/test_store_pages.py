"""The store's pieces without a model: the radix tree, the page allocator, the page functions."""

import jax.numpy as jnp
import numpy as np
import pytest

from alaya_jax.errors import PoolFullError
from alaya_jax.store import pages as pg
from alaya_jax.store.radix import RadixTree


def test_radix_longest_prefix_inside_edges_and_after_removal():
    t = RadixTree()
    t.insert("a", [1, 2, 3, 4, 5, 6])
    t.insert("b", [1, 2, 3, 9, 9])
    t.insert("c", [7, 8])
    assert t.match([1, 2, 3, 4, 5, 6, 7]) == (6, {"a"})
    assert t.match([1, 2, 3, 4, 0]) == (4, {"a"})  # stops inside a's edge
    assert t.match([1, 2, 3, 0]) == (3, {"a", "b"})  # the split point: both hold it
    assert t.match([1, 2]) == (2, {"a", "b"})
    assert t.match([5]) == (0, set())
    assert t.match([]) == (0, set())
    t.insert("d", [1, 2])  # ends at an existing edge's middle: splits it
    assert t.match([1, 2, 7]) == (2, {"a", "b", "d"})
    t.remove("a")
    assert t.match([1, 2, 3, 4, 5]) == (3, {"b"})
    t.insert("b", [1, 2, 3, 9, 9, 10])  # grows: same owner, longer sequence
    assert t.match([1, 2, 3, 9, 9, 10, 11]) == (6, {"b"})
    t.insert("b", [4, 4])  # replaced by an unrelated sequence
    assert t.match([1, 2, 3]) == (2, {"d"})
    for o in ("b", "c", "d"):
        t.remove(o)
    assert not t.root.children and len(t) == 0


def test_radix_against_brute_force():
    rng = np.random.default_rng(0)
    t, seqs = RadixTree(), {}
    for i in range(40):
        base = seqs[rng.choice(list(seqs))] if seqs and rng.random() < 0.7 else []
        cut = int(rng.integers(0, len(base) + 1))
        s = list(base[:cut]) + list(rng.integers(0, 3, int(rng.integers(0, 6))))
        seqs[i] = s
        t.insert(i, s)
        if rng.random() < 0.2:
            gone = int(rng.choice(list(seqs)))
            t.remove(gone)
            del seqs[gone]
    for _ in range(200):
        q = list(rng.integers(0, 3, int(rng.integers(0, 12))))

        def common(s):
            n = 0
            while n < min(len(s), len(q)) and s[n] == q[n]:
                n += 1
            return n
        best = max([common(s) for s in seqs.values()] + [0])
        m, owners = t.match(q)
        assert m == best
        if best:
            assert owners == {o for o, s in seqs.items() if common(s) >= best}


def test_allocator_refcounts_free_and_capacity():
    a = pg.PageAllocator(4, max_pages=6)
    p = a.alloc(3)
    assert sorted(p) == [0, 1, 2] and a.free_pages == 1
    a.incref(p[:2])
    a.decref(p)
    assert a.free_pages == 2 and list(a.refcount[:3]) == [1, 1, 0]
    assert a.grow_to(3) == 6  # doubling, capped at max_pages
    a.extend(6)
    a.alloc(4)
    with pytest.raises(PoolFullError, match="max_pages=6"):
        a.grow_to(1)
    a.decref(p[:2])
    assert a.free_pages == 2
    with pytest.raises(AssertionError):
        a.decref([p[0]])


def test_page_functions_round_trip():
    L, N, P, K, D = 2, 5, 4, 2, 3
    pool = pg.PagePool.zeros(L, N, P, K, D, jnp.float32)
    rng = np.random.default_rng(1)
    k = rng.normal(size=(L, 7, K, D)).astype(np.float32)
    v = rng.normal(size=(L, 7, K, D)).astype(np.float32)
    table = [3, 1]  # positions 0..3 in page 3, 4..6 in page 1
    ids, slots = pg.token_slots(table, 0, 7, P, 8, N)
    assert ids.tolist() == [3, 3, 3, 3, 1, 1, 1, N]  # the 8th slot is padding (dropped)
    pad = lambda x: np.concatenate([x, np.full((L, 1, K, D), 99, np.float32)], 1)
    pool = pg.write_tokens(pool, ids, slots, jnp.asarray(pad(k)), jnp.asarray(pad(v)))
    gk, gv = pg.gather_pages(pool, jnp.asarray(table))
    np.testing.assert_array_equal(np.asarray(gk)[:, :7], k)
    np.testing.assert_array_equal(np.asarray(gv)[:, :7], v)
    assert not np.any(np.asarray(pool.k) == 99)
    lk, lv = pg.gather_layer(pool, jnp.int32(1), jnp.asarray(table))
    np.testing.assert_array_equal(np.asarray(lk)[:7], k[1])
    pool = pg.copy_pages(pool, jnp.asarray([1]), jnp.asarray([4]))
    np.testing.assert_array_equal(np.asarray(pool.k[:, 4]), np.asarray(pool.k[:, 1]))
    big = pg.grow(pool, 8)
    assert big.num_pages == 8
    np.testing.assert_array_equal(np.asarray(big.k[:, :5]), np.asarray(pool.k))
