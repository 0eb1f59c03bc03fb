"""The model and both loaders on a tiny random Llama, against an independent numpy forward."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

import alaya_jax as aj
from alaya_jax.model.config import RopeScaling, config_from_hf
from alaya_jax.model.llama import rope_inv_freq
from tests import tiny_llama as tl

# f32 model vs f64 numpy over 2 layers: differences are rounding only (~1e-6 relative).
ATOL = 2e-4


def _ours_logits(model, ids):
    cache = aj.KVCache.zeros(model.cfg, 1, len(ids), model.dtype)
    pos = jnp.arange(len(ids))[None]
    hidden, _ = model(jnp.asarray([ids]), pos, cache, first_chunk=True)
    return np.asarray(model.logits(hidden)[0])


@pytest.fixture(scope="module")
def tiny():
    return tl.make_weights()


@pytest.mark.parametrize("tie", [False, True])
def test_hf_safetensors_matches_numpy_reference(tmp_path, tie):
    w = tl.make_weights(tie=tie)
    tl.write_hf(tmp_path, w, tie=tie)
    model, tok = aj.load_model(str(tmp_path))
    assert model.cfg.tie_embeddings == tie
    ids = tok.encode("hello tiny llama!")
    assert tok.decode(ids) == "hello tiny llama!"
    np.testing.assert_allclose(_ours_logits(model, ids), tl.reference_logits(w, ids, tie=tie),
                               atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0", "Q4_0", "Q4_1"])
def test_gguf_matches_hf_path_and_reference(tmp_path, tiny, qtype):
    """GGUF (Q/K rows permuted as llama.cpp does, quantized) == the numpy forward of the
    dequantized weights; for F32 it also equals the safetensors path exactly."""
    path = str(tmp_path / f"tiny-{qtype}.gguf")
    held = tl.write_gguf(path, tiny, qtype=qtype)
    model, tok = aj.load_model(path)
    ids = [5, 77, 200, 13, 42, 9, 150, 3, 250, 11]
    np.testing.assert_allclose(_ours_logits(model, ids), tl.reference_logits(held, ids),
                               atol=ATOL, rtol=1e-4)
    if qtype == "F32":
        tl.write_hf(tmp_path / "hf", tiny)
        hf_model, _ = aj.load_model(str(tmp_path / "hf"))
        np.testing.assert_allclose(_ours_logits(model, ids), _ours_logits(hf_model, ids), atol=1e-5)


def test_prefill_then_decode_equals_forward_without_cache(tmp_path, tiny):
    tl.write_hf(tmp_path, tiny)
    model, _ = aj.load_model(str(tmp_path))
    ids = [5, 77, 200, 13, 42, 9, 150, 3, 250, 11, 60, 61]
    full = tl.reference_logits(tiny, ids)
    cache = aj.KVCache.zeros(model.cfg, 1, 16, model.dtype)
    hidden, cache = model(jnp.asarray([ids[:5]]), jnp.arange(5)[None], cache, first_chunk=True)
    cache = cache.replace(lengths=jnp.array([5], jnp.int32))
    # a second prefill chunk attending to the cache through the mask path
    hidden, cache = model(jnp.asarray([ids[5:9]]), jnp.arange(5, 9)[None], cache)
    np.testing.assert_allclose(np.asarray(model.logits(hidden)[0]), full[5:9], atol=ATOL, rtol=1e-4)
    cache = cache.replace(lengths=jnp.array([9], jnp.int32))
    for t in range(9, 12):  # decode one token at a time
        hidden, cache = model(jnp.asarray([[ids[t]]]), jnp.array([[t]]), cache)
        cache = cache.replace(lengths=cache.lengths + 1)
        np.testing.assert_allclose(np.asarray(model.logits(hidden)[0, 0]), full[t], atol=ATOL,
                                   rtol=1e-4)


def test_chunked_generate_equals_reference_greedy(tmp_path, tiny):
    """generate() with a prefill chunk smaller than the prompt gives the reference's greedy ids."""
    tl.write_hf(tmp_path, tiny)
    model, tok = aj.load_model(str(tmp_path))
    ids = list(range(3, 40))
    res = aj.generate(model, tok, ids, 6, prefill_chunk_size=16, stop_at_eos=False)
    seq = list(ids)
    for _ in range(6):
        seq.append(int(np.argmax(tl.reference_logits(tiny, seq)[-1])))
    assert res.tokens[0] == seq[len(ids):]


def test_prefill_span_buckets_equal_whole_cache_and_reference(tmp_path, tiny):
    """Chunks attending over power-of-two spans of the cache (the default) give the logits of
    chunks attending over the whole cache, and of the numpy forward; from a cached prefix
    too (start 24: spans 32/64/.. of chunks of 8, unaligned to the chunks)."""
    from alaya_jax.generate import kv_span_for
    assert [kv_span_for(e, 8, 100) for e in (8, 16, 24, 33, 64, 65, 200)] == \
        [8, 16, 32, 64, 64, 100, 100]
    tl.write_hf(tmp_path, tiny)
    model, _ = aj.load_model(str(tmp_path))
    ids = np.asarray([list(range(3, 60))], np.int32)
    outs = []
    for buckets in (True, False):
        cache = aj.KVCache.zeros(model.cfg, 1, 100, model.dtype)
        _, cache = aj.prefill(model, ids[:, :24], np.array([24]), cache, chunk=8,
                              span_buckets=buckets)
        lg, _ = aj.prefill(model, ids[:, 24:], np.array([33]), cache, start=24, chunk=8,
                           span_buckets=buckets)
        outs.append(np.asarray(lg[0]))
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(outs[0], tl.reference_logits(tiny, list(ids[0]))[-1],
                               atol=ATOL, rtol=1e-4)


def test_llama3_rope_scaling_matches_formula():
    """Llama-3.1 scaling: high frequencies kept, low ones divided by factor, smooth between."""
    cfg = config_from_hf(dict(tl.TINY, model_type="llama", head_dim=128, rope_theta=500000.0,
                              rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 8192}))
    assert cfg.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    inv = rope_inv_freq(cfg)
    base = 1.0 / 500000.0 ** (np.arange(0, 128, 2) / 128)
    wavelen = 2 * np.pi / base
    hi, lo = wavelen < 8192 / 4, wavelen > 8192 / 1
    np.testing.assert_allclose(inv[hi], base[hi], rtol=1e-6)
    np.testing.assert_allclose(inv[lo], base[lo] / 8, rtol=1e-6)
    mid = ~hi & ~lo
    assert np.all((inv[mid] <= base[mid]) & (inv[mid] >= base[mid] / 8))
    lin = rope_inv_freq(dataclasses.replace(cfg, rope_scaling=RopeScaling("linear", 4.0)))
    np.testing.assert_allclose(lin, base / 4, rtol=1e-6)


def test_eight_b_shapes_by_eval_shape():
    """Llama-3-8B-shaped model and a 32K cache: shapes only, no memory."""
    from flax import nnx

    cfg = aj.model.llama3_8b_config()
    model = nnx.eval_shape(lambda: aj.Llama(cfg, dtype=jnp.bfloat16))
    assert model.wqkv.get_value().shape == (32, 4096, 4096 + 2 * 1024)
    assert model.w_gate_up.get_value().shape == (32, 4096, 2 * 14336)
    assert model.lm_head.get_value().shape == (4096, 128256)
    assert abs(cfg.param_count() - 8.03e9) < 0.01e9
    cache = aj.KVCache.abstract(cfg, 1, 32768, jnp.bfloat16)
    assert cache.k.shape == (32, 1, 32768, 8, 128)


def test_unrolled_layers_equal_scanned_layers(tmp_path, tiny):
    """The GPU default (straight-line layers) and the CPU default (lax.scan) agree."""
    tl.write_hf(tmp_path, tiny)
    model, _ = aj.load_model(str(tmp_path))
    ids = jnp.asarray([[5, 77, 200, 13, 42, 9]])
    cache = aj.KVCache.zeros(model.cfg, 1, 8, model.dtype)
    a, ca = model(ids, jnp.arange(6)[None], cache, first_chunk=True, unroll=True)
    b, cb = model(ids, jnp.arange(6)[None], cache, first_chunk=True, unroll=False)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    np.testing.assert_allclose(np.asarray(ca.k), np.asarray(cb.k), atol=1e-5)


def test_per_layer_cache_equals_stacked_cache(tmp_path, tiny):
    """The GPU cache layout (a tuple of per-layer buffers) through prefill chunks and decode."""
    tl.write_hf(tmp_path, tiny)
    model, _ = aj.load_model(str(tmp_path))
    ids = jnp.asarray([[5, 77, 200, 13, 42, 9, 8, 7]])
    outs = []
    for stacked in (True, False):
        cache = aj.KVCache.zeros(model.cfg, 1, 12, model.dtype, stacked=stacked)
        assert cache.stacked == stacked and cache.max_len == 12 and cache.n_layers == 2
        h1, cache = model(ids[:, :4], jnp.arange(4)[None], cache, first_chunk=True)
        h2, cache = model(ids[:, 4:], jnp.arange(4, 8)[None], cache)
        cache = cache.replace(lengths=jnp.array([8], jnp.int32))
        h3, cache = model(jnp.asarray([[11]]), jnp.array([[8]]), cache)
        outs.append((h1, h2, h3, cache.as_stacked().k))
    for a, b in zip(*outs):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_per_layer_weights_equal_stacked_weights(tmp_path, tiny):
    """The GPU weight layout (a tuple of per-layer arrays) computes what the stacked one does,
    through prefill and the jitted decode loop."""
    tl.write_hf(tmp_path, tiny)
    stacked, tok = aj.load_model(str(tmp_path), stack_layers=True)
    split, _ = aj.load_model(str(tmp_path), stack_layers=False)
    assert isinstance(split.wqkv.get_value(), tuple) and len(split.wqkv.get_value()) == 2
    ids = list(range(3, 30))
    a = aj.generate(stacked, tok, ids, 5, stop_at_eos=False)
    b = aj.generate(split, tok, ids, 5, stop_at_eos=False)
    np.testing.assert_allclose(a.last_prompt_logits, b.last_prompt_logits, atol=1e-5)
    assert a.tokens == b.tokens
