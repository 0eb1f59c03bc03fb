"""The query optimizer: plan choice from the cost model, explain(), forcing a plan, tables."""

import glob
import os

import pytest

from alaya_jax.attention import Plan
from alaya_jax.errors import ConfigError
import dataclasses

from alaya_jax.optimizer import (TABLE_DIR, CostTable, QueryShape, choose_plan, estimate,
                                fit_rows_and_keys)

TABLE = CostTable(
    device_kind="test", overhead_us={"flat": 5.0, "block": 30.0, "cluster": 40.0},
    bandwidth_gbs={"flat": 1000.0, "block": 400.0, "cluster": 400.0},
    read_fraction={"cluster": {"2": 0.04, "4": 0.08, "8": 0.3},
                   "block": {"2": 0.9, "4": 1.0, "8": 1.0}})


def test_short_context_picks_flat_long_picks_cluster():
    short = choose_plan(QueryShape(context=2048, heads=32, kv_heads=8, head_dim=128), 4.0,
                        ("flat", "block", "cluster"), TABLE)
    assert short.path == "flat" and short.plan.index == "flat"
    long = choose_plan(QueryShape(context=1 << 20, heads=32, kv_heads=8, head_dim=128), 4.0,
                       ("flat", "block", "cluster"), TABLE)
    assert long.path == "cluster" and long.plan == Plan.dipr(4.0, index="cluster")
    text = long.explain()
    assert "-> cluster" in text and "flat" in text and "faster than" in text


def test_large_beta_reads_too_much_for_the_cluster_path():
    shape = QueryShape(context=64 * 1024)
    times8, _ = estimate(shape, 8.0, TABLE)
    times2, _ = estimate(shape, 2.0, TABLE)
    assert times8["cluster"] > times2["cluster"]
    assert choose_plan(shape, float("inf"), ("flat", "cluster"), TABLE).path == "flat"


def test_only_available_indexes_and_forcing():
    shape = QueryShape(context=1 << 20)
    assert choose_plan(shape, 4.0, ("flat",), TABLE).path == "flat"
    forced = choose_plan(shape, 4.0, ("flat", "cluster"), TABLE, force=Plan.quest(8))
    assert forced.path == "forced" and forced.plan == Plan.quest(8)
    assert "forced" in forced.explain()
    with pytest.raises(ConfigError, match="unknown index"):
        choose_plan(shape, 4.0, ("hnsw",), TABLE)


def test_batch_scales_bytes():
    _, b1 = estimate(QueryShape(context=8192, batch=1), 4.0, TABLE)
    _, b4 = estimate(QueryShape(context=8192, batch=4), 4.0, TABLE)
    assert b4["cluster"] == pytest.approx(4 * b1["cluster"])


def test_rows_and_keys_fit_and_estimate():
    """The two-term cost model: the fit recovers known constants from runs at two capacities
    and two contexts, and refuses runs that cannot separate the terms; the estimate charges
    the index's rows and the keys read at their own bandwidths."""
    truth = lambda r, k: 50.0 + r / 2e5 + k / 2e6  # us; rows at 200 GB/s, keys at 2 TB/s
    runs = [(r, k, truth(r, k)) for r, k in ((1e6, 4e6), (1e6, 12e6), (3e7, 1e8), (3e7, 3e8))]
    assert fit_rows_and_keys(runs) == pytest.approx((50.0, 200.0, 2000.0))
    assert fit_rows_and_keys(runs[:2]) is None
    assert fit_rows_and_keys([(1e6, 4e6, 70.0), (2e6, 8e6, 90.0), (3e6, 12e6, 110.0)]) is None
    assert fit_rows_and_keys([(1e6, 4e6, 90.0), (1e6, 8e6, 70.0), (3e6, 4e6, 95.0)]) is None
    split = dataclasses.replace(TABLE, row_bandwidth_gbs={"cluster": 200.0},
                                bandwidth_gbs=dict(TABLE.bandwidth_gbs, cluster=2000.0))
    shape = QueryShape(context=131072, heads=32, kv_heads=8, head_dim=128)
    times, nbytes = estimate(shape, 8.0, split)
    rows = 8 * 131072 / 32 * 128 * 2
    keys = 8 * 2 * 0.3 * 131072 * 128 * 2
    assert nbytes["cluster"] == pytest.approx(rows + keys)
    assert times["cluster"] == pytest.approx(40.0 + rows / 200e3 + keys / 2000e3)
    assert times["flat"] == estimate(shape, 8.0, TABLE)[0]["flat"]  # paths without a split


def test_a_capacity_caps_the_read_fraction():
    shape = QueryShape(context=1 << 17)
    capped, nbytes = estimate(shape, 8.0, TABLE, read_cap={"cluster": 0.05})
    low = dataclasses.replace(TABLE, read_fraction=dict(TABLE.read_fraction,
                                                        cluster={"8": 0.05}))
    assert capped["cluster"] == pytest.approx(estimate(shape, 8.0, low)[0]["cluster"])
    assert capped["cluster"] < estimate(shape, 8.0, TABLE)[0]["cluster"]
    assert capped["flat"] == estimate(shape, 8.0, TABLE)[0]["flat"]
    # a cap above the table's fraction changes nothing
    loose = estimate(shape, 8.0, TABLE, read_cap={"cluster": 0.9})[0]
    assert loose == estimate(shape, 8.0, TABLE)[0]


def test_committed_tables_load():
    paths = glob.glob(os.path.join(TABLE_DIR, "*.json"))
    assert any(p.endswith("cpu.json") for p in paths)
    for p in paths:
        t = CostTable.load(path=p)
        assert set(t.overhead_us) == {"flat", "block", "cluster"}
        assert all(v > 0 for v in t.bandwidth_gbs.values())
        assert 0 < t.fraction("cluster", 4.0) <= 1
    with pytest.raises(ConfigError, match="no cost table"):
        CostTable.load("tpu_v9")


def test_query_shape_validation():
    with pytest.raises(ConfigError, match="multiple"):
        QueryShape(context=10, heads=6, kv_heads=4)


def test_measure_cost_table_counts_bytes_in_the_cache_dtype():
    """A tiny measurement in f32 and in bf16: bytes in each dtype's size (the CPU table is
    measured in the CPU model's f32); the cluster path at the capacities asked for; the result
    loads as a CostTable."""
    import jax.numpy as jnp

    from alaya_jax.optimizer import measure_cost_table
    kw = dict(contexts=(256, 512), kv_heads=1, heads=2, head_dim=16, repeats=1, layers=2,
              cluster_caps=(0.25, 0.5), log=lambda m: None)
    f32 = measure_cost_table(dtype=jnp.float32, **kw)
    bf16 = measure_cost_table(dtype=jnp.bfloat16, **kw)
    # flat reads every key: K and V of each position, 16 values a row
    assert [m["bytes"] for m in f32["measured_us"]["flat"]] == [2 * S * 16 * 4 for S in (256, 512)]
    assert [m["bytes"] for m in bf16["measured_us"]["flat"]] == [2 * S * 16 * 2 for S in (256, 512)]
    assert len(f32["cluster_runs"]) == 4  # two capacities a context
    assert "dtype=float32" in f32["source"] and "cluster_caps=(0.25, 0.5)" in f32["source"]
    fields = {f.name for f in dataclasses.fields(CostTable)}
    t = CostTable(**{k: v for k, v in f32.items() if k in fields})
    assert all(v > 0 for v in t.bandwidth_gbs.values())
