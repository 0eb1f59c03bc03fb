"""alaya_jax: a KV-cache database for long-context LLM inference in JAX.

The supported public surface, in groups.
"""

# Errors
from alaya_jax.errors import AlayaError, ContextLengthError, ModelFileError, ModelNotFoundError
from alaya_jax.errors import ShapeError, UnsupportedModelError

# The model
from alaya_jax.model import KVCache, Llama, LlamaConfig, Tokenizer, default_model_path, load_model

# Generation
from alaya_jax.generate import FullAttention, GenerationResult, Sampling, decode, generate, prefill

__version__ = "0.1.0"
