"""Flat exact DIPR against brute force and hand-made cases with the expected sets written out."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alaya_jax.dipr import (MASK_VALUE, AttentionOut, dipr_reference, full_attention,
                            merge_attention)
from alaya_jax.errors import ShapeError

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}

dipr_jit = jax.jit(dipr_reference)  # beta, sink, window traced: one compile per shape


def _hand_kv(first_channel, D=4):
    """Keys whose score for q = (2, 0, ..) is exactly first_channel (q.k / sqrt(4) = k[0])."""
    S = len(first_channel)
    k = np.zeros((1, S, 1, D), np.float32)
    k[0, :, 0, 0] = first_channel
    v = np.arange(S * D, dtype=np.float32).reshape(1, S, 1, D) / 10
    return jnp.asarray(k), jnp.asarray(v)


Q2 = jnp.asarray([[[2.0, 0.0, 0.0, 0.0]]])  # [1, 1, 4]: score_i = k_i[0]


@pytest.mark.parametrize(
    "scores, beta, sink, window, expected",
    [
        # max 5 at 1 and 5; threshold 4.5; 4.5 at 3 ties the threshold and is kept
        ([0, 5, 3, 4.5, 1, 5, 2], 0.5, 0, 0, [1, 3, 5]),
        # same with sink 1 and window 1 always kept
        ([0, 5, 3, 4.5, 1, 5, 2], 0.5, 1, 1, [0, 1, 3, 5, 6]),
        # the max sits in the sink: only keys within beta of it
        ([9, 5, 3, 8.5, 1, 5, 2], 0.5, 1, 0, [0, 3]),
        # the max sits in the window
        ([0, 5, 3, 4.5, 1, 5, 20], 1.0, 0, 2, [5, 6]),
        # beta 0: only the ties at the max
        ([1, 7, 7, 2], 0.0, 0, 0, [1, 2]),
        # negative scores
        ([-3, -1, -2.5, -1.5], 1.0, 0, 0, [1, 3]),
        # sink and window cover everything
        ([0, 5, 1], 0.1, 2, 1, [0, 1, 2]),
    ])
def test_hand_made_sets(scores, beta, sink, window, expected):
    k, v = _hand_kv(scores)
    res = dipr_jit(Q2, k, v, beta=beta, sink=sink, window=window)
    got = np.nonzero(np.asarray(res.kept[0, 0]))[0].tolist()
    assert got == expected
    assert float(res.max_score[0, 0]) == pytest.approx(max(scores))
    assert float(res.threshold[0, 0]) == pytest.approx(max(scores) - beta)


def test_hand_made_gqa_group():
    # one kv head serving 3 query heads that look at different channels
    D = 4
    k = np.zeros((1, 6, 1, D), np.float32)
    k[0, :, 0, 0] = [5, 0, 0, 4, 0, 1]
    k[0, :, 0, 1] = [0, 3, 3, 0, 2.5, 0]
    q = np.zeros((1, 3, D), np.float32)
    q[0, 0, 0] = 2.0  # scores = channel 0
    q[0, 1, 1] = 2.0  # scores = channel 1
    q[0, 2, 0] = -2.0  # scores = -channel 0
    v = np.ones((1, 6, 1, D), np.float32)
    res = dipr_jit(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), beta=1.0, sink=0, window=0)
    kept = [np.nonzero(np.asarray(res.kept[0, h]))[0].tolist() for h in range(3)]
    # head 2: max 0 at 1, 2, 4; threshold -1 ties with position 5
    assert kept == [[0, 3], [1, 2, 4], [1, 2, 4, 5]]


def test_lengths_mask_padding_and_window_is_relative_to_length():
    k, v = _hand_kv([0, 5, 3, 4.5, 1, 100, 100])  # positions 5, 6 are padding (length 5)
    res = dipr_jit(Q2, k, v, beta=0.5, sink=0, window=1, lengths=jnp.asarray([5]))
    assert np.nonzero(np.asarray(res.kept[0, 0]))[0].tolist() == [1, 3, 4]


def _brute(q, k, v, beta, sink, window, lengths):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    B, H, D = q.shape
    K = k.shape[2]
    G = H // K
    o = np.zeros((B, H, D))
    sets = np.zeros((B, H, k.shape[1]), bool)
    for b in range(B):
        L = int(lengths[b])
        for h in range(H):
            s = k[b, :L, h // G] @ q[b, h] / math.sqrt(D)
            keep = s >= s.max() - beta
            keep[:sink] = True
            keep[max(L - window, 0):] = True
            sets[b, h, :L] = keep
            p = np.exp(s[keep] - s[keep].max())
            o[b, h] = p @ v[b, :L, h // G][keep] / p.sum()
    return o, sets


@pytest.mark.parametrize("G", [1, 3, 4, 8])
def test_matches_brute_force_gqa(G):
    rng = np.random.default_rng(G)
    B, S, K, D = 2, 37, 2, 8
    H = K * G
    q = rng.normal(size=(B, H, D)).astype(np.float32) * 3
    k = rng.normal(size=(B, S, K, D)).astype(np.float32)
    v = rng.normal(size=(B, S, K, D)).astype(np.float32)
    lengths = np.array([37, 20], np.int32)
    res = dipr_jit(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), beta=1.5, sink=2, window=3,
                   lengths=jnp.asarray(lengths))
    o_ref, sets = _brute(q, k, v, 1.5, 2, 3, lengths)
    np.testing.assert_array_equal(np.asarray(res.kept), sets)
    np.testing.assert_allclose(np.asarray(res.o), o_ref, atol=TOL[jnp.float32])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_beta_inf_is_full_attention(dtype):
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 4, 16)), dtype)
    k = jnp.asarray(rng.normal(size=(2, 33, 2, 16)), dtype)
    v = jnp.asarray(rng.normal(size=(2, 33, 2, 16)), dtype)
    lengths = jnp.asarray([33, 7])
    res = dipr_jit(q, k, v, beta=float("inf"), lengths=lengths)
    full = jax.jit(full_attention)(q, k, v, lengths)
    assert res.o.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(res.o), np.asarray(full.o), atol=TOL[dtype])
    assert np.asarray(res.kept).sum(-1).tolist() == [[33] * 4, [7] * 4]


def test_empty_sequence_returns_zero():
    k, v = _hand_kv([1.0, 2.0, 3.0])
    res = dipr_jit(Q2, k, v, beta=1.0, sink=1, window=1, lengths=jnp.asarray([0]))
    assert not np.asarray(res.kept).any()
    np.testing.assert_array_equal(np.asarray(res.o), 0.0)
    assert np.isfinite(np.asarray(res.o)).all() and float(res.lse[0, 0]) == np.float32(MASK_VALUE)


def test_merge_is_attention_over_the_union():
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(1, 2, 8)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 20, 1, 8)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(1, 20, 1, 8)), jnp.float32)
    full_jit = jax.jit(full_attention)
    a = full_jit(q, k[:, :12], v[:, :12])
    b = full_jit(q, k[:, 12:], v[:, 12:])
    empty = AttentionOut(jnp.zeros_like(a.o), jnp.full_like(a.lse, MASK_VALUE))
    merged = jax.jit(merge_attention)(a, empty, b)
    full = full_jit(q, k, v)
    np.testing.assert_allclose(np.asarray(merged.o), np.asarray(full.o), atol=1e-5)
    np.testing.assert_allclose(np.asarray(merged.lse), np.asarray(full.lse), atol=1e-5)


def test_shape_errors():
    k, v = _hand_kv([1.0, 2.0])
    with pytest.raises(ShapeError, match="multiple"):
        dipr_reference(jnp.zeros((1, 3, 4)), jnp.zeros((1, 2, 2, 4)), jnp.zeros((1, 2, 2, 4)), 1.0)
    with pytest.raises(ShapeError):
        dipr_reference(Q2, k, v[:, :1], 1.0)
