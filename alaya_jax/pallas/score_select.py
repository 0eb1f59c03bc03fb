"""Block scoring and DIPR selection over a cluster (or page) index (Mosaic GPU).

For each kv head, the G query heads it serves are scored against every block's centroid
(the only part of a DIPR query that grows with the context), and the blocks that may hold
DIPR keys are kept:

    s[h, j]   = q_h . centroid_j / sqrt(D)           (q cast to the centroid dtype, f32 sums)
    margin[j] = max over the group's heads h of  s[h, j] - (m_lower_h - beta - delta)
    kept      = { j < n_blocks : margin[j] >= 0 }

i.e. block j is kept iff SOME query head of the group estimates it within beta + delta of
that head's lower bound m_lower_h of the true max (from the sink/window and the best blocks).
beta is DIPR's (natural-log) softmax ratio, delta the calibrated margin of the estimate.

The kept ids of a kv head are compacted in ascending block order (a cumsum of the keep mask
and a scatter; no sort over the rows). At most `cap` are returned: if more pass, the first
`cap` in block order are kept, `truncated` says so, and `n_passing` says how many passed:
the caller sizes `cap` (DESIGN: a capacity that truncates is counted and reported).

    q          [B, H, D]        H = K * G
    centroids  [B, K, N, D]     f32 (contract), bf16/f16 (half the bytes to read) or
                                float8_e4m3fn (a quarter; q saturated to fp8 as well)
    n_blocks   [B, K] int32     valid blocks (rows at or past it are never kept)
    beta, delta                 scalars or arrays broadcastable to [B, H]
    m_lower    [B, H] f32

Returns `Selection(kept [B,K,cap] int32, kept_count [B,K] int32, truncated [B,K] bool,
n_passing [B,K] int32, margin [B,K,N] f32)`; margin is MASK_VALUE past n_blocks. The margins
are the one intermediate materialised (N floats per kv head, 1/D of the centroid bytes).

Kernel: programs over (batch, kv head, run of 64-row tiles); each pipelines its centroid
tiles GMEM->SMEM (TMA) and computes a [64, 16] score tile on the tensor cores (centroid tile
as the WGMMA M side, so only 16 columns are spent on the thin group), subtracts the per-head
thresholds and reduces over the group. On the GPU, f32 centroids go through the tensor cores
as tf32 (scores to ~1e-3 relative; a block whose margin is within that of 0 may flip); bf16
centroids are exact products with f32 sums. `quest_select` runs the same kernel on Quest's
page bound with two products per tile (q+ . kmax + q- . kmin).

Measured on an H200 (1M context, batch 1, 32-key blocks = 32K rows per kv head): margins
kernel 19.6 us on bf16 centroids (67 MB, 3.4 TB/s; 4.2 TB/s at batch 8), 34.5 us on f32
(134 MB), 13.4 us on fp8 (34 MB, against 21.4 for bf16 in the same run; the fp8 WGMMA sums in
f32 with fewer mantissa bits: margins to ~1e-3 relative); the XLA compaction adds 9 small
kernels, ~15 us.
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
from alaya_jax.index.cluster import to_fp8
from alaya_jax.pallas import _mgpu
from alaya_jax.pallas._mgpu import MASK_VALUE

_TILE = 64     # centroid rows per pipeline step (one WGMMA M tile)
_COLS = 16     # q rows read per group: the G heads from an 8-row boundary (WGMMA N = 16)
_HI = lax.Precision.HIGHEST
_TABLE_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16, jnp.float8_e4m3fn)


class Selection(NamedTuple):
  kept: jax.Array        # [B, K, cap] int32 block ids, valid entries first
  kept_count: jax.Array  # [B, K] int32 = min(n_passing, cap)
  truncated: jax.Array   # [B, K] bool  n_passing > cap
  n_passing: jax.Array   # [B, K] int32 blocks that met the criterion
  margin: jax.Array      # [B, K, N] f32 kept iff >= 0


@dataclasses.dataclass(frozen=True)
class ScoreSelectConfig:
  """tiles_per_program: 64-row centroid tiles per program (None: from the size, aiming at
  `target_programs` programs, `default_tiles_per_program`); steps_in_flight: TMA copies in
  flight per program."""
  tiles_per_program: int | None = None
  steps_in_flight: int = 3
  target_programs: int = 256

  def __post_init__(self):
    t = self.tiles_per_program
    if t is not None and not 1 <= t <= 256:
      raise ConfigError(f"tiles_per_program must be in [1, 256], got {t}")
    if not 1 <= self.steps_in_flight <= 8:
      raise ConfigError(f"steps_in_flight must be in [1, 8], got {self.steps_in_flight}")
    if self.target_programs < 1:
      raise ConfigError(f"target_programs must be positive, got {self.target_programs}")


def _check(q, centroids, n_blocks, m_lower):
  if q.ndim != 3 or centroids.ndim != 4:
    raise ShapeError(f"expected q [B,H,D], centroids [B,K,N,D]; got {q.shape}, {centroids.shape}")
  b, h, d = q.shape
  b2, k, n, d2 = centroids.shape
  if (b2, d2) != (b, d) or h % k:
    raise ShapeError(f"centroids {centroids.shape} do not match q {q.shape}")
  if n_blocks.shape != (b, k):
    raise ShapeError(f"n_blocks {n_blocks.shape}, expected {(b, k)}")
  if m_lower.shape != (b, h):
    raise ShapeError(f"m_lower {m_lower.shape}, expected {(b, h)}")
  return b, h, d, k, n, h // k


def _thresholds(m_lower, beta, delta):
  """Per query head: the score a block must reach, m_lower - beta - delta. [B, H] f32."""
  return (jnp.asarray(m_lower, jnp.float32) - jnp.asarray(beta, jnp.float32)
          - jnp.asarray(delta, jnp.float32))


def _prefix_counts(x):
  """x [R, T, 128] bool -> inclusive prefix counts along the last two axes (row-major), int32.

  Two small matmuls against triangular ones (within the 128-row tiles, then over the tiles'
  totals): on a GPU two GEMM kernels, where XLA's cumsum is several reduce-window passes.
  Exact: 0/1 products summed in f32 (counts far below 2**24)."""
  t = x.shape[-1]
  # numpy constants: literals in the program (built with jnp, XLA ran a kernel per call)
  tri = lambda n, above: np.triu(np.ones((n, n), jnp.bfloat16), above)  # 1 where j >= i+above
  inner = jnp.einsum("rtj,jk->rtk", x.astype(jnp.bfloat16), tri(t, 0),
                     preferred_element_type=jnp.float32)
  total = inner[..., -1]  # [R, T], at most 128: exact in bf16
  before = jnp.einsum("rt,tu->ru", total.astype(jnp.bfloat16), tri(total.shape[-1], 1),
                      preferred_element_type=jnp.float32)  # the tiles strictly before
  return (inner + before[..., None]).astype(jnp.int32)


def compact(margin, cap: int, width: int | None = None) -> Selection:
  """margin [B, K, N] -> the ids with margin >= 0 in ascending order, at most cap.

  Positions come from a two-level prefix count (within 128-row tiles, then over the tiles'
  totals; `_prefix_counts`), then a scatter that drops the entries past cap. width (>= cap,
  default cap): the kept array's last axis; entries past kept_count are 0 (a width that is a
  multiple of 4 saves the attention kernel a padded copy)."""
  b, k, n = margin.shape
  width = cap if width is None else width
  if width < cap:
    raise ShapeError(f"compact width {width} < cap {cap}")
  tile = 128
  n_pad = -(-n // tile) * tile
  passing = margin >= 0
  x = jnp.pad(passing, ((0, 0), (0, 0), (0, n_pad - n))).reshape(b * k, n_pad // tile, tile)
  pos = _prefix_counts(x).reshape(b, k, n_pad)
  n_passing = pos[..., -1]
  pos = pos[..., :n] - 1
  pos = jnp.where(passing & (pos < cap), pos, width)  # width: out of range, dropped
  ids = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, k, n))
  kept = jnp.zeros((b, k, width), jnp.int32).at[
      jnp.arange(b)[:, None, None], jnp.arange(k)[None, :, None], pos].set(ids, mode="drop")
  return Selection(kept, jnp.minimum(n_passing, cap), n_passing > cap, n_passing, margin)


def _as_table_dtype(x, dtype):
  """x cast to the tables' dtype (fp8 saturated at 448, where a plain cast makes NaN)."""
  return to_fp8(x) if jnp.dtype(dtype) == jnp.dtype(jnp.float8_e4m3fn) else x.astype(dtype)


def block_margins_reference(q, centroids, n_blocks, threshold):
  """margin [B, K, N] f32 (see the module docstring); threshold [B, H] = m_lower-beta-delta."""
  b, h, d = q.shape
  _, k, n, _ = centroids.shape
  g = h // k
  qg = _as_table_dtype(q, centroids.dtype).astype(jnp.float32).reshape(b, k, g, d)
  s = jnp.einsum("bkgd,bknd->bkgn", qg, centroids.astype(jnp.float32), precision=_HI)
  s = s / math.sqrt(d) - threshold.reshape(b, k, g, 1)
  margin = s.max(axis=2)
  return jnp.where(jnp.arange(n) < n_blocks[..., None], margin, MASK_VALUE)


def quest_margins_reference(q, kmin, kmax, n_blocks, threshold):
  """Quest's per-page upper bound: s[h, j] = sum_d max(q_d kmin_jd, q_d kmax_jd) / sqrt(D)
  (q cast to the table dtype), then the same margin as `block_margins_reference`."""
  b, h, d = q.shape
  _, k, n, _ = kmin.shape
  g = h // k
  qg = q.astype(kmin.dtype).astype(jnp.float32).reshape(b, k, g, d, 1)
  lo = jnp.swapaxes(kmin.astype(jnp.float32), -1, -2)[:, :, None]            # [B,K,1,D,N]
  hi = jnp.swapaxes(kmax.astype(jnp.float32), -1, -2)[:, :, None]
  s = jnp.maximum(qg * lo, qg * hi).sum(axis=3) / math.sqrt(d)               # [B,K,G,N]
  margin = (s - threshold.reshape(b, k, g, 1)).max(axis=2)
  return jnp.where(jnp.arange(n) < n_blocks[..., None], margin, MASK_VALUE)


def score_select_reference(
    q,           # [B, H, D]
    centroids,   # [B, K, N, D]
    n_blocks,    # [B, K] int32
    beta,
    delta,
    m_lower,     # [B, H] f32
    *,
    cap: int,
) -> Selection:
  """Pure jnp reference (f32 math); same contract as `score_select`."""
  b, h, *_ = _check(q, centroids, n_blocks, m_lower)
  thr = jnp.broadcast_to(_thresholds(m_lower, beta, delta), (b, h))
  return compact(block_margins_reference(q, centroids, n_blocks, thr), cap)


# ----------------------------------------------------------------------------- kernel


def _margin_kernel(*refs, n_ops, g, per_bk, tiles, d, transforms, steps_in_flight, offsets,
                   interpret):
  """One program: kv head bk = pid // per_bk, rows [part*T*64, (part+1)*T*64) of its tables.

  refs (n_ops = 1 for centroids, 2 for Quest's kmax/kmin):
    q_gmem x n_ops     [B*H, D]              queries (q, or q+ and q-) in the table dtype
    thr_gmem           [B*H] f32             m_lower - beta - delta (offsets: m_lower)
    nb_gmem            [B*K] int32           n_blocks
    (offsets: delta_gmem [H] f32)
    table_gmem x n_ops [B*K*N, D]            centroids (or kmax, kmin)
    out_gmem           [programs, T, 64] f32 margins
    then the scratch: q_smem x n_ops, thr_smem, nb_smem, (offsets: delta_smem), out_smem,
    barriers.

  offsets: None, or (beta, H): the threshold is m_lower - beta - delta[h] (per query head h
  of the H of a sequence), subtracted here.

  The 16-row windows of q and threshold start at the 8-row boundary at or before the
  group's first head (TMA into a tiled tile needs it); the columns of other heads (or past
  the array end: TMA reads zeros) are masked out."""
  from jax.experimental.pallas import mosaic_gpu as plgpu
  from jax.experimental import pallas as pl

  q_gmems, (thr_gmem, nb_gmem), refs = refs[:n_ops], refs[n_ops:n_ops + 2], refs[n_ops + 2:]
  delta_gmem, refs = (refs[0], refs[1:]) if offsets else (None, refs)
  tables, out_gmem, refs = refs[:n_ops], refs[n_ops], refs[n_ops + 1:]
  q_smems, (thr_smem, nb_smem), refs = refs[:n_ops], refs[n_ops:n_ops + 2], refs[n_ops + 2:]
  delta_smem, refs = (refs[0], refs[1:]) if offsets else (None, refs)
  out_smem, bars = refs

  pid = lax.axis_index("p")
  bk = lax.div(pid, jnp.int32(per_bk))
  part = lax.rem(pid, jnp.int32(per_bk))
  # Copies start on aligned rows/words: 8 rows for the tiled q tile, 16 bytes for 1-D ones.
  q_start = pl.multiple_of(lax.div(bk * g, 8) * 8, 8)
  first_col = bk * g - q_start
  for i, (q_gmem, q_smem) in enumerate(zip(q_gmems, q_smems)):
    plgpu.copy_gmem_to_smem(q_gmem.at[pl.ds(q_start, _COLS)], q_smem, bars.at[2 + i])
  plgpu.copy_gmem_to_smem(thr_gmem.at[pl.ds(q_start, _COLS)], thr_smem, bars.at[0])
  plgpu.copy_gmem_to_smem(nb_gmem.at[pl.ds(pl.multiple_of(lax.div(bk, 4) * 4, 4), 4)], nb_smem,
                          bars.at[1])
  if offsets:
    plgpu.copy_gmem_to_smem(delta_gmem, delta_smem, bars.at[2 + n_ops])
  for i in range(2 + n_ops + (1 if offsets else 0)):
    plgpu.barrier_wait(bars.at[i])
  rows_left = nb_smem[lax.rem(bk, 4)] - part * (tiles * _TILE)
  thr = _mgpu.load_with_layout(thr_smem, plgpu.Layout.WGMMA.reduce(0), interpret)
  thr = lax.broadcast_in_dim(thr, (_TILE, _COLS), [1])
  row = _mgpu.broadcasted_iota(jnp.int32, (_TILE, _COLS), 0, plgpu.Layout.WGMMA, interpret)
  col = _mgpu.broadcasted_iota(jnp.int32, (_TILE, _COLS), 1, plgpu.Layout.WGMMA, interpret)
  in_group = (col >= first_col) & (col < first_col + g)
  if offsets:  # the group's deltas into their columns (other columns are masked out)
    beta, n_heads = offsets
    head0 = lax.rem(bk, jnp.int32(n_heads // g)) * g
    delta = sum(jnp.where(col == first_col + j, delta_smem[head0 + j], 0.0) for j in range(g))
    thr = jnp.maximum(thr, MASK_VALUE) - jnp.float32(beta) - delta
  scale = 1.0 / math.sqrt(d)
  first_tile = bk * (per_bk * tiles) + part * tiles   # in tiles of the flattened tables

  def step(idx, *t_smems):
    (i,) = idx

    def mma(s_ref):
      for t_smem, q_smem in zip(t_smems, q_smems):
        plgpu.wgmma(s_ref, t_smem, plgpu.transpose_ref(q_smem, (1, 0)))
      return s_ref[...]

    if interpret:  # jax 0.10.2's interpreter has no transposed WGMMA operand (and the CPU
      # no fp8 product: the operands go up to f32, where their products are exact)
      up = (lambda x: x.astype(jnp.float32)) if t_smems[0].dtype == jnp.float8_e4m3fn else (
          lambda x: x)
      s = sum(lax.dot_general(up(t_smem[...]), up(q_smem[...]), (((1,), (1,)), ((), ())),
                              preferred_element_type=jnp.float32)
              for t_smem, q_smem in zip(t_smems, q_smems))
    else:
      s = pl.run_scoped(mma, plgpu.ACC((_TILE, _COLS), jnp.float32))
    ok = (row < rows_left - i * _TILE) & in_group
    s = jnp.where(ok, s * scale - thr, MASK_VALUE)
    out_smem[i] = s.max(axis=1)

  plgpu.emit_pipeline(
      step,
      grid=(tiles,),
      in_specs=[plgpu.BlockSpec((_TILE, d), lambda i: (first_tile + i, 0),
                                transforms=transforms)] * n_ops,
      max_concurrent_steps=steps_in_flight,
  )(*tables)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[pid])
  plgpu.wait_smem_to_gmem(0)


def default_tiles_per_program(n_tiles: int, bk: int, *, target_programs: int = 256,
                              most: int = 32) -> int:
  """64-row tiles per program: ~`target_programs` programs (~2 an SM), a divisor of n_tiles.

  Measured on an H200 (`python benchmarks/kernels.py --tune-margins`, batch 1, 16 layers,
  `kernels_tune_margins.json`, `kernels_1m_tune.json`): bf16 tables at 1M 21.4 us with the
  earlier target of 528 programs (4 tiles) against 19.9 at 16 tiles (fp8 13.5 -> 12.6-12.9),
  at 512K 11.6 (2 tiles) against 11.3 at 8, at 128K 4.2 at 1 or 2 tiles; many tiles a program
  (32-64) or few programs cost up to 2x.
  """
  want = max(1, min(most, n_tiles * bk // target_programs))
  while n_tiles % want:
    want -= 1
  return want


def kernel_supports(q, centroids) -> str | None:
  b, h, d = q.shape
  k = centroids.shape[1]
  if jnp.dtype(centroids.dtype) not in map(jnp.dtype, _TABLE_DTYPES):
    return (f"centroid dtype {jnp.dtype(centroids.dtype).name}: the kernel takes f32, bf16, f16, "
            "float8_e4m3fn")
  if d % 32 or d > 256:
    return f"head dim {d}: the kernel needs a multiple of 32 up to 256"
  if h // k > _COLS - 7:
    return f"group size G={h // k}: the kernel takes at most {_COLS - 7} query heads per kv head"
  return None


def block_margins_mgpu(q, centroids, n_blocks, threshold, *, config=ScoreSelectConfig(),
                       interpret=False):
  """The Mosaic GPU kernel: margin [B, K, N] f32, as `block_margins_reference`."""
  return _margins_mgpu((q,), (centroids,), n_blocks, threshold, config=config,
                       interpret=interpret)


def quest_margins_mgpu(q, kmin, kmax, n_blocks, threshold, *, config=ScoreSelectConfig(),
                       interpret=False):
  """The Mosaic GPU kernel on Quest's bound: margin [B, K, N], as `quest_margins_reference`.
  sum_d max(q_d kmin_d, q_d kmax_d) = q+ . kmax + q- . kmin: two products, one tile."""
  qf = q.astype(jnp.float32)
  return _margins_mgpu((jnp.maximum(qf, 0.0), jnp.minimum(qf, 0.0)), (kmax, kmin), n_blocks,
                       threshold, config=config, interpret=interpret)


def block_margins_from_max(q, centroids, n_blocks, m_lower, beta: float, delta, *,
                           config=ScoreSelectConfig(), interpret=False):
  """`block_margins_mgpu` at the threshold m_lower - beta - delta with the subtraction in the
  kernel: m_lower [B, H] straight from the kernel that computes it (the exact region's m'),
  beta a float, delta [H] (the index's per-head margins); m_lower is floored at MASK_VALUE
  (as max(m', probe max) with no probe). No XLA kernel runs between the two (one fewer launch
  a layer). Where H is not a multiple of 4 (the 16-byte copy of delta), the
  threshold is formed in XLA first (same result)."""
  b, h = q.shape[:2]
  if m_lower.shape != (b, h):
    raise ShapeError(f"m_lower {m_lower.shape}, expected {(b, h)}")
  delta = jnp.broadcast_to(jnp.asarray(delta, jnp.float32), (h,))
  if h % 4:
    thr = _thresholds(jnp.maximum(m_lower, MASK_VALUE), beta, delta[None])
    return block_margins_mgpu(q, centroids, n_blocks, thr, config=config, interpret=interpret)
  return _margins_mgpu((q,), (centroids,), n_blocks, m_lower, delta, config=config,
                       interpret=interpret, beta=float(beta))


@functools.partial(jax.jit, static_argnames=("config", "interpret", "beta"))
def _margins_mgpu(queries, tables, n_blocks, threshold, delta=None, *, config, interpret,
                  beta=None):
  """threshold [B, H]: m_lower - beta - delta; or m_lower, with beta (float) and delta [H]."""
  from jax.experimental.pallas import mosaic_gpu as plgpu

  q = queries[0]
  b, h, d = q.shape
  _, k, n, _ = tables[0].shape
  g, bk, dtype = h // k, b * k, tables[0].dtype
  n_ops = len(tables)
  n_pad = -(-n // _TILE) * _TILE
  tabs = []
  for t in tables:
    t = t.astype(dtype).reshape(bk, n, d)
    if n_pad != n:  # a copy (ClusterConfig.num_blocks rounds a large N to a multiple of 64)
      t = jnp.pad(t, ((0, 0), (0, n_pad - n), (0, 0)))
    tabs.append(t.reshape(-1, d))
  n_tiles = n_pad // _TILE
  tiles = config.tiles_per_program or default_tiles_per_program(
      n_tiles, bk, target_programs=config.target_programs)
  if n_tiles % tiles:
    raise ConfigError(f"tiles_per_program={tiles} must divide the {n_tiles} tiles of a head")
  per_bk = n_tiles // tiles
  programs = bk * per_bk

  # TMA windows: a tiled copy needs the rows in whole 8-row tiles, and no window may be larger
  # than its array; past the end the GPU's TMA reads zeros (the interpreter needs padding).
  tail = interpret
  q_rows = -(-max(b * h, _COLS) // 8) * 8 + (_COLS if tail else 0)
  thr_len = max(b * h, _COLS) + (_COLS if tail else 0)
  nb_len = max(bk, 4) + (4 if tail else 0)
  pad1 = lambda x, size: jnp.pad(x, ((0, size - x.shape[0]),) + ((0, 0),) * (x.ndim - 1))
  qs = [pad1(_as_table_dtype(x, dtype).reshape(b * h, d), q_rows) for x in queries]
  thr = pad1(threshold.astype(jnp.float32).reshape(-1), thr_len)
  nb = pad1(jnp.clip(n_blocks, 0, n).astype(jnp.int32).reshape(-1), nb_len)
  _, transforms = _mgpu.smem_transforms(d, dtype)
  body = functools.partial(_margin_kernel, n_ops=n_ops, g=g, per_bk=per_bk, tiles=tiles, d=d,
                           transforms=transforms,
                           steps_in_flight=min(config.steps_in_flight, tiles),
                           offsets=None if beta is None else (beta, h), interpret=interpret)
  kw = {"interpret": _mgpu.interpret_params(True)} if interpret else {}
  out = plgpu.kernel(
      body,
      out_type=jax.ShapeDtypeStruct((programs, tiles, _TILE), jnp.float32),
      grid=(programs,),
      grid_names=("p",),
      kernel_name="alaya_block_margins",
      scratch_types=[
          *[plgpu.SMEM((_COLS, d), dtype, transforms=transforms)] * n_ops,
          plgpu.SMEM((_COLS,), jnp.float32),
          plgpu.SMEM((4,), jnp.int32),
          *([] if beta is None else [plgpu.SMEM((h,), jnp.float32)]),
          plgpu.SMEM((tiles, _TILE), jnp.float32),
          plgpu.Barrier(num_barriers=2 + n_ops + (0 if beta is None else 1)),
      ],
      **kw,
  )(*qs, thr, nb, *([] if beta is None else [delta.astype(jnp.float32)]), *tabs)
  return out.reshape(b, k, n_pad)[:, :, :n]


def score_select(
    q,           # [B, H, D]
    centroids,   # [B, K, N, D]
    n_blocks,    # [B, K] int32
    beta,
    delta,
    m_lower,     # [B, H] f32
    *,
    cap: int,
    impl: str | None = None,
    config: ScoreSelectConfig = ScoreSelectConfig(),
    interpret: bool = False,
) -> Selection:
  """DIPR block selection; see the module docstring for the criterion and shapes.

  impl: "pallas" (Mosaic GPU margins kernel + XLA compaction; on the CPU only with
  interpret=True), "xla" (jnp reference) or None (pallas on a GPU, xla elsewhere).
  """
  impl = _mgpu.resolve_impl(impl, interpret, "score_select")
  if impl == "xla":
    return score_select_reference(q, centroids, n_blocks, beta, delta, m_lower, cap=cap)
  b, h, *_ = _check(q, centroids, n_blocks, m_lower)
  why = kernel_supports(q, centroids)
  if why:
    raise NotImplementedError(f"score_select(impl='pallas'): {why}")
  thr = jnp.broadcast_to(_thresholds(m_lower, beta, delta), (b, h))
  margin = block_margins_mgpu(q, centroids, n_blocks, thr, config=config, interpret=interpret)
  return compact(margin, cap)


def quest_select_reference(q, kmin, kmax, n_blocks, beta, delta, m_lower, *, cap: int):
  """Pure jnp reference of `quest_select`."""
  b, h, *_ = _check(q, kmin, n_blocks, m_lower)
  thr = jnp.broadcast_to(_thresholds(m_lower, beta, delta), (b, h))
  return compact(quest_margins_reference(q, kmin, kmax, n_blocks, thr), cap)


def quest_select(
    q,           # [B, H, D]
    kmin,        # [B, K, N, D]  per-page channel minimum of the keys
    kmax,        # [B, K, N, D]  per-page channel maximum
    n_blocks,    # [B, K] int32
    beta,
    delta,
    m_lower,     # [B, H] f32
    *,
    cap: int,
    impl: str | None = None,
    config: ScoreSelectConfig = ScoreSelectConfig(),
    interpret: bool = False,
) -> Selection:
  """The block (Quest) baseline: `score_select` with each page scored by its upper bound
  sum_d max(q_d kmin_d, q_d kmax_d) / sqrt(D) instead of a centroid estimate. On the GPU the
  bound is two tensor-core products (q+ . kmax + q- . kmin), so it costs two table reads."""
  impl = _mgpu.resolve_impl(impl, interpret, "quest_select")
  if kmax.shape != kmin.shape:
    raise ShapeError(f"kmax {kmax.shape} must have the shape of kmin {kmin.shape}")
  if impl == "xla":
    return quest_select_reference(q, kmin, kmax, n_blocks, beta, delta, m_lower, cap=cap)
  b, h, *_ = _check(q, kmin, n_blocks, m_lower)
  why = kernel_supports(q, kmin)
  if why:
    raise NotImplementedError(f"quest_select(impl='pallas'): {why}")
  thr = jnp.broadcast_to(_thresholds(m_lower, beta, delta), (b, h))
  margin = quest_margins_mgpu(q, kmin, kmax.astype(kmin.dtype), n_blocks, thr, config=config,
                              interpret=interpret)
  return compact(margin, cap)
