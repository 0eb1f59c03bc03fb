#!/usr/bin/env bash
# The full long-context evaluation of issue 7 on one GPU, in one command (< 9 minutes):
# teacher-forced perplexity on examples/data/gpl-3.0.txt, then the RULER-style tasks
# (5 tasks x 1K/2K/4K/8K x 100 samples) for every method, written into $OUT.
#
#   PYTHONPATH=$PWD bash benchmarks/run_eval_gpu.sh --model /path/to/SmolLM2-135M-Instruct.Q4_1.gguf
#
# Knobs (environment): LENGTHS, SAMPLES, BATCH, BATCH_TOKENS, METHODS, PPL_METHODS, BUDGET_S (the whole
# script's wall-clock limit, default 520 s), OUT (default benchmarks/results), PARALLEL_COMPILE
# (1: compile every method of a length at once on threads, one cache copy each; 0: one by one).
# (default 0: on 2026-11-26 compiling six methods at 8K on threads crashed with a segmentation fault on an H200)
# The task run starts no new batch once the budget is nearly spent and writes its report after
# every batch, so it always ends with results; the report lists any batches not run.
# Compiles go to a persistent cache (CC_DIR): a second run on the same machine compiles nothing.
# RESUME=1 with an earlier $OUT/eval_gpu.json (same samples and batches) goes on where it stopped.
set -euo pipefail

MODEL=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --model) MODEL="$2"; shift 2 ;;
    *) echo "usage: $0 --model PATH.gguf" >&2; exit 2 ;;
  esac
done
[[ -n "$MODEL" ]] || { echo "usage: $0 --model PATH.gguf" >&2; exit 2; }

OUT="${OUT:-benchmarks/results}"
LENGTHS="${LENGTHS:-1024,2048,4096,8192}"
SAMPLES="${SAMPLES:-100}"
BATCH="${BATCH:-50}"
BATCH_TOKENS="${BATCH_TOKENS:-204800}"  # 50 sequences up to 4K, 25 at 8K
# dipr:8 = the index the optimizer picks for the shape (flat up to 8K with the H200 cost table);
# dipr-cluster:8 = the cluster index with its margin calibrated on the prompt's last queries;
# dipr-cluster:4:read:...: the accuracy recipe of attention.py (attends every key read)
METHODS="${METHODS:-full,streaming,topk:64,topk:256,quest:8,dipr:8,dipr-cluster:8,dipr-cluster:4:read:remainder:var=0.5:probe=8}"
PPL_METHODS="${PPL_METHODS:-full,dipr:8,dipr-cluster:8,dipr-cluster:4:read:remainder:var=0.5:probe=8,topk:64,topk:512}"
BUDGET_S="${BUDGET_S:-520}"
CC_DIR="${CC_DIR:-/tmp/alaya_jax_compile_cache}"
PAR=$([[ "${PARALLEL_COMPILE:-0}" == 1 ]] && echo --parallel-compile || true)
RES=$([[ "${RESUME:-0}" == 1 && -f "${OUT:-benchmarks/results}/eval_gpu.json" ]] \
      && echo "--resume ${OUT:-benchmarks/results}/eval_gpu.json" || true)
export PYTHONPATH="${PYTHONPATH:-$PWD}"
mkdir -p "$OUT"
START=$SECONDS
EVAL=(python -c 'import sys; from alaya_jax.eval.cli import main; sys.exit(main())')

python -c 'import jax; print("[run_eval_gpu] jax", jax.__version__, jax.devices())'

# 1) perplexity: 6144 tokens prefilled, the next 1024 scored one decode step each (~2-3 min)
timeout -s INT $((BUDGET_S - 60)) "${EVAL[@]}" eval-ppl --model "$MODEL" --methods "$PPL_METHODS" \
  --prefill 6144 --score 1024 --out "$OUT" --name eval_ppl_gpu --compile-cache "$CC_DIR" $PAR \
  --label "GPU perplexity run (run_eval_gpu.sh)" || echo "[run_eval_gpu] eval-ppl failed or timed out" >&2

# 2) the tasks, with what is left of the budget (a batch at 8K with every method takes ~30 s)
LEFT=$((BUDGET_S - (SECONDS - START)))
MAX_MIN=$(python -c "print(max(0.5, ($LEFT - 75) / 60))")
echo "[run_eval_gpu] $((SECONDS - START))s used; tasks get --max-minutes $MAX_MIN" >&2
timeout -s INT $((LEFT > 10 ? LEFT : 10)) "${EVAL[@]}" eval --model "$MODEL" --tasks all \
  --lengths "$LENGTHS" --samples "$SAMPLES" --batch "$BATCH" --batch-tokens "$BATCH_TOKENS" --methods "$METHODS" $PAR $RES \
  --max-minutes "$MAX_MIN" --out "$OUT" --name eval_gpu --compile-cache "$CC_DIR" \
  --label "GPU evaluation (run_eval_gpu.sh): $SAMPLES samples per task and length" \
  || echo "[run_eval_gpu] eval failed or timed out: $OUT/eval_gpu.* hold the batches done" >&2
echo "[run_eval_gpu] done in $((SECONDS - START))s; results in $OUT/eval_gpu.{md,json,png} and $OUT/eval_ppl_gpu.{md,json}" >&2
