"""The coarse index: positional pages with per-channel key min/max (Quest's bound).

Page n holds positions [n * P, (n + 1) * P) of the positional cache; no copy of the keys is
made. For a query q the page's upper bound of q.k/sqrt(D) over its keys is

    ub[n] = sum_d max(q_d * kmin[n, d], q_d * kmax[n, d]) / sqrt(D)

It is a true upper bound (pruning with it is exact), but on real keys it is far above the
best key of the page, so DIPR through it reads nearly everything; it stays as the Quest
baseline (top pages by the bound) and for short contexts.
"""

from __future__ import annotations

import dataclasses
import math

import flax.struct
import jax
import jax.numpy as jnp

from alaya_jax.dipr import MASK_VALUE
from alaya_jax.errors import ConfigError

_BIG = 3e38


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    page_size: int = 32  # P

    def __post_init__(self):
        if self.page_size < 1:
            raise ConfigError(f"BlockConfig.page_size must be >= 1, got {self.page_size}")

    def num_pages(self, S: int) -> int:
        return -(-S // self.page_size)


@flax.struct.dataclass
class BlockIndex:
    kmin: jax.Array  # [B, K, N, D] f32 (+BIG on empty pages)
    kmax: jax.Array  # [B, K, N, D] f32 (-BIG on empty pages)
    config: BlockConfig = flax.struct.field(pytree_node=False)

    @staticmethod
    def abstract(config: BlockConfig, B: int, S: int, K: int, D: int):
        N = config.num_pages(S)
        sds = jax.ShapeDtypeStruct
        return BlockIndex(sds((B, K, N, D), jnp.float32), sds((B, K, N, D), jnp.float32), config)


def _paged(k, P):
    """k [B,S,K,D] -> [B,K,N,P,D] (zero padded)."""
    B, S, K, D = k.shape
    N = -(-S // P)
    k = jnp.pad(k, ((0, 0), (0, N * P - S), (0, 0), (0, 0)))
    return k.reshape(B, N, P, K, D).transpose(0, 3, 1, 2, 4)


def build_block_index(k, lengths, config: BlockConfig) -> BlockIndex:
    """Per-page min/max over the valid keys.  k [B,S,K,D], lengths [B] -> BlockIndex."""
    B, S, K, D = k.shape
    P = config.page_size
    kp = _paged(k, P).astype(jnp.float32)  # [B,K,N,P,D]
    N = kp.shape[2]
    pos = (jnp.arange(N)[:, None] * P + jnp.arange(P)[None, :])  # [N,P]
    valid = (pos[None] < lengths[:, None, None])[:, None, :, :, None]  # [B,1,N,P,1]
    kmin = jnp.min(jnp.where(valid, kp, _BIG), axis=3)
    kmax = jnp.max(jnp.where(valid, kp, -_BIG), axis=3)
    return BlockIndex(kmin, kmax, config)


def append_block_index(index: BlockIndex, k_new, start) -> BlockIndex:
    """Folds new keys into their pages.  k_new [B,T,K,D] written at positions start[b] + t."""
    P = index.config.page_size
    B, T, K, D = k_new.shape
    N = index.kmin.shape[2]
    page = (start[:, None] + jnp.arange(T)[None, :]) // P  # [B,T]
    page = jnp.where(page < N, page, N)  # past the end: dropped
    kf = k_new.astype(jnp.float32).transpose(0, 2, 1, 3)  # [B,K,T,D]

    def one(kmin, kmax, pg, x):  # kmin [N,D], pg [T], x [T,D]
        return (kmin.at[pg].min(x, mode="drop"), kmax.at[pg].max(x, mode="drop"))

    f = jax.vmap(jax.vmap(one, in_axes=(0, 0, None, 0)))
    kmin, kmax = f(index.kmin, index.kmax, page, kf)
    return index.replace(kmin=kmin, kmax=kmax)


def page_upper_bounds(q, index: BlockIndex):
    """ub [B,H,N] f32 (MASK_VALUE on empty pages).  q [B,H,D]."""
    B, H, D = q.shape
    K, N = index.kmin.shape[1], index.kmin.shape[2]
    qg = q.reshape(B, K, H // K, D).astype(jnp.float32)[:, :, :, None, :]  # [B,K,G,1,D]
    lo = index.kmin[:, :, None]  # [B,K,1,N,D]
    hi = index.kmax[:, :, None]
    empty = (index.kmin[..., 0] > index.kmax[..., 0])[:, :, None]  # [B,K,1,N]
    ub = jnp.sum(jnp.maximum(qg * jnp.where(lo > _BIG / 2, 0.0, lo),
                             qg * jnp.where(hi < -_BIG / 2, 0.0, hi)), axis=-1) / math.sqrt(D)
    return jnp.where(empty, MASK_VALUE, ub).reshape(B, H, N)
