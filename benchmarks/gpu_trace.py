"""The GPU kernels of one call, read from a jax profiler trace (shared by the GPU benchmarks)."""
from __future__ import annotations

import glob
import os
import tempfile

import jax


def kernel_events(f, *args, starts: bool = False) -> list[tuple]:
  """Runs f(*args) once under the profiler; returns (kernel name, seconds) for every kernel
  the GPU streams executed, in trace order (memcpys included); starts=True: (name, seconds,
  start in seconds on the trace's clock)."""
  from jax.profiler import ProfileData
  d = tempfile.mkdtemp()
  jax.profiler.start_trace(d)
  jax.block_until_ready(f(*args))
  jax.profiler.stop_trace()
  prof = ProfileData.from_file(glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)[0])
  return [(ev.name, ev.duration_ns * 1e-9) + ((ev.start_ns * 1e-9,) if starts else ())
          for plane in prof.planes if "GPU" in plane.name
          for line in plane.lines if "tream" in line.name
          for ev in line.events]
