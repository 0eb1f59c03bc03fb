"""sparse_attention's plans against independent references; stats; batches of different lengths;
real RoPE'd keys from SmolLM2."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alaya_jax.attention import IndexConfig, KVStore, Plan, build_store, sparse_attention
from alaya_jax.dipr import dipr_reference, full_attention, masked_attention, scaled_scores
from alaya_jax.errors import ConfigError
from alaya_jax.index.block import BlockConfig
from alaya_jax.index.cluster import ClusterConfig
from alaya_jax.index.synthetic import synthetic_kv

CFG = IndexConfig(cluster=ClusterConfig(cluster_size=8, block_size=8, iters=3, sink=2, window=6,
                                        tail_capacity=16),
                  block=BlockConfig(page_size=8))
attend_jit = jax.jit(sparse_attention, static_argnames=("plan",))
_dipr_jit = jax.jit(dipr_reference)  # beta, sink, window traced: one compile per shape
_full_jit = jax.jit(full_attention)
_build = jax.jit(build_store, static_argnames=("config", "n_heads"))


@pytest.fixture(scope="module")
def case():
    B, S, H, K, D = 3, 70, 6, 2, 16
    q, k, v = synthetic_kv(B, S, H, K, D, seed=4)
    lengths = jnp.asarray([70, 33, 9], jnp.int32)  # the last is shorter than sink + window + 1
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    return q, k, v, lengths, _build(k, v, lengths, CFG, n_heads=H)


def test_full_plan_is_dense_attention(case):
    q, k, v, lengths, st = case
    o, stats = attend_jit(q, st, Plan.full())
    np.testing.assert_allclose(np.asarray(o), np.asarray(_full_jit(q, k, v, lengths).o),
                               atol=1e-5)
    assert np.asarray(stats.keys_attended).tolist() == [[70] * 6, [33] * 6, [9] * 6]
    assert np.asarray(stats.keys_read).tolist() == [[70] * 2, [33] * 2, [9] * 2]


def test_streaming_plan_attends_sink_and_window_only(case):
    q, k, v, lengths, st = case
    o, stats = attend_jit(q, st, Plan.streaming(2, 6, return_mask=True))
    s = scaled_scores(q, k)
    pos = np.arange(70)
    L = np.asarray(lengths)[:, None]
    mask = (pos < L) & ((pos < 2) | (pos >= L - 6))
    np.testing.assert_array_equal(np.asarray(stats.attended), np.broadcast_to(mask[:, None], s.shape))
    ref = masked_attention(s, jnp.asarray(np.broadcast_to(mask[:, None], s.shape)), v)
    np.testing.assert_allclose(np.asarray(o), np.asarray(ref.o), atol=1e-5)
    assert np.asarray(stats.keys_attended)[:, 0].tolist() == [8, 8, 8]


def test_topk_plan_matches_brute_force(case):
    q, k, v, lengths, st = case
    o, stats = attend_jit(q, st, Plan.topk(5, sink=2, window=6, return_mask=True))
    s = np.asarray(scaled_scores(q, k))
    for b in range(3):
        L = int(lengths[b])
        for h in range(6):
            middle = list(range(2, max(L - 6, 2)))
            top = sorted(middle, key=lambda i: -s[b, h, i])[:5]
            want = sorted(set(range(min(2, L))) | set(range(max(L - 6, 0), L)) | set(top))
            assert np.nonzero(np.asarray(stats.attended[b, h]))[0].tolist() == want


@pytest.mark.parametrize("index", ["flat", "block", "cluster"])
def test_beta_inf_is_full_attention(case, index):
    q, k, v, lengths, st = case
    plan = Plan.dipr(float("inf"), index=index, sink=2, window=6,
                     delta=float("inf") if index == "cluster" else None)
    o, stats = attend_jit(q, st, plan)
    np.testing.assert_allclose(np.asarray(o), np.asarray(_full_jit(q, k, v, lengths).o),
                               atol=2e-5)
    assert np.asarray(stats.keys_attended)[:, 0].tolist() == [70, 33, 9]


@pytest.mark.parametrize("plan", [
    Plan.dipr(1.0, index="cluster", sink=2, window=6, delta=0.5, return_mask=True),
    Plan.dipr(1.0, index="cluster", sink=2, window=6, delta=0.5, capacity=2, return_mask=True),
    Plan.dipr(1.0, index="block", sink=2, window=6, capacity=2, return_mask=True),
    Plan.quest(2, sink=2, window=6, return_mask=True),
    Plan.dipr(1.0, index="cluster", sink=2, window=6, delta=0.5, one_pass=True, return_mask=True),
])
def test_output_is_attention_over_the_reported_set(case, plan):
    q, k, v, lengths, st = case
    o, stats = attend_jit(q, st, plan)
    ref = masked_attention(scaled_scores(q, k), stats.attended, v)
    np.testing.assert_allclose(np.asarray(o), np.asarray(ref.o), atol=2e-5)
    np.testing.assert_array_equal(np.asarray(stats.keys_attended),
                                  np.asarray(stats.attended).sum(-1))
    # everything attended lies in the valid prefix; sink and window always attended
    att = np.asarray(stats.attended)
    for b, L in enumerate(np.asarray(lengths)):
        assert not att[b, :, L:].any()
        assert att[b, :, :min(2, L)].all() and att[b, :, max(L - 6, 0):L].all()
    if plan.capacity is not None:
        assert (np.asarray(stats.groups_kept) <= plan.capacity).all()
        np.testing.assert_array_equal(np.asarray(stats.truncated),
                                      (np.asarray(stats.groups_needed) > plan.capacity).any(-1))


@pytest.mark.parametrize("index", ["cluster", "block"])
def test_one_pass_threshold(case, index):
    """one_pass: the threshold is m' - beta (m' = max of the exact region and the probed
    blocks), so it attends a superset of the exact plan's keys, from the same blocks; with every
    block probed m' is the max read, and both plans are the same."""
    q, k, v, lengths, st = case
    s = np.asarray(scaled_scores(q, k))
    kw = dict(sink=2, window=6, return_mask=True, **(dict(delta=0.5) if index == "cluster" else {}))
    exact = Plan.dipr(1.0, index=index, probe=0, **kw)  # m' from the exact region alone
    o0, st0 = attend_jit(q, st, exact)
    o1, st1 = attend_jit(q, st, dataclasses.replace(exact, one_pass=True))
    a0, a1 = np.asarray(st0.attended), np.asarray(st1.attended)
    assert not np.any(a0 & ~a1)  # a superset
    assert np.any(a1 & ~a0)  # and here a strict one: the max is often in the index
    np.testing.assert_array_equal(np.asarray(st1.groups_kept), np.asarray(st0.groups_kept))
    t0, t1 = np.asarray(st0.threshold), np.asarray(st1.threshold)
    assert np.all(t1 <= t0 + 1e-6)
    # the extra keys score within (M - m') below the exact threshold, M - beta = t0
    assert np.all(np.where(a1 & ~a0, s >= t1[..., None] - 1e-5, True))
    ref = masked_attention(scaled_scores(q, k), st1.attended, v)
    np.testing.assert_allclose(np.asarray(o1), np.asarray(ref.o), atol=2e-5)
    groups = (st.cluster.num_blocks if index == "cluster" else st.block.kmin.shape[2])
    every = dataclasses.replace(exact, probe=groups)
    oa, sa = attend_jit(q, st, every)
    ob, sb = attend_jit(q, st, dataclasses.replace(every, one_pass=True))
    np.testing.assert_array_equal(np.asarray(sb.attended), np.asarray(sa.attended))
    np.testing.assert_allclose(np.asarray(ob), np.asarray(oa), atol=1e-6)


def test_batch_entries_are_independent(case):
    # the same sequences in another batch order give the same answers (no cross-talk, and
    # each sequence's own length is used); same shapes, so nothing recompiles
    q, k, v, lengths, st = case
    plan = Plan.dipr(1.5, index="cluster", sink=2, window=6, delta=1.0)
    o, stats = attend_jit(q, st, plan)
    perm = np.array([2, 0, 1])
    st_p = _build(k[perm], v[perm], lengths[perm], CFG, n_heads=6)
    o_p, stats_p = attend_jit(q[perm], st_p, plan)
    np.testing.assert_allclose(np.asarray(o_p), np.asarray(o)[perm], atol=2e-5)
    np.testing.assert_array_equal(np.asarray(stats_p.keys_read), np.asarray(stats.keys_read)[perm])


def test_bf16_cache(case):
    q, k, v, lengths, _ = case
    kb, vb = k.astype(jnp.bfloat16), v.astype(jnp.bfloat16)
    st = _build(kb, vb, lengths, CFG, n_heads=6)
    o, _ = attend_jit(q.astype(jnp.bfloat16), st, Plan.dipr(2.0, index="cluster", sink=2, window=6,
                                                            delta=float("inf")))
    ref = _dipr_jit(q.astype(jnp.bfloat16), kb, vb, 2.0, 2, 6, lengths)
    assert o.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(o), np.asarray(ref.o), atol=2e-2)


def test_gpu_gemm_forms_equal_the_per_head_forms(case, monkeypatch):
    """On a GPU the flat scores and the exact region (sink + tail) of the cluster path run as
    plain GEMMs against a block-diagonal query; forced here on the CPU, they give the per-head
    einsum / multiply-reduce forms' answers. (f32 only: the bf16 form's batched bf16 x bf16 ->
    f32 GEMM is not implemented by the CPU's dot thunk; the GPU tests cover it.)"""
    import alaya_jax.attention as A
    import alaya_jax.dipr as dipr_mod
    q, k, v, lengths, st = case
    plans = [Plan.dipr(1.5, index="cluster", sink=2, window=6, delta=0.5, return_mask=True),
             Plan.dipr(1.5, index="flat", sink=2, window=6, return_mask=True),
             Plan.streaming(2, 6)]
    fresh = lambda p: jax.jit(lambda q, st: sparse_attention(q, st, p))  # a new trace each
    ref = [fresh(p)(q, st) for p in plans]
    for mod in (A, dipr_mod):
        monkeypatch.setattr(mod, "_plain_gemm", lambda: True)
    for p, (o0, s0) in zip(plans, ref):
        o1, s1 = fresh(p)(q, st)
        np.testing.assert_allclose(np.asarray(o1), np.asarray(o0), atol=1e-5, rtol=1e-5)
        if p.return_mask:
            assert (np.asarray(s1.attended) == np.asarray(s0.attended)).mean() > 0.999
        np.testing.assert_allclose(np.asarray(s1.threshold), np.asarray(s0.threshold), atol=1e-5)


def test_plan_validation():
    with pytest.raises(ConfigError, match="kind"):
        Plan(kind="sparse")
    with pytest.raises(ConfigError, match="k >= 1"):
        Plan.topk(0)
    with pytest.raises(ConfigError, match="remainder"):
        Plan.dipr(4.0, index="flat", remainder=True)
    with pytest.raises(ConfigError, match="beta"):
        Plan.dipr(-1.0)
    assert hash(Plan.dipr(4.0)) == hash(Plan.dipr(4.0))  # static under jit


def test_store_abstract_8b_shapes():
    # Llama-3-8B layer shapes at 32K, by shape only (nothing allocated)
    cfg = IndexConfig(cluster=ClusterConfig(), block=BlockConfig())
    abstract = KVStore.abstract(cfg, 1, 32768, 32, 8, 128)
    assert abstract.cluster.keys.shape == (1, 8, cfg.cluster.num_blocks(32768), 64, 128)
    out = jax.eval_shape(lambda q, st: sparse_attention(q, st, Plan.dipr(4.0, index="cluster")),
                         jax.ShapeDtypeStruct((1, 32, 128), jnp.bfloat16), abstract)
    assert out[0].shape == (1, 32, 128) and out[0].dtype == jnp.float32
    assert out[1].keys_read.shape == (1, 8)


def _real_qkv(T=640, layers=(20,)):
    alaya_jax = pytest.importorskip("alaya_jax")
    try:
        from alaya_jax.model import capture_qkv
        model, tok = alaya_jax.load_model()
    except Exception as e:  # the default model package not installed
        pytest.skip(f"SmolLM2 not available: {e}")
    import os
    doc = os.path.join(os.path.dirname(__file__), "..", "examples", "data", "gpl-3.0.txt")
    ids = tok.encode(open(doc, encoding="utf-8").read())[:T]
    return capture_qkv(model, ids, layers)


@pytest.mark.slow
def test_real_keys_smollm2():
    """Real post-RoPE keys: unlimited margin equals flat exactly; the calibrated rule keeps
    the flat DIPR set's recall high while reading a fraction of the keys."""
    from alaya_jax.attention import calibrate_delta
    qkv = _real_qkv()
    for layer, (q, k, v) in qkv.items():
        T, H, D = q.shape
        T0 = T - 4
        cfg = IndexConfig(cluster=ClusterConfig(cluster_size=16, block_size=32), block=None)
        kk, vv = jnp.asarray(k)[None], jnp.asarray(v)[None]
        st = build_store(kk, vv, jnp.asarray([T0]), cfg, n_heads=H,
                         queries=jnp.asarray(q[T0 - 64:T0])[None])
        cal = [jnp.asarray(q[t])[None] for t in range(T0 - 8, T0)]
        delta = calibrate_delta(st, cal, beta=4.0, target_recall=0.99,
                                lengths=[[t + 1] for t in range(T0 - 8, T0)])
        st = st.replace(cluster=st.cluster.replace(delta=delta))
        exact = Plan.dipr(4.0, index="cluster", delta=float("inf"))
        rule = Plan.dipr(4.0, index="cluster", return_mask=True)
        hit = tot = 0
        read = []
        for t in range(T0, T):
            qt = jnp.asarray(q[t])[None]
            s_t = st.replace(lengths=jnp.asarray([t + 1]))
            o, _ = attend_jit(qt, s_t, exact)
            ref = _dipr_jit(qt, kk, vv, 4.0, 4, 64, jnp.asarray([t + 1]))
            np.testing.assert_allclose(np.asarray(o), np.asarray(ref.o), atol=1e-4)
            o, stats = attend_jit(qt, s_t, rule)
            hit += int((np.asarray(stats.attended) & np.asarray(ref.kept)).sum())
            tot += int(np.asarray(ref.kept).sum())
            read.append(float(np.asarray(stats.keys_read).mean()) / (t + 1))
        assert hit / tot >= 0.97, (layer, hit / tot)
        assert np.mean(read) < 0.8, (layer, np.mean(read))


# --- delta calibration: stacked queries, causal lengths ----------------------------------------


def _brute_recall(q, st, L, beta, probe, rank_var=0.0):
    """Recall of the flat DIPR set at each DELTA_GRID point, by sets: q [B,H,D], L [B] the
    query's causal length. Read: the sink, the window [L - window, L), the tail [end, L), the
    probed blocks and every block whose margin rule passes at delta (m' = max over the sink,
    window, tail and the probed blocks' keys at positions < L)."""
    from alaya_jax.attention import DELTA_GRID
    q, k = np.asarray(q, np.float32), np.asarray(st.k, np.float32)
    idx, cfg = st.cluster, st.cluster.config
    cen, blen = np.asarray(idx.centroid), np.asarray(idx.block_len)
    spos, end = np.asarray(idx.positions), np.asarray(idx.end)
    B, S, K, D = k.shape
    H = q.shape[1]
    G, N, P = H // K, blen.shape[2], cfg.block_size
    grid = np.asarray(DELTA_GRID, np.float32)
    out = np.zeros((len(grid), B, H))
    pos = np.arange(S)
    for b in range(B):
        Lb = int(L[b])
        valid = pos < Lb
        always = valid & ((pos < cfg.sink) | (pos >= end[b]) | (pos >= Lb - cfg.window))
        for kh in range(K):
            hs = range(kh * G, kh * G + G)
            s = {h: k[b, :, kh] @ q[b, h] / np.float32(math.sqrt(D)) for h in hs}
            kvar = np.asarray(idx.key_var)[b, kh]  # [N, D]: the variance term of the ranking
            est = {h: np.where(blen[b, kh] > 0, cen[b, kh] @ q[b, h] / np.float32(math.sqrt(D))
                               + 0.5 * rank_var * (kvar @ (q[b, h] ** 2)) / D, -np.inf)
                   for h in hs}
            probed = sorted({int(i) for h in hs
                             for i in np.argsort(-est[h], kind="stable")[:probe]})
            members = [spos[b, kh, n, :blen[b, kh, n]] for n in range(N)]
            seen_probed = np.concatenate([members[n] for n in probed] + [np.zeros(0, int)])
            seen_probed = seen_probed[seen_probed < Lb]
            m_prime = {h: max(s[h][always].max(initial=-np.inf),
                              s[h][seen_probed].max(initial=-np.inf)) for h in hs}
            need = -np.max([est[h] - (m_prime[h] - beta) for h in hs], axis=0)  # [N]
            in_block = np.zeros((N, S), bool)  # [N,S] the block's members before L
            for n in range(N):
                in_block[n, members[n][members[n] < Lb]] = True
            blocks_read = np.isin(np.arange(N), probed)[None, :] | (need[None, :] <= grid[:, None])
            read = always[None, :] | (blocks_read.astype(int) @ in_block > 0)  # [grid,S]
            for h in hs:
                flat = valid & ((s[h] >= s[h][valid].max() - beta) | (pos < cfg.sink)
                                | (pos >= Lb - cfg.window))
                out[:, b, h] = (flat[None, :] & read).sum(-1) / max(flat.sum(), 1)
    return out


@pytest.fixture(scope="module")
def calib_case(case):
    q, k, v, lengths, st = case
    n = 5
    rng = np.random.default_rng(7)
    qs = jnp.asarray(q)[None] + 0.8 * jnp.asarray(rng.standard_normal((n,) + q.shape), q.dtype)
    short = np.maximum(np.asarray(lengths)[None, :] - 7 * np.arange(n)[:, None], 3)  # [n,B]
    return qs, st, jnp.asarray(short, jnp.int32)


def test_calibrate_stacked_equals_sequence_and_brute_force(calib_case):
    """One stacked call ([n,B,H,D], lengths [n,B]) gives every query's curves, the same
    vmapped and in lax.map chunks, each the brute-force recall by sets (at the store's lengths
    and shorter ones); the sequence form gives the same delta."""
    from alaya_jax.attention import _recall_curves_jit, calibrate_delta
    qs, st, short = calib_case
    n = qs.shape[0]
    store_len = jnp.broadcast_to(st.lengths, (n,) + st.lengths.shape)
    r = np.asarray(_recall_curves_jit(qs, short, st, 4.0, 2, 0.0, n)[0])  # [n,grid,B,H]
    np.testing.assert_array_equal(np.asarray(_recall_curves_jit(qs, short, st, 4.0, 2, 0.0, 2)[0]),
                                  r)
    for j in (0, n - 1):
        np.testing.assert_allclose(r[j], _brute_recall(qs[j], st, np.asarray(short[j]), 4.0, 2),
                                   atol=1e-6)
    r0 = np.asarray(_recall_curves_jit(qs, store_len, st, 4.0, 2, 0.0, n)[0])
    np.testing.assert_allclose(r0[1], _brute_recall(qs[1], st, np.asarray(st.lengths), 4.0, 2),
                               atol=1e-6)
    deltas = set()
    for target in (0.9, 0.97, 0.995):
        for lens in (None, short):
            seq_len = None if lens is None else [np.asarray(x).tolist() for x in lens]
            a = calibrate_delta(st, qs, 4.0, target, probe=2, lengths=lens)
            b = calibrate_delta(st, list(qs), 4.0, target, probe=2, lengths=seq_len)
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
            assert a.shape == (qs.shape[2],)
            deltas.add(float(a[0]))
    assert len(deltas) > 1  # the targets reach different margins


def test_calibrate_ranks_blocks_as_the_plan(calib_case):
    """With rank_var the curves rank blocks by q.c + rank_var * sigma^2 / 2, as the plan does:
    equal to the brute force with that ranking, and not to the plain one."""
    from alaya_jax.attention import _recall_curves_jit
    qs, st, short = calib_case
    n = qs.shape[0]
    r = np.asarray(_recall_curves_jit(qs, short, st, 4.0, 2, 0.0, n, 2.0)[0])
    for j in (0, n - 1):
        want = _brute_recall(qs[j], st, np.asarray(short[j]), 4.0, 2, rank_var=2.0)
        np.testing.assert_allclose(r[j], want, atol=1e-5)
    plain = np.stack([_brute_recall(qs[j], st, np.asarray(short[j]), 4.0, 2) for j in range(n)])
    assert not np.allclose(r, plain)


def test_calibrate_per_kv_head(calib_case):
    """per="kv_head": each group's delta is the smallest grid margin whose mean recall over
    the group's heads (brute force) reaches the target; the layer's delta lies between the
    groups' smallest and largest; a bad name is refused."""
    from alaya_jax.attention import DELTA_GRID, calibrate_delta
    qs, st, short = calib_case
    n, B, H = qs.shape[:3]
    K = st.k.shape[2]
    G = H // K
    brute = np.stack([_brute_recall(qs[j], st, np.asarray(short[j]), 4.0, 2) for j in range(n)])
    grid = np.asarray(DELTA_GRID)
    for target in (0.9, 0.97, 0.995):
        d = np.asarray(calibrate_delta(st, qs, 4.0, target, probe=2, lengths=short, per="kv_head"))
        layer = float(calibrate_delta(st, qs, 4.0, target, probe=2, lengths=short)[0])
        assert d.shape == (H,)
        for kh in range(K):
            mean = brute[:, :, :, kh * G:(kh + 1) * G].mean(axis=(0, 2, 3))  # [grid]
            want = grid[np.nonzero(mean >= target - 1e-6)[0][0]]
            np.testing.assert_array_equal(d[kh * G:(kh + 1) * G], want)
        assert d.min() <= layer <= d.max()
    with pytest.raises(ConfigError, match="per"):
        calibrate_delta(st, qs, 4.0, 0.9, per="head")


def test_calibrate_counts_only_keys_before_the_query(calib_case):
    """A query shorter than the store counts neither the indexed keys of its future (its
    recall is the brute-force one over the flat DIPR set at its length) nor the keys of its
    window as the index's: the curves differ from the store-length ones and stay in [0, 1]."""
    from alaya_jax.attention import _recall_curves_jit
    qs, st, short = calib_case
    n, j = qs.shape[0], 3  # query 3: lengths 49, 12, 3 against the store's 70, 33, 9
    store_len = jnp.broadcast_to(st.lengths, (n,) + st.lengths.shape)
    r, rm = (np.asarray(x[j]) for x in _recall_curves_jit(qs, short, st, 4.0, 2, 0.0, n))
    np.testing.assert_allclose(r, _brute_recall(qs[j], st, np.asarray(short[j]), 4.0, 2),
                               atol=1e-6)
    assert (r >= 0).all() and (r <= 1).all() and (rm >= 0).all() and (rm <= 1).all()
    full = np.asarray(_recall_curves_jit(qs, store_len, st, 4.0, 2, 0.0, n)[0][j])
    assert not np.array_equal(r[:, 0], full[:, 0])
    assert np.all(np.diff(r, axis=0) >= 0)  # a larger margin reads a superset
