"""DIPR attention over the exact region (sink + tail) of the positional cache (Mosaic GPU).

The cluster path reads two parts exactly, by position: the first `sink` tokens and a tail
window of `tail_size` slots starting at `tail_start` (the tokens appended since the index was
built). In XLA that is ~12 small kernels a layer on a GPU (the window's gather, a score GEMM,
its masks and max, the softmax sums, a P.V GEMM on a hi/lo split: ~19 us a layer at 128K, 8B
shapes, H200, benchmarks/results/sparse_decode_gpu.json `stats_runs`). Here one program per
(sequence, kv head) loads its query group, the sink rows and the tail window of K and V
(TMA copies straight from the cache [B, S, K, D]), and does it all in registers:

    s      = q.k / sqrt(D) over 16 sink columns + the window's (WGMMA)
    valid  = column is a sink position < min(sink, length), or a tail position p with
             tail_start <= p < length and p >= sink
    m      = max over valid s                               (the region's max: m')
    thr    = max(m, extra) - beta                           (extra: another part's max)
    mask   = valid & (s >= thr)  |  valid & (p < keep_sink or p >= length - keep_window)
    o, lse = softmax attention over mask (P.V by WGMMA with P in bf16), n = |mask|

Returns (o [B,H,D] f32, lse [B,H] f32, m [B,H] f32, n [B,H] int32); an empty row gives o 0,
lse EMPTY_LSE, m MASK_VALUE. `exact_attention_reference` is the same in jnp (the XLA path's
own functions). Kernel limits (`kernel_supports`): 16-bit q/k/v of one dtype, G % 4 == 0,
D a multiple of 64 up to 256, `region_slots(tail_size)` <= 256, S a multiple of 8 >= that.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from alaya_jax.errors import ShapeError
from alaya_jax.pallas import _mgpu
from alaya_jax.pallas._mgpu import EMPTY_LSE, MASK_VALUE

_ROWS = 64     # the WGMMA tile's query rows (the group's G rows, the rest discarded)
_SINK_ROWS = 16  # the sink's rows: positions [0, 16) (the P.V product contracts over 16s)
_LOG2E = math.log2(math.e)


def region_slots(tail_size: int) -> int:
  """R: the key columns of a program, 16 sink rows + the tail window read from the 8-row
  boundary at or before its start (TMA into a tiled tile starts on whole tiles), rounded up
  to a multiple of 16 (the P.V product's contraction step)."""
  return _SINK_ROWS + -(-(tail_size + 7) // 16) * 16


def _region(tail_start, lengths, S: int, sink: int, tail_size: int):
  """(pos [B, R], valid [B, R]) of the columns: the sink rows [0, 16), then rows from the
  8-row boundary at or before st = clip(tail_start, 0, S - tail_size); valid: the sink's
  first min(sink, S) positions, and the window [st, st + tail_size) from tail_start on and
  past the sink; all below the length."""
  R = region_slots(tail_size)
  st = jnp.clip(tail_start, 0, S - tail_size)[:, None]
  c = jnp.arange(R, dtype=jnp.int32)[None, :]
  in_sink = c < _SINK_ROWS
  pos = jnp.where(in_sink, c, st // 8 * 8 + c - _SINK_ROWS)
  s0 = min(sink, S)
  in_tail = ((pos >= st) & (pos < st + tail_size) & (pos >= tail_start[:, None])
             & (pos >= s0))
  return pos, jnp.where(in_sink, c < s0, in_tail) & (pos < lengths[:, None])


def region_valid_count(tail_start, lengths, S: int, sink: int, tail_size: int):
  """[B] int32: the exact region's positions (what `exact_attention` reads)."""
  return jnp.sum(_region(tail_start, lengths, S, sink, tail_size)[1], -1, dtype=jnp.int32)


def exact_attention_reference(q, k, v, tail_start, lengths, extra, *, sink: int,
                              tail_size: int, beta: float, keep_sink: int, keep_window: int):
  """`exact_attention` in jnp (f32 scores and softmax)."""
  B, S, K, D = k.shape
  H = q.shape[1]
  G = H // K
  pos, valid = _region(tail_start, lengths, S, sink, tail_size)        # [B, R]
  R = pos.shape[1]
  idx = jnp.clip(pos, 0, S - 1)
  kk = jnp.take_along_axis(k, idx[:, :, None, None], axis=1).astype(jnp.float32)  # [B,R,K,D]
  vv = jnp.take_along_axis(v, idx[:, :, None, None], axis=1).astype(jnp.float32)
  qg = q.reshape(B, K, G, D).astype(jnp.float32)
  s = jnp.einsum("bkgd,brkd->bkgr", qg, kk).reshape(B, H, R) / math.sqrt(D)
  valid_h = jnp.broadcast_to(valid[:, None, :], s.shape)
  m = jnp.max(jnp.where(valid_h, s, MASK_VALUE), axis=-1)                # [B, H]
  thr = jnp.maximum(m, extra.astype(jnp.float32)) - beta
  always = (pos < keep_sink) | (pos >= (lengths - keep_window)[:, None])
  mask = valid_h & ((s >= thr[..., None]) | always[:, None, :])
  mm = jnp.max(jnp.where(mask, s, MASK_VALUE), axis=-1)
  p = jnp.where(mask, jnp.exp(s - mm[..., None]), 0.0)
  l = p.sum(-1)
  acc = jnp.einsum("bkgr,brkd->bkgd", p.reshape(B, K, G, R), vv).reshape(B, H, D)
  some = l > 0
  o = jnp.where(some[..., None], acc / jnp.where(some, l, 1.0)[..., None], 0.0)
  lse = jnp.where(some, mm + jnp.log(jnp.where(some, l, 1.0)), EMPTY_LSE)
  return o, lse, m, jnp.sum(mask, -1).astype(jnp.int32)


def _check(q, k, v, tail_start, lengths, extra, tail_size):
  if q.ndim != 3 or k.ndim != 4:
    raise ShapeError(f"expected q [B,H,D] and k [B,S,K,D], got {q.shape} and {k.shape}")
  B, S, K, D = k.shape
  if v.shape != k.shape:
    raise ShapeError(f"v {v.shape} must have k's shape {k.shape}")
  if q.shape[0] != B or q.shape[2] != D or q.shape[1] % K:
    raise ShapeError(f"q {q.shape} does not match the cache {k.shape}")
  for name, x, shape in (("tail_start", tail_start, (B,)), ("lengths", lengths, (B,)),
                         ("extra", extra, q.shape[:2])):
    if x.shape != shape:
      raise ShapeError(f"{name} {x.shape}, expected {shape}")
  if not 1 <= tail_size <= S:
    raise ShapeError(f"tail_size {tail_size} must be in [1, S={S}]")


def kernel_supports(q, k, tail_size: int) -> str | None:
  """None if the Mosaic GPU kernel takes these shapes/dtypes, else the reason it does not."""
  B, S, K, D = k.shape
  G = q.shape[1] // K
  if jnp.dtype(k.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return f"cache dtype {jnp.dtype(k.dtype).name}: the kernel's WGMMA takes 16-bit operands"
  if jnp.dtype(q.dtype) != jnp.dtype(k.dtype):
    return f"q dtype {jnp.dtype(q.dtype).name} differs from the cache's"
  if G % 4:
    return f"group size G={G}: the kernel writes its rows as 16-byte windows (G % 4 == 0)"
  if D % 64 or D > 256:
    return f"head dim {D}: the kernel needs a multiple of 64 up to 256"
  if region_slots(tail_size) > 256:
    return f"tail window {tail_size}: the kernel takes region_slots <= 256 slots"
  if S < region_slots(tail_size) or S % 8:
    return (f"cache of {S} positions: the kernel needs a multiple of 8, at least its "
            f"{region_slots(tail_size)} slots")
  return None


def exact_attention(q, k, v, tail_start, lengths, extra, *, sink: int, tail_size: int,
                    beta: float, keep_sink: int, keep_window: int, impl: str | None = None,
                    interpret: bool = False):
  """DIPR attention over the exact region; see the module docstring.
  impl: "pallas" (Mosaic GPU; on the CPU with interpret=True), "xla" or None (by backend)."""
  _check(q, k, v, tail_start, lengths, extra, tail_size)
  impl = _mgpu.resolve_impl(impl, interpret, "exact_attention")
  kw = dict(sink=sink, tail_size=tail_size, beta=float(beta), keep_sink=keep_sink,
            keep_window=keep_window)
  if impl == "xla":
    return exact_attention_reference(q, k, v, tail_start, lengths, extra, **kw)
  why = kernel_supports(q, k, tail_size)
  if why:
    raise NotImplementedError(f"exact_attention(impl='pallas'): {why}")
  return _exact_attention_mgpu(q, k, v, tail_start, lengths, extra, interpret=interpret, **kw)


def _exact_kernel(q_gmem, k_gmem, v_gmem, meta_gmem, extra_gmem,
                  o_gmem, lse_gmem, m_gmem, n_gmem,
                  q_smem, ks_smem, kt_smem, vs_smem, vt_smem, x_smem, meta_smem, bars,
                  *, S, K, G, D, R, sink, tail_size, beta, keep_sink, keep_window, dtype,
                  interpret):
  """Program pid: sequence b = pid // K, kv head kh = pid % K (row bk = pid of [B*K])."""
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import mosaic_gpu as plgpu

  bk = lax.axis_index("p")
  b = lax.div(bk, jnp.int32(K))
  kh = lax.rem(bk, jnp.int32(K))
  plgpu.copy_gmem_to_smem(meta_gmem.at[b], meta_smem, bars.at[0])
  q_start = pl.multiple_of(lax.div(bk * G, 8) * 8, 8)
  q_rows = -(-(G + 7) // 8) * 8
  plgpu.copy_gmem_to_smem(q_gmem.at[pl.ds(q_start, q_rows)], q_smem.at[pl.ds(0, q_rows)],
                          bars.at[1])
  plgpu.copy_gmem_to_smem(extra_gmem.at[pl.ds(q_start, q_rows)], x_smem.at[pl.ds(0, q_rows)],
                          bars.at[2])
  plgpu.barrier_wait(bars.at[0])
  tail_start, length = meta_smem[0], meta_smem[1]
  st = jnp.clip(tail_start, 0, S - tail_size)
  st8 = lax.div(st, 8) * 8  # TMA into a tiled tile: from a whole 8-row tile
  cols = pl.ds(pl.multiple_of(kh * D, D), D)
  sink_rows = pl.ds(pl.multiple_of(b * S, 8), _SINK_ROWS)
  tail_rows = pl.ds(pl.multiple_of(b * S + st8, 8), R - _SINK_ROWS)
  plgpu.copy_gmem_to_smem(k_gmem.at[sink_rows, cols], ks_smem, bars.at[3])
  plgpu.copy_gmem_to_smem(k_gmem.at[tail_rows, cols], kt_smem, bars.at[4])
  plgpu.copy_gmem_to_smem(v_gmem.at[sink_rows, cols], vs_smem, bars.at[5])
  plgpu.copy_gmem_to_smem(v_gmem.at[tail_rows, cols], vt_smem, bars.at[6])
  for i in (1, 2, 3, 4):
    plgpu.barrier_wait(bars.at[i])

  wg = plgpu.Layout.WGMMA
  row = wg.reduce(1)
  if interpret:  # jax 0.10.2's interpreter has no transposed WGMMA operand
    dot_t = lambda a, b_: lax.dot_general(a, b_, (((1,), (1,)), ((), ())),
                                          preferred_element_type=jnp.float32)
    s_sink, s_tail = dot_t(q_smem[...], ks_smem[...]), dot_t(q_smem[...], kt_smem[...])
  else:
    def qk(a_ref, b_ref):
      plgpu.wgmma(a_ref, q_smem, plgpu.transpose_ref(ks_smem, (1, 0)))
      plgpu.wgmma(b_ref, q_smem, plgpu.transpose_ref(kt_smem, (1, 0)))
      return a_ref[...], b_ref[...]
    s_sink, s_tail = pl.run_scoped(qk, plgpu.ACC((_ROWS, _SINK_ROWS), jnp.float32),
                                   plgpu.ACC((_ROWS, R - _SINK_ROWS), jnp.float32))
  scale = 1.0 / math.sqrt(D)
  s0 = min(sink, S)
  extra = _mgpu.load_with_layout(x_smem, row, interpret)

  def columns(n_cols, first):  # (positions, valid) of n_cols columns from column `first`
    c = _mgpu.broadcasted_iota(jnp.int32, (_ROWS, n_cols), 1, wg, interpret)
    if first == 0:
      return c, (c < s0) & (c < length)
    pos = st8 + c
    return pos, ((pos >= st) & (pos < st + tail_size) & (pos >= tail_start) & (pos >= s0)
                 & (pos < length))

  parts = [(s_sink * scale, *columns(_SINK_ROWS, 0)),
           (s_tail * scale, *columns(R - _SINK_ROWS, _SINK_ROWS))]
  m = functools.reduce(jnp.maximum, [jnp.where(ok, s, MASK_VALUE).max(axis=1)
                                      for s, _, ok in parts])
  thr = jnp.maximum(m, extra) - beta
  masks = []
  for s, pos, ok in parts:
    always = (pos < keep_sink) | (pos >= length - keep_window)
    masks.append(ok & ((s >= lax.broadcast_in_dim(thr, s.shape, [0])) | always))
  mm = functools.reduce(jnp.maximum, [jnp.where(mk, s, MASK_VALUE).max(axis=1)
                                       for (s, _, _), mk in zip(parts, masks)])
  es = [jnp.where(mk, jnp.exp2((s - lax.broadcast_in_dim(mm, s.shape, [0])) * _LOG2E), 0.0)
        for (s, _, _), mk in zip(parts, masks)]
  l = es[0].sum(axis=1) + es[1].sum(axis=1)
  n = sum(jnp.where(mk, s * 0.0 + 1.0, 0.0).sum(axis=1) for (s, _, _), mk in zip(parts, masks))
  plgpu.barrier_wait(bars.at[5])
  plgpu.barrier_wait(bars.at[6])
  if interpret:  # nor a WGMMA with its A operand in registers
    acc = sum(jnp.dot(e.astype(dtype), v_ref[...], preferred_element_type=jnp.float32)
              for e, v_ref in zip(es, (vs_smem, vt_smem)))
  else:
    def pv(acc_ref):
      plgpu.wgmma(acc_ref, es[0].astype(dtype), vs_smem)
      plgpu.wgmma(acc_ref, es[1].astype(dtype), vt_smem)
      return acc_ref[...]
    acc = pl.run_scoped(pv, plgpu.ACC((_ROWS, D), jnp.float32))
  some = l > 0.0
  l_safe = jnp.where(some, l, 1.0)
  o = acc / lax.broadcast_in_dim(l_safe, (_ROWS, D), [0])  # empty: acc 0 -> o 0
  lse = jnp.where(some, mm + jnp.log(l_safe), EMPTY_LSE)
  win = pl.ds(bk * G - q_start, G)

  def store(o_smem, lse_smem, m_smem, n_smem):
    o_smem[...] = o
    lse_smem[...] = lse
    m_smem[...] = m
    n_smem[...] = n
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem.at[win], o_gmem.at[bk])
    plgpu.copy_smem_to_gmem(lse_smem.at[win], lse_gmem.at[bk])
    plgpu.copy_smem_to_gmem(m_smem.at[win], m_gmem.at[bk])
    plgpu.copy_smem_to_gmem(n_smem.at[win], n_gmem.at[bk])
    plgpu.wait_smem_to_gmem(0)

  pl.run_scoped(store, plgpu.SMEM((_ROWS, D), jnp.float32),
                *[plgpu.SMEM((_ROWS,), jnp.float32)] * 3)


@functools.partial(jax.jit, static_argnames=("sink", "tail_size", "beta", "keep_sink",
                                             "keep_window", "interpret"))
def _exact_attention_mgpu(q, k, v, tail_start, lengths, extra, *, sink, tail_size, beta,
                          keep_sink, keep_window, interpret):
  from jax.experimental.pallas import mosaic_gpu as plgpu

  B, S, K, D = k.shape
  H = q.shape[1]
  G = H // K
  R = region_slots(tail_size)
  dtype = k.dtype
  q_rows = -(-(G + 7) // 8) * 8
  qf = q.reshape(B * H, D)
  xf = extra.astype(jnp.float32).reshape(B * H)
  kf, vf = k.reshape(B * S, K * D), v.reshape(B * S, K * D)
  meta = jnp.stack([tail_start.astype(jnp.int32), lengths.astype(jnp.int32),
                    jnp.zeros_like(lengths, jnp.int32), jnp.zeros_like(lengths, jnp.int32)], -1)
  # TMA windows: whole 8-row q tiles and windows up to R rows past a sequence's positions;
  # the GPU's TMA reads zeros past an array's end, the interpreter needs the rows there
  want_q = max(B * H, q_rows) + (q_rows if interpret else 0)
  if want_q > B * H:
    qf = jnp.pad(qf, ((0, want_q - B * H), (0, 0)))
    xf = jnp.pad(xf, (0, want_q - B * H))
  if interpret:
    kf = jnp.pad(kf, ((0, R), (0, 0)))
    vf = jnp.pad(vf, ((0, R), (0, 0)))
  _, kt = _mgpu.smem_transforms(D, dtype)
  # the P.V products contract over the sink's 16 rows and the window's R - 16: the values'
  # swizzle must divide a row of each (as the attention kernel's V tiles)
  _, vs_t = _mgpu.smem_transforms(D, dtype, at_most=_mgpu.swizzle_for(_SINK_ROWS, dtype))
  _, vt_t = _mgpu.smem_transforms(D, dtype, at_most=_mgpu.swizzle_for(R - _SINK_ROWS, dtype))
  body = functools.partial(_exact_kernel, S=S, K=K, G=G, D=D, R=R, sink=sink,
                           tail_size=tail_size, beta=beta, keep_sink=keep_sink,
                           keep_window=keep_window, dtype=dtype, interpret=interpret)
  kw = {"interpret": _mgpu.interpret_params(True)} if interpret else {}
  rows = lambda dt: jax.ShapeDtypeStruct((B * K, G), dt)
  o, lse, m, n = plgpu.kernel(
      body,
      out_type=(jax.ShapeDtypeStruct((B * K, G, D), jnp.float32), rows(jnp.float32),
                rows(jnp.float32), rows(jnp.float32)),
      grid=(B * K,),
      grid_names=("p",),
      kernel_name="alaya_exact_attention",
      compiler_params=None if interpret else plgpu.CompilerParams(approx_math=True),
      scratch_types=[
          plgpu.SMEM((_ROWS, D), dtype, transforms=kt),
          plgpu.SMEM((_SINK_ROWS, D), dtype, transforms=kt),
          plgpu.SMEM((R - _SINK_ROWS, D), dtype, transforms=kt),
          plgpu.SMEM((_SINK_ROWS, D), dtype, transforms=vs_t),
          plgpu.SMEM((R - _SINK_ROWS, D), dtype, transforms=vt_t),
          plgpu.SMEM((_ROWS,), jnp.float32),
          plgpu.SMEM((4,), jnp.int32),
          plgpu.Barrier(num_barriers=7),
      ],
      **kw,
  )(qf, kf, vf, meta, xf)
  return (o.reshape(B, H, D), lse.reshape(B, H), m.reshape(B, H),
          jnp.round(n).astype(jnp.int32).reshape(B, H))
