"""Dense decode attention paths against the jnp reference: cuDNN (the GPU default; runs only
where a GPU is present, `pytest -m gpu`) and the flat-cache form (the CPU default), and the
dispatch between them.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alaya_jax.model.llama import (cudnn_supports, decode_attention_cudnn,
                                   decode_attention_flat, decode_attention_reference,
                                   full_decode_attention)


def _inputs(B, S, H, K, D, dtype, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(ks[0], (B, H, D), jnp.float32).astype(dtype)
    k = (jax.random.normal(ks[1], (B, S, K, D), jnp.float32) * 2).astype(dtype)
    v = jax.random.normal(ks[2], (B, S, K, D), jnp.float32).astype(dtype)
    return q, k, v


def test_dispatch_off_cudnn():
    q, k, v = _inputs(2, 40, 4, 2, 16, jnp.float32)
    n = jnp.array([40, 7], jnp.int32)
    if not cudnn_supports(q, k):
        other = (decode_attention_flat if jax.default_backend() == "cpu"
                 else decode_attention_reference)
        np.testing.assert_array_equal(np.asarray(full_decode_attention(q, k, v, n)),
                                      np.asarray(other(q, k, v, n)))
    assert not cudnn_supports(q, k.astype(jnp.float32))  # f32 never goes to cuDNN


@pytest.mark.parametrize("H,K,dtype", [(9, 3, jnp.float32), (8, 2, jnp.bfloat16),
                                       (4, 4, jnp.float32), (6, 1, jnp.float32)])
def test_flat_cache_form_matches_reference(H, K, dtype):
    """GQA groups 3, 4, 1 and 6; batch of 3 with the whole cache, one key and a ragged
    length; a cache longer than every length (the rest holds junk that must not count)."""
    S, D = 77, 32
    q, k, v = _inputs(3, S, H, K, D, dtype, seed=H + K)
    n = jnp.array([S, 1, 30], jnp.int32)
    got = jax.jit(decode_attention_flat)(q, k, v, n).astype(jnp.float32)
    want = jax.jit(decode_attention_reference)(q, k, v, n).astype(jnp.float32)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=tol, rtol=tol)
    np.testing.assert_allclose(np.asarray(got[1]),  # one key: the output is its value
                               np.repeat(np.asarray(v[1, 0], np.float32), H // K, axis=0),
                               atol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("H,K,D", [(32, 8, 128), (9, 3, 64), (4, 4, 64)])
def test_cudnn_matches_reference(H, K, D):
    S = 1000  # not a multiple of any tile
    q, k, v = _inputs(3, S, H, K, D, jnp.bfloat16)
    n = jnp.array([S, 1, 333], jnp.int32)  # full, a single key, ragged
    got = jax.jit(decode_attention_cudnn)(q, k, v, n).astype(jnp.float32)
    want = jax.jit(decode_attention_reference)(q, k, v, n).astype(jnp.float32)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-2, rtol=2e-2)
    np.testing.assert_allclose(np.asarray(got[1]),  # one key: the output is its value
                               np.repeat(np.asarray(v[1, 0], np.float32), H // K, axis=0),
                               atol=1e-2)
