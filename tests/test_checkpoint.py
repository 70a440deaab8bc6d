"""Our orbax checkpoints: exact round trip, config stored beside the parameters, no overwrite."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from slimqwen_jax import hf, loading
from slimqwen_jax.checkpoint import load_checkpoint, load_checkpoint_config, save_checkpoint
from slimqwen_jax.config import ConfigError, tiny
from slimqwen_jax.model import Qwen3NextForCausalLM
from slimqwen_jax.testing import forward


def test_round_trip_is_exact(tmp_path):
    config = tiny(tie_word_embeddings=True, num_mtp_layers=2)
    model = Qwen3NextForCausalLM(config, rngs=nnx.Rngs(3))
    save_checkpoint(model, tmp_path / "ckpt")
    restored = load_checkpoint(tmp_path / "ckpt")
    assert restored.config == config
    original = nnx.to_flat_state(nnx.state(model, nnx.Param))
    loaded = nnx.to_flat_state(nnx.state(restored, nnx.Param))
    assert [p for p, _ in original] == [p for p, _ in loaded]
    for (path, a), (_, b) in zip(original, loaded):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))
    ids = jnp.arange(24).reshape(2, 12) % config.vocab_size
    expected, out = forward(model, ids), forward(restored, ids)
    np.testing.assert_array_equal(expected.logits, out.logits)
    np.testing.assert_array_equal(expected.mtp_logits, out.mtp_logits)
    assert out.mtp_logits.shape == (2, 2, 12, config.vocab_size)


def test_runtime_fields_can_be_overridden_on_load(tmp_path):
    save_checkpoint(Qwen3NextForCausalLM(tiny(), rngs=nnx.Rngs(0)), tmp_path / "ckpt")
    restored = load_checkpoint(tmp_path / "ckpt", dtype="bfloat16", param_dtype="bfloat16")
    assert restored.model.embed_tokens.embedding[...].dtype == jnp.bfloat16
    assert load_checkpoint_config(tmp_path / "ckpt").dtype == "float32"


def test_refuses_to_overwrite_and_names_non_checkpoints(tmp_path):
    model = Qwen3NextForCausalLM(tiny(), rngs=nnx.Rngs(0))
    save_checkpoint(model, tmp_path / "ckpt")
    with pytest.raises(FileExistsError):
        save_checkpoint(model, tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match="not a slimqwen_jax checkpoint"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("dtype", ["bfloat16", jnp.bfloat16, np.dtype(jnp.bfloat16)], ids=["name", "jnp", "numpy"])
def test_dtype_objects_are_accepted_everywhere(tmp_path, dtype):
    """Names, jnp scalar types and numpy dtypes alike, in configs and in both loaders."""
    model = Qwen3NextForCausalLM(tiny(), rngs=nnx.Rngs(0))
    save_checkpoint(model, tmp_path / "ckpt")
    hf.save_model(model, tmp_path / "hf")
    assert tiny(dtype=dtype, param_dtype=dtype).to_dict()["dtype"] == "bfloat16"
    for loaded in (
        load_checkpoint(tmp_path / "ckpt", dtype=dtype, param_dtype=dtype),
        hf.load_model(tmp_path / "hf", dtype=dtype),
    ):
        assert loaded.config.dtype == loaded.config.param_dtype == "bfloat16"
        assert loaded.model.embed_tokens.embedding[...].dtype == jnp.bfloat16
    with pytest.raises(ConfigError, match="dtype and param_dtype must be in"):
        tiny(dtype=jnp.float16)


def test_one_loader_for_both_formats_with_clear_errors(tmp_path):
    model = Qwen3NextForCausalLM(tiny(num_mtp_layers=2), rngs=nnx.Rngs(0))
    save_checkpoint(model, tmp_path / "ckpt")
    hf.save_model(model, tmp_path / "hf")
    expected = nnx.to_flat_state(nnx.state(model, nnx.Param))
    for source in ("ckpt", "hf"):
        assert loading.is_hf_directory(tmp_path / source) == (source == "hf")
        assert loading.load_model_config(tmp_path / source).architecture() == model.config.architecture()
        loaded = nnx.to_flat_state(nnx.state(loading.load_model(tmp_path / source), nnx.Param))
        for (path, a), (_, b) in zip(expected, loaded, strict=True):
            np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=f"{source}: {path}")
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    for path, message in [("missing", "teacher .*missing does not exist"), ("file", "is a file, not a model directory"),
                          ("empty", "neither an HF checkpoint directory .* nor a slimqwen_jax checkpoint")]:  # fmt: skip
        with pytest.raises(FileNotFoundError, match=message):
            loading.load_model(tmp_path / path, role="teacher")
