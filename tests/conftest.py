"""Shared fixtures: the real default model is loaded once per test session."""

import os

import jax
import pytest

# Tests compare against f32 references: keep matmuls in full precision on every backend.
jax.config.update("jax_default_matmul_precision", "highest")
# CPU computations run inline, not dispatched asynchronously: the Mosaic GPU interpreter runs
# jax ops inside its callbacks, and with async dispatch on 2 cores a test now and then hung
# with every thread of a worker waiting on a futex (seen twice, not reproduced on demand).
jax.config.update("jax_cpu_enable_async_dispatch", False)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the default SmolLM2-135M-Instruct GGUF, in f32."""
    import alaya_jax as aj

    return aj.load_model(dtype="float32")


def pytest_collection_modifyitems(config, items):
    on_gpu = jax.default_backend() == "gpu"
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU: runs natively there, skipped on CPU")
    for item in items:
        if "gpu" in item.keywords and not on_gpu:
            item.add_marker(skip)
