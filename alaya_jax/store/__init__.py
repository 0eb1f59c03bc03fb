"""The vector storage engine: paged KV blocks, prefix sharing, and atomic Orbax persistence.

    pages.py    PagePool [L, N, P, K, D], SessionState (page table + lengths), the pure jitted
                gather / write / copy-on-write functions, and the host-side PageAllocator
    radix.py    RadixTree over token ids: the longest held prefix of a prompt
    persist.py  manifests, model fingerprints, atomic writes and checked reads (only this
                module imports Orbax)

`alaya_jax.db` builds the public DB and Session on top of these.
"""

from alaya_jax.store.pages import (PageAllocator, PagePool, SessionState, copy_pages, gather_cache,
                                   gather_layer, gather_pages, paged_attention, write_layer_tokens,
                                   write_pages, write_tokens, write_tokens_from_cache)
from alaya_jax.store.persist import FORMAT_VERSION, collect_garbage, model_fingerprint
from alaya_jax.store.radix import RadixTree
