"""Time to first token with a stored session reused vs computed from scratch; store/load GB/s.

    python benchmarks/session_reuse.py                          # 2K, 4K, 8K tokens, default model
    python benchmarks/session_reuse.py --lengths 2048 --repeats 1

For each length N the prompt is a document of N - q tokens (examples/data/gpl-3.0.txt,
repeated as needed) followed by a q-token question. From scratch: the library's chunked
prefill of all N tokens into a fresh cache. Reuse: `db.create_session(prompt)` finds the
stored document, and `session.prefill(rest)` runs only the question (the pages are gathered
into a dense cache first: that copy is included). Reuse from disk: a new `DB` on the same
directory, so the pages load lazily inside `create_session`. Time to first token stops at the
greedy first token on the host. Warm-up runs (compilation) are excluded; medians of
`--repeats`. Correctness: the reused and from-scratch logits of the last prompt token agree.
Writes JSON and a PNG under benchmarks/results/.
"""

from __future__ import annotations

import os
import sys

# Python puts this script's folder first on sys.path: keep files there (e.g. a scratch
# `_bisect.py`) from shadowing standard modules imported below.
sys.path[:] = [p for p in sys.path
               if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse
import datetime
import json
import platform
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import alaya_jax as aj
from alaya_jax.db import DB

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCUMENT = os.path.join(REPO, "examples", "data", "gpl-3.0.txt")
QUESTION = ("\n\nQuestion: according to this license, what must you do when you convey the "
            "object code of a covered work, and may you charge a fee for it? Answer briefly.")


def _median_time(fn, repeats: int, warmup=None) -> tuple[float, object]:
    (warmup or fn)()  # compilation
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times)), out


def _random_model(dtype):
    from flax import nnx

    from alaya_jax.model.load import default_stack_layers

    cfg = aj.LlamaConfig(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3,
                         head_dim=64, ffn_dim=1536, rope_theta=100000.0, max_seq_len=8192,
                         name="SmolLM2-135M-shaped (random weights)")
    dtype = dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    return aj.Llama(cfg, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(0),
                    stack_layers=default_stack_layers())


def _tokens(tok, n_doc: int, n_question: int) -> tuple[list[int], list[int]]:
    if tok is None:  # random weights: random ids
        ids = np.random.default_rng(0).integers(0, 49152, n_doc + n_question).tolist()
        return ids[:n_doc], ids[n_doc:]
    text = open(DOCUMENT, encoding="utf-8").read()
    base = tok.encode(text)
    doc = (base * (n_doc // len(base) + 1))[:n_doc]
    question = tok.encode(QUESTION)
    question = (question * (n_question // len(question) + 1))[:n_question]
    return doc, question


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model path (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--dtype", default=None, help="parameter dtype (default: the loader's)")
    ap.add_argument("--random-weights", action="store_true",
                    help="SmolLM2-135M shapes with random weights and random token ids (for "
                         "machines the model file cannot reach; timing does not depend on "
                         "the values)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192],
                    help="prompt lengths in tokens (document + question)")
    ap.add_argument("--question-tokens", type=int, default=32, help="q: tokens after the document")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    ap.add_argument("--page-size", type=int, default=64, help="tokens per page")
    ap.add_argument("--dir", default=None, help="session directory (default: a temporary one)")
    ap.add_argument("--out", default=None,
                    help="output path without extension (default: "
                         "benchmarks/results/session_reuse_<platform>)")
    args = ap.parse_args(argv)

    dev = jax.devices()[0]
    print(f"[bench] jax {jax.__version__} on {dev.platform}: {dev.device_kind}; python "
          f"{platform.python_version()}", flush=True)
    t = time.perf_counter()
    if args.random_weights:
        model, tok = _random_model(args.dtype), None
    else:
        model, tok = aj.load_model(args.model, dtype=args.dtype)
    cfg = model.cfg
    print(f"[bench] loaded {cfg.name} ({np.dtype(model.dtype).name}) in "
          f"{time.perf_counter() - t:.1f}s", flush=True)
    root = args.dir or tempfile.mkdtemp(prefix="alaya_session_reuse_")
    db = DB(model, root, page_size=args.page_size)

    rows = []
    for n in tqdm(args.lengths, desc="lengths", file=sys.stdout):
        if n > cfg.max_seq_len:
            print(f"[bench] skip {n}: beyond the model's context of {cfg.max_seq_len}")
            continue
        doc, question = _tokens(tok, n - args.question_tokens, args.question_tokens)
        prompt = doc + question
        name = f"doc{n}"

        def scratch(ids=prompt):
            cache = aj.KVCache.zeros(cfg, 1, -(-n // 256) * 256, model.dtype)
            logits, _ = aj.prefill(model, np.asarray([ids]), np.asarray([len(ids)]), cache)
            return int(np.argmax(np.asarray(logits[0]))), np.asarray(logits[0])

        # The warm-up compiles the same programs (512-token chunks, same cache) on fewer tokens.
        t_scratch, (tok_scratch, logits_scratch) = _median_time(
            scratch, args.repeats, warmup=lambda: scratch(prompt[:1024]))
        print(f"[bench] {n}: from scratch {t_scratch:.3f}s", flush=True)

        s, rest = db.create_session(doc)
        s.prefill(rest)
        kv_bytes = db.stats()["bytes_per_page"] * len(s.page_table)
        t_store, _ = _median_time(lambda: db.store(s, name), args.repeats)  # replaces name
        s.close()

        def reuse(database=db):
            sess, rest = database.create_session(prompt)
            assert sess.reused == len(doc), (sess.reused, len(doc))
            logits = sess.prefill(rest)
            first = int(np.argmax(np.asarray(logits)))
            sess.close()
            return first, np.asarray(logits)

        t_reuse, (tok_reuse, logits_reuse) = _median_time(reuse, args.repeats)

        def reuse_from_disk():
            return reuse(DB(model, root, page_size=args.page_size))

        t_disk, _ = _median_time(reuse_from_disk, args.repeats)
        loads = []
        for _ in range(args.repeats):
            fresh = DB(model, root, page_size=args.page_size)
            t = time.perf_counter()
            fresh.load(name).close()
            jax.block_until_ready(fresh.pool)
            loads.append(time.perf_counter() - t)
        t_load = float(np.median(loads))
        diff = float(np.max(np.abs(logits_reuse - logits_scratch)))
        row = dict(tokens=n, document_tokens=len(doc), question_tokens=len(question),
                   ttft_scratch_s=t_scratch, ttft_reuse_s=t_reuse, ttft_reuse_from_disk_s=t_disk,
                   speedup=t_scratch / t_reuse, speedup_from_disk=t_scratch / t_disk,
                   kv_bytes=kv_bytes, store_s=t_store, load_s=t_load,
                   store_gbps=kv_bytes / t_store / 1e9, load_gbps=kv_bytes / t_load / 1e9,
                   max_abs_logit_diff=diff, same_first_token=tok_reuse == tok_scratch)
        rows.append(row)
        print(f"[bench] {n}: reuse {t_reuse:.3f}s ({row['speedup']:.1f}x), from disk "
              f"{t_disk:.3f}s ({row['speedup_from_disk']:.1f}x); store {row['store_gbps']:.2f} "
              f"GB/s, load {row['load_gbps']:.2f} GB/s of {kv_bytes / 1e6:.0f} MB; logits "
              f"max |diff| {diff:.2e}, same first token: {row['same_first_token']}", flush=True)
        db.delete(name)
        _write(args, dev, model, rows)  # after every length: a long run keeps what it measured

    if args.dir is None:
        shutil.rmtree(root, ignore_errors=True)


def _write(args, dev, model, rows):
    cfg = model.cfg
    out = args.out or os.path.join(REPO, "benchmarks", "results", f"session_reuse_{dev.platform}")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    meta = dict(device=f"{dev.platform}: {dev.device_kind}", jax_version=jax.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                command="python " + " ".join([os.path.relpath(__file__, REPO)] + sys.argv[1:]),
                model=cfg.name, dtype=np.dtype(model.dtype).name, page_size=args.page_size,
                repeats=args.repeats, cpu_count=os.cpu_count(),
                load_average_1min=round(os.getloadavg()[0], 2),  # other work on the machine
                goal="reuse makes time to first token >= 10x shorter at 8K")
    with open(out + ".json", "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    _plot(rows, meta, out + ".png")
    print(f"[bench] wrote {out}.json and {out}.png")


def _plot(rows, meta, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        return
    n = np.arange(len(rows))
    labels = [f"{r['tokens'] // 1024}K" if r["tokens"] % 1024 == 0 else str(r["tokens"])
              for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    w = 0.27
    for i, (key, label) in enumerate([("ttft_scratch_s", "from scratch"),
                                      ("ttft_reuse_s", "reuse (pages in memory)"),
                                      ("ttft_reuse_from_disk_s", "reuse (new DB, lazy load)")]):
        vals = [r[key] for r in rows]
        bars = a.bar(n + (i - 1) * w, vals, w, label=label)
        if key != "ttft_scratch_s":
            sp = [r["ttft_scratch_s"] / v for r, v in zip(rows, vals)]
            a.bar_label(bars, [f"{x:.1f}x" if x < 10 else f"{x:.0f}x" for x in sp], fontsize=7)
    a.set_yscale("log")
    a.set_ylim(top=max(r["ttft_scratch_s"] for r in rows) * 20)  # room for the legend
    a.set_xticks(n, labels)
    a.set_xlabel("prompt tokens (document + question)")
    a.set_ylabel("time to first token (s)")
    a.set_title("Time to first token")
    a.legend(fontsize=8)
    b.bar(n - 0.2, [r["store_gbps"] for r in rows], 0.4, label="store")
    b.bar(n + 0.2, [r["load_gbps"] for r in rows], 0.4, label="load")
    b.set_xticks(n, labels)
    b.set_ylabel("GB/s of K/V pages")
    b.set_title("Orbax store / load throughput")
    b.legend(fontsize=8)
    fig.suptitle(f"session reuse, {meta['model']} {meta['dtype']}, {meta['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
