"""The DIPR query: the flat exact reference and the numerics every sparse path shares.

For one query head with scaled scores s_i = q.k_i / sqrt(D),

    DIPR(q, beta) = { i : s_i >= max_j s_j - beta }

plus the first `sink` tokens and the last `window` tokens of each sequence, which are
always kept. Every kept key has softmax weight at least e^-beta times the largest one.
`dipr_reference` computes every score, takes the threshold over all valid tokens and
attends over the kept set only: it is what every other path is tested and measured
against.

Numerics contract (shared with the cluster/block paths and the Pallas kernels): scores and
softmax in f32, a finite mask value (`MASK_VALUE`, never -inf in softmax math), masked
probabilities forced to exactly 0, and a row with nothing kept returns o = 0 and
lse = MASK_VALUE (so it weighs nothing in a log-sum-exp merge).

Layout (the model's decode cache): q [B, H, D] post-RoPE, k and v [B, S, K, D] post-RoPE,
lengths [B] int32 (valid prefix of each sequence). H = K * G (GQA: query head h reads kv
head h // G).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from alaya_jax.errors import ShapeError

MASK_VALUE = -1e30  # finite: MASK - MASK = 0, never NaN; exp(MASK - m) == 0 for any real m


class AttentionOut(NamedTuple):
    o: jax.Array  # [B, H, D] f32
    lse: jax.Array  # [B, H] f32, log-sum-exp of the kept scores (MASK_VALUE when none)


class DiprResult(NamedTuple):
    o: jax.Array  # [B, H, D] f32
    lse: jax.Array  # [B, H] f32
    kept: jax.Array  # [B, H, S] bool, the DIPR set (sink and window included)
    threshold: jax.Array  # [B, H] f32, max over valid scores - beta
    max_score: jax.Array  # [B, H] f32


def check_decode_shapes(q, k, v, lengths=None):
    """Validates q [B,H,D], k/v [B,S,K,D], lengths [B]; returns (B, S, H, K, D)."""
    if q.ndim != 3 or k.ndim != 4 or v.shape != k.shape:
        raise ShapeError(f"expected q [B,H,D] and k, v [B,S,K,D]; got q {q.shape}, k {k.shape}, "
                         f"v {v.shape}")
    B, H, D = q.shape
    Bk, S, K, Dk = k.shape
    if Bk != B or Dk != D:
        raise ShapeError(f"q {q.shape} and k {k.shape} disagree on batch or head dim")
    if H % K:
        raise ShapeError(f"query heads H={H} are not a multiple of kv heads K={K}")
    if lengths is not None and lengths.shape != (B,):
        raise ShapeError(f"lengths must be [B]=({B},), got {lengths.shape}")
    return B, S, H, K, D


def _plain_gemm() -> bool:
    """On a GPU, products with a positional cache [B,S,K,D] run as plain GEMMs against a
    block-diagonal expansion of the other operand (the K kv heads side by side: K x the
    FLOPs of a one-query product, which is memory-bound anyway). Written as a dot with batch
    dims (b, k), XLA first copies the whole cache into [B,K,S,D] (batch dims must be major):
    at 8B shapes and 128K that doubled a flat DIPR decode step (H200: 18.2 ms vs 8.3 for cuDNN
    full attention); multiply + reduce avoided the copy but ran at ~1/10 of the bandwidth.
    Trace-time choice for the exact region's small products (`attention._exact_region`); the
    whole-cache products (`scaled_scores`, `masked_attention`) take the plain GEMMs on every
    backend (on the CPU 3.2x / 1.8x faster than the batched forms: `_gemm`)."""
    return jax.default_backend() == "gpu"


def _gemm(spec, a, cache_part):
    """einsum(spec, a, cache_part) in f32 accuracy (spec's first letter: a stacking axis of
    size 2 or 1 that _gemm adds to a on a GPU). A bf16/f16 cache runs tensor-core GEMMs
    in its own dtype with f32 accumulation on a split a = hi + lo (both rounded to that dtype:
    the cache's values are exact in it, so the products are exact up to lo's rounding, ~2^-16
    relative for bf16), one GEMM with hi and lo stacked on a's free axis; an f32 cache runs a
    full-precision f32 GEMM. An `a` already in the 16-bit cache's dtype (a bf16 query against
    a bf16 cache) is exact in it: one GEMM, no split (and no sum of the two after it).

    Elsewhere than on a GPU the product runs in f32 (a 16-bit cache's values are exact in it;
    XLA's CPU backend has no 16-bit dot with an f32 result), without the stacking axis and
    with both operands as [M, K] x [K, N] (the cache first when it contracts its minor axis,
    the result transposed after): XLA's CPU backend ran the P.V dot with a leading axis of
    size 1 3.6x slower than without it, and the scores 1.8x slower with the query first
    (SmolLM2 shapes at 7.7K, 2-core CPU: P.V 1.6 -> 0.44 ms a layer, scores 0.9 -> 0.5; the
    batched (b, k) forms 0.8 and 1.6)."""
    hi_prec = jax.lax.Precision.HIGHEST
    if jax.default_backend() != "gpu":
        lhs, rhs_out = spec.split(",")
        c_sp, o_sp = rhs_out.split("->")
        a_sp, o_sp = lhs[1:], o_sp[1:]
        summed = (set(a_sp) & set(c_sp)) - set(o_sp)
        a, cache = a.astype(jnp.float32), cache_part.astype(jnp.float32)
        if c_sp[-1] not in summed:
            return jnp.einsum(f"{a_sp},{c_sp}->{o_sp}", a, cache, precision=hi_prec)
        # the dot's own output order (the cache's free axes first), then transposed
        nat = "".join(dict.fromkeys(ch for ch in c_sp + a_sp if ch in o_sp))
        return jnp.einsum(f"{nat}->{o_sp}",
                          jnp.einsum(f"{c_sp},{a_sp}->{nat}", cache, a, precision=hi_prec))
    if cache_part.dtype in (jnp.bfloat16, jnp.float16):
        if a.dtype == cache_part.dtype:
            return jnp.einsum(spec, a[None], cache_part, preferred_element_type=jnp.float32)[0]
        a = a.astype(jnp.float32)
        hi = a.astype(cache_part.dtype)
        lo = (a - hi.astype(jnp.float32)).astype(cache_part.dtype)
        both = jnp.einsum(spec, jnp.stack([hi, lo]), cache_part, preferred_element_type=jnp.float32)
        return both[0] + both[1]
    return jnp.einsum(spec, a.astype(jnp.float32)[None], cache_part.astype(jnp.float32),
                      precision=hi_prec)[0]


def _block_diagonal(x, K: int):
    """x [B,K,G,D] -> [B,K*D,K*G]: block k holds x[:, k].T, zeros elsewhere."""
    return jnp.einsum("bkgd,kj->bkdjg", x, jnp.eye(K, dtype=x.dtype)).reshape(
        x.shape[0], K * x.shape[3], K * x.shape[2])


def scaled_scores(q, k):
    """s = q.k / sqrt(D) in f32.  q [B,H,D], k [B,S,K,D] -> [B,H,S]."""
    B, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    qg = q.reshape(B, K, H // K, D)
    # a plain GEMM against the block-diagonal query (`_plain_gemm` says why, `_gemm` how); a
    # 16-bit q in the cache's dtype stays in it: exact, one GEMM
    qb = qg if q.dtype == k.dtype else qg.astype(jnp.float32)
    return _gemm("xbch,bsc->xbhs", _block_diagonal(qb, K), k.reshape(B, S, K * D)) / math.sqrt(D)


def softmax_parts(scores, mask):
    """scores, mask [..., M] -> (p [..., M] = exp(s - m) with masked entries exactly 0,
    l = sum p [...], m = the masked max [...]): the pieces `normalize` turns into attention."""
    s = jnp.where(mask, scores, MASK_VALUE)
    m = jnp.max(s, axis=-1)
    p = jnp.where(mask, jnp.exp(s - m[..., None]), 0.0)
    return p, jnp.sum(p, axis=-1), m


def masked_attention(scores, mask, v):
    """Softmax attention over the masked scores of a positional cache.

    scores [B,H,S] f32, mask [B,H,S] bool, v [B,S,K,D] -> AttentionOut (o [B,H,D], lse [B,H]).
    """
    B, H, S = scores.shape
    K, D = v.shape[2], v.shape[3]
    p, l, m = softmax_parts(scores, mask)
    # [B,H,S] x [B,S,K*D] -> [B,H,K*D], then each head's own kv block (`_plain_gemm`, `_gemm`)
    full = _gemm("xbhs,bsc->xbhc", p, v.reshape(B, S, K * D)).reshape(B, K, H // K, K, D)
    pv = jnp.einsum("bkgjd,kj->bkgd", full, jnp.eye(K, dtype=full.dtype))
    return normalize(pv.reshape(B, H, D), l, m)


def normalize(acc, l, m):
    """acc [...,D] (sum of p*v), l [...] (sum of p), m [...] (max) -> AttentionOut; l == 0 gives 0."""
    nonempty = l > 0
    o = jnp.where(nonempty[..., None], acc / jnp.where(nonempty, l, 1.0)[..., None], 0.0)
    lse = jnp.where(nonempty, m + jnp.log(jnp.where(nonempty, l, 1.0)), MASK_VALUE)
    return AttentionOut(o, lse)


def merge_attention(*parts: AttentionOut) -> AttentionOut:
    """Log-sum-exp merge of attention partials over disjoint key sets."""
    lse = jnp.stack([p.lse for p in parts])  # [n, ...]
    m = jnp.max(lse, axis=0)
    w = jnp.where(lse > MASK_VALUE / 2, jnp.exp(lse - m), 0.0)  # empty parts weigh 0
    l = jnp.sum(w, axis=0)
    acc = sum(wi[..., None] * p.o for wi, p in zip(w, parts))
    return normalize(acc, l, m)


def positions_mask(lengths, S):
    """[B] lengths -> (pos [S] int32, valid [B,S] bool)."""
    pos = jnp.arange(S, dtype=jnp.int32)
    return pos, pos[None, :] < lengths[:, None]


def always_kept(lengths, S, sink, window):
    """Sink and window positions of each sequence: [B,S] bool (valid positions only)."""
    pos, valid = positions_mask(lengths, S)
    return valid & ((pos[None, :] < sink) | (pos[None, :] >= lengths[:, None] - window))


def dipr_mask(scores, lengths, beta, sink=0, window=0):
    """The flat DIPR set: scores [B,H,S], lengths [B] -> (kept [B,H,S], threshold [B,H], max [B,H]).

    threshold = max over valid tokens - beta; a score equal to the threshold is kept.
    """
    S = scores.shape[-1]
    _, valid = positions_mask(lengths, S)
    m = jnp.max(jnp.where(valid[:, None, :], scores, MASK_VALUE), axis=-1)
    threshold = m - beta
    kept = valid[:, None, :] & (scores >= threshold[..., None])
    kept = kept | always_kept(lengths, S, sink, window)[:, None, :]
    return kept, threshold, m


def full_lengths(k):
    return jnp.full((k.shape[0],), k.shape[1], jnp.int32)


def dipr_reference(q, k, v, beta, sink=0, window=0, lengths=None) -> DiprResult:
    """Flat exact DIPR: every score, threshold max - beta, attention over the kept set.

    q [B,H,D], k, v [B,S,K,D], beta in units of q.k/sqrt(D) (float('inf') keeps every key),
    sink/window: tokens always kept at the start and end of each sequence, lengths [B] int32
    (default: all S valid). Returns o [B,H,D] f32, lse, the kept mask [B,H,S], the threshold.
    """
    check_decode_shapes(q, k, v, lengths)
    lengths = full_lengths(k) if lengths is None else lengths.astype(jnp.int32)
    s = scaled_scores(q, k)
    kept, threshold, m = dipr_mask(s, lengths, beta, sink, window)
    out = masked_attention(s, kept, v)
    return DiprResult(out.o, out.lse, kept, threshold, m)


def full_attention(q, k, v, lengths=None) -> AttentionOut:
    """Dense decode attention over the valid prefix. q [B,H,D], k, v [B,S,K,D] -> o, lse."""
    check_decode_shapes(q, k, v, lengths)
    lengths = full_lengths(k) if lengths is None else lengths.astype(jnp.int32)
    s = scaled_scores(q, k)
    _, valid = positions_mask(lengths, k.shape[1])
    return masked_attention(s, jnp.broadcast_to(valid[:, None, :], s.shape), v)
