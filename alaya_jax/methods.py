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
import math
from typing import Optional

import jax
import jax.numpy as jnp

from alaya_jax.attention import IndexConfig, KVStore, Plan, build_store, sparse_attention
from alaya_jax.index.block import BlockConfig, append_block_index
from alaya_jax.index.cluster import ClusterConfig, fold_tail


def _layer_stats(stats, kv_len):
    """The few numbers a decode step reports per layer: [B, H] attended, [B, K] read."""
    return dict(attended=stats.keys_attended.astype(jnp.float32),
                read=stats.keys_read.astype(jnp.float32),
                context=kv_len.astype(jnp.float32),
                truncated=stats.truncated.astype(jnp.int32))


@dataclasses.dataclass(frozen=True)
class SparseMethod:
    """Attention through a `Plan` over per-layer indexes built after prefill.

    capacity_fraction: the static cap on groups (clusters/pages) read per kv head, as a fraction
    of the index's groups (None: no cap). A cap that truncates is counted in the stats.
    """

    plan: Plan
    index: IndexConfig = IndexConfig(cluster=None, block=None)
    capacity_fraction: Optional[float] = None

    def describe(self) -> str:
        return self.plan.describe()

    # -- host side, once after prefill ----------------------------------------------------
    def prepare(self, cache, n_heads: int):
        """Builds the per-layer state in the cache's layout (stacked [L, ...] or a tuple)."""
        lengths = cache.lengths
        states = []
        for i in range(cache.n_layers):
            k, v = cache.layer(i)
            store = _build_store_jit(k, v, lengths, self.index, n_heads)
            # a dict with one array leaf, so a method without indexes still has a state
            states.append(dict(cluster=store.cluster, block=store.block,
                               steps=jnp.zeros((), jnp.int32)))
        if cache.stacked:
            return jax.tree.map(lambda *a: jnp.stack(a), *states)
        return tuple(states)

    def static_plan(self, S: int) -> Plan:
        if self.capacity_fraction is None:
            return self.plan
        groups = (self.index.cluster.num_blocks(S) if self.plan.index == "cluster"
                  else BlockConfig().num_pages(S) if self.index.block is None
                  else self.index.block.num_pages(S))
        return dataclasses.replace(self.plan, capacity=max(1, math.ceil(self.capacity_fraction * groups)))

    # -- inside the jitted decode step, per layer -------------------------------------------
    def decode(self, q, k, v, kv_len, state):
        """q [B,H,D]; k, v [B,S,K,D] with the new token already written at kv_len - 1."""
        cluster, block = state["cluster"], state["block"]
        if cluster is not None:
            cap = min(cluster.config.tail_capacity, k.shape[1])
            cluster = jax.lax.while_loop(lambda c: jnp.any(kv_len - c.end > cap),
                                         lambda c: fold_tail(c, k, v, kv_len), cluster)
        if block is not None:
            b = jnp.arange(k.shape[0])
            block = append_block_index(block, k[b, kv_len - 1][:, None], kv_len - 1)
        store = KVStore(k, v, kv_len, cluster, block)
        o, stats = sparse_attention(q, store, self.static_plan(k.shape[1]))
        new_state = dict(cluster=cluster, block=block, steps=state["steps"] + 1)
        return o.astype(q.dtype), new_state, _layer_stats(stats, kv_len)


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


def DIPR(beta: float = 8.0, index: str = "cluster", *, sink: int = 4, window: int = 64,
         delta: Optional[float] = None, cluster_size: int = 32, remainder: bool = False,
         capacity_fraction: Optional[float] = None, **plan_kw) -> SparseMethod:
    """Dynamic inner-product range query: keys whose score is within beta of the best.

    index "flat" (exact, every score), "block" (pages by the min/max bound) or "cluster"
    (estimate-then-verify over k-means clusters; the main path). beta is in units of
    q.k/sqrt(D); SmolLM2 needs about 8 to match full attention (DESIGN.md).
    """
    if index == "cluster":
        cfg = IndexConfig(cluster=ClusterConfig(cluster_size=cluster_size, block_size=2 * cluster_size,
                                                sink=sink, window=window,
                                                tail_capacity=max(192, window + 64)),
                          block=None)
    elif index == "block":
        cfg = IndexConfig(cluster=None, block=BlockConfig())
    else:
        cfg = IndexConfig(cluster=None, block=None)
    return SparseMethod(Plan.dipr(beta, index, sink=sink, window=window, delta=delta,
                                  remainder=remainder, **plan_kw), cfg, capacity_fraction)
