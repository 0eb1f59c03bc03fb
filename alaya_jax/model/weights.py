"""Checkpoint readers: GGUF (llama.cpp) and Hugging Face safetensors -> stacked weights.

Both produce `(LlamaConfig, dict[name, np.ndarray])` in the layout `Llama` stores: linear
weights [in, out], per-layer tensors stacked along a leading L axis, Q/K rows in the
Hugging Face ("rotate_half") order. `assign_weights` checks every array against the model's
abstract shapes before anything is written.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from alaya_jax.errors import ModelFileError, ShapeError, UnsupportedModelError
from alaya_jax.model.config import LlamaConfig, config_from_gguf, config_from_hf
from alaya_jax.model.llama import LAYER_PARAMS, rope_inv_freq

# Tensor types we load (dequantized by the gguf package); others are refused by name.
SUPPORTED_GGUF_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                        "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

LAYER_NAMES = ("attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w_gate", "w_up", "w_down")


def layer_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Shape of one layer's slice of each stacked weight, in our [in, out] layout."""
    E, F, H, K, D = cfg.dim, cfg.ffn_dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    return {"attn_norm": (E,), "wq": (E, H * D), "wk": (E, K * D), "wv": (E, K * D),
            "wo": (H * D, E), "ffn_norm": (E,), "w_gate": (E, F), "w_up": (E, F), "w_down": (F, E)}


def _stack_layers(cfg: LlamaConfig, per_layer: dict[str, list], sources: dict[str, list[str]],
                  npdt) -> dict[str, np.ndarray]:
    """Stacks per-layer arrays after checking each against the config's shape."""
    expected = layer_shapes(cfg)
    for name, arrs in per_layer.items():
        for arr, src in zip(arrs, sources[name]):
            if arr.shape != expected[name]:
                raise ShapeError(f"tensor {src!r} gives {name!r} the shape {arr.shape} (as [in, out]); "
                                 f"the config expects {expected[name]}")
    return {n: np.stack(v).astype(npdt) for n, v in per_layer.items()}


def _np_dtype(dtype) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if jnp.dtype(dtype) == jnp.bfloat16 else np.dtype(dtype)


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's Q/K row permutation (interleaved pairs -> HF rotate_half halves).

    w [out, in] with out = n_heads * D. llama.cpp's converter applied
    w.reshape(n_heads, 2, D/2, in).swapaxes(1, 2); this is its inverse.
    """
    out, inp = w.shape
    d = out // n_heads
    return w.reshape(n_heads, d // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


# --- GGUF ---------------------------------------------------------------------------------
def _field_value(field) -> Any:
    try:
        return field.contents()
    except Exception:  # gguf versions differ in how they decode odd fields
        return None


def read_gguf(path: str, dtype=np.float32) -> tuple[LlamaConfig, dict[str, np.ndarray], dict[str, Any]]:
    """Reads a llama GGUF: (config, stacked weights in `dtype`, metadata dict)."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except FileNotFoundError:
        raise
    except Exception as e:  # truncated or not a GGUF at all
        raise ModelFileError(f"cannot read GGUF file {path!r}: {type(e).__name__}: {e}") from e
    meta = {k: _field_value(f) for k, f in reader.fields.items()}
    tensors = {t.name: t for t in reader.tensors}
    cfg = config_from_gguf(meta, has_output_weight="output.weight" in tensors)
    npdt = _np_dtype(dtype)

    def get(name: str) -> np.ndarray:
        if name not in tensors:
            raise ModelFileError(f"GGUF file {path!r} lacks tensor {name!r}")
        t = tensors[name]
        if t.tensor_type.name not in SUPPORTED_GGUF_TYPES:
            raise UnsupportedModelError(
                f"tensor {name!r} of {path!r} has type {t.tensor_type.name}; supported: "
                f"{', '.join(SUPPORTED_GGUF_TYPES)}")
        try:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise UnsupportedModelError(
                f"tensor {name!r} of {path!r} uses quantization {t.tensor_type.name}, which the "
                f"gguf package cannot dequantize") from e
        # gguf gives numpy shape reversed from ggml's: [out, in] for matrices.
        return np.asarray(arr, dtype=np.float32).reshape(tuple(int(x) for x in reversed(t.shape)))

    H, K = cfg.n_heads, cfg.n_kv_heads
    gguf_names = {"attn_norm": "attn_norm", "wq": "attn_q", "wk": "attn_k", "wv": "attn_v",
                  "wo": "attn_output", "ffn_norm": "ffn_norm", "w_gate": "ffn_gate",
                  "w_up": "ffn_up", "w_down": "ffn_down"}
    per_layer = {n: [] for n in LAYER_NAMES}
    sources = {n: [] for n in LAYER_NAMES}
    for i in range(cfg.n_layers):
        for ours, theirs in gguf_names.items():
            src = f"blk.{i}.{theirs}.weight"
            arr = get(src)
            if ours in ("wq", "wk"):
                arr = unpermute_rope_rows(arr, H if ours == "wq" else K)
            per_layer[ours].append(arr if arr.ndim == 1 else arr.T)
            sources[ours].append(src)
    weights = _stack_layers(cfg, per_layer, sources, npdt)
    weights["embed"] = get("token_embd.weight").astype(npdt)
    weights["final_norm"] = get("output_norm.weight").astype(npdt)
    if not cfg.tie_embeddings:
        weights["lm_head"] = get("output.weight").T.astype(npdt)
    if "rope_freqs.weight" in tensors:  # llama3-style scaling baked in as frequency factors
        weights["rope_inv_freq"] = (
            1.0 / (cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2) / cfg.head_dim))
            / get("rope_freqs.weight")).astype(np.float32)
    return cfg, weights, meta


# --- Hugging Face safetensors -------------------------------------------------------------
def read_hf(directory: str, dtype=np.float32) -> tuple[LlamaConfig, dict[str, np.ndarray]]:
    """Reads a Llama-family Hugging Face directory (config.json + *.safetensors)."""
    from safetensors.numpy import load_file

    cfg_path = os.path.join(directory, "config.json")
    try:
        with open(cfg_path) as f:
            raw = json.load(f)
    except OSError as e:
        raise ModelFileError(f"cannot read {cfg_path!r}: {e}") from e
    except json.JSONDecodeError as e:
        raise ModelFileError(f"{cfg_path!r} is not valid JSON: {e}") from e
    cfg = config_from_hf(raw)
    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
        raise ModelFileError(f"no *.safetensors files in {directory!r}")
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        try:
            loaded = load_file(os.path.join(directory, f))
        except Exception as e:
            raise ModelFileError(f"cannot read {os.path.join(directory, f)!r}: {e}") from e
        tensors.update(loaded)
    npdt = _np_dtype(dtype)

    def get(name):
        if name not in tensors:
            raise ModelFileError(f"safetensors in {directory!r} lack tensor {name!r}")
        return np.asarray(tensors[name], dtype=np.float32)

    hf = {"attn_norm": "input_layernorm.weight", "wq": "self_attn.q_proj.weight",
          "wk": "self_attn.k_proj.weight", "wv": "self_attn.v_proj.weight",
          "wo": "self_attn.o_proj.weight", "ffn_norm": "post_attention_layernorm.weight",
          "w_gate": "mlp.gate_proj.weight", "w_up": "mlp.up_proj.weight",
          "w_down": "mlp.down_proj.weight"}
    per_layer, sources = {}, {}
    for ours, theirs in hf.items():
        sources[ours] = [f"model.layers.{i}.{theirs}" for i in range(cfg.n_layers)]
        per_layer[ours] = [a if a.ndim == 1 else a.T for a in map(get, sources[ours])]
    weights = _stack_layers(cfg, per_layer, sources, npdt)
    weights["embed"] = get("model.embed_tokens.weight").astype(npdt)
    weights["final_norm"] = get("model.norm.weight").astype(npdt)
    if not cfg.tie_embeddings:
        weights["lm_head"] = get("lm_head.weight").T.astype(npdt)
    return cfg, weights


FUSED = {"wqkv": ("wq", "wk", "wv"), "w_gate_up": ("w_gate", "w_up")}


def fuse_layer_weights(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The checkpoint's separate projections joined along the output axis as the model
    holds them: wq|wk|wv -> wqkv, w_gate|w_up -> w_gate_up (other entries unchanged)."""
    out = {n: a for n, a in weights.items() if not any(n in parts for parts in FUSED.values())}
    for name, parts in FUSED.items():
        out[name] = np.concatenate([weights[p] for p in parts], axis=-1)
    return out


def assign_weights(model, weights: dict[str, np.ndarray]) -> None:
    """Writes loaded arrays into an (abstract or concrete) `Llama`, checking every shape.

    Per-layer weights arrive stacked [L, ...] under the checkpoint's names (`layer_shapes`)
    and are fused as the model holds them (`fuse_layer_weights`); a model with
    `stacked=False` gets a tuple of L device arrays instead (one per layer)."""
    cfg = model.cfg
    per_layer = layer_shapes(cfg)
    expected = {n: (cfg.n_layers,) + shape for n, shape in per_layer.items()}
    expected["embed"] = (cfg.vocab_size, cfg.dim)
    expected["final_norm"] = (cfg.dim,)
    if model.lm_head is not None:
        expected["lm_head"] = (cfg.dim, cfg.vocab_size)
    missing = set(expected) - set(weights)
    if missing:
        raise ModelFileError(f"checkpoint lacks weights {sorted(missing)}")
    dtype = model.embed.get_value().dtype
    for name, shape in expected.items():
        arr = weights[name]
        if tuple(arr.shape) != shape:
            raise ShapeError(f"weight {name!r} has shape {tuple(arr.shape)}, the config expects {shape}")
    model_weights = fuse_layer_weights({n: weights[n] for n in expected})
    for name, arr in model_weights.items():
        var = getattr(model, name)
        if name in LAYER_PARAMS and not model.stacked:
            var.set_value(tuple(jnp.asarray(arr[i], dtype=dtype) for i in range(cfg.n_layers)))
        else:
            var.set_value(jnp.asarray(arr, dtype=dtype))
    if "rope_inv_freq" in weights:
        model.rope_inv_freq.set_value(jnp.asarray(weights["rope_inv_freq"]))
    else:  # an abstract model (nnx.eval_shape) holds only the shape: compute the values
        model.rope_inv_freq.set_value(jnp.asarray(rope_inv_freq(model.cfg)))
