"""Shared plumbing for the Mosaic GPU kernels: the numerics constants, the dispatch rule and
the one place that touches jax's private GPU interpreter.

Numerics contract (every kernel and its reference): f32 accumulation, a finite mask value
`MASK_VALUE` (never -inf: -inf - -inf is NaN in an online softmax), an all-masked query row
returns o = 0 and lse = `EMPTY_LSE`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

#: Score given to masked entries before the max (finite, far below any real score).
MASK_VALUE = -1e30
#: The log-sum-exp reported for a query row that attended to nothing (finite, so that a
#: log-sum-exp merge with it is exact: exp(EMPTY_LSE - m) == 0 for any real m).
EMPTY_LSE = -1e30

IMPLS = ("pallas", "xla")


def on_gpu() -> bool:
  return jax.default_backend() == "gpu"


def resolve_impl(impl: str | None, interpret: bool, op: str) -> str:
  """`None` picks Mosaic GPU on the GPU and the jnp reference elsewhere; an explicit
  "pallas" off the GPU needs `interpret=True` (the CPU interpreter), else it raises."""
  if impl is None:
    return "pallas" if (on_gpu() or interpret) else "xla"
  if impl not in IMPLS:
    raise ValueError(f"{op}: impl must be one of {IMPLS} or None, got {impl!r}")
  if impl == "pallas" and not (on_gpu() or interpret):
    raise NotImplementedError(
        f"{op}: impl='pallas' is a Mosaic GPU kernel and needs an NVIDIA GPU (sm90); the "
        f"default backend is {jax.default_backend()!r}. Use impl='xla' (the jnp reference) "
        "or interpret=True (the CPU interpreter, for tests).")
  return impl


def interpret_params(interpret: bool):
  """The value for `plgpu.kernel(interpret=...)`: None compiles for the GPU; True runs the
  kernel in jax's Mosaic GPU interpreter on the CPU (a private API, imported only here)."""
  if not interpret:
    return None
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
  return InterpretGPUParams()


def swizzle_for(minor_elems: int, dtype, *, at_most: int = 128) -> int:
  """Largest TMA/WGMMA swizzle (bytes) that divides a row of `minor_elems` elements."""
  row_bytes = minor_elems * jnp.dtype(dtype).itemsize
  for s in (128, 64, 32):
    if s <= at_most and row_bytes % s == 0:
      return s
  raise NotImplementedError(
      f"a minor dimension of {minor_elems} x {jnp.dtype(dtype).name} ({row_bytes} bytes) is "
      "not a multiple of 32 bytes, which the WGMMA shared-memory layouts need")


def smem_transforms(minor_elems: int, dtype, *, at_most: int = 128):
  from jax.experimental.pallas import mosaic_gpu as plgpu
  swizzle = swizzle_for(minor_elems, dtype, at_most=at_most)
  elems = swizzle // jnp.dtype(dtype).itemsize
  return swizzle, (plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(swizzle))


def load_with_layout(ref, layout, interpret: bool):
  """`plgpu.load(ref, (), layout=layout)`; jax 0.10.2's GPU interpreter has no rule for that
  primitive (and ignores layouts), so it reads the ref plainly there."""
  if interpret:
    return ref[...]
  from jax.experimental.pallas import mosaic_gpu as plgpu
  return plgpu.load(ref, (), layout=layout)


def layout_cast(x, layout, interpret: bool):
  """`plgpu.layout_cast`; the identity in the interpreter (no rule there, layouts ignored)."""
  if interpret:
    return x
  from jax.experimental.pallas import mosaic_gpu as plgpu
  return plgpu.layout_cast(x, layout)


def broadcasted_iota(dtype, shape, dim, layout, interpret: bool):
  """`plgpu.broadcasted_iota` with a layout; plain `lax.broadcasted_iota` in the interpreter."""
  if interpret:
    return jax.lax.broadcasted_iota(dtype, shape, dim)
  from jax.experimental.pallas import mosaic_gpu as plgpu
  return plgpu.broadcasted_iota(dtype, shape, dim, layout=layout)
