"""The fine index: k-means clusters of keys, stored cluster-ordered in fixed-size blocks.

Layout (the contract with alaya_jax/pallas/; keep it):

    keys        [B, K, N, P, D]  cache dtype, indexed keys grouped by cluster
    values      [B, K, N, P, D]  cache dtype
    block_len   [B, K, N] int32  valid members at the start of each block (0..P)
    positions   [B, K, N, P] int32  original token positions, -1 for padding
    centroid    [B, K, N, D] f32  mean key of the block's members (the ranking summary)
    key_var     [B, K, N, D] f32  per-channel variance of the members (remainder correction)
    value_mean  [B, K, N, D] f32  mean value of the members (remainder estimate)
                (centroid and value_mean are bf16 with summary_dtype="bfloat16")
    cluster_id  [B, K, N] int32  k-means cluster of the block (-1 empty, -2 opened at append)
    super_*     optional second level (config.super_size > 0): super_id [B, K, N] and per
                super-cluster super_len [B, K, NS], super_centroid, super_key_var,
                super_value_mean [B, K, NS, D]; None otherwise (kernels may ignore it only
                for plans through an index without it)

A cluster larger than P spans several blocks (members in position order); each block belongs
to one cluster and carries its own summaries, so selection works per block. N is static:
ceil(S / P) + C + spare, enough for every split (sum_c ceil(n_c / P) <= n / P + C) and for
every token that can still be appended, so a key is never dropped.

What the index covers: positions [sink, end) of each sequence. The first `sink` tokens and
the tail [end, length) (which holds the recent `window` tokens and whatever was appended
since the last fold) are attended exactly from the positional cache. `fold_tail` moves the
tail (except the window) into the nearest blocks; a rebuild re-clusters everything.

Selection (DESIGN.md "Estimate, then verify"), per query head h of kv head k:
  1. est[n] = q . centroid[n] / sqrt(D) for every non-empty block;
  2. m' = max(exact scores of sink and tail, exact scores of the `probe` best blocks);
  3. keep blocks with est >= m' - beta - delta[h]; union over the G heads of the group;
     at most `capacity` blocks per kv head (the best margins first), truncation reported;
  4. attend exactly over what was read with threshold = (max over everything read) - beta;
  5. optionally estimate the unread blocks: n * exp(est + var correction) with value_mean.
With the super level (config.super_size > 0), step 1 scores the NS super-cluster rows first and
only the blocks of the super-clusters it opens; unopened super-clusters are estimated in step
5 from their own summaries (super_len, super_centroid, super_key_var, super_value_mean).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Optional

import flax.struct
import jax
import jax.numpy as jnp

from alaya_jax.dipr import MASK_VALUE, AttentionOut, normalize, softmax_parts
from alaya_jax.errors import ConfigError, ShapeError

_METRICS = ("l2", "cosine")
_VAR_SUMMARIES = ("channel", "scalar")
_SUMMARY_DTYPES = ("float32", "bfloat16", "float8_e4m3fn", "int8")


#: Past _ROUND_FROM blocks, N is a multiple of the margins kernel's row tile
#: (pallas/score_select._TILE): an N off it costs that kernel a padded copy of the centroids per
#: call (11 us per layer at 128K, 8B shapes, H200); below, the copy is a few rows and the
#: rounding would only add empty blocks (up to 4x for the smallest indexes).
_BLOCKS_ROUND = 64
_ROUND_FROM = 1024


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    """Static sizes of a cluster index (hashable: static under jit).

    cluster_size: target mean keys per k-means cluster (C = ceil(S / cluster_size)).
    block_size: P, slots per stored block (a bigger cluster spans several blocks). The default
      2 x cluster_size keeps nearly every cluster in one block (rows scored ~ S / 32; with
      P = cluster_size k-means' uneven sizes split ~45% more blocks, measured on SmolLM2),
      at the price of part-full blocks (memory N * P ~ 3 S slots).
    iters: k-means iterations. metric: "l2" (Lloyd) or "cosine" (spherical k-means).
    sink, window: tokens kept exact at the start / end; the index covers the middle.
    tail_capacity: exact tail slots; a fold runs when the tail would pass it.
    spare_blocks: extra empty blocks (appends open new blocks when no block has room).
    delta: default margin before calibration (units of q.k/sqrt(D)).
    balance_rounds: rounds of capacity-constrained assignment after k-means (0: off). With
      cluster_size a little below block_size, blocks come out nearly full, so fewer rows are
      scored for the same keys (unbalanced k-means splits big clusters into part-full blocks).
    var_summary: the key-variance summary the ranking (rank_std, rank_var) and the remainder
      correction (remainder_var) read. "channel": a per-channel variance row per block (a
      second summary row: it doubles the rows scored). "scalar": one number per block, the
      mean per-channel variance s[n] (the mean over members of |k - c|^2 / D), times a
      per-kv-head channel profile g (the pooled within-block variance, mean 1): key_var is
      stored as s[n] * g, rank 1, so every consumer computes the same thing, and a query reads
      N scalars + one D row per kv head instead of N rows. Measured on SmolLM2 (7.6K tokens,
      layers 1/10/20/29): the same output error as "channel" (1.94% vs 1.97% at 8% attended).
    summary_dtype: how the per-block rows a query reads (centroid, value_mean) are stored:
      "float32", "bfloat16" (stored as bf16 arrays: half the bytes the centroid scores read),
      "float8_e4m3fn" (fp8 arrays, a quarter; no scale, saturated at 448; q is cast to fp8
      for the scores as well) or "int8" (symmetric, one f32 scale per row; kept as f32 arrays
      holding the rounded values, so every consumer sees exactly what a kernel reading the
      narrow storage would);
      `summary_row_cost` gives their bytes per block.
    super_size: blocks per super-cluster of a second, coarse level (0: off). The block
      centroids are clustered again (weighted k-means, the same metric) into
      NS = ceil(C / super_size) super-clusters with their own summaries; a query scores the NS
      super rows, opens the best super-clusters (Plan.super_probe per query head, plus those
      passing DIPR's rule) and scores only the blocks inside them; the rest is estimated
      from the super summaries. Rows scored drop from ~N to ~NS + the opened blocks.
    """

    cluster_size: int = 32
    block_size: int = 64
    iters: int = 8
    metric: str = "l2"
    sink: int = 4
    window: int = 64
    tail_capacity: int = 192
    spare_blocks: int = 0
    delta: float = 1.0
    balance_rounds: int = 0
    var_summary: str = "channel"
    summary_dtype: str = "float32"
    super_size: int = 0

    def __post_init__(self):
        if self.super_size < 0:
            raise ConfigError(f"ClusterConfig.super_size must be >= 0, got {self.super_size}")
        if self.summary_dtype not in _SUMMARY_DTYPES:
            raise ConfigError(f"ClusterConfig.summary_dtype must be one of {_SUMMARY_DTYPES}, "
                              f"got {self.summary_dtype!r}")
        if self.var_summary not in _VAR_SUMMARIES:
            raise ConfigError(f"ClusterConfig.var_summary must be one of {_VAR_SUMMARIES}, "
                              f"got {self.var_summary!r}")
        if self.balance_rounds < 0:
            raise ConfigError(f"balance_rounds must be >= 0, got {self.balance_rounds}")
        for name in ("cluster_size", "block_size", "iters", "tail_capacity"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ClusterConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.sink < 0 or self.window < 0 or self.spare_blocks < 0:
            raise ConfigError(f"sink, window and spare_blocks must be >= 0, got {self.sink}, "
                              f"{self.window}, {self.spare_blocks}")
        if self.metric not in _METRICS:
            raise ConfigError(f"ClusterConfig.metric must be one of {_METRICS}, got {self.metric!r}")
        if self.tail_capacity <= self.window:
            raise ConfigError(f"tail_capacity ({self.tail_capacity}) must exceed window "
                              f"({self.window}): the window always lives in the tail")

    def num_clusters(self, S: int) -> int:  # C
        return max(1, -(-S // self.cluster_size))

    def num_blocks(self, S: int) -> int:
        """N: the blocks the layout needs (ceil(S / block_size) + clusters + spare), rounded
        up to a multiple of _BLOCKS_ROUND from _ROUND_FROM blocks."""
        n = -(-S // self.block_size) + self.num_clusters(S) + self.spare_blocks
        return n if n < _ROUND_FROM else -(-n // _BLOCKS_ROUND) * _BLOCKS_ROUND

    def num_supers(self, S: int) -> int:  # NS (0 without the super level)
        return -(-self.num_clusters(S) // self.super_size) if self.super_size else 0


@flax.struct.dataclass
class ClusterIndex:
    keys: jax.Array  # [B, K, N, P, D] cache dtype
    values: jax.Array  # [B, K, N, P, D] cache dtype
    block_len: jax.Array  # [B, K, N] int32
    positions: jax.Array  # [B, K, N, P] int32, -1 padding
    centroid: jax.Array  # [B, K, N, D] f32
    key_var: jax.Array  # [B, K, N, D] f32
    value_mean: jax.Array  # [B, K, N, D] f32
    cluster_id: jax.Array  # [B, K, N] int32
    end: jax.Array  # [B] int32: the index covers positions [sink, end)
    delta: jax.Array  # [H] f32, selection margin per query head (calibrated)
    transform: jax.Array  # [B, K, D, D] f32, the clustering metric (identity or query-aware)
    config: ClusterConfig = flax.struct.field(pytree_node=False)
    # the super level (config.super_size > 0; None otherwise): a coarse clustering of blocks
    super_id: Optional[jax.Array] = None  # [B, K, N] int32 super-cluster of a block, -1 empty
    super_len: Optional[jax.Array] = None  # [B, K, NS] int32 keys
    super_centroid: Optional[jax.Array] = None  # [B, K, NS, D] f32
    super_key_var: Optional[jax.Array] = None  # [B, K, NS, D] f32
    super_value_mean: Optional[jax.Array] = None  # [B, K, NS, D] f32

    @property
    def num_blocks(self) -> int:
        return self.keys.shape[2]

    @staticmethod
    def abstract(config: ClusterConfig, B: int, S: int, H: int, K: int, D: int, dtype=jnp.bfloat16):
        """ShapeDtypeStruct tree of an index over a [B, S, K, D] cache with H query heads."""
        N, P = config.num_blocks(S), config.block_size
        sds = jax.ShapeDtypeStruct
        return ClusterIndex(
            keys=sds((B, K, N, P, D), dtype), values=sds((B, K, N, P, D), dtype),
            block_len=sds((B, K, N), jnp.int32), positions=sds((B, K, N, P), jnp.int32),
            centroid=sds((B, K, N, D), summary_storage(config)),
            key_var=sds((B, K, N, D), jnp.float32),
            value_mean=sds((B, K, N, D), summary_storage(config)),
            cluster_id=sds((B, K, N), jnp.int32),
            end=sds((B,), jnp.int32), delta=sds((H,), jnp.float32),
            transform=sds((B, K, D, D), jnp.float32), config=config,
            **_super_abstract(config, B, S, K, D))


def _super_abstract(config, B, S, K, D):
    if not config.super_size:
        return {}
    N, NS = config.num_blocks(S), config.num_supers(S)
    sds = jax.ShapeDtypeStruct
    return dict(super_id=sds((B, K, N), jnp.int32), super_len=sds((B, K, NS), jnp.int32),
                super_centroid=sds((B, K, NS, D), summary_storage(config)),
                super_key_var=sds((B, K, NS, D), jnp.float32),
                super_value_mean=sds((B, K, NS, D), summary_storage(config)))


# ----------------------------------------------------------------------------- build


def _kmeans(x, valid, n_valid, lo, C, iters, metric, balance_rounds=0, capacity=0):
    """k-means over one kv head.  x [S,D] f32, valid [S] bool -> assignment [S] int32 (C: none).

    C_eff = ceil(n_valid / (S / C)) clusters are seeded from keys evenly spaced in position
    (RoPE makes nearby tokens similar, so this spreads seeds over the key space cheaply).
    """
    S, D = x.shape
    xs = x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + 1e-6) if metric == "cosine" else x
    per = S / C
    c_eff = jnp.clip(jnp.ceil(n_valid / per).astype(jnp.int32), 1, C)
    cid = jnp.arange(C)
    active = cid < c_eff
    seed_pos = lo + jnp.floor((cid + 0.5) * n_valid / c_eff).astype(jnp.int32)
    cent = xs[jnp.clip(seed_pos, 0, S - 1)]  # [C, D]

    def assign(cent):
        if metric == "cosine":
            aff = xs @ cent.T  # [S, C]
        else:
            aff = xs @ cent.T - 0.5 * jnp.sum(cent * cent, axis=-1)[None, :]
        aff = jnp.where(active[None, :], aff, -jnp.inf)
        return jnp.argmax(aff, axis=-1).astype(jnp.int32)

    def step(_, cent):
        a = assign(cent)
        w = valid.astype(jnp.float32)
        sums = jax.ops.segment_sum(xs * w[:, None], a, num_segments=C)
        cnt = jax.ops.segment_sum(w, a, num_segments=C)
        new = sums / jnp.maximum(cnt, 1.0)[:, None]
        if metric == "cosine":
            new = new / (jnp.linalg.norm(new, axis=-1, keepdims=True) + 1e-6)
        return jnp.where((cnt > 0)[:, None], new, cent)  # an empty cluster keeps its seed

    cent = jax.lax.fori_loop(0, iters, step, cent)
    if not balance_rounds:
        return jnp.where(valid, assign(cent), C)
    if metric == "cosine":
        aff = xs @ cent.T
    else:
        aff = xs @ cent.T - 0.5 * jnp.sum(cent * cent, axis=-1)[None, :]
    aff = jnp.where(active[None, :], aff, -jnp.inf)
    return _balanced_assign(aff, valid, capacity, balance_rounds)


def _balanced_assign(aff, valid, capacity, rounds):
    """Capacity-constrained assignment by deferred acceptance.

    aff [S, C] (-inf: not allowed), valid [S] -> assignment [S] (C: none). Each round every key
    proposes to its best cluster that has not rejected it; a cluster keeps its `capacity` best
    proposers and rejects the rest. Keys still rejected after `rounds` go to their best
    remaining cluster anyway (the layout then splits that cluster: no key is ever dropped).
    """
    S, C = aff.shape
    rows = jnp.arange(S)

    def propose(forbidden):
        a = jnp.argmax(jnp.where(forbidden, -jnp.inf, aff), axis=-1).astype(jnp.int32)
        return jnp.where(valid, a, C)

    def body(_, forbidden):
        a = propose(forbidden)
        mine = jnp.where(valid, aff[rows, jnp.minimum(a, C - 1)], -jnp.inf)
        order = jnp.lexsort((-mine, a))  # by cluster, best affinity first
        a_sorted = a[order]
        sizes = jax.ops.segment_sum(jnp.ones((S,), jnp.int32), a, num_segments=C + 1)
        first = jnp.cumsum(sizes) - sizes
        rank_sorted = jnp.arange(S) - first[a_sorted]
        rank = jnp.zeros((S,), jnp.int32).at[order].set(rank_sorted)
        reject = valid & (a < C) & (rank >= capacity)
        hit = jnp.where(reject, a, C)  # C: out of range, dropped
        forbidden = forbidden.at[rows, hit].set(True, mode="drop")
        all_gone = jnp.all(forbidden | ~jnp.isfinite(aff), axis=-1)
        return jnp.where(all_gone[:, None], False, forbidden)  # nowhere left: start over

    forbidden = jax.lax.fori_loop(0, rounds, body, jnp.zeros((S, C), bool))
    return propose(forbidden)


def _layout_one(x, v, a, valid, C, N, P):
    """Cluster-ordered blocks for one kv head.  x, v [S,D], a [S] (C = unassigned)."""
    S, D = x.shape
    pos = jnp.arange(S, dtype=jnp.int32)
    sizes = jax.ops.segment_sum(valid.astype(jnp.int32), a, num_segments=C + 1)[:C]  # [C]
    nblk = -(-sizes // P)  # blocks per cluster
    first_blk = jnp.cumsum(nblk) - nblk  # [C]
    first_member = jnp.cumsum(sizes) - sizes  # [C]
    order = jnp.argsort(a * S + pos)  # cluster-major, position order inside a cluster
    a_sorted = a[order]
    ok = a_sorted < C
    ac = jnp.minimum(a_sorted, C - 1)
    rank = jnp.arange(S) - first_member[ac]
    blk = jnp.where(ok, first_blk[ac] + rank // P, N)  # N: dropped by the scatter
    slot = rank % P
    keys = jnp.zeros((N, P, D), x.dtype).at[blk, slot].set(x[order], mode="drop")
    vals = jnp.zeros((N, P, D), v.dtype).at[blk, slot].set(v[order], mode="drop")
    positions = jnp.full((N, P), -1, jnp.int32).at[blk, slot].set(pos[order], mode="drop")
    block_len = jnp.zeros((N,), jnp.int32).at[blk].add(1, mode="drop")
    blk_ids = jnp.arange(N)
    # block b belongs to the cluster whose block range contains it
    owner = jnp.searchsorted(first_blk + nblk, blk_ids, side="right").astype(jnp.int32)
    cluster_id = jnp.where(block_len > 0, owner, -1)
    return keys, vals, positions, block_len, cluster_id


def block_summaries(keys, values, block_len):
    """Per-block mean key, per-channel key variance, mean value (f32).

    keys, values [..., N, P, D], block_len [..., N] -> centroid, key_var, value_mean [..., N, D].
    """
    P = keys.shape[-2]
    m = (jnp.arange(P) < block_len[..., None]).astype(jnp.float32)[..., None]  # [...,N,P,1]
    n = jnp.maximum(block_len, 1).astype(jnp.float32)[..., None]
    kf = keys.astype(jnp.float32)
    centroid = jnp.sum(kf * m, axis=-2) / n
    key_var = jnp.sum(jnp.square(kf - centroid[..., None, :]) * m, axis=-2) / n
    value_mean = jnp.sum(values.astype(jnp.float32) * m, axis=-2) / n
    return centroid, key_var, value_mean


def summary_storage(config: ClusterConfig):
    """The dtype of the stored centroid and value_mean arrays."""
    return {"bfloat16": jnp.bfloat16, "float8_e4m3fn": jnp.float8_e4m3fn}.get(
        config.summary_dtype, jnp.float32)


def to_fp8(x):
    """x in float8_e4m3fn, saturated at its largest finite value (448; the cast makes NaN past
    it)."""
    big = float(jnp.finfo(jnp.float8_e4m3fn).max)
    return jnp.clip(x, -big, big).astype(jnp.float8_e4m3fn)


def round_summary(x, summary_dtype: str):
    """x [..., D] f32 in its storage: f32, bf16, or f32 rounded through int8 (absmax scale per
    row)."""
    if summary_dtype == "float32":
        return x
    if summary_dtype == "bfloat16":
        return x.astype(jnp.bfloat16)
    if summary_dtype == "float8_e4m3fn":
        return to_fp8(x)
    scale = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / 127.0
    return jnp.round(x / jnp.where(scale > 0, scale, 1.0)) * scale


def summary_row_cost(config: ClusterConfig, D: int, cache_dtype=jnp.bfloat16,
                     variance_row: bool = False) -> float:
    """Bytes a query reads per block for the block's summaries, in attended keys.

    The summaries are the centroid (scored) and value_mean (the remainder estimate), stored in
    config.summary_dtype, plus a per-channel f32 variance row when `variance_row` (var_summary
    "channel" with rank_std / rank_var / remainder_var). One attended key costs its key and
    value rows in `cache_dtype`. Stats.rows_scored counts one row per block instead (two with
    the variance row): the element count of the centroid alone.
    """
    item = {"float32": 4, "bfloat16": 2, "float8_e4m3fn": 1, "int8": 1}[config.summary_dtype]
    row = D * item + (4 if config.summary_dtype == "int8" else 0)  # int8: + the row's scale
    total = 2 * row + (4 * D if variance_row else 0)
    return total / (2 * D * jnp.dtype(cache_dtype).itemsize)


def variance_profile(key_var, block_len):
    """The per-kv-head channel profile of the within-block variance, normalized to mean 1.

    key_var [..., N, D], block_len [..., N] -> g [..., D] f32 (the member-weighted mean of
    key_var over blocks, divided by its channel mean; ones where the index is empty).
    """
    n = block_len.astype(jnp.float32)
    pooled = jnp.einsum("...n,...nd->...d", n, key_var)
    mean = jnp.mean(pooled, axis=-1, keepdims=True)
    return jnp.where(mean > 0, pooled / jnp.where(mean > 0, mean, 1.0), 1.0)


def scalar_variance(key_var, profile):
    """Rank-1 summary s[n] * g of a per-channel variance: s = mean over channels.

    key_var [..., N, D], profile g [..., D] (mean 1) -> [..., N, D] (its channel mean is s).
    """
    return jnp.mean(key_var, axis=-1, keepdims=True) * profile[..., None, :]


def variance_summary(index: "ClusterIndex"):
    """(scale [B,K,N], profile [B,K,D]) of an index built with var_summary="scalar": what a
    kernel reads instead of key_var (key_var == scale[..., None] * profile[..., None, :])."""
    scale = jnp.mean(index.key_var, axis=-1)
    nz = scale[..., None] > 0
    ratio = jnp.where(nz, index.key_var / jnp.where(nz, scale[..., None], 1.0), 0.0)
    w = (scale > 0).astype(jnp.float32)
    profile = jnp.einsum("bkn,bknd->bkd", w, ratio) / jnp.maximum(jnp.sum(w, -1), 1.0)[..., None]
    return scale, profile


def _super_kmeans(x, w, NS, iters):
    """Weighted k-means of one kv head's block centroids into NS super-clusters.

    x [N, D] f32 (centroids in the clustering metric), w [N] f32 keys per block -> [N] int32
    (-1 for empty blocks). Seeds: non-empty blocks evenly spaced in block order.
    """
    N = x.shape[0]
    valid = w > 0
    n_valid = jnp.sum(valid)
    order = jnp.argsort(~valid, stable=True)  # non-empty blocks first
    sid = jnp.arange(NS)
    active = sid < n_valid
    seed = order[jnp.clip(jnp.floor((sid + 0.5) * n_valid / NS).astype(jnp.int32), 0, N - 1)]
    cent = x[seed]

    def assign(cent):
        aff = x @ cent.T - 0.5 * jnp.sum(cent * cent, axis=-1)[None, :]
        return jnp.argmax(jnp.where(active[None, :], aff, -jnp.inf), axis=-1).astype(jnp.int32)

    def step(_, cent):
        a = assign(cent)
        sums = jax.ops.segment_sum(x * w[:, None], a, num_segments=NS)
        cnt = jax.ops.segment_sum(w, a, num_segments=NS)
        return jnp.where((cnt > 0)[:, None], sums / jnp.maximum(cnt, 1.0)[:, None], cent)

    cent = jax.lax.fori_loop(0, iters, step, cent)
    return jnp.where(valid, assign(cent), -1)


def super_summaries(super_id, block_len, centroid, key_var, value_mean, NS: int,
                    config: ClusterConfig):
    """Summaries of each super-cluster from its blocks' (exact pooling of the members).

    super_id, block_len [..., N]; centroid, key_var, value_mean [..., N, D] -> super_len
    [..., NS] int32 and super centroid, key_var (within + between blocks; rank 1 with the
    blocks' profile when var_summary="scalar"), value_mean [..., NS, D] (f32 sums; the
    centroid and value_mean stored as the blocks' are).
    """
    centroid, value_mean = centroid.astype(jnp.float32), value_mean.astype(jnp.float32)
    onehot = (super_id[..., None] == jnp.arange(NS)) & (block_len[..., None] > 0)  # [...,N,NS]
    w = onehot * block_len[..., None].astype(jnp.float32)
    n = jnp.sum(w, axis=-2)  # [..., NS]
    inv = 1.0 / jnp.maximum(n, 1.0)[..., None]
    c = jnp.einsum("...ns,...nd->...sd", w, centroid) * inv
    vm = jnp.einsum("...ns,...nd->...sd", w, value_mean) * inv
    second = jnp.einsum("...ns,...nd->...sd", w, key_var + centroid * centroid) * inv
    var = jnp.maximum(second - c * c, 0.0)
    if config.var_summary == "scalar":
        var = scalar_variance(var, variance_profile(key_var, block_len))
    return (n.astype(jnp.int32), round_summary(c, config.summary_dtype), var,
            round_summary(vm, config.summary_dtype))


def _refresh_supers(index: "ClusterIndex") -> "ClusterIndex":
    """After a fold: blocks opened since the build join their nearest super-cluster (in the
    index's metric), and every super summary is pooled again from its blocks."""
    NS = index.super_len.shape[-1]
    xs = jnp.einsum("bknd,bkde->bkne", index.centroid, index.transform)
    cs = jnp.einsum("bksd,bkde->bkse", index.super_centroid, index.transform)
    aff = jnp.einsum("bknd,bksd->bkns", xs, cs) - 0.5 * jnp.sum(cs * cs, -1)[:, :, None, :]
    aff = jnp.where((index.super_len > 0)[:, :, None, :], aff, -jnp.inf)
    nearest = jnp.argmax(aff, axis=-1).astype(jnp.int32)
    sid = jnp.where(index.block_len > 0,
                    jnp.where(index.super_id >= 0, index.super_id, nearest), -1)
    n, c, var, vm = super_summaries(sid, index.block_len, index.centroid, index.key_var,
                                    index.value_mean, NS, index.config)
    return index.replace(super_id=sid, super_len=n, super_centroid=c, super_key_var=var,
                         super_value_mean=vm)


def query_metric(queries, K: int):
    """The query-aware metric of the k-means: L with L L^T = E[q q^T] per kv head.

    queries [B, T, H, D] (sample queries, e.g. prefill) -> L [B, K, D, D] f32. Clustering
    x' = x @ L makes the squared L2 distance |(k - c) @ L|^2 = E_q[(q.k - q.c)^2]: k-means then
    minimizes the expected error of the centroid score q.c, the estimate the selection ranks by.
    """
    B, T, H, D = queries.shape
    qg = queries.astype(jnp.float32).reshape(B, T, K, H // K, D)
    cov = jnp.einsum("btkgd,btkge->bkde", qg, qg) / (T * (H // K))
    ridge = 1e-3 * jnp.trace(cov, axis1=-2, axis2=-1)[..., None, None] / D + 1e-6
    return jnp.linalg.cholesky(cov + ridge * jnp.eye(D))


def build_cluster_index(k, v, lengths, config: ClusterConfig, n_heads: int | None = None,
                        delta=None, queries=None) -> ClusterIndex:
    """Clusters the middle keys [sink, length - window) of every (sequence, kv head).

    k, v [B, S, K, D] (post-RoPE keys), lengths [B] int32. n_heads: H (for the per-head delta;
    default K). delta: [H] or scalar margin (default config.delta). queries: optional
    [B, T, H, D] sample queries (e.g. the prefill's last positions): k-means then runs in the
    query-aware metric of `query_metric` (metric "l2" only). Jittable (config static).
    """
    if k.ndim != 4 or v.shape != k.shape:
        raise ShapeError(f"expected k, v [B,S,K,D]; got {k.shape}, {v.shape}")
    B, S, K, D = k.shape
    H = K if n_heads is None else n_heads
    C, N, P = config.num_clusters(S), config.num_blocks(S), config.block_size
    lengths = lengths.astype(jnp.int32)
    lo = jnp.minimum(config.sink, lengths)  # [B]
    end = jnp.maximum(lo, lengths - config.window)  # [B]
    pos = jnp.arange(S)
    valid = (pos[None, :] >= lo[:, None]) & (pos[None, :] < end[:, None])  # [B,S]

    if queries is None:
        transform = jnp.broadcast_to(jnp.eye(D, dtype=jnp.float32), (B, K, D, D))
    else:
        if config.metric != "l2":
            raise ConfigError("query-aware clustering needs metric='l2'")
        transform = query_metric(queries, K)

    def one(x, vv, L, val, n, l0):  # x [S,D], L [D,D]
        a = _kmeans(x.astype(jnp.float32) @ L, val, n, l0, C, config.iters, config.metric,
                    config.balance_rounds, P)
        return _layout_one(x, vv, a, val, C, N, P)

    per_head = jax.vmap(one, in_axes=(1, 1, 0, None, None, None))  # over K
    keys, vals, positions, block_len, cluster_id = jax.vmap(per_head)(
        k, v, transform, valid, end - lo, lo)
    centroid, key_var, value_mean = block_summaries(keys, vals, block_len)
    if config.var_summary == "scalar":
        key_var = scalar_variance(key_var, variance_profile(key_var, block_len))
    centroid = round_summary(centroid, config.summary_dtype)
    value_mean = round_summary(value_mean, config.summary_dtype)
    d = jnp.broadcast_to(jnp.asarray(config.delta if delta is None else delta, jnp.float32), (H,))
    index = ClusterIndex(keys, vals, block_len, positions, centroid, key_var, value_mean,
                         cluster_id, end, d, transform, config)
    if not config.super_size:
        return index
    NS = config.num_supers(S)
    xs = jnp.einsum("bknd,bkde->bkne", centroid, transform)
    sid = jax.vmap(jax.vmap(lambda x, w: _super_kmeans(x, w, NS, config.iters)))(
        xs, block_len.astype(jnp.float32))
    n, c, var, vm = super_summaries(sid, block_len, centroid, key_var, value_mean, NS, config)
    return index.replace(super_id=sid, super_len=n, super_centroid=c, super_key_var=var,
                         super_value_mean=vm)


# ----------------------------------------------------------------------------- append


def take_windows(x, start, size: int):
    """x [B, S, ...], start [B] (in range) -> [B, size, ...]: one dynamic slice per sequence.
    (A vmapped dynamic slice becomes a gather with a batch dim, which XLA on a GPU served by
    first transposing the whole cache: measured as two full K/V copies per layer and step.)"""
    tail = (0,) * (x.ndim - 2)
    return jnp.concatenate([jax.lax.dynamic_slice(x, (b, start[b], *tail), (1, size) + x.shape[2:])
                            for b in range(x.shape[0])], axis=0)


def tail_slices(index: ClusterIndex, k, v):
    """The positional-cache tokens a fold may move: (kt, vt [B, A, K, D], start [B]), the A =
    min(tail_capacity, S) tokens from each sequence's index end (clamped into the cache)."""
    S = k.shape[1]
    A = min(index.config.tail_capacity, S)
    start = jnp.clip(index.end, 0, max(S - A, 0))
    return take_windows(k, start, A), take_windows(v, start, A), start


def fold_tail(index: ClusterIndex, k, v, lengths) -> ClusterIndex:
    """Moves the tail tokens [end, length - window) into the index (each to the nearest
    non-full block by the config's metric; a new block when none has room) and advances end.

    k, v [B, S, K, D] positional cache holding the tail; lengths [B]. Jittable. At most
    tail_capacity tokens move per call (the tail never holds more between folds).
    """
    return fold_tail_slices(index, *tail_slices(index, k, v), lengths)


def fold_tail_slices(index: ClusterIndex, kt, vt, start, lengths) -> ClusterIndex:
    """`fold_tail` on the slices `tail_slices` took (kt, vt [B, A, K, D], start [B]): a caller
    that decides whether to fold under `lax.cond` passes only these, not the whole cache."""
    cfg = index.config
    B, A, K, D = kt.shape
    P = cfg.block_size
    new_end = jnp.maximum(index.end, lengths - cfg.window)  # [B]

    def one_head(state, L, kt, vt, tpos, todo):
        # state: per-block arrays of one (b, k); kt, vt [A, D]; tpos [A]; todo [A] bool
        def body(i, st):
            keys, vals, positions, blen, cent, var, vmean, cid = st
            x = kt[i].astype(jnp.float32)
            has_room = blen < P
            nonempty = blen > 0
            if cfg.metric == "cosine":
                aff = cent @ x / (jnp.linalg.norm(cent, axis=-1) + 1e-6)
            else:  # L2 in the index's metric
                xl, cl = x @ L, cent @ L
                aff = cl @ xl - 0.5 * jnp.sum(cl * cl, axis=-1)
            aff_open = jnp.where(has_room & nonempty, aff, -jnp.inf)
            any_open = jnp.any(has_room & nonempty)
            first_empty = jnp.argmax(blen == 0)
            b = jnp.where(any_open, jnp.argmax(aff_open), first_empty)
            n = blen[b]
            do = todo[i] & (n < P)
            s = jnp.minimum(n, P - 1)
            nf = n.astype(jnp.float32)
            m_old = cent[b]
            m_new = m_old + (x - m_old) / (nf + 1.0)
            var_new = (nf * var[b] + (x - m_old) * (x - m_new)) / (nf + 1.0)
            vm_new = vmean[b] + (vt[i].astype(jnp.float32) - vmean[b]) / (nf + 1.0)
            upd = lambda arr, idx, val: arr.at[idx].set(jnp.where(do, val, arr[idx]))
            keys = upd(keys, (b, s), kt[i])
            vals = upd(vals, (b, s), vt[i])
            positions = upd(positions, (b, s), tpos[i])
            blen = upd(blen, b, n + 1)
            cent = upd(cent, b, m_new)
            var = upd(var, b, var_new)
            vmean = upd(vmean, b, vm_new)
            cid = upd(cid, b, jnp.where(n == 0, -2, cid[b]))
            return keys, vals, positions, blen, cent, var, vmean, cid

        return jax.lax.fori_loop(0, A, body, state)

    def one_seq(fields, Lb, kb, vb, st, e0, e1):  # kb, vb [A, K, D]
        tpos = st + jnp.arange(A, dtype=jnp.int32)
        todo = (tpos >= e0) & (tpos < e1)
        return jax.vmap(one_head, in_axes=(0, 0, 1, 1, None, None))(fields, Lb, kb, vb, tpos, todo)

    fields = (index.keys, index.values, index.positions, index.block_len,
              index.centroid.astype(jnp.float32), index.key_var,
              index.value_mean.astype(jnp.float32), index.cluster_id)
    out = jax.vmap(one_seq)(fields, index.transform, kt, vt, start, index.end, new_end)
    keys, vals, positions, blen, cent, var, vmean, cid = out
    if cfg.var_summary == "scalar":  # keep the rank-1 form: the scalar update above is exact
        var = scalar_variance(var, variance_summary(index)[1])
    cent = round_summary(cent, cfg.summary_dtype)
    vmean = round_summary(vmean, cfg.summary_dtype)
    # tokens are moved only up to what the A-token window reached
    moved_end = jnp.minimum(new_end, start + A)
    out = index.replace(keys=keys, values=vals, positions=positions, block_len=blen,
                        centroid=cent, key_var=var, value_mean=vmean, cluster_id=cid,
                        end=jnp.maximum(index.end, moved_end))
    return _refresh_supers(out) if cfg.super_size else out


# ----------------------------------------------------------------------------- select


class Selection(NamedTuple):
    kept: jax.Array  # [B, K, cap] int32 block ids, valid entries first (padding: 0)
    kept_count: jax.Array  # [B, K] int32
    needed: jax.Array  # [B, K] int32 blocks that passed the rule (> cap: truncated)
    estimate: jax.Array  # [B, H, N] f32 centroid scores (MASK_VALUE for empty blocks)
    threshold_select: jax.Array  # [B, H] f32 m' - beta - delta


def centroid_scores(q, centroid, block_len):
    """est = q . centroid / sqrt(D).  q [B,H,D], centroid [B,K,N,D] -> [B,H,N] f32."""
    B, H, D = q.shape
    K, N = centroid.shape[1], centroid.shape[2]
    if centroid.dtype == jnp.float8_e4m3fn:  # q in fp8 too: the product the margins kernel runs
        q = to_fp8(q)
    qg = q.reshape(B, K, H // K, D).astype(jnp.float32)
    est = jnp.einsum("bkgd,bknd->bkgn", qg, centroid.astype(jnp.float32)) / math.sqrt(D)
    est = jnp.where((block_len > 0)[:, :, None, :], est, MASK_VALUE)
    return est.reshape(B, H, N)


def gather_blocks(arr, kept):
    """arr [B, K, N, ...], kept [B, K, cap] -> [B, K, cap, ...]."""
    return jax.vmap(jax.vmap(lambda a, i: a[i]))(arr, kept)


def gathered_scores(q, keys, kept):
    """Scores of the kept blocks.  q [B,H,D], keys [B,K,N,P,D], kept [B,K,cap] -> [B,H,cap,P]."""
    B, H, D = q.shape
    K = keys.shape[1]
    gk = gather_blocks(keys, kept)  # [B,K,cap,P,D]
    qg = q.reshape(B, K, H // K, D).astype(jnp.float32)
    s = jnp.einsum("bkgd,bkcpd->bkgcp", qg, gk.astype(jnp.float32)) / math.sqrt(D)
    return s.reshape(B, H, kept.shape[-1], keys.shape[3])


def valid_slots(block_len, kept, kept_count, P):
    """[B,K,cap,P] bool: the slot holds a member of a live kept block."""
    blen = jnp.take_along_axis(block_len, kept, axis=-1)  # [B,K,cap]
    live = jnp.arange(kept.shape[-1])[None, None, :] < kept_count[..., None]
    return live[..., None] & (jnp.arange(P)[None, None, None, :] < blen[..., None])  # [B,K,cap,P]


def gathered_attention(q, keys, values, block_len, kept, kept_count, threshold):
    """Reference of the gathered sparse decode attention (the Pallas kernel's contract).

    q [B,H,D]; keys, values [B,K,N,P,D] (cluster-ordered blocks); block_len [B,K,N] int32;
    kept [B,K,cap] int32 block ids with the kept_count [B,K] valid ones first; threshold [B,H]
    f32: a key of a kept block is attended by query head h iff its score q.k/sqrt(D) >=
    threshold[b,h] (ties kept; pass MASK_VALUE to attend every read key). In the DIPR path,
    threshold = (max score over everything read: sink, tail and kept blocks) - beta, i.e.
    exact DIPR over what was read. Query head h reads kv head h // G; each kept block is read
    once for the group. Returns o [B,H,D] f32 and lse [B,H] f32 (o = 0, lse = MASK_VALUE when
    nothing passes), to be merged with the sink/tail part by log-sum-exp.
    """
    B, H, D = q.shape
    K, P = keys.shape[1], keys.shape[3]
    G = H // K
    cap = kept.shape[-1]
    s = gathered_scores(q, keys, kept)  # [B,H,cap,P]
    valid = valid_slots(block_len, kept, kept_count, P)  # [B,K,cap,P]
    mask = jnp.repeat(valid, G, axis=1) & (s >= threshold[:, :, None, None])
    return attend_masked(s.reshape(B, H, cap * P), mask.reshape(B, H, cap * P),
                   gather_blocks(values, kept).reshape(B, K, cap * P, D))


def attend_masked(s, mask, gv):
    """s, mask [B,H,M], gv [B,K,M,D] -> AttentionOut."""
    B, H, M = s.shape
    K, D = gv.shape[1], gv.shape[3]
    p, l, m = softmax_parts(s, mask)
    acc = jnp.einsum("bkgm,bkmd->bkgd", p.reshape(B, K, H // K, M), gv.astype(jnp.float32))
    return normalize(acc.reshape(B, H, D), l, m)


def select_blocks(est, exact_max, probe_max, beta, delta, capacity, block_len, K, force=None,
                  extra_margin=None):
    """DIPR selection rule over block estimates (shared by the cluster and block indexes).

    est [B,H,N] f32; exact_max, probe_max [B,H] (m' = their max); delta [H] or scalar;
    capacity static. force [B,K,N] bool: blocks kept regardless (the probed ones).
    extra_margin [B,K,N]: a second rule's margin (a block passes if either is >= 0).
    Returns Selection (kept ids best margin first).
    """
    B, H, N = est.shape
    G = H // K
    m_prime = jnp.maximum(exact_max, probe_max)
    thr = m_prime - beta - jnp.asarray(delta, jnp.float32)  # [B,H]
    margin = (est - thr[..., None]).reshape(B, K, G, N).max(axis=2)  # [B,K,N]
    if extra_margin is not None:
        margin = jnp.maximum(margin, extra_margin)
    margin = jnp.where(block_len > 0, margin, MASK_VALUE)
    if force is not None:
        margin = jnp.where(force & (block_len > 0), jnp.float32(1e30), margin)
    needed = jnp.sum(margin >= 0, axis=-1).astype(jnp.int32)
    cap = min(capacity, N)
    if cap >= N:  # no truncation possible: order-free compaction
        top_vals = margin
        top_ids = jnp.broadcast_to(jnp.arange(N, dtype=jnp.int32), margin.shape)
        order = jnp.argsort(-(margin >= 0).astype(jnp.int32), axis=-1, stable=True)
        top_ids = jnp.take_along_axis(top_ids, order, axis=-1)
        top_vals = jnp.take_along_axis(top_vals, order, axis=-1)
    else:  # a top-k over the N block rows (never over tokens): the best margins survive
        top_vals, top_ids = jax.lax.top_k(margin, cap)
    count = jnp.sum(top_vals >= 0, axis=-1).astype(jnp.int32)
    kept = jnp.where(top_vals >= 0, top_ids, 0).astype(jnp.int32)
    return Selection(kept, count, needed, est, thr)


def remainder_estimate(q, est, index_or_summaries, read_mask, use_var=0.0) -> AttentionOut:
    """Estimated attention of the unread blocks (RetroInfer-style).

    An unread block of n keys, centroid c, per-channel key variance var and mean value vbar
    adds n * exp(q.c/sqrt(D) + 0.5 * sum_d q_d^2 var_d / D) to the softmax denominator and that
    times vbar to the numerator (the variance term is the log-normal correction of E[exp(s)]).
    est [B,H,N]; read_mask [B,K,N] bool (True: read exactly, excluded here).
    """
    block_len, key_var, value_mean = index_or_summaries
    B, H, D = q.shape
    K, N = block_len.shape[1], block_len.shape[2]
    G = H // K
    qg = q.reshape(B, K, G, D).astype(jnp.float32)
    logw = est.reshape(B, K, G, N) + jnp.log(jnp.maximum(block_len, 1).astype(jnp.float32))[:, :, None]
    if use_var:
        logw = logw + 0.5 * use_var * jnp.einsum("bkgd,bknd->bkgn", qg * qg, key_var) / D
    live = ((block_len > 0) & ~read_mask)[:, :, None, :]
    logw = jnp.where(live, logw, MASK_VALUE)
    m = jnp.max(logw, axis=-1)
    w = jnp.where(live, jnp.exp(logw - m[..., None]), 0.0)
    l = jnp.sum(w, axis=-1)
    acc = jnp.einsum("bkgn,bknd->bkgd", w, value_mean)
    return normalize(acc.reshape(B, H, D), l.reshape(B, H), m.reshape(B, H))


def kept_mask(kept, kept_count, N):
    """[B,K,cap] ids -> [B,K,N] bool."""
    live = jnp.arange(kept.shape[-1])[None, None, :] < kept_count[..., None]
    scatter = lambda ids, lv: jnp.zeros((N,), bool).at[ids].max(lv)
    return jax.vmap(jax.vmap(scatter))(kept, live)
