"""One benchmark of two source trees (before / after a change), alternated in rounds on the same
machine, so that ratios are read side by side (a shared, noisy machine: never across sessions).

    git worktree add /tmp/before HEAD~1
    python benchmarks/ab_trees.py --before /tmp/before --after . --rounds 2 --name cpu_dipr_ab \\
        -- --small --contexts 2048 7680 --methods full dipr-flat:8 dipr-auto:8 --steps 16 --repeats 3

Each round runs `benchmarks/sparse_decode.py` (the arguments after `--`) from each tree with
that tree first on PYTHONPATH (its `alaya_jax`, not the installed one) and collects its rows.
Writes NAME.json (every round's rows, each with tree and round) and NAME.png (ms per step per
method and context: the best round of each tree, and the after / before ratio).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_io import run_meta, write_json  # noqa: E402


def run_tree(tree: str, args: list[str]) -> list[dict]:
  """sparse_decode.py's rows from `tree` (its own package first on the path)."""
  out = tempfile.mkdtemp(prefix="ab_")
  env = dict(os.environ, PYTHONPATH=os.path.abspath(tree), PYTHONUNBUFFERED="1")
  subprocess.run([sys.executable, os.path.join(tree, "benchmarks", "sparse_decode.py"), *args,
                  "--out", out], cwd=tree, env=env, check=True)
  files = [f for f in os.listdir(out) if f.endswith(".json")]
  with open(os.path.join(out, files[0])) as f:
    return json.load(f)["rows"]


def commit(tree: str) -> str:
  """The tree's HEAD commit, "+ changes" when it has uncommitted ones ("?" outside git)."""
  try:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, text=True,
                          capture_output=True, check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=tree,
                           text=True, capture_output=True, check=True).stdout.strip()
    return head + (" + changes" if dirty else "")
  except (OSError, subprocess.CalledProcessError):
    return "?"


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--before", required=True, help="source tree before the change")
  ap.add_argument("--after", required=True, help="source tree after the change")
  ap.add_argument("--rounds", type=int, default=2)
  ap.add_argument("--name", default="ab_trees")
  ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  ap.add_argument("bench", nargs=argparse.REMAINDER, help="-- then sparse_decode.py's arguments")
  args = ap.parse_args()
  bench = args.bench[1:] if args.bench[:1] == ["--"] else args.bench
  rows = []
  for r in range(args.rounds):
    for tree_name, tree in (("before", args.before), ("after", args.after)):
      print(f"== round {r + 1}: {tree_name} ({tree})", flush=True)
      rows += [dict(row, tree=tree_name, round=r + 1) for row in run_tree(tree, bench)]
  meta = run_meta(before=os.path.abspath(args.before), after=os.path.abspath(args.after),
                  before_commit=commit(args.before), after_commit=commit(args.after),
                  sparse_decode_args=" ".join(bench))
  write_json(args.out, args.name, meta, rows)
  plot(rows, meta, os.path.join(args.out, args.name + ".png"))


def best(rows, tree, method, ctx):
  return min(r["decode_ms"] for r in rows
             if (r["tree"], r["method"], r["context"]) == (tree, method, ctx))


def plot(rows, meta, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np
  methods = list(dict.fromkeys(r["method"] for r in rows))
  ctxs = sorted({r["context"] for r in rows})
  fig, axes = plt.subplots(1, len(ctxs), figsize=(5 * len(ctxs), 3.6), squeeze=False)
  for ax, ctx in zip(axes[0], ctxs):
    x = np.arange(len(methods))
    for i, tree in enumerate(("before", "after")):
      vals = [best(rows, tree, m, ctx) for m in methods]
      ax.bar(x + (i - 0.5) * 0.4, vals, 0.4, label=tree)
    for j, m in enumerate(methods):
      ratio = best(rows, "after", m, ctx) / best(rows, "before", m, ctx)
      ax.text(j, best(rows, "after", m, ctx), f"{ratio:.2f}x", ha="left", va="bottom", fontsize=7)
    ax.set_xticks(x, methods, fontsize=7)
    ax.set_ylabel("ms per decode step (best round)")
    ax.set_title(f"context {ctx}", fontsize=9)
    ax.legend(fontsize=7)
  fig.suptitle(f"before / after, alternated ({meta['device']}): {meta['sparse_decode_args']}",
               fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


if __name__ == "__main__":
  main()
