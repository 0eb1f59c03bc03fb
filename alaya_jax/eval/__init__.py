"""Long-context evaluation: RULER-style tasks, the method comparison harness, perplexity.

    alaya eval --tasks passkey,multikey --lengths 1024,2048 --methods full,topk:64,dipr:8 --samples 4
    alaya eval-ppl --methods full,dipr-flat:8,dipr:8,topk:256

`tasks` makes the samples and scores answers; `harness.run_eval` runs decode methods on them
and writes a markdown table, JSON and a plot; `perplexity.run_perplexity` compares methods
by teacher-forced NLL on a long natural text.
"""

from alaya_jax.eval.harness import Method, MethodSpecError, parse_method, run_eval
from alaya_jax.eval.perplexity import run_perplexity
from alaya_jax.eval.tasks import TASKS, Sample, make_sample, make_samples, score
