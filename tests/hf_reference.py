"""HF transformers references for parity tests: tiny random Qwen3-Next models built in code.

Nothing is downloaded: each model is created from a config here, its weights perturbed so that
norm weights, gates and decays are far from their trivial initial values, and saved with
`save_pretrained` to a temporary directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from transformers import Qwen3NextConfig as HFConfig
from transformers import Qwen3NextForCausalLM as HFModel

# Three tiny architectures that differ in every axis the model must get right.
HF_CONFIGS = {
    # Hv/Hk = 2, GQA 2, rotary 4 of 16, a dense-MLP layer, untied.
    "gqa2_ratio2": dict(
        vocab_size=97, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
        linear_value_head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        shared_expert_intermediate_size=24, intermediate_size=40, mlp_only_layers=[1],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
    ),
    # Hv/Hk = 1, no GQA, Dk != Dv, rotary 4 of 8, MoE every 2nd layer, tied, unnormalised top-k.
    "mha_ratio1_tied": dict(
        vocab_size=97, hidden_size=48, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
        head_dim=8, linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=16,
        linear_value_head_dim=8, num_experts=6, num_experts_per_tok=3, moe_intermediate_size=16,
        shared_expert_intermediate_size=16, intermediate_size=32, decoder_sparse_step=2, norm_topk_prob=False,
        tie_word_embeddings=True, layer_types=["full_attention", "linear_attention", "full_attention", "linear_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0, "partial_rotary_factor": 0.5},
    ),
    # Hv/Hk = 3, GQA 3, full rotary on head_dim 12, conv width 3.
    "gqa3_ratio3": dict(
        vocab_size=97, hidden_size=32, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2,
        head_dim=12, linear_num_key_heads=1, linear_num_value_heads=3, linear_key_head_dim=12,
        linear_value_head_dim=8, linear_conv_kernel_dim=3, num_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=8, shared_expert_intermediate_size=16, intermediate_size=24,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "partial_rotary_factor": 1.0},
    ),
}  # fmt: skip


def make_hf_model(name: str, seed: int = 0, **overrides) -> HFModel:
    """A random float32 HF model in eval mode with non-trivial norm weights, decays and biases."""
    config = HFConfig(**{**HF_CONFIGS[name], "initializer_range": 0.08, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = HFModel(config).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param_name.endswith(("norm.weight", "layernorm.weight", "dt_bias")):
                param.add_(0.2 * torch.randn(param.shape, generator=generator))
    return model


def affine_sequences(rng: np.random.Generator, batch: int, length: int, vocab: int) -> np.ndarray:
    """Token sequences following t[i+1] = (5 t[i] + 3) mod vocab from random starts: a learnable task."""
    ids = np.zeros((batch, length), np.int64)
    ids[:, 0] = rng.integers(0, vocab, batch)
    for i in range(1, length):
        ids[:, i] = (5 * ids[:, i - 1] + 3) % vocab
    return ids


def train_hf_model(model: HFModel, steps: int = 60, seed: int = 0) -> HFModel:
    """Fit the model to `affine_sequences` with Adam so that its predictions become confident.

    Random models give near-uniform logits whose top-1 flips under any rounding; a trained model's
    do not, which is what a bfloat16 top-1 agreement test needs.
    """
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        ids = torch.tensor(affine_sequences(rng, 16, 48, model.config.vocab_size))
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def add_mtp_tensors(directory: Path, num_layers: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """Add random `mtp.*` tensors (fc, norms, full-attention MoE layers) to a saved HF checkpoint.

    Each MTP layer takes the shapes of the checkpoint's first full-attention layer (attention and
    norms) and first MoE layer (mlp), perturbed. Returns the added tensors.
    """
    hf_config = json.loads((directory / "config.json").read_text())
    attention_layer = hf_config["layer_types"].index("full_attention")
    moe_layer = next(i for i in range(hf_config["num_hidden_layers"]) if _is_moe(hf_config, i))
    tensors = load_file(directory / "model.safetensors")
    rng = np.random.default_rng(seed)
    d = hf_config["hidden_size"]
    mtp = {
        "mtp.fc.weight": 0.08 * rng.standard_normal((d, 2 * d)),
        "mtp.pre_fc_norm_embedding.weight": 0.2 * rng.standard_normal(d),
        "mtp.pre_fc_norm_hidden.weight": 0.2 * rng.standard_normal(d),
        "mtp.norm.weight": 0.2 * rng.standard_normal(d),
    }
    for key, value in tensors.items():
        for source, keep in (
            (attention_layer, lambda rest: not rest.startswith("mlp.")),
            (moe_layer, lambda rest: rest.startswith("mlp.")),
        ):
            prefix = f"model.layers.{source}."
            if key.startswith(prefix) and keep(key[len(prefix) :]):
                for depth in range(num_layers):
                    mtp[f"mtp.layers.{depth}." + key[len(prefix) :]] = value + 0.05 * rng.standard_normal(value.shape)
    mtp = {k: v.astype(np.float32) for k, v in mtp.items()}
    save_file({**tensors, **mtp}, directory / "model.safetensors", metadata={"format": "pt"})
    return mtp


def _is_moe(hf_config: dict, i: int) -> bool:
    return (
        i not in hf_config.get("mlp_only_layers", [])
        and hf_config["num_experts"] > 0
        and (i + 1) % hf_config.get("decoder_sparse_step", 1) == 0
    )


def causal_mask(batch: int, length: int) -> torch.Tensor:
    """The additive 4-D causal mask HF's eager attention takes when called layer by layer."""
    mask = torch.full((length, length), torch.finfo(torch.float32).min).triu(1)
    return mask[None, None].expand(batch, 1, length, length)
