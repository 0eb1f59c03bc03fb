"""DIPR decode attention through the cluster index on the Mosaic GPU kernels.

The same query as `attention._sparse_path` for a `Plan.dipr(index="cluster")` (estimate, then
verify; DESIGN.md), with the two parts that grow with the context on the kernels:

  1. the exact region (sink + tail, a few hundred positional tokens) in jnp, as there;
  2. block margins  margin[j] = max over the group's heads of est_h[j] - (m'_h - beta - delta_h):
     the `score_select` margins kernel when nothing else needs the per-head estimates
     (probe = 0 and no remainder); otherwise est = q.centroid / sqrt(D) in XLA (the probe's
     per-head top blocks and the remainder need it) and the margin from it;
  3. the kept list: the `cap` best margins among those >= 0 (the probed blocks forced), as the
     jnp path's `select_blocks`; past a capacity of 16 found without a sort: an exact radix
     select of the cap-th largest margin (4 passes of 8-bit digit counts over the N block
     rows), then the order-free compaction of `score_select.compact`. Same set as
     `lax.top_k` (ties go to the lower block id there and here), so the same output and stats;
  4. the DIPR threshold (max over everything read) - beta: `gathered_attention.kept_max`, a
     keys-only pass of the attention kernel over the kept blocks (skipped with attend_read);
  5. `gathered_attention` over the kept blocks with that threshold (it also counts the keys
     each head attended, for the stats), the optional remainder estimate in jnp, and the
     log-sum-exp merge of the three parts.

Stats are those of the jnp path (keys attended and read, rows scored, groups kept and needed,
threshold, truncation). Plans it does not take (rank_std, rank_var, mass_eps, return_mask,
an index with a super level or a scalar variance summary, non-16-bit caches, shapes the
kernels reject) are named by `kernel_supports`; the dispatch in
`attention.sparse_attention` (Plan.impl) sends them to the jnp path under "auto" and raises
under "pallas".

Measured (benchmarks/results/sparse_decode_gpu.json, Llama-3-8B shapes, batch 1, inside the
32-layer jitted decode loop, H100): 12.50 ms/token at 4K against 7.39 for full attention, the
same attended/read fractions as the jnp path (0.027/0.129). At 4K a layer reads little (cap
11 blocks per kv head: ~2.9 MB of K+V, ~1 us at bandwidth), so the ~160 us per layer over full
attention is fixed cost: the small XLA ops around the kernels, 2-3 Mosaic launches and the
decode step's per-layer tail-fold loop (not yet profiled on the GPU). DIPR at 128K did not
fit the H100 (the cluster index holds keys and values in ~3 S slots per layer: ~54 GB over 32
layers beside 16 GB of weights and a 17 GB positional cache); it needs an H200 or a smaller
index.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax

from alaya_jax.dipr import MASK_VALUE, AttentionOut, merge_attention
from alaya_jax.errors import ConfigError, PlanError
from alaya_jax.index.cluster import (attend_masked, centroid_scores, gather_blocks, kept_mask,
                                     remainder_estimate, select_blocks)
from alaya_jax.pallas import _mgpu
from alaya_jax.pallas import gathered_attention as ga
from alaya_jax.pallas import score_select as ss

_SELECTS = ("auto", "radix", "top_k")
#: Up to this capacity `lax.top_k` is XLA's single fused top-k kernel on the GPU; past it XLA
#: sorts the rows, and the radix select's few reductions are the cheaper exact path.
_TOP_K_MAX = 16


@dataclasses.dataclass(frozen=True)
class SparseDecodeConfig:
    """select: how the capacity keeps the best margins: "radix" (exact radix select of the
    cap-th largest, then a compaction: no sort), "top_k" (`lax.top_k`, as the jnp path) or
    "auto" (top_k up to a capacity of 16, radix past it). Both give the same set.
    attention: the gathered-attention kernel's tuning."""

    select: str = "auto"
    attention: ga.GatheredAttentionConfig = ga.GatheredAttentionConfig()

    def __post_init__(self):
        if self.select not in _SELECTS:
            raise ConfigError(f"SparseDecodeConfig.select must be one of {_SELECTS}, "
                              f"got {self.select!r}")


def kernel_supports(q, store, plan) -> str | None:
    """None if this path answers the plan on these shapes, else the reason it does not."""
    if plan.kind != "dipr" or plan.index != "cluster":
        return f"plan {plan.describe()}: only dipr through the cluster index"
    idx = store.cluster
    if idx is None:
        return "the store has no cluster index"
    for name in ("rank_std", "rank_var", "mass_eps"):
        if getattr(plan, name):
            return f"plan option {name}={getattr(plan, name)} (jnp path only)"
    if plan.return_mask:
        return "plan option return_mask (jnp path only)"
    if getattr(idx, "super_id", None) is not None:
        return "an index with a super level (jnp path only)"
    if getattr(idx.config, "var_summary", "channel") != "channel":
        return f"var_summary={idx.config.var_summary!r} (jnp path only)"
    why = ga.kernel_supports(q, idx.keys)
    if why is None and plan.probe == 0 and not plan.remainder:
        why = ss.kernel_supports(q, idx.centroid)
    return why


def on_sm90() -> bool:
    """A Hopper GPU (the Mosaic GPU kernels use WGMMA and TMA)."""
    if not _mgpu.on_gpu():
        return False
    cc = getattr(jax.devices()[0], "compute_capability", "")
    try:
        return float(cc) >= 9.0
    except ValueError:
        return False


# ----------------------------------------------------------------------------- selection


def top_cap_mask(margin, cap: int):
    """margin [R, N] f32 -> (keep [R, N] bool, needed [R] int32): the `cap` largest margins
    among those >= 0 (ties to the lower index: the set `lax.top_k` picks), all of them if
    fewer pass; needed = how many pass.

    An exact radix select: non-negative floats order as their int32 bit patterns, so the
    cap-th largest is found digit by digit (7 + 3 x 8 bits). Each pass is two reductions
    (XLA fusions): the count of the prefix group at or above each digit value ([R, 256] from
    an [R, 256, N] compare: no sort, no scatter, no scan), then the digit and the count above
    it. The ties at the cut are ranked by one cumsum over N."""
    R, N = margin.shape
    passing = margin >= 0
    needed = jnp.sum(passing, -1, dtype=jnp.int32)
    if cap >= N:
        return passing, needed
    key = jnp.where(passing, lax.bitcast_convert_type(margin + 0.0, jnp.int32), -1)  # +0.0: no -0
    want = jnp.full((R,), cap, jnp.int32)  # rank (from the top, 1-based) within the prefix group
    prefix = jnp.zeros((R,), jnp.int32)
    digits = jnp.arange(256, dtype=jnp.int32)[None, :, None]
    for shift, bits in ((24, 7), (16, 8), (8, 8), (0, 8)):
        group = passing if shift == 24 else (key >> (shift + 8)) == prefix[:, None]
        digit = (key >> shift) & ((1 << bits) - 1)
        at_or_above = jnp.sum(group[:, None, :] & (digit[:, None, :] >= digits), -1,
                              dtype=jnp.int32)  # [R, 256], non-increasing in the digit
        reach = at_or_above >= want[:, None]
        d = jnp.sum(reach, -1, dtype=jnp.int32) - 1  # the largest digit that reaches want
        above = jnp.max(jnp.where(reach, 0, at_or_above), -1)  # in the digits past d
        want = want - above
        prefix = (prefix << bits) | d
    tie = key == prefix[:, None]
    tie_rank = jnp.cumsum(tie, axis=-1, dtype=jnp.int32)  # 1-based among the ties
    keep = passing & ((key > prefix[:, None]) | (tie & (tie_rank <= want[:, None])))
    return jnp.where((needed > cap)[:, None], keep, passing), needed


def select_kept(margin, cap: int, how: str = "radix"):
    """margin [B, K, N] (block_len and forcing applied) -> (kept [B,K,cap], kept_count, needed):
    the best `cap` margins >= 0, as `index.cluster.select_blocks` (kept in block order here)."""
    B, K, N = margin.shape
    if how == "auto":
        how = "top_k" if min(cap, N) <= _TOP_K_MAX else "radix"
    if how == "top_k":
        sel = select_blocks(margin, jnp.zeros((B, K)), jnp.zeros((B, K)), 0.0, 0.0, cap,
                            jnp.ones((B, K, N), jnp.int32), K)
        return sel.kept, sel.kept_count, sel.needed
    keep, needed = top_cap_mask(margin.reshape(B * K, N), cap)
    sel = ss.compact(jnp.where(keep, 1.0, -1.0).reshape(B, K, N), min(cap, N))
    return sel.kept, sel.kept_count, needed.reshape(B, K)


# ----------------------------------------------------------------------------- the path


def sparse_attention_pallas(q, store, plan, *, config: SparseDecodeConfig = SparseDecodeConfig(),
                            interpret: bool = False):
    """`attention.sparse_attention` for a cluster DIPR plan on the Mosaic GPU kernels.

    q [B, H, D] post-RoPE; store: KVStore with a cluster index (16-bit keys and values).
    Returns (o [B, H, D] f32, Stats), equal to the jnp path within bf16/f32 rounding.
    interpret=True runs the kernels in jax's GPU interpreter (CPU tests)."""
    from alaya_jax import attention as A  # attention imports this module lazily

    why = kernel_supports(q, store, plan)
    if why:
        raise NotImplementedError(f"sparse_attention(impl='pallas'): {why}")
    impl = _mgpu.resolve_impl("pallas", interpret, "sparse_attention")
    assert impl == "pallas"
    idx = store.cluster
    cfg = idx.config
    if plan.sink > cfg.sink or plan.window > cfg.window:
        raise PlanError(f"plan sink/window ({plan.sink}, {plan.window}) exceed the index's "
                        f"exact regions ({cfg.sink}, {cfg.window}); rebuild the index")
    B, S, K, D = store.k.shape
    H = q.shape[1]
    G = H // K
    N = idx.num_blocks
    lengths = store.lengths
    kw = dict(impl="pallas", interpret=interpret)

    # 1. the exact region: sink + tail, from the positional cache
    tail_size = min(cfg.tail_capacity, S)
    ex = A._exact_region(q, store, cfg.sink, idx.end, tail_size, lengths)
    tail_over = lengths - idx.end > tail_size
    ex_valid = jnp.broadcast_to(ex.valid[:, None, :], ex.s.shape)
    exact_max = A._masked_max(ex.s, ex_valid)  # [B,H]
    always = ex_valid & ((ex.pos < plan.sink)
                         | (ex.pos >= (lengths - plan.window)[:, None]))[:, None, :]
    delta = idx.delta if plan.delta is None else plan.delta
    cap = N if plan.capacity is None else min(plan.capacity, N)
    nonempty = idx.block_len > 0  # [B,K,N]

    # 2. margins (and the probe, which needs the per-head estimates)
    use_est = plan.probe > 0 or plan.remainder
    est = centroid_scores(q, idx.centroid, idx.block_len) if use_est else None  # [B,H,N]
    probe_max = jnp.full((B, H), MASK_VALUE, jnp.float32)
    force = None
    if plan.probe > 0:
        n_probe = min(plan.probe, N)
        pid = lax.top_k(est, n_probe)[1].reshape(B, K, G * n_probe).astype(jnp.int32)
        ps = A._scores_kv(q, gather_blocks(idx.keys, pid))  # [B,H,G*probe,P]
        pvalid = jnp.repeat(gather_blocks(idx.positions, pid) >= 0, G, axis=1)
        probe_max = jnp.max(jnp.where(pvalid, ps, MASK_VALUE), axis=(-2, -1))
        force = A._scatter_mask(B, K, N, pid, jnp.ones(pid.shape, bool))
    thr = jnp.maximum(exact_max, probe_max) - plan.beta - jnp.asarray(delta, jnp.float32)  # [B,H]
    if use_est:
        margin = (est - thr[..., None]).reshape(B, K, G, N).max(axis=2)
    else:
        margin = ss.block_margins_mgpu(q, idx.centroid, jnp.full((B, K), N, jnp.int32), thr,
                                       interpret=interpret)
    margin = jnp.where(nonempty, margin, MASK_VALUE)
    if force is not None:
        margin = jnp.where(force & nonempty, jnp.float32(1e30), margin)

    # 3. the kept list
    kept, kept_count, needed = select_kept(margin, cap, config.select)

    # 4. the threshold: exact DIPR over everything read
    if plan.attend_read:
        threshold = jnp.full((B, H), MASK_VALUE, jnp.float32)
    else:
        kmax = ga.kept_max(q, idx.keys, idx.block_len, kept, kept_count,
                           config=config.attention, **kw)
        threshold = jnp.maximum(exact_max, kmax) - plan.beta

    # 5. attention over the kept blocks, the exact region and the remainder
    ex_mask = (ex_valid & (ex.s >= threshold[..., None])) | always
    o_g, lse_g, n_g = ga.gathered_attention(q, idx.keys, idx.values, idx.block_len, kept,
                                            kept_count, threshold, config=config.attention,
                                            with_counts=True, **kw)
    parts = [A._attend_exact(ex.s, ex_mask, ex.v), AttentionOut(o_g, lse_g)]
    if plan.remainder:
        parts.append(remainder_estimate(q, est, (idx.block_len, idx.key_var, idx.value_mean),
                                        kept_mask(kept, kept_count, N),
                                        use_var=plan.remainder_var))
    out = merge_attention(*parts)

    live = jnp.arange(kept.shape[-1])[None, None, :] < kept_count[..., None]
    keys_in_kept = jnp.sum(jnp.where(live, jnp.take_along_axis(idx.block_len, kept, -1), 0), -1)
    rows = (2 if (plan.remainder and plan.remainder_var) else 1) * A._count_bk(nonempty, K)
    keys_read = (rows + keys_in_kept.astype(jnp.int32)
                 + jnp.sum(ex.valid, -1).astype(jnp.int32)[:, None])
    stats = A.Stats(
        keys_attended=(jnp.sum(ex_mask, -1) + n_g).astype(jnp.int32),
        keys_read=keys_read, rows_scored=rows, groups_kept=kept_count, groups_needed=needed,
        threshold=threshold, truncated=jnp.any(needed > kept_count, axis=-1) | tail_over,
        context=lengths, attended=None)
    return out.o, stats
