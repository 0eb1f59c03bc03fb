"""Atomic Orbax persistence of sessions: arrays as one pytree item, a small JSON manifest last.

Layout under a DB directory:

    <name>.json                  the manifest: what a reader trusts (format version, model
                                 fingerprint, page size, dtype, token ids, creation time,
                                 checksums, and which data directory holds the arrays)
    .data/<name>-<uuid>/arrays/  an Orbax checkpoint {"k", "v" [L, n, P, K, D], "index": {...}}

A store writes a new data directory under a temporary name, renames it into place, then
replaces the manifest with `os.replace` (atomic on POSIX) and only then deletes the data the
old manifest named. A reader therefore sees the old version or the new one, never half of
one; a store killed at any point leaves the old manifest and its data intact (at worst an
orphaned data directory, which `collect_garbage` removes). Two writers of the same name
each commit a complete version; the last `os.replace` wins.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
import weakref
import zlib
from typing import Any, Callable

import jax
import numpy as np

from alaya_jax.errors import (CheckpointError, CheckpointFormatError, ModelMismatchError,
                              SessionError, SessionNotFoundError)

FORMAT_VERSION = 1
DATA_DIR = ".data"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

# Test hooks: name -> callable run at that point of `write_session` (crash-safety tests).
HOOKS: dict[str, Callable[[], None]] = {}


def _hook(point: str):
    fn = HOOKS.get(point)
    if fn is not None:
        fn()


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or name.endswith(".json"):
        raise SessionError(f"invalid session name {name!r}: use 1-128 letters, digits, '.', '_' "
                           f"or '-', starting with a letter or digit")
    return name


# ----------------------------------------------------------------------------- fingerprint


_FINGERPRINTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def model_fingerprint(model, samples_per_array: int = 4096) -> str:
    """sha256 over the model's config and an evenly spaced sample of every weight array.

    Two models with the same config but other weights (another fine-tune, another
    quantization, another dtype) get different fingerprints; hashing a sample keeps this
    cheap for large models. Per-layer weights count as stacked [L, ...], so the CPU layout
    (stacked) and the GPU layout (a tuple per layer) of the same weights agree."""
    from flax import nnx

    with contextlib.suppress(TypeError):
        if model in _FINGERPRINTS:
            return _FINGERPRINTS[model]
    h = hashlib.sha256()
    cfg = dataclasses.asdict(model.cfg)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    samples = []
    for name in sorted(vars(model)):
        var = getattr(model, name)
        if not isinstance(var, nnx.Variable):
            continue
        value = var.get_value()
        parts = list(value) if isinstance(value, (tuple, list)) else [value]
        stacked = isinstance(value, (tuple, list))
        shape = ((len(parts),) + tuple(parts[0].shape)) if stacked else tuple(value.shape)
        h.update(f"{name}{shape}{np.dtype(parts[0].dtype).name}".encode())
        size = int(np.prod(shape))
        if not size:
            continue
        flat = np.unique(np.linspace(0, size - 1, samples_per_array).astype(np.int64))
        per = size // len(parts) if stacked else size
        for i, part in enumerate(parts):  # one gather per array, fetched together below
            mine = flat[(flat // per) == i] - i * per if stacked else flat
            if mine.size:
                idx = np.unravel_index(mine, part.shape) if part.ndim else ()
                on_host = all(d.platform == "cpu" for d in getattr(part, "devices", lambda: [])())
                src = np.asarray(part) if on_host else part  # host arrays: numpy, no compile
                samples.append(src[idx])
    for sample in jax.device_get(samples):
        h.update(np.asarray(sample).astype(np.float32).tobytes())
    fp = h.hexdigest()[:32]
    with contextlib.suppress(TypeError):
        _FINGERPRINTS[model] = fp
    return fp


def config_summary(cfg) -> dict:
    return {"name": cfg.name, "n_layers": cfg.n_layers, "n_kv_heads": cfg.n_kv_heads,
            "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size, "dim": cfg.dim}


def checksum(a: np.ndarray) -> int:
    # Bytes of any dtype (bfloat16 included, which memoryview cannot describe).
    return zlib.adler32(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data)


# ----------------------------------------------------------------------------- manifest


def manifest_path(root: str, name: str) -> str:
    return os.path.join(root, name + ".json")


def list_manifests(root: str) -> dict[str, os.stat_result]:
    out = {}
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(root):
            if (entry.name.endswith(".json") and not entry.name.startswith(".")
                    and entry.is_file()):
                out[entry.name[:-5]] = entry.stat()
    return out


def read_manifest(root: str, name: str) -> dict:
    """The manifest of one session; CheckpointError (naming it) when unreadable or malformed."""
    path = manifest_path(root, name)
    try:
        with open(path, encoding="utf-8") as f:
            man = json.load(f)
    except FileNotFoundError:
        raise SessionNotFoundError(f"no stored session named {name!r} in {root!r}") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"session {name!r}: its manifest {path!r} is unreadable or "
                              f"damaged ({type(e).__name__}: {e})") from None
    required = ("format_version", "model_fingerprint", "page_size", "dtype", "token_ids",
                "length", "num_pages", "shape", "data", "checksums", "created")
    if not isinstance(man, dict):
        raise CheckpointError(f"session {name!r}: manifest {path!r} is not a JSON object")
    version = man.get("format_version")
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise CheckpointFormatError(
            f"session {name!r} was written in format version {version}; this alaya_jax reads "
            f"versions up to {FORMAT_VERSION} (upgrade alaya_jax to open it)")
    missing = [k for k in required if k not in man]
    if missing or version != FORMAT_VERSION:
        raise CheckpointError(f"session {name!r}: manifest {path!r} is damaged (missing "
                              f"{missing or 'nothing'}, format_version {version!r})")
    if len(man["token_ids"]) != man["length"]:
        raise CheckpointError(f"session {name!r}: manifest holds {len(man['token_ids'])} token "
                              f"ids for a length of {man['length']}")
    return man


def check_compatible(man: dict, name: str, fingerprint: str, dtype, shape_tail) -> None:
    """Raises ModelMismatchError unless the session was computed by this model, in this dtype."""
    if man["model_fingerprint"] != fingerprint:
        found = man.get("model", {}).get("name", "?")
        raise ModelMismatchError(
            f"session {name!r} was computed by another model (fingerprint "
            f"{man['model_fingerprint']}, model {found!r}); this DB's model has fingerprint "
            f"{fingerprint}")
    if man["dtype"] != np.dtype(dtype).name:
        raise ModelMismatchError(f"session {name!r} holds {man['dtype']} pages; this DB keeps "
                                 f"{np.dtype(dtype).name} pages")
    L, _, _, K, D = man["shape"]
    if (L, K, D) != tuple(shape_tail):
        raise ModelMismatchError(f"session {name!r} holds K/V of shape [L,K,D]={[L, K, D]}; the "
                                 f"model needs {list(shape_tail)}")


# ----------------------------------------------------------------------------- write


@contextlib.contextmanager
def _locked(root: str):
    """An exclusive lock on the directory for the short commit step (not the data write)."""
    fd = os.open(os.path.join(root, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _fsync_dir(path: str):
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _checkpointer():
    """A synchronous Orbax PyTreeCheckpointer, with Orbax's per-save log lines held back."""
    import orbax.checkpoint as ocp

    log = logging.getLogger("absl")
    level = log.level
    log.setLevel(max(level, logging.ERROR))
    try:
        # K/V bytes barely compress (zstd measured ~2-3x slower for <15% smaller files), and
        # plain zarr chunks wrote faster than OCDBT here.
        yield ocp.PyTreeCheckpointer(use_ocdbt=False, use_compression=False)
    finally:
        log.setLevel(level)


def write_session(root: str, name: str, arrays: dict[str, Any], manifest: dict) -> dict:
    """Writes arrays {"k", "v", "index"?} and then the manifest, atomically. Returns the manifest.

    The manifest gets `data`, `checksums`, `format_version` and `created` filled in here."""
    check_name(name)
    data_root = os.path.join(root, DATA_DIR)
    os.makedirs(data_root, exist_ok=True)
    tag = uuid.uuid4().hex[:12]
    tmp = os.path.join(data_root, f".tmp-{name}-{tag}")
    final_rel = os.path.join(DATA_DIR, f"{name}-{tag}")
    tree = {k: v for k, v in arrays.items()
            if v is not None and not (isinstance(v, dict) and not v)}  # no empty items
    try:
        _hook("before_data")
        with _checkpointer() as ckpt:
            ckpt.save(os.path.join(tmp, "arrays"), tree)
        _hook("after_data")
        os.replace(tmp, os.path.join(root, final_rel))
        _fsync_dir(data_root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    now = time.time()
    man = dict(manifest, format_version=FORMAT_VERSION, data=final_rel,
               created=datetime.datetime.fromtimestamp(now, datetime.timezone.utc).isoformat(),
               created_unix=now,
               checksums={k: checksum(a) for k, a in _flat_items(tree)})
    tmp_man = os.path.join(root, f".tmp-{name}-{tag}.json")
    with open(tmp_man, "w", encoding="utf-8") as f:
        json.dump(man, f)
        f.flush()
        os.fsync(f.fileno())
    _hook("before_commit")
    with _locked(root):
        old = None
        with contextlib.suppress(Exception):
            with open(manifest_path(root, name), encoding="utf-8") as f:
                old = json.load(f).get("data")
        os.replace(tmp_man, manifest_path(root, name))
        _fsync_dir(root)
        if old and old != final_rel:
            _remove_data(root, old)
    return man


def _flat_items(tree: dict) -> list[tuple[str, np.ndarray]]:
    out = []
    for key, val in tree.items():
        if isinstance(val, dict):
            out += [(f"{key}/{k}", np.asarray(v)) for k, v in val.items()]
        else:
            out.append((key, np.asarray(val)))
    return out


def _remove_data(root: str, rel: str):
    path = os.path.normpath(os.path.join(root, rel))
    if os.path.dirname(path) == os.path.normpath(os.path.join(root, DATA_DIR)):  # never elsewhere
        shutil.rmtree(path, ignore_errors=True)


def delete_session(root: str, name: str):
    with _locked(root):
        try:
            with open(manifest_path(root, name), encoding="utf-8") as f:
                data = json.load(f).get("data")
        except FileNotFoundError:
            raise SessionNotFoundError(f"no stored session named {name!r} in {root!r}") from None
        except (OSError, ValueError):
            data = None
        os.remove(manifest_path(root, name))
        _fsync_dir(root)
        if data:
            _remove_data(root, data)


def collect_garbage(root: str, min_age_s: float = 3600.0) -> list[str]:
    """Removes data directories no manifest names (left by killed stores) older than min_age_s.

    The age guard keeps it from deleting a directory another process is still writing."""
    data_root = os.path.join(root, DATA_DIR)
    removed = []
    with _locked(root):
        used = set()
        for name in list_manifests(root):
            with contextlib.suppress(Exception):
                with open(manifest_path(root, name), encoding="utf-8") as f:
                    used.add(os.path.normpath(json.load(f)["data"]))
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(data_root):
                rel = os.path.normpath(os.path.join(DATA_DIR, entry.name))
                if rel in used or time.time() - entry.stat().st_mtime < min_age_s:
                    continue
                shutil.rmtree(entry.path, ignore_errors=True)
                removed.append(entry.name)
        for entry in os.scandir(root):  # manifests of killed stores
            if (entry.name.startswith(".tmp-") and entry.name.endswith(".json")
                    and time.time() - entry.stat().st_mtime >= min_age_s):
                with contextlib.suppress(OSError):
                    os.remove(entry.path)
                    removed.append(entry.name)
    return removed


# ----------------------------------------------------------------------------- read


def read_arrays(root: str, name: str, man: dict) -> dict[str, Any]:
    """The arrays of a session as numpy, checked against the manifest's shapes and checksums."""
    path = os.path.join(root, man["data"], "arrays")
    if not os.path.isdir(path):
        raise CheckpointError(f"session {name!r}: its data directory {path!r} is missing")
    try:
        with _checkpointer() as ckpt:
            tree = ckpt.restore(path)
    except Exception as e:  # Orbax/TensorStore raise many types for damaged files
        raise CheckpointError(f"session {name!r}: cannot read its arrays from {path!r}; the "
                              f"checkpoint is damaged or truncated ({type(e).__name__}: "
                              f"{str(e)[:300]})") from None
    tree = jax.tree.map(np.asarray, tree)
    shape = tuple(man["shape"])
    for key in ("k", "v"):
        a = tree.get(key)
        if a is None or a.shape != shape or a.dtype.name != man["dtype"]:
            found = None if a is None else f"{a.shape} {a.dtype}"
            raise CheckpointError(f"session {name!r}: array {key!r} is {found}; the manifest "
                                  f"says {shape} {man['dtype']}")
    sums = man["checksums"]
    items = dict(_flat_items(tree))
    if set(items) != set(sums):
        raise CheckpointError(f"session {name!r}: arrays {sorted(items)} do not match the "
                              f"manifest's {sorted(sums)}")
    for key, a in items.items():
        if checksum(a) != sums[key]:
            raise CheckpointError(f"session {name!r}: checksum mismatch in {key!r}; the stored "
                                  f"data is damaged")
    return tree
