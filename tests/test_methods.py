"""Sparse decode methods through the whole model: limits that must equal dense attention."""

import numpy as np
import pytest

import alaya_jax as aj
from alaya_jax import methods as M
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


def test_capacity_truncation_is_reported(tiny_model):
    model, tok = tiny_model
    r = _run(model, tok, M.DIPR(float("inf"), "cluster", delta=float("inf"), cluster_size=4,
                                sink=2, window=4, capacity_fraction=0.05), n=3)
    assert r.attention_stats["truncated_layer_steps"] > 0
