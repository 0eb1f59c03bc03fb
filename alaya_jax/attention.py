"""`sparse_attention(q, store, plan) -> (o, stats)`: one decode step of attention as a query.

The store holds the model's decode cache (per layer k, v [B, S, K, D] post-RoPE, lengths [B])
and optional indexes over it; the plan says how to answer:

    Plan.full()                     every key
    Plan.streaming(sink, window)    sink + window only
    Plan.topk(k)                    exact top-k tokens per query head (+ sink, window)
    Plan.quest(pages)               top pages per query head by the min/max bound (Quest)
    Plan.dipr(beta, index=...)      DIPR through the "flat", "block" or "cluster" index

Every path is pure and jittable with the plan static (`sparse_attention_jit`). Stats report,
per call: keys attended per query head, keys read and rows scored per kv head, groups kept
and needed, the threshold, and whether a static capacity truncated anything.

`Plan.dipr(beta, index="cluster")` is exact DIPR over what it reads (threshold = max of
everything read - beta). For the closest output to full attention at a given read budget
(benchmarks/results/dipr_quality.json: SmolLM2 at 7.6K tokens, layers 1/10/20/29) the best
recipe measured is

    ClusterConfig(cluster_size=32, block_size=64, var_summary="scalar", super_size=16)
    Plan.dipr(1.0, index="cluster", attend_read=True, remainder=True, remainder_var=0.5,
              rank_var=0.5, probe=14, super_probe=5)

with the index built on the prefill queries' metric (`build_store(..., queries=...)`) and its
delta calibrated by `calibrate_delta`: one summary row per block (the variance is a scalar per
block times a per-head channel profile), a super level of C/16 rows of which the 5 best per
query head are opened, the 14 best blocks per query head always read (a floor under DIPR's
max-relative rule, which adds blocks above it), every read key attended and the unread blocks
and super-clusters estimated. It read 11.8% of the keys (rows scored included) for a 1.49%
relative output error and 0.997 recall of the flat DIPR set (beta 4). The floor (probe) sets
the budget: 10-18 spans 9-13% read. Without the super level (super_size=0) the same plan
reads ~1.9% more for the same error. At beta 1 the calibrated delta is the grid's minimum,
so DIPR's rule adds nothing there: this recipe is a fixed per-head budget (the floor). DIPR's
rule above a floor (beta 4-5) reaches a higher recall of the flat DIPR set at equal reads
(0.9953 vs 0.9925 at 8.7%) but a higher output error (2.24% vs 2.13%): for the output,
spend the budget on the floor. With summary_dtype="int8" the same plan reads 11.1% of the
keys counted in bytes (a block's centroid + value_mean against one bf16 key + value).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from alaya_jax.dipr import (MASK_VALUE, _plain_gemm, always_kept, check_decode_shapes,
                            dipr_mask, masked_attention, merge_attention, normalize,
                            positions_mask, scaled_scores, softmax_parts)
from alaya_jax.errors import ConfigError, PlanError, ShapeError
from alaya_jax.index.block import (BlockConfig, BlockIndex, append_block_index, build_block_index,
                                   page_upper_bounds)
from alaya_jax.index.cluster import attend_masked as _attend
from alaya_jax.index.cluster import (ClusterConfig, ClusterIndex,
                                     build_cluster_index, centroid_scores, fold_tail, take_windows,
                                     gather_blocks, gathered_attention, gathered_scores, kept_mask,
                                     remainder_estimate, select_blocks)

_KINDS = ("full", "streaming", "topk", "quest", "dipr")
_INDEXES = ("flat", "block", "cluster")
_IMPLS = ("auto", "xla", "pallas")


# ----------------------------------------------------------------------------- plans


@dataclasses.dataclass(frozen=True)
class Plan:
    """How to answer one attention call (frozen, hashable: static under jit).

    beta: DIPR margin in units of q.k/sqrt(D). sink/window: always-kept tokens.
    k: tokens per query head (topk). pages: pages per query head (quest).
    capacity: max groups (blocks/pages) read per kv head; None = all (never truncates).
    delta: selection margin (cluster/block DIPR); None = the index's calibrated delta
      (0 for the block index, whose bound is exact). float('inf') reads every group.
    probe: best groups per query head scored exactly first to raise m' (cluster/block DIPR).
    rank_std: rank clusters by q.c + rank_std * (std of q.k over the cluster's keys, from the
      per-channel variance) instead of q.c: an estimate of the cluster's best key rather than
      its mean (costs a second summary row per block).
    rank_var: rank by q.c + rank_var * var(q.k) / 2 (the log-normal estimate of the cluster's
      mean softmax weight: ranks by expected mass; also costs the second row).
    mass_eps: also keep clusters until the estimated softmax mass left unread is at most
      mass_eps of the estimated total (cluster index; 0: off). DIPR's rule is relative to the
      max, so a head whose mass is spread thin (the max in the sink, the rest diffuse) keeps
      few clusters and misses mass; this rule reads more exactly there.
    remainder: add the estimate of unread clusters (cluster index only).
    remainder_var: scale of the per-channel variance (log-normal) correction in that estimate
      (0: the plain n * exp(q.c) estimate; 1: the full Gaussian correction, which overshoots
      on real keys).
    attend_read: attend every read key, not only those above the DIPR threshold.
    one_pass: the threshold from the lower bound m' known before the index is read (the max
      over the sink, window, tail and probed blocks) minus beta, instead of the max over every
      key read minus beta: the GPU kernels then skip the keys-only max pass over the kept
      blocks (one read of them instead of two). Attends the DIPR set over what was read plus
      the read keys whose scores fall within (M - m') below its threshold, M the max read
      (none when the max is in the exact region or a probed block).
    super_probe: with an index that has the super level (ClusterConfig.super_size > 0), the
      super-clusters opened per query head by their centroid score (besides those passing
      DIPR's rule m' - beta - delta); only the blocks of opened super-clusters are scored.
    return_mask: add the attended positions [B,H,S] to the stats (for measurement).
    impl: "auto" (the Mosaic GPU kernels, `alaya_jax.pallas.sparse_decode`, for a cluster DIPR
      plan they support on a Hopper GPU; jnp otherwise), "xla" (always jnp) or "pallas"
      (the kernels; NotImplementedError naming what they do not support).
    """

    kind: str = "dipr"
    index: str = "flat"
    beta: float = 4.0
    sink: int = 4
    window: int = 64
    k: int = 0
    pages: int = 0
    capacity: Optional[int] = None
    delta: Optional[float] = None
    probe: int = 2
    rank_std: float = 0.0
    rank_var: float = 0.0
    mass_eps: float = 0.0
    remainder: bool = False
    remainder_var: float = 0.0
    attend_read: bool = False
    one_pass: bool = False
    super_probe: int = 5
    return_mask: bool = False
    impl: str = "auto"

    def __post_init__(self):
        if self.impl not in _IMPLS:
            raise ConfigError(f"Plan.impl must be one of {_IMPLS}, got {self.impl!r}")
        if self.kind not in _KINDS:
            raise ConfigError(f"Plan.kind must be one of {_KINDS}, got {self.kind!r}")
        if self.index not in _INDEXES:
            raise ConfigError(f"Plan.index must be one of {_INDEXES}, got {self.index!r}")
        if self.sink < 0 or self.window < 0 or self.probe < 0:
            raise ConfigError(f"sink, window, probe must be >= 0; got {self.sink}, "
                              f"{self.window}, {self.probe}")
        if self.kind == "topk" and self.k < 1:
            raise ConfigError(f"a topk plan needs k >= 1, got {self.k}")
        if self.kind == "quest" and self.pages < 1:
            raise ConfigError(f"a quest plan needs pages >= 1, got {self.pages}")
        if self.capacity is not None and self.capacity < 1:
            raise ConfigError(f"capacity must be >= 1 or None, got {self.capacity}")
        if self.remainder and not (self.kind == "dipr" and self.index == "cluster"):
            raise ConfigError("remainder=True needs a dipr plan through the cluster index")
        if not self.beta >= 0:
            raise ConfigError(f"beta must be >= 0 (float('inf') keeps every key), got {self.beta}")

    @staticmethod
    def full(**kw) -> "Plan":
        return Plan(kind="full", **kw)

    @staticmethod
    def streaming(sink: int = 4, window: int = 64, **kw) -> "Plan":
        return Plan(kind="streaming", sink=sink, window=window, **kw)

    @staticmethod
    def topk(k: int, sink: int = 4, window: int = 64, **kw) -> "Plan":
        return Plan(kind="topk", k=k, sink=sink, window=window, **kw)

    @staticmethod
    def quest(pages: int, sink: int = 4, window: int = 64, **kw) -> "Plan":
        return Plan(kind="quest", index="block", pages=pages, sink=sink, window=window, **kw)

    @staticmethod
    def dipr(beta: float = 4.0, index: str = "cluster", sink: int = 4, window: int = 64,
             **kw) -> "Plan":
        return Plan(kind="dipr", index=index, beta=beta, sink=sink, window=window, **kw)

    def describe(self) -> str:
        if self.kind == "dipr":
            extra = f", delta={self.delta:g}" if self.delta is not None else ""
            extra += f", capacity={self.capacity}" if self.capacity is not None else ""
            extra += f", mass_eps={self.mass_eps:g}" if self.mass_eps else ""
            extra += ", +remainder" if self.remainder else ""
            extra += f"(var {self.remainder_var:g})" if self.remainder and self.remainder_var else ""
            extra += ", attend_read" if self.attend_read else ""
            extra += ", one_pass" if self.one_pass else ""
            extra += f", probe={self.probe}" if self.probe != 2 else ""
            extra += f", rank_var={self.rank_var:g}" if self.rank_var else ""
            extra += f", rank_std={self.rank_std:g}" if self.rank_std else ""
            extra += f", super_probe={self.super_probe}" if self.super_probe != 5 else ""
            return f"dipr(beta={self.beta:g}, index={self.index}{extra})"
        if self.kind == "topk":
            return f"topk(k={self.k})"
        if self.kind == "quest":
            return f"quest(pages={self.pages})"
        return self.kind


# ----------------------------------------------------------------------------- store


@dataclasses.dataclass(frozen=True)
class IndexConfig:
    """Which indexes a store builds over its cache (None: not built)."""

    cluster: Optional[ClusterConfig] = ClusterConfig()
    block: Optional[BlockConfig] = BlockConfig()


@flax.struct.dataclass
class KVStore:
    """One layer's decode cache plus its indexes (a pytree)."""

    k: jax.Array  # [B, S, K, D] post-RoPE keys
    v: jax.Array  # [B, S, K, D]
    lengths: jax.Array  # [B] int32 valid prefix
    cluster: Optional[ClusterIndex] = None
    block: Optional[BlockIndex] = None

    @staticmethod
    def abstract(config: IndexConfig, B: int, S: int, H: int, K: int, D: int,
                 dtype=jnp.bfloat16) -> "KVStore":
        sds = jax.ShapeDtypeStruct
        return KVStore(
            k=sds((B, S, K, D), dtype), v=sds((B, S, K, D), dtype), lengths=sds((B,), jnp.int32),
            cluster=None if config.cluster is None else ClusterIndex.abstract(
                config.cluster, B, S, H, K, D, dtype),
            block=None if config.block is None else BlockIndex.abstract(config.block, B, S, K, D))


def build_store(k, v, lengths, config: IndexConfig = IndexConfig(), n_heads: int | None = None,
                delta=None, queries=None) -> KVStore:
    """Builds the configured indexes over a decode cache.

    k, v [B, S, K, D] (post-RoPE keys), lengths [B] int32 (each sequence's valid prefix).
    n_heads: H of the model (for the per-query-head delta; default K). queries: optional
    [B, T, H, D] sample queries (the prefill's last positions) for query-aware clustering
    (`index.cluster.query_metric`). Jittable with config static; see `build_store_jit`.
    """
    if k.ndim != 4 or v.shape != k.shape:
        raise ShapeError(f"expected k, v [B,S,K,D]; got k {k.shape}, v {v.shape}")
    lengths = jnp.asarray(lengths, jnp.int32)
    if lengths.shape != (k.shape[0],):
        raise ShapeError(f"lengths must be [B]=({k.shape[0]},), got {lengths.shape}")
    cluster = None if config.cluster is None else build_cluster_index(
        k, v, lengths, config.cluster, n_heads, delta, queries)
    block = None if config.block is None else build_block_index(k, lengths, config.block)
    return KVStore(k, v, lengths, cluster, block)


build_store_jit = jax.jit(build_store, static_argnames=("config", "n_heads"))


def append_kv(store: KVStore, k_new, v_new):
    """Appends T tokens to every sequence: k_new, v_new [B, T, K, D] at positions lengths[b]+t.

    Updates the block index and the cluster tail (folding it into the clusters whenever it
    would pass tail_capacity, so no token is ever outside both the index and the tail).
    Returns (store, overflow [B] bool): True where the cache capacity S was exceeded and
    tokens were dropped (the caller must rebuild with a larger cache). Jittable.
    """
    B, S, K, D = store.k.shape
    T = k_new.shape[1]
    pos = store.lengths[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]  # [B,T]
    bidx = jnp.arange(B)[:, None]
    k = store.k.at[bidx, pos].set(k_new.astype(store.k.dtype), mode="drop")
    v = store.v.at[bidx, pos].set(v_new.astype(store.v.dtype), mode="drop")
    overflow = store.lengths + T > S
    lengths = jnp.minimum(store.lengths + T, S)
    block = store.block
    if block is not None:
        block = append_block_index(block, k_new, store.lengths)
    cluster = store.cluster
    if cluster is not None:
        cap = min(cluster.config.tail_capacity, S)
        cluster = jax.lax.while_loop(
            lambda c: jnp.any(lengths - c.end > cap),
            lambda c: fold_tail(c, k, v, lengths), cluster)
    return KVStore(k, v, lengths, cluster, block), overflow


def needs_rebuild(store: KVStore, fraction: float = 0.25) -> bool:
    """Host-side policy: True once the tokens folded in since the build exceed `fraction` of
    the index (appended keys join existing clusters, which slowly degrades the ranking)."""
    if store.cluster is None:
        return False
    opened = np.asarray(store.cluster.cluster_id) == -2
    folded = np.asarray(store.cluster.block_len)[opened].sum()
    return bool(folded > fraction * np.asarray(store.cluster.block_len).sum())


# ----------------------------------------------------------------------------- stats


class Stats(NamedTuple):
    keys_attended: jax.Array  # [B, H] int32 keys in the softmax (exactly)
    keys_read: jax.Array  # [B, K] int32 rows scored + keys read from memory
    rows_scored: jax.Array  # [B, K] int32 summary rows scored (centroids, 2 per Quest page)
    groups_kept: jax.Array  # [B, K] int32 blocks/pages read
    groups_needed: jax.Array  # [B, K] int32 blocks/pages the rule asked for
    threshold: jax.Array  # [B, H] f32 (MASK_VALUE where none applies)
    truncated: jax.Array  # [B] bool: a static capacity dropped something
    context: jax.Array  # [B] int32 tokens in the cache
    attended: Optional[jax.Array] = None  # [B, H, S] bool when plan.return_mask


def _zeros_bk(B, K):
    return jnp.zeros((B, K), jnp.int32)


# ----------------------------------------------------------------------------- helpers


class _Exact(NamedTuple):
    s: jax.Array  # [B,H,M] scores
    pos: jax.Array  # [B,M] positions
    valid: jax.Array  # [B,M]
    v: jax.Array  # [B,M,K,D] (positional order, as sliced from the cache)


def _take_tokens(x, start, size):
    """x [B,S,K,D], start [B] -> ([B,size,K,D], pos [B,size]); start clamped into range."""
    S = x.shape[1]
    st = jnp.clip(start, 0, S - size)
    return take_windows(x, st, size), st[:, None] + jnp.arange(size, dtype=jnp.int32)[None, :]


def _attend_exact(s, mask, v):
    """s, mask [B,H,M], v [B,M,K,D] (the exact region's values) -> AttentionOut.

    No transpose or batched dot: slices of the positional cache feeding a transpose or a
    (b, k)-batched dot made XLA on a GPU keep the whole cache in a transposed layout (a copy of
    every layer's K and V per step: 1.3 ms per 2 layers at 128K, H200). On a GPU, plain GEMMs
    against the block-diagonal query (`dipr.masked_attention`: 3 kernels); elsewhere
    multiply + reduce per query head."""
    if _plain_gemm():
        return masked_attention(s, mask, v)
    B, H, M = s.shape
    K, D = v.shape[2], v.shape[3]
    p, l, m = softmax_parts(s, mask)
    pm = jnp.moveaxis(p.reshape(B, K, H // K, M), -1, 1)  # [B,M,K,G]
    vf = v.astype(jnp.float32)
    # one 4-D product per query head of a group: jitted on the CPU (jax 0.10.2), the same sum
    # written as one 5-D broadcast after a reshape returned wrong values (see _exact_region)
    # The barrier keeps each sum a reduction kernel of its own: fused into the stack and the
    # merge after it, XLA on a GPU summed the M rows serially per output element (~40 us per
    # layer on an H200 with 196 exact rows).
    acc = jax.lax.optimization_barrier([jnp.sum(pm[:, :, :, g, None] * vf, axis=1)
                                        for g in range(H // K)])
    return normalize(jnp.stack(acc, axis=2).reshape(B, H, D), l, m)  # stack [B,K,G,D]


def _exact_region(q, store: KVStore, sink: int, tail_start, tail_size: int, lengths) -> _Exact:
    """Scores of positions [0, sink) and [tail_start, lengths) (tail_size static slots)."""
    B, S, K, D = store.k.shape
    s0 = min(sink, S)
    tsz = min(tail_size, S)
    ps = jnp.broadcast_to(jnp.arange(s0, dtype=jnp.int32), (B, s0))
    kt, pt = _take_tokens(store.k, tail_start, tsz)
    vt, _ = _take_tokens(store.v, tail_start, tsz)
    # [B,M,K,D] each, no transpose (_attend_exact); K and V as one [2,B,M,K,D] concatenation:
    # one kernel on a GPU instead of two (8B shapes, H200: -1 kernel and -2.5 us a layer)
    kk, vv = jnp.concatenate([jnp.stack([store.k[:, :s0], store.v[:, :s0]]),
                              jnp.stack([kt, vt])], axis=2)
    pos = jnp.concatenate([ps, pt], axis=1)  # [B,M]
    in_sink = jnp.arange(s0 + tsz)[None, :] < s0
    valid = (pos < lengths[:, None]) & (in_sink | ((pos >= tail_start[:, None]) & (pos >= s0)))
    H = q.shape[1]
    if _plain_gemm():  # one GEMM on the region's small copy (`dipr.scaled_scores`). The
        # barrier keeps the GEMM's split-K sum a kernel of its own: fused with the masks after
        # it, XLA on a GPU wrote it in a transposed layout (27 us per layer, H200, one_pass)
        return _Exact(jax.lax.optimization_barrier(scaled_scores(q, kk)), pos, valid, vv)
    qg = q.reshape(B, K, H // K, D).astype(jnp.float32)
    kf = kk.astype(jnp.float32)
    # per query head of a group, a 4-D multiply + reduce ([B,M,K,G] after the stack). Jitted on
    # the CPU (jax 0.10.2), sum(kf[:, :, :, None] * q.reshape(B,K,G,D)[:, None], -1) returned
    # wrong scores (off by up to ~40 on real keys; eager was right): caught by
    # test_real_keys_smollm2.
    s = jnp.stack([jnp.sum(kf * qg[:, None, :, g, :], axis=-1) for g in range(H // K)], axis=-1)
    s = jnp.moveaxis(s, 1, -1) / math.sqrt(D)
    return _Exact(s.reshape(B, H, -1), pos, valid, vv)


def _masked_max(s, mask):
    return jnp.max(jnp.where(mask, s, MASK_VALUE), axis=-1)


def _scatter_mask(B, H, S, pos, mask):
    """pos [B,H|1,M] int, mask [B,H,M] -> [B,H,S] bool (pos < 0 ignored)."""
    pos = jnp.broadcast_to(pos, mask.shape)
    pos = jnp.where(mask & (pos >= 0), pos, S)
    f = lambda p, m: jnp.zeros((S,), bool).at[p].max(m, mode="drop")
    return jax.vmap(jax.vmap(f))(pos, mask)


def _count_bk(x, K):
    """[B,K,...] bool -> [B,K] int32."""
    return jnp.sum(x.reshape(x.shape[0], K, -1), axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------------- paths


def _dense_path(q, store, plan):
    B, S, K, D = store.k.shape
    H = q.shape[1]
    s = scaled_scores(q, store.k)
    pos, valid = positions_mask(store.lengths, S)
    valid = jnp.broadcast_to(valid[:, None, :], s.shape)
    always = always_kept(store.lengths, S, plan.sink, plan.window)[:, None, :]
    threshold = jnp.full((B, H), MASK_VALUE, jnp.float32)
    if plan.kind == "full":
        mask = valid
    elif plan.kind == "dipr":
        mask, threshold, _ = dipr_mask(s, store.lengths, plan.beta, plan.sink, plan.window)
    else:  # topk over the middle tokens (exact; reads every score)
        middle = valid & ~always
        kk = min(plan.k, S)
        top = jax.lax.top_k(jnp.where(middle, s, MASK_VALUE), kk)[0][..., -1]  # [B,H]
        threshold = top
        few = top[..., None] <= MASK_VALUE / 2  # fewer than k middle tokens: keep them all
        mask = (middle & ((s >= top[..., None]) | few)) | (valid & always)
    out = masked_attention(s, mask, store.v)
    n = jnp.broadcast_to(store.lengths[:, None], (B, K)).astype(jnp.int32)
    stats = Stats(
        keys_attended=jnp.sum(mask, -1).astype(jnp.int32), keys_read=n, rows_scored=_zeros_bk(B, K),
        groups_kept=_zeros_bk(B, K), groups_needed=_zeros_bk(B, K), threshold=threshold,
        truncated=jnp.zeros((B,), bool), context=store.lengths,
        attended=mask if plan.return_mask else None)
    return out.o, stats


def _streaming_path(q, store, plan):
    B, S, K, D = store.k.shape
    H = q.shape[1]
    lengths = store.lengths
    w = max(plan.window, 1)
    ex = _exact_region(q, store, plan.sink, jnp.maximum(lengths - plan.window, plan.sink), w, lengths)
    valid = jnp.broadcast_to(ex.valid[:, None, :], ex.s.shape)
    out = _attend_exact(ex.s, valid, ex.v)
    n = _count_bk(jnp.broadcast_to(ex.valid[:, None], (B, K) + ex.valid.shape[1:]), K)
    stats = Stats(jnp.sum(valid, -1).astype(jnp.int32), n, _zeros_bk(B, K), _zeros_bk(B, K),
                  _zeros_bk(B, K), jnp.full((B, H), MASK_VALUE, jnp.float32),
                  jnp.zeros((B,), bool), lengths,
                  _scatter_mask(B, H, S, ex.pos[:, None, :], valid) if plan.return_mask else None)
    return out.o, stats


def _block_gather(store: KVStore, kept, P):
    """Pages of the positional cache.  kept [B,K,cap] -> keys, values [B,K,cap,P,D], pos."""
    B, S, K, D = store.k.shape
    pos = kept[..., None] * P + jnp.arange(P, dtype=jnp.int32)  # [B,K,cap,P]
    # rows of the cache seen as [B*S*K, D]: a plain row gather, no transposed copy of the cache
    rows = ((jnp.arange(B)[:, None, None, None] * S + jnp.clip(pos, 0, S - 1)) * K
            + jnp.arange(K)[None, :, None, None])
    gk = jnp.take(store.k.reshape(B * S * K, D), rows, axis=0)  # [B,K,cap,P,D]
    gv = jnp.take(store.v.reshape(B * S * K, D), rows, axis=0)
    return gk, gv, pos


def _scores_kv(q, gk):
    """q [B,H,D], gk [B,K,C,P,D] -> [B,H,C,P] f32."""
    B, H, D = q.shape
    K = gk.shape[1]
    qg = q.reshape(B, K, H // K, D).astype(jnp.float32)
    s = jnp.einsum("bkgd,bkcpd->bkgcp", qg, gk.astype(jnp.float32)) / math.sqrt(D)
    return s.reshape((B, H) + gk.shape[2:4])


def _sparse_path(q, store: KVStore, plan: Plan):
    """DIPR through the block or cluster index, and Quest."""
    B, S, K, D = store.k.shape
    H = q.shape[1]
    G = H // K
    lengths = store.lengths
    use_cluster = plan.kind == "dipr" and plan.index == "cluster"
    if use_cluster:
        idx = store.cluster
        if idx is None:
            raise PlanError("plan needs the cluster index but the store has none "
                            "(build_store with IndexConfig(cluster=ClusterConfig(...)))")
        cfg = idx.config
        if plan.sink > cfg.sink or plan.window > cfg.window:
            raise PlanError(f"plan sink/window ({plan.sink}, {plan.window}) exceed the index's "
                            f"exact regions ({cfg.sink}, {cfg.window}); rebuild the index")
        P = cfg.block_size
        tail_size = min(cfg.tail_capacity, S)
        ex = _exact_region(q, store, cfg.sink, idx.end, tail_size, lengths)
        tail_over = lengths - idx.end > tail_size
        est_mean = centroid_scores(q, idx.centroid, idx.block_len)  # [B,H,N]
        est = _rank_estimate(q, idx, est_mean, plan.rank_std, plan.rank_var)
        group_len = idx.block_len
        N = idx.num_blocks
        opened = None
        if idx.super_id is not None:  # score the super rows, open the best super-clusters
            sup = _open_supers(q, idx, ex, lengths, plan, G)
            opened, est_sup_mean = sup  # [B,K,N] blocks of opened supers, [B,H,NS]
            hide = jnp.repeat(~opened, G, axis=1)
            est = jnp.where(hide, MASK_VALUE, est)
        keys_of = lambda kept: (gather_blocks(idx.keys, kept), gather_blocks(idx.values, kept),
                                gather_blocks(idx.positions, kept))
        # the per-channel variance is a second row per block; the scalar summary is N numbers
        two_rows = (plan.rank_std or plan.rank_var or (plan.remainder and plan.remainder_var)) \
            and cfg.var_summary == "channel"
        rows = (2 if two_rows else 1) * _count_bk(idx.block_len > 0, K)
        if opened is not None:  # the super rows, then only the blocks inside opened supers
            rows = (2 if two_rows else 1) * (_count_bk(idx.super_len > 0, K)
                                             + _count_bk(opened & (idx.block_len > 0), K))
        delta = idx.delta if plan.delta is None else plan.delta
    else:
        idx = store.block
        if idx is None:
            raise PlanError("plan needs the block index but the store has none "
                            "(build_store with IndexConfig(block=BlockConfig(...)))")
        P = idx.config.page_size
        w = max(plan.window, 1)
        mid_end = jnp.maximum(lengths - plan.window, plan.sink)
        ex = _exact_region(q, store, plan.sink, mid_end, w, lengths)
        tail_over = jnp.zeros((B,), bool)
        N = idx.kmin.shape[2]
        pstart = jnp.arange(N) * P
        middle_len = (jnp.minimum(pstart[None, :] + P, mid_end[:, None])
                      - jnp.maximum(pstart[None, :], plan.sink))  # [B,N]
        group_len = jnp.broadcast_to(jnp.clip(middle_len, 0, P)[:, None, :], (B, K, N))
        est = jnp.where(jnp.repeat(group_len > 0, G, axis=1), page_upper_bounds(q, idx), MASK_VALUE)

        def keys_of(kept):
            gk, gv, pos = _block_gather(store, kept, P)
            ok = (pos >= plan.sink) & (pos < mid_end[:, None, None, None])
            return gk, gv, jnp.where(ok, pos, -1)

        rows = 2 * _count_bk(group_len > 0, K)
        delta = 0.0 if plan.delta is None else plan.delta

    ex_mask_valid = jnp.broadcast_to(ex.valid[:, None, :], ex.s.shape)
    exact_max = _masked_max(ex.s, ex_mask_valid)  # [B,H]
    always = ex_mask_valid & ((ex.pos < plan.sink)
                              | (ex.pos >= (lengths - plan.window)[:, None]))[:, None, :]

    if plan.kind == "quest":
        n_sel = min(plan.pages, N)
        ids = jax.lax.top_k(est, n_sel)[1]  # [B,H,pages]
        ok = jnp.take_along_axis(est, ids, -1) > MASK_VALUE / 2
        want = _scatter_mask(B, H, N, ids, ok).reshape(B, K, G, N).any(axis=2)  # [B,K,N]
        cap = min(G * n_sel, N)
        vals, kept = jax.lax.top_k(want.astype(jnp.float32), cap)
        kept_count = jnp.sum(vals > 0, -1).astype(jnp.int32)
        kept = jnp.where(vals > 0, kept, 0).astype(jnp.int32)
        needed = kept_count
        attend_all = True
    else:
        cap = N if plan.capacity is None else min(plan.capacity, N)
        force = None
        probe_max = jnp.full((B, H), MASK_VALUE, jnp.float32)
        if plan.probe > 0:
            n_probe = min(plan.probe, N)
            pid = jax.lax.top_k(est, n_probe)[1].reshape(B, K, G * n_probe).astype(jnp.int32)
            pk, _, ppos = keys_of(pid)
            ps = _scores_kv(q, pk)  # [B,H,G*probe,P]
            pok = jnp.ones(pid.shape, bool)
            if use_cluster and opened is not None:  # never probe a block that was not scored
                pok = jnp.take_along_axis(opened, pid, axis=-1)
            pvalid = jnp.repeat((ppos >= 0) & pok[..., None], G, axis=1)
            probe_max = jnp.max(jnp.where(pvalid, ps, MASK_VALUE), axis=(-2, -1))
            force = _scatter_mask(B, K, N, pid, pok)
        extra = None
        if plan.mass_eps > 0 and use_cluster:
            scored = est_mean if opened is None else jnp.where(hide, MASK_VALUE, est_mean)
            extra = _mass_rule_margin(scored, idx.block_len, ex.s, ex_mask_valid, plan.mass_eps)
        sel = select_blocks(est, exact_max, probe_max, plan.beta, delta, cap, group_len, K, force,
                            extra)
        kept, kept_count, needed = sel.kept, sel.kept_count, sel.needed
        attend_all = plan.attend_read

    gk, gv, gpos = keys_of(kept)  # [B,K,cap,P,D], [B,K,cap,P]
    live = jnp.arange(kept.shape[-1])[None, None, :] < kept_count[..., None]
    gvalid = live[..., None] & (gpos >= 0)  # [B,K,cap,P]
    gs = _scores_kv(q, gk)  # [B,H,cap,P]
    gvalid_h = jnp.repeat(gvalid, G, axis=1)
    read_max = jnp.maximum(exact_max, jnp.max(jnp.where(gvalid_h, gs, MASK_VALUE), axis=(-2, -1)))
    if attend_all:
        threshold = jnp.full((B, H), MASK_VALUE, jnp.float32)
    elif plan.one_pass:
        threshold = jnp.maximum(exact_max, probe_max) - plan.beta
    else:
        threshold = read_max - plan.beta
    ex_mask = (ex_mask_valid & (ex.s >= threshold[..., None])) | always
    g_mask = gvalid_h & (gs >= threshold[..., None, None])
    cap_ = kept.shape[-1]
    if use_cluster:  # the kernel contract's reference
        gathered = gathered_attention(q, idx.keys, idx.values, idx.block_len, kept, kept_count,
                                      threshold)
    else:
        gathered = _attend(gs.reshape(B, H, cap_ * P), g_mask.reshape(B, H, cap_ * P),
                           gv.reshape(B, K, cap_ * P, D))
    parts = [_attend_exact(ex.s, ex_mask, ex.v), gathered]
    if plan.remainder:
        read = kept_mask(kept, kept_count, N)
        if opened is not None:  # unopened supers are estimated from their own summaries
            read = read | ~opened
            parts.append(remainder_estimate(
                q, est_sup_mean, (idx.super_len, idx.super_key_var, idx.super_value_mean),
                jnp.any(_super_onehot(idx) & opened[..., None], axis=-2),
                use_var=plan.remainder_var))
        parts.append(remainder_estimate(q, est_mean, (idx.block_len, idx.key_var, idx.value_mean),
                                        read, use_var=plan.remainder_var))
    out = merge_attention(*parts)

    keys_read = rows + _count_bk(gvalid, K) + jnp.sum(ex.valid, -1).astype(jnp.int32)[:, None]
    attended = None
    if plan.return_mask:
        a1 = _scatter_mask(B, H, S, ex.pos[:, None, :], ex_mask)
        gp = jnp.repeat(gpos, G, axis=1).reshape(B, H, cap_ * P)
        a2 = _scatter_mask(B, H, S, gp, g_mask.reshape(B, H, cap_ * P))
        attended = a1 | a2
    stats = Stats(
        keys_attended=(jnp.sum(ex_mask, -1) + jnp.sum(g_mask, (-2, -1))).astype(jnp.int32),
        keys_read=keys_read, rows_scored=rows, groups_kept=kept_count, groups_needed=needed,
        threshold=threshold, truncated=jnp.any(needed > kept_count, axis=-1) | tail_over,
        context=lengths, attended=attended)
    return out.o, stats


def _super_onehot(idx: ClusterIndex):
    """[B,K,N,NS] bool: block n belongs to super-cluster s."""
    NS = idx.super_len.shape[-1]
    return idx.super_id[..., None] == jnp.arange(NS)


def _open_supers(q, idx: ClusterIndex, ex: "_Exact", lengths, plan: "Plan", G: int):
    """Super-clusters opened per kv head: the union over its query heads of the
    `plan.super_probe` best by centroid score (ranked like blocks) and those passing DIPR's rule
    against the exact max of the sink and tail. Returns (opened blocks [B,K,N] bool, the
    super centroid scores [B,H,NS])."""
    B, H, _ = q.shape
    K, NS = idx.super_len.shape[1], idx.super_len.shape[2]
    est_sup_mean = centroid_scores(q, idx.super_centroid, idx.super_len)  # [B,H,NS]
    est_sup = est_sup_mean
    if plan.rank_std or plan.rank_var:
        qg = q.reshape(B, K, G, -1).astype(jnp.float32)
        var = jnp.einsum("bkgd,bksd->bkgs", qg * qg, idx.super_key_var).reshape(B, H, NS)
        var = var / q.shape[-1]
        adj = plan.rank_std * jnp.sqrt(var) + 0.5 * plan.rank_var * var
        est_sup = jnp.where(est_sup_mean > MASK_VALUE / 2, est_sup_mean + adj, est_sup_mean)
    valid = jnp.broadcast_to(ex.valid[:, None, :], ex.s.shape)
    exact_max = _masked_max(ex.s, valid)
    delta = idx.delta if plan.delta is None else plan.delta
    rule = est_sup >= (exact_max - plan.beta - jnp.asarray(delta, jnp.float32))[..., None]
    want = rule & (est_sup > MASK_VALUE / 2)
    if plan.super_probe > 0:
        top = jax.lax.top_k(est_sup, min(plan.super_probe, NS))[1]
        ok = jnp.take_along_axis(est_sup, top, -1) > MASK_VALUE / 2
        want = want | _scatter_mask(B, H, NS, top, ok)
    want = want.reshape(B, K, G, NS).any(axis=2)  # [B,K,NS]
    opened = jnp.any(_super_onehot(idx) & want[:, :, None, :], axis=-1)  # [B,K,N]
    return opened, est_sup_mean


def _mass_rule_margin(est_mean, block_len, ex_s, ex_valid, eps: float, iters: int = 16):
    """Margin of the mass rule: [B,K,N] >= 0 for clusters needed to leave at most eps of the
    estimated softmax mass unread (per query head, union over the group).

    A cluster's estimated mass is n * exp(q.c); a per-head cut t on log-mass is found by
    bisection (no sort: `iters` masked sums over the N rows).
    """
    B, H, N = est_mean.shape
    K = block_len.shape[1]
    G = H // K
    n = jnp.repeat(block_len, G, axis=1)  # [B,H,N]
    live = (n > 0) & (est_mean > MASK_VALUE / 2)
    logw = jnp.where(live, est_mean + jnp.log(jnp.maximum(n, 1).astype(jnp.float32)), MASK_VALUE)
    ex_max = _masked_max(ex_s, ex_valid)
    M = jnp.maximum(jnp.max(logw, -1), ex_max)  # [B,H]
    rel = logw - M[..., None]
    w = jnp.where(live, jnp.exp(rel), 0.0)
    Z = jnp.sum(w, -1) + jnp.sum(jnp.where(ex_valid, jnp.exp(ex_s - M[..., None]), 0.0), -1)
    budget = eps * Z

    def step(_, lohi):
        lo, hi = lohi
        mid = 0.5 * (lo + hi)
        unread = jnp.sum(jnp.where(rel < mid[..., None], w, 0.0), -1)
        ok = unread <= budget
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo0 = jnp.full((B, H), -40.0, jnp.float32)
    lo, _ = jax.lax.fori_loop(0, iters, step, (lo0, jnp.zeros((B, H), jnp.float32)))
    margin = jnp.where(live, rel - lo[..., None], MASK_VALUE)
    return margin.reshape(B, K, G, N).max(axis=2)


def sparse_attention(q, store: KVStore, plan: Plan = Plan()):
    """One decode step of attention through the plan.

    q [B, H, D] post-RoPE queries (H a multiple of the store's K); store: KVStore of one layer.
    Returns (o [B, H, D] f32, Stats). Pure; jit with the plan static (`sparse_attention_jit`).
    """
    check_decode_shapes(q, store.k, store.v, store.lengths)
    if plan.kind in ("full", "topk") or (plan.kind == "dipr" and plan.index == "flat"):
        return _dense_path(q, store, plan)
    if plan.kind == "streaming":
        return _streaming_path(q, store, plan)
    if plan.impl != "xla" and plan.kind == "dipr" and plan.index == "cluster":
        from alaya_jax.pallas import sparse_decode  # the kernels' path (imports this module)
        if plan.impl == "pallas" or (sparse_decode.on_sm90()
                                     and sparse_decode.kernel_supports(q, store, plan) is None):
            return sparse_decode.sparse_attention_pallas(q, store, plan)
    return _sparse_path(q, store, plan)


sparse_attention_jit = jax.jit(sparse_attention, static_argnames=("plan",))


# ----------------------------------------------------------------------------- calibration


def _rank_estimate(q, idx: ClusterIndex, est_mean, rank_std: float, rank_var: float = 0.0):
    """est_mean + rank_std * sigma + rank_var * sigma^2 / 2, sigma^2 = sum_d q_d^2 var_d / D.

    [B,H,N] (MASK_VALUE stays on empty blocks)."""
    if not rank_std and not rank_var:
        return est_mean
    B, H, D = q.shape
    K, N = idx.key_var.shape[1], idx.key_var.shape[2]
    qg = q.reshape(B, K, H // K, D).astype(jnp.float32)
    var = jnp.einsum("bkgd,bknd->bkgn", qg * qg, idx.key_var).reshape(B, H, N) / D
    adj = rank_std * jnp.sqrt(var) + 0.5 * rank_var * var
    return jnp.where(est_mean > MASK_VALUE / 2, est_mean + adj, est_mean)


DELTA_GRID = tuple(float(x) for x in np.arange(-4.0, 16.01, 0.25))
CALIBRATE_PER = ("layer", "kv_head")  # what one calibrated margin covers (calibrate_delta's per)


def _recall_vs_delta(q, store: KVStore, beta: float, probe: int, rank_std: float = 0.0,
                     rank_var: float = 0.0):
    """Recall of the flat DIPR set as a function of the margin delta, for one query.

    q [B,H,D] -> (recall [len(DELTA_GRID), B, H], middle_recall [same]). The query's causal
    length is store.lengths (pass a store whose lengths are the query's): it sees the keys at
    positions < lengths. The DIPR set is the flat one over those keys with the index's sink
    and window. Read as a decode step at that length would: the sink, the query's window and
    the tail [end, lengths) always (m' = their max and the probed blocks'), a block (for the
    whole kv group) once delta reaches -max_g(est[g] - m'[g] + beta), the probed blocks
    always. Only the indexed keys at positions < lengths - window count as the index's (a
    query earlier than the index's end neither needs nor probes the keys of its future, and
    its window is read exactly), so with the store's own lengths every indexed key counts.
    middle_recall: the recall of those indexed DIPR keys alone.
    """
    idx = store.cluster
    cfg = idx.config
    B, S, K, D = store.k.shape
    H = q.shape[1]
    G = H // K
    N, P = idx.num_blocks, cfg.block_size
    lengths = store.lengths
    s_all = scaled_scores(q, store.k)  # [B,H,S]
    kept, _, _ = dipr_mask(s_all, lengths, beta, cfg.sink, cfg.window)
    n_total = jnp.sum(kept, -1)  # [B,H]
    pos, valid = positions_mask(lengths, S)
    always = valid & ((pos[None, :] < cfg.sink) | (pos[None, :] >= idx.end[:, None])
                      | (pos[None, :] >= (lengths - cfg.window)[:, None]))  # [B,S]
    exact_max = _masked_max(s_all, always[:, None, :])
    est = _rank_estimate(q, idx, centroid_scores(q, idx.centroid, idx.block_len), rank_std,
                         rank_var)
    slot_pos = idx.positions  # [B,K,N,P], -1 padding
    member = (jnp.arange(P)[None, None, None, :] < idx.block_len[..., None]) & (slot_pos >= 0)
    seen = member & (slot_pos < lengths[:, None, None, None])  # visible to the query
    probe_max = jnp.full((B, H), MASK_VALUE, jnp.float32)
    forced = jnp.zeros((B, K, N), bool)
    if probe > 0:
        pid = jax.lax.top_k(est, min(probe, N))[1].reshape(B, K, -1).astype(jnp.int32)
        ps = gathered_scores(q, idx.keys, pid)
        pv = jnp.repeat(gather_blocks(seen, pid), G, 1)
        probe_max = jnp.max(jnp.where(pv, ps, MASK_VALUE), axis=(-2, -1))
        forced = _scatter_mask(B, K, N, pid, jnp.ones(pid.shape, bool))
    m_prime = jnp.maximum(exact_max, probe_max)
    rel = (est - (m_prime - beta)[..., None]).reshape(B, K, G, N).max(axis=2)  # [B,K,N]
    need = jnp.where(forced, -jnp.inf, -rel)  # block read iff delta >= need
    # the index's keys for this query, and which of them the flat set keeps (gathered by
    # position from the flat scores: no block scores)
    mid = seen & (slot_pos < (lengths - cfg.window)[:, None, None, None])
    flat_pos = jnp.where(mid, slot_pos, 0).reshape(B, K, N * P)
    take = lambda kg, p: kg[:, p]  # [G,S], [N*P] -> [G,N*P]
    in_set = jax.vmap(jax.vmap(take))(kept.reshape(B, K, G, S), flat_pos).reshape(B, K, G, N, P)
    n_blk = jnp.sum(in_set & mid[:, :, None], -1, dtype=jnp.int32).reshape(B, H, N)
    n_mid = jnp.sum(n_blk, -1)  # [B,H] indexed DIPR keys
    need_h = jnp.repeat(need, G, axis=1)  # [B,H,N]
    grid = jnp.asarray(DELTA_GRID, jnp.float32)
    # block n is read from the first grid point >= need on: a histogram over the grid, summed
    first = jnp.searchsorted(grid, need_h, side="left")  # [B,H,N] in [0, len(grid)]
    hist = jax.vmap(jax.vmap(lambda f, c: jnp.zeros((grid.shape[0] + 1,), jnp.int32)
                             .at[f].add(c)))(first, n_blk)  # [B,H,grid+1]
    hits = jnp.moveaxis(jnp.cumsum(hist[..., :-1], -1), -1, 0)  # [grid,B,H]
    recall = (n_total - n_mid + hits) / jnp.maximum(n_total, 1)
    mid_recall = jnp.where(n_mid > 0, hits / jnp.maximum(n_mid, 1), 1.0)
    return recall, mid_recall


_recall_vs_delta_jit = jax.jit(_recall_vs_delta,
                               static_argnames=("beta", "probe", "rank_std", "rank_var"))

CALIBRATE_CHUNK_BYTES = 256 << 20  # per-chunk budget of the stacked queries' intermediates


def _recall_curves(q, lengths, store: KVStore, beta: float, probe: int, rank_std: float,
                   chunk: int, rank_var: float = 0.0):
    """Every query's recall curves in one call: q [n,B,H,D], lengths [n,B] ->
    (recall, middle_recall) [n, grid, B, H]; vmapped over chunks of `chunk` queries, the
    chunks in sequence (lax.map)."""
    f = jax.vmap(lambda qi, li: _recall_vs_delta(qi, store.replace(lengths=li), beta, probe,
                                                 rank_std, rank_var))
    n = q.shape[0]
    if chunk >= n:
        return f(q, lengths)
    m = -(-n // chunk)
    pad = m * chunk - n  # padded with copies of the first query, dropped after
    qp = jnp.concatenate([q, jnp.broadcast_to(q[:1], (pad,) + q.shape[1:])])
    lp = jnp.concatenate([lengths, jnp.broadcast_to(lengths[:1], (pad,) + lengths.shape[1:])])
    r, rm = jax.lax.map(lambda a: f(*a), (qp.reshape((m, chunk) + q.shape[1:]),
                                         lp.reshape((m, chunk) + lengths.shape[1:])))
    return (r.reshape((m * chunk,) + r.shape[2:])[:n], rm.reshape((m * chunk,) + rm.shape[2:])[:n])


_recall_curves_jit = jax.jit(_recall_curves,
                             static_argnames=("beta", "probe", "rank_std", "chunk",
                                              "rank_var"))


def calibrate_delta(store: KVStore, queries, beta: float, target_recall: float = 0.99,
                    probe: int = 2, rank_std: float = 0.0, lengths=None,
                    recall: str = "set", max_delta: float = DELTA_GRID[-1], per: str = "layer",
                    rank_var: float = 0.0):
    """The smallest margin delta whose mean recall of the flat DIPR set reaches the target.

    queries: sample queries of this layer (e.g. the q of the last prompt positions, seen at
    prefill), either one array [n, B, H, D] or a sequence of n arrays [B, H, D]; lengths: their
    causal lengths, [n, B] (or a sequence of n [B]; default: the store's). A query counts only
    the keys at positions < its length (indexed keys of its future are neither needed nor
    read). All n recall curves are computed in one jitted call (vmapped, in chunks of queries
    whose intermediates fit CALIBRATE_CHUNK_BYTES). probe, rank_std, rank_var: the plan's
    (the blocks are ranked as the plan ranks them; an index with a super level is calibrated
    as if every block were scored). recall: "set" (the DIPR set with sink and
    window, as DESIGN.md defines it) or "middle" (only the indexed keys: stricter). per:
    "layer" (one delta for all heads: the mean recall over heads reaches the target) or
    "kv_head" (one delta per kv head, shared by its group of query heads, whose mean recall
    reaches the target: the rule's union over a group couples its heads, so a group is the
    finest unit the recall curves are exact for). Returns delta [H] f32, searched on
    DELTA_GRID. Store it with
    `store.replace(cluster=store.cluster.replace(delta=delta))`.
    """
    if recall not in ("set", "middle"):
        raise ConfigError(f"recall must be 'set' or 'middle', got {recall!r}")
    if per not in CALIBRATE_PER:
        raise ConfigError(f"per must be one of {CALIBRATE_PER}, got {per!r}")
    if isinstance(queries, (jax.Array, np.ndarray)):
        q = jnp.asarray(queries)
    else:
        q = jnp.stack([jnp.asarray(x) for x in queries])
    B, S, K, D = store.k.shape
    if q.ndim != 4 or q.shape[1] != B or q.shape[3] != D:
        raise ShapeError(f"queries must be [n, B={B}, H, D={D}] (or n arrays [B, H, D]); "
                         f"got {q.shape}")
    n, H = q.shape[0], q.shape[2]
    if lengths is None:
        lens = jnp.broadcast_to(store.lengths, (n, B))
    elif isinstance(lengths, (jax.Array, np.ndarray)):
        lens = jnp.asarray(lengths, jnp.int32)
    else:
        lens = jnp.stack([jnp.asarray(x, jnp.int32) for x in lengths])
    if lens.shape != (n, B):
        raise ShapeError(f"lengths must be [n={n}, B={B}] (or n arrays [B]); got {lens.shape}")
    N, P = store.cluster.num_blocks, store.cluster.config.block_size
    per_query = 4 * B * H * (N * P + S)  # the slots' DIPR flags and the scores, roughly
    chunk = max(1, min(n, CALIBRATE_CHUNK_BYTES // per_query))
    r, rm = _recall_curves_jit(q, lens, store, float(beta), int(probe), float(rank_std), chunk,
                               float(rank_var))
    curves = np.asarray(r if recall == "set" else rm)  # [n, grid, B, H]
    K = store.k.shape[2]
    if per == "layer":
        mean = curves.mean(axis=(0, 2, 3))[None]  # [1, grid]
    else:
        mean = curves.reshape(n, -1, B, K, H // K).mean(axis=(0, 2, 4)).T  # [K, grid]
    out = []
    for m in mean:
        ok = np.nonzero(m >= target_recall)[0]
        out.append(min(DELTA_GRID[ok[0]] if ok.size else max_delta, max_delta))
    return jnp.asarray(np.repeat(np.asarray(out, np.float32), H // len(out)))
