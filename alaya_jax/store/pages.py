"""Paged KV: a pool of fixed-size pages shared by every layer, and the pure functions over it.

The pool holds N pages of P token slots for all L layers at once ([L, N, P, K, D]), so one
page id names the same tokens in every layer and a session needs one page table, not L.
Sessions that share a prefix share its pages; a page is written only by a session that holds
the sole reference to it (the host-side `PageAllocator` counts references), which is what
makes sharing copy-on-write. Every array function here is pure and jitted; those that write
donate the pool, so a write costs the bytes written, not a copy of the pool.

Axis letters: L layers, N pages, P page size, K kv heads, D head dim, T tokens, S positions.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from alaya_jax.errors import PoolFullError


@flax.struct.dataclass
class PagePool:
    """Keys (post-RoPE) and values of every page, all layers."""

    k: jax.Array  # [L, N, P, K, D]
    v: jax.Array  # [L, N, P, K, D]

    @staticmethod
    def abstract(n_layers: int, num_pages: int, page_size: int, n_kv_heads: int, head_dim: int,
                 dtype) -> "PagePool":
        shape = (n_layers, num_pages, page_size, n_kv_heads, head_dim)
        sds = jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))
        return PagePool(k=sds, v=sds)

    @staticmethod
    def zeros(*args, **kw) -> "PagePool":
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), PagePool.abstract(*args, **kw))

    @property
    def num_pages(self) -> int:
        return self.k.shape[1]

    @property
    def page_size(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes_per_page(self) -> int:
        return 2 * self.k[:, 0].size * self.k.dtype.itemsize


@flax.struct.dataclass
class SessionState:
    """What a jitted step needs to know about one session: its pages and its lengths."""

    page_table: jax.Array  # [n] int32 page ids, position s lives in page_table[s // P]
    lengths: jax.Array  # [L] int32 tokens held per layer (equal except inside an update)


# ----------------------------------------------------------------------------- pure functions


@jax.jit
def gather_pages(pool: PagePool, page_table):
    """page_table [n] -> (k, v) [L, n*P, K, D]: the session's positions, contiguous."""
    L, _, P, K, D = pool.k.shape
    n = page_table.shape[0]
    return (pool.k[:, page_table].reshape(L, n * P, K, D),
            pool.v[:, page_table].reshape(L, n * P, K, D))


@functools.partial(jax.jit, static_argnames=("stacked",))
def gather_cache(pool: PagePool, page_table, *, stacked: bool = True):
    """page_table [n] -> (k, v) [L, 1, n*P, K, D]: a dense batch-1 cache of the session.

    stacked=False gives tuples of L arrays [1, n*P, K, D] (the GPU layout of `KVCache`)."""
    L, _, P, K, D = pool.k.shape
    n = page_table.shape[0]
    k = pool.k[:, page_table].reshape(L, 1, n * P, K, D)
    v = pool.v[:, page_table].reshape(L, 1, n * P, K, D)
    if stacked:
        return k, v
    return tuple(k[i] for i in range(L)), tuple(v[i] for i in range(L))


@jax.jit
def gather_layer(pool: PagePool, layer, page_table):
    """layer () int, page_table [n] -> (k, v) [n*P, K, D] of that layer."""
    _, _, P, K, D = pool.k.shape
    n = page_table.shape[0]
    k = jax.lax.dynamic_index_in_dim(pool.k, layer, axis=0, keepdims=False)
    v = jax.lax.dynamic_index_in_dim(pool.v, layer, axis=0, keepdims=False)
    return k[page_table].reshape(n * P, K, D), v[page_table].reshape(n * P, K, D)


def _set_tokens(pool: PagePool, page_ids, slots, k, v) -> PagePool:
    return PagePool(k=pool.k.at[:, page_ids, slots].set(k.astype(pool.k.dtype), mode="drop"),
                    v=pool.v.at[:, page_ids, slots].set(v.astype(pool.v.dtype), mode="drop"))


@functools.partial(jax.jit, donate_argnums=(0,))
def write_tokens(pool: PagePool, page_ids, slots, k, v) -> PagePool:
    """Writes T tokens of every layer: page_ids, slots [T] int32, k, v [L, T, K, D].

    A page id >= N marks padding (dropped), so callers can pad T to a few static sizes."""
    return _set_tokens(pool, page_ids, slots, k, v)


@functools.partial(jax.jit, donate_argnums=(0,))
def write_tokens_from_cache(pool: PagePool, cache_k, cache_v, start, page_ids, slots) -> PagePool:
    """Copies positions start..start+T-1 of row 0 of a dense cache into pages.

    cache_k, cache_v [L, B, S, K, D] or tuples of L [B, S, K, D]; start () int32; page_ids,
    slots [T] (id >= N: padding)."""
    if isinstance(cache_k, (tuple, list)):
        cache_k, cache_v = jnp.stack(cache_k), jnp.stack(cache_v)
    S = cache_k.shape[2]
    pos = jnp.clip(start + jnp.arange(page_ids.shape[0]), 0, S - 1)
    return _set_tokens(pool, page_ids, slots, cache_k[:, 0, pos], cache_v[:, 0, pos])


@functools.partial(jax.jit, donate_argnums=(0,))
def write_layer_tokens(pool: PagePool, layer, page_ids, slots, k, v) -> PagePool:
    """Writes T tokens of one layer: layer () int, page_ids, slots [T], k, v [T, K, D]."""
    return PagePool(k=pool.k.at[layer, page_ids, slots].set(k.astype(pool.k.dtype), mode="drop"),
                    v=pool.v.at[layer, page_ids, slots].set(v.astype(pool.v.dtype), mode="drop"))


@functools.partial(jax.jit, donate_argnums=(0,))
def write_pages(pool: PagePool, page_ids, k, v) -> PagePool:
    """Writes whole pages: page_ids [n], k, v [L, n, P, K, D]."""
    return PagePool(k=pool.k.at[:, page_ids].set(k.astype(pool.k.dtype), mode="drop"),
                    v=pool.v.at[:, page_ids].set(v.astype(pool.v.dtype), mode="drop"))


@functools.partial(jax.jit, donate_argnums=(0,))
def copy_pages(pool: PagePool, src, dst) -> PagePool:
    """Copies pages src [n] onto pages dst [n] (copy-on-write of a shared page)."""
    return PagePool(k=pool.k.at[:, dst].set(pool.k[:, src]),
                    v=pool.v.at[:, dst].set(pool.v[:, src]))


@functools.partial(jax.jit, static_argnums=(1,))
def grow(pool: PagePool, num_pages: int) -> PagePool:
    """A pool of num_pages pages holding the old pages first."""
    pad = lambda x: jnp.concatenate(
        [x, jnp.zeros((x.shape[0], num_pages - x.shape[1]) + x.shape[2:], x.dtype)], axis=1)
    return PagePool(k=pad(pool.k), v=pad(pool.v))


def bucket(n: int, step: int = 64) -> int:
    """Pads a token or page count to a few static sizes (fewer retraces)."""
    if n <= step:
        return max(8, 1 << (max(n, 1) - 1).bit_length())
    return -(-n // step) * step


def token_slots(page_table, start: int, count: int, page_size: int, pad_to: int, pad_id: int):
    """(page_ids, slots) [pad_to] int32 of positions start..start+count-1; padding -> pad_id."""
    pos = start + np.arange(pad_to)
    table = np.asarray(page_table, np.int64)
    ids = np.full(pad_to, pad_id, np.int32)
    ids[:count] = table[pos[:count] // page_size]
    return jnp.asarray(ids), jnp.asarray((pos % page_size).astype(np.int32))


# ----------------------------------------------------------------------------- host allocator


class PageAllocator:
    """Reference counts and a free list of the pool's pages (host side, not traced).

    A page with one reference may be written in place; with more it is shared and read-only.
    """

    def __init__(self, num_pages: int, max_pages: int | None):
        self.refcount = np.zeros(num_pages, np.int32)
        self.max_pages = max_pages
        self._free = list(range(num_pages - 1, -1, -1))  # pop() gives the lowest id

    @property
    def num_pages(self) -> int:
        return len(self.refcount)

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def used_pages(self) -> int:
        return self.num_pages - len(self._free)

    def grow_to(self, n: int) -> int:
        """How many pages the pool must hold to hand out n more (raises PoolFullError)."""
        need = self.used_pages + n
        if need <= self.num_pages:
            return self.num_pages
        target = max(need, 2 * self.num_pages)
        if self.max_pages is not None:
            if need > self.max_pages:
                raise PoolFullError(
                    f"the page pool is full: {n} more pages needed, {self.free_pages} free of "
                    f"max_pages={self.max_pages} ({self.used_pages} in use); close or delete "
                    f"sessions, or open the DB with a larger max_pages")
            target = min(target, self.max_pages)
        return target

    def extend(self, num_pages: int):
        old = self.num_pages
        self.refcount = np.concatenate([self.refcount, np.zeros(num_pages - old, np.int32)])
        self._free = list(range(num_pages - 1, old - 1, -1)) + self._free

    def alloc(self, n: int) -> list[int]:
        if n > len(self._free):
            raise PoolFullError(f"{n} pages requested, {len(self._free)} free")
        ids = [self._free.pop() for _ in range(n)]
        self.refcount[ids] = 1
        return ids

    def incref(self, ids):
        np.add.at(self.refcount, np.asarray(ids, np.int64), 1)

    def decref(self, ids):
        ids = np.asarray(ids, np.int64)
        np.add.at(self.refcount, ids, -1)
        if np.any(self.refcount[ids] < 0):
            raise AssertionError("page refcount below zero: a page was released twice")
        freed = np.unique(ids[self.refcount[ids] == 0])
        self._free.extend(int(i) for i in freed[::-1])


@jax.jit
def paged_attention(pool: PagePool, state: SessionState, q, layer):
    """Dense decode attention of one session over its pages (the default `Session.attention`).

    q [B, H, D] (every row reads the same session), layer () int -> o [B, H, D] in q's dtype."""
    from alaya_jax.model.llama import full_decode_attention

    k, v = gather_layer(pool, layer, state.page_table)
    B = q.shape[0]
    kv_len = jnp.broadcast_to(jax.lax.dynamic_index_in_dim(state.lengths, layer, keepdims=False),
                              (B,))
    return full_decode_attention(q, jnp.broadcast_to(k, (B,) + k.shape),
                                 jnp.broadcast_to(v, (B,) + v.shape), kv_len)
