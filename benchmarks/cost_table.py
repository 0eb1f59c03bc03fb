"""Measures the query optimizer's cost table on this device and writes it.

    python benchmarks/cost_table.py --contexts 4096 131072            # Llama-3-8B layer shapes
    python benchmarks/cost_table.py --small --contexts 2048 8192 16384 --cluster-caps 0.03 0.1
                                                                    # SmolLM2 shapes (CPU)

Per path (flat, block, cluster DIPR at beta 4) one layer's call is timed inside a jitted
function over several layers, each with its own store (`optimizer.measure_cost_table`), and
time = overhead + bytes / bandwidth is fitted over the contexts. The read fractions per beta
(from the quality benchmark on real keys) are kept from the table the device has now. Writes
alaya_jax/cost_tables/<device kind>.json (or --out)."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import jax

from alaya_jax import optimizer


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 131072])
    ap.add_argument("--layers", type=int, default=5, help="layers (stores) per timed call, >= 2")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--small", action="store_true", help="SmolLM2 shapes (9 q / 3 kv heads, d 64)")
    ap.add_argument("--cluster-caps", type=float, nargs="+", default=[0.1, 0.3],
                    help="capacities (fractions of the clusters) the cluster path is timed at")
    ap.add_argument("--out", default=None, help="JSON path (default: the device's cost table)")
    args = ap.parse_args(argv)
    heads, kv, d = (9, 3, 64) if args.small else (32, 8, 128)
    old = optimizer.default_table()
    print(f"jax {jax.__version__} on {jax.devices()[0]}; read fractions from the "
          f"{old.device_kind} table", flush=True)
    table = optimizer.measure_cost_table(tuple(args.contexts), kv_heads=kv, heads=heads,
                                         head_dim=d, repeats=args.repeats, layers=args.layers,
                                         read_fraction=old.read_fraction,
                                         cluster_caps=tuple(args.cluster_caps),
                                         log=lambda m: print(m, flush=True))
    kind = table["device_kind"]
    name = "cpu" if kind == "cpu" else kind.lower().replace(" ", "_")
    path = args.out or os.path.join(optimizer.TABLE_DIR, f"{name}.json")
    prev = {}
    if os.path.exists(path):
        with open(path) as f:
            prev = json.load(f)
    for key in ("read_fraction_source",):
        if key in prev:
            table[key] = prev[key]
    table["command"] = "python " + " ".join(sys.argv)
    table["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(table, f, indent=1)
    os.replace(tmp, path)
    print(json.dumps({k: table[k] for k in ("overhead_us", "bandwidth_gbs")}, indent=1))
    print("wrote", path)


if __name__ == "__main__":
    main()
