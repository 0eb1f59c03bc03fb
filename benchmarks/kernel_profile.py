"""Where the gathered-attention kernel's time goes, per program: Mosaic GPU's on-device profiler
(`GatheredAttentionConfig.profile_dir`) records each program's phases, and this script times
the same configurations with the XLA profiler side by side (GPU; Llama-3-8B layer shapes).

    PYTHONUNBUFFERED=1 python benchmarks/kernel_profile.py --caps 656 --out benchmarks/results
    python benchmarks/kernel_profile.py --replot benchmarks/results/kernel_profile.json

For each case (kept counts all at the capacity, "full", or 50-100% of it, "ragged"), the
default configuration timed (no profiler), then one profiled call, which gives, per program:
its start (the SM's global timer, ns),
its phases ("place": the counts' copy and the placement; "inputs": the queries, thresholds and
the program's window of the kept list; "pipeline": the kept blocks; "store": the partials'
write) in SM cycles, converted to us at the SM clock read from nvidia-smi during the run, and
its kept blocks (the balanced split replayed on the host). Summaries: the spread of the
programs' starts, each phase's median / 90th percentile, the last program's end against the
first's start (the kernel's span on the SMs), and a least-squares fit of the pipeline time
against the blocks a program reads (us a block, us fixed; programs run side by side, so the
slope is a block's cost under the whole launch's contention). Writes kernel_profile.json,
kernel_profile.png (each case's median program: its phases as a time budget) and
kernel_profile_timelines.{json,png} (every program's phases over time; the pipeline against
blocks). A profiled call compiles a kernel of its own (~1-2 minutes on a fresh machine).
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from alaya_jax.pallas import gathered_attention as ga  # noqa: E402
from kernel_waves import K, count_cases, finish, parse_caps, setup, timed_row  # noqa: E402

PHASES = ("place", "inputs", "pipeline", "store")


def sm_clock_mhz() -> tuple[float, float]:
  """(current, max) SM clock in MHz from nvidia-smi (0 where it cannot say)."""
  try:
    out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,clocks.max.sm",
                          "--format=csv,noheader,nounits"], capture_output=True, text=True,
                         timeout=20).stdout.splitlines()[0]
    cur, most = (float(x) for x in out.split(","))
    return cur, most
  except Exception:  # no nvidia-smi: the caller falls back to the maximum clock it assumes
    return 0.0, 0.0


def placement(counts, cap: int, cfg) -> list[int]:
  """Kept blocks of each launched program (0: not placed), from the kernel's own placement
  (`ga._balanced_share`, mapped over the program ids on the host)."""
  import jax
  import jax.numpy as jnp
  cap = -(-cap // 4) * 4  # the capacity the kernel sees (`_launch` pads it to 4)
  bal, _, launched, _ = ga._balance_layout(cap, K, 1, cfg)
  c = jnp.asarray(np.asarray(counts).reshape(-1))
  active, _, _, first, stop, _ = jax.vmap(lambda p: ga._balanced_share(c, p, cap, bal))(
      jnp.arange(launched))
  return np.where(active, stop - first, 0).tolist()


def read_trace(path: str, clock_mhz: float):
  """Per program (trace id - 1 = program id, one warpgroup a program): start in us (global
  timer) and each phase's (begin, end) in us from that start (SM cycles / clock)."""
  with open(path) as f:
    events = json.load(f)["traceEvents"]
  progs: dict[int, dict] = {}
  for e in events:
    p = progs.setdefault(e["tid"] - 1, {"sm": e["pid"] - 1, "events": []})
    p["events"].append(e)
  out = {}
  for pid, p in progs.items():
    ev = p["events"]
    t0 = ev[0]["ts"]  # the first event is at the program's start (offset 0 cycles)
    opened, phases = {}, {}
    for e in ev:
      cyc = (e["ts"] - t0) * 1e3  # the dump adds cycles to the timer's ns, then / 1e3
      if e["ph"] == "B":
        opened[e["name"]] = cyc
      else:
        phases[e["name"]] = (opened.pop(e["name"]) / clock_mhz, cyc / clock_mhz)
    out[pid] = dict(sm=p["sm"], start_us=t0, phases=phases)
  return out


def summarize(progs, blocks):
  """The run's summaries (see the module docstring) from `read_trace`'s programs."""
  pids = sorted(progs)
  start = np.array([progs[p]["start_us"] for p in pids])
  if np.ptp(start) > 2.0 ** 31 / 1e3:  # the timer's low 32 bits wrapped during the kernel
    start = np.where(start < np.median(start), start + 2.0 ** 32 / 1e3, start)
  start = start - start.min()
  end = start + np.array([max(b for _, b in progs[p]["phases"].values()) for p in pids])
  s = dict(programs_traced=len(pids), start_spread_us=round(float(start.max()), 3),
           starts_after_2us=int((start > 2.0).sum()), span_us=round(float(end.max()), 3),
           end_spread_us=round(float(end.max() - end.min()), 3))
  for ph in PHASES:
    d = np.array([e - b for p in pids if ph in progs[p]["phases"]
                  for b, e in [progs[p]["phases"][ph]]])
    if d.size:
      s[ph] = dict(median_us=round(float(np.median(d)), 3),
                   p90_us=round(float(np.percentile(d, 90)), 3), max_us=round(float(d.max()), 3))
  first_block = np.array([progs[p]["phases"]["pipeline"][0] for p in pids
                          if "pipeline" in progs[p]["phases"]])
  if first_block.size:
    s["pipeline_begins_us"] = dict(median=round(float(np.median(first_block)), 3),
                                   p90=round(float(np.percentile(first_block, 90)), 3))
  nb = np.array([blocks[p] if p < len(blocks) else 0 for p in pids], float)
  pipe = np.array([e - b for b, e in (progs[p]["phases"].get("pipeline", (0.0, 0.0))
                                      for p in pids)])
  live = nb > 0
  if live.sum() > 2 and np.ptp(nb[live]) > 0:
    slope, icpt = np.polyfit(nb[live], pipe[live], 1)
    s["pipeline_fit"] = dict(us_per_block=round(float(slope), 4), fixed_us=round(float(icpt), 3))
  s["blocks_per_program"] = dict(min=int(nb[live].min()) if live.any() else 0,
                                 max=int(nb.max()), placed=int(live.sum()))
  return s, dict(start=start.tolist(), end=end.tolist(), blocks=nb.tolist(), pipeline=pipe.tolist(),
                 sm=[progs[p]["sm"] for p in pids],
                 phases=[dict(progs[p]["phases"]) for p in pids])


def profiled(cfg, layer, q, kept, cnt, clock_mhz: float):
  """One profiled call of `gathered_attention` with cfg (a fresh trace directory); returns the
  trace of its attention kernel as `read_trace`'s programs."""
  import dataclasses

  import jax
  keys, vals, blen, thr = layer
  d = tempfile.mkdtemp(prefix="alaya_prof_")
  pc = dataclasses.replace(cfg, profile_dir=d)
  f = jax.jit(lambda q, kept, cnt: ga.gathered_attention(q, keys, vals, blen, kept, cnt, thr,
                                                         config=pc))
  for _ in range(3):  # compile, then warm: the last trace is kept
    jax.block_until_ready(f(q, kept, cnt))
  jax.effects_barrier()
  paths = sorted(glob.glob(os.path.join(d, "*trace.json")), key=os.path.getmtime)
  if not paths:
    raise RuntimeError(f"no profile written to {d}")
  return read_trace(paths[-1], clock_mhz)


def main():
  args = parse_caps([656], lambda ap: ap.add_argument(
      "--replot", metavar="JSON", help="redraw kernel_profile.png from a written JSON"))
  if args.replot:
    with open(args.replot) as f:
      saved = json.load(f)
    plot_budget(saved["rows"], saved["meta"], os.path.splitext(args.replot)[0] + ".png")
    return
  layer, qs, (read_tbps, copy_tbps) = setup("kernel_profile.py")
  rows, timelines = [], {}
  rng = np.random.default_rng(0)
  cfg = ga.GatheredAttentionConfig()
  for cap, counts_name, kept, cnt, mb in count_cases(rng, args.caps, args.counts):
    row = timed_row(cfg, layer, qs, kept, cnt, mb, copy_tbps, cap=cap, counts=counts_name)
    cur, most = sm_clock_mhz()
    clock = cur or most or 1980.0
    summ, tl = summarize(profiled(cfg, layer, qs[0], kept, cnt, clock),
                         placement(cnt, cap, cfg))
    row["profile"] = dict(summ, sm_clock_mhz=clock, sm_clock_max_mhz=most)
    rows.append(row)
    timelines[f"{cap}:{counts_name}"] = tl
    print(json.dumps({"case": f"{cap}:{counts_name}", **row["profile"]}), flush=True)
    finish(args.out, "kernel_profile", rows, (read_tbps, copy_tbps), plot_budget)
    with open(os.path.join(args.out, "kernel_profile_timelines.json"), "w") as f:
      json.dump(timelines, f)
    plot_timelines(rows, timelines, os.path.join(args.out, "kernel_profile_timelines.png"))


def plot_budget(rows, meta, path):
  """Per case two bars: the median program's phases end to end (profiler), and the call's
  kernels (XLA profiler: the attention kernel, the merge, the rest); a line at the time the
  kept bytes take at the copy bandwidth measured in the same run (80% of copy: a dashed one)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = [r for r in rows if "profile" in r]
  fig, ax = plt.subplots(figsize=(9, 1.8 + 1.0 * len(rows)))
  colors = dict(place="tab:red", inputs="tab:orange", pipeline="tab:blue", store="tab:green",
                kernel="tab:cyan", merge="tab:purple", other="tab:gray")
  seen = set()

  def bar(y, parts):
    left = 0.0
    for name, w in parts.items():
      ax.barh(y, w, left=left, height=0.35, color=colors[name],
              label=None if name in seen else name)
      seen.add(name)
      left += w

  ticks, labels = [], []
  for i, r in enumerate(rows):
    pr, y = r["profile"], 1.2 * i
    bar(y + 0.4, {ph: pr[ph]["median_us"] for ph in PHASES if ph in pr})
    merge = sum(v for k, v in r["other_kernels_us"].items() if "merge" in k)
    bar(y, dict(kernel=r["kernel_us"], merge=merge,
                other=sum(r["other_kernels_us"].values()) - merge))
    ideal = r["MB"] / meta["copy_TBps"]
    ax.plot([ideal] * 2, [y - 0.3, y + 0.7], "k-", lw=1.5,
            label=None if "copy" in seen else "kept bytes at copy bandwidth")
    ax.plot([ideal / 0.8] * 2, [y - 0.3, y + 0.7], "k--", lw=1,
            label=None if "copy" in seen else "80% of copy")
    seen.add("copy")
    ticks += [y, y + 0.4]
    labels += [f"call: {r['call_vs_copy']:.0%} of copy", f"cap {r['cap']}, {r['counts']} "
               f"({r['MB']} MB): median program, {pr['blocks_per_program']['max']} blocks"]
  ax.set_yticks(ticks, labels, fontsize=7)
  ax.set_xlabel("us")
  ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=5)
  ax.set_title(f"gathered attention: a program's phases and the call's kernels ({meta['device']})",
               fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def plot_timelines(rows, timelines, path):
  """Each case's programs as bars over time (one row a program, sorted by start), its phases
  coloured; beside it, the pipeline time against the program's kept blocks."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  keys = list(timelines)
  fig, axes = plt.subplots(len(keys), 2, figsize=(12, 2.8 * len(keys)), squeeze=False,
                           gridspec_kw={"width_ratios": [3, 1]})
  colors = dict(place="tab:red", inputs="tab:orange", pipeline="tab:blue", store="tab:green")
  for (ax, ax2), key in zip(axes, keys):
    tl = timelines[key]
    for y, i in enumerate(np.argsort(tl["start"])):
      for ph, (b, e) in tl["phases"][i].items():
        ax.barh(y, e - b, left=tl["start"][i] + b, height=1.0, color=colors.get(ph, "gray"),
                linewidth=0)
    ax.set_xlabel("us from the first program's start")
    ax.set_ylabel("program (by start)")
    row = next(r for r in rows if f"{r['cap']}:{r['counts']}" == key)
    ax.set_title(f"{key}: {row['MB']} MB, kernel {row['kernel_us']} us, call {row['call_us']} us "
                 f"({row['call_vs_copy']:.0%} of copy)", fontsize=8)
    ax2.scatter(tl["blocks"], tl["pipeline"], s=4)
    ax2.set_xlabel("kept blocks of the program")
    ax2.set_ylabel("pipeline us")
  handles = [matplotlib.patches.Patch(color=c, label=n) for n, c in colors.items()]
  axes[0, 0].legend(handles=handles, fontsize=7, loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


if __name__ == "__main__":
  main()
