"""Runs decode methods on the same long-context samples and reports quality against cost.

For each length the samples of every task are put in batches of one static shape (prompts
right-padded to L - GEN_BUDGET tokens, a cache of L positions, short batches filled with
copies), so each (length, method) compiles once. Every batch is prefilled once with full
attention; each method then decodes greedily from a copy of that cache. Reported per method
and length: accuracy (the tasks' string-match scores), keys attended per query head and keys
read per kv head (index rows scored included) as fractions of the context and as counts,
decode ms per step (one token per sequence of the batch; compile excluded by a warm-up call,
index build timed apart). Writes `<name>.md`, `<name>.json` and `<name>.png` into the output
directory.

    from alaya_jax.eval import harness
    harness.run_eval(model, tok, ["passkey"], [1024], ["full", "dipr:8"], samples=4, out_dir="out")
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from alaya_jax import methods as M
from alaya_jax.errors import ConfigError
from alaya_jax.eval import tasks as T
from alaya_jax.generate import (FullAttention, _decode_loop, calibration_queries, init_decode_loop,
                                prefill)
from alaya_jax.model.llama import KVCache


class MethodSpecError(ConfigError):
    """A method spec string (e.g. `dipr:8`) that does not parse."""


# --- method specs --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Method:
    name: str  # the spec as given, e.g. "dipr:8"
    attention: Any  # what aj.generate / decode take as `attention`


METHOD_HELP = ("full | full-sparse | streaming[:SINK:WINDOW] | topk:K | quest:PAGES[:PAGE_SIZE] | "
               "dipr:BETA (index chosen by the optimizer) | dipr-cluster:BETA | dipr-flat:BETA | "
               "dipr-block:BETA, dipr options after more colons: delta=X (fixed margin; default: "
               "calibrated), recall=R (calibration target), calib=N (prefill queries calibrated "
               "on), cap=FRACTION, cluster=SIZE, probe=N, remainder, var=X (remainder variance "
               "scale), read (attend every key read), plain (no recipe: attend only the DIPR set, "
               "probe 0, no remainder), qa (cluster in the prefill queries' metric), "
               "per=layer|kv_head (what one calibrated margin covers; default kv_head), onepass "
               "(threshold from the bound before the index is read) "
               "(e.g. dipr-cluster:8:delta=3); BETA may be inf")


# dipr spec option -> (DIPR keyword, value parser; None: a flag without a value)
_DIPR_OPTIONS = {"delta": ("delta", float), "recall": ("target_recall", float),
                 "calib": ("calibration_queries", int), "cap": ("capacity_fraction", float),
                 "cluster": ("cluster_size", int), "probe": ("probe", int),
                 "remainder": ("remainder", None), "var": ("remainder_var", float),
                 "read": ("attend_read", None), "plain": ("plain", None),
                 "qa": ("query_aware", None), "per": ("calibrate_per", str),
                 "onepass": ("one_pass", None)}


def parse_method(spec: str) -> Method:
    """A method from its spec string (see METHOD_HELP)."""
    name, *parts = spec.strip().split(":")
    try:
        if name == "full" and not parts:
            return Method(spec, FullAttention())
        if name == "full-sparse" and not parts:  # dense, through sparse_attention (reports stats)
            return Method(spec, M.Full())
        if name == "streaming":
            if parts and len(parts) != 2:
                raise ValueError("streaming takes no arguments or SINK:WINDOW")
            return Method(spec, M.Streaming(*(int(p) for p in parts)))
        if name == "topk" and len(parts) == 1:
            return Method(spec, M.TopK(int(parts[0])))
        if name == "quest" and 1 <= len(parts) <= 2:
            return Method(spec, M.Quest(int(parts[0]), *(int(p) for p in parts[1:])))
        if name in ("dipr", "dipr-flat", "dipr-block", "dipr-cluster") and parts and parts[0]:
            index = {"dipr": "auto"}.get(name, name.removeprefix("dipr-"))
            kw: dict[str, Any] = {}
            for opt in parts[1:]:
                key, _, val = opt.partition("=")
                if key in _DIPR_OPTIONS and bool(val) == (_DIPR_OPTIONS[key][1] is not None):
                    arg, conv = _DIPR_OPTIONS[key]
                    if arg == "plain":
                        kw.update(M.PLAIN_CLUSTER_PLAN)
                    else:
                        kw[arg] = True if conv is None else conv(val)
                else:
                    raise ValueError(f"unknown option {opt!r}")
            return Method(spec, M.DIPR(float(parts[0]), index, **kw))
    except ValueError as e:
        raise MethodSpecError(f"cannot parse method {spec!r}: {e}; expected {METHOD_HELP}") from None
    raise MethodSpecError(f"unknown method {spec!r}; expected {METHOD_HELP}")


# --- one decode, timed ---------------------------------------------------------------------
def _copy(tree):
    return jax.tree.map(jnp.copy, tree)


def decode_timed(model, tokenizer, cache: KVCache, logits, max_new_tokens: int, attention,
                 queries=None):
    """Greedy decode as `alaya_jax.generate.decode` runs it (same jitted loop), with the index
    build (and its calibration on the prefill's `queries`) and the loop timed apart. The cache
    is consumed (donated). Returns
    (ids per sequence, steps, per-sequence stats dict of [L, B] arrays or None, build_s, loop_s);
    the stats also hold the method's `report` (its plan, per-layer deltas) under "report".
    """
    stop_ids = tuple(sorted(tokenizer.stop_ids()))
    t0 = time.perf_counter()
    static, state, loop = init_decode_loop(model, cache, jnp.argmax(logits, -1).astype(jnp.int32),
                                           max_new_tokens, jax.random.PRNGKey(0),
                                           attention=attention, stop_ids=stop_ids,
                                           queries=_queries_for(attention, queries))
    jax.block_until_ready(loop)  # the index build, when the method has one
    t1 = time.perf_counter()
    report = (attention.report(cache, model.cfg.n_heads, loop["attn"])
              if hasattr(attention, "report") else None)
    loop = _decode_loop(static, state, loop, jnp.int32(max_new_tokens))
    out = np.asarray(loop["out"])
    t2 = time.perf_counter()
    gen = []
    for row in out:
        ids = [int(t) for t in row[:max_new_tokens] if t >= 0]
        if ids and ids[-1] in stop_ids:
            ids = ids[:-1]
        gen.append(ids)
    stats = dict(jax.device_get(loop["stats"]), report=report) if "stats" in loop else None
    return gen, int(loop["step"]), stats, t1 - t0, t2 - t1


def per_sequence_stats(stats, cfg, prompt_lengths, n_generated) -> list[dict]:
    """Per sequence: fractions of the context attended (per q head) and read (per kv head,
    index rows included), mean context, truncated layer-steps. Full attention (no stats)
    attends and reads everything."""
    rows = []
    for b in range(len(prompt_lengths)):
        if stats is None:
            ctx = prompt_lengths[b] + (n_generated[b] + 1) / 2
            rows.append(dict(attended_fraction=1.0, read_fraction=1.0, context=ctx, truncated=0))
            continue
        ctx_l = np.maximum(stats["context"][:, b], 1)  # [L] summed over steps
        steps = max(float(stats["steps"][b]), 1.0)
        rows.append(dict(attended_fraction=float(np.mean(stats["attended"][:, b] / cfg.n_heads / ctx_l)),
                         read_fraction=float(np.mean(stats["read"][:, b] / cfg.n_kv_heads / ctx_l)),
                         context=float(ctx_l.mean() / steps),
                         truncated=int(stats["truncated"][:, b].sum())))
    return rows


def _queries_for(attention, queries):
    """The prefill queries a method calibrates on (the last n of those collected), or None."""
    n = calibration_queries(attention)
    return queries.last(n) if n and queries is not None else None


# --- the run -------------------------------------------------------------------------------
def _batches(samples: list, size: int) -> list[list]:
    return [samples[i:i + size] for i in range(0, len(samples), size)]


def expected_batch_s(durations: dict, length: int, cold: bool) -> float:
    """What the next batch at `length` is expected to take: the longest batch run so far at
    that length in the same compile state (cold: some of its methods compile first), or, for a
    length not yet run in that state, the longest at any length (0 before any). durations:
    {(length, cold): [seconds, ...]}."""
    same = [t for (L, c), ts in durations.items() if c == cold and L == length for t in ts]
    if not same:
        same = [t for (_, c), ts in durations.items() if c == cold for t in ts]
    return max(same, default=0.0)


def run_eval(model, tokenizer, tasks: Sequence[str], lengths: Sequence[int], methods: Sequence[str],
             samples: int, out_dir: str | None = None, *, name: str = "eval", batch_size: int = 25,
             batch_tokens: int | None = None, seed: int = 0, max_minutes: float | None = None,
             parallel_compile: bool = False, progress: bool = True, label: str = "",
             command: str | None = None, resume: dict | None = None) -> dict:
    """Evaluates every method on the same samples; writes results when out_dir is given.

    batch_size: sequences per batch; batch_tokens (optional) caps batch x length, so long
    contexts get smaller batches (e.g. 204800: 50 at 4K, 25 at 8K).

    parallel_compile: warm every method up at once on threads at a length's first batch
    (compiles overlap; needs memory for one cache copy per method).
    max_minutes: start no batch that is expected to end past this (`expected_batch_s`: a
    length's first batch, whose methods compile, is expected to take as long as the longest
    first batch so far); the report then says which (length, batch) pairs did not run, and
    nothing is silently dropped.
    resume: a result of an earlier run on the same samples and batches (`check_resumable`):
    its records are kept, its methods and lengths join these, and a method runs on a batch
    only if the earlier run did not (a batch that every method has done is not even
    prefilled), so a run cut short by a time limit goes on where it stopped. The result
    lists the earlier runs under "resumed".
    """
    from tqdm import tqdm

    tasks, lengths, methods = list(tasks), [int(L) for L in lengths], list(methods)
    parsed = [parse_method(m) for m in methods]
    if len({m.name for m in parsed}) != len(parsed):
        raise ConfigError(f"methods repeat: {list(methods)}")
    for t in tasks:
        if t not in T.TASKS:
            raise ConfigError(f"unknown task {t!r}; expected some of {', '.join(T.TASKS)}")
    cfg = model.cfg
    for L in lengths:
        if L > cfg.max_seq_len:
            raise ConfigError(f"length {L} exceeds the model's context of {cfg.max_seq_len} tokens")
    if resume is not None:  # the earlier run's methods and lengths carry on too
        check_resumable(resume, model=cfg.name, seed=seed, samples_per_task=samples,
                        tasks=tasks, gen_budget=T.GEN_BUDGET, batch_size=batch_size,
                        batch_tokens=batch_tokens)
        methods += [m for m in resume["methods"] if m not in methods]
        parsed = [parse_method(m) for m in methods]
        lengths = sorted(set(lengths) | {int(L) for L in resume["lengths"]})
    t_start = time.perf_counter()
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if progress else (lambda s: None)
    log(f"[eval] jax {jax.__version__} on {jax.devices()[0].device_kind} | model {cfg.name} "
        f"({np.dtype(model.dtype).name}) | tasks {','.join(tasks)} | lengths {list(lengths)} | "
        f"{samples} samples/task/length | batch {batch_size} | methods {', '.join(methods)}")

    # Batches mix the tasks (sample i of every task, then i + 1, ...) and alternate between
    # lengths, so a run cut short by max_minutes loses samples evenly, not a task or a length.
    per_length = []
    for L in lengths:
        t = time.perf_counter()
        ss = T.make_samples(tasks, tokenizer, L, samples, seed)
        ss.sort(key=lambda s: (s.index, tasks.index(s.task)))
        log(f"[eval] length {L}: {len(ss)} samples, prompts {min(s.n_tokens for s in ss)}-"
            f"{max(s.n_tokens for s in ss)} tokens (made in {time.perf_counter() - t:.1f}s)")
        cap = batch_size if batch_tokens is None else max(1, min(batch_size, batch_tokens // L))
        B = min(cap, len(ss))  # one static batch shape per length
        per_length.append([(L, B, b) for b in _batches(ss, B)])
    plan = [bs[i] for i in range(max(map(len, per_length))) for bs in per_length if i < len(bs)]

    records: list[dict] = []
    timing: dict[tuple[str, int], dict] = {}
    done: set = set()  # (method, length, task, index) the resumed run has
    if resume is not None:
        records = list(resume["records"])
        timing = _timing_of(resume)
        done = {(r["method"], r["length"], r["task"], r["index"]) for r in records}
        log(f"[eval] resuming {len(records)} records of {resume['date']}")
    earlier = [] if resume is None else [*resume.get("resumed", []), _run_info(resume)]
    skipped: list[dict] = []
    warm: set = set()
    durations: dict = {}  # (length, cold) -> seconds of each batch run
    def _result(records, timing, skipped, plan_left=False):
        elapsed = time.perf_counter() - t_start
        return dict(
            label=label + (" [PARTIAL: written while running]" if plan_left else ""),
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            command=command or " ".join(sys.argv), device=str(jax.devices()[0].device_kind),
            backend=jax.default_backend(), jax=jax.__version__, python=platform.python_version(),
            model=cfg.name, dtype=np.dtype(model.dtype).name, tasks=list(tasks), lengths=list(lengths),
            methods=list(methods), samples_per_task=samples, batch_size=batch_size,
            batch_tokens=batch_tokens, seed=seed,
            gen_budget=T.GEN_BUDGET, elapsed_s=round(elapsed, 1), incomplete=skipped,
            summary=summarize(records, timing, methods, tasks, lengths), records=records,
            timing=_timing_list(timing), **({"resumed": earlier} if earlier else {}))

    bar = tqdm(total=len(plan) * len(parsed), disable=not progress, desc="eval", unit="run",
               file=sys.stderr)
    for L, B, batch in plan:
        todo = [m for m in parsed
                if not all((m.name, L, s.task, s.index) in done for s in batch)]
        bar.update(len(parsed) - len(todo))  # the resumed run's
        if not todo:
            continue
        cold_batch = any((m.name, L) not in warm for m in todo)
        t_batch = time.perf_counter()
        if max_minutes is not None and (t_batch - t_start + expected_batch_s(
                durations, L, cold_batch) > 60 * max_minutes):
            skipped.append(dict(length=L, samples=len(batch)))
            bar.update(len(todo))
            continue
        padded = batch + [batch[-1]] * (B - len(batch))  # a short batch is filled with copies
        T_ = L - T.GEN_BUDGET
        tokens = np.zeros((B, T_), np.int32)
        for i, s in enumerate(padded):
            tokens[i, :s.n_tokens] = s.prompt_ids
        lens = np.array([s.n_tokens for s in padded], np.int32)
        t = time.perf_counter()
        C = min(512, -(-T_ // 16) * 16)  # prefill's chunk: the cache must hold whole chunks
        cache_len = max(L, -(-T_ // C) * C)
        n_q = max(calibration_queries(m.attention) for m in todo)
        out = prefill(model, tokens, lens, KVCache.zeros(cfg, B, cache_len, model.dtype), chunk=C,
                      collect_queries=n_q)
        logits, cache, queries = out if n_q else (*out, None)
        jax.block_until_ready(logits)
        prefill_s = time.perf_counter() - t
        max_new = max(s.max_new_tokens for s in batch)
        cold = [m for m in todo if (m.name, L) not in warm]
        if cold:  # compile outside the timing: a 2-token decode per method
            bar.set_postfix_str(f"L={L} compiling {len(cold)} methods")
            t = time.perf_counter()
            warm_up = lambda m: decode_timed(model, tokenizer, _copy(cache), logits, 2, m.attention,  # noqa: E731
                                             queries)
            if parallel_compile:  # XLA compiles off the GIL: one thread per method
                from concurrent.futures import ThreadPoolExecutor

                with ThreadPoolExecutor(len(cold)) as ex:
                    list(ex.map(warm_up, cold))
            else:
                for m in cold:
                    warm_up(m)
            warm.update((m.name, L) for m in cold)
            log(f"[eval] length {L}: prefill {prefill_s:.1f}s (compile included), "
                f"{len(cold)} methods compiled in {time.perf_counter() - t:.1f}s")
        for m in todo:
            bar.set_postfix_str(f"L={L} {m.name}")
            gen, steps, stats, build_s, loop_s = decode_timed(model, tokenizer, _copy(cache), logits,
                                                              max_new, m.attention, queries)
            seq = per_sequence_stats(stats, cfg, lens.tolist(), [len(g) for g in gen])
            tm = timing.setdefault((m.name, L), dict(loop_s=0.0, steps=0, build_s=0.0, batches=0,
                                                     prefill_s=0.0, batch=B))
            tm["loop_s"] += loop_s
            tm["steps"] += steps
            tm["build_s"] += build_s
            tm["prefill_s"] += prefill_s
            tm["batches"] += 1
            if stats is not None and stats["report"]:
                rep = stats["report"]
                tm["plan"] = rep["plan"]
                if rep["delta_per_layer"] is not None:
                    tm.setdefault("deltas", []).append(rep["delta_per_layer"])
            for i, s in enumerate(batch):
                text = tokenizer.decode(gen[i], skip_special_tokens=True)
                records.append(dict(method=m.name, task=s.task, length=L, index=s.index,
                                    depth=s.depths[0] if s.depths else None,
                                    prompt_tokens=s.n_tokens, output=text,
                                    answers=list(s.answers), score=T.score(s, text), **seq[i]))
            bar.update(1)
        del cache
        durations.setdefault((L, cold_batch), []).append(time.perf_counter() - t_batch)
        if out_dir is not None:  # partial results survive an interrupted run
            write_outputs(_result(records, timing, skipped, plan_left=True), out_dir, name)
    bar.close()

    result = _result(records, timing, skipped)
    elapsed = result["elapsed_s"]
    log(f"[eval] done in {elapsed:.0f}s" + (f"; {len(skipped)} batches skipped by --max-minutes"
                                             if skipped else ""))
    if out_dir is not None:
        write_outputs(result, out_dir, name)
    return result


def summarize(records, timing, methods, tasks, lengths) -> dict:
    """Per method: overall and per length accuracy, keys attended/read, decode ms/step."""

    def agg(rs):
        if not rs:
            return None
        ctx = np.array([r["context"] for r in rs])
        att = np.array([r["attended_fraction"] for r in rs])
        rd = np.array([r["read_fraction"] for r in rs])
        return dict(n=len(rs), accuracy=float(np.mean([r["score"] for r in rs])),
                    attended_fraction=float(att.mean()), attended_keys=float((att * ctx).mean()),
                    read_fraction=float(rd.mean()), read_keys=float((rd * ctx).mean()),
                    context=float(ctx.mean()), truncated=int(sum(r["truncated"] for r in rs)))

    out = {}
    for m in methods:
        rm = [r for r in records if r["method"] == m]
        by_len = {}
        for L in lengths:
            rl = [r for r in rm if r["length"] == L]
            a = agg(rl)
            if a is None:
                continue
            tm = timing.get((m, L))
            a["by_task"] = {t: agg([r for r in rl if r["task"] == t])["accuracy"]
                            for t in tasks if any(r["task"] == t for r in rl)}
            if tm:
                a["decode_ms_per_step"] = 1e3 * tm["loop_s"] / max(tm["steps"], 1)
                a["index_build_ms"] = 1e3 * tm["build_s"] / tm["batches"]
                a["batch"] = tm["batch"]
                if "plan" in tm:
                    a["plan"] = tm["plan"]
                if "deltas" in tm:  # calibrated margins: per layer, averaged over batches
                    a["delta_per_layer"] = np.mean(tm["deltas"], axis=0).tolist()
            by_len[str(L)] = a
        overall = agg(rm)
        out[m] = dict(overall, by_length=by_len) if overall else dict(by_length=by_len)
    return out


# --- outputs -------------------------------------------------------------------------------
def _pct(x):
    return "-" if x is None else f"{100 * x:.1f}"


def plan_line(name: str, row: dict) -> str:
    """A markdown list item: the plan a method ran and, when calibrated, its margins."""
    d = row.get("delta_per_layer")
    extra = (f"; delta per layer mean {np.mean(d):.2f} (min {np.min(d):.2f}, max "
             f"{np.max(d):.2f})" if d else "")
    return f"- {name}: {row['plan']}{extra}"


def _run_line(run: dict) -> str:
    return (f"- {run['date']}, {run['device']}, jax {run['jax']}, {run['elapsed_s']:.0f}s: "
            f"`{run['command']}`")


def markdown(result: dict) -> str:
    s = result["summary"]
    tasks = result["tasks"]
    lines = []
    if result["label"]:
        lines += [f"**{result['label']}**", ""]
    lines += [f"{result['model']} ({result['dtype']}) on {result['device']} ({result['backend']}), "
              f"jax {result['jax']}, {result['date']}; {result['samples_per_task']} samples per task "
              f"and length, batch {result['batch_size']}"
              + (f" (at most {result['batch_tokens']} tokens)" if result.get("batch_tokens") else "")
              + f", seed {result['seed']}, greedy; "
              f"{result['elapsed_s']:.0f}s in all.", "",
              "Accuracy in % (string match; partial credit for several answers). attended: keys in "
              "the softmax per query head; read: keys read per kv head including index rows "
              "scored; both as % of the context and as mean counts. ms/step: one decode step of "
              "the whole batch (one token per sequence), compile excluded; build: index build "
              "after prefill per batch.", ""]
    head = ["method", "length", *tasks, "all", "attended %", "attended keys", "read %", "read keys",
            "ms/step (batch)", "build ms"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for L in result["lengths"]:
        for m in result["methods"]:
            a = s[m]["by_length"].get(str(L))
            if a is None:
                continue
            row = [m, str(L)] + [_pct(a["by_task"].get(t)) for t in tasks] + [
                _pct(a["accuracy"]), _pct(a["attended_fraction"]), f"{a['attended_keys']:.0f}",
                _pct(a["read_fraction"]), f"{a['read_keys']:.0f}",
                f"{a.get('decode_ms_per_step', float('nan')):.1f} ({a.get('batch', '-')})",
                f"{a.get('index_build_ms', float('nan')):.0f}"]
            lines.append("| " + " | ".join(row) + " |")
    plans = [(m, L, s[m]["by_length"][str(L)]) for L in result["lengths"] for m in result["methods"]
             if "plan" in s[m]["by_length"].get(str(L), {})]
    if plans:
        lines += ["", "Plans run (the optimizer's choice for `dipr:BETA`) and calibrated margins:", ""]
        lines += [plan_line(f"{m} at {L}", a) for m, L, a in plans]
    lines += ["", "Over all lengths:", "",
              "| method | accuracy % | attended % | attended keys | read % | read keys | truncated layer-steps |",
              "|---|---|---|---|---|---|---|"]
    for m in result["methods"]:
        a = s[m]
        if "accuracy" not in a:
            continue
        lines.append(f"| {m} | {_pct(a['accuracy'])} | {_pct(a['attended_fraction'])} | "
                     f"{a['attended_keys']:.0f} | {_pct(a['read_fraction'])} | {a['read_keys']:.0f} | "
                     f"{a['truncated']} |")
    if result["incomplete"]:
        left: dict = {}
        for x in result["incomplete"]:
            left[x["length"]] = left.get(x["length"], 0) + x["samples"]
        lines += ["", "INCOMPLETE (time limit): samples not run per length: "
                  + ", ".join(f"{L}: {n}" for L, n in left.items())]
    if result.get("resumed"):  # a resumed run: the earlier runs' commands first
        lines += ["", f"Resumed (`--resume`) from {len(result['resumed'])} earlier run(s):", ""]
        lines += [_run_line(x) for x in result["resumed"]]
    if result.get("sources"):  # a merge: each run's command
        lines += ["", f"Merged (`alaya eval-merge`) from {len(result['sources'])} runs:", ""]
        lines += [_run_line(x) for x in result["sources"]]
        lines.append("")
    else:
        lines += ["", f"Command: `{result['command']}`", ""]
    return "\n".join(lines)


def plot(result: dict, path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = [L for L in result["lengths"]
               if any(str(L) in result["summary"][m]["by_length"] for m in result["methods"])]
    fig, axes = plt.subplots(1, len(lengths) + 1, figsize=(4.2 * (len(lengths) + 1), 4), squeeze=False)
    colors = {"full": "k", "streaming": "tab:gray", "topk": "tab:orange", "quest": "tab:green",
              "dipr": "tab:blue", "dipr-flat": "tab:purple", "dipr-block": "tab:cyan",
              "full-sparse": "k"}
    panels = [(str(L), f"{L} tokens") for L in lengths] + [(None, "all lengths")]
    for ax, (key, title) in zip(axes[0], panels):
        for m in result["methods"]:
            a = result["summary"][m] if key is None else result["summary"][m]["by_length"].get(key)
            if not a or "accuracy" not in a:
                continue
            c = colors.get(m.split(":")[0], "tab:red")
            x, y, xa = 100 * a["read_fraction"], 100 * a["accuracy"], 100 * a["attended_fraction"]
            ax.plot([xa, x], [y, y], color=c, alpha=0.35, lw=1)
            ax.scatter([xa], [y], facecolors="none", edgecolors=c, s=22)
            ax.scatter([x], [y], color=c, s=30)
            ax.annotate(m, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_ylim(-3, 103)
        ax.set_xlabel("keys read, % of context (filled; index rows included)\n"
                      "keys attended (hollow)", fontsize=8)
        ax.set_ylabel("accuracy %")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    import textwrap

    fig.suptitle(textwrap.fill(f"{result['label'] or 'alaya eval'}: {result['model']} on "
                               f"{result['device']}", 160), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _atomic(path: str, write):
    """write(tmp_path) then rename over path: a reader never sees a half-written file, and an
    interrupted write leaves the previous one."""
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{os.getpid()}{ext}"  # the extension kept: it names the plot's format
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_outputs(result: dict, out_dir: str, name: str):
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, name)

    def text(content):
        def write(tmp):
            with open(tmp, "w") as f:
                f.write(content)
        return write

    _atomic(base + ".json", text(json.dumps(result, indent=1, default=float)))
    _atomic(base + ".md", text(markdown(result)))
    _atomic(base + ".png", lambda tmp: plot(result, tmp))


#: What results must share to be merged: the same samples (model and tokenizer, seed, count,
#: tasks, answer budget) scored the same way.
_SAME = ("model", "seed", "samples_per_task", "tasks", "gen_budget")


def merge_results(results: Sequence[dict], *, label: str = "") -> dict:
    """One report from several runs of `run_eval` on the same samples (e.g. one device call
    per length, each within a time limit): their records side by side, accuracy summarized
    again over all of them, each (method, length)'s timing and plan from the run that made it.

    The runs must share _SAME (the samples are then the same: tasks.make_samples is
    deterministic in the tokenizer, length, count and seed); a (method, length) may come
    from one run only (two runs of it could differ by device or code). Raises ConfigError
    naming what differs."""
    if not results:
        raise ConfigError("nothing to merge")
    first = results[0]
    for i, r in enumerate(results[1:], 1):
        for key in _SAME:
            if r.get(key) != first.get(key):
                raise ConfigError(f"result {i} differs from result 0 in {key}: "
                                  f"{r.get(key)!r} vs {first.get(key)!r}")
    methods, lengths, records, timing, incomplete, owner = [], set(), [], {}, [], {}
    for i, r in enumerate(results):
        timing.update(_timing_of(r))
        cells = {(x["method"], x["length"]) for x in r["records"]}
        for cell in sorted(cells, key=str):
            if cell in owner:
                raise ConfigError(f"method {cell[0]!r} at length {cell[1]} is in results "
                                  f"{owner[cell]} and {i}: merge runs of different cells")
            owner[cell] = i
        methods += [m for m in r["methods"] if m not in methods]
        lengths.update(int(L) for L in r["lengths"])
        records += r["records"]
        incomplete += [dict(x, result=i) for x in r["incomplete"]]
    lengths = sorted(lengths)
    timing = {cell: tm for cell, tm in timing.items() if cell in owner}
    devices = list(dict.fromkeys(r["device"] for r in results))
    sources = [dict(_run_info(r), lengths=r["lengths"], methods=r["methods"]) for r in results]
    return dict(
        label=label or first["label"], date=max(r["date"] for r in results),
        command="; ".join(r["command"] for r in results), device=" + ".join(devices),
        backend=first["backend"], jax=", ".join(dict.fromkeys(r["jax"] for r in results)),
        python=first["python"], model=first["model"], dtype=first["dtype"], tasks=first["tasks"],
        lengths=lengths, methods=methods, samples_per_task=first["samples_per_task"],
        batch_size=first["batch_size"], batch_tokens=first.get("batch_tokens"),
        seed=first["seed"], gen_budget=first["gen_budget"],
        elapsed_s=round(sum(r["elapsed_s"] for r in results), 1), incomplete=incomplete,
        summary=summarize(records, timing, methods, first["tasks"], lengths), records=records,
        timing=_timing_list(timing), sources=sources)


def _run_info(result: dict) -> dict:
    """What a report lists of an earlier or merged run (`_run_line`)."""
    return {k: result[k] for k in ("command", "date", "device", "jax", "elapsed_s")}


def _timing_list(timing: dict) -> list[dict]:
    """{(method, length): timing} as a result stores it (`_timing_of` reads it back)."""
    return [dict(method=m, length=L, **tm) for (m, L), tm in timing.items()]


#: The keys every `alaya eval` result has.
_RESULT_KEYS = ("records", "summary", "methods", "lengths")


def check_result(result: dict, source: str = "the earlier run") -> dict:
    """result, or ConfigError if it lacks a key of an `alaya eval` result (source names it)."""
    missing = [k for k in _RESULT_KEYS if k not in result]
    if missing:
        raise ConfigError(f"{source} is not an `alaya eval` result (no {', '.join(missing)})")
    return result


def _timing_of(result: dict) -> dict:
    """{(method, length): timing} of a result, as run_eval accumulates it: its raw timing, or
    (results written before it was stored) rebuilt from the summary as one step and one
    batch at the reported means."""
    if "timing" in result:
        return {(t["method"], int(t["length"])):
                {k: v for k, v in t.items() if k not in ("method", "length")}
                for t in result["timing"]}
    timing = {}
    for m, row in result["summary"].items():
        for L, a in row.get("by_length", {}).items():
            if "decode_ms_per_step" not in a:
                continue
            tm = dict(loop_s=a["decode_ms_per_step"] / 1e3, steps=1, batches=1, prefill_s=0.0,
                      build_s=a["index_build_ms"] / 1e3, batch=a["batch"])
            if "plan" in a:
                tm["plan"] = a["plan"]
            if "delta_per_layer" in a:
                tm["deltas"] = [a["delta_per_layer"]]
            timing[(m, int(L))] = tm
    return timing


def check_resumable(result: dict, **want):
    """Raises ConfigError unless `result` (an earlier run) was made on the samples and batches
    of a run with these settings (`run_eval(resume=...)`): the same model, seed, samples per
    task, tasks, answer budget, batch size and token cap."""
    check_result(result)
    for key, value in want.items():
        if result.get(key) != value:
            raise ConfigError(f"cannot resume: the earlier run's {key} is {result.get(key)!r}, "
                              f"this run's {value!r}")
