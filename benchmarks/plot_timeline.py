"""The sparse-attention stretch of one decode layer from `decode_profile.py --timeline` files,
side by side: a Gantt plot (PNG) and a JSON summary of the spans (CPU: reads files).

    python benchmarks/plot_timeline.py --out benchmarks/results/decode_timeline/layer \\
        LABEL=benchmarks/results/decode_timeline/timeline_nostats_131072.txt ...

For each file the window runs from the last step's last exact-region kernel start to the end
of the split merge after it (the last layer's sparse chain). Kernels that overlap (a
programmatic dependent launch) are drawn in separate lanes. The JSON gives, per file, the
window's length, every kernel's start and end in it, and the gap between the exact-region
kernel's end and the margins kernel's start (negative: the margins started first).
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_io import write_json  # noqa: E402

FIRST, LAST = "alaya_exact_attention", "alaya_split_merge"


def read_timeline(path):
    """[(start_us, end_us, name)] of a timeline file."""
    rows = []
    with open(path) as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            start, end, _gap, name = line.split(None, 3)
            rows.append((float(start), float(end), name.strip()))
    return rows


def layer_window(rows):
    """The kernels from the last exact-region kernel's start to the merge after it, with
    times relative to that start."""
    first = max(i for i, r in enumerate(rows) if r[2].startswith(FIRST))
    last = next(i for i in range(first, len(rows)) if rows[i][2].startswith(LAST))
    t0 = rows[first][0]
    return [(s - t0, e - t0, n.replace("_mosaic_gpu_kernel", "")) for s, e, n in
            rows[first:last + 1]]


def summary(window):
    by = {n: (s, e) for s, e, n in window}
    ex, mg = by.get(FIRST), by.get("alaya_block_margins")
    return {
        "span_us": round(max(e for _, e, _ in window), 2),
        "margins_start_minus_exact_end_us": round(mg[0] - ex[1], 2) if ex and mg else None,
        "kernels": [{"name": n, "start_us": round(s, 2), "end_us": round(e, 2)}
                    for s, e, n in window],
    }


def plot(windows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {}
    palette = plt.get_cmap("tab10").colors
    fig, ax = plt.subplots(figsize=(11, 1.1 + 0.9 * len(windows)))
    ticks = []
    for row, (label, window) in enumerate(windows):
        lanes = []  # end time of each lane
        for s, e, n in window:
            # a new lane only where a kernel starts 0.2 us or more before one ends
            lane = next((i for i, end in enumerate(lanes) if end <= s + 0.2), len(lanes))
            lanes[lane:lane + 1] = [e]
            key = n if n.startswith("alaya") else "XLA kernels"
            c = colors.setdefault(key, palette[len(colors) % len(palette)])
            y = row - 0.35 + 0.35 * lane
            ax.barh(y, e - s, left=s, height=0.3, color=c, edgecolor="black", linewidth=0.3)
        ticks.append((row, f"{label}\n{max(e for _, e, _ in window):.1f} us"))
    ax.set_yticks([t for t, _ in ticks], [lab for _, lab in ticks])
    ax.invert_yaxis()
    ax.set_xlabel("us from the exact-region kernel's start (one layer, last decode step)")
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()],
              labels=[k.replace("alaya_", "") for k in colors], fontsize=7, ncol=3,
              loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", help="LABEL=timeline file")
    ap.add_argument("--out", required=True, help="path stem: writes STEM.png and STEM.json")
    ap.add_argument("--device", required=True, help="the card the timelines were taken on")
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    windows = []
    for item in args.files:
        label, _, path = item.rpartition("=")
        windows.append((label or os.path.basename(path), layer_window(read_timeline(path))))
    plot(windows, args.out + ".png")
    meta = dict(device=args.device, note=args.note, command="python " + " ".join(sys.argv),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    rows = [dict(label=label, **summary(w)) for label, w in windows]
    write_json(os.path.dirname(args.out) or ".", os.path.basename(args.out), meta, rows)
    for r in rows:
        print(f"{r['label']}: {r['span_us']} us, margins start - exact end "
              f"{r['margins_start_minus_exact_end_us']} us")


if __name__ == "__main__":
    main()
