"""The query optimizer: picks the plan per call from the shapes, beta and a device cost model.

    choice = choose_plan(QueryShape(context=128 * 1024, batch=1, heads=32, kv_heads=8,
                                    head_dim=128), beta=4.0, available=("flat", "cluster"))
    print(choice.explain())
    o, stats = sparse_attention(q, store, choice.plan)

Cost model (per layer, per call): each path costs a fixed launch overhead plus the bytes it
reads divided by the bandwidth its implementation reaches, both measured per device kind and
committed as a small JSON table (`alaya_jax/cost_tables/<kind>.json`; `cpu.json` is the
default). Bytes per kv head, with F the fraction of the context a path reads:

    flat     keys + values of all S tokens: 2 * S * D * itemsize
    block    2 page summary rows per page + the pages read: (2 * S / P + 2 * F_block * S) * D * ...
    cluster  1 centroid row per cluster + the clusters read:  (S / C + 2 * F_cluster * S) * D ...

F_cluster(beta) and F_block(beta) come from the quality benchmark (keys read at the
calibrated margin on real keys), stored in the same table. A table may split a path's cost
into its two kinds of work (`row_bandwidth_gbs`): the summary rows (scored, and the selection
over them, per row of the index) and the keys read (the attention over the kept groups):

    time = overhead + row bytes / row bandwidth + key bytes / bandwidth

fitted from runs at two capacities per context (`measure_cost_table`): one bandwidth for both
charges a large read (DIPR at beta 8 reads ~1/3 of the keys) at the per-row work's slope. A
static capacity caps the fraction charged (`read_cap`). The optimizer only chooses among
plans whose index the store has; a user may force a plan (`force=`), and the choice says so.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Optional, Sequence

import numpy as np

from alaya_jax.attention import Plan
from alaya_jax.errors import ConfigError

TABLE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cost_tables")


@dataclasses.dataclass(frozen=True)
class QueryShape:
    """What the optimizer sees of one attention call (static facts, no arrays)."""

    context: int  # S, tokens in the cache
    batch: int = 1  # B
    heads: int = 32  # H
    kv_heads: int = 8  # K
    head_dim: int = 128  # D
    itemsize: int = 2  # bytes per cache element (bf16)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if getattr(self, f.name) < 1:
                raise ConfigError(f"QueryShape.{f.name} must be >= 1, got {getattr(self, f.name)}")
        if self.heads % self.kv_heads:
            raise ConfigError(f"heads={self.heads} is not a multiple of kv_heads={self.kv_heads}")


@dataclasses.dataclass(frozen=True)
class CostTable:
    """Measured constants of one device kind (see the module docstring)."""

    device_kind: str
    overhead_us: dict  # path -> fixed cost per call (us)
    bandwidth_gbs: dict  # path -> effective bandwidth of its reads (GB/s)
    read_fraction: dict  # path -> {beta (str): fraction of the context read}
    cluster_size: int = 32
    page_size: int = 32
    source: str = ""
    row_bandwidth_gbs: dict = dataclasses.field(default_factory=dict)  # path -> GB/s of rows

    @staticmethod
    def load(kind: str = "cpu", path: Optional[str] = None) -> "CostTable":
        path = path or os.path.join(TABLE_DIR, f"{kind}.json")
        if not os.path.exists(path):
            have = sorted(f[:-5] for f in os.listdir(TABLE_DIR) if f.endswith(".json"))
            raise ConfigError(f"no cost table for device kind {kind!r} (have {have})")
        with open(path) as f:
            d = json.load(f)
        fields = {f.name for f in dataclasses.fields(CostTable)}
        return CostTable(**{k: v for k, v in d.items() if k in fields})

    def fraction(self, path: str, beta: float) -> float:
        """Fraction read at beta, interpolated in the table (clamped at its ends)."""
        table = self.read_fraction.get(path)
        if not table:
            return 1.0
        betas = np.array(sorted(float(b) for b in table))
        fr = np.array([table[_key(b, table)] for b in betas])
        if not math.isfinite(beta):
            return 1.0
        return float(np.interp(beta, betas, fr))


def _key(b: float, table: dict) -> str:
    for k in table:
        if float(k) == b:
            return k
    raise KeyError(b)


def default_table() -> CostTable:
    """The table of the default backend's device kind; else the nearest measured one (any
    NVIDIA GPU: nvidia_h200); else the CPU one."""
    import jax
    dev = jax.devices()[0]
    kind = "cpu" if dev.platform == "cpu" else dev.device_kind.lower().replace(" ", "_")
    for name in (kind, "nvidia_h200" if dev.platform == "gpu" else "cpu", "cpu"):
        try:
            return CostTable.load(name)
        except ConfigError:
            continue
    raise ConfigError("no cost table found, not even cpu.json")


@dataclasses.dataclass(frozen=True)
class Choice:
    plan: Plan
    path: str  # "flat" | "block" | "cluster" | "forced"
    estimates_us: dict  # path -> estimated time of one call (us)
    bytes_read: dict  # path -> bytes per call
    shape: QueryShape
    beta: float
    reason: str

    def explain(self) -> str:
        lines = [f"plan: {self.plan.describe()} ({self.reason})",
                 f"call: context {self.shape.context}, batch {self.shape.batch}, heads "
                 f"{self.shape.heads}/{self.shape.kv_heads}, head_dim {self.shape.head_dim}, "
                 f"beta {self.beta}"]
        for p in sorted(self.estimates_us, key=self.estimates_us.get):
            mark = "->" if p == self.path else "  "
            lines.append(f"  {mark} {p:8s} est {self.estimates_us[p]:10.1f} us, reads "
                         f"{self.bytes_read[p] / 1e6:9.3f} MB")
        return "\n".join(lines)


def estimate(shape: QueryShape, beta: float, table: CostTable,
             read_cap: Optional[dict] = None) -> tuple[dict, dict]:
    """(time_us, bytes) per path for one call. read_cap: path -> the most of the context a
    static capacity lets the path read (caps the table's read fraction)."""
    S, B, K, D, it = shape.context, shape.batch, shape.kv_heads, shape.head_dim, shape.itemsize
    row = D * it
    cap = read_cap or {}
    frac = lambda p: min(table.fraction(p, beta), cap.get(p, 1.0))  # noqa: E731
    rows = {"flat": 0.0, "block": 2 * S / table.page_size, "cluster": S / table.cluster_size}
    keys = {"flat": 2 * S, "block": 2 * frac("block") * S, "cluster": 2 * frac("cluster") * S}
    bytes_read = {p: B * K * (rows[p] + keys[p]) * row for p in rows}
    times = {}
    for p in rows:
        if p not in table.overhead_us:
            continue
        if p in table.row_bandwidth_gbs:
            t = (B * K * rows[p] * row / (table.row_bandwidth_gbs[p] * 1e3)
                 + B * K * keys[p] * row / (table.bandwidth_gbs[p] * 1e3))
        else:
            t = bytes_read[p] / (table.bandwidth_gbs[p] * 1e3)
        times[p] = table.overhead_us[p] + t
    return times, bytes_read


def choose_plan(shape: QueryShape, beta: float = 4.0, available: Sequence[str] = ("flat",),
                table: Optional[CostTable] = None, force: Optional[Plan] = None,
                sink: int = 4, window: int = 64, read_cap: Optional[dict] = None,
                **plan_kw) -> Choice:
    """The cheapest DIPR plan among the indexes the store has (`available`), or `force`.
    read_cap: see `estimate` (the method's static capacities)."""
    table = table or default_table()
    times, bytes_read = estimate(shape, beta, table, read_cap)
    for p in available:
        if p not in ("flat", "block", "cluster"):
            raise ConfigError(f"unknown index {p!r} (expected flat, block or cluster)")
    if force is not None:
        return Choice(force, "forced", times, bytes_read, shape, beta, "forced by the caller")
    cands = {p: t for p, t in times.items() if p in available}
    if not cands:
        raise ConfigError(f"no usable index among {tuple(available)}")
    path = min(cands, key=cands.get)
    best, runner = path, sorted(cands, key=cands.get)
    why = f"cheapest of {len(cands)} on {table.device_kind}"
    if len(runner) > 1:
        why += f": {cands[runner[1]] / cands[best]:.1f}x faster than {runner[1]}"
    if shape.context <= window + sink:
        path, why = "flat", "the whole context is sink + window"
    plan = Plan.dipr(beta, index=path, sink=sink, window=window, **plan_kw)
    return Choice(plan, path, times, bytes_read, shape, beta, why)


def measure_cost_table(contexts=(4096, 16384), kv_heads: int = 2, heads: int = 8,
                       head_dim: int = 64, repeats: int = 5, read_fraction: Optional[dict] = None,
                       cluster_size: int = 32, page_size: int = 32, layers: int = 4,
                       log=print, dtype=None, cluster_caps=(0.1, 0.3)) -> dict:
    """Times the flat, block and cluster DIPR paths on the default device and fits
    time = overhead + bytes / bandwidth per path (from the contexts given). Returns the JSON
    dict of a CostTable (write it to cost_tables/<kind>.json). Synthetic keys in `dtype`
    (default: the model's default on this backend, `default_dtype()`: bf16 on a GPU, f32 on
    the CPU, whose decode caches are then f32), beta 4.

    A time is one layer's call inside a jitted function that calls `layers` (>= 2) layers in
    a row, each on its own store (as in the decode loop: no layer's index left in the cache
    for the next): the time of all layers less that of one, over layers - 1 (the call's
    dispatch cancels). The plan is the one the DIPR method runs (the GPU kernels where they
    apply); block plans with a capacity of 10% of the groups, cluster plans (every block
    passing its margin) with capacities of `cluster_caps` (10% and 30%), so that the cluster
    path's time is fitted as overhead + per-row work + keys read (`row_bandwidth_gbs`); where
    that fit fails, as overhead + bytes / bandwidth over the same runs (take capacities near
    the read fractions the table's betas need: the CPU's jnp cluster path grows faster than
    linearly in its capacity)."""
    import time

    import jax
    import jax.numpy as jnp

    from alaya_jax.attention import IndexConfig, build_store, sparse_attention
    from alaya_jax.index.block import BlockConfig
    from alaya_jax.index.cluster import ClusterConfig
    from alaya_jax.index.synthetic import synthetic_kv
    from alaya_jax.methods import CLUSTER_PLAN
    from alaya_jax.model.load import default_dtype

    dtype = jnp.dtype(dtype or default_dtype())

    def calls(q, stores, plan):
        return sum(jnp.sum(sparse_attention(q, st, plan)[0]) for st in stores)

    fn = jax.jit(calls, static_argnames=("plan",))
    stats_of = jax.jit(lambda q, st, plan: sparse_attention(q, st, plan)[1],
                       static_argnames=("plan",))
    meas = {p: [] for p in ("flat", "block", "cluster")}
    cluster_rows = []  # (row bytes, key bytes, us)
    cfg = IndexConfig(cluster=ClusterConfig(cluster_size=cluster_size,
                                            block_size=2 * cluster_size,
                                            summary_dtype="bfloat16"),
                      block=BlockConfig(page_size))
    for S in contexts:
        stores = []
        for layer in range(layers):
            q, k, v = synthetic_kv(1, S, heads, kv_heads, head_dim, seed=layer)
            q, k, v = (jnp.asarray(a, dtype) for a in (q, k, v))
            stores.append(build_store(k, v, jnp.asarray([S], jnp.int32), cfg, n_heads=heads))
        jax.block_until_ready(stores)
        runs = [("flat", None), ("block", 0.1)] + [("cluster", c) for c in cluster_caps]
        for path, cap in runs:
            groups = S // (cluster_size if path == "cluster" else page_size)
            # cluster: every block passes (delta inf), so the capacity sets the keys read
            kw = dict(CLUSTER_PLAN, delta=float("inf")) if path == "cluster" else {}
            plan = Plan.dipr(4.0, index=path, capacity=None if cap is None else
                             max(1, int(groups * cap)), **kw)

            def timed(some):
                jax.block_until_ready(fn(q, some, plan))
                ts = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    jax.block_until_ready(fn(q, some, plan))
                    ts.append(time.perf_counter() - t0)
                return float(np.median(ts))

            # per layer: the difference of all layers and one (the call's dispatch cancels)
            per_layer = (timed(stores) - timed(stores[:1])) / max(layers - 1, 1)
            stats = stats_of(q, stores[0], plan)
            read = float(np.mean(np.asarray(stats.keys_read)))  # rows + keys, per kv head
            bytes_ = kv_heads * read * 2 * head_dim * dtype.itemsize  # k and v (rows: bound)
            meas[path].append((bytes_, max(per_layer, 1e-9) * 1e6))
            if path == "cluster":  # the estimate's row count (S / C) and the keys read
                kept = read - float(np.mean(np.asarray(stats.rows_scored)))
                cluster_rows.append((kv_heads * S / cluster_size * head_dim * dtype.itemsize,
                                     kv_heads * 2 * kept * head_dim * dtype.itemsize,
                                     meas[path][-1][1]))
            log(f"cost table: {path:8s} context {S:7d}"
                + (f", capacity {cap:.0%}" if cap else "")
                + f": {meas[path][-1][1]:9.1f} us per layer, {bytes_ / 1e6:9.2f} MB read")
        del stores
    overhead, bw = {}, {}
    for p, pts in meas.items():  # least squares: t = overhead + bytes * slope
        b = np.array([x[0] for x in pts])
        t = np.array([x[1] for x in pts])
        slope, icpt = np.polyfit(b, t, 1) if len(pts) > 1 else (t[0] / b[0], 0.0)
        slope = max(slope, 1e-9)  # us per byte
        bw[p] = 1.0 / slope / 1e3  # GB/s
        overhead[p] = float(max(icpt, 0.0))
    row_bw = {}
    fit = fit_rows_and_keys(cluster_rows)
    if fit is not None:
        overhead["cluster"], row_bw["cluster"], bw["cluster"] = fit
    dev = jax.devices()[0]
    return dict(device_kind="cpu" if dev.platform == "cpu" else dev.device_kind,
                overhead_us=overhead, bandwidth_gbs=bw,
                read_fraction=read_fraction or {}, cluster_size=cluster_size, page_size=page_size,
                row_bandwidth_gbs=row_bw,
                measured_us={p: [dict(bytes=b, us=t) for b, t in pts] for p, pts in meas.items()},
                cluster_runs=[dict(row_bytes=r, key_bytes=k, us=t) for r, k, t in cluster_rows],
                source=f"measure_cost_table(contexts={tuple(contexts)}, kv_heads={kv_heads}, "
                       f"heads={heads}, head_dim={head_dim}, layers={layers}, dtype={dtype.name}, "
                       f"cluster_caps={tuple(cluster_caps)}) on {dev}, jax {jax.__version__}")


def fit_rows_and_keys(runs):
    """runs [(row bytes, key bytes, us)] -> (overhead us, row GB/s, key GB/s) of
    t = overhead + row bytes / row bandwidth + key bytes / bandwidth by least squares, or None
    when the runs cannot separate the terms (fewer than 3, or a singular system) or a fitted
    cost per byte is not positive."""
    if len(runs) < 3:
        return None
    a = np.array([[1.0, r, k] for r, k, _ in runs])
    t = np.array([u for _, _, u in runs])
    if np.linalg.matrix_rank(a / np.maximum(np.abs(a).max(0), 1e-30)) < 3:
        return None
    (icpt, per_row, per_key), *_ = np.linalg.lstsq(a, t, rcond=None)
    if per_row <= 0 or per_key <= 0:
        return None
    return float(max(icpt, 0.0)), float(1.0 / per_row / 1e3), float(1.0 / per_key / 1e3)
