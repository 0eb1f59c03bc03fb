"""A Llama-family decoder in Flax NNX: RMSNorm, RoPE (plain, linear, llama3), GQA, SwiGLU.

On the CPU the L layers' weights are stacked along a leading axis and run with `lax.scan`,
so a 30-layer model compiles as fast as a one-layer one; on the GPU they are separate
arrays run as straight-line code (see `Llama`). The KV cache is a pytree carried
through the scan and updated in place. The model never selects keys itself: decode
attention is a function passed in (`attention(q, k, v, kv_len) -> o`), so the DIPR path
plugs in without touching this file.

Axis letters: B batch, T query len, S cache len, E width, H q heads, K kv heads, D head dim,
F ffn width, V vocab, L layers.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alaya_jax.errors import ShapeError
from alaya_jax.model.config import LlamaConfig

MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)  # finite: -inf - -inf is NaN


class RopeFreqs(nnx.Variable):
    """Inverse RoPE frequencies [D/2] (not trained; a GGUF may carry its own factors)."""


def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
    """Inverse frequencies [D/2] with the config's scaling applied (as HF computes them)."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    s = cfg.rope_scaling
    if s is None:
        return inv.astype(np.float32)
    if s.kind == "linear":
        return (inv / s.factor).astype(np.float32)
    low_wl = s.original_max_position / s.low_freq_factor
    high_wl = s.original_max_position / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wl, inv / s.factor, inv)
    smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wl) & (wavelen <= low_wl)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """x [B, T, N, D], positions [B, T] -> x rotated (HF "rotate_half" layout), x's dtype."""
    ang = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, D/2]
    cos, sin = jnp.cos(ang)[:, :, None, :], jnp.sin(ang)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (y * w.astype(jnp.float32)).astype(x.dtype)


@flax.struct.dataclass
class KVCache:
    """Keys (post-RoPE) and values of every layer, right-padded per sequence.

    k and v are either stacked arrays [L, B, S, K, D] (the CPU default) or tuples of L arrays
    [B, S, K, D] (the GPU default: a decode loop then updates and reads each layer's buffer in
    place, where slices of a stacked cache were copied every step). `layer(i)` reads either.
    """

    k: jax.Array | tuple  # [L, B, S, K, D] or L x [B, S, K, D]
    v: jax.Array | tuple
    lengths: jax.Array  # [B] int32: valid tokens per sequence

    @staticmethod
    def abstract(cfg: LlamaConfig, batch: int, max_len: int, dtype,
                 stacked: bool | None = None) -> "KVCache":
        stacked = jax.default_backend() == "cpu" if stacked is None else stacked
        layer = jax.ShapeDtypeStruct((batch, max_len, cfg.n_kv_heads, cfg.head_dim), dtype)
        if stacked:
            k = jax.ShapeDtypeStruct((cfg.n_layers,) + layer.shape, dtype)
        else:
            k = (layer,) * cfg.n_layers
        return KVCache(k=k, v=k, lengths=jax.ShapeDtypeStruct((batch,), jnp.int32))

    @staticmethod
    def zeros(cfg: LlamaConfig, batch: int, max_len: int, dtype,
              stacked: bool | None = None) -> "KVCache":
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                            KVCache.abstract(cfg, batch, max_len, dtype, stacked))

    @property
    def stacked(self) -> bool:
        return not isinstance(self.k, (tuple, list))

    @property
    def max_len(self) -> int:
        return (self.k if self.stacked else self.k[0]).shape[-3]

    @property
    def n_layers(self) -> int:
        return self.k.shape[0] if self.stacked else len(self.k)

    def layer(self, i) -> tuple[jax.Array, jax.Array]:
        """(k, v) of layer i, each [B, S, K, D]."""
        return self.k[i], self.v[i]

    def as_stacked(self) -> "KVCache":
        return self if self.stacked else self.replace(k=jnp.stack(self.k), v=jnp.stack(self.v))

    def as_layers(self) -> "KVCache":
        if not self.stacked:
            return self
        return self.replace(k=tuple(self.k[i] for i in range(self.n_layers)),
                            v=tuple(self.v[i] for i in range(self.n_layers)))


def _write_token(cache, li, pos, val):
    """Writes val [B, K, D] at position pos [B] of layer li (li static for a tuple cache)."""
    b = jnp.arange(val.shape[0])
    if isinstance(cache, tuple):
        return cache[:li] + (cache[li].at[b, pos].set(val),) + cache[li + 1:]
    return cache.at[li, b, pos].set(val)


def _write_chunk(cache, li, start, val):
    """Writes val [B, T, K, D] at positions start..start+T-1 of layer li."""
    if isinstance(cache, tuple):
        return cache[:li] + (jax.lax.dynamic_update_slice(cache[li], val, (0, start, 0, 0)),) + cache[li + 1:]
    return jax.lax.dynamic_update_slice(cache, val[None], (li, 0, start, 0, 0))


# Decode attention: fn(q [B,H,D], k [B,S,K,D], v, kv_len [B]) -> o [B,H,D]; with a per-layer
# state (an index over the cache), fn(q, k, v, kv_len, state) -> (o, state, stats).
AttentionFn = Callable[..., Any]


def decode_attention_reference(q, k, v, kv_len):
    """Dense decode attention in plain jnp, the reference every other path is compared with.

    q [B, H, D], k/v [B, S, K, D], kv_len [B] -> o [B, H, D] in q's dtype (f32 math).
    """
    B, H, D = q.shape
    K = k.shape[2]
    # Inputs stay in the cache dtype (no f32 copy of the cache); products accumulate in f32.
    qg = q.reshape(B, K, H // K, D).astype(k.dtype)
    s = jnp.einsum("bkgd,bskd->bkgs", qg, k, preferred_element_type=jnp.float32) / math.sqrt(D)
    valid = jnp.arange(k.shape[1])[None, :] < kv_len[:, None]  # [B, S]
    s = jnp.where(valid[:, None, None, :], s, MASK_VALUE)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bkgs,bskd->bkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o.reshape(B, H, D).astype(q.dtype)


def decode_attention_cudnn(q, k, v, kv_len):
    """The same through cuDNN's fused attention (GPU, bf16/f16, head dim <= 128): one kernel
    instead of XLA's score / softmax / value fusions (8B decode at 4K: 5.90 vs 6.17 ms/token
    on an H100, .scratch probe 2026-11-26)."""
    o = jax.nn.dot_product_attention(q[:, None].astype(k.dtype), k, v,
                                     key_value_seq_lengths=kv_len.astype(jnp.int32),
                                     implementation="cudnn")
    return o[:, 0].astype(q.dtype)


def cudnn_supports(q, k) -> bool:
    return (jax.default_backend() == "gpu" and k.dtype in (jnp.bfloat16, jnp.float16)
            and k.shape[-1] <= 128 and k.shape[-1] % 8 == 0)


def decode_attention_flat(q, k, v, kv_len):
    """`decode_attention_reference` with the cache read as it is laid out, [B, S*K, D]: every
    query head scores every kv head's keys (K times the reference's FLOPs) and the other kv
    heads are masked out. The reference's products batch over (B, K), so XLA first transposes
    each layer's cache slice to [B, K, S, D], a copy of the whole cache every step: on the CPU
    this form decodes SmolLM2 1.20x / 1.11x as fast at 4K / 7.7K cached tokens and the same
    at 512 (2 cores, benchmarks/results/cpu_decode_attention.json). Equal to the reference
    for kv_len >= 1."""
    B, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    s = jnp.einsum("bhd,bxd->bhx", q.astype(k.dtype), k.reshape(B, S * K, D),
                   preferred_element_type=jnp.float32) / math.sqrt(D)
    own = jnp.arange(K)[None, :] == (jnp.arange(H) // (H // K))[:, None]  # [H, K]
    valid = jnp.arange(S)[None, :] < kv_len[:, None]  # [B, S]
    keep = own[None, :, None, :] & valid[:, None, :, None]  # [B, H, S, K]
    s = jnp.where(keep, s.reshape(B, H, S, K), MASK_VALUE).reshape(B, H, S * K)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bhx,bxd->bhd", p.astype(v.dtype), v.reshape(B, S * K, D),
                   preferred_element_type=jnp.float32)
    return o.astype(q.dtype)


def full_decode_attention(q, k, v, kv_len):
    """Dense decode attention: cuDNN on the GPU where it applies, on the CPU
    `decode_attention_flat`, else the jnp reference.

    q [B, H, D], k/v [B, S, K, D] (K divides H), kv_len [B] -> o [B, H, D] in q's dtype.
    """
    if cudnn_supports(q, k):
        return decode_attention_cudnn(q, k, v, kv_len)
    if jax.default_backend() == "cpu":
        return decode_attention_flat(q, k, v, kv_len)
    return decode_attention_reference(q, k, v, kv_len)


# The per-layer parameters as the model holds them (Q|K|V and gate|up fused).
LAYER_PARAMS = ("attn_norm", "wqkv", "wo", "ffn_norm", "w_gate_up", "w_down")


class Llama(nnx.Module):
    """Llama decoder. Linear weights are stored [in, out]; Q|K|V are one matrix `wqkv`
    [E, (H + 2K) D] and gate|up one matrix `w_gate_up` [E, 2F] (`fused_layer_weights`).

    Per-layer weights are either stacked along a leading L axis (`stack_layers=True`, the CPU
    default: `lax.scan` over layers compiles fast) or held as a tuple of L separate arrays
    (the GPU default). Inside a jitted decode loop XLA copies every slice of a stacked weight
    before its matmul: on an H200, 8B-shaped layers in a loop ran 13.3 ms per step stacked vs
    6.5 ms as separate arrays (.scratch probe, 2026-11-26).
    """

    def __init__(self, cfg: LlamaConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None,
                 stack_layers: bool = True):
        self.cfg = cfg
        self.stacked = stack_layers
        rngs = rngs or nnx.Rngs(0)
        E, F, V, L = cfg.dim, cfg.ffn_dim, cfg.vocab_size, cfg.n_layers
        H, K, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim

        def normal(shape, fan_in):
            x = jax.random.normal(rngs.params(), shape, jnp.float32) / math.sqrt(fan_in)
            return x.astype(dtype)

        def per_layer(make):
            if stack_layers:
                return nnx.Param(jnp.stack([make() for _ in range(L)]))
            return nnx.Param(tuple(make() for _ in range(L)))

        self.embed = nnx.Param((jax.random.normal(rngs.params(), (V, E)) * 0.02).astype(dtype))
        self.attn_norm = per_layer(lambda: jnp.ones((E,), dtype))
        # Q, K, V in one matrix and gate, up in another: at batch 1 each projection is a
        # matrix-vector product bound by launch and tail costs; fused, 8B decode at 4K took
        # 6.17 vs 7.43 ms/token on an H100 (.scratch probe, 2026-11-26).
        self.wqkv = per_layer(lambda: normal((E, (H + 2 * K) * D), E))
        self.wo = per_layer(lambda: normal((H * D, E), H * D))
        self.ffn_norm = per_layer(lambda: jnp.ones((E,), dtype))
        self.w_gate_up = per_layer(lambda: normal((E, 2 * F), E))
        self.w_down = per_layer(lambda: normal((F, E), F))
        self.final_norm = nnx.Param(jnp.ones((E,), dtype))
        self.lm_head = None if cfg.tie_embeddings else nnx.Param(normal((E, V), E))
        self.rope_inv_freq = RopeFreqs(jnp.asarray(rope_inv_freq(cfg)))

    @property
    def dtype(self):
        return self.embed.get_value().dtype

    def layer_weights(self) -> dict[str, jax.Array]:
        return {n: getattr(self, n).get_value() for n in LAYER_PARAMS}

    def __call__(self, tokens, positions, cache: KVCache, *, attention: AttentionFn | None = None,
                 first_chunk: bool = False, collect_qkv: bool = False, unroll: bool | None = None,
                 attn_state: Any = None, query_index: jax.Array | None = None,
                 kv_span: int | None = None):
        """Runs T new tokens per sequence and writes their K/V into the cache.

        tokens, positions: [B, T] int32. With T == 1 (decode) the new token of sequence b
        sits at cache.lengths[b] and `attention` (default: full) attends over the cache.
        With T > 1 (a prefill chunk) every sequence's chunk starts at the same position
        positions[:, 0] (right padding); causal attention through jax.nn.dot_product_attention.
        `first_chunk` (static) says the chunk starts at 0, so it attends only to itself.
        Returns (hidden [B, T, E], cache with lengths unchanged: the caller advances them),
        plus, with `collect_qkv` (static), the post-RoPE (q [L,B,T,H,D], k, v [L,B,T,K,D]),
        or, with `query_index` [B, n] (chunk-local positions, prefill only), the post-RoPE q
        at those positions only, [L, B, n, H, D] (the few queries a sparse method calibrates
        on, without holding every position's q).
        `kv_span` (static, prefill chunks after the first): the chunk attends over the first
        kv_span cache positions only (they must cover the chunk's positions), not all max_len.
        `unroll` (static; default: on for GPU/TPU) runs the layers as straight-line code:
        under `lax.scan` XLA copies each layer's weight slice before its matmuls, which made
        8B decode 2.7x slower on an H200 (11.0 vs 4.1 ms, weights read at 1.27 vs 3.38 TB/s);
        on the CPU the scan keeps compile times short.
        `attn_state` (decode only): per-layer state of a stateful attention method, stacked
        [L, ...] in the scan and a tuple of L in the unrolled path; the call then returns
        (hidden, cache, new attn_state, per-layer stats) with stats stacked [L, ...].
        """
        cfg = self.cfg
        B, T = tokens.shape
        H, K, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        decode = T == 1 and not first_chunk
        if query_index is not None and (decode or collect_qkv):
            raise ShapeError("query_index is for prefill chunks (T > 1), without collect_qkv")
        attention = attention or full_decode_attention
        inv_freq = self.rope_inv_freq.get_value()
        x = jnp.take(self.embed.get_value(), tokens, axis=0)  # [B, T, E]
        start = positions[0, 0]
        S = cache.max_len
        cache_dtype = jax.tree.leaves(cache.k)[0].dtype

        def layer(carry, xs):
            lw, st = xs
            x, kc, vc, li = carry
            h = rms_norm(x, lw["attn_norm"], cfg.norm_eps)
            qkv = jnp.einsum("bte,ef->btf", h, lw["wqkv"])
            q, k, v = jnp.split(qkv, [H * D, (H + K) * D], axis=-1)
            q, k, v = q.reshape(B, T, H, D), k.reshape(B, T, K, D), v.reshape(B, T, K, D)
            q = apply_rope(q, positions, inv_freq)
            k = apply_rope(k, positions, inv_freq).astype(cache_dtype)
            v = v.astype(cache_dtype)
            if decode:
                kc = _write_token(kc, li, cache.lengths, k[:, 0])
                vc = _write_token(vc, li, cache.lengths, v[:, 0])
                if attn_state is None:
                    o = attention(q[:, 0], kc[li], vc[li], cache.lengths + 1)
                else:
                    o, st, stat = attention(q[:, 0], kc[li], vc[li], cache.lengths + 1, st)
                o = o[:, None]
            else:
                kc = _write_chunk(kc, li, start, k)
                vc = _write_chunk(vc, li, start, v)
                if first_chunk:
                    o = jax.nn.dot_product_attention(q, k, v, is_causal=True)
                else:
                    span = S if kv_span is None else min(kv_span, S)
                    kpos = jnp.arange(span)
                    mask = kpos[None, None, None, :] <= positions[:, None, :, None]  # [B,1,T,S]
                    o = jax.nn.dot_product_attention(q, kc[li][:, :span], vc[li][:, :span],
                                                     mask=mask)
            o = o.reshape(B, T, H * D).astype(x.dtype)
            x = x + jnp.einsum("btf,fe->bte", o, lw["wo"])
            h = rms_norm(x, lw["ffn_norm"], cfg.norm_eps)
            g, u = jnp.split(jnp.einsum("bte,ef->btf", h, lw["w_gate_up"]), 2, axis=-1)
            x = x + jnp.einsum("btf,fe->bte", jax.nn.silu(g) * u, lw["w_down"])
            if collect_qkv:
                extra = (q, k, v)
            elif query_index is not None:  # [B, n, H, D]
                extra = jnp.take_along_axis(q, query_index[:, :, None, None], axis=1)
            else:
                extra = None
            ys = (extra, st, stat if attn_state is not None else None)
            return (x, kc, vc, li + 1), ys

        if unroll is None:
            unroll = jax.default_backend() != "cpu"
        unroll = unroll or not self.stacked or not cache.stacked  # scan needs stacked arrays
        weights = self.layer_weights()
        if unroll:
            carry, outs = (x, cache.k, cache.v, 0), []
            for i in range(cfg.n_layers):  # static i: static slices, no weight copies
                st = None
                if attn_state is not None:
                    st = (attn_state[i] if isinstance(attn_state, tuple)
                          else jax.tree.map(lambda a: a[i], attn_state))
                carry, out = layer(carry, ({n: w[i] for n, w in weights.items()}, st))
                outs.append(out)
            (x, kc, vc, _) = carry
            qkv = (jax.tree.map(lambda *a: jnp.stack(a), *[o[0] for o in outs])
                   if collect_qkv or query_index is not None else None)
            new_state = tuple(o[1] for o in outs)
            if attn_state is not None and not isinstance(attn_state, tuple):
                new_state = jax.tree.map(lambda *a: jnp.stack(a), *new_state)
            stats = jax.tree.map(lambda *a: jnp.stack(a), *[o[2] for o in outs])
        else:
            if isinstance(attn_state, tuple):
                attn_state = jax.tree.map(lambda *a: jnp.stack(a), *attn_state)
            (x, kc, vc, _), (qkv, new_state, stats) = jax.lax.scan(
                layer, (x, cache.k, cache.v, jnp.int32(0)), (weights, attn_state))
        x = rms_norm(x, self.final_norm.get_value(), cfg.norm_eps)
        cache = cache.replace(k=kc, v=vc)
        if attn_state is not None:
            return x, cache, new_state, stats
        if collect_qkv or query_index is not None:
            return x, cache, qkv
        return x, cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [..., E] (already normed) -> logits [..., V] in f32."""
        if self.lm_head is None:  # tied: contract with the [V, E] table as it is stored (its
            # transpose was copied every decode step on the CPU: 113 MB for SmolLM2)
            return jnp.einsum("...e,ve->...v", hidden, self.embed.get_value(),
                              preferred_element_type=jnp.float32)
        return jnp.einsum("...e,ev->...v", hidden, self.lm_head.get_value(),
                          preferred_element_type=jnp.float32)
