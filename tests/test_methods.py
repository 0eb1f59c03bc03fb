"""Sparse decode methods through the whole model: limits that must equal dense attention."""

import jax
import numpy as np
import pytest

import alaya_jax as aj
from alaya_jax import methods as M
from alaya_jax.errors import ConfigError
from tests import tiny_llama as tl


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    tl.write_hf(d, tl.make_weights())
    return aj.load_model(str(d))


PROMPT = [int(x) for x in np.random.default_rng(0).integers(3, 250, 50)]


def _run(model, tok, method, n=6):
    return aj.generate(model, tok, PROMPT, n, attention=method, stop_at_eos=False)


def test_methods_that_keep_everything_equal_full(tiny_model):
    model, tok = tiny_model
    full = _run(model, tok, None)
    for method in (M.Full(), M.DIPR(float("inf"), "flat", sink=2, window=4),
                   M.TopK(1000, sink=2, window=4)):
        r = _run(model, tok, method)
        assert r.tokens == full.tokens, method.describe()
        assert r.attention_stats["attended_fraction"] == pytest.approx(1.0)


def test_cluster_dipr_with_unlimited_margin_reads_all_and_equals_full(tiny_model):
    """delta = inf keeps every cluster: the cluster path equals the flat query (here beta = inf:
    dense attention), while appended tokens go through the tail and its folds."""
    model, tok = tiny_model
    full = _run(model, tok, None, n=8)
    method = M.DIPR(float("inf"), "cluster", delta=float("inf"), cluster_size=4, sink=2, window=4)
    r = _run(model, tok, method, n=8)
    assert r.tokens == full.tokens
    assert r.attention_stats["attended_fraction"] == pytest.approx(1.0)
    assert r.attention_stats["truncated_layer_steps"] == 0


def test_streaming_attends_sink_plus_window(tiny_model):
    model, tok = tiny_model
    r = _run(model, tok, M.Streaming(sink=2, window=8), n=4)
    # steps see contexts 51..54 (prompt 50 + the fed tokens): 10 keys attended each
    ctx = np.arange(51, 55)
    assert r.attention_stats["attended_fraction"] == pytest.approx(np.mean(10 / ctx), rel=1e-3)


def test_decoding_without_stats_gives_the_same_tokens(tiny_model):
    """attention_stats=False drops the statistics from the decode step, not the attention."""
    model, tok = tiny_model
    method = M.DIPR(4.0, "cluster", cluster_size=4, sink=2, window=4, capacity_fraction=0.5)
    with_stats = _run(model, tok, method, n=8)
    without = aj.generate(model, tok, PROMPT, 8, attention=method, stop_at_eos=False,
                          attention_stats=False)
    assert without.tokens == with_stats.tokens
    assert with_stats.attention_stats["attended_fraction"] > 0
    assert without.attention_stats is None


def test_capacity_truncation_is_reported(tiny_model):
    model, tok = tiny_model
    r = _run(model, tok, M.DIPR(float("inf"), "cluster", delta=float("inf"), cluster_size=4,
                                sink=2, window=4, capacity_fraction=0.05), n=3)
    assert r.attention_stats["truncated_layer_steps"] > 0


# --- calibration on prefill queries, the optimizer's index choice, argument checks ------------
N_QUERIES = 4
BATCH = [PROMPT[:50], PROMPT[:37]]  # right-padded, different lengths, prefilled in chunks of 16


def _prefill(model, prompts, n_queries, max_len=64):
    lengths = np.array([len(p) for p in prompts], np.int32)
    tokens = np.zeros((len(prompts), int(lengths.max())), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    cache = aj.KVCache.zeros(model.cfg, len(prompts), max_len, model.dtype)
    return aj.prefill(model, tokens, lengths, cache, chunk=16, collect_queries=n_queries)


@pytest.fixture(scope="module")
def prefilled(tiny_model):
    """(cache, PrefillQueries) of BATCH."""
    _, cache, qs = _prefill(tiny_model[0], BATCH, N_QUERIES)
    return cache, qs


def test_prefill_collects_each_sequences_last_queries(tiny_model, prefilled):
    """The collected q are each sequence's own last n positions (the first prompt's span two
    chunks): equal to the q of a one-chunk forward of that prompt alone."""
    model, _ = tiny_model
    _, qs = prefilled
    n, (L, H, D) = N_QUERIES, (model.cfg.n_layers, model.cfg.n_heads, model.cfg.head_dim)
    assert qs.q.shape == (L, len(BATCH), n, H, D) and qs.lengths.shape == (len(BATCH), n)
    for b, p in enumerate(BATCH):
        np.testing.assert_array_equal(np.asarray(qs.lengths[b]), np.arange(len(p) - n + 1, len(p) + 1))
    T = len(BATCH[0])
    pos = np.arange(T, dtype=np.int32)[None]
    _, _, (q, _, _) = model(np.asarray([BATCH[0]], np.int32), pos,
                            aj.KVCache.zeros(model.cfg, 1, 64, model.dtype), first_chunk=True,
                            collect_qkv=True)
    np.testing.assert_allclose(np.asarray(qs.q[:, 0]), np.asarray(q[:, 0, T - n:]), rtol=1e-5,
                               atol=1e-5)
    assert np.abs(np.asarray(qs.q[:, 1] - qs.q[:, 0])).max() > 1e-3  # its own positions


def test_prepare_calibrates_a_finite_delta_per_layer(tiny_model, prefilled):
    """prepare(queries=...) stores in every layer's cluster index the margins calibrate_delta
    finds for that layer's keys and its own queries at their causal lengths (per kv head by
    default, one per layer with calibrate_per="layer")."""
    from alaya_jax.attention import KVStore, calibrate_delta

    model, _ = tiny_model
    cache, qs = prefilled
    H, n = model.cfg.n_heads, N_QUERIES
    method = M.DIPR(2.0, "cluster", cluster_size=4, sink=2, window=4, calibration_queries=n)
    state = method.prepare(cache, H, queries=qs)
    deltas = method.report(cache, H, state)["delta_per_layer"]
    assert len(deltas) == model.cfg.n_layers and np.all(np.isfinite(deltas))
    for i in range(model.cfg.n_layers):
        k, v = cache.layer(i)
        cluster = (state[i]["cluster"] if isinstance(state, tuple)  # per-layer (GPU) or stacked
                   else jax.tree.map(lambda a: a[i], state["cluster"]))
        want = calibrate_delta(KVStore(k, v, cache.lengths, cluster),
                               [qs.q[i, :, j] for j in range(n)], 2.0, method.target_recall,
                               method.plan.probe, lengths=[qs.lengths[:, j] for j in range(n)],
                               per="kv_head")
        np.testing.assert_array_equal(np.asarray(cluster.delta), np.asarray(want))
        assert deltas[i] == pytest.approx(float(np.mean(want)))
    per_layer = M.DIPR(2.0, "cluster", cluster_size=4, sink=2, window=4, calibration_queries=n,
                       calibrate_per="layer")
    st = per_layer.prepare(cache, H, queries=qs)
    one = st[0]["cluster"] if isinstance(st, tuple) else jax.tree.map(lambda a: a[0],
                                                                       st["cluster"])
    assert len(set(np.asarray(one.delta).tolist())) == 1
    with pytest.raises(ConfigError, match="calibrate_per"):
        M.DIPR(2.0, "cluster", calibrate_per="head")
    with pytest.warns(UserWarning, match="without prefill queries"):
        st = method.prepare(cache, H)  # keeps the configured margin, and says so
    assert method.report(cache, H, st)["delta_per_layer"] == [method.index.cluster.delta] * 2


def _table(path, cluster_cheap: bool):
    """A cost table that makes the cluster (or the flat) path the cheapest."""
    import json

    fast, slow = 1e6, 1e-3
    d = dict(device_kind="test", overhead_us=dict(flat=1.0, block=1.0, cluster=1.0),
             bandwidth_gbs=dict(flat=slow if cluster_cheap else fast, block=slow,
                                cluster=fast if cluster_cheap else slow),
             read_fraction=dict(cluster={"8": 0.1}, block={"8": 1.0}))
    path.write_text(json.dumps(d))
    return str(path)


@pytest.mark.parametrize("cluster_cheap", [True, False])
def test_auto_index_is_the_optimizers_choice(tiny_model, prefilled, tmp_path, cluster_cheap):
    from alaya_jax.optimizer import CostTable, QueryShape, choose_plan

    model, _ = tiny_model
    cache, qs = prefilled
    cfg = model.cfg
    table = _table(tmp_path / "t.json", cluster_cheap)
    method = M.DIPR(8.0, cluster_size=4, sink=2, window=4, cost_table=table,
                    calibration_queries=N_QUERIES)
    shape = QueryShape(context=cache.max_len, batch=len(BATCH), heads=cfg.n_heads,
                       kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, itemsize=4)
    want = choose_plan(shape, 8.0, available=("flat", "block", "cluster"),
                       table=CostTable.load(path=table), sink=2, window=4)
    assert want.path == ("cluster" if cluster_cheap else "flat")
    choice = method.choose_for(cache, cfg.n_heads)
    assert choice.path == want.path and choice.plan.index == want.path
    assert f"-> {want.path}" in choice.explain()
    state = method.prepare(cache, cfg.n_heads, queries=qs)  # builds only the chosen index
    assert (state["cluster"] is not None) == cluster_cheap and state["block"] is None
    rep = method.report(cache, cfg.n_heads, state)
    assert rep["plan"] == choice.plan.describe() and f"index={want.path}" in rep["plan"]
    assert (rep["delta_per_layer"] is not None) == cluster_cheap
    forced = M.DIPR(8.0, "flat", cost_table=table).choose_for(cache, cfg.n_heads)
    assert forced.path == "forced" and forced.plan.index == "flat"


def test_bad_arguments_give_clear_errors(tiny_model, prefilled):
    from alaya_jax.errors import ShapeError
    from alaya_jax.eval.harness import MethodSpecError, parse_method

    with pytest.raises(ConfigError, match="index must be one of"):
        M.DIPR(8.0, "kmeans")
    with pytest.raises(ConfigError, match="beta must be >= 0"):
        M.DIPR(-1.0)
    with pytest.raises(ConfigError, match="calibration_queries must be >= 0"):
        M.DIPR(8.0, calibration_queries=-2)
    with pytest.raises(ConfigError, match="target_recall"):
        M.DIPR(8.0, target_recall=1.5)
    with pytest.raises(ConfigError, match="no cost table"):
        M.DIPR(8.0, cost_table="tpu_v9").choose(1024)
    with pytest.raises(MethodSpecError, match="unknown option 'probe'"):
        parse_method("dipr:8:probe")  # probe needs a value
    model, _ = tiny_model
    with pytest.raises(ShapeError, match="collect_queries"):
        _prefill(model, BATCH, -1)
    cache, qs = prefilled
    method = M.DIPR(2.0, "cluster", cluster_size=4, sink=2, window=4, calibration_queries=2)
    with pytest.raises(ShapeError, match="queries must be q"):
        method.prepare(cache, model.cfg.n_heads, queries=qs.replace(q=qs.q[:1]))


def test_method_specs_name_the_index():
    from alaya_jax.eval.harness import parse_method

    assert parse_method("dipr:8").attention.auto
    cl = parse_method("dipr-cluster:8:read:remainder:var=0.5:probe=8:recall=0.95:calib=16").attention
    assert not cl.auto and cl.plan.index == "cluster" and cl.plan.attend_read
    assert cl.plan.remainder and cl.plan.remainder_var == 0.5 and cl.plan.probe == 8
    assert cl.target_recall == 0.95 and cl.calibration_queries == 16
    fixed = parse_method("dipr-cluster:8:delta=3").attention
    assert fixed.plan.delta == 3.0 and fixed.calibration_queries == 0  # nothing to calibrate
    assert parse_method("dipr-flat:8").attention.plan.index == "flat"


@pytest.mark.parametrize("n", [37, 8])
def test_cluster_path_across_tail_folds_equals_flat_dipr(tiny_model, n):
    """A tail of 12 slots with a 4-token window folds into the index every few steps of the
    decode loop (chunks of 8 steps, one fold check per chunk; the last steps one by one).
    With an unlimited margin the cluster path must keep answering the flat DIPR query
    exactly (no token lost or counted twice across folds), and with beta = inf equal dense
    attention."""
    model, tok = tiny_model
    kw = dict(cluster_size=4, sink=2, window=4, tail_capacity=12)
    prompt = PROMPT[:24]  # 24 + 37 fit the tiny model's 64 positions
    run = lambda m: aj.generate(model, tok, prompt, n, attention=m, stop_at_eos=False)  # noqa: E731
    # On a GPU the two paths' scores differ in rounding (f32 dots run as TF32 by default in
    # the gathered path; the flat path's GEMM is f32-accurate), so keys at the threshold can
    # fall either way there: exact equality is asserted on the CPU, closeness on the GPU.
    exact = jax.default_backend() == "cpu"
    for beta, ref in ((1.5, M.DIPR(1.5, "flat", sink=2, window=4)), (float("inf"), None)):
        want = run(ref)
        got = run(M.DIPR(beta, "cluster", delta=float("inf"), **kw))
        assert len(got.tokens[0]) == n
        if exact or ref is None:
            assert got.tokens == want.tokens, beta
        assert got.attention_stats["truncated_layer_steps"] == 0
        if ref is not None:
            assert got.attention_stats["attended_fraction"] == pytest.approx(
                want.attention_stats["attended_fraction"], rel=1e-6 if exact else 0.02)


def test_fold_moves_the_tail_once_for_every_layer(tiny_model):
    """SparseMethod.fold: after it, every layer's index ends at length - window, and every
    position below that sits in exactly one block (none lost, none twice)."""
    model, tok = tiny_model
    method = M.DIPR(2.0, "cluster", delta=1.0, cluster_size=4, sink=2, window=4, tail_capacity=12)
    tokens = np.array([PROMPT + [5] * 10], np.int32)
    cache = aj.KVCache.zeros(model.cfg, 1, 128, model.dtype)
    from alaya_jax.generate import prefill
    _, cache = prefill(model, tokens[:, :50], np.array([50]), cache, chunk=16)
    state = method.prepare(cache, model.cfg.n_heads)
    cache = cache.replace(lengths=cache.lengths + 10)  # 10 more tokens cached (positions 50-59)
    _, cache_full = prefill(model, tokens, np.array([60]), aj.KVCache.zeros(model.cfg, 1, 128, model.dtype),
                            chunk=16)
    cache = cache.replace(k=cache_full.k, v=cache_full.v)
    before = state if isinstance(state, tuple) else (state,)
    assert int(np.asarray(before[0]["cluster"].end)[..., 0].max()) == 46
    folded = method.fold(state, cache, 8)
    layers = folded if isinstance(folded, tuple) else [
        jax.tree.map(lambda a: a[i], folded) for i in range(cache.n_layers)]
    for st in layers:
        c = st["cluster"]
        assert np.asarray(c.end).tolist() == [56]
        pos = np.asarray(c.positions)[0]  # [K, N, P]
        for kh in range(pos.shape[0]):
            got = np.sort(pos[kh][pos[kh] >= 0])
            np.testing.assert_array_equal(got, np.arange(2, 56))
    # nothing due: the state is returned unchanged
    again = method.fold(folded, cache, 0)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(folded)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_tail_folds_in_a_batch_of_different_lengths_equal_full(tiny_model):
    """Two prompts of different lengths fold at different positions of their caches (one
    lax.cond for both): with beta = inf and an unlimited margin every sequence still equals
    dense attention token for token."""
    model, tok = tiny_model
    prompts = [PROMPT[:24], PROMPT[5:18]]
    run = lambda m: aj.generate(model, tok, prompts, 30, attention=m, stop_at_eos=False)  # noqa: E731
    want = run(None)
    got = run(M.DIPR(float("inf"), "cluster", delta=float("inf"), cluster_size=4, sink=2, window=4,
                     tail_capacity=12))
    assert got.tokens == want.tokens
    assert got.attention_stats["attended_fraction"] == pytest.approx(1.0)


def test_tail_folds_with_per_layer_weights_and_cache(tmp_path):
    """The GPU layout (per-layer weights and cache, a tuple of layer states folded one by one
    under one lax.cond), run on the CPU: across folds the cluster path equals flat DIPR and,
    with beta = inf, dense attention; and it equals the stacked layout's tokens."""
    tl.write_hf(tmp_path, tl.make_weights())
    model, tok = aj.load_model(str(tmp_path), stack_layers=False)
    stacked, _ = aj.load_model(str(tmp_path), stack_layers=True)
    assert not model.stacked
    kw = dict(cluster_size=4, sink=2, window=4, tail_capacity=12)
    run = lambda mdl, m: aj.generate(mdl, tok, PROMPT[:24], 30, attention=m,  # noqa: E731
                                     stop_at_eos=False)
    got = run(model, M.DIPR(1.5, "cluster", delta=float("inf"), **kw))
    assert got.tokens == run(model, M.DIPR(1.5, "flat", sink=2, window=4)).tokens
    assert got.tokens == run(stacked, M.DIPR(1.5, "cluster", delta=float("inf"), **kw)).tokens
    inf = run(model, M.DIPR(float("inf"), "cluster", delta=float("inf"), **kw))
    assert inf.tokens == run(model, None).tokens
