"""What the tests share: error measures, one jitted forward, random inputs, config-file loading and
hand-written references. No test framework or torch import here: the package imports it freely.

Shape letters: B batch, T tokens, Hk / Hv linear-attention key / value heads, Dk / Dv head dims.
"""

from __future__ import annotations

import importlib.util
import re
import types
from pathlib import Path

import numpy as np
from flax import nnx

from slimqwen_jax import storage
from slimqwen_jax.checkpoint import load_checkpoint
from slimqwen_jax.config import FULL_ATTENTION, Qwen3NextConfig
from slimqwen_jax.model import CausalLMOutput, Qwen3NextForCausalLM


def max_relative_error(ours, reference) -> float:
    """max |ours - reference| / max |reference|, in float64."""
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))


def assert_relative_error(ours, reference, tolerance: float, what: str = "") -> float:
    """Assert `max_relative_error(ours, reference) <= tolerance`; print and return the error."""
    error = max_relative_error(ours, reference)
    print(f"{what or 'max relative error'}: {error:.2e} (tolerance {tolerance:.0e})")
    assert error <= tolerance, f"{what}: max relative error {error:.3e} > {tolerance:.0e}"
    return error


@nnx.jit
def forward(model: Qwen3NextForCausalLM, input_ids) -> CausalLMOutput:
    """The model's full forward (logits, MTP logits, aux loss), jitted once per shape for all tests."""
    return model(input_ids)


def random_tokens(batch: int, length: int, vocab: int, seed: int = 0) -> np.ndarray:
    """Uniform token ids [B, T] (int32)."""
    return np.random.default_rng(seed).integers(0, vocab, (batch, length)).astype(np.int32)


def checkpoint_params(directory: str | Path, step: int) -> list[np.ndarray]:
    """Every parameter of `<directory>/checkpoints/<step>` (a training run or stage), in order."""
    model = load_checkpoint(storage.path(directory) / "checkpoints" / str(step))
    return [np.asarray(v[...]) for _, v in nnx.to_flat_state(nnx.state(model))]


def load_config_file(path: str | Path) -> types.ModuleType:
    """Import a config file (configs/<name>.py) as a module: `.get_config()` and its docstring."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def apply_overrides(config, overrides) -> None:
    """Apply command-line style overrides (`--config.train.steps=3`, `--config.stages[1].steps=5`) to
    a ConfigDict in place, each value converted to the type of the one it replaces."""
    for override in overrides:
        path, value = override.removeprefix("--config.").split("=", 1)
        *parents, leaf = re.split(r"\.(?![^\[]*\])", path)
        node = config
        for part in parents:
            name, index = re.fullmatch(r"(\w+)(?:\[(\d+)\])?", part).groups()
            node = node[name] if index is None else node[name][int(index)]
        current = node[leaf]
        if isinstance(current, bool):
            node[leaf] = value.lower() == "true"
        else:
            node[leaf] = value if isinstance(current, str) or current is None else type(current)(value)


def gated_delta_rule_inputs(
    seed: int, t: int, hk: int, hv: int, *, batch: int = 2, dk: int = 16, dv: int = 32, with_state: bool = True
) -> dict[str, np.ndarray | None]:
    """Seeded float32 inputs of the gated delta rule entry point, with Qwen3-Next style gates.

    g = -exp(A_log) * softplus(a + dt_bias) with A = exp(A_log) ~ U(1, 16) per head and dt_bias the
    Mamba init log(expm1(dt)), dt ~ logU(1e-3, 1e-1): per-token decays from ~0.98 down to ~0.2.
    The default Dk != Dv, so that a swapped state layout cannot pass.
    """
    rng = np.random.default_rng(seed)
    a_log = np.log(rng.uniform(1.0, 16.0, hv))  # [Hv]
    dt_bias = np.log(np.expm1(np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), hv))))  # [Hv]
    a = rng.normal(size=(batch, t, hv))  # [B, T, Hv]
    inputs = {
        "q": rng.normal(size=(batch, t, hk, dk)),  # [B, T, Hk, Dk]
        "k": rng.normal(size=(batch, t, hk, dk)),  # [B, T, Hk, Dk]
        "v": rng.normal(size=(batch, t, hv, dv)),  # [B, T, Hv, Dv]
        "g": -np.exp(a_log) * np.logaddexp(0.0, a + dt_bias),  # [B, T, Hv]
        "beta": 1.0 / (1.0 + np.exp(-rng.normal(size=(batch, t, hv)))),  # [B, T, Hv]
        "initial_state": rng.normal(size=(batch, hv, dk, dv)) if with_state else None,  # [B, Hv, Dk, Dv]
    }
    return {name: None if x is None else x.astype(np.float32) for name, x in inputs.items()}


def hand_count_parameters(cfg: Qwen3NextConfig) -> tuple[int, int]:
    """(total, active) parameters of the backbone from the tensor list in docs/qwen3_next.md, written out
    by hand (the independent reference of `pruning.count_parameters`)."""
    d, hd = cfg.hidden_size, cfg.head_dim
    hk, hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
    dk, dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
    linear = (
        d * (2 * hk * dk + 2 * hv * dv)
        + d * 2 * hv
        + (2 * hk * dk + hv * dv) * cfg.linear_conv_kernel_dim
        + 2 * hv
        + dv
    )
    linear += hv * dv * d
    full = (
        d * 2 * cfg.num_attention_heads * hd
        + 2 * d * cfg.num_key_value_heads * hd
        + cfg.num_attention_heads * hd * d
        + 2 * hd
    )
    expert = 3 * d * cfg.moe_intermediate_size
    shared = d * cfg.num_experts + 3 * d * cfg.shared_expert_intermediate_size + d
    total = active = cfg.vocab_size * d * (1 if cfg.tie_word_embeddings else 2) + d
    for i, kind in enumerate(cfg.layer_types):
        mixer = full if kind == FULL_ATTENTION else linear
        if cfg.is_moe_layer(i):
            total += mixer + 2 * d + shared + cfg.num_experts * expert
            active += mixer + 2 * d + shared + cfg.num_experts_per_tok * expert
        else:
            total += mixer + 2 * d + 3 * d * cfg.intermediate_size
            active += mixer + 2 * d + 3 * d * cfg.intermediate_size
    return total, active
