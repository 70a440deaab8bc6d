"""Our orbax checkpoints: exact round trip, config stored beside the parameters, no overwrite."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from slimqwen_jax.checkpoint import load_checkpoint, load_checkpoint_config, save_checkpoint
from slimqwen_jax.config import tiny
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
