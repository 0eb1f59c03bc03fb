"""`alaya eval`, `alaya eval-merge` and `alaya eval-ppl`: the evaluation harness on the command line.

    alaya eval --tasks all --lengths 1024,2048 --methods full,streaming,topk:64,quest:8,dipr:8 \\
        --samples 4 --out benchmarks/results --name eval_cpu_small
    alaya eval-ppl --methods full,dipr-flat:8,dipr:8,topk:256 --prefill 6144 --score 1024
    alaya eval-merge out/eval_1k2k.json out/eval_4k.json out/eval_8k.json --out out --name eval

`add_eval_parser(subparsers)` registers the three subcommands on the main `alaya` parser.
"""

from __future__ import annotations

import argparse
import sys

from alaya_jax.cli import _load  # one model loader (and its log line) for every subcommand

DEFAULT_METHODS = "full,streaming,topk:64,topk:256,quest:8,dipr:4,dipr:8,dipr-flat:8"
DEFAULT_PPL_METHODS = "full,dipr-flat:4,dipr-flat:8,dipr:4,dipr:8,dipr:12,topk:64,topk:256,quest:8"


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _compile_cache(args):
    if args.compile_cache:
        import jax

        jax.config.update("jax_compilation_cache_dir", args.compile_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def cmd_eval(args) -> int:
    from alaya_jax.eval import harness, tasks

    task_names = list(tasks.TASKS) if args.tasks == "all" else _csv(args.tasks)
    methods = _csv(args.methods)
    for m in methods:  # fail on a bad spec before loading the model
        harness.parse_method(m)
    resume = _read_result(args.resume) if args.resume else None
    _compile_cache(args)
    model, tok = _load(args)
    res = harness.run_eval(model, tok, task_names, [int(x) for x in _csv(args.lengths)], methods,
                           args.samples, args.out, name=args.name, batch_size=args.batch,
                           batch_tokens=args.batch_tokens, parallel_compile=args.parallel_compile,
                           seed=args.seed, max_minutes=args.max_minutes, label=args.label,
                           command="alaya " + " ".join(sys.argv[1:]), resume=resume)
    print(harness.markdown(res))
    return 0


def _read_result(path: str) -> dict:
    import json

    from alaya_jax.errors import ConfigError
    from alaya_jax.eval import harness

    try:
        with open(path) as f:
            res = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read the eval result {path}: {e}") from e
    return harness.check_result(res, path)


def cmd_eval_ppl(args) -> int:
    from alaya_jax.eval import harness, perplexity

    methods = _csv(args.methods)
    for m in methods:
        harness.parse_method(m)
    _compile_cache(args)
    model, tok = _load(args)
    res = perplexity.run_perplexity(model, tok, methods, text_path=args.text,
                                    prefill_tokens=args.prefill, score_tokens=args.score,
                                    out_dir=args.out, name=args.name, label=args.label,
                                    parallel=args.parallel_compile,
                                    command="alaya " + " ".join(sys.argv[1:]))
    print(perplexity.markdown(res))
    return 0


def cmd_eval_merge(args) -> int:
    from alaya_jax.eval import harness

    res = harness.merge_results([_read_result(p) for p in args.results], label=args.label)
    if args.out:
        harness.write_outputs(res, args.out, args.name)
    print(harness.markdown(res))
    return 0


def add_eval_parser(subparsers) -> None:
    """Registers `eval`, `eval-merge` and `eval-ppl` on an argparse subparsers object."""
    from alaya_jax.eval.harness import METHOD_HELP
    from alaya_jax.eval.perplexity import DEFAULT_TEXT
    from alaya_jax.eval.tasks import TASKS

    def common(sp, name):
        sp.add_argument("--model", default=None,
                        help="a .gguf file or Hugging Face directory (default: SmolLM2-135M-Instruct)")
        sp.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="parameter dtype (default: bfloat16 on GPU, float32 on CPU)")
        sp.add_argument("--out", default=None, help="write NAME.md, NAME.json (and NAME.png) here")
        sp.add_argument("--name", default=name, help=f"output file stem (default: {name})")
        sp.add_argument("--label", default="", help="a line printed at the top of the report")
        sp.add_argument("--compile-cache", default=None,
                        help="a directory for jax's persistent compilation cache")

    e = subparsers.add_parser("eval", help="RULER-style long-context tasks: accuracy vs keys read",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("--tasks", default="all", help=f"'all' or a comma list of {', '.join(TASKS)}")
    e.add_argument("--lengths", default="1024,2048,4096,8192",
                   help="comma list of context lengths in tokens (prompt + answer)")
    e.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma list: {METHOD_HELP}")
    e.add_argument("--samples", type=int, default=4, help="samples per task and length")
    e.add_argument("--batch", type=int, default=25, help="sequences per batch (one shape per length)")
    e.add_argument("--batch-tokens", type=int, default=None,
                   help="cap batch x length (smaller batches at long lengths), e.g. 204800")
    e.add_argument("--parallel-compile", action="store_true",
                   help="compile all methods of a length at once on threads (one cache copy each)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--max-minutes", type=float, default=None,
                   help="start no batch expected to end past this (a length's first batch, which compiles, "
                        "as long as the longest first batch so far); the report lists what did not run")
    e.add_argument("--resume", default=None, metavar="RESULT.json",
                   help="an earlier run's result on the same samples and batches: keep its "
                        "records, run only what it did not (e.g. after --max-minutes)")
    common(e, "eval")
    e.set_defaults(fn=cmd_eval)

    g = subparsers.add_parser("eval-merge", help="one report from several `alaya eval` runs "
                              "on the same samples (e.g. one run per length)")
    g.add_argument("results", nargs="+", help="the runs' NAME.json files")
    g.add_argument("--out", default=None, help="write NAME.md, NAME.json and NAME.png here")
    g.add_argument("--name", default="eval", help="output file stem")
    g.add_argument("--label", default="", help="the report's title (default: the first run's)")
    g.set_defaults(fn=cmd_eval_merge)

    p = subparsers.add_parser("eval-ppl", help="teacher-forced perplexity of decode methods",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--methods", default=DEFAULT_PPL_METHODS,
                   help=f"comma list, the first is the reference: {METHOD_HELP}")
    p.add_argument("--text", default=DEFAULT_TEXT, help="a long UTF-8 text file")
    p.add_argument("--prefill", type=int, default=6144, help="tokens prefilled with full attention")
    p.add_argument("--score", type=int, default=1024, help="tokens scored after them, one step each")
    p.add_argument("--parallel-compile", action="store_true",
                   help="run the methods at once on threads (compiles overlap)")
    common(p, "eval_ppl")
    p.set_defaults(fn=cmd_eval_ppl)


def main(argv=None) -> int:
    """Standalone entry (`python -m alaya_jax.eval eval ...`) until `alaya` registers these."""
    p = argparse.ArgumentParser(prog="alaya", description="alaya_jax evaluation")
    sub = p.add_subparsers(dest="cmd", required=True)
    add_eval_parser(sub)
    args = p.parse_args(argv)
    from alaya_jax.errors import AlayaError

    try:
        return args.fn(args)
    except AlayaError as e:
        print(f"alaya {args.cmd}: {e}", file=sys.stderr)
        return 1
