"""The log-sum-exp merge of a split attention's partials (Mosaic GPU).

The gathered-attention kernel splits each kv head's kept list over several programs; each
writes a normalized partial (o and its lse). Merging them:

    o_part   [BK, S, G, D] f32   normalized partial outputs
    lb_part  [BK, S, G, W] f32   their lse, broadcast over W columns (W from `merge_width`)
    count    [BK] int32          partials of each kv head: rows s >= count are ignored
                                 (never written, they may hold anything, NaN included)
    ->  o [BK, G, D] f32, lse [BK, G] f32  (an all-empty head, or count 0: o = 0,
                                            lse = EMPTY_LSE)

Why a kernel: XLA reduces over the splits with one serial chain per output element, each step
a load from L2 whose latency is the cost (4.7 us for 33 partials of 8 kv heads x 4 x 128 on an
H200, benchmarks/merge_kernel.py). Here each program (a kv head x W of the D columns) loads
all its partials in one TMA copy, then merges them out of shared memory in two passes (the max,
then the weights), four partials at a time, and stores o straight from registers. Tried and
not merged (session 17, branch `merge-registers`): every partial loaded from global memory
straight into registers, all loads in flight at once. It took 1.97 us against this kernel's
2.30 alone, but the same 2.7-2.9 us right after the attention kernel, and its unrolled loads
compiled for 64 s at 264 partials (H200; benchmarks/results/kernel_floor.json,
merge_kernel_loads.json).

The partials' lse comes broadcast over W columns because the merge runs elementwise in a
strided layout (G*W/128 values a thread), which has no broadcast of a per-row value (nor a
column slice: the merged lse leaves through shared memory, one scalar a row). Supported where G*W is a
multiple of 128 for some W dividing D (`merge_width`); elsewhere callers use the XLA merge.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from alaya_jax.errors import ShapeError
from alaya_jax.pallas import _mgpu
from alaya_jax.pallas._mgpu import EMPTY_LSE

#: Shared memory a merge program may take for its partials (two [S, G, W] f32 buffers).
_SMEM_BUDGET = 160 * 1024
#: Partials merged per loop step (independent chains that hide shared-memory latency).
_UNROLL = 4


def merge_width(g: int, d: int, s: int) -> int | None:
  """The W columns a merge program takes: the narrowest divisor of D with G*W a multiple of
  128 (the warpgroup's threads) and W*4 bytes a multiple of 16 (TMA), so that the most
  programs share the merge; None where none exists or the S partials overflow shared memory."""
  for w in (8, 16, 32, 64, 128, 256):
    if w <= d and d % w == 0 and (g * w) % 128 == 0:
      if 2 * _padded(s) * g * w * 4 > _SMEM_BUDGET:
        return None
      return w
  return None


def _padded(s: int) -> int:
  return -(-s // _UNROLL) * _UNROLL


def merge_partials_reference(o_part, lb_part, count):
  """`merge_partials` in jnp."""
  bk, s, g, d = o_part.shape
  valid = (jnp.arange(s)[None, :] < count[:, None])[..., None]      # [BK, S, 1]
  lse = jnp.where(valid, lb_part[..., 0], EMPTY_LSE)                 # [BK, S, G]
  o = jnp.where(valid[..., None], o_part, 0.0)
  m = jnp.max(lse, axis=1, initial=EMPTY_LSE)                        # [BK, G]
  w = jnp.exp(lse - m[:, None])
  l = jnp.sum(w, axis=1)
  l = jnp.where(l > 0, l, 1.0)  # S = 0
  return jnp.sum(w[..., None] * o, axis=1) / l[..., None], m + jnp.log(l)


def _check(o_part, lb_part, count):
  if o_part.ndim != 4 or lb_part.ndim != 4 or o_part.shape[:3] != lb_part.shape[:3]:
    raise ShapeError(f"o_part {o_part.shape} must be [BK, S, G, D] and lb_part "
                     f"{lb_part.shape} [BK, S, G, W] with the same first three axes")
  if count.shape != o_part.shape[:1]:
    raise ShapeError(f"count {count.shape} must be [BK] = {o_part.shape[:1]}")


def _check_width(o_part, lb_part):
  _, s, g, d = o_part.shape
  w = merge_width(g, d, s)
  if w is None or lb_part.shape[3] != w:
    raise ShapeError(f"lb_part {lb_part.shape}: the kernel's merge of {s} partials of G={g}, "
                     f"D={d} needs W = merge_width(G, D, S) = {w} columns")


def merge_partials(o_part, lb_part, count, *, impl: str | None = None,
                   interpret: bool = False):
  """(o [BK, G, D], lse [BK, G]) merged from S normalized partials; see the module docstring.
  impl: "pallas" (Mosaic GPU; on the CPU with interpret=True), "xla" or None (by backend)."""
  _check(o_part, lb_part, count)
  impl = _mgpu.resolve_impl(impl, interpret, "merge_partials")
  if impl == "xla":
    return merge_partials_reference(o_part, lb_part, count)
  _check_width(o_part, lb_part)
  rows = jnp.broadcast_to(count.astype(jnp.int32)[:, None], (count.shape[0], 4))
  return merge_partials_rows(o_part, lb_part, rows, interpret=interpret)


def merge_partials_rows(o_part, lb_part, count_rows, *, interpret: bool = False,
                        pdl: bool = False):
  """`merge_partials` (Mosaic GPU, no dispatch) with the counts as rows [BK, 4] int32 whose
  first column is the count: the attention kernel's balanced split writes them so, and
  slicing the column out would be a kernel of its own (~1 us on an H200). pdl: launched as a
  programmatic dependent of the kernel before it (`GatheredAttentionConfig.pdl`), the merge
  first waits for that grid with `griddepcontrol.wait`."""
  return _merge_partials_mgpu(o_part, lb_part, count_rows, interpret=interpret, pdl=pdl)


def _merge_kernel(o_gmem, lb_gmem, cnt_gmem, of_gmem, lf_gmem, o_smem, l_smem, c_smem, t_smem,
                  bars, *, s, g, w, col_chunks, vec, interpret, pdl):
  """Program pid: kv head pid // col_chunks, columns (pid % col_chunks) * W + [0, W)."""
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import mosaic_gpu as plgpu

  if pdl and not interpret:  # launched early: the partials are complete only after this
    plgpu.griddepcontrol_wait()

  pid = lax.axis_index("p")
  head = lax.div(pid, jnp.int32(col_chunks))
  col = lax.rem(pid, jnp.int32(col_chunks))
  rows = pl.ds(head * s, s)
  cols = pl.ds(pl.multiple_of(col * w, w), w)
  plgpu.copy_gmem_to_smem(o_gmem.at[rows, :, cols], o_smem.at[pl.ds(0, s)], bars.at[0])
  plgpu.copy_gmem_to_smem(lb_gmem.at[rows], l_smem.at[pl.ds(0, s)], bars.at[1])
  plgpu.copy_gmem_to_smem(cnt_gmem.at[head], c_smem, bars.at[2])
  for i in range(3):
    plgpu.barrier_wait(bars.at[i])
  count = c_smem[0]

  strided = None if interpret else plgpu.Layout.WG_STRIDED((g, w), vec_size=vec)
  full = lambda v: _mgpu.layout_cast(jnp.full((g, w), v, jnp.float32), strided, interpret)
  # rows past the count hold anything (never written; past S, uninitialized shared memory):
  # selected away (explicit broadcasts: Mosaic GPU's warpgroup select has no implicit one)
  valid = lambda j: jnp.broadcast_to(j < count, (g, w))
  lse_at = lambda j: jnp.where(valid(j), _mgpu.load_with_layout(l_smem.at[j], strided,
                                                                interpret), full(EMPTY_LSE))
  steps = lax.div(count + (_UNROLL - 1), _UNROLL)

  def max_step(i, ms):
    return tuple(jnp.maximum(m, lse_at(i * _UNROLL + u)) for u, m in enumerate(ms))

  ms = lax.fori_loop(0, steps, max_step, (full(EMPTY_LSE),) * _UNROLL)
  m = functools.reduce(jnp.maximum, ms)

  def sum_step(i, carry):
    ls, xs = carry
    new_l, new_x = [], []
    for u in range(_UNROLL):
      j = i * _UNROLL + u
      wj = jnp.exp(lse_at(j) - m)
      oj = jnp.where(valid(j), _mgpu.load_with_layout(o_smem.at[j], strided, interpret),
                     full(0.0))
      new_l.append(ls[u] + wj)
      new_x.append(xs[u] + oj * wj)
    return tuple(new_l), tuple(new_x)

  ls, xs = lax.fori_loop(0, steps, sum_step,
                         ((full(0.0),) * _UNROLL, (full(0.0),) * _UNROLL))
  l = functools.reduce(jnp.add, ls)
  l = jnp.where(l > 0.0, l, full(1.0))  # count 0 (no partial): o = 0, lse = EMPTY_LSE
  x = functools.reduce(jnp.add, xs)
  of_gmem.at[head, :, cols][...] = x / l  # an all-empty head: 0 / count = 0

  @pl.when(col == 0)
  def _():  # the lse, one value a row: the strided layout has no column slice, so the tile
    # goes through shared memory and each row's first column is stored as a scalar
    t_smem[...] = m + jnp.log(l)  # all-empty: EMPTY_LSE + log(count) == EMPTY_LSE
    for r in range(g):
      lf_gmem[head, r] = t_smem[r, 0]


@functools.partial(jax.jit, static_argnames=("interpret", "pdl"))
def _merge_partials_mgpu(o_part, lb_part, count_rows, *, interpret: bool, pdl: bool = False):
  from jax.experimental.pallas import mosaic_gpu as plgpu

  bk, s, g, d = o_part.shape
  w = lb_part.shape[3]
  vec = next(v for v in (4, 2, 1) if (g * w) % (128 * v) == 0 and w % v == 0)
  col_chunks = d // w
  body = functools.partial(_merge_kernel, s=s, g=g, w=w, col_chunks=col_chunks, vec=vec,
                           interpret=interpret, pdl=pdl)
  kw = {"interpret": _mgpu.interpret_params(True)} if interpret else {}
  return plgpu.kernel(
      body,
      out_type=(jax.ShapeDtypeStruct((bk, g, d), jnp.float32),
                jax.ShapeDtypeStruct((bk, g), jnp.float32)),
      grid=(bk * col_chunks,),
      grid_names=("p",),
      kernel_name="alaya_split_merge",
      scratch_types=[plgpu.SMEM((_padded(s), g, w), jnp.float32),
                     plgpu.SMEM((_padded(s), g, w), jnp.float32),
                     plgpu.SMEM((4,), jnp.int32),
                     plgpu.SMEM((g, w), jnp.float32),
                     plgpu.Barrier(num_barriers=3)],
      **kw,
  )(o_part.astype(jnp.float32).reshape(bk * s, g, d),
    lb_part.astype(jnp.float32).reshape(bk * s, g, w), count_rows.astype(jnp.int32))
