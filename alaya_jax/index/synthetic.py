"""Synthetic decode caches with the structure of real post-RoPE keys, for tests and benchmarks.

Keys are drawn around a few topic directions (clusters) with a couple of large-magnitude
outlier channels, a few "hot" keys the queries align with, and RoPE applied by position, so
nearby tokens are similar; queries are a mix of a topic direction and a hot key. Not a
substitute for real keys (the quality benchmark uses the model), but it has clusters,
heavy-hitters and positional drift, unlike i.i.d. noise.
"""

from __future__ import annotations

import numpy as np


def apply_rope_np(x, positions, theta: float = 10000.0):
    """x [..., S, ..., D] with positions broadcast on axis 1 of [B, S, K, D] (half-split RoPE)."""
    D = x.shape[-1]
    inv = theta ** (-np.arange(0, D, 2) / D)  # [D/2]
    ang = positions[..., None] * inv  # [..., D/2]
    c, s = np.cos(ang), np.sin(ang)
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return np.concatenate([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)


def synthetic_kv(B: int, S: int, H: int, K: int, D: int, *, n_topics: int = 12, hot: int = 6,
                 seed: int = 0, dtype=np.float32):
    """Returns q [B, H, D], k [B, S, K, D], v [B, S, K, D] (numpy) for decode at position S."""
    rng = np.random.default_rng(seed)
    G = H // K
    topics = rng.normal(size=(B, K, n_topics, D)) * 1.5
    # topics change slowly along the sequence: segments of ~S/n_topics tokens
    seg = np.minimum((np.arange(S) * n_topics) // max(S, 1), n_topics - 1)
    choice = np.where(rng.random((B, S, K)) < 0.7, seg[None, :, None],
                      rng.integers(0, n_topics, (B, S, K)))
    base = np.take_along_axis(topics[:, None], choice[..., None, None], axis=3)[:, :, :, 0]
    k = base.transpose(0, 1, 2, 3) + rng.normal(size=(B, S, K, D))
    k[..., :2] += 6.0  # outlier channels: a large shared offset (as in real keys)
    hot_pos = rng.integers(0, S, (B, hot))
    pos = np.arange(S, dtype=np.float64)
    k = apply_rope_np(k, pos[None, :, None])
    q = np.empty((B, H, D))
    for b in range(B):
        for h in range(H):
            kh = h // G
            hp = hot_pos[b, h % hot]
            k[b, hp, kh] += rng.normal(size=D) * 2.0  # a hot key stands out
            direction = k[b, hp, kh] / np.linalg.norm(k[b, hp, kh])
            q[b, h] = direction * 14.0 + rng.normal(size=D) * 1.5
    v = rng.normal(size=(B, S, K, D))
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)
