"""The Llama-family model: config, NNX modules, checkpoint loaders, tokenizer."""

from alaya_jax.model.config import LlamaConfig, RopeScaling, llama3_8b_config
from alaya_jax.model.llama import KVCache, Llama, full_decode_attention
from alaya_jax.model.capture import capture_qkv
from alaya_jax.model.load import default_model_path, load_model
from alaya_jax.model.tokenizer import Tokenizer
