"""Mosaic GPU (Pallas) kernels for the DIPR query, one per module beside its jnp reference.

    score_select        group scoring of block centroids + DIPR selection (kept lists)
    gathered_attention  sparse decode attention over the kept blocks, GQA, split-K, remainder

Import the functions from their modules (`from alaya_jax.pallas.gathered_attention import
gathered_attention`); the package exposes the modules, so the names do not shadow them.
Every public entry takes `impl="pallas" | "xla" | None` (None: Mosaic GPU on a GPU, the
reference elsewhere); "pallas" off the GPU raises NotImplementedError unless
`interpret=True` (jax's Mosaic GPU interpreter on the CPU, for tests).
"""
from alaya_jax.pallas import gathered_attention, score_select
from alaya_jax.pallas._mgpu import EMPTY_LSE, MASK_VALUE

__all__ = ["gathered_attention", "score_select", "EMPTY_LSE", "MASK_VALUE"]
