"""The `alaya` command line: generate text, describe a model.

    alaya generate --prompt "Why is the sky blue?"
    alaya generate --prompt-file examples/data/gpl-3.0.txt --question "What is copyleft?"
    alaya info [--model PATH]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def _load(args):
    import alaya_jax as aj

    t = time.perf_counter()
    model, tok = aj.load_model(args.model, dtype=args.dtype)
    print(f"[alaya] loaded {model.cfg.name} ({model.cfg.param_count() / 1e6:.1f}M params, "
          f"{np.dtype(model.dtype).name}) in {time.perf_counter() - t:.1f}s", file=sys.stderr)
    return model, tok


def cmd_generate(args) -> int:
    import alaya_jax as aj

    if (args.prompt is None) == (args.prompt_file is None):
        print("alaya generate: give exactly one of --prompt or --prompt-file", file=sys.stderr)
        return 2
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            print(f"alaya generate: cannot read prompt file {args.prompt_file!r}: {e.strerror}",
                  file=sys.stderr)
            return 2
    else:
        text = args.prompt
    if args.question:
        text = f"{text}\n\n{args.question}"
    method = parse_method(args.method)
    model, tok = _load(args)
    prompt = [{"role": "user", "content": text}] if args.chat else text
    try:
        res = aj.generate(model, tok, prompt, args.max_new_tokens, temperature=args.temperature,
                          top_p=args.top_p, seed=args.seed, stream=True, attention=method)
    except aj.AlayaError as e:
        print(f"alaya generate: {e}", file=sys.stderr)
        return 1
    n = len(res.tokens[0])
    print(f"[alaya] prompt {res.prompt_lengths[0]} tokens: prefill {res.prefill_s:.2f}s "
          f"({res.prompt_lengths[0] / max(res.prefill_s, 1e-9):.0f} tok/s, compile included); "
          f"{n} new tokens in {res.decode_s:.2f}s ({args.method})", file=sys.stderr)
    if res.attention_stats:
        st = res.attention_stats
        plan = f" ({st['plan']}: {st['plan_reason']})" if st.get("plan") else ""
        print(f"[alaya] {args.method}{plan}: attended {st['attended_fraction']:.1%} of the keys per "
              f"head, read {st['read_fraction']:.1%} (index rows included); capacity truncations: "
              f"{st['truncated_layer_steps']}", file=sys.stderr)
    return 0


METHOD_HELP = ("decode attention: full | dipr[:BETA] (the query optimizer picks the index; BETA "
               "defaults to 8) | dipr-cluster[:BETA] | dipr-flat[:BETA] | dipr-block[:BETA], with "
               "`alaya eval`'s dipr options after more colons (e.g. dipr-cluster:8:onepass) | "
               "topk:K | quest:PAGES | streaming[:WINDOW]")


def parse_method(spec: str):
    """'full', 'dipr:8', 'dipr-cluster:8:per=layer', 'dipr-flat:8', 'topk:64', 'quest:8',
    'streaming:256' -> a method (None for full; 'dipr' lets the optimizer choose the index).
    The grammar of `alaya eval`'s methods (`eval.harness.parse_method`), plus two shorthands:
    a dipr method without BETA (8) and streaming with a window alone (sink 4)."""
    import alaya_jax as aj
    from alaya_jax.eval.harness import MethodSpecError
    from alaya_jax.eval.harness import parse_method as parse_spec

    name, _, arg = spec.partition(":")
    if name == "full" and not arg:
        return None
    if name in ("dipr", "dipr-cluster", "dipr-flat", "dipr-block") and not arg:
        spec = f"{name}:8"
    if name == "streaming" and arg and ":" not in arg:
        try:
            return aj.Streaming(window=int(arg))
        except ValueError:
            pass
    try:
        return parse_spec(spec).attention
    except MethodSpecError:
        raise SystemExit(f"alaya: unknown --method {spec!r}; expected {METHOD_HELP}") from None


def cmd_info(args) -> int:
    import jax

    model, _ = _load(args)
    cfg = model.cfg
    itemsize = np.dtype(model.dtype).itemsize
    kv_tok = cfg.kv_bytes_per_token(model.dtype)
    rows = [
        ("name", cfg.name),
        ("architecture", f"llama: {cfg.n_layers} layers, width {cfg.dim}, ffn {cfg.ffn_dim}"),
        ("attention", f"{cfg.n_heads} q heads, {cfg.n_kv_heads} kv heads (group {cfg.group}), "
                      f"head dim {cfg.head_dim}"),
        ("rope", f"theta {cfg.rope_theta:g}, scaling {cfg.rope_scaling}"),
        ("vocab", f"{cfg.vocab_size} ({'tied' if cfg.tie_embeddings else 'separate'} output embedding)"),
        ("parameters", f"{cfg.param_count():,}"),
        ("context length", f"{cfg.max_seq_len:,} tokens"),
        ("weights memory", f"{cfg.param_count() * itemsize / 2**20:.1f} MiB ({np.dtype(model.dtype).name})"),
        ("KV cache", f"{kv_tok / 1024:.1f} KiB/token; {kv_tok * cfg.max_seq_len / 2**20:.1f} MiB at "
                     f"the full context"),
        ("device", f"{jax.devices()[0]}"),
    ]
    for k, v in rows:
        print(f"{k:>16}: {v}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alaya", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    def model_args(sp):
        sp.add_argument("--model", default=None,
                        help="a .gguf file or Hugging Face directory (default: SmolLM2-135M-Instruct)")
        sp.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="parameter dtype (default: bfloat16 on GPU, float32 on CPU)")

    g = sub.add_parser("generate", help="stream a continuation of a prompt")
    g.add_argument("--prompt", help="the prompt text")
    g.add_argument("--prompt-file", help="read the prompt from this file")
    g.add_argument("--question", help="appended to the prompt after a blank line")
    g.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                   help="wrap the prompt as a user message with the chat template (default: on)")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--method", default="full", help=METHOD_HELP)
    model_args(g)
    g.set_defaults(fn=cmd_generate)

    i = sub.add_parser("info", help="print the model's architecture, size and memory use")
    model_args(i)
    i.set_defaults(fn=cmd_info)

    from alaya_jax.eval.cli import add_eval_parser  # `alaya eval` and `alaya eval-ppl`

    add_eval_parser(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except Exception as e:  # our own errors read well; show them without a traceback
        from alaya_jax.errors import AlayaError

        if isinstance(e, AlayaError):
            print(f"alaya {args.cmd}: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
