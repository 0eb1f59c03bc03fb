"""Captures the post-RoPE queries, keys and values a prompt produces, for analysis.

Used by the DIPR quality benchmark and the real-keys tests: the q of a position attends
to the k/v of every position up to it, exactly as during decoding.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alaya_jax.model.llama import KVCache, Llama


@functools.partial(jax.jit, static_argnames=("graphdef", "first_chunk", "layers"))
def _chunk_qkv(graphdef, state, tokens, start, cache, *, first_chunk, layers):
    model = nnx.merge(graphdef, state)
    B, C = tokens.shape
    positions = jnp.broadcast_to(start + jnp.arange(C, dtype=jnp.int32), (B, C))
    _, cache, (q, k, v) = model(tokens, positions, cache, first_chunk=first_chunk, collect_qkv=True)
    sel = jnp.asarray(layers)
    return cache, q[sel].astype(jnp.float32), k[sel].astype(jnp.float32), v[sel].astype(jnp.float32)


def capture_qkv(model: Llama, ids, layers, *, chunk: int = 512):
    """Runs `ids` (one sequence) through the model; returns {layer: (q, k, v)} as numpy f32.

    q [T, H, D], k [T, K, D], v [T, K, D]; q and k have RoPE applied (as attention sees them).
    """
    layers = tuple(int(l) for l in layers)
    for l in layers:
        if not 0 <= l < model.cfg.n_layers:
            raise ValueError(f"layer {l} is outside 0..{model.cfg.n_layers - 1}")
    ids = np.asarray(ids, np.int32)
    T = len(ids)
    n = max(1, math.ceil(T / chunk))
    padded = np.zeros((1, n * chunk), np.int32)
    padded[0, :T] = ids
    graphdef, state = nnx.split(model)
    cache = KVCache.zeros(model.cfg, 1, n * chunk, model.dtype)
    qs, ks, vs = [], [], []
    for c in range(n):
        cache, q, k, v = _chunk_qkv(graphdef, state, jnp.asarray(padded[:, c * chunk:(c + 1) * chunk]),
                                    jnp.int32(c * chunk), cache, first_chunk=(c == 0), layers=layers)
        qs.append(np.asarray(q[:, 0]))
        ks.append(np.asarray(k[:, 0]))
        vs.append(np.asarray(v[:, 0]))
    q, k, v = (np.concatenate(a, axis=1)[:, :T] for a in (qs, ks, vs))
    return {l: (q[i], k[i], v[i]) for i, l in enumerate(layers)}
