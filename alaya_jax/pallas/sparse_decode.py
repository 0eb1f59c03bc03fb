"""DIPR decode attention through the cluster index on the Mosaic GPU kernels.

The same query as `attention._sparse_path` for a `Plan.dipr(index="cluster")` (estimate, then
verify; DESIGN.md), with the two parts that grow with the context on the kernels:

  1. the exact region (sink + tail, a few hundred positional tokens): for one_pass and
     attend_read plans in one kernel (`exact_attention`, after the probe: its threshold
     max(m', probe max) - beta needs nothing read later; m' comes out of it too), else in
     jnp as there;
  2. block margins  margin[j] = max over the group's heads of est_h[j] - (m'_h - beta - delta_h):
     the `score_select` margins kernel when nothing else needs the per-head estimates
     (probe = 0 and no remainder); otherwise est = q.centroid / sqrt(D) in XLA (the probe's
     per-head top blocks and the remainder need it) and the margin from it;
  3. the kept list: every block with margin >= 0 (the probed blocks forced) when they fit the
     capacity, as the jnp path's `select_blocks`. When more pass: up to a capacity of 16 the
     jnp path's `lax.top_k` set; past it, by default, the best blocks found on a grid of
     margins (`top_cap_bins`: two reductions, no sort, or one kernel with the in-kernel
     selection, `top_cut`; short of the capacity by at most the
     blocks within 1/1024 of the best margin below the cut), or with select="radix" the exact
     `lax.top_k` set by a radix select of the cap-th largest margin (four passes); then the
     order-free compaction of `score_select.compact` (two small matmuls and a scatter), or,
     where the kept set is a cut on the margins (the grid select, or no capacity binding;
     `SparseDecodeConfig.in_kernel`, the default), no kept list at all: the kernels of
     steps 4 and 5 (`gathered_attention.select_max` / `select_attention`) select their
     blocks themselves;
  4. the DIPR threshold (max over everything read) - beta: `gathered_attention.kept_max`, a
     keys-only pass of the attention kernel over the kept blocks (skipped with attend_read,
     and with one_pass, whose threshold is m' - beta: see `Plan.one_pass`);
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
32-layer jitted decode loop, H200, capacity 5% of the blocks, blocks of 32 slots with balanced
clusters, bf16 summaries): 6.87 ms/token at 4K and 8.59 at 128K (1.25x); with one_pass 6.97 /
8.07 (1.16x); with one_pass and probe 0 (the margins kernel) 6.16 / 7.51 (1.22x); cuDNN full
attention 4.56 / 8.16 (1.79x) in the same calls. With the in-kernel selection (the default since)
a 2-layer step at 128K launches 124 kernels (136 with the compaction); the small XLA kernels
around the two Mosaic kernels per layer (exact region, the grid select, merges, stats) make
this path slower than flat DIPR at 4K, where the optimizer picks flat.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from alaya_jax.dipr import MASK_VALUE, AttentionOut, merge_attention
from alaya_jax.errors import ConfigError, PlanError
from alaya_jax.index.cluster import (attend_masked, centroid_scores, gather_blocks, kept_mask,
                                     remainder_estimate, select_blocks)
from alaya_jax.pallas import _mgpu
from alaya_jax.pallas import exact_attention as ea
from alaya_jax.pallas import gathered_attention as ga
from alaya_jax.pallas import score_select as ss
from alaya_jax.pallas import top_cut as tc

_SELECTS = ("auto", "bins", "radix", "top_k")
#: Up to this capacity `lax.top_k` is XLA's single fused top-k kernel on the GPU; past it XLA
#: sorts the rows, and the grid select's two reductions (or the radix select's eight, for the
#: exact top-k set) avoid the sort.
_TOP_K_MAX = 16


@dataclasses.dataclass(frozen=True)
class SparseDecodeConfig:
    """select: how the capacity keeps the best margins when more blocks pass than it holds:
    "radix" (exact radix select of the cap-th largest, then a compaction: no sort), "top_k"
    (`lax.top_k`, as the jnp path), "bins" (a threshold found on a grid of margins: the best
    blocks up to the grid's resolution, see `top_cap_bins`) or "auto" (top_k up to a
    capacity of 16, bins past it). radix and top_k give the jnp path's set; every option
    keeps exactly the passing blocks when they fit the capacity.
    attention: the gathered-attention kernel's tuning.
    in_kernel: where the kept set is a cut on the margins (select "bins"), the attention
    kernel lists its blocks itself (`gathered_attention.select_attention`: no compaction
    kernels before it); False compacts the kept list in XLA first (with cut_kernel, from the
    cut kernel's cut), which the attention kernel splits evenly over its programs.
    exact_kernel: for plans whose threshold the exact region can settle alone (one_pass,
    attend_read), its attention in one Mosaic GPU kernel (`exact_attention`: gather, scores,
    max, masks, softmax and P.V) where its shapes allow; False (or other plans) in XLA.
    cut_kernel: the in-kernel selection's cut (`top_cap_cut`) in one Mosaic GPU kernel
    (`top_cut.top_cap_cut_mgpu`) instead of ~8 small XLA kernels.
    margins: the margins kernel's tuning (its default aims at 256 programs, 2 tiles a program
    at 128K). Side by side in one 32-layer call (2026-11-27, H200) the earlier loop setting of
    528 programs (1 tile) took 7.27 ms/token at 128K against 6.89 with 256 (4K: 5.64 both)."""

    select: str = "auto"
    attention: ga.GatheredAttentionConfig = ga.GatheredAttentionConfig()
    in_kernel: bool = True
    exact_kernel: bool = True
    cut_kernel: bool = True
    margins: ss.ScoreSelectConfig = ss.ScoreSelectConfig()

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


#: The margin given to forced blocks (the probed ones); at or above _FORCED a margin counts as
#: forced: kept before any other.
_FORCED_MARGIN = 1e30
_FORCED = 1e29


def top_cap_cut(margin, cap: int, bins: int = 32, rounds: int = 2, forced: bool = True):
    """margin [R, N] f32 -> (cut [R] f32, needed [R] int32): the blocks to keep are those with
    margin >= cut. cut = 0 (every block with margin >= 0) when at most `cap` pass; otherwise
    a threshold t > 0 with at most `cap` margins at or above it, t the lowest point that holds
    on a grid of `bins` ** `rounds` levels over (0, best margin]: the best blocks, short of
    `cap` by at most the blocks whose margin lies within one grid step (best / bins ** rounds)
    below t. Forced blocks (margin >= 1e29) count as the best margin (and stay above any
    cut). If more than `cap` blocks tie at the best margin, all of them pass the cut.

    Each round is one reduction ([R, bins, N] compares, no sort): an eighth of the work of
    one pass of `top_cap_mask`'s radix select, which needs four.

    forced=False: the caller forces no block, so the forced-margin handling is left out (the
    best margin and the count are then sibling reductions of the margins: one kernel)."""
    R, N = margin.shape
    passing = margin >= 0
    needed = jnp.sum(passing, -1, dtype=jnp.int32)
    if cap >= N:
        return jnp.zeros((R,), jnp.float32), needed
    if forced:
        is_forced = margin >= _FORCED
        best = jnp.max(jnp.where(passing & ~is_forced, margin, 0.0), -1)  # [R]
        v = jnp.where(passing, jnp.minimum(margin, best[:, None]), -1.0)
    else:
        best = jnp.max(jnp.where(passing, margin, 0.0), -1)
        v = jnp.where(passing, margin, -1.0)
    lo, hi = jnp.zeros((R,), jnp.float32), best
    steps = jnp.arange(1, bins + 1, dtype=jnp.float32) / bins
    for _ in range(rounds):
        edges = lo[:, None] + (hi - lo)[:, None] * steps  # [R, bins], increasing
        edges = edges.at[:, -1].set(hi)
        count = jnp.sum(v[:, None, :] >= edges[:, :, None], -1, dtype=jnp.int32)
        ok = count <= cap  # non-decreasing in the edge
        j = jnp.argmax(ok, -1)  # the first edge that holds (0 if none)
        any_ok = jnp.any(ok, -1)
        new_hi = jnp.take_along_axis(edges, j[:, None], -1)[:, 0]
        new_lo = jnp.take_along_axis(edges, jnp.maximum(j - 1, 0)[:, None], -1)[:, 0]
        lo = jnp.where(any_ok & (j > 0), new_lo, lo)
        hi = jnp.where(any_ok, new_hi, hi)
    # margin >= hi equals v >= hi: forced margins lie above best >= hi, the others are v
    return jnp.where(needed > cap, hi, 0.0), needed


def top_cap_bins(margin, cap: int, bins: int = 32, rounds: int = 2, forced: bool = True):
    """margin [R, N] f32 -> (keep [R, N] bool, needed [R] int32): `top_cap_cut` as a mask."""
    cut, needed = top_cap_cut(margin, cap, bins, rounds, forced)
    return margin >= cut[:, None], needed


def resolve_select(how: str, cap: int, n_blocks: int) -> str:
    """`SparseDecodeConfig.select` with "auto" made concrete: top_k up to a capacity of
    _TOP_K_MAX blocks, bins past it."""
    if how != "auto":
        return how
    return "top_k" if min(cap, n_blocks) <= _TOP_K_MAX else "bins"


def select_kept(margin, cap: int, how: str = "radix", forced: bool = True):
    """margin [B, K, N] (block_len and forcing applied) -> (kept [B,K,W], kept_count, needed):
    the best `cap` margins >= 0, as `index.cluster.select_blocks` (kept in block order here);
    W = min(cap, N), rounded up to a multiple of 4 past the top_k path (entries past
    kept_count are 0)."""
    B, K, N = margin.shape
    how = resolve_select(how, cap, N)
    if how == "top_k":
        sel = select_blocks(margin, jnp.zeros((B, K)), jnp.zeros((B, K)), 0.0, 0.0, cap,
                            jnp.ones((B, K, N), jnp.int32), K)
        return sel.kept, sel.kept_count, sel.needed
    if how == "radix":
        keep, needed = top_cap_mask(margin.reshape(B * K, N), cap)
    else:
        keep, needed = top_cap_bins(margin.reshape(B * K, N), cap, forced=forced)
    kept, kept_count = compact_keep(keep.reshape(B, K, N), cap)
    return kept, kept_count, needed.reshape(B, K)


def compact_keep(keep, cap: int):
    """keep [B, K, N] bool -> (kept [B, K, W], kept_count): the kept ids in block order, at most
    cap; W = min(cap, N) rounded up to a multiple of 4 (entries past kept_count are 0)."""
    cap = min(cap, keep.shape[-1])
    sel = ss.compact(jnp.where(keep, 1.0, -1.0), cap, -(-cap // 4) * 4)
    return sel.kept, sel.kept_count


def _capacity_cut(margin, cap: int, forced: bool, config, interpret: bool):
    """margin [B, K, M] -> (cut [B, K], needed [B, K]) of `top_cap_cut`: in its Mosaic GPU
    kernel where config.cut_kernel and the row fits the kernel, else in XLA."""
    B, K, M = margin.shape
    rows = margin.reshape(B * K, M)
    if config.cut_kernel and tc.kernel_supports(M) is None:
        cut, needed = tc.top_cap_cut_mgpu(rows, cap, forced=forced, interpret=interpret)
    else:
        cut, needed = top_cap_cut(rows, cap, forced=forced)
    return cut.reshape(B, K), needed.reshape(B, K)


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

    # 1. the exact region: sink + tail, from the positional cache; in one kernel after the
    # probe where the plan's threshold needs nothing read after it (its max m' comes out too)
    tail_size = min(cfg.tail_capacity, S)
    tail_over = lengths - idx.end > tail_size
    q_c = q.astype(store.k.dtype)
    exact_kernel = (config.exact_kernel and (plan.one_pass or plan.attend_read)
                    and ea.kernel_supports(q_c, store.k, tail_size) is None)
    if not exact_kernel:
        ex = A._exact_region(q, store, cfg.sink, idx.end, tail_size, lengths)
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
        top_est, pid = lax.top_k(est, n_probe)
        pid = pid.reshape(B, K, G * n_probe).astype(jnp.int32)
        ps = A._scores_kv(q, gather_blocks(idx.keys, pid))  # [B,H,G*probe,P]
        pvalid = jnp.repeat(gather_blocks(idx.positions, pid) >= 0, G, axis=1)
        probe_max = jnp.max(jnp.where(pvalid, ps, MASK_VALUE), axis=(-2, -1))
        # the probed blocks as a compare, not a scatter (3 kernels fewer on a GPU); a tie
        # with a head's last probed estimate forces the tied blocks too
        force = jnp.any((est >= top_est[..., -1:]).reshape(B, K, G, N), axis=2)
    if exact_kernel:  # thresholds max(m', probe max) - beta (one_pass) or none (attend_read)
        o_ex, lse_ex, exact_max, n_ex = ea.exact_attention(
            q_c, store.k, store.v, idx.end, lengths, probe_max, sink=cfg.sink,
            tail_size=tail_size, beta=float("inf") if plan.attend_read else plan.beta,
            keep_sink=plan.sink, keep_window=plan.window, **kw)
    n_blocks = np.full((B, K), N, np.int32)
    if exact_kernel and plan.probe == 0 and not use_est:
        # m' straight from the exact region's kernel: the margins kernel subtracts beta and
        # delta itself (max with the probe's MASK_VALUE is its floor), no XLA kernel between
        margin = ss.block_margins_from_max(q, idx.centroid, n_blocks, exact_max, plan.beta,
                                           delta, config=config.margins, interpret=interpret)
    else:
        thr = (jnp.maximum(exact_max, probe_max) - plan.beta
               - jnp.asarray(delta, jnp.float32))  # [B,H]
        if use_est:
            margin = (est - thr[..., None]).reshape(B, K, G, N).max(axis=2)
        else:
            margin = ss.block_margins_mgpu(q, idx.centroid, n_blocks, thr, config=config.margins,
                                           interpret=interpret)
    margin = jnp.where(nonempty, margin, MASK_VALUE)
    if force is not None:
        margin = jnp.where(force & nonempty, jnp.float32(_FORCED_MARGIN), margin)

    # 3. the kept list. The margins are materialised first: fused into the selection's
    # [R, bins, N] count reductions, XLA on a GPU recomputed them from the per-head estimates
    # for every bin (27 us per layer at 128K, 8B shapes, H200, with one_pass).
    how = resolve_select(config.select, cap, N)
    in_kernel = config.in_kernel and how == "bins"
    if in_kernel:  # the kept set is margin >= cut: the kernels select their blocks themselves
        # from the margins in the order they read them. The cut depends on the set of margins
        # alone, so it is found on those too (their padding never passes): one XLA kernel
        # between the margins and the cut, not two (the block-order margins are left to the
        # statistics, dropped with them).
        margin_il = lax.optimization_barrier(ga.interleave_margins(margin, config.attention))
        cut, needed = _capacity_cut(margin_il, cap, force is not None, config, interpret)
        keep = margin >= cut[..., None]
        kept_count = jnp.sum(keep, -1, dtype=jnp.int32)
        keys_in_kept = jnp.sum(jnp.where(keep, idx.block_len, 0), -1)
    else:
        margin = lax.optimization_barrier(margin)
        if how == "bins":
            # the cut (its kernel where config.cut_kernel), then the kept list compacted in
            # XLA: the balanced attention kernel splits the kept entries evenly over its
            # programs (the in-kernel selection's programs scan fixed ranges, whose kept
            # counts vary: 0-8 of 64 blocks at 128K's 5%)
            cut, needed = _capacity_cut(margin, cap, force is not None, config, interpret)
            kept, kept_count = compact_keep(margin >= cut[..., None], cap)
        else:
            kept, kept_count, needed = select_kept(margin, cap, how, forced=force is not None)
        live = jnp.arange(kept.shape[-1])[None, None, :] < kept_count[..., None]
        keys_in_kept = jnp.sum(jnp.where(live, jnp.take_along_axis(idx.block_len, kept, -1),
                                         0), -1)
        keep = None

    # 4. the threshold: exact DIPR over everything read
    if plan.attend_read:
        threshold = jnp.full((B, H), MASK_VALUE, jnp.float32)
    elif plan.one_pass:  # m' - beta: no keys-only pass over the kept blocks
        threshold = jnp.maximum(exact_max, probe_max) - plan.beta
    else:
        if in_kernel:
            kmax = ga.select_max(q, idx.keys, idx.block_len, margin_il, cut, interleaved=True,
                                 config=config.attention, **kw)
        else:
            kmax = ga.kept_max(q, idx.keys, idx.block_len, kept, kept_count,
                               config=config.attention, **kw)
        threshold = jnp.maximum(exact_max, kmax) - plan.beta

    # 5. attention over the kept blocks, the exact region and the remainder
    if not exact_kernel:
        ex_mask = (ex_valid & (ex.s >= threshold[..., None])) | always
        o_ex, lse_ex = A._attend_exact(ex.s, ex_mask, ex.v)
        n_ex = jnp.sum(ex_mask, -1)
        n_valid = jnp.sum(ex.valid, -1)
    else:
        n_valid = ea.region_valid_count(idx.end, lengths, S, cfg.sink, tail_size)
    if in_kernel:
        o_g, lse_g, n_g = ga.select_attention(q, idx.keys, idx.values, idx.block_len,
                                              margin_il, cut, threshold, interleaved=True,
                                              config=config.attention, with_counts=True, **kw)
    else:
        o_g, lse_g, n_g = ga.gathered_attention(q, idx.keys, idx.values, idx.block_len, kept,
                                                kept_count, threshold, config=config.attention,
                                                with_counts=True, **kw)
    parts = [AttentionOut(o_ex, lse_ex), AttentionOut(o_g, lse_g)]
    if plan.remainder:
        read = keep if in_kernel else kept_mask(kept, kept_count, N)
        parts.append(remainder_estimate(q, est, (idx.block_len, idx.key_var, idx.value_mean),
                                        read, use_var=plan.remainder_var))
    out = merge_attention(*parts)

    rows = (2 if (plan.remainder and plan.remainder_var) else 1) * A._count_bk(nonempty, K)
    keys_read = (rows + keys_in_kept.astype(jnp.int32) + n_valid.astype(jnp.int32)[:, None])
    stats = A.Stats(
        keys_attended=(n_ex + n_g).astype(jnp.int32),
        keys_read=keys_read, rows_scored=rows, groups_kept=kept_count, groups_needed=needed,
        threshold=threshold, truncated=jnp.any(needed > kept_count, axis=-1) | tail_over,
        context=lengths, attended=None)
    return out.o, stats
