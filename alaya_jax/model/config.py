"""Llama-family model configuration: a frozen dataclass, static under jit.

Converters build it from a GGUF file's metadata or a Hugging Face `config.json`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from alaya_jax.errors import UnsupportedModelError


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. kind: "linear" (positions divided by factor) or "llama3"."""

    kind: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def __post_init__(self):
        if self.kind not in ("linear", "llama3"):
            raise UnsupportedModelError(
                f"rope scaling type {self.kind!r} is not supported (expected 'linear' or 'llama3')")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    dim: int  # E, the residual width
    n_layers: int  # L
    n_heads: int  # H
    n_kv_heads: int  # K
    head_dim: int  # D
    ffn_dim: int  # F
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 8192
    tie_embeddings: bool = True
    bos_id: int | None = None
    eos_ids: tuple[int, ...] = ()
    name: str = "llama"

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise UnsupportedModelError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")

    @property
    def group(self) -> int:  # G = H / K
        return self.n_heads // self.n_kv_heads

    def param_count(self) -> int:
        E, F, V = self.dim, self.ffn_dim, self.vocab_size
        H, K, D = self.n_heads, self.n_kv_heads, self.head_dim
        per_layer = E * H * D + 2 * E * K * D + H * D * E + 3 * E * F + 2 * E
        head = 0 if self.tie_embeddings else V * E
        return V * E + self.n_layers * per_layer + E + head

    def kv_bytes_per_token(self, dtype=np.float32) -> int:
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * np.dtype(dtype).itemsize


def llama3_8b_config(**overrides) -> LlamaConfig:
    """Layer shapes of Llama-3-8B (the GPU performance target)."""
    cfg = LlamaConfig(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                      head_dim=128, ffn_dim=14336, norm_eps=1e-5, rope_theta=500000.0,
                      rope_scaling=RopeScaling(), max_seq_len=131072, tie_embeddings=False,
                      name="llama3-8b-shaped")
    return dataclasses.replace(cfg, **overrides)


def _get(meta: Mapping[str, Any], key: str, default=None, *, required=False):
    if key in meta:
        return meta[key]
    if required:
        raise UnsupportedModelError(f"GGUF metadata lacks {key!r}, which a llama model needs")
    return default


def config_from_gguf(meta: Mapping[str, Any], *, has_output_weight: bool) -> LlamaConfig:
    """Builds the config from GGUF key/value metadata (already decoded to Python values)."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise UnsupportedModelError(
            f"GGUF architecture {arch!r} is not supported (expected 'llama')")
    p = "llama."
    dim = int(_get(meta, p + "embedding_length", required=True))
    n_heads = int(_get(meta, p + "attention.head_count", required=True))
    n_kv = int(_get(meta, p + "attention.head_count_kv", n_heads))
    head_dim = int(_get(meta, p + "attention.key_length", dim // n_heads))
    rope_dim = int(_get(meta, p + "rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise UnsupportedModelError(
            f"partial rotary embeddings (rope dim {rope_dim} < head dim {head_dim}) are not supported")
    scaling = None
    stype = _get(meta, p + "rope.scaling.type")
    if stype in ("linear",):
        scaling = RopeScaling(kind="linear", factor=float(_get(meta, p + "rope.scaling.factor", 1.0)))
    elif stype not in (None, "none"):
        raise UnsupportedModelError(f"GGUF rope scaling type {stype!r} is not supported")
    eos = _get(meta, "tokenizer.ggml.eos_token_id")
    eot = _get(meta, "tokenizer.ggml.eot_token_id")
    eos_ids = tuple(sorted({int(i) for i in (eos, eot) if i is not None}))
    bos = _get(meta, "tokenizer.ggml.bos_token_id")
    vocab = _get(meta, p + "vocab_size")
    if vocab is None:
        vocab = len(_get(meta, "tokenizer.ggml.tokens", required=True))
    return LlamaConfig(
        vocab_size=int(vocab), dim=dim, n_layers=int(_get(meta, p + "block_count", required=True)),
        n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim,
        ffn_dim=int(_get(meta, p + "feed_forward_length", required=True)),
        norm_eps=float(_get(meta, p + "attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(_get(meta, p + "rope.freq_base", 10000.0)), rope_scaling=scaling,
        max_seq_len=int(_get(meta, p + "context_length", 2048)),
        tie_embeddings=not has_output_weight, bos_id=None if bos is None else int(bos),
        eos_ids=eos_ids, name=str(_get(meta, "general.name", "llama")))


def config_from_hf(cfg: Mapping[str, Any]) -> LlamaConfig:
    """Builds the config from a Hugging Face `config.json` of the Llama family."""
    mtype = cfg.get("model_type")
    if mtype not in ("llama", "mistral") and "LlamaForCausalLM" not in cfg.get("architectures", []):
        raise UnsupportedModelError(f"Hugging Face model_type {mtype!r} is not supported (expected 'llama')")
    n_heads = int(cfg["num_attention_heads"])
    dim = int(cfg["hidden_size"])
    rs = cfg.get("rope_scaling")
    scaling = None
    if rs:
        kind = rs.get("rope_type", rs.get("type"))
        if kind == "linear":
            scaling = RopeScaling(kind="linear", factor=float(rs["factor"]))
        elif kind == "llama3":
            scaling = RopeScaling(kind="llama3", factor=float(rs["factor"]),
                                  low_freq_factor=float(rs["low_freq_factor"]),
                                  high_freq_factor=float(rs["high_freq_factor"]),
                                  original_max_position=int(rs["original_max_position_embeddings"]))
        elif kind not in ("default", None):
            raise UnsupportedModelError(f"rope_scaling type {kind!r} is not supported")
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    return LlamaConfig(
        vocab_size=int(cfg["vocab_size"]), dim=dim, n_layers=int(cfg["num_hidden_layers"]),
        n_heads=n_heads, n_kv_heads=int(cfg.get("num_key_value_heads", n_heads)),
        head_dim=int(cfg.get("head_dim") or dim // n_heads),
        ffn_dim=int(cfg["intermediate_size"]), norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        rope_theta=float(cfg.get("rope_theta", 10000.0)), rope_scaling=scaling,
        max_seq_len=int(cfg.get("max_position_embeddings", 2048)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        bos_id=cfg.get("bos_token_id"), eos_ids=eos_ids, name=str(cfg.get("_name_or_path", "llama")))
