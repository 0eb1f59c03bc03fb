"""Gathered sparse decode attention over kept blocks of a cluster index (Mosaic GPU).

One decode query per head attends to the keys of the blocks (clusters or pages) that
selection kept for its kv head. The G query heads of a kv head are processed together, so
each kept block is read from HBM once for the whole group.

Layout (the cluster index's, see `alaya_jax/index/`):

    q           [B, H, D]          H = K * G query heads
    keys        [B, K, N, P, D]    bf16/f16 (kernel) or any float (reference)
    values      [B, K, N, P, D]
    block_len   [B, K, N]  int32   valid members at the start of each block, 0..P
    kept        [B, K, cap] int32  kept block ids; entries at or past kept_count are ignored
    kept_count  [B, K]  int32      0..cap
    threshold   [B, H]  f32        per query head: keys scoring below it are masked out

Scores are s = q . k / sqrt(D), with q cast to the key dtype (the matmul operand) and f32
accumulation. Key i of a kept block is attended iff it is a valid member (i < block_len)
and s_i >= threshold (ties kept).

Is the mask exact DIPR over what was read? Only if the caller makes it so: the threshold is
an input, not computed from the max of what was read. That is the simplest contract, and it
is what estimate-then-verify has in hand (m' - beta from the sink/window and the probed
blocks). Exact DIPR over the read keys (threshold = max over read - beta) needs that max
first: `exact_dipr_threshold` computes it (a scores-only pass over the kept keys) and a call
with that threshold is then exact DIPR over the kept blocks (tested against flat DIPR).
A single-pass kernel cannot do it: a key below the final max - beta may already have been
added when the max was lower.

Remainder (optional): a per-query-head estimate of the softmax mass of the blocks NOT read,
as a triple (numerator [B,H,D], denominator [B,H], max [B,H]) with the meaning

    unread softmax mass    = exp(max) * denominator      (denominator >= 0)
    unread weighted values = exp(max) * numerator

(max is a reference point that keeps both finite, e.g. max over unread centroid scores;
RetroInfer's estimate is denominator = sum_j n_j exp(q.c_j/sqrt(D) - max) and numerator =
sum_j n_j exp(...) * mean_value_j). It is merged into the exact part by log-sum-exp; the
threshold does not apply to it.

Returns o [B, H, D] f32 (softmax-weighted values over attended keys plus the remainder) and
lse [B, H] f32, the natural log of the total softmax mass (exact part plus remainder). A
row that attended to nothing and has no remainder mass returns o = 0 and
lse = EMPTY_LSE (-1e30, finite).

Kernel: one program per (batch, kv head, split of the kept list); each split reads up to
`blocks_per_program` kept blocks through a TMA pipeline (`plgpu.emit_pipeline` with a
dynamic step count = the split's share of kept_count, so nothing past the count is read)
whose index_map reads block ids from shared memory, several steps in flight. The kernel
reads q, threshold, kept, kept_count and block_len in place (aligned TMA windows, no XLA
preprocessing), runs an online softmax in the log2 domain, and writes a normalized partial
(o, lse) and its lse broadcast over a few columns; the partials merge in a second Mosaic GPU
kernel (`split_merge`; where its layout does not fit, G*D < 128, in one XLA reduction,
`merge_splits`) and the remainder in a small XLA epilogue. `select_attention`
is the same kernel given the block margins and a cut instead of the kept list: each program
selects its own blocks.

Why WGMMA and not vector FMAs for the thin group (G = 4 of Llama-3-8B): the G rows are padded
to one 64-row tile and both products run on the tensor cores. That spends 16x the FLOPs, but
decode is memory-bound (one 32-key block is 16 KB of K+V for ~1 MFLOP of padded MMA, ~25% of
the H100's tensor rate at full HBM bandwidth), and the WGMMA register layouts give the row
max/sum reductions and the P.V accumulation for free; the P.V operand swizzle is chosen to
divide a block (P=16: 32 B, P=32: 64 B, P>=64: 128 B). The cost is registers: the padded
[64, D] f32 accumulator and score tiles take the program to 206 registers a thread (ptxas,
D 128, P 32; benchmarks/results/kernel_registers.json), so at most 2 programs share an SM and
each kept block's dependent chain (TMA wait, QK, softmax, P.V) is hidden only 2-fold.

Measured on an H200 (jax 0.11.2; Llama-3-8B layer shapes, batch 1; GPU time from the
profiler; benchmarks/results/kernel_waves.json, random kept blocks): 86 MB of kept K+V
(656 blocks a kv head, 2% of 1M) 27.2 us in the kernel (3.2 TB/s; the device copy
roofline measured beside it is 3.37 TB/s, the read roofline 4.6) + 6.3 us in the merge
(latency-bound small kernels); 268 MB 69.7 us (3.85 TB/s) + 6.2 us; nothing kept 3.9 us (the
fixed cost of the launch and the per-program prologue/epilogue). ncu (H200): the program is
limited to 2 an SM by registers and by shared memory alike, issues an instruction on ~45%
of cycles with ~1.9 warps per scheduler, and reads DRAM at 50-70% of its peak: each
program's chain of TMA wait, QK, softmax and P.V per block is what bounds it, so the kept
list is split into one wave of programs (`default_blocks_per_program`). XLA's gather path:
170 us at 2% of 1M.

The balanced split (the default for kept lists, `GatheredAttentionConfig.balanced`): every
program reads the counts of all kv heads, places itself (`_balanced_share`) and reads an
equal share of the total kept, so heads that keep fewer blocks than the capacity get fewer
programs. H200 (benchmarks/results/kernel_balance.json, kernel alone): heads keeping 50-100%
of the capacity 24.9 -> 22.9 us at 68 MB and 67.2 -> 55.3 us at 193 MB; full lists 26.3 ->
27.4 us at 86 MB (the counts are one more dependent copy before the kept list is read).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from alaya_jax.errors import ConfigError, ShapeError
from alaya_jax.pallas import _mgpu, split_merge
from alaya_jax.pallas._mgpu import EMPTY_LSE, MASK_VALUE

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
_ROWS = 64  # one WGMMA M tile; the G query rows of a kv head are padded to it
# block_len is read per kept block in windows of 32 int32: pipeline slots of shared memory
# must be 128-byte aligned for TMA (16-byte windows gave CUDA_ERROR_MISALIGNED_ADDRESS).
_LEN_WINDOW = 32
_HI = lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class GatheredAttentionConfig:
  """Tuning knobs of the Mosaic GPU kernel (static under jit).

  blocks_per_program: kept blocks one program reads (a multiple of 4, at most 256);
    None picks from the capacity so that the launch has a few programs per SM.
  steps_in_flight: pipeline steps (TMA copies of K, V and lengths) in flight per program.
  blocks_per_step: kept blocks per pipeline step (2 halves the per-step overheads: one
    barrier wait, one softmax rescale and one WGMMA wait for two blocks).
  balanced: the kept-list path with blocks_per_program None splits the kept entries of all
    kv heads evenly over the programs, read from the counts inside the kernel: each program
    takes c = max(ceil(total kept / programs), a floor) entries of one kv head, so a head
    that keeps fewer blocks than the capacity gets fewer programs (a fixed share of the
    capacity per head, balanced=False, leaves the programs of such heads idle while the
    others run). Not for the in-kernel selection, whose programs scan fixed ranges.
  programs: the balanced split's target count of programs (default: one wave, 2 an SM).
  split_merge: "kernel" merges the splits' partials in a Mosaic GPU kernel
    (`split_merge.merge_partials`; where `merge_width` allows, else XLA), "xla" in one XLA
    reduction (`merge_splits`).
  profile_dir: a directory: the attention kernel records its phases per program ("place",
    "inputs", "pipeline", "store") with Mosaic GPU's on-device profiler and writes a trace
    there each call (GPU only; `benchmarks/kernel_profile.py` reads it). None: off.
  pdl: with the merge kernel, launch it as a programmatic dependent of the attention kernel
    (each attention program signals `griddepcontrol.launch_dependents` as it starts; the merge
    waits with `griddepcontrol.wait` before reading the partials): its launch overlaps the
    attention kernel instead of following it. GPU only (the interpreter ignores it).
  """
  blocks_per_program: int | None = None
  steps_in_flight: int = 4
  blocks_per_step: int = 1
  balanced: bool = True
  programs: int | None = None
  split_merge: str = "kernel"
  pdl: bool = False
  profile_dir: str | None = None

  def __post_init__(self):
    b = self.blocks_per_program
    if b is not None and (b < 4 or b % 4 or b > 256):
      raise ConfigError(f"blocks_per_program must be a multiple of 4 in [4, 256], got {b}")
    if self.blocks_per_step not in (1, 2):
      raise ConfigError(f"blocks_per_step must be 1 or 2, got {self.blocks_per_step}")
    if not 1 <= self.steps_in_flight <= 16:
      raise ConfigError(f"steps_in_flight must be in [1, 16], got {self.steps_in_flight}")
    if self.split_merge not in ("kernel", "xla"):
      raise ConfigError(f"split_merge must be 'kernel' or 'xla', got {self.split_merge!r}")
    if self.programs is not None and self.programs < 1:
      raise ConfigError(f"programs must be positive, got {self.programs}")


def _check_shapes(q, keys, values, block_len, kept, kept_count, threshold):
  if q.ndim != 3 or keys.ndim != 5:
    raise ShapeError(f"expected q [B,H,D] and keys [B,K,N,P,D], got {q.shape} and {keys.shape}")
  b, h, d = q.shape
  _, k, n, p, dk = keys.shape
  if keys.shape[0] != b or dk != d:
    raise ShapeError(f"keys {keys.shape} do not match q {q.shape}")
  if values.shape != keys.shape:
    raise ShapeError(f"values {values.shape} must have the keys' shape {keys.shape}")
  if h % k:
    raise ShapeError(f"{h} query heads are not a multiple of {k} kv heads")
  if block_len.shape != (b, k, n):
    raise ShapeError(f"block_len {block_len.shape}, expected {(b, k, n)}")
  if kept.ndim != 3 or kept.shape[:2] != (b, k):
    raise ShapeError(f"kept {kept.shape}, expected ({b}, {k}, cap)")
  if kept_count.shape != (b, k):
    raise ShapeError(f"kept_count {kept_count.shape}, expected {(b, k)}")
  if threshold.shape != (b, h):
    raise ShapeError(f"threshold {threshold.shape}, expected {(b, h)}")
  return b, h, d, k, n, p, h // k, kept.shape[2]


def merge_remainder(m, l, numerator, remainder):
  """Adds the remainder's softmax mass to an exact part given as (m [..], l [..], numerator
  [.., D]) with mass exp(m) * l; returns (o, lse) under the numerics contract."""
  if remainder is not None:
    r_num, r_den, r_max = (x.astype(jnp.float32) for x in remainder)
    r_max = jnp.where(r_den > 0, r_max, MASK_VALUE)
    m_tot = jnp.maximum(m, r_max)
    a, b = jnp.exp(m - m_tot), jnp.exp(r_max - m_tot)
    l = l * a + r_den * b
    numerator = numerator * a[..., None] + r_num * b[..., None]
    m = m_tot
  has_mass = l > 0
  o = numerator / jnp.where(has_mass, l, 1.0)[..., None]
  lse = jnp.where(has_mass, m + jnp.log(jnp.where(has_mass, l, 1.0)), EMPTY_LSE)
  return jnp.where(has_mass[..., None], o, 0.0), lse


def _gather_kept(x, ids):
  """x [B, K, N, ...], ids [B, K, cap] -> [B, K, cap, ...]."""
  b, k = ids.shape[:2]
  return x[jnp.arange(b)[:, None, None], jnp.arange(k)[None, :, None], ids]


def gathered_attention_reference(
    q,            # [B, H, D]
    keys,         # [B, K, N, P, D]
    values,       # [B, K, N, P, D]
    block_len,    # [B, K, N] int32
    kept,         # [B, K, cap] int32
    kept_count,   # [B, K] int32
    threshold,    # [B, H] f32
    *,
    remainder=None,  # (numerator [B,H,D], denominator [B,H], max [B,H]) or None
    with_counts: bool = False,
):
  """Pure jnp reference (f32 math); same contract as `gathered_attention`."""
  b, h, d, k, n, p, g, cap = _check_shapes(q, keys, values, block_len, kept, kept_count,
                                           threshold)
  ids = jnp.clip(kept, 0, n - 1)
  entry_ok = jnp.arange(cap) < kept_count[..., None]                     # [B,K,cap]
  lens = jnp.where(entry_ok, _gather_kept(block_len, ids), 0)            # [B,K,cap]
  member = jnp.arange(p) < lens[..., None]                               # [B,K,cap,P]
  kg = _gather_kept(keys, ids).astype(jnp.float32)                       # [B,K,cap,P,D]
  vg = _gather_kept(values, ids).astype(jnp.float32)
  qg = q.astype(keys.dtype).astype(jnp.float32).reshape(b, k, g, d)
  s = jnp.einsum("bkgd,bkcpd->bkgcp", qg, kg, precision=_HI) / math.sqrt(d)
  thr = threshold.astype(jnp.float32).reshape(b, k, g, 1, 1)
  mask = member[:, :, None] & (s >= thr)                                 # [B,K,G,cap,P]
  s = jnp.where(mask, s, MASK_VALUE)
  m = s.max(axis=(-2, -1))                                               # [B,K,G]
  e = jnp.where(mask, jnp.exp(s - m[..., None, None]), 0.0)
  l = e.sum(axis=(-2, -1))
  num = jnp.einsum("bkgcp,bkcpd->bkgd", e, vg, precision=_HI)
  m = jnp.where(l > 0, m, MASK_VALUE)
  o, lse = merge_remainder(m.reshape(b, h), l.reshape(b, h), num.reshape(b, h, d), remainder)
  if with_counts:
    return o, lse, mask.sum(axis=(-2, -1)).astype(jnp.int32).reshape(b, h)
  return o, lse


def exact_dipr_threshold(q, keys, block_len, kept, kept_count, beta):
  """threshold [B, H] = (max score over the valid kept keys) - beta, per query head: with it,
  `gathered_attention` is exact DIPR over what was read. Reads the kept keys once (jnp)."""
  b, h, d = q.shape
  _, k, n, p, _ = keys.shape
  g, cap = h // k, kept.shape[2]
  ids = jnp.clip(kept, 0, n - 1)
  entry_ok = jnp.arange(cap) < kept_count[..., None]
  lens = jnp.where(entry_ok, _gather_kept(block_len, ids), 0)
  member = jnp.arange(p) < lens[..., None]
  qg = q.astype(keys.dtype).astype(jnp.float32).reshape(b, k, g, d)
  s = jnp.einsum("bkgd,bkcpd->bkgcp", qg, _gather_kept(keys, ids).astype(jnp.float32),
                 precision=_HI) / math.sqrt(d)
  s = jnp.where(member[:, :, None], s, MASK_VALUE)
  return (s.max(axis=(-2, -1)) - beta).reshape(b, h)


# ----------------------------------------------------------------------------- kernel


_SEL = 64  # blocks per step of the in-kernel selection: one [64, 64] WGMMA tile


def _select_in_kernel(marg_smem, ids_smem, tri_smem, cnt_smem, cut, first, stride, lim, *,
                      chunk, interpret):
  """The kept list of one program's range of blocks, built with vector ops (no scalar scan).

  marg_smem [chunk] f32 holds the margins of blocks first + stride * [0, chunk); the j-th is
  kept iff j < lim and margin >= cut. Writes the kept blocks' ids (first + stride * j,
  ascending) to ids_smem[0:count] and returns count (int32 scalar).

  Per 64-block step t the keep flags, broadcast to a [64, 64] tile (every row the same), go
  through one WGMMA against the upper-triangular ones: row r, column j of the product is the
  inclusive count c_j of kept blocks up to j (plus the steps before). The list is then the
  inverse of that count: entry r (the (r+1)-th kept block) is #{j : c_j <= r}, one compare
  and one row sum per (output step, input step) tile. tri_smem: [64, 64] bf16 scratch for the
  triangle; cnt_smem: [64] f32 scratch through which the count becomes a scalar."""
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import mosaic_gpu as plgpu

  wg = plgpu.Layout.WGMMA
  rows = _mgpu.broadcasted_iota(jnp.int32, (_SEL, _SEL), 0, wg, interpret)
  cols = _mgpu.broadcasted_iota(jnp.int32, (_SEL, _SEL), 1, wg, interpret)
  tri_smem[...] = jnp.where(rows <= cols, 1.0, 0.0).astype(jnp.bfloat16)
  plgpu.commit_smem()
  steps = chunk // _SEL
  counts = []  # per input step: [64, 64] f32, c_j in every row (blocks before the step included)
  before = _mgpu.layout_cast(jnp.full((_SEL,), 0.0, jnp.float32), wg.reduce(1), interpret)
  for t in range(steps):
    mg = _mgpu.load_with_layout(marg_smem.at[pl.ds(t * _SEL, _SEL)], wg.reduce(0), interpret)
    mg = lax.broadcast_in_dim(mg, (_SEL, _SEL), [1])
    flags = jnp.where((mg >= cut) & (cols < lim - t * _SEL), 1.0, 0.0).astype(jnp.bfloat16)
    if interpret:
      inclusive = jnp.dot(flags, tri_smem[...], preferred_element_type=jnp.float32)
    else:
      def count(acc_ref):
        plgpu.wgmma(acc_ref, flags, tri_smem)
        return acc_ref[...]
      inclusive = pl.run_scoped(count, plgpu.ACC((_SEL, _SEL), jnp.float32))
    counts.append(inclusive + lax.broadcast_in_dim(before, (_SEL, _SEL), [0]))
    before = before + inclusive.max(axis=1)  # the step's total, in every row
  for r in range(steps):  # entries [r*64, (r+1)*64) of the list
    at = (rows + r * _SEL).astype(jnp.float32)
    pos = sum(jnp.where(c <= at, 1.0, 0.0).sum(axis=1) for c in counts)
    ids_smem[pl.ds(r * _SEL, _SEL)] = first + stride * pos.astype(jnp.int32)
  cnt_smem[...] = before
  return cnt_smem[0].astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class _Balance:
  """The balanced split (static): `bk` kv heads, `programs` the target count, entries a
  program at least `floor`."""
  bk: int
  programs: int
  floor: int


def _balanced_share(cnt_smem, pid, cap: int, bal: _Balance):
  """Places program pid in the balanced split. With c_h = min(count_h, cap), T = sum c_h and
  c = max(ceil(T / programs), floor), kv head h gets n_h = max(1, ceil(c_h / c)) programs
  (one even when it keeps nothing, so that every head writes its row), numbered head by head.
  Returns (active: pid < sum n_h, kv head, split, first and stop entry of the head's kept
  list, n_h); scalar work over the heads, run by every program."""
  counts = [jnp.minimum(cnt_smem[h], cap) for h in range(bal.bk)]
  c = jnp.maximum(lax.div(sum(counts) + (bal.programs - 1), jnp.int32(bal.programs)),
                  bal.floor)
  start, head, split, n_split, count = jnp.int32(0), jnp.int32(-1), jnp.int32(0), jnp.int32(0), \
      jnp.int32(0)
  for h, c_h in enumerate(counts):
    n_h = jnp.maximum(lax.div(c_h + c - 1, c), 1)
    hit = (pid >= start) & (pid < start + n_h)
    head = jnp.where(hit, h, head)
    split = jnp.where(hit, pid - start, split)
    n_split = jnp.where(hit, n_h, n_split)
    count = jnp.where(hit, c_h, count)
    start = start + n_h
  first = split * c
  return head >= 0, jnp.maximum(head, 0), split, first, jnp.minimum(first + c, count), n_split


def _balance_layout(cap: int, bk: int, per_step: int, config: GatheredAttentionConfig):
  """(balance, slots per kv head, programs launched, kept-list window of a program)."""
  target = config.programs or PROGRAMS_PER_SM * _sm_count()
  even = -(-bk * cap // target)         # the share of each program when every head is full
  # the floor bounds a head's programs (the merge's rows) at ~4/3 of a full head's: 2x cost
  # 0.6 us more merge at 86 MB (H200, benchmarks/results/kernel_balance.json)
  floor = max(1, -(-3 * even // 4))
  slots = -(-cap // floor)
  window = -(-(max(even, floor) + 3 + per_step) // 4) * 4  # + the alignment offset, a step
  return _Balance(bk, target, floor), slots, min(target + bk, bk * slots), window


def _attention_kernel(
    q_gmem,      # [B*H, D]      queries in the key dtype
    thr_gmem,    # [B*H] f32     thresholds
    kept_gmem,   # [B*K*cap] int32
    cnt_gmem,    # [B*K] int32
    blen_gmem,   # [B*K*N] int32
    k_gmem,      # [B*K*N*P, D]
    *rest,
    splits, g, n, cap, chunk, p, d, dtype, q_rows, per_step, k_transforms, v_transforms,
    steps_in_flight, interpret, max_only=False, scan=False, balance=None, lb_width=None,
    pdl=False):
  """One program: kv head bk = pid // splits, kept entries [s*chunk, (s+1)*chunk); or, with
  `balance` (a `_Balance`), the program's share of the balanced split (`_balanced_share`),
  its outputs at row bk * splits + s.

  rest (attention):
    v_gmem      [B*K*N*P, D]
    o_gmem      [BK*splits, G, D] f32  normalized partial outputs
    lse_gmem    [BK*splits, R] f32     natural-log partial lse: R = G (the group's rows) when
                                       G % 4 == 0, else R = 64 (rows (bk*G)%8 + [0, G) used);
                                       with lb_width, [BK*splits, G, lb_width] instead: the
                                       lse broadcast over lb_width columns for `split_merge`
    n_gmem      [BK*splits, R] f32     keys attended (valid and >= threshold), same rows
    (balance: nsplit_gmem [BK, 4] int32)
    then the scratch: q_smem, thr_smem, ids_smem, cnt_smem, bars.
  rest (max_only: a scores-only pass that reads the keys and not the values):
    mx_gmem     [BK*splits, R] f32     max score over the valid kept keys (MASK_VALUE: none)
    (balance: nsplit_gmem) then the same scratch.

  The q and threshold windows (q_rows rows) start at the 8-row boundary at or before the
  group's first head (row offset (bk*G) % 8, as TMA into a tiled tile needs); their other
  rows belong to other heads (or lie past the array end, where TMA fills zeros), and rows
  q_rows..63 of the WGMMA tile hold whatever shared memory held: all of those rows are
  computed independently and discarded. Windows past the end of kept/kept_count/block_len
  are likewise harmless.
  """
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import mosaic_gpu as plgpu

  if scan:  # kept_gmem holds the margins [B*K*cap] f32 (interleaved, see _launch), cnt_gmem cuts
    *rest, marg_smem, tri_smem, sel_cnt_smem = rest
  if balance is not None:  # one more output after the others: nsplit [BK, 4] int32, the
    # programs of each kv head (its rows past them are not written)
    at = 1 if max_only else 4  # (the max, or v_gmem and three outputs)
    nsplit_gmem, rest = rest[at], rest[:at] + rest[at + 1:]
  if max_only:
    mx_gmem, q_smem, thr_smem, ids_smem, cnt_smem, bars = rest
  else:
    v_gmem, o_gmem, lse_gmem, n_gmem, q_smem, thr_smem, ids_smem, cnt_smem, bars = rest

  pid = lax.axis_index("p")
  if pdl and not interpret:  # the merge kernel may launch now (it waits for this grid's end)
    plgpu.griddepcontrol_launch_dependents()
  ids_off = 0  # where the program's entries start in ids_smem
  if balance is not None:  # the counts of every kv head first: they place this program
    with jax.named_scope("place"):
      plgpu.copy_gmem_to_smem(cnt_gmem.at[pl.ds(0, cnt_smem.shape[0])], cnt_smem, bars.at[3])
      plgpu.barrier_wait(bars.at[3])
      active, bk, split, first, stop, n_split = _balanced_share(cnt_smem, pid, cap, balance)
      slot = bk * splits + split
      ids_start = pl.multiple_of(lax.div(bk * cap + first, 4) * 4, 4)
      ids_off = bk * cap + first - ids_start
  else:
    bk = lax.div(pid, jnp.int32(splits))
    split = lax.rem(pid, jnp.int32(splits))
    slot = pid
    ids_start = pl.multiple_of(bk * cap + split * chunk, 4)
  with jax.named_scope("inputs"):
    # Copies start on aligned rows/words: 8 rows for the tiled q tile, 16 bytes for 1-D ones.
    q_start = pl.multiple_of(lax.div(bk * g, 8) * 8, 8)
    plgpu.copy_gmem_to_smem(q_gmem.at[pl.ds(q_start, q_rows)], q_smem.at[pl.ds(0, q_rows)],
                            bars.at[0])
    plgpu.copy_gmem_to_smem(thr_gmem.at[pl.ds(q_start, q_rows)],
                            thr_smem.at[pl.ds(0, q_rows)], bars.at[1])
    plgpu.copy_gmem_to_smem(kept_gmem.at[pl.ds(ids_start, ids_smem.shape[0])],
                            marg_smem if scan else ids_smem, bars.at[2])
    if balance is None:
      cnt_start = pl.multiple_of(lax.div(bk, 4) * 4, 4)
      plgpu.copy_gmem_to_smem(cnt_gmem.at[pl.ds(cnt_start, 4)], cnt_smem, bars.at[3])
    for i in range(3 if balance is not None else 4):
      plgpu.barrier_wait(bars.at[i])
  if scan:  # this program's blocks split + splits * [0, chunk): keep margin >= cut
    n_entries = _select_in_kernel(marg_smem, ids_smem, tri_smem, sel_cnt_smem,
                                  cnt_smem[lax.rem(bk, 4)], split, splits,
                                  lax.div(n - split + (splits - 1), jnp.int32(splits)),
                                  chunk=chunk, interpret=interpret)
  elif balance is not None:
    n_entries = jnp.where(active, stop - first, 0)
  else:
    count = jnp.minimum(cnt_smem[lax.rem(bk, 4)], cap)
    n_entries = jnp.clip(count - split * chunk, 0, chunk)
  n_steps = lax.div(n_entries + (per_step - 1), jnp.int32(per_step))
  row = plgpu.Layout.WGMMA.reduce(1)
  thr = _mgpu.load_with_layout(thr_smem, row, interpret) * _LOG2E
  scale = 1.0 / math.sqrt(d)
  first_block = bk * n
  col = _mgpu.broadcasted_iota(jnp.int32, (_ROWS, p), 1, plgpu.Layout.WGMMA, interpret)
  thr_b = lax.broadcast_in_dim(thr, (_ROWS, p), [0])

  def group_rows(x_smem):  # the rows written out of a [64] per-row result: the group's rows
    # when G % 4 == 0 (then a 16-byte aligned window of 4*G bytes), else all 64
    return x_smem.at[pl.ds(bk * g - q_start, g)] if g % 4 == 0 else x_smem

  def block(j):  # global block number of kept entry j (clamped: entries past count are junk)
    return first_block + jnp.clip(ids_smem[j + ids_off], 0, n - 1)

  def max_step(idx, *refs):  # max_only: the valid kept keys' max score, natural units
    *refs, (m,) = refs
    k_refs, len_refs = refs[:per_step], refs[per_step:]
    (i,) = idx
    if interpret:
      scores = [lax.dot_general(q_smem[...], k_ref[...], (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32) for k_ref in k_refs]
    else:
      def qk_only(*s_refs):
        for s_ref, k_ref in zip(s_refs, k_refs):
          plgpu.wgmma(s_ref, q_smem, plgpu.transpose_ref(k_ref, (1, 0)))
        return [s_ref[...] for s_ref in s_refs]
      scores = pl.run_scoped(qk_only, *[plgpu.ACC((_ROWS, p), jnp.float32)] * per_step)
    for t in range(per_step):
      j = i * per_step + t
      length = jnp.where(j < n_entries, len_refs[t][lax.rem(block(j), _LEN_WINDOW)], 0)
      m = jnp.maximum(m, jnp.where(col < length, scores[t] * scale, MASK_VALUE).max(axis=1))
    return (m,)

  def step(idx, *refs):
    *refs, carry = refs
    k_refs, v_refs, len_refs = refs[:per_step], refs[per_step:2 * per_step], refs[2 * per_step:]
    acc, m, l, c = carry
    (i,) = idx

    def qk(*s_refs):
      for s_ref, k_ref in zip(s_refs, k_refs):
        plgpu.wgmma(s_ref, q_smem, plgpu.transpose_ref(k_ref, (1, 0)))
      return [s_ref[...] for s_ref in s_refs]

    if interpret:  # jax 0.10.2's interpreter has no transposed WGMMA operand
      scores = [lax.dot_general(q_smem[...], k_ref[...], (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32) for k_ref in k_refs]
    else:
      scores = pl.run_scoped(qk, *[plgpu.ACC((_ROWS, p), jnp.float32)] * per_step)
    keeps, s2s = [], []
    m_new = m
    for t in range(per_step):
      j = i * per_step + t
      length = jnp.where(j < n_entries, len_refs[t][lax.rem(block(j), _LEN_WINDOW)], 0)
      s2 = scores[t] * (scale * _LOG2E)  # log2 units; thr_b is too
      keep = (col < length) & (s2 >= thr_b)
      s2 = jnp.where(keep, s2, MASK_VALUE)
      m_new = jnp.maximum(m_new, s2.max(axis=1))
      keeps.append(keep)
      s2s.append(s2)
    alpha = jnp.exp2(m - m_new)
    m_b = lax.broadcast_in_dim(m_new, (_ROWS, p), [0])
    # No mask on the exponentials: a masked score is MASK_VALUE, so its term is exp2(-huge) = 0
    # once the row has a kept key; before that (m_new = MASK_VALUE) the terms are exp2(0) = 1,
    # junk that the rescale alpha = exp2(MASK_VALUE - m_new) = 0 clears when the first kept key
    # comes, and a row that never keeps a key is reported empty by its max, not by l.
    es = [jnp.exp2(s2 - m_b) for s2 in s2s]
    l = l * alpha + sum(e.sum(axis=1) for e in es)
    c = c + sum(jnp.where(keep, s2 * 0.0 + 1.0, 0.0).sum(axis=1)  # keys attended per row
                for keep, s2 in zip(keeps, s2s))
    acc = acc * lax.broadcast_in_dim(alpha, (_ROWS, d), [0])

    def pv(pv_ref):
      for e, v_ref in zip(es, v_refs):
        plgpu.wgmma(pv_ref, e.astype(dtype), v_ref)
      return pv_ref[...]

    # A fresh accumulator and an add rather than run_state on `acc`: the same code then
    # runs in the CPU interpreter, which has no rule for run_state (64 adds a thread a step).
    if interpret:  # nor a WGMMA with its A operand in registers
      for e, v_ref in zip(es, v_refs):
        acc = acc + jnp.dot(e.astype(dtype), v_ref[...], preferred_element_type=jnp.float32)
    else:
      acc = acc + pl.run_scoped(pv, plgpu.ACC((_ROWS, d), jnp.float32))
    return acc, m_new, l, c

  def kv_spec(t, transforms):
    return plgpu.BlockSpec((p, d), lambda i: (block(i * per_step + t), 0), transforms=transforms)

  def len_spec(t):  # the aligned window of block_len holding this block's length
    return plgpu.BlockSpec((_LEN_WINDOW,),
                           lambda i: (lax.div(block(i * per_step + t), _LEN_WINDOW),))

  @jax.named_scope("store")
  def _stores(write, scratch):  # the program's outputs; balanced: only a placed program's,
    # and the first program of each kv head also writes the head's number of programs
    if balance is None:
      pl.run_scoped(write, *scratch)
      return

    @pl.when(active)
    def _():
      pl.run_scoped(write, *scratch)

    @pl.when(active & (split == 0))
    def _():
      def write_nsplit(ns_smem):
        ns_smem[...] = _mgpu.layout_cast(jnp.full((_ROWS,), n_split, jnp.int32), row, interpret)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(ns_smem.at[pl.ds(0, 4)], nsplit_gmem.at[bk])
        plgpu.wait_smem_to_gmem(0)
      pl.run_scoped(write_nsplit, plgpu.SMEM((_ROWS,), jnp.int32))

  m0 = _mgpu.layout_cast(jnp.full((_ROWS,), MASK_VALUE, jnp.float32), row, interpret)
  if max_only:
    with jax.named_scope("pipeline"):
      (m,) = plgpu.emit_pipeline(
          max_step,
          grid=(n_steps,),
          in_specs=([kv_spec(t, k_transforms) for t in range(per_step)]
                    + [len_spec(t) for t in range(per_step)]),
          max_concurrent_steps=steps_in_flight,
          init_carry=(m0,),
      )(*[k_gmem] * per_step, *[blen_gmem] * per_step)

    def store_max(mx_smem):
      mx_smem[...] = m
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(group_rows(mx_smem), mx_gmem.at[slot])
      plgpu.wait_smem_to_gmem(0)

    _stores(store_max, [plgpu.SMEM((_ROWS,), jnp.float32)])
    return

  acc0 = _mgpu.layout_cast(jnp.full((_ROWS, d), 0.0, jnp.float32), plgpu.Layout.WGMMA,
                           interpret)
  l0 = _mgpu.layout_cast(jnp.full((_ROWS,), 0.0, jnp.float32), row, interpret)
  specs = ([kv_spec(t, k_transforms) for t in range(per_step)]
           + [kv_spec(t, v_transforms) for t in range(per_step)]
           + [len_spec(t) for t in range(per_step)])
  with jax.named_scope("pipeline"):
    acc, m, l, c = plgpu.emit_pipeline(
        step,
        grid=(n_steps,),
        in_specs=specs,
        max_concurrent_steps=steps_in_flight,
        init_carry=(acc0, m0, l0, l0),
    )(*[k_gmem] * per_step, *[v_gmem] * per_step, *[blen_gmem] * per_step)

  empty = m == MASK_VALUE  # no kept key in this program's blocks (see `es` above)
  l_safe = jnp.where(empty, 1.0, l)
  o = acc / lax.broadcast_in_dim(l_safe, (_ROWS, d), [0])
  lse = jnp.where(empty, EMPTY_LSE, m * _LN2 + jnp.log(l_safe))

  win = pl.ds(bk * g - q_start, g)

  def store(o_smem, lse_smem, n_smem):
    o_smem[...] = o
    n_smem[...] = c
    if lb_width is None:
      lse_smem[...] = lse
    else:
      lse_smem[...] = lax.broadcast_in_dim(lse, lse_smem.shape, [0])
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem.at[win], o_gmem.at[slot])
    plgpu.copy_smem_to_gmem(group_rows(lse_smem) if lb_width is None else lse_smem.at[win],
                            lse_gmem.at[slot])
    plgpu.copy_smem_to_gmem(group_rows(n_smem), n_gmem.at[slot])
    plgpu.wait_smem_to_gmem(0)

  lse_shape = (_ROWS,) if lb_width is None else (_ROWS, lb_width)
  _stores(store, [plgpu.SMEM((_ROWS, d), jnp.float32), plgpu.SMEM(lse_shape, jnp.float32),
                  plgpu.SMEM((_ROWS,), jnp.float32)])


#: The longest range of blocks one program scans in `select_attention` (its default).
_SCAN_MOST = 256


#: Programs of the attention kernel resident on one SM: its registers (213 a thread, 128
#: threads) and shared memory (88 KB with 4 steps in flight) each allow 2 (ncu, H200).
PROGRAMS_PER_SM = 2


def _sm_count() -> int:
  dev = jax.devices()[0]
  return int(getattr(dev, "core_count", 0) or 132) if dev.platform == "gpu" else 132


def default_blocks_per_program(cap: int, bk: int, *, per_sm: int = PROGRAMS_PER_SM,
                               most: int = 64) -> int:
  """Kept entries per program: the fewest that fit B*K*splits programs into `per_sm` on every
  SM (by default one wave), at least 4 and at most `most`. One wave because each
  program's blocks form a dependent chain: with 656 kept blocks a kv head (86 MB, H200) 20
  blocks a program (264 programs, one wave) took 27.2 us of GPU time against 32.5 for 12 (440
  programs, 1.7 waves: in the last wave SMs idle), and with 2048 (268 MB) 64 blocks a program
  69.7 us against 74.6 for 32 (benchmarks/results/kernel_waves.json)."""
  per = -(-cap * bk // (per_sm * _sm_count()))
  return int(min(most, max(4, -(-per // 4) * 4)))


def kernel_supports(q, keys) -> str | None:
  """None if the Mosaic GPU kernel takes these shapes/dtypes, else the reason it does not."""
  b, h, d = q.shape
  _, k, n, p, _ = keys.shape
  g = h // k
  if jnp.dtype(keys.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return (f"keys/values dtype {jnp.dtype(keys.dtype).name}: the kernel's WGMMA takes 16-bit "
            "operands (f32 would need tf32 with K-major values, which the P.V product is not)")
  if d % 64 or d > 256:
    return f"head dim {d}: the kernel needs a multiple of 64 up to 256"
  if p % 16 or p > 256:
    return f"block size P={p}: the kernel needs a multiple of 16 up to 256"
  if g > _ROWS - 7:
    return f"group size G={g}: the kernel takes at most {_ROWS - 7} query heads per kv head"
  return None


def _merge_pair(a, b):
  """Log-sum-exp merge of two normalized partials (lse, o) (the combiner of `merge_splits`):
  one exponential, of the smaller lse less the larger."""
  (la, oa), (lb, ob) = a, b
  a_big = la >= lb
  e = jnp.exp(-jnp.abs(la - lb))
  w = 1.0 + e
  o = jnp.where(a_big, oa + ob * e, ob + oa * e) / w
  return jnp.maximum(la, lb) + jnp.log(w), o


def merge_splits(o_part, lse_part, remainder):
  """o_part [B, K, S, G, D], lse_part [B, K, S, G] normalized partials -> (o, lse) [B, H..].

  One variadic reduction over the splits with `_merge_pair` as its combiner (the lse
  broadcast over D so both operands have one shape), and nothing after it unless a remainder
  is merged: the reduction of normalized partials is already the result (an empty partial,
  lse = EMPTY_LSE and o = 0, merges to one: EMPTY_LSE is finite and EMPTY_LSE + log(S) rounds
  to it). The reduction is a serial chain over the splits per output element, so the latency
  of its combiner is what it costs (benchmarks/merge_splits.py: H200, 8 kv heads x G 4 x D
  128, 33 splits: this form 5.1 us, of which 1.1 us the slice of lse out of its broadcast, a
  kernel only when nothing consumes it; the previous form, two exponentials a step and the
  epilogue of `merge_remainder` after it, 6.7 us in three kernels; the two-pass form 5.8 us
  in five). On a GPU the default is the merge kernel instead (`split_merge`: 86 MB of kept
  blocks, 33 splits, H200: the whole call 32.2 us against 33.3 with this reduction)."""
  b, k, s, g, d = o_part.shape
  lse_b = jnp.broadcast_to(lse_part.astype(jnp.float32)[..., None], o_part.shape)
  init = (jnp.float32(EMPTY_LSE), jnp.float32(0.0))
  lse, o = lax.reduce((lse_b, o_part.astype(jnp.float32)), init, _merge_pair, (2,))
  return with_remainder(o.reshape(b, k * g, d), lse[..., 0].reshape(b, k * g), remainder)


def with_remainder(o, lse, remainder):
  """Normalized (o, lse) with the remainder's mass merged in (`merge_remainder`), or as they
  are when remainder is None."""
  if remainder is None:
    return o, lse
  return merge_remainder(lse, jnp.where(lse <= EMPTY_LSE / 2, 0.0, 1.0), o, remainder)


def _ranges(entries: int, bk: int, config: GatheredAttentionConfig, scan: bool):
  """(chunk, splits): the kept entries (or, scan, blocks) each program takes, and the programs
  per kv head."""
  per_step = config.blocks_per_step
  # the in-kernel selection scans every block and reads the few kept: its programs are short,
  # so it keeps ~4 programs an SM (2-layer 8B decode at 128K, H100: 64 blocks a program
  # 0.886-0.888 ms of GPU time a step, one wave of 128 blocks a program 0.892)
  chunk = config.blocks_per_program or default_blocks_per_program(
      entries, bk, most=_SCAN_MOST if scan else 64,
      per_sm=2 * PROGRAMS_PER_SM if scan else PROGRAMS_PER_SM)
  chunk = -(-chunk // (4 * per_step)) * 4 * per_step
  if scan:  # whole 64-block steps of the in-kernel selection
    chunk = -(-chunk // _SEL) * _SEL
  return chunk, -(-entries // chunk)


def interleave_margins(margin, config: GatheredAttentionConfig = GatheredAttentionConfig()):
  """margin [B, K, N] in block order -> [B, K, S * C] in the order `select_attention`'s S
  programs of C blocks read them (program s: blocks s, s + S, s + 2S, ...; MASK_VALUE past N).
  Done by `select_attention` unless its margins come interleaved (interleaved=True): a caller
  that computes the margins can fuse this transposition into their producer."""
  b, k, n = margin.shape
  chunk, splits = _ranges(n, b * k, config, True)
  m = jnp.pad(margin.astype(jnp.float32), ((0, 0), (0, 0), (0, splits * chunk - n)),
              constant_values=MASK_VALUE)
  return jnp.swapaxes(m.reshape(b, k, chunk, splits), 2, 3).reshape(b, k, splits * chunk)


def _launch(q, keys, values, block_len, kept, kept_count, threshold, *,
            config: GatheredAttentionConfig, interpret: bool, scan: bool = False):
  """Runs the kernel; values None runs the keys-only max pass. Returns per-split partials:
  attention (o [B,K,S,G,D], lse [B,K,S,G], attended [B,K,S,G]); max pass: max [B,K,S,G].
  scan: kept is `interleave_margins`' [B,K,S*C] f32 and kept_count a cut [B,K] f32; each
  program scans its C blocks and reads those with margin >= cut."""
  from jax.experimental.pallas import mosaic_gpu as plgpu

  max_only = values is None
  b, h, d, k, n, p, g, cap = _check_shapes(q, keys, keys if max_only else values, block_len,
                                           kept, kept_count, threshold)
  dtype = keys.dtype
  bk = b * k
  per_step = config.blocks_per_step
  chunk, splits = _ranges(n if scan else cap, bk, config, scan)
  if scan and cap != splits * chunk:
    raise ShapeError(f"margins of {cap} entries a kv head, expected {splits * chunk} (the "
                     f"interleaved layout of {n} blocks: interleave_margins)")
  kept = kept.astype(jnp.float32 if scan else jnp.int32)
  if cap % 4:  # 1-D copies start on 16-byte boundaries: a copy of kept, for odd capacities
    kept = jnp.pad(kept, ((0, 0), (0, 0), (0, 4 - cap % 4)))
    cap = kept.shape[2]
  balance = None
  programs = bk * splits
  window = chunk
  cnt_len = 4
  if not scan and config.balanced and config.blocks_per_program is None:
    balance, splits, programs, window = _balance_layout(cap, bk, per_step, config)
    cnt_len = -(-bk // 4) * 4
  lb_width = (split_merge.merge_width(g, d, splits)
              if not max_only and config.split_merge == "kernel" else None)
  flat = dict(q=q.astype(dtype).reshape(b * h, d), thr=threshold.astype(jnp.float32).reshape(-1),
              kept=kept.reshape(-1),
              cnt=kept_count.astype(jnp.float32 if scan else jnp.int32).reshape(-1),
              blen=block_len.astype(jnp.int32).reshape(-1))
  q_rows = -(-(g + 7) // 8) * 8   # q rows read per program: the group from an 8-row boundary
  # TMA windows: a tiled copy needs the rows in whole 8-row tiles, and no window may be larger
  # than its array; past the end of an array the GPU's TMA reads zeros, so the last windows
  # need no padding there (the interpreter does need it).
  tail = interpret
  want = dict(q=-(-max(b * h, q_rows) // 8) * 8 + (q_rows if tail else 0),
              thr=max(b * h, q_rows) + (q_rows if tail else 0),
              kept=max(bk * cap, window) + (window if tail else 0),
              cnt=max(bk, cnt_len) + (4 if tail else 0),
              blen=max(bk * n, _LEN_WINDOW) + (_LEN_WINDOW if tail else 0))
  for name, size in want.items():
    x = flat[name]
    if size > x.shape[0]:
      flat[name] = jnp.pad(x, ((0, size - x.shape[0]),) + ((0, 0),) * (x.ndim - 1))

  _, qk_t = _mgpu.smem_transforms(d, dtype)
  _, sel_t = _mgpu.smem_transforms(_SEL, jnp.bfloat16)
  # The P.V product contracts over P: its swizzle must also divide a P-row of the tile.
  _, v_t = _mgpu.smem_transforms(d, dtype, at_most=_mgpu.swizzle_for(p, dtype))
  body = functools.partial(
      _attention_kernel, splits=splits, g=g, n=n, cap=cap, chunk=chunk, p=p, d=d, dtype=dtype,
      q_rows=q_rows, per_step=per_step, k_transforms=qk_t, v_transforms=v_t,
      steps_in_flight=config.steps_in_flight, interpret=interpret, max_only=max_only,
      scan=scan, balance=balance, lb_width=lb_width, pdl=config.pdl and lb_width is not None)
  kw = {"interpret": _mgpu.interpret_params(True)} if interpret else {}
  slots = bk * splits  # output rows: program (kv head, split) writes row kv head * splits + split
  rows_sds = jax.ShapeDtypeStruct((slots, g if g % 4 == 0 else _ROWS), jnp.float32)
  lse_sds = (rows_sds if lb_width is None else
             jax.ShapeDtypeStruct((slots, g, lb_width), jnp.float32))
  out_type = ((rows_sds,) if max_only else
              (jax.ShapeDtypeStruct((slots, g, d), jnp.float32), lse_sds, rows_sds))
  if balance is not None:
    out_type = out_type + (jax.ShapeDtypeStruct((bk, 4), jnp.int32),)
  inputs = [flat["q"], flat["thr"], flat["kept"], flat["cnt"], flat["blen"], keys.reshape(-1, d)]
  if not max_only:
    inputs.append(values.reshape(-1, d))
  out = plgpu.kernel(
      body,
      out_type=out_type,
      grid=(programs,),
      grid_names=("p",),
      kernel_name="alaya_kept_max" if max_only else (
          "alaya_select_attention" if scan else "alaya_gathered_attention"),
      compiler_params=None if interpret else plgpu.CompilerParams(
          approx_math=True, **({} if config.profile_dir is None else dict(
              profile_space=16, profile_dir=config.profile_dir))),
      scratch_types=[
          plgpu.SMEM((_ROWS, d), dtype, transforms=qk_t),
          plgpu.SMEM((_ROWS,), jnp.float32),
          plgpu.SMEM((window,), jnp.int32),
          plgpu.SMEM((cnt_len,), jnp.float32 if scan else jnp.int32),
          plgpu.Barrier(num_barriers=4),
          *([plgpu.SMEM((chunk,), jnp.float32),
             plgpu.SMEM((_SEL, _SEL), jnp.bfloat16, transforms=sel_t),
             plgpu.SMEM((_SEL,), jnp.float32)] if scan else []),
      ],
      **kw,
  )(*inputs)
  # row outputs of kv head bk: its G rows, or (G % 4 != 0) its 64-row window, in which they
  # start at (bk*G) % 8 (static offsets)
  rows = jnp.asarray((np.arange(bk) * g % 8)[:, None, None] + np.arange(g))  # [bk, 1, G]
  pick = lambda x: (x if g % 4 == 0 else jnp.take_along_axis(
      x.reshape(bk, splits, _ROWS), rows, axis=2)).reshape(b, k, splits, g)
  if balance is None:
    valid = lambda x, empty: x
    count = jnp.full((bk, 4), splits, jnp.int32)  # (a constant)
  else:  # rows past a head's programs were never written
    *out, nsplit = out
    count = nsplit  # its first column
    live = (jnp.arange(splits)[None, :] < nsplit[:, :1]).reshape(b, k, splits, 1)
    valid = lambda x, empty: jnp.where(live.reshape(live.shape + (1,) * (x.ndim - 4)), x, empty)
  if max_only:
    return valid(pick(out[0]), MASK_VALUE)
  if lb_width is not None:  # the merge kernel's inputs (it masks the rows past count itself)
    o_part, lb_part, n_part = out
    return _Partials(o_part.reshape(bk, splits, g, d), lb_part.reshape(bk, splits, g, lb_width),
                     count, valid(pick(n_part), 0.0))
  o_part, lse_part, n_part = out
  return (valid(o_part.reshape(b, k, splits, g, d), 0.0), valid(pick(lse_part), EMPTY_LSE),
          valid(pick(n_part), 0.0))


class _Partials(NamedTuple):
  """`_launch`'s output for `split_merge.merge_partials`; n_part as in the XLA merge's."""
  o_part: jax.Array   # [BK, S, G, D]
  lb_part: jax.Array  # [BK, S, G, W]
  count: jax.Array    # [BK, 4] int32, the count in the first column
  n_part: jax.Array   # [B, K, S, G]


@functools.partial(jax.jit, static_argnames=("config", "interpret", "with_counts", "scan"))
def _gathered_attention_mgpu(q, keys, values, block_len, kept, kept_count, threshold,
                             remainder, *, config: GatheredAttentionConfig, interpret: bool,
                             with_counts: bool = False, scan: bool = False):
  b, h = threshold.shape
  parts = _launch(q, keys, values, block_len, kept, kept_count, threshold, config=config,
                  interpret=interpret, scan=scan)
  if isinstance(parts, _Partials):
    o, lse = split_merge.merge_partials_rows(parts.o_part, parts.lb_part, parts.count,
                                             interpret=interpret, pdl=config.pdl)
    o, lse = with_remainder(o.reshape(b, h, -1), lse.reshape(b, h), remainder)
    n_part = parts.n_part
  else:
    o_part, lse_part, n_part = parts
    o, lse = merge_splits(o_part, lse_part, remainder)
  if not with_counts:
    return o, lse
  return o, lse, jnp.round(n_part.sum(axis=2)).astype(jnp.int32).reshape(b, h)


@functools.partial(jax.jit, static_argnames=("config", "interpret", "scan"))
def _kept_max_mgpu(q, keys, block_len, kept, kept_count, *, config, interpret, scan=False):
  b, h, _ = q.shape
  thr = jnp.full((b, h), MASK_VALUE, jnp.float32)
  mx = _launch(q, keys, None, block_len, kept, kept_count, thr, config=config,
               interpret=interpret, scan=scan)
  return mx.max(axis=2).reshape(b, h)


def kept_max_reference(q, keys, block_len, kept, kept_count):
  """max over the valid keys of the kept blocks of q.k/sqrt(D) (q cast to the key dtype),
  per query head: [B, H] f32, MASK_VALUE where nothing is kept."""
  return exact_dipr_threshold(q, keys, block_len, kept, kept_count, 0.0)


def kept_max(
    q,            # [B, H, D]
    keys,         # [B, K, N, P, D]
    block_len,    # [B, K, N] int32
    kept,         # [B, K, cap] int32
    kept_count,   # [B, K] int32
    *,
    impl: str | None = None,
    config: GatheredAttentionConfig = GatheredAttentionConfig(),
    interpret: bool = False,
):
  """The max score over the valid keys of the kept blocks per query head ([B, H] f32,
  MASK_VALUE where nothing is kept): a scores-only pass of the same kernel that reads the
  keys and not the values. With it, `gathered_attention` at threshold max - beta is exact
  DIPR over the kept blocks (see `exact_dipr_threshold`)."""
  impl = _mgpu.resolve_impl(impl, interpret, "kept_max")
  if impl == "xla":
    return kept_max_reference(q, keys, block_len, kept, kept_count)
  why = kernel_supports(q, keys)
  if why:
    raise NotImplementedError(f"kept_max(impl='pallas'): {why}")
  return _kept_max_mgpu(q, keys, block_len, kept, kept_count, config=config,
                        interpret=interpret)


def gathered_attention(
    q,            # [B, H, D]
    keys,         # [B, K, N, P, D]
    values,       # [B, K, N, P, D]
    block_len,    # [B, K, N] int32
    kept,         # [B, K, cap] int32
    kept_count,   # [B, K] int32
    threshold,    # [B, H] f32
    *,
    remainder=None,
    impl: str | None = None,
    config: GatheredAttentionConfig = GatheredAttentionConfig(),
    interpret: bool = False,
    with_counts: bool = False,
):
  """Sparse decode attention over the kept blocks; see the module docstring for the contract.

  impl: "pallas" (Mosaic GPU kernel; on the CPU only with interpret=True), "xla" (the jnp
  reference under XLA) or None (pallas on a GPU, xla elsewhere). An unsupported dtype or
  shape under "pallas" raises NotImplementedError naming it.
  Returns (o [B, H, D] f32, lse [B, H] f32), and with_counts: also attended [B, H] int32,
  the keys each query head attended (valid members of kept blocks at or above threshold).
  """
  impl = _mgpu.resolve_impl(impl, interpret, "gathered_attention")
  if impl == "xla":
    return gathered_attention_reference(q, keys, values, block_len, kept, kept_count,
                                        threshold, remainder=remainder, with_counts=with_counts)
  why = kernel_supports(q, keys)
  if why:
    raise NotImplementedError(f"gathered_attention(impl='pallas'): {why}")
  return _gathered_attention_mgpu(q, keys, values, block_len, kept, kept_count, threshold,
                                  remainder, config=config, interpret=interpret,
                                  with_counts=with_counts)


def select_attention_reference(q, keys, values, block_len, margin, cut, threshold, *,
                               remainder=None, with_counts: bool = False):
  """`select_attention` in jnp: every block read, the blocks under the cut given no members."""
  return gathered_attention_reference(q, keys, values, *_every_block(block_len, margin, cut),
                                      threshold, remainder=remainder, with_counts=with_counts)


def _every_block(block_len, margin, cut):
  """(block_len, kept, kept_count) listing every block, those under the cut emptied."""
  b, k, n = margin.shape
  live = jnp.where(margin >= cut[..., None], block_len, 0)
  every = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, k, n))
  return live, every, jnp.full((b, k), n, jnp.int32)


def select_attention(
    q,            # [B, H, D]
    keys,         # [B, K, N, P, D]
    values,       # [B, K, N, P, D]
    block_len,    # [B, K, N] int32
    margin,       # [B, K, N] f32   block j of kv head (b, k) is read iff margin >= cut
    cut,          # [B, K] f32
    threshold,    # [B, H] f32
    *,
    remainder=None,
    impl: str | None = None,
    config: GatheredAttentionConfig = GatheredAttentionConfig(),
    interpret: bool = False,
    with_counts: bool = False,
    interleaved: bool = False,
):
  """`gathered_attention` over the blocks whose margin reaches the cut, with the selection
  done inside the kernel: program s of S per kv head scans the blocks s, s + S, s + 2S, ...
  (`blocks_per_program` of them; default: enough programs for ~4 per SM, at most 256 blocks
  each; interleaved so that runs of kept blocks, e.g. neighbouring clusters, spread over the
  programs), lists those with margin >= cut in shared memory (`_select_in_kernel`: prefix
  counts on the tensor cores, no scalar scan) and reads them as `gathered_attention` reads
  its kept list. No compaction runs before it (on a GPU the XLA kept list is ~9 small
  kernels); there is no capacity: every block at or above the cut is read. Same contract
  otherwise.

  Measured: in the 32-layer decode loop at 128K (8B shapes, H200, the optimizer's one_pass
  plan, capacity 5%) 7.54 ms/token against 7.62 with the XLA compaction in one call, 7.44
  against 7.41 in another (equal within noise), 12 fewer kernel launches per step of a
  2-layer model; alone, on uniformly random kept blocks
  (benchmarks/kernels.py, H100), it is slower than margins + compaction + attention: 128K 1%
  26.6 against 20.7 us GPU time, 1M 1% 79.6 against 71.0 (each program's selection adds to
  its latency, and every program runs it).

  interleaved: margin is already `interleave_margins(margin, config)` (same config)."""
  impl, margin = _select_inputs("select_attention", q, keys, block_len, margin, cut, impl=impl,
                                interpret=interpret, interleaved=interleaved, config=config)
  if impl == "xla":
    return select_attention_reference(q, keys, values, block_len, margin, cut, threshold,
                                      remainder=remainder, with_counts=with_counts)
  return _gathered_attention_mgpu(q, keys, values, block_len, margin, cut, threshold, remainder,
                                  config=config, interpret=interpret, with_counts=with_counts,
                                  scan=True)


def _check_margin(block_len, margin, cut, interleaved=False, config=None):
  want = block_len.shape
  if interleaved:
    b, k, n = block_len.shape
    chunk, splits = _ranges(n, b * k, config, True)
    want = (b, k, splits * chunk)
  if margin.shape != want or cut.shape != margin.shape[:2]:
    raise ShapeError(f"margin {margin.shape} must have the shape {want} ("
                     f"{'interleave_margins of ' if interleaved else ''}block_len's "
                     f"{block_len.shape}), cut {cut.shape} its first two axes")


def _select_inputs(op, q, keys, block_len, margin, cut, *, impl, interpret, interleaved,
                   config):
  """The dispatch `select_attention` and `select_max` share: (impl, margin), the margins in
  block order for the jnp reference and interleaved for the kernel."""
  impl = _mgpu.resolve_impl(impl, interpret, op)
  _check_margin(block_len, margin, cut, interleaved, config)
  if impl == "xla":
    return impl, _block_order(margin, block_len.shape[2], config) if interleaved else margin
  why = kernel_supports(q, keys)
  if why:
    raise NotImplementedError(f"{op}(impl='pallas'): {why}")
  return impl, margin if interleaved else interleave_margins(margin, config)


def _block_order(margin, n_blocks: int, config):
  """The inverse of `interleave_margins` (for the jnp references)."""
  b, k, _ = margin.shape
  chunk, splits = _ranges(n_blocks, b * k, config, True)
  m = jnp.swapaxes(margin.reshape(b, k, splits, chunk), 2, 3).reshape(b, k, -1)
  return m[..., :n_blocks]


def select_max(
    q,            # [B, H, D]
    keys,         # [B, K, N, P, D]
    block_len,    # [B, K, N] int32
    margin,       # [B, K, N] f32
    cut,          # [B, K] f32
    *,
    impl: str | None = None,
    config: GatheredAttentionConfig = GatheredAttentionConfig(),
    interpret: bool = False,
    interleaved: bool = False,
):
  """`kept_max` over the blocks whose margin reaches the cut, selected inside the kernel as
  in `select_attention` (interleaved: likewise)."""
  impl, margin = _select_inputs("select_max", q, keys, block_len, margin, cut, impl=impl,
                                interpret=interpret, interleaved=interleaved, config=config)
  if impl == "xla":
    return kept_max_reference(q, keys, *_every_block(block_len, margin, cut))
  return _kept_max_mgpu(q, keys, block_len, margin, cut, config=config, interpret=interpret,
                        scan=True)
