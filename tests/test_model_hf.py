"""Whole-model parity with `transformers.Qwen3NextForCausalLM`, HF import/export and MTP."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_reference import HF_CONFIGS, add_mtp_tensors, affine_sequences, make_hf_model, train_hf_model
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from transformers import Qwen3NextForCausalLM as HFModel
from transformers.models.qwen3_next.modeling_qwen3_next import (
    Qwen3NextDecoderLayer,
    Qwen3NextRMSNorm,
    load_balancing_loss_func,
)

from slimqwen_jax import hf
from slimqwen_jax.config import ConfigError
from slimqwen_jax.hf import CheckpointMismatchError
from slimqwen_jax.testing import forward, max_relative_error


def token_ids(batch: int, length: int, vocab: int = 97, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (batch, length))


def hf_logits(model: HFModel, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


@pytest.fixture(scope="module", params=sorted(HF_CONFIGS))
def hf_checkpoint(request, tmp_path_factory):
    """(config name, HF model, its save_pretrained directory)."""
    model = make_hf_model(request.param)
    directory = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(directory)
    return request.param, model, directory


@pytest.mark.parametrize("length", [40, 100])
def test_float32_logits_match_transformers(hf_checkpoint, length):
    name, hf_model, directory = hf_checkpoint
    model = hf.load_model(directory)
    ids = token_ids(2, length)
    error = max_relative_error(forward(model, jnp.asarray(ids)).logits, hf_logits(hf_model, ids))
    print(f"{name} T={length}: float32 max relative logit error {error:.2e}")
    assert error <= 1e-4


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_bfloat16_logits_agree_with_transformers_bfloat16(name, tmp_path):
    hf_bf16 = train_hf_model(make_hf_model(name)).to(torch.bfloat16)
    hf_bf16.save_pretrained(tmp_path)
    model = hf.load_model(tmp_path, dtype="bfloat16")
    ids = affine_sequences(np.random.default_rng(1), 4, 100, hf_bf16.config.vocab_size)
    ours = np.asarray(forward(model, jnp.asarray(ids)).logits, np.float32)
    theirs = hf_logits(hf_bf16, ids)
    top1 = np.mean(ours.argmax(-1) == theirs.argmax(-1))
    log_p = jax.nn.log_softmax(theirs.astype(np.float64), -1)
    log_q = jax.nn.log_softmax(ours.astype(np.float64), -1)
    kl = float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), -1)))
    print(f"{name}: bfloat16 top-1 agreement {top1:.4f}, mean KL {kl:.2e}")
    assert top1 >= 0.99
    assert kl <= 1e-3


def test_aux_loss_matches_hf_load_balancing_loss(hf_checkpoint):
    name, hf_model, directory = hf_checkpoint
    model = hf.load_model(directory)
    ids = token_ids(2, 40, seed=2)
    out = forward(model, jnp.asarray(ids))
    with torch.no_grad():
        hf_out = hf_model(torch.tensor(ids), output_router_logits=True)
    expected = load_balancing_loss_func(
        hf_out.router_logits, hf_model.config.num_experts, hf_model.config.num_experts_per_tok
    )
    assert len(out.router_logits) == len(hf_out.router_logits)
    np.testing.assert_allclose(float(out.aux_loss), float(expected), rtol=1e-5)


def test_round_trip_through_our_export(hf_checkpoint, tmp_path):
    """HF dir -> load_model -> save_model -> transformers loads it -> same logits; every tensor bit-exact.

    The tensors are compared bitwise (same bytes in, same bytes out). The logits only to float32
    rounding: two torch models with equal weights in different memory layouts may sum in another
    order, and do on some CPUs (up to ~1e-6 of the logits' scale seen)."""
    name, hf_model, directory = hf_checkpoint
    source = tmp_path / "source"
    hf_model.save_pretrained(source)
    mtp = add_mtp_tensors(source)
    model = hf.load_model(source)
    assert model.config.num_mtp_layers == 1
    exported = hf.save_model(model, tmp_path / "exported")
    reloaded = HFModel.from_pretrained(exported, attn_implementation="eager").eval()
    ids = token_ids(2, 70, seed=3)
    assert max_relative_error(hf_logits(reloaded, ids), hf_logits(hf_model, ids)) <= 1e-5
    exported_tensors = load_file(exported / "model.safetensors")
    source_tensors = load_file(source / "model.safetensors")
    assert set(exported_tensors) == set(source_tensors)
    for key, value in source_tensors.items():
        np.testing.assert_array_equal(exported_tensors[key], value, err_msg=key)
    assert set(mtp) <= set(exported_tensors)


def test_sharded_export_and_import(tmp_path):
    hf_model = make_hf_model("gqa2_ratio2")
    hf_model.save_pretrained(tmp_path / "source")
    add_mtp_tensors(tmp_path / "source")
    model = hf.load_model(tmp_path / "source")
    exported = hf.save_model(model, tmp_path / "sharded", max_shard_bytes=64 * 1024)
    index = json.loads((exported / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (exported / "model.safetensors").exists()
    reloaded = hf.load_model(exported)
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(reloaded))):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))
    transformers_model = HFModel.from_pretrained(exported, attn_implementation="eager").eval()
    reloaded_weights, original_weights = transformers_model.state_dict(), hf_model.state_dict()
    assert reloaded_weights.keys() == original_weights.keys()
    for name, weight in original_weights.items():
        np.testing.assert_array_equal(reloaded_weights[name].numpy(), weight.numpy(), err_msg=name)
    ids = token_ids(1, 30, seed=4)
    # Equal weights, other memory layouts: float32 rounding only (see test_round_trip_through_our_export).
    assert max_relative_error(hf_logits(transformers_model, ids), hf_logits(hf_model, ids)) <= 1e-5


def test_mtp_matches_formula_built_from_hf_modules(tmp_path):
    """mtp_logits[0] equals lm_head(norm(layer(fc([norm_e(emb(t+1)) | norm_h(h)])))) built from HF parts."""
    hf_model = make_hf_model("gqa2_ratio2")
    hf_model.save_pretrained(tmp_path)
    mtp = add_mtp_tensors(tmp_path)
    model = hf.load_model(tmp_path)
    ids = token_ids(2, 70, seed=5)
    out = forward(model, jnp.asarray(ids))

    config = hf_model.config
    eps = config.rms_norm_eps
    full_layer = next(i for i, t in enumerate(config.layer_types) if t == "full_attention")
    layer = Qwen3NextDecoderLayer(config, layer_idx=full_layer).eval()
    layer.load_state_dict(hf_fused_layer_state(mtp, "mtp.layers.0.", config.num_experts))

    def norm(name):
        module = Qwen3NextRMSNorm(config.hidden_size, eps=eps)
        module.weight.data = torch.tensor(mtp[f"mtp.{name}.weight"])
        return module

    ids_t = torch.tensor(ids)
    next_ids = torch.cat([ids_t[:, 1:], torch.zeros_like(ids_t[:, :1])], dim=1)
    with torch.no_grad():
        hidden = hf_model.model(ids_t).last_hidden_state  # after model.norm
        fused = torch.cat(
            [norm("pre_fc_norm_embedding")(hf_model.model.embed_tokens(next_ids)), norm("pre_fc_norm_hidden")(hidden)],
            -1,
        )
        z = fused @ torch.tensor(mtp["mtp.fc.weight"]).T
        positions = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
        rope = hf_model.model.rotary_emb(z, positions)
        causal = torch.full((ids.shape[1],) * 2, torch.finfo(torch.float32).min).triu(1)[None, None]
        z = layer(z, position_embeddings=rope, attention_mask=causal)
        expected = hf_model.lm_head(norm("norm")(z)).numpy()
    error = max_relative_error(out.mtp_logits[0], expected)
    print(f"MTP max relative logit error {error:.2e}")
    assert out.mtp_logits.shape == (1, 2, 70, config.vocab_size)
    assert error <= 1e-4
    np.testing.assert_allclose(out.hidden_states, hidden.numpy(), rtol=0, atol=1e-4 * float(np.abs(hidden).max()))


def hf_fused_layer_state(tensors, prefix, num_experts):
    """A decoder layer's state dict from on-disk tensors, experts fused the way HF v5 holds them."""
    state = {
        k[len(prefix) :]: torch.tensor(v) for k, v in tensors.items() if k.startswith(prefix) and ".experts." not in k
    }
    expert = lambda e, proj: torch.tensor(tensors[f"{prefix}mlp.experts.{e}.{proj}.weight"])  # noqa: E731
    state["mlp.experts.gate_up_proj"] = torch.stack(
        [torch.cat([expert(e, "gate_proj"), expert(e, "up_proj")]) for e in range(num_experts)]
    )
    state["mlp.experts.down_proj"] = torch.stack([expert(e, "down_proj") for e in range(num_experts)])
    return state


# ---------------------------------------------------------------------------- bad input
def _tamper(directory, edit):
    path = directory / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_mismatched_checkpoint_lists_every_problem(tmp_path):
    make_hf_model("gqa2_ratio2").save_pretrained(tmp_path)

    def edit(tensors):
        del tensors["model.layers.0.linear_attn.A_log"]
        del tensors["model.layers.3.mlp.experts.1.up_proj.weight"]
        tensors["model.layers.3.self_attn.k_proj.weight"] = np.zeros((5, 32), np.float32)
        tensors["model.layers.9.bogus.weight"] = np.zeros(3, np.float32)

    _tamper(tmp_path, edit)
    with pytest.raises(CheckpointMismatchError) as info:
        hf.load_model(tmp_path)
    message = str(info.value)
    for expected in (
        "model.layers.0.linear_attn.A_log",
        "model.layers.3.mlp.experts.1.up_proj.weight",
        "model.layers.3.self_attn.k_proj.weight: checkpoint (5, 32)",
        "model.layers.9.bogus.weight",
    ):
        assert expected in message
    assert "unfilled (2)" in message and "unused (1)" in message


def test_unknown_model_type_and_bad_heads_are_rejected(tmp_path):
    make_hf_model("gqa2_ratio2").save_pretrained(tmp_path)
    config_path = tmp_path / "config.json"
    original = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**original, "model_type": "llama"}))
    with pytest.raises(ConfigError, match="model_type 'llama'"):
        hf.load_model(tmp_path)
    config_path.write_text(json.dumps({**original, "num_key_value_heads": 3}))
    with pytest.raises(ConfigError, match="multiple of num_key_value_heads"):
        hf.load_model(tmp_path)


def test_missing_files_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf.load_model(tmp_path)
    make_hf_model("gqa2_ratio2").save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        hf.load_model(tmp_path)


def test_save_refuses_to_overwrite_and_leaves_no_partial_output(tmp_path):
    make_hf_model("gqa2_ratio2").save_pretrained(tmp_path / "source")
    model = hf.load_model(tmp_path / "source")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "results.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        hf.save_model(model, tmp_path / "taken")
    assert (tmp_path / "taken" / "results.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source", "taken"]


def test_loads_bfloat16_safetensors(tmp_path):
    make_hf_model("gqa3_ratio3").to(torch.bfloat16).save_pretrained(tmp_path)
    model = hf.load_model(tmp_path, dtype="bfloat16")
    with safe_open(tmp_path / "model.safetensors", framework="np") as f:
        expected = f.get_tensor("model.embed_tokens.weight")
    assert model.model.embed_tokens.embedding[...].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(model.model.embed_tokens.embedding[...]), expected)
