"""Long-document QA with session reuse: the document is computed once and stored, then every
question runs in a new process that finds it, loads its pages and pays only for its own tokens.

    python examples/long_document_qa.py
    python examples/long_document_qa.py --question "May I sell copies of the program?"

The first run prefills the document (the GPL-3.0 text, about 7.6K tokens) with the model's
chat template around it and stores it under --sessions; later runs find it there. Each
question is a subprocess of this script (`--ask`), as a separate client would be.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
QUESTIONS = [
    "What must you do when you convey the object code of a covered work?",
    "May I charge a fee for conveying copies of the program?",
    "What happens to my rights if I violate this license?",
]
_MARK = "\x00QUESTION\x00"
SESSIONS = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                        "alaya_jax", "sessions")


def prompt_ids(tok, document: str, question: str) -> tuple[list[int], list[int]]:
    """(document part, question part) of the chat prompt, each tokenized on its own so the
    document part is the same token ids for every question (that is what gets reused)."""
    text = tok.apply_chat_template(
        [{"role": "user", "content": f"Read this document, then answer the question after it."
                                     f"\n\n{document}\n\n{_MARK}"}],
        add_generation_prompt=True, tokenize=False)
    head, tail = text.split(_MARK)
    return tok.encode(head), tok.encode(f"Question: {question}{tail}", add_bos=False)


def _setup(args):
    import jax

    # Compiled programs are cached on disk, so the question processes skip most compilation.
    jax.config.update("jax_compilation_cache_dir", os.path.join(args.sessions, ".jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    import alaya_jax as aj
    from alaya_jax.db import DB

    t = time.perf_counter()
    model, tok = aj.load_model(args.model)
    db = DB(model, args.sessions, tokenizer=tok)
    with open(args.document, encoding="utf-8") as f:
        document = f.read()
    return model, tok, db, document, time.perf_counter() - t


def ask(args) -> int:
    """One question, in its own process: reuse the stored document, then generate."""
    model, tok, db, document, t_load = _setup(args)
    doc, question = prompt_ids(tok, document, args.ask)
    ids = doc + question
    t0 = time.perf_counter()
    session, rest = db.create_session(ids)
    t_find = time.perf_counter() - t0
    print(f"[qa] Q: {args.ask}\n[qa] reused {session.reused} of {len(ids)} prompt tokens "
          f"(found and loaded in {t_find:.2f}s); prefilling {len(rest)}", flush=True)
    print("[qa] A: ", end="", flush=True)
    out = session.generate(rest, args.max_new_tokens, stream=True)
    n = len(out.tokens[0])
    print(f"[qa] time to first token {t_find + out.prefill_s:.2f}s (model load {t_load:.1f}s "
          f"before it); {n} tokens in {out.decode_s:.2f}s", flush=True)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--document", default=os.path.join(HERE, "data", "gpl-3.0.txt"),
                    help="text file to ask about")
    ap.add_argument("--question", action="append", default=None,
                    help="a question (repeatable; default: three about the GPL)")
    ap.add_argument("--sessions", default=SESSIONS,
                    help="directory of stored sessions")
    ap.add_argument("--name", default="gpl-3.0", help="stored session name of the document")
    ap.add_argument("--model", default=None, help="model path (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="answer length limit")
    ap.add_argument("--restore", action="store_true", help="recompute and store the document")
    ap.add_argument("--ask", default=None, help=argparse.SUPPRESS)  # a question's process
    args = ap.parse_args(argv)
    os.makedirs(args.sessions, exist_ok=True)
    if args.ask is not None:
        return ask(args)

    import jax

    print(f"[qa] python {platform.python_version()}, jax {jax.__version__}, devices "
          f"{[str(d) for d in jax.devices()]}", flush=True)
    model, tok, db, document, t_load = _setup(args)
    print(f"[qa] loaded {model.cfg.name} in {t_load:.1f}s; sessions in {args.sessions}",
          flush=True)
    doc, _ = prompt_ids(tok, document, "")
    if args.restore and args.name in db.sessions():
        db.delete(args.name)
    if args.name not in db.sessions() or db.info(args.name)["length"] != len(doc):
        session, rest = db.create_session(doc)
        print(f"[qa] computing the document once: prefill of {len(rest)} tokens", flush=True)
        t = time.perf_counter()
        session.prefill(rest).block_until_ready()
        t_prefill = time.perf_counter() - t
        t = time.perf_counter()
        db.store(session, args.name)
        info = db.info(args.name)
        print(f"[qa] stored {args.name!r}: {len(doc)} tokens, {info['nbytes'] / 1e6:.0f} MB of "
              f"K/V (prefill {t_prefill:.1f}s, store {time.perf_counter() - t:.1f}s)", flush=True)
    else:
        print(f"[qa] found stored session {args.name!r} ({len(doc)} tokens)", flush=True)

    base = [sys.executable, os.path.abspath(__file__), "--document", args.document, "--sessions",
            args.sessions, "--name", args.name, "--max-new-tokens", str(args.max_new_tokens)]
    base += ["--model", args.model] if args.model else []
    for q in args.question or QUESTIONS:
        rc = subprocess.run(base + ["--ask", q]).returncode
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
