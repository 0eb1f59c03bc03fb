"""DB and Session in memory on a tiny random Llama: prefix reuse equals a fresh prefill,
copy-on-write isolation, import_kv, update/attention, capacity, generation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import alaya_jax as aj
from alaya_jax.db import DB
from alaya_jax.errors import PoolFullError, SessionError, ShapeError
from tests import tiny_llama as tl

CFG = dict(tl.TINY, max_position_embeddings=512)
ATOL = 1e-5  # the same f32 computation in another order (chunk boundaries, cache length)
P = 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    tl.write_hf(d, tl.make_weights(CFG), CFG)
    return aj.load_model(str(d), dtype="float32")


def _fresh(model, ids):
    """(last logits [V], k, v [L, S, K, D]) of a fresh prefill of ids."""
    cache = aj.KVCache.zeros(model.cfg, 1, 128, model.dtype)
    logits, cache = aj.prefill(model, np.asarray([ids]), np.asarray([len(ids)]), cache)
    cache = cache.as_stacked()
    n = len(ids)
    return np.asarray(logits[0]), np.asarray(cache.k[:, 0, :n]), np.asarray(cache.v[:, 0, :n])


def _kv(session):
    c = session.kv_cache(stacked=True)
    n = session.length
    return np.asarray(c.k[:, 0, :n]), np.asarray(c.v[:, 0, :n])


def _ids(seed, n):
    return [int(i) for i in np.random.default_rng(seed).integers(0, 256, n)]


DOC_ALIGNED, DOC_PARTIAL = _ids(1, 24), _ids(2, 21)  # 3 full pages; 2 pages + 5 tokens


@pytest.mark.parametrize("case", ["exact_prefix", "partial_page", "diverges_in_page",
                                  "equal_to_stored"])
def test_prefix_reuse_equals_fresh_prefill(tiny, case):
    model, _ = tiny
    doc = DOC_PARTIAL if case == "partial_page" else DOC_ALIGNED
    prompt, reused = {
        "exact_prefix": (doc + _ids(3, 6), len(doc)),
        "partial_page": (doc + _ids(3, 6), len(doc)),
        "diverges_in_page": (doc[:19] + _ids(4, 7), 19),
        "equal_to_stored": (list(doc), len(doc) - 1),  # the last token is recomputed
    }[case]
    db = DB(model, page_size=P)
    s0, rest = db.create_session(doc)
    assert s0.length == 0 and rest == doc
    s0.prefill(rest)
    db.store(s0, "doc")
    s0.close()

    s, rest = db.create_session(prompt)
    assert (s.length, s.reused, rest) == (reused, reused, prompt[reused:])
    logits = np.asarray(s.prefill(rest))
    ref_logits, ref_k, ref_v = _fresh(model, prompt)
    np.testing.assert_allclose(logits, ref_logits, atol=ATOL, rtol=0)
    k, v = _kv(s)
    np.testing.assert_allclose(k, ref_k, atol=ATOL, rtol=0)
    np.testing.assert_allclose(v, ref_v, atol=ATOL, rtol=0)
    # The stored snapshot is untouched by the new session's writes into the shared page.
    k_doc, _ = _kv(db.load("doc"))
    np.testing.assert_allclose(k_doc, _fresh(model, doc)[1], atol=ATOL, rtol=0)


def test_shared_pages_copy_on_write(tiny):
    """Two sessions branch off a stored prefix that ends inside a page: full pages stay
    shared, the partial page is copied by each writer, and no append shows anywhere else."""
    model, _ = tiny
    db = DB(model, page_size=P)
    s0, rest = db.create_session(DOC_PARTIAL)
    s0.prefill(rest)
    db.store(s0, "doc")
    a_ids, b_ids = DOC_PARTIAL + _ids(5, 7), DOC_PARTIAL + _ids(6, 9)
    a, ra = db.create_session(a_ids)
    b, rb = db.create_session(b_ids)
    shared_before = list(a.page_table)
    assert list(b.page_table) == shared_before
    a.prefill(ra)
    b.prefill(rb)
    assert a.page_table[:2].tolist() == b.page_table[:2].tolist() == shared_before[:2]
    assert len({a.page_table[2], b.page_table[2], shared_before[2]}) == 3  # both copied
    for sess, ids in ((a, a_ids), (b, b_ids), (s0, DOC_PARTIAL)):
        _, ref_k, ref_v = _fresh(model, ids)
        k, v = _kv(sess)
        np.testing.assert_allclose(k, ref_k, atol=ATOL, rtol=0)
        np.testing.assert_allclose(v, ref_v, atol=ATOL, rtol=0)
    # A fork shares everything; appends to either side stay on that side.
    f = a.fork()
    kv = np.ones((model.cfg.n_kv_heads, model.cfg.head_dim), np.float32)
    for layer in range(model.cfg.n_layers):
        f.update(None, kv, kv, layer, token_id=7)
    assert f.length == a.length + 1 and f.token_ids == a.token_ids + [7]
    np.testing.assert_array_equal(_kv(f)[0][:, :-1], _kv(a)[0])
    np.testing.assert_array_equal(_kv(f)[0][:, -1], 1.0)
    # Pages return to the pool when sessions close (stored pages stay).
    used = db.stats()["pages_used"]
    for sess in (a, b, f, s0):
        sess.close()
    assert db.stats()["pages_used"] == math.ceil(len(DOC_PARTIAL) / P) < used
    with pytest.raises(SessionError, match="closed"):
        a.prefill([1])


def test_live_sessions_are_reused_without_store(tiny):
    model, _ = tiny
    db = DB(model, page_size=P)
    s0, rest = db.create_session(DOC_ALIGNED)
    s0.prefill(rest)
    s1, rest1 = db.create_session(DOC_ALIGNED + [1, 2, 3])
    assert s1.reused == len(DOC_ALIGNED) and rest1 == [1, 2, 3]
    s0.close()
    s2, _ = db.create_session(DOC_ALIGNED + [9])
    assert s2.reused == len(DOC_ALIGNED)  # s1 still holds the prefix


def test_import_kv_then_reuse_and_errors(tiny):
    model, _ = tiny
    cfg = model.cfg
    db = DB(model, page_size=P)
    doc = DOC_PARTIAL
    cache = aj.KVCache.zeros(cfg, 1, 64, model.dtype)
    _, cache = aj.prefill(model, np.asarray([doc]), np.asarray([len(doc)]), cache)
    cache = cache.as_stacked()
    s = db.import_kv(doc, cache.as_layers())  # either KVCache layout
    assert s.length == len(doc)
    per_layer = s.kv_cache(stacked=False)
    np.testing.assert_array_equal(np.stack([np.asarray(k) for k in per_layer.k]),
                                  np.asarray(s.kv_cache(stacked=True).k))
    prompt = doc + _ids(7, 5)
    s2, rest = db.create_session(prompt)
    assert s2.reused == len(doc)
    np.testing.assert_allclose(np.asarray(s2.prefill(rest)), _fresh(model, prompt)[0], atol=ATOL,
                               rtol=0)
    # (k, v) arrays [L, S, K, D] are accepted too.
    s3 = db.import_kv(doc, (cache.k[:, 0], cache.v[:, 0]))
    np.testing.assert_array_equal(_kv(s3)[0], _kv(s)[0])

    k = cache.k[:, 0]
    with pytest.raises(ShapeError, match=r"\[L,S,K,D\]"):
        db.import_kv(doc, (k[:1], k[:1]))  # one layer short
    with pytest.raises(ShapeError, match="shape"):
        db.import_kv(doc, (k[..., :8], k[..., :8]))  # wrong head dim
    with pytest.raises(ShapeError, match="bfloat16"):
        db.import_kv(doc, (k.astype(jnp.bfloat16), k.astype(jnp.bfloat16)))
    with pytest.raises(ShapeError, match="holds 21 tokens"):
        db.import_kv(doc[:-1], cache)
    with pytest.raises(ShapeError, match="fewer than"):
        db.import_kv(_ids(0, 70), (k, k))
    two = aj.KVCache(k=jnp.concatenate([cache.k] * 2, 1), v=jnp.concatenate([cache.v] * 2, 1),
                     lengths=jnp.asarray([len(doc), 3], jnp.int32))
    with pytest.raises(ShapeError, match="row="):
        db.import_kv(doc, two)
    assert db.import_kv(doc, two, row=0).length == len(doc)


def _dense_attention(q, k, v):
    """numpy reference: q [H, D], k, v [S, K, D] -> [H, D] (GQA by repeating kv heads)."""
    H, D = q.shape
    kk = np.repeat(k, H // k.shape[1], axis=1).astype(np.float64)
    vv = np.repeat(v, H // v.shape[1], axis=1).astype(np.float64)
    s = np.einsum("hd,shd->hs", q, kk) / np.sqrt(D)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("hs,shd->hd", p, vv)


def test_update_then_attention_matches_dense_reference(tiny):
    model, _ = tiny
    cfg = model.cfg
    db = DB(model, page_size=P)
    s, rest = db.create_session(DOC_PARTIAL)
    s.prefill(rest)
    rng = np.random.default_rng(0)
    new_k = rng.normal(size=(cfg.n_layers, 5, cfg.n_kv_heads, cfg.head_dim)).astype(np.float32)
    new_v = rng.normal(size=new_k.shape).astype(np.float32)
    for t in range(4):  # one token at a time, layers in order
        for layer in range(cfg.n_layers):
            s.update(None, new_k[layer, t], new_v[layer, t], layer, token_id=100 + t)
    for layer in range(cfg.n_layers):  # the last token without an id, layers reversed
        s.update(None, new_k[cfg.n_layers - 1 - layer, 4], new_v[cfg.n_layers - 1 - layer, 4],
                 cfg.n_layers - 1 - layer)
        if layer < cfg.n_layers - 1:
            assert s.length == len(DOC_PARTIAL) + 4
    assert s.length == len(DOC_PARTIAL) + 5
    assert s.token_ids[-5:] == [100, 101, 102, 103, -1]
    _, ref_k, ref_v = _fresh(model, DOC_PARTIAL)
    q = rng.normal(size=(cfg.n_heads, cfg.head_dim)).astype(np.float32)
    for layer in range(cfg.n_layers):
        k = np.concatenate([ref_k[layer], new_k[layer]])
        v = np.concatenate([ref_v[layer], new_v[layer]])
        np.testing.assert_allclose(np.asarray(s.attention(q, layer)), _dense_attention(q, k, v),
                                   atol=1e-5, rtol=0)
    with pytest.raises(ShapeError, match=r"\[K, D\]"):
        s.update(None, np.zeros((3, 3)), np.zeros((3, 3)), 0)
    with pytest.raises(ShapeError, match="q must be"):
        s.attention(np.zeros((3, 16)), 0)


def test_attention_plan_hook_index_follows_appends_and_store(tiny, tmp_path):
    """session.attention(q, layer, plan=...) answers through sparse_attention over the
    session's index; the index takes appends and is stored and reloaded with the pages."""
    attention = pytest.importorskip("alaya_jax.attention")
    from alaya_jax.index import BlockConfig

    model, _ = tiny
    cfg = model.cfg
    db = DB(model, tmp_path, page_size=P)
    ids = _ids(11, 60)
    s, rest = db.create_session(ids)
    s.prefill(rest)
    # The block index keeps this test fast; the cluster index goes the same way (same hook).
    s.build_index(attention.IndexConfig(cluster=None, block=BlockConfig(page_size=8)),
                  capacity=80)
    q = np.random.default_rng(1).normal(size=(cfg.n_heads, cfg.head_dim)).astype(np.float32)
    every_key = attention.Plan.dipr(beta=float("inf"), index="block", sink=2, window=8)
    layer = 1
    np.testing.assert_allclose(np.asarray(s.attention(q, layer, plan=every_key)),
                               np.asarray(s.attention(q, layer)), atol=1e-5, rtol=0)
    kv = np.ones((cfg.n_kv_heads, cfg.head_dim), np.float32)
    for li in range(cfg.n_layers):
        s.update(q, kv, kv, li, token_id=1)
    o, stats = s.attention(q, layer, plan=every_key, return_stats=True)
    np.testing.assert_allclose(np.asarray(o), np.asarray(s.attention(q, layer)), atol=1e-5, rtol=0)
    assert int(stats.context[0]) == 61
    db.store(s, "indexed")
    loaded = DB(model, tmp_path, page_size=P).load("indexed")
    assert loaded.index.capacity == 80 and loaded.index.config == s.index.config
    for a, b in zip(jax.tree.leaves(loaded.index.layers), jax.tree.leaves(s.index.layers)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(np.asarray(loaded.attention(q, layer, plan=every_key)),
                               np.asarray(o), atol=1e-6, rtol=0)
    # A cluster index (ones of its abstract shapes here; fp8 summaries) is stored and restored
    # the same way, dtypes included.
    from alaya_jax.db import SessionIndex
    from alaya_jax.index import ClusterConfig, ClusterIndex

    ccfg = ClusterConfig(cluster_size=8, block_size=8, sink=2, window=8, tail_capacity=16,
                         summary_dtype="float8_e4m3fn")
    one = ClusterIndex.abstract(ccfg, 1, 80, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
                                model.dtype)
    one = jax.tree.map(lambda a: jnp.ones(a.shape, a.dtype), one)
    s.index = SessionIndex(attention.IndexConfig(cluster=ccfg, block=None), 80,
                           [(one, None)] * cfg.n_layers)
    db.store(s, "clustered")
    back = DB(model, tmp_path, page_size=P).load("clustered").index
    assert back.config == s.index.config and isinstance(back.layers[1][0], ClusterIndex)
    assert back.layers[1][0].centroid.dtype == jnp.float8_e4m3fn
    for a, b in zip(jax.tree.leaves(back.layers), jax.tree.leaves(s.index.layers)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    loaded.prefill([5])  # a prefill appends to the index too
    o, stats = loaded.attention(q, layer, plan=every_key, return_stats=True)
    np.testing.assert_allclose(np.asarray(o), np.asarray(loaded.attention(q, layer)), atol=1e-5,
                               rtol=0)
    assert int(stats.context[0]) == 62 and not bool(stats.truncated[0])


def test_pool_grows_then_says_it_is_full_and_freed_pages_return(tiny):
    model, _ = tiny
    db = DB(model, page_size=4, initial_pages=2, max_pages=8)
    a, rest = db.create_session(_ids(1, 20))  # 5 pages: the pool grows from 2 to 5
    a.prefill(rest)
    assert db.stats()["pages_total"] == 5
    b, rest_b = db.create_session(_ids(2, 20))
    with pytest.raises(PoolFullError, match="max_pages=8"):
        b.prefill(rest_b)
    assert b.length == 0  # a failed prefill leaves the session as it was
    a.close()
    b.prefill(rest_b)
    assert b.length == 20


def test_generate_equals_plain_generate(tiny):
    model, tok = tiny
    db = DB(model, page_size=P, tokenizer=tok)
    ids = DOC_PARTIAL + _ids(9, 4)
    want = aj.generate(model, tok, ids, max_new_tokens=6, stop_at_eos=False)
    s0, rest = db.create_session(DOC_PARTIAL)
    s0.prefill(rest)
    s, rest = db.create_session(ids)
    out = s.generate(rest, max_new_tokens=6, stop_at_eos=False, keep=True)
    assert out.tokens == want.tokens
    assert s.length == len(ids) + 6 and s.token_ids[len(ids):] == want.tokens[0]
    with pytest.raises(SessionError, match="no logits"):
        db.create_session([1])[0].generate(max_new_tokens=2)
