"""The log-sum-exp merge of the attention kernel's splits, in three forms side by side (GPU).

    PYTHONUNBUFFERED=1 python benchmarks/merge_splits.py --out benchmarks/results

The gathered-attention kernel splits each kv head's kept list over S programs, each writing a
normalized partial (o [G, D], lse [G]); XLA merges them. Forms, on the same random partials
(8 kv heads, G 4, D 128: Llama-3-8B, batch 1):
  library              `gathered_attention.merge_splits` as it is (no remainder): one
                       variadic reduction carrying the normalized (lse, o), one exponential,
                       a log and a division a step, nothing after it;
  normalized_epilogue  the previous form: the same with two exponentials a step, and the
                       epilogue of `merge_remainder` (empty rows, division) after it;
  normalized           the previous combiner without the epilogue;
  unnormalized         one variadic reduction carrying (max, mass, weighted values): two
                       exponentials a step, no log nor division, one division after;
  two_pass             the max over the splits, then the weights, mass and weighted sum.
GPU time per merge from the profiler (one trace of REPS merges in one jit), and the kernels
a merge launches. Each form is checked against the library's result first.
Writes merge_splits.json and merge_splits.png.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from alaya_jax.pallas import gathered_attention as ga  # noqa: E402
from alaya_jax.pallas._mgpu import EMPTY_LSE  # noqa: E402
from bench_io import run_meta, write_json  # noqa: E402
from gpu_trace import kernel_events  # noqa: E402

B, K, G, D = 1, 8, 4, 128
REPS = 8


def _two_exp_pair(a, b):  # the previous combiner: two exponentials, a log and a division
  (la, oa), (lb, ob) = a, b
  m = jnp.maximum(la, lb)
  wa, wb = jnp.exp(la - m), jnp.exp(lb - m)
  w = wa + wb
  return m + jnp.log(w), (oa * wa + ob * wb) / w


def _reduce(o_part, lse_part, pair):
  lse_b = jnp.broadcast_to(lse_part[..., None], o_part.shape)
  lse, o = lax.reduce((lse_b, o_part), (jnp.float32(EMPTY_LSE), jnp.float32(0.0)), pair, (2,))
  b, k, _, g, d = o_part.shape
  return o.reshape(b, k * g, d), lse[..., 0].reshape(b, k * g)


def normalized_epilogue(o_part, lse_part):
  o, lse = _reduce(o_part, lse_part, _two_exp_pair)
  l = jnp.where(lse <= EMPTY_LSE / 2, 0.0, 1.0)
  return ga.merge_remainder(lse, l, o, None)


def normalized(o_part, lse_part):
  return _reduce(o_part, lse_part, _two_exp_pair)


def unnormalized(o_part, lse_part):
  def triple(a, b):
    (ma, la, xa), (mb, lb, xb) = a, b
    m = jnp.maximum(ma, mb)
    wa, wb = jnp.exp(ma - m), jnp.exp(mb - m)
    return m, la * wa + lb * wb, xa * wa + xb * wb
  init = (jnp.float32(EMPTY_LSE), jnp.float32(0.0), jnp.float32(0.0))
  m, l, x = lax.reduce((jnp.broadcast_to(lse_part[..., None], o_part.shape),
                        jnp.ones(o_part.shape, jnp.float32), o_part), init, triple, (2,))
  b, k, _, g, d = o_part.shape
  l = l[..., 0]
  return (x / l[..., None]).reshape(b, k * g, d), (m[..., 0] + jnp.log(l)).reshape(b, k * g)


def two_pass(o_part, lse_part):
  m = lse_part.max(axis=2, keepdims=True)
  w = jnp.exp(lse_part - m)
  l = w.sum(axis=2)
  o = (o_part * w[..., None]).sum(axis=2) / l[..., None]
  b, k, _, g, d = o_part.shape
  return o.reshape(b, k * g, d), (m[:, :, 0] + jnp.log(l)).reshape(b, k * g)


FORMS = {"library": lambda o, l: ga.merge_splits(o, l, None),
         "normalized_epilogue": normalized_epilogue, "normalized": normalized,
         "unnormalized": unnormalized, "two_pass": two_pass}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--splits", type=int, nargs="*", default=[4, 8, 16, 33, 64])
  ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  args = ap.parse_args()
  if jax.default_backend() != "gpu":
    raise SystemExit("merge_splits.py times GPU kernels: it needs an NVIDIA GPU")
  rows = []
  for s in args.splits:
    o = jax.random.normal(jax.random.key(s), (REPS, B, K, s, G, D), jnp.float32)
    lse = 4.0 * jax.random.normal(jax.random.key(s + 1), (REPS, B, K, s, G), jnp.float32)
    want = jax.jit(FORMS["library"])(o[0], lse[0])
    for name, form in FORMS.items():
      got = jax.jit(form)(o[0], lse[0])
      err = max(float(jnp.abs(a - b).max()) for a, b in zip(got, want))
      if err > 1e-4:
        raise SystemExit(f"{name} differs from the library's merge by {err} at S={s}")

      @jax.jit
      def f(o, lse, form=form):  # every output returned: no consumer kernels timed
        return [form(o[r], lse[r]) for r in range(REPS)]

      jax.block_until_ready(f(o, lse))
      ev = [(n, t) for n, t in kernel_events(f, o, lse) if "emcpy" not in n]
      per = {}
      for n, t in ev:
        per[n[:50]] = round(per.get(n[:50], 0.0) + t / REPS * 1e6, 2)
      r = dict(splits=s, form=name, us=round(sum(t for _, t in ev) / REPS * 1e6, 2),
               kernels=round(len(ev) / REPS, 2), max_abs_diff_vs_library=err, kernels_us=per)
      rows.append(r)
      print(json.dumps(r), flush=True)
  meta = run_meta(shape=dict(B=B, K=K, G=G, D=D),
                  note="GPU time per merge (sum of its kernels) from the profiler, REPS=8 in a jit")
  write_json(args.out, "merge_splits", meta, rows)
  plot(rows, meta, os.path.join(args.out, "merge_splits.png"))


def plot(rows, meta, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for name in FORMS:
    rs = [r for r in rows if r["form"] == name]
    ax.plot([r["splits"] for r in rs], [r["us"] for r in rs], marker="o", label=name)
  ax.set_xscale("log", base=2)
  ax.set_xlabel("splits per kv head")
  ax.set_ylabel("GPU us per merge")
  ax.set_title(f"merge of the splits, 8 kv heads x G 4 x D 128 ({meta['device']})", fontsize=9)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)


if __name__ == "__main__":
  main()
