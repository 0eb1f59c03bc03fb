"""Decode attention methods that plug into the model: full, streaming, top-k, Quest and DIPR.

A method is a frozen dataclass (static under jit). `prepare` runs once after prefill and
builds the per-layer state (the indexes over each layer's cache); `decode` is the per-layer
attention of one decode step: it keeps the index current as tokens are appended (the cluster
index scans its tail exactly and folds it in when it passes its capacity) and answers the
query through `alaya_jax.attention.sparse_attention` with the method's plan.

    aj.generate(model, tok, prompt, attention=aj.DIPR(beta=8.0))
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Optional

import jax
import jax.numpy as jnp

from alaya_jax.attention import (CALIBRATE_PER, IndexConfig, KVStore, Plan, build_store,
                                 calibrate_delta, sparse_attention)
from alaya_jax.errors import ConfigError, ShapeError
from alaya_jax.index.block import BlockConfig, append_block_index
from alaya_jax.index.cluster import ClusterConfig, fold_tail, fold_tail_slices, tail_slices
from alaya_jax.optimizer import Choice, CostTable, QueryShape, choose_plan, default_table


def _layer_stats(stats, kv_len):
    """The few numbers a decode step reports per layer: [B, H] attended, [B, K] read."""
    return dict(attended=stats.keys_attended.astype(jnp.float32),
                read=stats.keys_read.astype(jnp.float32),
                context=kv_len.astype(jnp.float32),
                truncated=stats.truncated.astype(jnp.int32))


_INDEX_CHOICES = ("auto", "flat", "block", "cluster")


@functools.lru_cache(maxsize=None)
def _cost_table(kind: Optional[str]) -> CostTable:
    """The optimizer's cost table: the default device's (None), a device kind, or a JSON path."""
    if kind is None:
        return default_table()
    if kind.endswith(".json"):
        return CostTable.load(path=kind)
    return CostTable.load(kind)


@dataclasses.dataclass(frozen=True)
class SparseMethod:
    """Attention through a `Plan` over per-layer indexes built after prefill.

    capacity_fraction: the static cap on groups (clusters/pages) read per kv head, as a fraction
    of the index's groups (None: no cap). A cap that truncates is counted in the stats.
    auto: the plan's index is chosen per static shape by the query optimizer
    (`alaya_jax.optimizer.choose_plan`, with the cost table `cost_table`: a device kind, a
    JSON path, or None for the default device's); `plan` is then the cluster plan, and the
    flat or block plan keeps its beta, sink and window.
    calibration_queries: n > 0 asks the prefill for each sequence's last n queries of every
    layer (`prefill(..., collect_queries=n)`); `prepare` then calibrates the cluster index's
    margin delta on them (`attention.calibrate_delta`, for a mean recall of the flat DIPR set
    of `target_recall`), per kv head (`calibrate_per="kv_head"`: on SmolLM2's keys the same
    recall from 7-12% fewer keys read than one margin per layer, at beta 5-8) or per layer
    ("layer"), unless the plan fixes delta. query_aware: also cluster
    the keys in the metric of those queries (`index.cluster.query_metric`).
    """

    plan: Plan
    index: IndexConfig = IndexConfig(cluster=None, block=None)
    capacity_fraction: Optional[float] = None
    auto: bool = False
    cost_table: Optional[str] = None
    calibration_queries: int = 0
    target_recall: float = 0.99
    query_aware: bool = False
    calibrate_per: str = "kv_head"

    def __post_init__(self):
        if self.calibrate_per not in CALIBRATE_PER:  # at construction, not at prepare
            raise ConfigError(f"calibrate_per must be one of {CALIBRATE_PER}, got "
                              f"{self.calibrate_per!r}")
        if self.query_aware and self.calibration_queries < 1:
            raise ConfigError("query_aware clustering needs prefill queries: calibration_queries "
                              f">= 1, got {self.calibration_queries}")
        if self.calibration_queries < 0:
            raise ConfigError(f"calibration_queries must be >= 0, got {self.calibration_queries}")
        if not 0 < self.target_recall <= 1:
            raise ConfigError(f"target_recall must be in (0, 1], got {self.target_recall}")
        if self.capacity_fraction is not None and not 0 < self.capacity_fraction <= 1:
            raise ConfigError(f"capacity_fraction must be in (0, 1] or None, got "
                              f"{self.capacity_fraction}")

    def describe(self) -> str:
        if self.auto:
            return f"dipr(beta={self.plan.beta:g}, index=auto: {self.plan.describe()} or flat/block)"
        return self.plan.describe()

    # -- the plan for a static shape ------------------------------------------------------
    def choose(self, S: int, B: int = 1, H: int = 32, K: int = 8, D: int = 128,
               itemsize: int = 2) -> Choice:
        """The optimizer's choice for a cache of S positions (static facts only): the plan
        every decode step of that shape runs, and why (`.explain()`)."""
        return _choose(self, QueryShape(context=S, batch=B, heads=H, kv_heads=K, head_dim=D,
                                        itemsize=itemsize))

    def choose_for(self, cache, n_heads: int) -> Choice:
        """`choose` for a model's decode cache."""
        k = cache.layer(0)[0]
        B, S, K, D = k.shape
        return self.choose(S, B, n_heads, K, D, jnp.dtype(k.dtype).itemsize)

    def index_config(self, path: str) -> IndexConfig:
        """The indexes a plan through `path` needs (only those are built)."""
        if not self.auto:
            return self.index
        return IndexConfig(cluster=self.index.cluster if path == "cluster" else None,
                           block=(self.index.block or BlockConfig()) if path == "block" else None)

    # -- host side, once after prefill ----------------------------------------------------
    def prepare(self, cache, n_heads: int, queries=None):
        """Builds the per-layer state in the cache's layout (stacked [L, ...] or a tuple).

        queries: the prefill's `PrefillQueries` (q [L, B, n, H, D], causal lengths [B, n]);
        used to calibrate the cluster index's delta when this method asks for them.
        """
        plan = self.choose_for(cache, n_heads).plan
        config = self.index_config(plan.index)
        lengths = cache.lengths
        calibrate = (plan.index == "cluster" and plan.kind == "dipr" and plan.delta is None
                     and self.calibration_queries > 0 and math.isfinite(plan.beta))
        query_aware = self.query_aware and plan.index == "cluster" and queries is not None
        if calibrate and queries is None:
            warnings.warn(f"{self.describe()} was prepared without prefill queries: the cluster "
                          f"index keeps its uncalibrated delta ({config.cluster.delta:g}), which "
                          f"may read most of the keys (with probe 0 the selection's bound m' "
                          f"comes from the sink, window and tail alone); pass "
                          f"prefill(..., collect_queries={self.calibration_queries})'s queries, "
                          f"or a capacity_fraction",
                          stacklevel=2)
            calibrate = False
        if calibrate or query_aware:
            q_all, q_len = queries.q, queries.lengths
            if q_all.ndim != 5 or q_all.shape[:2] != (cache.n_layers, lengths.shape[0]) \
                    or q_all.shape[3] != n_heads or q_len.shape != q_all.shape[1:3]:
                raise ShapeError(f"queries must be q [L={cache.n_layers}, B={lengths.shape[0]}, n, "
                                 f"H={n_heads}, D] with lengths [B, n]; got q {q_all.shape}, "
                                 f"lengths {q_len.shape}")
        states = []
        for i in range(cache.n_layers):
            k, v = cache.layer(i)
            store = _build_store_jit(k, v, lengths, config, n_heads,
                                     queries=q_all[i] if query_aware else None)
            if calibrate:
                # only queries that see every indexed key (positions >= length - window - 1):
                # the index holds keys of an earlier query's future
                n = q_all.shape[2]
                j0 = max(0, n - config.cluster.window - 1)  # stacked: q [n,B,H,D], lengths [n,B]
                delta = calibrate_delta(store, jnp.moveaxis(q_all[i, :, j0:], 1, 0), plan.beta,
                                        self.target_recall, plan.probe, plan.rank_std,
                                        lengths=jnp.moveaxis(q_len[:, j0:], 1, 0),
                                        per=self.calibrate_per, rank_var=plan.rank_var)
                store = store.replace(cluster=store.cluster.replace(delta=delta))
            # a dict with one array leaf, so a method without indexes still has a state
            states.append(dict(cluster=store.cluster, block=store.block,
                               steps=jnp.zeros((), jnp.int32)))
        if cache.stacked:
            return jax.tree.map(lambda *a: jnp.stack(a), *states)
        return tuple(states)

    def report(self, cache, n_heads: int, state) -> dict:
        """What `prepare` chose for this cache: the plan, the optimizer's reason, and each
        layer's selection margin delta (None without a cluster index)."""
        choice = self.choose_for(cache, n_heads)
        layers = state if isinstance(state, tuple) else [state]
        deltas = [None if st["cluster"] is None else jax.device_get(st["cluster"].delta)
                  for st in layers]
        if deltas[0] is not None:  # per layer: the mean margin over the heads
            deltas = [float(x) for d in deltas for x in d.reshape(-1, d.shape[-1]).mean(-1)]
        else:
            deltas = None
        return dict(plan=choice.plan.describe(), plan_reason=choice.reason,
                    delta_per_layer=deltas)

    def static_plan(self, S: int, B: int = 1, H: int = 32, K: int = 8, D: int = 128,
                    itemsize: int = 2) -> Plan:
        return self.choose(S, B, H, K, D, itemsize).plan

    # -- inside the jitted decode loop, between steps --------------------------------------
    def fold_horizon(self) -> int:
        """Decode steps that may run after `fold` before the next one is due (no cluster
        index: unbounded, returned as a large number)."""
        c = self.index.cluster
        return c.tail_capacity - c.window if c is not None else 1 << 30

    def fold(self, state, cache, ahead: int):
        """Moves every layer's cluster tail into its index when the next `ahead` decode steps
        could overflow the tail: one `lax.cond` for all layers (they share lengths and index
        end), fed only the tail slices, so the whole cache is neither carried nor copied.
        Steps then run `decode(..., fold=False)`: no per-layer branch, which on a GPU costs a
        host round trip per layer and, carrying the cache, a copy of it (measured on an H200
        at 8B shapes, 4K: 64 cache copies and transposes per step, 0.97 ms of kernels)."""
        layers = state if isinstance(state, tuple) else (state,)
        if layers[0]["cluster"] is None:
            return state
        cfg = layers[0]["cluster"].config
        if ahead > cfg.tail_capacity - cfg.window:
            raise ConfigError(f"fold ahead={ahead} steps exceeds tail_capacity - window = "
                              f"{cfg.tail_capacity - cfg.window}")
        S = cache.max_len
        lengths = cache.lengths
        cap = min(cfg.tail_capacity, S)
        if cache.stacked:  # one vmapped fold over the layer axis
            slices = jax.vmap(tail_slices)(state["cluster"], cache.k, cache.v)

            def do(st, sl):
                c = jax.vmap(fold_tail_slices, in_axes=(0, 0, 0, 0, None))(st["cluster"], *sl,
                                                                           lengths)
                return dict(st, cluster=c)
            end = state["cluster"].end[0]
        else:
            slices = tuple(tail_slices(st["cluster"], *cache.layer(i)) for i, st in enumerate(state))

            def do(st, sl):
                return tuple(dict(s_, cluster=fold_tail_slices(s_["cluster"], *x, lengths))
                             for s_, x in zip(st, sl))
            end = state[0]["cluster"].end
        pred = jnp.any(lengths + ahead - end > cap)
        return jax.lax.cond(pred, do, lambda st, sl: st, state, slices)

    # -- inside the jitted decode step, per layer -------------------------------------------
    def decode(self, q, k, v, kv_len, state, fold: bool = True):
        """q [B,H,D]; k, v [B,S,K,D] with the new token already written at kv_len - 1.

        fold=False: the caller ran `fold` before this step (the decode loop does); True folds
        the tail here when it is full (a per-layer branch: simple callers, CPU scans)."""
        B, S, K, D = k.shape
        plan = self.static_plan(S, B, q.shape[1], K, D, jnp.dtype(k.dtype).itemsize)
        cluster, block = state["cluster"], state["block"]
        if cluster is not None and fold:
            cap = min(cluster.config.tail_capacity, S)
            cluster = jax.lax.while_loop(lambda c: jnp.any(kv_len - c.end > cap),
                                         lambda c: fold_tail(c, k, v, kv_len), cluster)
        if block is not None:
            b = jnp.arange(B)
            block = append_block_index(block, k[b, kv_len - 1][:, None], kv_len - 1)
        store = KVStore(k, v, kv_len, cluster, block)
        o, stats = sparse_attention(q, store, plan)
        new_state = dict(cluster=cluster, block=block, steps=state["steps"] + 1)
        return o.astype(q.dtype), new_state, _layer_stats(stats, kv_len)


@functools.lru_cache(maxsize=None)
def _choose(method: SparseMethod, shape: QueryShape) -> Choice:
    """The plan of `method` for `shape` (cached: static facts in, the same plan out)."""
    base = method.plan
    table = _cost_table(method.cost_table)
    if not method.auto:
        plan = base
        if method.capacity_fraction is not None and base.index != "flat" and base.kind != "quest":
            plan = dataclasses.replace(base, capacity=_capacity(method, base.index, shape.context))
        return choose_plan(shape, base.beta, available=(base.index,), table=table, force=plan,
                           sink=base.sink, window=base.window)
    read_cap = None
    if method.capacity_fraction is not None:  # the most a capacity lets each index read
        S = shape.context
        read_cap = {"cluster": _capacity(method, "cluster", S)
                    * method.index.cluster.block_size / S,
                    "block": _capacity(method, "block", S)
                    * (method.index.block or BlockConfig()).page_size / S}
    choice = choose_plan(shape, base.beta, available=("flat", "block", "cluster"), table=table,
                         sink=base.sink, window=base.window, read_cap=read_cap)
    if choice.path == "cluster":
        plan = base
    else:  # the flat and block plans answer DIPR exactly: nothing of the cluster recipe applies
        plan = Plan.dipr(base.beta, index=choice.path, sink=base.sink, window=base.window,
                         return_mask=base.return_mask)
    if method.capacity_fraction is not None and plan.index != "flat":
        plan = dataclasses.replace(plan, capacity=_capacity(method, plan.index, shape.context))
    return dataclasses.replace(choice, plan=plan)


def _capacity(method: SparseMethod, index: str, S: int) -> int:
    groups = (method.index.cluster.num_blocks(S) if index == "cluster"
              else (method.index.block or BlockConfig()).num_pages(S))
    return max(1, math.ceil(method.capacity_fraction * groups))


_build_store_jit = jax.jit(build_store, static_argnames=("config", "n_heads"))


def Full() -> SparseMethod:
    """Dense attention through the same machinery (reports keys attended = context)."""
    return SparseMethod(Plan.full())


def Streaming(sink: int = 4, window: int = 64) -> SparseMethod:
    return SparseMethod(Plan.streaming(sink, window))


def TopK(k: int, sink: int = 4, window: int = 64) -> SparseMethod:
    """Exact top-k tokens per query head (reads every score: the accuracy ceiling)."""
    return SparseMethod(Plan.topk(k, sink, window))


def Quest(pages: int, page_size: int = 32, sink: int = 4, window: int = 64) -> SparseMethod:
    """Quest: the top pages per query head by the per-channel min/max bound."""
    return SparseMethod(Plan.quest(pages, sink, window),
                        IndexConfig(cluster=None, block=BlockConfig(page_size)))


# The cluster plan's options: the accuracy recipe of `alaya_jax.attention`'s docstring (attend
# every key read, estimate the unread clusters, always read each query head's 8 best clusters)
# and the plain DIPR rule (attend only the keys within beta of the max read; the selection's
# bound m' from the sink, window and tail: no probe). On SmolLM2's keys
# (benchmarks/results/dipr_quality.json, families cluster-dipr@kv+noprobe and cluster-dipr@kv)
# probe 0 gives the output error of probe 2 at beta 5-8; on the GPU kernels it saves the probe's
# top-k and gathers and takes the margins kernel. `one_pass=True` (threshold m' - beta: one
# read of the kept blocks; a superset of the DIPR set, the same error at beta 5-8) is the
# fastest plan there (7.51 ms/token at 128K, 8B shapes, H200, against 8.59 exact with probe 2).
ACCURACY_PLAN = dict(attend_read=True, remainder=True, remainder_var=0.5, probe=8)
PLAIN_CLUSTER_PLAN = dict(attend_read=False, remainder=False, remainder_var=0.0, probe=0)
CLUSTER_PLAN = PLAIN_CLUSTER_PLAN  # DIPR's default (see DIPR's docstring for the measurements)


def DIPR(beta: float = 8.0, index: str = "auto", *, sink: int = 4, window: int = 64,
         delta: Optional[float] = None, cluster_size: int = 32, block_size: Optional[int] = None,
         balance_rounds: int = 0, tail_capacity: Optional[int] = None,
         capacity_fraction: Optional[float] = None, calibration_queries: int = 32,
         target_recall: float = 0.99, cost_table: Optional[str] = None, query_aware: bool = False,
         calibrate_per: str = "kv_head", summary_dtype: str = "bfloat16",
         **plan_kw) -> SparseMethod:
    """Dynamic inner-product range query: keys whose score is within beta of the best.

    index "auto" (the default: the query optimizer picks flat, block or cluster per static
    shape from the device's cost table; `SparseMethod.choose` says which and why), "flat"
    (exact, every score), "block" (pages by the min/max bound) or "cluster"
    (estimate-then-verify over k-means clusters). beta is in units of q.k/sqrt(D); SmolLM2
    needs about 8 to match full attention (DESIGN.md). delta: the cluster selection margin;
    None calibrates it per kv head (calibrate_per="kv_head", or per layer with "layer") on the
    last `calibration_queries` prefill queries of each sequence for a mean recall
    `target_recall` of the flat DIPR set. plan_kw: further
    `Plan` options of the cluster plan (attend_read, probe, remainder_var, mass_eps, one_pass,
    ...).
    block_size (default 2 x cluster_size) and balance_rounds: the cluster index's storage
    (`ClusterConfig`); block_size = cluster_size with a few balance rounds keeps the
    cluster-ordered copy near 1x the cache instead of ~3x (for long contexts). tail_capacity
    (default max(192, window + 64)): exact tail slots; decoding folds the tail into the index
    every tail_capacity - window steps at most. summary_dtype: storage of the cluster
    summaries (`ClusterConfig.summary_dtype`): bf16 halves the bytes of the centroid scores
    for the same recall, reads and error as f32 (dipr_quality.json, family cluster@kv+bf16);
    "float8_e4m3fn" halves them again (q goes to fp8 as well), with the same recall, reads and
    error as bf16 at beta 1-8 under one_pass and probe 0 (family cluster-dipr@kv+onepass+fp8),
    and takes the margins kernel at 1M tokens from 21.4 to 13.4 us (H200, kernels_fp8.json).
    """
    if index not in _INDEX_CHOICES:
        raise ConfigError(f"DIPR index must be one of {_INDEX_CHOICES}, got {index!r}")
    if not beta >= 0:
        raise ConfigError(f"DIPR beta must be >= 0 (float('inf') keeps every key), got {beta}")
    if cluster_size < 1:
        raise ConfigError(f"cluster_size must be >= 1, got {cluster_size}")
    if block_size is not None and block_size < 1:
        raise ConfigError(f"block_size must be >= 1, got {block_size}")
    cluster = ClusterConfig(cluster_size=cluster_size, block_size=block_size or 2 * cluster_size,
                            sink=sink, window=window, balance_rounds=balance_rounds,
                            tail_capacity=tail_capacity or max(192, window + 64),
                            summary_dtype=summary_dtype)
    if index in ("cluster", "auto"):
        cfg = IndexConfig(cluster=cluster, block=None)
    elif index == "block":
        cfg = IndexConfig(cluster=None, block=BlockConfig())
    else:
        cfg = IndexConfig(cluster=None, block=None)
    if index in ("cluster", "auto"):
        plan_kw = {**CLUSTER_PLAN, **plan_kw}
    plan = Plan.dipr(beta, "cluster" if index == "auto" else index, sink=sink, window=window,
                     delta=delta, **plan_kw)
    return SparseMethod(plan, cfg, capacity_fraction, auto=index == "auto", cost_table=cost_table,
                        calibration_queries=(calibration_queries if index in ("cluster", "auto")
                                             and delta is None else 0),
                        target_recall=target_recall, query_aware=query_aware,
                        calibrate_per=calibrate_per)
