"""What every benchmark's JSON starts with, and writing it (shared by the benchmarks)."""
from __future__ import annotations

import datetime
import json
import os
import platform
import sys

import jax


def run_meta(**extra) -> dict:
  """device, jax, python, date (UTC) and the command line, then `extra`."""
  return dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
              python=platform.python_version(),
              date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              command="python " + " ".join(sys.argv), **extra)


def write_json(out_dir: str, name: str, meta: dict, rows: list) -> str:
  """Writes {meta, rows} to out_dir/name.json; returns the path."""
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, name + ".json")
  with open(path, "w") as fh:
    json.dump(dict(meta, rows=rows), fh, indent=1)
  return path
