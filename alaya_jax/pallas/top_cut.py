"""The capacity's cut on the block margins in one Mosaic GPU kernel (`top_cap_cut`).

`sparse_decode.top_cap_cut` finds, per row of margins, the threshold that keeps the best
`cap` blocks up to a grid's resolution: the passing count and the best margin, then `rounds`
rounds of `bins` counts over a grid of edges. In XLA on a GPU that is ~8 small kernels a
layer (the best and count, per round the edges, the counts, the first edge that holds, the
update; ~12-15 us a layer at 128K, 8B shapes, H200). Here one program per row loads the
row into shared memory (TMA, boxes of up to 256 rows of 64) and runs every pass out of it:
each thread keeps its share of the counts of every edge in registers, reduced once a round.
When every passing block fits the capacity (a calibrated index, mostly) the rounds are skipped:
one pass over the row, cut 0.

The grid: `bins` ** `rounds` levels over (0, best]. The kernel's default is 4 bins in 5 rounds,
the same 1024 levels as the XLA form's 32 bins in 2 (every level is a multiple of best / 1024,
and each round keeps the first edge that holds, so both find the lowest level that holds). A
round costs ~0.3 us + 0.08 us a bin (each bin's count is a reduction over the warpgroup): at
128K, 8B shapes, H200, alone, 32 x 2 took 7.30 us, 16 x 2 4.54, 8 x 3 4.16, 32 x 1 4.26, the
early exit 1.47 (`benchmarks/ncu_attention.py --kernel cut --gpu [--bins B --rounds R]`).

Same semantics as `top_cap_cut` (see there): returns (cut [R] f32, needed [R] int32); the kept
set is margin >= cut. The grid's edges are computed once and used both for the counts and
for the cut, so the kept set never exceeds the capacity when the counts say it fits; against
the XLA form the cut may differ where an edge rounds differently (a multiply-add contracted
in one and not the other), which moves it by at most one grid step's worth of blocks.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from alaya_jax.errors import ShapeError
from alaya_jax.pallas import _mgpu

_COLS = 64          # a row of margins viewed as [N / 64, 64]
_CHUNK_ROWS = 8     # one pass step: [8, 64] = 512 margins, 4 a thread
_BOX_ROWS = 256     # a TMA box dimension holds at most 256
#: Margins per row the kernel holds in shared memory (f32).
MAX_BLOCKS = 48 * 1024
#: At or above this a margin counts as forced (sparse_decode._FORCED).
FORCED = 1e29


def padded_blocks(n: int) -> int:
  """N rounded up to whole [8, 64] chunks (the shared-memory row)."""
  step = _CHUNK_ROWS * _COLS
  return -(-n // step) * step


def kernel_supports(n: int) -> str | None:
  if padded_blocks(n) > MAX_BLOCKS:
    return f"{n} blocks a kv head: the kernel holds at most {MAX_BLOCKS} in shared memory"
  return None


#: The kernel's default grid: 4 ** 5 = 1024 levels, as `sparse_decode.top_cap_cut`'s 32 ** 2.
BINS, ROUNDS = 4, 5


def top_cap_cut_mgpu(margin, cap: int, bins: int = BINS, rounds: int = ROUNDS,
                     forced: bool = True, *, interpret: bool = False):
  """`sparse_decode.top_cap_cut` (same signature and results up to edge rounding) as one
  Mosaic GPU kernel; interpret=True runs it in the CPU interpreter. Its default grid has the
  XLA form's levels (module docstring), in more rounds of fewer bins."""
  if margin.ndim != 2:
    raise ShapeError(f"margin {margin.shape} must be [R, N]")
  R, N = margin.shape
  why = kernel_supports(N)
  if why:
    raise NotImplementedError(f"top_cap_cut_mgpu: {why}")
  if cap >= N:
    return (jnp.zeros((R,), jnp.float32),
            jnp.sum(margin >= 0, -1, dtype=jnp.int32))
  return _cut_mgpu(margin, cap=cap, bins=bins, rounds=rounds, forced=forced,
                   interpret=interpret)


def _cut_kernel(m_gmem, cut_gmem, need_gmem, m_smem, bars, *, rows, cap, bins, rounds, forced,
                interpret):
  """Program r: row r of the margins ([rows, 64] of the [R * rows, 64] view), in shared
  memory as [rows rounded up to 8, 64] with -1 (never passing) past its end."""
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import mosaic_gpu as plgpu

  r = lax.axis_index("p")
  shape = (_CHUNK_ROWS, _COLS)
  strided = None if interpret else plgpu.Layout.WG_STRIDED(shape, vec_size=4)
  full = lambda v: _mgpu.layout_cast(jnp.full(shape, v, jnp.float32), strided, interpret)
  n_chunks = m_smem.shape[0] // _CHUNK_ROWS
  if rows % _CHUNK_ROWS:  # the last chunk's rows past the row: -1 before the copies land
    m_smem.at[pl.ds((n_chunks - 1) * _CHUNK_ROWS, _CHUNK_ROWS)][...] = full(-1.0)
    plgpu.commit_smem()
  boxes = [(lo, min(_BOX_ROWS, rows - lo)) for lo in range(0, rows, _BOX_ROWS)]
  for i, (lo, size) in enumerate(boxes):
    plgpu.copy_gmem_to_smem(m_gmem.at[pl.ds(r * rows + lo, size)], m_smem.at[pl.ds(lo, size)],
                            bars.at[i])
  for i in range(len(boxes)):
    plgpu.barrier_wait(bars.at[i])

  bcast = lambda s: jnp.broadcast_to(s, shape)  # a scalar over the chunk (explicit: the
  # warpgroup's select and compares have no implicit broadcast)
  chunk = lambda c: _mgpu.load_with_layout(
      m_smem.at[pl.ds(pl.multiple_of(c * _CHUNK_ROWS, _CHUNK_ROWS), _CHUNK_ROWS)], strided,
      interpret)
  zero, one = full(0.0), full(1.0)

  def first_pass(c, carry):  # how many pass, and the best margin that is not forced
    cnt, best = carry
    x = chunk(c)
    passing = x >= zero
    ok = (passing & (x < full(FORCED))) if forced else passing
    return cnt + jnp.where(passing, one, zero), jnp.maximum(best, jnp.where(ok, x, zero))

  cnt, best = lax.fori_loop(0, n_chunks, first_pass, (zero, zero))
  needed = jnp.sum(cnt)
  best = jnp.max(best)
  best_b = bcast(best)

  need_gmem[r] = needed

  @pl.when(needed <= cap)  # everything passing fits: no rounds, cut 0
  def _():
    cut_gmem[r] = jnp.float32(0.0)

  @pl.when(needed > cap)
  def _():
    lo, hi = jnp.float32(0.0), best
    for _ in range(rounds):
      # the edges, increasing, the last exactly hi: each used for its count and, if chosen,
      # as the cut itself (one value: the kept set is what was counted)
      edges = [lo + (hi - lo) * (jnp.float32(j + 1) / bins) for j in range(bins - 1)] + [hi]

      def count_pass(c, counts, edges=edges):
        x = chunk(c)
        v = jnp.where(x >= zero, jnp.minimum(x, best_b) if forced else x, full(-1.0))
        return tuple(n + jnp.where(v >= bcast(e), one, zero) for n, e in zip(counts, edges))

      counts = lax.fori_loop(0, n_chunks, count_pass, (zero,) * bins)
      counts = [jnp.sum(n) for n in counts]
      # counts fall along the edges: the first edge that holds is the number that do not
      j = functools.reduce(jnp.add, [jnp.where(n > cap, 1, 0) for n in counts])
      pick = lambda i: functools.reduce(
          lambda acc, ke: jnp.where(i == ke[0], ke[1], acc), enumerate(edges), jnp.float32(0.0))
      new_hi, new_lo = pick(j), pick(j - 1)
      lo = jnp.where((j < bins) & (j > 0), new_lo, lo)
      hi = jnp.where(j < bins, new_hi, hi)
    cut_gmem[r] = hi


@functools.partial(jax.jit, static_argnames=("cap", "bins", "rounds", "forced", "interpret"))
def _cut_mgpu(margin, *, cap, bins, rounds, forced, interpret):
  from jax.experimental.pallas import mosaic_gpu as plgpu

  R, N = margin.shape
  m = margin.astype(jnp.float32)
  if N % _COLS:  # (large indexes have a multiple of 64 blocks: no copy there)
    m = jnp.pad(m, ((0, 0), (0, -N % _COLS)), constant_values=-1.0)
  rows = m.shape[1] // _COLS
  body = functools.partial(_cut_kernel, rows=rows, cap=cap, bins=bins, rounds=rounds,
                           forced=forced, interpret=interpret)
  kw = {"interpret": _mgpu.interpret_params(True)} if interpret else {}
  cut, needed = plgpu.kernel(
      body,
      out_type=(jax.ShapeDtypeStruct((R,), jnp.float32),
                jax.ShapeDtypeStruct((R,), jnp.float32)),
      grid=(R,),
      grid_names=("p",),
      kernel_name="alaya_top_cut",
      scratch_types=[plgpu.SMEM((-(-rows // _CHUNK_ROWS) * _CHUNK_ROWS, _COLS), jnp.float32),
                     plgpu.Barrier(num_barriers=-(-rows // _BOX_ROWS))],
      **kw,
  )(m.reshape(R * rows, _COLS))
  return cut, jnp.round(needed).astype(jnp.int32)
