"""DIPR quality on real keys: keys read vs recall of the flat DIPR set and output error.

Run (CPU is enough; ~15-30 min for every layer on 2 cores):

    python benchmarks/dipr_quality.py                      # all layers, JSON + PNG
    python benchmarks/dipr_quality.py --layers 1 10 20 29  # the layers of DESIGN.md's table

Queries: teacher forcing. SmolLM2-135M-Instruct reads examples/data/gpl-3.0.txt (GPL-3, ~7.6K
tokens); the indexes are built after a prefill of the first T0 = T - n_decode tokens (the
index covers [sink, T0 - window), the rest is the exact tail), and the q of the last
n_decode positions are the decode queries, each attending to every key up to its own position
(the tail grows by one token per step, exactly as in decoding). The margin delta is calibrated
per layer from the q of the last `calib` prefill positions (disjoint from the decode queries).

Per layer, per method: keys read (rows scored + keys read from memory, per kv head, as a
fraction of the context), keys attended (per query head), recall of the flat DIPR set at the
same beta, attention mass captured (full-softmax weight of the attended keys) and the relative
L2 error of the attention output against full attention (mean over query heads and steps).
keys_read counts one row per scored summary (a block centroid, a super-cluster centroid, a
per-channel variance row where the plan reads it; two per Quest page) plus every key read;
keys_read_bytes counts bytes instead, in units of one key + value of a bf16 cache: a block's
centroid + value_mean in its summary_dtype (f32: 2, bf16: 1, int8: 0.53 keys), Quest's
min/max rows 0.5. recall is against the flat DIPR set at the plan's beta, recall_b4 at
beta 4 (DESIGN.md's table), whatever the plan's beta.

The committed results were built with --merge-into runs that add method families to the
first full run (the JSON's command lists them); e.g. the super-cluster families:

    python benchmarks/dipr_quality.py --qkv-cache /tmp/qkv.npz --only super+rem+var+floor@b1 \
        super-fixed+rem+var super+rem+var+floor --merge-into benchmarks/results/dipr_quality.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from alaya_jax.attention import IndexConfig, Plan, build_store, calibrate_delta, sparse_attention
from alaya_jax.dipr import full_attention, scaled_scores
from alaya_jax.index.block import BlockConfig
from alaya_jax.index.cluster import ClusterConfig, summary_row_cost

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "examples", "data", "gpl-3.0.txt")
RESULTS = os.path.join(ROOT, "benchmarks", "results")


def capture(layers, cache_path=None):
    """{layer: (q [T,H,D], k [T,K,D], v [T,K,D])} from the model (or a saved .npz)."""
    if cache_path and os.path.exists(cache_path):
        z = np.load(cache_path)
        return {l: (z[f"q{l}"], z[f"k{l}"], z[f"v{l}"]) for l in layers}, int(z["ids"].shape[0])
    import alaya_jax
    from alaya_jax.model import capture_qkv
    model, tok = alaya_jax.load_model()
    ids = tok.encode(open(DOC, encoding="utf-8").read())
    out = capture_qkv(model, ids, layers)
    if cache_path:
        np.savez(cache_path, ids=np.asarray(ids),
                 **{f"{n}{l}": a for l, t in out.items() for n, a in zip("qkv", t)})
    return out, len(ids)


@dataclasses.dataclass(frozen=True)
class Method:
    name: str  # family: flat, cluster, cluster+rem, cluster-fixed, topk, quest, block
    plan: Plan
    cluster: ClusterConfig | None = None
    calibrate: bool = False  # calibrate delta for plan.beta on the prefill queries
    target_recall: float = 0.99
    query_aware: bool = True  # k-means in the metric of the prefill queries
    calibrate_per: str = "layer"  # or "kv_head" (calibrate_delta's per)


def _make_runner(plan):
    @jax.jit
    def run(q, lengths, store):  # q [T,H,D], lengths [T]
        def one(qt, L):
            st = store.replace(lengths=L[None])
            o, stats = sparse_attention(qt[None], st, plan)
            return o[0], stats.keys_read[0], stats.keys_attended[0], stats.attended[0], \
                stats.truncated[0], stats.rows_scored[0]
        return jax.lax.map(lambda a: one(*a), (q, lengths))
    return run


_RUNNERS = {}


def runner(plan):
    if plan not in _RUNNERS:
        _RUNNERS[plan] = _make_runner(plan)
    return _RUNNERS[plan]


@jax.jit
def _reference(q, k, v, lengths):
    """Full attention outputs and probabilities for each decode query.  q [T,H,D], k [1,S,K,D]."""
    def one(qt, L):
        Lb = L[None]
        s = scaled_scores(qt[None], k)[0]  # [H,S]
        valid = jnp.arange(k.shape[1]) < L
        p = jax.nn.softmax(jnp.where(valid[None], s, -1e30), axis=-1) * valid[None]
        o = full_attention(qt[None], k, v, Lb).o[0]
        return o, p, s
    return jax.lax.map(lambda a: one(*a), (q, lengths))


def evaluate_layer(q, k, v, methods, n_decode, calib, sink, window, metric_queries=256):
    """Rows of metrics for one layer.  q [T,H,D], k, v [T,K,D] (f32 numpy)."""
    T, H, D = q.shape
    K = k.shape[1]
    T0 = T - n_decode
    kk, vv = jnp.asarray(k)[None], jnp.asarray(v)[None]
    q_dec = jnp.asarray(q[T0:])
    lengths = jnp.arange(T0 + 1, T + 1, dtype=jnp.int32)  # query at position p sees [0, p]
    o_full, p_full, s_full = _reference(q_dec, kk, vv, lengths)
    o_full, p_full = np.asarray(o_full), np.asarray(p_full)
    s_full = np.asarray(s_full)
    ctx = np.asarray(lengths, np.float64)  # [T]
    valid = np.arange(T)[None, :] < ctx[:, None]
    dipr_sets = {}
    pos_ = np.arange(T)[None, None, :]
    always = valid[:, None] & ((pos_ < sink) | (pos_ >= ctx[:, None, None] - window))  # [T,1,S]

    def flat_set(beta):
        if beta not in dipr_sets:
            m = np.max(np.where(valid[:, None], s_full, -np.inf), axis=-1, keepdims=True)
            keep = valid[:, None] & (s_full >= m - beta)
            pos = np.arange(T)[None, None, :]
            keep |= valid[:, None] & ((pos < sink) | (pos >= ctx[:, None, None] - window))
            dipr_sets[beta] = keep
        return dipr_sets[beta]

    stores = {}

    q_metric = jnp.asarray(q[T0 - metric_queries:T0])[None] if metric_queries else None

    def store_for(cfg, query_aware):
        if (cfg, query_aware) not in stores:
            t0 = time.perf_counter()
            st = build_store(kk, vv, jnp.asarray([T0], jnp.int32),
                             IndexConfig(cluster=cfg, block=BlockConfig(32)), n_heads=H,
                             queries=q_metric if query_aware else None)
            jax.block_until_ready(st)
            stores[cfg, query_aware] = (st, time.perf_counter() - t0)
        return stores[cfg, query_aware]

    q_cal = jnp.asarray(q[T0 - calib:T0])[:, None]  # [calib, 1, H, D]
    cal_len = jnp.arange(T0 - calib + 1, T0 + 1, dtype=jnp.int32)
    rows = []
    norm_full = np.linalg.norm(o_full, axis=-1)  # [T,H]
    for m in tqdm(methods, desc="methods", leave=False):
        cfg = m.cluster or ClusterConfig(sink=sink, window=window)
        st, build_s = store_for(cfg, m.query_aware and metric_queries > 0)
        plan = dataclasses.replace(m.plan, return_mask=True)
        delta_used = None
        if m.calibrate:
            d = calibrate_delta(st, [q_cal[i] for i in range(calib)], plan.beta,
                                m.target_recall, plan.probe, plan.rank_std,
                                lengths=[cal_len[i:i + 1] for i in range(calib)],
                                per=m.calibrate_per, rank_var=plan.rank_var)
            st = st.replace(cluster=st.cluster.replace(delta=d))
            delta_used = float(np.asarray(d).mean())
        o, keys_read, keys_att, attended, trunc, scored = runner(plan)(q_dec, lengths, st)
        o, attended = np.asarray(o), np.asarray(attended)
        scored = np.asarray(scored, np.float64)
        if plan.index == "cluster":  # bytes of the summaries per block, in attended keys
            var_row = bool(plan.rank_std or plan.rank_var or plan.remainder_var) \
                and cfg.var_summary == "channel"
            cost = summary_row_cost(cfg, D, jnp.bfloat16, var_row) / (2 if var_row else 1)
        else:  # Quest's min/max rows in the cache dtype: two rows are one key + value
            cost = 0.5
        keys_read_bytes = np.asarray(keys_read) - scored + cost * scored
        err = np.linalg.norm(o - o_full, axis=-1) / np.maximum(norm_full, 1e-9)  # [T,H]
        mass = np.sum(p_full * attended, axis=-1)  # [T,H]
        ref_set = flat_set(plan.beta if np.isfinite(plan.beta) else 4.0)
        recall = (attended & ref_set).sum(-1) / np.maximum(ref_set.sum(-1), 1)
        ref4 = flat_set(4.0)  # DESIGN.md's table measures recall at beta 4, whatever the plan's
        recall_b4 = (attended & ref4).sum(-1) / np.maximum(ref4.sum(-1), 1)
        mid = ref_set & ~always
        recall_mid = np.where(mid.sum(-1) > 0,
                              (attended & mid).sum(-1) / np.maximum(mid.sum(-1), 1), 1.0)
        rows.append(dict(
            method=m.name, plan=plan.describe(), beta=plan.beta,
            cluster_size=(cfg.cluster_size if plan.index == "cluster" else None),
            capacity=plan.capacity, k=plan.k, pages=plan.pages, delta=delta_used,
            keys_read=float(np.mean(np.asarray(keys_read) / ctx[:, None])),
            keys_read_bytes=float(np.mean(keys_read_bytes / ctx[:, None])),
            summary_dtype=cfg.summary_dtype if plan.index == "cluster" else None,
            keys_attended=float(np.mean(np.asarray(keys_att) / ctx[:, None])),
            recall=float(recall.mean()), recall_min=float(recall.min()),
            recall_b4=float(recall_b4.mean()),
            recall_middle=float(recall_mid.mean()),
            mass=float(mass.mean()), error=float(err.mean()), error_p90=float(np.quantile(err, 0.9)),
            truncated=int(np.asarray(trunc).sum()), build_s=build_s))
    return rows


def methods_for(args):
    sink, window = args.sink, args.window
    base = dict(sink=sink, window=window)
    T = args.context
    ms = [Method("flat", Plan.dipr(beta, index="flat", **base)) for beta in args.betas]
    for frac in args.budgets:
        ms.append(Method("topk", Plan.topk(max(1, int(frac * T)), **base)))
        ms.append(Method("quest", Plan.quest(max(1, int(frac * T / 32)), **base)))
    ms += [Method("block-dipr", Plan.dipr(beta, index="block", **base)) for beta in args.betas_block]

    def cfg_of(cs):
        return ClusterConfig(cluster_size=cs, block_size=2 * cs, sink=sink, window=window,
                             iters=args.iters, metric=args.metric)

    read = dict(probe=args.probe, attend_read=True, **base)
    main = cfg_of(args.main_cluster_size)
    bf = dataclasses.replace(main, summary_dtype="bfloat16")  # bf16 summaries
    f8 = dataclasses.replace(main, summary_dtype="float8_e4m3fn")
    for beta in args.betas:  # the main configuration, every variant
        ms.append(Method("cluster-dipr", Plan.dipr(beta, index="cluster", probe=args.probe, **base),
                         main, True))
        # plain DIPR (only the keys within beta of the max read attended), margins per kv head
        # and bf16 summaries: probe 2 and the exact threshold, against probe 0 (m' from the
        # exact region alone), and probe 0 with one_pass (threshold m' - beta: the GPU
        # kernels' fastest plan)
        ms.append(Method("cluster-dipr@kv", Plan.dipr(beta, index="cluster", probe=args.probe,
                                                      **base), bf, True, calibrate_per="kv_head"))
        ms.append(Method("cluster-dipr@kv+noprobe", Plan.dipr(
            beta, index="cluster", probe=0, **base), bf, True, calibrate_per="kv_head"))
        ms.append(Method("cluster-dipr@kv+onepass", Plan.dipr(
            beta, index="cluster", probe=0, one_pass=True, **base), bf, True,
            calibrate_per="kv_head"))
        # the same with fp8 (e4m3) summaries and q: what the margins kernel reads at a quarter
        # of f32's bytes
        ms.append(Method("cluster-dipr@kv+onepass+fp8", Plan.dipr(
            beta, index="cluster", probe=0, one_pass=True, **base), f8, True,
            calibrate_per="kv_head"))
        ms.append(Method("cluster", Plan.dipr(beta, index="cluster", **read), main, True))
        # the margin calibrated per kv head instead of per layer
        ms.append(Method("cluster@kv", Plan.dipr(beta, index="cluster", **read), main, True,
                         calibrate_per="kv_head"))
        # clusters ranked (and DIPR's rule applied) by the log-normal estimate of their mean
        # softmax weight, q.c + var(q.k) / 2, against the fixed budget ranked the same way
        ms.append(Method("cluster@kv+rv", Plan.dipr(beta, index="cluster", rank_var=0.5,
                                                    **read), main, True, calibrate_per="kv_head"))
        # the same with the summaries stored in bf16 (half the bytes the centroid scores read)
        ms.append(Method("cluster@kv+bf16", Plan.dipr(beta, index="cluster", **read), bf, True,
                         calibrate_per="kv_head"))
        ms.append(Method("cluster+rem", Plan.dipr(beta, index="cluster", remainder=True, **read),
                         main, True))
        ms.append(Method("cluster+rem+var", Plan.dipr(beta, index="cluster", remainder=True,
                                                      remainder_var=0.5, **read), main, True))
        # DIPR's rule plus a floor: the `floor` best clusters of every query head are always read
        ms.append(Method("cluster+rem+var+floor", Plan.dipr(
            beta, index="cluster", remainder=True, remainder_var=0.5, attend_read=True,
            probe=args.floor, **base), main, True))
    for beta in args.betas_mass:
        ms.append(Method("cluster+rem+var+mass", Plan.dipr(
            beta, index="cluster", remainder=True, remainder_var=0.5, mass_eps=args.mass_eps,
            **read), main, True))
    for eps in args.mass_only:  # a dynamic rule on estimated mass alone (DIPR's rule off):
        # the fewest clusters that leave at most eps of the estimated softmax mass unread
        ms.append(Method("cluster-mass", Plan.dipr(0.0, index="cluster", delta=-1e4,
                                                   mass_eps=eps, **read), main))
    for frac in args.budgets:  # fixed budget: the same number of top clusters every step
        cap = max(1, int(round(frac * T / args.main_cluster_size)))
        # without the remainder estimate: selection alone, DIPR's rule (family "cluster") against
        # the same number of top clusters every step
        ms.append(Method("cluster-fixed", Plan.dipr(4.0, index="cluster", delta=1e4, capacity=cap,
                                                    **read), main))
        ms.append(Method("cluster-fixed+rv", Plan.dipr(4.0, index="cluster", delta=1e4,
                                                       capacity=cap, rank_var=0.5, **read), main))
        ms.append(Method("cluster-fixed+rem+var", Plan.dipr(
            4.0, index="cluster", remainder=True, remainder_var=0.5, delta=1e4, capacity=cap,
            **read), main))
        # DIPR's rule under the same cap: a query head whose DIPR set needs fewer clusters reads
        # fewer; the others read the cap (the GPU plans' static capacity)
        for beta in args.betas_cap:
            ms.append(Method("cluster@kv+cap", Plan.dipr(beta, index="cluster", capacity=cap,
                                                         **read), main, True,
                             calibrate_per="kv_head"))
    # one summary row per block: the scalar variance summary (ClusterConfig.var_summary)
    scal = dataclasses.replace(main, var_summary="scalar")
    rem = dict(remainder=True, remainder_var=0.5, rank_var=0.5, attend_read=True, **base)
    for beta in args.betas_scalar:
        ms.append(Method("scalar+rem+var+floor", Plan.dipr(beta, index="cluster", probe=args.floor,
                                                           **rem), scal, True))
    for fl in args.floors:  # the floor sets the budget; DIPR's rule adds clusters above it
        ms.append(Method("scalar+rem+var+floor@b1", Plan.dipr(1.0, index="cluster", probe=fl,
                                                              **rem), scal, True))
    for frac in args.budgets_scalar:  # fixed budget: the top clusters of the group, every step
        cap = max(1, int(round(frac * T / args.main_cluster_size)))
        ms.append(Method("scalar-fixed+rem+var", Plan.dipr(4.0, index="cluster", delta=1e4,
                                                           capacity=cap, **rem), scal))
    # the super level: score NS = C / super_size super rows, open the best per query head
    sup = dataclasses.replace(scal, super_size=args.super_size)
    srem = dict(super_probe=args.super_probe, **rem)
    for fl in args.floors_super:
        ms.append(Method("super+rem+var+floor@b1", Plan.dipr(1.0, index="cluster", probe=fl,
                                                             **srem), sup, True))
        # the same floor with DIPR's rule off (delta -1e4): a fixed budget per query head
        ms.append(Method("super-fixed+rem+var", Plan.dipr(1.0, index="cluster", probe=fl,
                                                          delta=-1e4, **srem), sup))
    for fl in args.floors_dipr:  # DIPR's rule above a smaller floor: a dynamic budget
        for beta in args.betas_super:
            ms.append(Method("super+rem+var+floor", Plan.dipr(beta, index="cluster", probe=fl,
                                                              **srem), sup, True))
    sup8 = dataclasses.replace(sup, summary_dtype="int8")
    for fl in args.floors_int8:
        ms.append(Method("super+int8+rem+var+floor@b1", Plan.dipr(1.0, index="cluster", probe=fl,
                                                                  **srem), sup8, True))
    for cs in args.cluster_sizes:
        if cs == args.main_cluster_size:
            continue
        for beta in args.betas_sizes:
            ms.append(Method("cluster+rem+var", Plan.dipr(beta, index="cluster", remainder=True,
                                                          remainder_var=0.5, **read),
                             cfg_of(cs), True))
    return ms


def _interp(points, x):
    """Linear interpolation of y at x over (x, y) points sorted by x; None outside."""
    pts = sorted(points)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / max(x1 - x0, 1e-12)
    return None


_SUBLINEAR = ("cluster", "scalar", "super")  # families that read a fraction of the keys (index paths)
_FIXED_OF = {"cluster": "cluster-fixed",
             "cluster@kv": "cluster-fixed",
             "cluster@kv+bf16": "cluster-fixed",
             "cluster@kv+rv": "cluster-fixed+rv",
             "cluster@kv+cap": "cluster-fixed",
             "cluster-mass": "cluster-fixed",
             "cluster+rem+var": "cluster-fixed+rem+var",
             "cluster+rem+var+floor": "cluster-fixed+rem+var",
             "scalar+rem+var+floor": "scalar-fixed+rem+var",
             "scalar+rem+var+floor@b1": "scalar-fixed+rem+var",
             "super+rem+var+floor@b1": "super-fixed+rem+var",
             "super+rem+var+floor": "super-fixed+rem+var"}


def frontier(summary, key="error"):
    """Pareto points (keys read, error) of the index paths and Quest: no other point reads no
    more keys with a lower error."""
    pts = sorted((r for r in summary if r["method"].startswith(_SUBLINEAR + ("quest",))),
                 key=lambda r: (r["keys_read"], r[key]))
    out, best = [], float("inf")
    for r in pts:
        if r[key] < best:
            best = r[key]
            out.append({k: r[k] for k in ("method", "plan", "cluster_size", "keys_read",
                                          "keys_attended", "recall", "recall_b4", "mass",
                                          "error", "keys_read_bytes") if k in r})
    return out


def goals(summary, max_read=0.12, max_error=0.015, min_recall=0.99):
    """The issue's goals, checked on the layer means."""
    out = {}
    main = [r for r in summary if r["method"].startswith(_SUBLINEAR)
            and r["keys_read"] <= max_read and r["recall"] >= min_recall
            and r.get("recall_b4", 1.0) >= min_recall]
    best = min(main, key=lambda r: r["error"], default=None)
    out["best_cluster_at_max_read"] = best and {k: best[k] for k in (
        "method", "plan", "cluster_size", "keys_read", "recall", "recall_middle", "error")
        + tuple(k for k in ("recall_b4", "keys_read_bytes") if k in best)}
    out["goal_error_at_12pct_read_met"] = bool(best and best["error"] <= max_error)
    # the same with reads counted in bytes: a block's summaries (centroid + value_mean in their
    # storage dtype) against one key + value of a bf16 cache; Quest's min/max rows at 1/2 key
    byte = [r for r in summary if r["method"].startswith(_SUBLINEAR) and "keys_read_bytes" in r
            and r["keys_read_bytes"] <= max_read and r["recall"] >= min_recall
            and r.get("recall_b4", 1.0) >= min_recall]
    best_b = min(byte, key=lambda r: r["error"], default=None)
    out["best_cluster_at_max_read_bytes"] = best_b and {k: best_b[k] for k in (
        "method", "plan", "keys_read", "keys_read_bytes", "recall", "recall_b4", "error")}
    out["goal_error_at_12pct_read_bytes_met"] = bool(best_b and best_b["error"] <= max_error)
    quest = [(r["keys_read"], r["error"]) for r in summary if r["method"] == "quest"]
    comp = []
    for r in summary:
        if r["method"] in ("cluster+rem+var", "cluster+rem") + tuple(
                m for m in _FIXED_OF if m.startswith(("scalar", "super"))) \
                and r["cluster_size"] == 32:
            qe = _interp(quest, r["keys_read"])
            if qe is not None:
                comp.append(dict(plan=r["plan"], method=r["method"], keys_read=r["keys_read"],
                                 error=r["error"], quest_error=qe, ratio=r["error"] / qe))
    out["vs_quest_at_equal_read"] = comp
    out["goal_third_of_quest_met"] = bool(comp) and all(c["ratio"] <= 1 / 3 for c in comp)
    dyn = []
    for r in summary:
        fam = _FIXED_OF.get(r["method"])
        if fam is None or r["cluster_size"] != 32:
            continue
        fixed = [(f["keys_read"], f["error"]) for f in summary if f["method"] == fam]
        fixed_recall = [(f["keys_read"], f["recall"]) for f in summary if f["method"] == fam]
        fixed_b4 = [(f["keys_read"], f["recall_b4"]) for f in summary
                    if f["method"] == fam and "recall_b4" in f]
        fe = _interp(fixed, r["keys_read"])
        if fe is not None:
            dyn.append(dict(method=r["method"], plan=r["plan"], keys_read=r["keys_read"],
                            error=r["error"], fixed_budget_error=fe, recall=r["recall"],
                            fixed_budget_recall=_interp(fixed_recall, r["keys_read"]),
                            recall_b4=r.get("recall_b4"),
                            fixed_budget_recall_b4=_interp(fixed_b4, r["keys_read"])
                            if fixed_b4 and "recall_b4" in r else None,
                            fixed_family=fam))
    out["dynamic_vs_fixed_at_equal_read"] = dyn
    for fam in ("cluster", "cluster@kv", "cluster@kv+bf16", "cluster@kv+rv", "cluster@kv+cap",
                "cluster-mass",
                "cluster+rem+var",
                "scalar+rem+var+floor",
                "scalar+rem+var+floor@b1",
                "super+rem+var+floor@b1", "super+rem+var+floor"):
        d = [x for x in dyn if x["method"] == fam]
        # a win by more than rounding: 0.5% of the error, 1e-4 of recall (a rule whose floor
        # reads what the fixed budget reads gives the same error to ~1e-8)
        out[f"dynamic_beats_fixed[{fam}]"] = (
            f"error lower at "
            f"{sum(x['error'] < 0.995 * x['fixed_budget_error'] for x in d)}/{len(d)} points, "
            f"recall (beta 4) higher at "
            f"{sum((x['recall_b4'] or 0) > (x['fixed_budget_recall_b4'] or 1) + 1e-4 for x in d)}"
            f"/{len(d)}")
    out["frontier"] = frontier(summary)
    return out


def summarize(rows):
    """Mean over layers per (method, plan, cluster_size)."""
    groups = {}
    for r in rows:
        key = (r["method"], r["plan"], r["cluster_size"], r["capacity"], r["k"], r["pages"])
        groups.setdefault(key, []).append(r)
    out = []
    for (method, plan, cs, *_), rs in groups.items():
        agg = {k: float(np.mean([r[k] for r in rs])) for k in
               ("keys_read", "keys_attended", "recall", "recall_middle", "mass", "error",
                "error_p90") + tuple(k for k in ("keys_read_bytes", "recall_b4") if k in rs[0])}
        agg.update(method=method, plan=plan, cluster_size=cs, beta=rs[0]["beta"],
                   capacity=rs[0]["capacity"], k=rs[0]["k"], pages=rs[0]["pages"],
                   recall_min=float(min(r["recall_min"] for r in rs)),
                   truncated=int(sum(r["truncated"] for r in rs)))
        out.append(agg)
    return out


def plot(summary, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    fams = sorted({(r["method"], r["cluster_size"]) for r in summary}, key=str)
    colors = plt.get_cmap("tab20").colors
    for i, fam in enumerate(fams):
        style = dict(color=colors[(2 * i) % 20 if i < 10 else (2 * i + 1) % 20],
                     ls="--" if fam[0] in ("topk", "quest") else "-")
        rs = sorted([r for r in summary if (r["method"], r["cluster_size"]) == fam],
                    key=lambda r: r["keys_read"])
        label = fam[0] + (f" /{fam[1]}" if fam[1] else "")
        if fam[0] in ("flat", "block-dipr"):
            continue  # read every key (off the chart)
        if fam[0] == "topk":  # the ceiling: plotted at keys attended (it reads every score)
            label += " (x = attended)"
            rs = sorted(rs, key=lambda r: r["keys_attended"])
            x = [100 * r["keys_attended"] for r in rs]
        else:
            x = [100 * r["keys_read"] for r in rs]
        axes[0].plot(x, [100 * r["error"] for r in rs], marker="o", ms=3, label=label, **style)
        axes[1].plot(x, [r.get("recall_b4", r["recall"]) for r in rs], marker="o", ms=3,
                     label=label, **style)
    axes[0].set(xlabel="keys read (% of context)", ylabel="relative error of o (%)",
                yscale="log", title="output error vs keys read")
    axes[1].set(xlabel="keys read (% of context)",
                ylabel="recall of flat DIPR (beta 4 if measured)",
                title="recall vs keys read")
    for ax in axes:
        ax.set_xlim(0, 40)
        ax.grid(alpha=0.3)
    axes[0].axhline(1.5, color="k", lw=0.5, ls="--")
    axes[0].axvline(12, color="k", lw=0.5, ls="--")
    axes[1].axhline(0.99, color="k", lw=0.5, ls="--")
    axes[1].set_ylim(0.85, 1.002)
    axes[1].legend(fontsize=7, ncol=2, loc="lower right")
    fig.suptitle("SmolLM2-135M, 7.6K tokens of GPL-3 text, layers 1/10/20/29, teacher-forced "
                 "decode; keys read = rows scored + keys read", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, nargs="*", default=[1, 10, 20, 29],
                    help="layers to measure (DESIGN.md's table: 1 10 20 29)")
    ap.add_argument("--betas", type=float, nargs="*", default=[1, 2, 3, 4, 5, 6, 7, 8])
    ap.add_argument("--betas-block", type=float, nargs="*", default=[2, 4, 8])
    ap.add_argument("--cluster-sizes", type=int, nargs="*", default=[16, 32, 64],
                    help="mean keys per cluster (blocks hold 2x that)")
    ap.add_argument("--main-cluster-size", type=int, default=32)
    ap.add_argument("--betas-sizes", type=float, nargs="*", default=[2, 4, 6, 8],
                    help="betas for the cluster sizes other than the main one")
    ap.add_argument("--betas-mass", type=float, nargs="*", default=[2, 4, 6])
    ap.add_argument("--mass-eps", type=float, default=0.02)
    ap.add_argument("--mass-only", type=float, nargs="*", default=[0.5, 0.3, 0.2, 0.1, 0.05],
                    help="eps of the family cluster-mass (the mass rule without DIPR's)")
    ap.add_argument("--budgets", type=float, nargs="*", default=[0.02, 0.05, 0.1, 0.15, 0.2],
                    help="fixed budgets (fraction of context) for top-k, Quest, fixed clusters")
    ap.add_argument("--betas-cap", type=float, nargs="*", default=[6, 8],
                    help="DIPR's rule under each fixed budget's cap (family cluster@kv+cap)")
    ap.add_argument("--n-decode", type=int, default=64, help="teacher-forced decode queries")
    ap.add_argument("--calib", type=int, default=64, help="prefill queries for the delta")
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--probe", type=int, default=2)
    ap.add_argument("--floor", type=int, default=8,
                    help="clusters per query head always read (probed) in the +floor variant")
    ap.add_argument("--betas-scalar", type=float, nargs="*", default=[1, 2, 3, 4, 5, 6],
                    help="betas of the one-row (scalar variance) DIPR + floor variant")
    ap.add_argument("--floors", type=int, nargs="*", default=[6, 8, 10, 12, 14, 16],
                    help="floors swept at beta 1 (scalar variance summary)")
    ap.add_argument("--budgets-scalar", type=float, nargs="*",
                    default=[0.05, 0.07, 0.08, 0.1, 0.12, 0.15],
                    help="fixed budgets for the scalar-variance fixed-capacity baseline")
    ap.add_argument("--super-size", type=int, default=16, help="blocks per super-cluster")
    ap.add_argument("--super-probe", type=int, default=5,
                    help="super-clusters opened per query head")
    ap.add_argument("--floors-super", type=int, nargs="*", default=[8, 10, 12, 13, 14, 15, 16, 18],
                    help="floors swept at beta 1 with the super level (and the fixed baseline)")
    ap.add_argument("--betas-super", type=float, nargs="*", default=[2, 3, 4, 5, 6],
                    help="betas of the super-level DIPR + floor variant")
    ap.add_argument("--floors-dipr", type=int, nargs="*", default=[4, 8],
                    help="floors of the super-level DIPR + floor variant")
    ap.add_argument("--floors-int8", type=int, nargs="*", default=[14, 16, 18],
                    help="floors of the super level with int8 summaries")
    ap.add_argument("--only", nargs="*", default=None,
                    help="measure only these method families (e.g. cluster+rem+var+floor)")
    ap.add_argument("--merge-into", default=None,
                    help="add the rows to this result JSON (replacing same-family rows), "
                         "recompute its summary, goals and plot")
    ap.add_argument("--iters", type=int, default=8, help="k-means iterations")
    ap.add_argument("--metric", default="l2", choices=["l2", "cosine"])
    ap.add_argument("--metric-queries", type=int, default=256,
                    help="prefill queries for the query-aware k-means metric (0: plain L2)")
    ap.add_argument("--qkv-cache", default=None, help="npz of captured q/k/v (reused if present)")
    ap.add_argument("--out", default=os.path.join(RESULTS, "dipr_quality"))
    args = ap.parse_args(argv)
    print(f"jax {jax.__version__} devices {jax.devices()} python {platform.python_version()}")
    layers = args.layers
    if layers is None:
        layers = list(range(30))  # SmolLM2-135M
    t0 = time.time()
    qkv, T = capture(tuple(layers), args.qkv_cache)
    print(f"captured {len(layers)} layers of {T} tokens in {time.time() - t0:.0f}s")
    args.context = T
    methods = methods_for(args)
    if args.only:
        methods = [m for m in methods if m.name in args.only]
    rows = []
    for l in tqdm(layers, desc="layers"):
        q, k, v = qkv[l]
        for r in evaluate_layer(q, k, v, methods, args.n_decode, args.calib, args.sink,
                                args.window, args.metric_queries):
            r["layer"] = l
            rows.append(r)
    if args.merge_into:
        with open(args.merge_into) as f:
            prev = json.load(f)
        fams = {r["method"] for r in rows}
        rows = [r for r in prev["per_layer"] if r["method"] not in fams] + rows
        args.out = args.merge_into[:-5]
        prev_cmd = prev["command"]
    summary = summarize(rows)
    for r in sorted(summary, key=lambda r: (r["method"], str(r["cluster_size"]), r["keys_read"])):
        print(f"{r['method']:18s} {str(r['cluster_size']):4s} {r['plan']:55s} read "
              f"{100 * r['keys_read']:5.1f}% att {100 * r['keys_attended']:5.1f}% recall "
              f"{r['recall']:.3f} mass {r['mass']:.3f} err {100 * r['error']:5.2f}%")
    result = dict(
        command=" ".join([os.path.basename(sys.argv[0])] + (argv or sys.argv[1:])) + (
            f" (merged into the run of: {prev_cmd})" if args.merge_into else ""),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        jax=jax.__version__, device=str(jax.devices()[0]), model="SmolLM2-135M-Instruct Q4_1",
        document="examples/data/gpl-3.0.txt", tokens=T, layers=layers,
        queries=f"teacher forcing: the last {args.n_decode} positions, index built at "
                f"T0 = {T - args.n_decode}; delta calibrated on the {args.calib} prefill "
                f"positions before T0",
        sink=args.sink, window=args.window, goals=goals(summary), summary=summary,
        per_layer=rows)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    plot(summary, args.out + ".png")
    print(json.dumps(result["goals"], indent=1))
    print(f"wrote {args.out}.json and .png in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
