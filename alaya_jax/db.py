"""The public database: `DB` holds the page pool and the stored sessions; `Session` is one
sequence's view of it (the paper's Table 2).

    db = aj.DB(model, path="sessions/")            # path=None: in memory only
    session, rest = db.create_session(prompt_ids)  # reuses the longest held prefix
    logits = session.prefill(rest)                 # pays only for the new tokens
    db.store(session, "gpl")                       # atomic; a new process finds it
    out = session.generate(max_new_tokens=64)
    o = session.attention(q, layer)                # q [H, D] -> o [H, D]
    session.update(q, k, v, layer)                 # append one token's k, v [K, D]

Both classes are thin shells: the arrays live in a `PagePool` pytree and a session's state
is a `SessionState` pytree (page table + lengths); every array operation is a pure jitted
function of those (`alaya_jax.store.pages`). Sharing is copy-on-write: a session never
writes a page another session or a stored snapshot also holds.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import os
import time
import uuid
import warnings
import weakref
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from alaya_jax.errors import (CheckpointError, ConfigError, ContextLengthError, SessionError,
                              SessionNotFoundError, ShapeError)
from alaya_jax.generate import GenerationResult, Sampling, decode
from alaya_jax.generate import prefill as _prefill
from alaya_jax.model.llama import KVCache, Llama
from alaya_jax.store import pages as pg
from alaya_jax.store import persist
from alaya_jax.store.radix import RadixTree

_session_ids = itertools.count(1)


@functools.cache
def _append_kv_jit():
    from alaya_jax.attention import append_kv

    return jax.jit(append_kv)


def _as_ids(ids) -> list[int]:
    if isinstance(ids, (jax.Array, np.ndarray)):
        if ids.ndim != 1:
            raise ShapeError(f"token ids must be a 1-D sequence, got shape {ids.shape}")
        return [int(i) for i in np.asarray(ids)]
    return [int(i) for i in ids]


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


@dataclasses.dataclass
class SessionIndex:
    """Indexes over a session's keys, one entry per layer, built for `capacity` positions.

    layers[l] is (cluster index or None, block index or None) as `alaya_jax.attention`
    builds them; they are stored and loaded with the session's pages."""

    config: Any  # alaya_jax.attention.IndexConfig
    capacity: int  # S the indexes were built for
    layers: list  # [(ClusterIndex | None, BlockIndex | None)] * L


@dataclasses.dataclass
class _Stored:
    """A stored (named, immutable) session: on disk, in memory, or both."""

    name: str
    ids: list[int]
    pages: list[int] | None  # None: on disk, pages not loaded yet
    index: Any = None
    manifest: dict | None = None
    stat_key: tuple | None = None

    @property
    def length(self) -> int:
        return len(self.ids)


class _Pages:
    """A session's page table, shared with its finalizer (which must not hold the session)."""

    def __init__(self, pages: list[int]):
        self.pages = pages


class _EosOnly:
    """Stands in for a tokenizer when only stop ids are needed."""

    def __init__(self, eos_ids):
        self._ids = set(eos_ids)

    def stop_ids(self):
        return self._ids

    def decode(self, ids, skip_special_tokens=False):
        return ""


def _known_prefix(ids: Sequence[int]) -> list[int]:
    """The ids before the first unknown one (-1: a token appended by k/v alone)."""
    out = []
    for i in ids:
        if i < 0:
            break
        out.append(i)
    return out


# ----------------------------------------------------------------------------- DB


class DB:
    """A KV-cache database for one model.

    model: the `Llama` whose K/V the pages hold (pages use its dtype).
    path: a directory for stored sessions (created if missing); None keeps them in memory.
    page_size: P, tokens per page. initial_pages: pages allocated up front; the pool doubles
    when it runs out, up to max_pages (None: no limit), then raises PoolFullError.
    tokenizer: used by `Session.generate` for stop ids and text (optional).
    prefill_chunk: tokens per prefill chunk.
    """

    def __init__(self, model: Llama, path: str | os.PathLike | None = None, *,
                 page_size: int = 64, initial_pages: int = 64, max_pages: int | None = None,
                 tokenizer=None, prefill_chunk: int = 512):
        if page_size < 1 or initial_pages < 1:
            raise ConfigError(f"page_size and initial_pages must be >= 1, got {page_size}, "
                             f"{initial_pages}")
        if max_pages is not None and max_pages < initial_pages:
            raise ConfigError(f"max_pages ({max_pages}) is below initial_pages ({initial_pages})")
        self.model = model
        self.cfg = model.cfg
        self.tokenizer = tokenizer
        self.page_size = page_size
        self.prefill_chunk = prefill_chunk
        self.dtype = jnp.dtype(model.dtype)
        self.path = None if path is None else os.fspath(path)
        cfg = self.cfg
        self.pool = pg.PagePool.zeros(cfg.n_layers, initial_pages, page_size, cfg.n_kv_heads,
                                      cfg.head_dim, self.dtype)
        self.allocator = pg.PageAllocator(initial_pages, max_pages)
        self._tree = RadixTree()
        self._stored: dict[str, _Stored] = {}
        self._problems: dict[str, tuple[tuple | None, Exception]] = {}
        self._live: weakref.WeakValueDictionary[int, Session] = weakref.WeakValueDictionary()
        self._dirty: set[int] = set()
        self._fingerprint: str | None = None
        if self.path is not None:
            os.makedirs(self.path, exist_ok=True)
            self.fingerprint  # noqa: B018 (computed once, up front: stores and checks need it)
            self.refresh()

    # --- identity -------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        """The model's fingerprint (config + a hash of a sample of the weights)."""
        if self._fingerprint is None:
            self._fingerprint = persist.model_fingerprint(self.model)
        return self._fingerprint

    def __repr__(self):
        return (f"DB(path={self.path!r}, page_size={self.page_size}, sessions={len(self._stored)}, "
                f"pages {self.allocator.used_pages}/{self.allocator.num_pages})")

    # --- pages ----------------------------------------------------------------------------
    def _alloc(self, n: int) -> list[int]:
        if n <= 0:
            return []
        if self.allocator.free_pages < n:
            target = self.allocator.grow_to(n)
            self.pool = pg.grow(self.pool, target)
            self.allocator.extend(target)
        return self.allocator.alloc(n)

    def _release(self, holder: _Pages, owner):
        if holder.pages:
            self.allocator.decref(holder.pages)
            holder.pages = []
        self._tree.remove(owner)
        self._dirty.discard(owner[1])

    def stats(self) -> dict:
        """Pool occupancy: pages in use / free / total and bytes per page."""
        a = self.allocator
        return dict(pages_used=a.used_pages, pages_free=a.free_pages, pages_total=a.num_pages,
                    max_pages=a.max_pages, page_size=self.page_size,
                    bytes_per_page=self.pool.nbytes_per_page,
                    live_sessions=len(self._live), stored_sessions=len(self._stored))

    # --- stored sessions: discovery -------------------------------------------------------
    def refresh(self):
        """Rescans the directory for sessions stored (or deleted) by other processes."""
        if self.path is None:
            return
        found = persist.list_manifests(self.path)
        for name in [n for n, r in self._stored.items() if r.manifest is not None
                     and n not in found]:
            self._drop_stored(name)
        for name in [n for n in self._problems if n not in found]:
            del self._problems[name]
        for name, st in found.items():
            key = (st.st_mtime_ns, st.st_size, st.st_ino)
            rec = self._stored.get(name)
            if rec is not None and rec.stat_key == key:
                continue
            if name in self._problems and self._problems[name][0] == key:
                continue
            try:
                man = persist.read_manifest(self.path, name)
                self._check_manifest(man, name)
            except SessionNotFoundError:  # deleted since the scan
                continue
            except CheckpointError as e:
                self._set_problem(name, e, key)
                continue
            self._problems.pop(name, None)
            if rec is not None and rec.manifest is not None and rec.manifest["data"] == man["data"]:
                rec.stat_key = key
                continue
            self._drop_stored(name)
            self._add_stored(_Stored(name, list(man["token_ids"]), None, manifest=man,
                                     stat_key=key))

    def _check_manifest(self, man: dict, name: str):
        cfg = self.cfg
        persist.check_compatible(man, name, self.fingerprint, self.dtype,
                                 (cfg.n_layers, cfg.n_kv_heads, cfg.head_dim))

    def _set_problem(self, name: str, err: Exception, key=None):
        if key is None and self.path is not None:  # remember the version that failed
            try:
                st = os.stat(persist.manifest_path(self.path, name))
                key = (st.st_mtime_ns, st.st_size, st.st_ino)
            except OSError:
                pass
        old = self._problems.get(name)
        self._problems[name] = (key, err)
        self._drop_stored(name)
        if old is None or str(old[1]) != str(err):
            warnings.warn(f"{err} (other sessions stay usable)", stacklevel=3)

    def _add_stored(self, rec: _Stored):
        self._stored[rec.name] = rec
        self._tree.insert(("stored", rec.name), _known_prefix(rec.ids))

    def _drop_stored(self, name: str):
        rec = self._stored.pop(name, None)
        if rec is None:
            return
        self._tree.remove(("stored", name))
        if rec.pages:
            self.allocator.decref(rec.pages)
            rec.pages = None

    def sessions(self) -> list[str]:
        """Names of the stored sessions this model can use (see `problems()` for the rest)."""
        self.refresh()
        return sorted(self._stored)

    def problems(self) -> dict[str, Exception]:
        """Stored sessions that cannot be used, with the reason (wrong model, damaged, ...)."""
        self.refresh()
        return {n: e for n, (_, e) in sorted(self._problems.items())}

    def info(self, name: str) -> dict:
        """What is known about a stored session without loading it."""
        rec = self._get_stored(name)
        man = rec.manifest or {}
        return dict(name=name, length=rec.length, loaded=rec.pages is not None,
                    on_disk=rec.manifest is not None, created=man.get("created"),
                    page_size=man.get("page_size", self.page_size),
                    dtype=man.get("dtype", self.dtype.name),
                    nbytes=self.pool.nbytes_per_page * math.ceil(rec.length / self.page_size),
                    has_index=rec.index is not None or bool(man.get("index")))

    def _get_stored(self, name: str) -> _Stored:
        if name not in self._stored and self.path is not None:
            self.refresh()
        if name in self._problems:
            raise self._problems[name][1]
        rec = self._stored.get(name)
        if rec is None:
            where = f" in {self.path!r}" if self.path else " (in-memory DB)"
            raise SessionNotFoundError(f"no stored session named {name!r}{where}; stored: "
                                       f"{sorted(self._stored)}")
        return rec

    # --- stored sessions: loading ---------------------------------------------------------
    def _ensure_loaded(self, rec: _Stored):
        """Loads a stored session's pages on first use (the lazy part of reopening)."""
        if rec.pages is not None:
            return
        try:
            arrays = persist.read_arrays(self.path, rec.name, rec.manifest)
        except CheckpointError as first:
            # A concurrent store may have replaced the version we knew: read the new one.
            try:
                man = persist.read_manifest(self.path, rec.name)
            except Exception:
                man = None
            if man is None or man["data"] == rec.manifest["data"]:
                raise first
            self._check_manifest(man, rec.name)
            arrays = persist.read_arrays(self.path, rec.name, man)
            self._tree.remove(("stored", rec.name))
            rec.manifest, rec.ids, rec.stat_key = man, list(man["token_ids"]), None
            self._tree.insert(("stored", rec.name), _known_prefix(rec.ids))
        man = rec.manifest
        k, v = arrays["k"], arrays["v"]  # [L, n, Pf, K, D]
        Pf, P = man["page_size"], self.page_size
        if Pf != P:  # re-page: tokens are what is stored, pages are a layout
            L, n, _, K, D = k.shape
            S = rec.length
            n = math.ceil(S / P)
            def repage(x):
                x = x.reshape(L, -1, K, D)[:, :S]
                x = np.concatenate([x, np.zeros((L, n * P - S, K, D), x.dtype)], axis=1)
                return x.reshape(L, n, P, K, D)
            k, v = repage(k), repage(v)
        ids = self._alloc(k.shape[1])
        self.pool = pg.write_pages(self.pool, jnp.asarray(ids, jnp.int32), jnp.asarray(k),
                                   jnp.asarray(v))
        rec.pages = ids
        rec.index = self._restore_index(rec.name, man.get("index"), arrays.get("index"))

    def load(self, name: str) -> "Session":
        """A live session holding the whole stored session (its pages shared, copy-on-write).

        Raises SessionNotFoundError, or the session's CheckpointError / ModelMismatchError /
        CheckpointFormatError; other sessions stay usable either way."""
        rec = self._get_stored(name)
        try:
            self._ensure_loaded(rec)
        except CheckpointError as e:
            self._set_problem(name, e)
            raise
        s = Session(self, rec.ids, rec.pages[:math.ceil(rec.length / self.page_size)], rec.index)
        s.name = name
        return s

    def unload(self, name: str):
        """Frees a stored session's pages (it stays on disk and loads again when needed)."""
        rec = self._get_stored(name)
        if rec.manifest is None:
            raise SessionError(f"session {name!r} is only in memory: unloading would lose it")
        if rec.pages:
            self.allocator.decref(rec.pages)
        rec.pages, rec.index = None, None

    # --- sessions -------------------------------------------------------------------------
    def _sync_live(self):
        for sid in list(self._dirty):
            s = self._live.get(sid)
            if s is not None and not s.closed:
                self._tree.insert(("live", sid), _known_prefix(s._ids))
        self._dirty.clear()

    def _materialize(self, owner):
        kind, key = owner
        if kind == "live":
            s = self._live.get(key)
            if s is None or s.closed:
                self._tree.remove(owner)
                raise KeyError(owner)
            return s._holder.pages, s.index, s._ids
        rec = self._stored[key]
        self._ensure_loaded(rec)
        return rec.pages, rec.index, rec.ids

    def _pick(self, owners) -> tuple:
        def rank(o):
            if o[0] == "live":
                return (0, str(o[1]))
            return (1 if self._stored[o[1]].pages is not None else 2, o[1])
        return min(owners, key=rank)

    def create_session(self, prompt_ids) -> tuple["Session", list[int]]:
        """A session holding the longest prefix of prompt_ids already held, and the rest.

        Held: stored sessions (this process's and, with a path, those on disk: loaded on
        first use) and live sessions of this DB. At least the last id is always left to
        prefill, so `session.prefill(rest)` gives the logits of the prompt's last token.
        A stored session that turns out unreadable is reported (warning, `problems()`) and
        skipped; the next best prefix is used."""
        ids = _as_ids(prompt_ids)
        self.refresh()
        self._sync_live()
        limit = max(len(ids) - 1, 0)
        for _ in range(64):  # each retry drops or corrects a stale candidate
            m, owners = self._tree.match(ids[:limit])
            if m == 0:
                break
            owner = self._pick(owners)
            try:
                pages, index, src_ids = self._materialize(owner)
            except KeyError:
                continue
            except CheckpointError as e:
                self._set_problem(owner[1], e)
                continue
            if src_ids[:m] != ids[:m]:  # replaced on disk by another process since: rematch
                continue
            s = Session(self, ids[:m], pages[:math.ceil(m / self.page_size)],
                        index if m == len(src_ids) else None)
            s.reused = m
            return s, ids[m:]
        return Session(self, [], []), ids

    def import_kv(self, prompt_ids, kv_cache, *, row: int | None = None) -> "Session":
        """Adopts a KV cache computed elsewhere as a new session holding prompt_ids.

        kv_cache: a `KVCache` (k, v [L, B, S, K, D] post-RoPE, lengths [B]; pick a row when
        B > 1) or a pair (k, v) of [L, S, K, D] arrays. Its layers, kv heads, head dim and
        dtype must be the model's, S must hold the prompt, and a KVCache's length must equal
        len(prompt_ids). The session is live (later prompts reuse it); `store` persists it."""
        ids = _as_ids(prompt_ids)
        T = len(ids)
        cfg = self.cfg
        if isinstance(kv_cache, KVCache):
            k, v = kv_cache.as_stacked().k, kv_cache.as_stacked().v
            if k.ndim != 5:
                raise ShapeError(f"KVCache.k must be [L,B,S,K,D], got shape {k.shape}")
            B = k.shape[1]
            if row is None:
                if B != 1:
                    raise ShapeError(f"the KVCache holds {B} sequences; pass row= to pick one")
                row = 0
            if not 0 <= row < B:
                raise ShapeError(f"row {row} is outside the cache's batch of {B}")
            length = int(np.asarray(kv_cache.lengths)[row])
            if length != T:
                raise ShapeError(f"the KVCache row {row} holds {length} tokens but "
                                 f"{T} prompt ids were given")
            k, v = k[:, row], v[:, row]
        else:
            try:
                k, v = kv_cache
            except (TypeError, ValueError):
                raise ShapeError("kv_cache must be a KVCache or a pair (k, v) of [L,S,K,D] "
                                 f"arrays, got {type(kv_cache).__name__}") from None
        want = (cfg.n_layers, None, cfg.n_kv_heads, cfg.head_dim)
        for nm, x in (("k", k), ("v", v)):
            if x.ndim != 4 or any(w is not None and w != s for w, s in zip(want, x.shape)):
                raise ShapeError(f"{nm} has shape {tuple(x.shape)}; this model needs "
                                 f"[L,S,K,D] = [{cfg.n_layers}, S, {cfg.n_kv_heads}, "
                                 f"{cfg.head_dim}]")
            if jnp.dtype(x.dtype) != self.dtype:
                raise ShapeError(f"{nm} has dtype {jnp.dtype(x.dtype).name}; this DB keeps "
                                 f"{self.dtype.name} pages (convert with .astype first)")
        if k.shape != v.shape:
            raise ShapeError(f"k {tuple(k.shape)} and v {tuple(v.shape)} differ in shape")
        if k.shape[1] < T:
            raise ShapeError(f"the cache holds {k.shape[1]} positions, fewer than the {T} "
                             f"prompt ids")
        if T > cfg.max_seq_len:
            raise ContextLengthError(f"{T} tokens exceed the model's context of "
                                     f"{cfg.max_seq_len}")
        s = Session(self, [], [])
        if T:
            s._append_dense(jnp.asarray(k)[:, None], jnp.asarray(v)[:, None], 0, T)
            s._ids = list(ids)
            s._lengths[:] = T
            self._dirty.add(s.id)
        return s

    # --- persistence ----------------------------------------------------------------------
    def store(self, session: "Session", name: str | None = None) -> str:
        """Stores a snapshot of the session under name (default: a fresh unique name).

        Later appends to the session do not change the snapshot. With a path the write is
        atomic (a crash leaves the previous version of name readable). Returns the name."""
        session._check_usable()
        name = persist.check_name(name or f"session-{time.strftime('%Y%m%d-%H%M%S')}-"
                                          f"{uuid.uuid4().hex[:6]}")
        n = math.ceil(session.length / self.page_size)
        pages = list(session._holder.pages[:n])
        rec = _Stored(name, list(session._ids), pages, index=session.index)
        if self.path is not None:
            table = jnp.asarray(pages, jnp.int32)
            arrays = dict(k=np.asarray(self.pool.k[:, table]), v=np.asarray(self.pool.v[:, table]),
                          index=None)
            index_meta = None
            if session.index is not None:
                index_meta, arrays["index"] = self._index_payload(session.index)
            cfg = self.cfg
            man = dict(name=name, model_fingerprint=self.fingerprint,
                       model=persist.config_summary(cfg), page_size=self.page_size,
                       dtype=self.dtype.name, token_ids=list(session._ids),
                       length=session.length, num_pages=n, shape=list(arrays["k"].shape),
                       index=index_meta)
            rec.manifest = persist.write_session(self.path, name, arrays, man)
        self.allocator.incref(pages)
        self._drop_stored(name)
        self._problems.pop(name, None)
        self._add_stored(rec)
        session.name = name
        return name

    def delete(self, name: str):
        """Deletes a stored session (from disk too); live sessions using it keep their pages."""
        if name not in self._stored and name not in self._problems:
            self.refresh()
        if name not in self._stored and name not in self._problems:
            raise SessionNotFoundError(f"no stored session named {name!r}")
        on_disk = name in self._problems or self._stored[name].manifest is not None
        self._drop_stored(name)
        self._problems.pop(name, None)
        if self.path is not None and on_disk:
            try:
                persist.delete_session(self.path, name)
            except SessionNotFoundError:
                pass  # another process deleted it first

    def collect_garbage(self, min_age_s: float = 3600.0) -> list[str]:
        """Removes data left by killed stores (older than min_age_s); returns what went."""
        return [] if self.path is None else persist.collect_garbage(self.path, min_age_s)

    def _index_payload(self, index) -> tuple[dict, dict]:
        """(manifest entry, {key: array}) for a session's index pytree."""
        if isinstance(index, SessionIndex):
            tree, kind = index.layers, "session_index"
            cfg = index.config
            conf = {f: (None if getattr(cfg, f) is None else dataclasses.asdict(getattr(cfg, f)))
                    for f in ("cluster", "block")}
            extra = dict(config=conf, capacity=index.capacity)
        else:
            tree, kind, extra = index, "pytree", {}
        leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        paths = [jax.tree_util.keystr(p) for p, _ in leaves]
        arrays = {f"i{j:05d}": np.asarray(x) for j, (_, x) in enumerate(leaves)}
        return dict(kind=kind, paths=paths, **extra), arrays

    def _restore_index(self, name: str, meta: dict | None, arrays: dict | None):
        if not meta:
            return None
        arrays = arrays or {}
        leaves = [arrays[f"i{j:05d}"] for j in range(len(meta["paths"]))]
        if meta["kind"] != "session_index":
            return dict(zip(meta["paths"], leaves))
        from alaya_jax.attention import IndexConfig
        from alaya_jax.index import BlockConfig, BlockIndex, ClusterConfig, ClusterIndex

        c, b = meta["config"]["cluster"], meta["config"]["block"]
        config = IndexConfig(cluster=None if c is None else ClusterConfig(**c),
                             block=None if b is None else BlockConfig(**b))
        cfg, S = self.cfg, meta["capacity"]
        one = (None if config.cluster is None else ClusterIndex.abstract(
                   config.cluster, 1, S, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, self.dtype),
               None if config.block is None else BlockIndex.abstract(
                   config.block, 1, S, cfg.n_kv_heads, cfg.head_dim))
        abstract = [one] * cfg.n_layers
        want, treedef = jax.tree_util.tree_flatten(abstract)
        if len(want) != len(leaves) or any(w.shape != x.shape for w, x in zip(want, leaves)):
            raise CheckpointError(f"session {name!r}: its index arrays do not match the index "
                                  f"layout of this alaya_jax version")
        layers = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(x) for x in leaves])
        return SessionIndex(config, S, list(layers))


# ----------------------------------------------------------------------------- Session


class Session:
    """One sequence's KV cache in the DB's page pool (created by `DB.create_session`,
    `DB.import_kv`, `DB.load` or `Session.fork`)."""

    def __init__(self, db: DB, ids: Sequence[int], pages: Sequence[int], index=None):
        self.db = db
        self.id = next(_session_ids)
        self.name: str | None = None  # the stored name it was loaded from or stored as
        self.reused = len(ids)  # tokens taken from a held prefix at creation
        self.index = index
        self._ids = list(ids)
        self._holder = _Pages(list(pages))
        db.allocator.incref(self._holder.pages)
        self._lengths = np.full(db.cfg.n_layers, len(ids), np.int64)
        self._pending_ids: list[int] = []
        self._logits = None
        self._finalizer = weakref.finalize(self, db._release, self._holder, ("live", self.id))
        db._live[self.id] = self
        if ids:
            db._dirty.add(self.id)

    # --- state ----------------------------------------------------------------------------
    @property
    def length(self) -> int:
        """Tokens held in every layer."""
        return int(self._lengths.min())

    @property
    def token_ids(self) -> list[int]:
        return list(self._ids)

    @property
    def page_table(self) -> np.ndarray:
        return np.asarray(self._holder.pages, np.int32)

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    @property
    def state(self) -> pg.SessionState:
        """The pytree a jitted step carries (with `db.pool`)."""
        table = self._holder.pages or [0]
        return pg.SessionState(page_table=jnp.asarray(table, jnp.int32),
                               lengths=jnp.asarray(self._lengths, jnp.int32))

    def __repr__(self):
        return (f"Session(id={self.id}, name={self.name!r}, length={self.length}, "
                f"pages={len(self._holder.pages)}, reused={self.reused})")

    def close(self):
        """Returns the session's pages to the pool (shared pages stay with their other owners)."""
        self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _check_open(self):
        if self.closed:
            raise SessionError(f"session {self.id} is closed")

    def _check_usable(self):
        self._check_open()
        if self._lengths.min() != self._lengths.max():
            raise SessionError(f"session {self.id} is inside an update (layers hold "
                               f"{self._lengths.min()}..{self._lengths.max()} tokens): finish "
                               f"the token in every layer first")

    def fork(self) -> "Session":
        """A new session sharing every page of this one (copy-on-write)."""
        self._check_usable()
        s = Session(self.db, self._ids, self._holder.pages, self.index)
        s._logits = self._logits
        s.reused = self.length
        return s

    # --- writing pages --------------------------------------------------------------------
    def _ensure_room(self, start: int, count: int):
        """Makes positions start..start+count-1 writable: copies shared pages, adds new ones."""
        db, P = self.db, self.db.page_size
        pages = self._holder.pages
        first, end = start // P, math.ceil((start + count) / P)
        shared = [i for i in range(first, min(end, len(pages)))
                  if db.allocator.refcount[pages[i]] > 1]
        if shared:  # copy-on-write: a shared page (e.g. a partly filled prefix page)
            new = db._alloc(len(shared))
            old = [pages[i] for i in shared]
            db.pool = pg.copy_pages(db.pool, jnp.asarray(old, jnp.int32),
                                    jnp.asarray(new, jnp.int32))
            db.allocator.decref(old)
            for i, p in zip(shared, new):
                pages[i] = p
        if end > len(pages):
            pages.extend(db._alloc(end - len(pages)))

    def _append_dense(self, cache_k, cache_v, start: int, count: int):
        """Writes positions start..start+count-1 of row 0 of a dense [L, B, S, K, D] cache."""
        self._ensure_room(start, count)
        db = self.db
        ids, slots = pg.token_slots(self._holder.pages, start, count, db.page_size,
                                    pg.bucket(count), db.pool.num_pages)
        db.pool = pg.write_tokens_from_cache(db.pool, cache_k, cache_v, jnp.int32(start), ids,
                                             slots)

    def kv_cache(self, capacity: int | None = None, *, stacked: bool | None = None) -> KVCache:
        """The session's K/V as a dense batch-1 `KVCache` with room for `capacity` positions
        (default: its length), e.g. for `alaya_jax.generate.decode`. stacked: one [L, 1, S,
        K, D] array per k and v, or tuples of L [1, S, K, D] (default: the backend's layout,
        as `KVCache.zeros` picks it)."""
        self._check_usable()
        cap = max(self.length if capacity is None else capacity, self.length, 1)
        P = self.db.page_size
        n = math.ceil(_round_up(cap, 256 if cap > 256 else 16) / P)
        pages = self._holder.pages
        table = pages[:n] + [pages[0] if pages else 0] * (n - len(pages[:n]))
        stacked = jax.default_backend() == "cpu" if stacked is None else stacked
        k, v = pg.gather_cache(self.db.pool, jnp.asarray(table, jnp.int32), stacked=stacked)
        return KVCache(k=k, v=v,
                       lengths=jnp.full((1,), self.length, jnp.int32))

    # --- the model's side -----------------------------------------------------------------
    def prefill(self, ids, *, progress=None) -> jax.Array:
        """Runs the model over new token ids after what the session holds and appends their
        K/V. Returns the logits of the last new token [V] f32."""
        self._check_usable()
        ids = _as_ids(ids)
        T, start = len(ids), self.length
        if T == 0:
            raise ShapeError("prefill needs at least one token id")
        cfg, chunk = self.db.cfg, self.db.prefill_chunk
        if start + T > cfg.max_seq_len:
            raise ContextLengthError(f"{start} held + {T} new tokens exceed the model's context "
                                     f"of {cfg.max_seq_len}")
        C = min(chunk, _round_up(T, 16))
        cache = self.kv_cache(start + math.ceil(T / C) * C)
        logits, cache = _prefill(self.db.model, np.asarray([ids], np.int32),
                                 np.asarray([T], np.int32), cache, start=start, chunk=chunk,
                                 progress=progress)
        self._append_dense(cache.k, cache.v, start, T)
        if isinstance(self.index, SessionIndex):  # the index follows the pages
            if start + T > self.index.capacity:
                warnings.warn(f"session {self.id}: {start + T} tokens pass its index's capacity "
                              f"of {self.index.capacity}; the index is dropped (build_index "
                              f"again to use a plan that needs it)")
                self.index = None
            else:
                for layer in range(cfg.n_layers):
                    lk, lv = cache.layer(layer)  # [1, S, K, D]
                    self._index_append(layer, lk[0, start:start + T], lv[0, start:start + T])
        self._ids += ids
        self._lengths[:] = start + T
        self._logits = logits[0]
        self.db._dirty.add(self.id)
        return logits[0]

    def generate(self, ids=None, max_new_tokens: int = 64, *, tokenizer=None,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, attention=None,
                 stream=None, stop_at_eos: bool = True, keep: bool = False) -> GenerationResult:
        """Prefills ids (if given), then decodes up to max_new_tokens with
        `alaya_jax.generate.decode` over a dense copy of the session's pages.

        keep: append the generated tokens to the session (otherwise it still ends at the
        prompt, ready for another continuation). Text needs a tokenizer (here or the DB's)."""
        self._check_usable()
        tok = tokenizer or self.db.tokenizer
        t0 = time.perf_counter()
        if ids is not None and len(ids):
            logits = self.prefill(ids)
        elif self._logits is not None:
            logits = self._logits
        else:
            raise SessionError("the session has no logits to continue from: pass the next ids "
                               "(create_session leaves at least one) or call prefill first")
        logits.block_until_ready()
        t1 = time.perf_counter()
        room = self.db.cfg.max_seq_len - self.length
        if max_new_tokens > room:
            warnings.warn(f"the session holds {self.length} tokens; generating at most {room} "
                          f"of the {max_new_tokens} asked (the model's context is "
                          f"{self.db.cfg.max_seq_len})")
            max_new_tokens = room
        cache = self.kv_cache(self.length + max_new_tokens)
        res = decode(self.db.model, tok or _EosOnly(self.db.cfg.eos_ids), cache, logits[None],
                     max_new_tokens, sampling=Sampling(temperature, top_p), attention=attention,
                     seed=seed, stream=stream, stop_at_eos=stop_at_eos)
        gen, steps = res[0], res[1]
        stats = res[2] if len(res) > 2 else None
        t2 = time.perf_counter()
        prompt_len = self.length
        if keep and gen[0]:
            self.prefill(gen[0])
        text = tok.decode(gen[0], skip_special_tokens=True) if tok is not None else ""
        return GenerationResult(texts=[text], tokens=gen, prompt_lengths=[prompt_len],
                                last_prompt_logits=np.asarray(logits)[None], prefill_s=t1 - t0,
                                decode_s=t2 - t1, steps=steps, attention_stats=stats)

    # --- the paper's interface ------------------------------------------------------------
    def attention(self, q, layer: int, plan=None, *, return_stats: bool = False):
        """Decode attention of q over the session's keys of one layer.

        q [H, D] (or [B, H, D], every row reading this session) post-RoPE. plan None: full
        attention. A `alaya_jax.attention.Plan` answers through `sparse_attention` with the
        session's index for that layer (see `build_index`). Returns o like q (f32 for a
        plan), plus the plan's stats with return_stats."""
        self._check_open()
        q = jnp.asarray(q)
        squeeze = q.ndim == 2
        q = q[None] if squeeze else q
        if not 0 <= layer < self.db.cfg.n_layers:
            raise ShapeError(f"layer {layer} is outside 0..{self.db.cfg.n_layers - 1}")
        if q.ndim != 3 or q.shape[1:] != (self.db.cfg.n_heads, self.db.cfg.head_dim):
            raise ShapeError(f"q must be [H, D] = [{self.db.cfg.n_heads}, "
                             f"{self.db.cfg.head_dim}] (or [B, H, D]), got {tuple(q.shape)}")
        stats = None
        if plan is None:
            o = pg.paged_attention(self.db.pool, self.state, q, jnp.int32(layer))
        else:
            from alaya_jax.attention import sparse_attention_jit

            store = self._layer_store(layer)
            B = q.shape[0]
            if B != 1:
                store = jax.tree.map(lambda x: jnp.broadcast_to(x, (B,) + x.shape[1:]), store)
            o, stats = sparse_attention_jit(q, store, plan)
        o = o[0] if squeeze else o
        return (o, stats) if return_stats else o

    def _index_append(self, layer: int, k, v):
        """Adds tokens k, v [T, K, D] just written at the layer's end to its index."""
        if not isinstance(self.index, SessionIndex):
            return
        old = self._layer_store(layer)  # lengths: before the new tokens
        new, _ = _append_kv_jit()(old, k[None], v[None])  # capacity checked by the callers
        layers = list(self.index.layers)  # the index may be shared: replace, never mutate
        layers[layer] = (new.cluster, new.block)
        self.index = dataclasses.replace(self.index, layers=layers)

    def _layer_store(self, layer: int):
        """This layer's pages and index as an `alaya_jax.attention.KVStore` (batch 1)."""
        from alaya_jax.attention import KVStore

        n_tok = int(self._lengths[layer])
        cluster = block = None
        P = self.db.page_size
        if isinstance(self.index, SessionIndex):
            cap = self.index.capacity
            if n_tok > cap:
                raise SessionError(f"the session holds {n_tok} tokens in layer {layer}, more than "
                                   f"the {cap} its index was built for: call build_index again")
            cluster, block = self.index.layers[layer]
        else:
            cap = max(n_tok, 1)
        n = math.ceil(cap / P)
        pages = self._holder.pages
        table = pages[:n] + [pages[0] if pages else 0] * (n - len(pages[:n]))
        k, v = pg.gather_layer(self.db.pool, jnp.int32(layer), jnp.asarray(table, jnp.int32))
        k, v = k[None, :cap], v[None, :cap]
        return KVStore(k, v, jnp.full((1,), n_tok, jnp.int32), cluster, block)

    def build_index(self, config=None, *, capacity: int | None = None, headroom: int = 256):
        """Builds the per-layer indexes (`alaya_jax.attention.IndexConfig`) over the keys held,
        for up to `capacity` positions (default: length + headroom). They follow the session:
        `update` appends to them, `DB.store` persists them, sessions reusing all of it share
        them."""
        from alaya_jax.attention import IndexConfig, build_store_jit

        self._check_usable()
        config = IndexConfig() if config is None else config
        cap = capacity or self.length + headroom
        self.index = SessionIndex(config, cap, [(None, None)] * self.db.cfg.n_layers)
        layers = []
        for layer in range(self.db.cfg.n_layers):
            st = self._layer_store(layer)
            built = build_store_jit(st.k, st.v, st.lengths, config, self.db.cfg.n_heads)
            layers.append((built.cluster, built.block))
        self.index = SessionIndex(config, cap, layers)
        return self.index

    def update(self, q, k, v, layer: int, *, token_id=None):
        """Appends the K/V of new tokens to one layer (the paper's `update`).

        k, v [K, D] for one token or [T, K, D]; q (the token's query, [H, D] or [T, H, D]) is
        accepted for indexes that learn from queries and otherwise unused. Call it for every
        layer (any order); the session's length advances when all layers hold the token.
        token_id (int or T ids) records the ids, so the prefix stays reusable; without it the
        tokens count as unknown (-1) and end the reusable prefix. The session's index, if
        built, is updated too."""
        self._check_open()
        db = self.db
        cfg = db.cfg
        k, v = jnp.asarray(k), jnp.asarray(v)
        if k.ndim == 2:
            k, v = k[None], v[None]
        if k.ndim != 3 or k.shape[1:] != (cfg.n_kv_heads, cfg.head_dim) or v.shape != k.shape:
            raise ShapeError(f"k, v must be [K, D] = [{cfg.n_kv_heads}, {cfg.head_dim}] or "
                             f"[T, K, D]; got k {tuple(k.shape)}, v {tuple(v.shape)}")
        if not 0 <= layer < cfg.n_layers:
            raise ShapeError(f"layer {layer} is outside 0..{cfg.n_layers - 1}")
        T = k.shape[0]
        start = int(self._lengths[layer])
        if start + T > cfg.max_seq_len:
            raise ContextLengthError(f"{start} held + {T} new tokens exceed the model's context "
                                     f"of {cfg.max_seq_len}")
        if token_id is not None:
            tid = [int(token_id)] if np.ndim(token_id) == 0 else _as_ids(token_id)
            if len(tid) != T:
                raise ShapeError(f"token_id gives {len(tid)} ids for {T} tokens")
            self._pending_ids = tid
        if isinstance(self.index, SessionIndex) and start + T > self.index.capacity:
            raise SessionError(f"the session's index holds {self.index.capacity} positions, too "
                               f"few for {start + T}: call build_index again with a larger "
                               f"capacity (or set session.index = None)")
        self._ensure_room(start, T)
        ids, slots = pg.token_slots(self._holder.pages, start, T, db.page_size, pg.bucket(T),
                                    db.pool.num_pages)
        pad = ids.shape[0] - T
        kp = jnp.pad(k, ((0, pad), (0, 0), (0, 0)))
        vp = jnp.pad(v, ((0, pad), (0, 0), (0, 0)))
        db.pool = pg.write_layer_tokens(db.pool, jnp.int32(layer), ids, slots, kp, vp)
        self._index_append(layer, k, v)
        before = self.length
        self._lengths[layer] += T
        done = self.length - before
        if done:
            got = self._pending_ids if len(self._pending_ids) == done else [-1] * done
            self._ids += got
            self._pending_ids = []
            self._logits = None
            db._dirty.add(self.id)
