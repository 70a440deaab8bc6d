"""Model config: HF config.json conversion, presets and validation."""

import dataclasses

import pytest
from hf_reference import HF_CONFIGS
from transformers import Qwen3NextConfig as HFConfig

from slimqwen_jax.config import MODEL_PRESETS, ConfigError, Qwen3NextConfig, preset, tiny


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_reads_transformers_config_json(name):
    hf_config = HFConfig(**HF_CONFIGS[name])
    ours = Qwen3NextConfig.from_hf_dict(hf_config.to_dict())
    for field in ("vocab_size", "hidden_size", "head_dim", "num_experts", "decoder_sparse_step", "norm_topk_prob",
                  "linear_conv_kernel_dim", "tie_word_embeddings", "rms_norm_eps"):  # fmt: skip
        assert getattr(ours, field) == getattr(hf_config, field), field
    assert ours.layer_types == tuple(hf_config.layer_types)
    assert ours.mlp_only_layers == tuple(hf_config.mlp_only_layers)
    assert ours.rope_theta == hf_config.rope_parameters["rope_theta"]
    assert ours.partial_rotary_factor == hf_config.rope_parameters["partial_rotary_factor"]


@pytest.mark.parametrize("name", sorted(MODEL_PRESETS))
def test_hf_dict_round_trip_through_transformers(name):
    ours = preset(name)
    reread = Qwen3NextConfig.from_hf_dict(HFConfig(**ours.to_hf_dict()).to_dict())
    assert reread.architecture() == ours.architecture()


def test_v4_rope_fields_are_read():
    values = {**tiny().to_hf_dict(), "rope_theta": 1e6, "partial_rotary_factor": 0.5}
    del values["rope_parameters"]
    config = Qwen3NextConfig.from_hf_dict(values)
    assert (config.rope_theta, config.partial_rotary_factor) == (1e6, 0.5)


def test_presets_follow_the_paper():
    teacher, student = preset("qwen3_next_80b_a3b"), preset("slimqwen_23a2b")
    assert teacher.layer_types.count("full_attention") == 12 and teacher.layer_types[3] == "full_attention"
    assert (student.num_hidden_layers, student.hidden_size, student.num_experts, student.num_experts_per_tok) == (
        36,
        1536,
        256,
        8,
    )
    assert student.layer_types.count("full_attention") == 9
    assert all(teacher.is_moe_layer(i) for i in range(48))


def test_dense_layer_rule_matches_hf():
    config = tiny(num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=(3,))
    assert [config.is_moe_layer(i) for i in range(6)] == [False, True, False, False, False, True]


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"num_attention_heads": 6, "num_key_value_heads": 4}, "multiple of num_key_value_heads"),
        ({"linear_num_key_heads": 3}, "multiple of linear_num_key_heads"),
        ({"layer_types": ("linear_attention",)}, "layer_types has 1 entries for 4 layers"),
        ({"layer_types": ("linear_attention", "sliding", "linear_attention", "full_attention")}, "unknown layer types"),
        ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
        ({"partial_rotary_factor": 0.2}, "even rotary dimension"),
        ({"dtype": "float16"}, "dtype"),
        ({"hidden_size": 0}, "hidden_size must be positive"),
        ({"mlp_only_layers": (7,)}, "not layer indices"),
    ],
)
def test_invalid_configs_are_rejected(changes, message):
    with pytest.raises(ConfigError, match=message):
        tiny(**changes)


def test_unknown_fields_and_model_types_are_rejected():
    with pytest.raises(ConfigError, match="unknown Qwen3NextConfig fields"):
        Qwen3NextConfig.from_dict({**tiny().to_dict(), "hiden_size": 3})
    with pytest.raises(ConfigError, match="model_type 'qwen2_moe'"):
        Qwen3NextConfig.from_hf_dict({**tiny().to_hf_dict(), "model_type": "qwen2_moe"})
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("qwen4")


def test_dict_round_trip_keeps_runtime_fields():
    config = tiny(dtype="bfloat16", gated_delta_rule_impl="recurrent", moe_backend="dense")
    assert Qwen3NextConfig.from_dict(config.to_dict()) == config
    assert dataclasses.replace(config, dtype="float32").architecture() == config.architecture()
