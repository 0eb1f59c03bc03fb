"""alaya_jax: a KV-cache database for long-context LLM inference in JAX.

The supported public surface, in groups.
"""

# Errors
from alaya_jax.errors import AlayaError, ContextLengthError, ModelFileError, ModelNotFoundError
from alaya_jax.errors import ShapeError, UnsupportedModelError

# The model
from alaya_jax.model import KVCache, Llama, LlamaConfig, Tokenizer, default_model_path, load_model

# Decode attention methods (DIPR and the baselines it is measured against)
from alaya_jax.methods import DIPR, Full, Quest, SparseMethod, Streaming, TopK
from alaya_jax.attention import IndexConfig, KVStore, Plan, build_store, sparse_attention
from alaya_jax.dipr import dipr_reference

# The database
from alaya_jax.db import DB, Session, SessionIndex
from alaya_jax.errors import CheckpointError, CheckpointFormatError, ModelMismatchError
from alaya_jax.errors import PoolFullError, SessionError, SessionNotFoundError

# Generation
from alaya_jax.generate import FullAttention, GenerationResult, Sampling, decode, generate, prefill

__version__ = "0.1.0"
