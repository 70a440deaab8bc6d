"""Depth pruning: remove whole decoder layers of the backbone (the MTP module stays on top).

`last` drops the last N layers; `similarity` drops the N layers of lowest block influence
1 - mean cos(residual in, residual out) (ShortGPT). `layer_types` follows the kept layers, and the
MoE/dense pattern is re-expressed for the new indices (`mlp_only_layers`, and
`decoder_sparse_step` = 1 when the old step no longer describes it).
"""

from __future__ import annotations

import re

import numpy as np
from flax import nnx

from slimqwen_jax.config import Qwen3NextConfig
from slimqwen_jax.pruning.calibration import RESIDUAL_COS, CalibrationStats
from slimqwen_jax.pruning.spec import DepthSpec, PruningError, depth_problems, require_full_attention
from slimqwen_jax.pruning.state import flat_params, with_values

_LAYER_PATH = re.compile(r"model\.layers\.(?P<index>\d+)\.(?P<rest>.*)")


def block_influence(cfg: Qwen3NextConfig, stats: CalibrationStats) -> np.ndarray:
    """[L] 1 - mean over calibration tokens of cos(residual in, residual out) of each layer."""
    return np.array([1.0 - float(stats.mean(f"model.layers.{i}", RESIDUAL_COS)) for i in range(cfg.num_hidden_layers)])


def layers_to_keep(cfg: Qwen3NextConfig, spec: DepthSpec, stats: CalibrationStats | None) -> list[int]:
    """Indices of the layers that stay, in order."""
    problems = depth_problems(cfg, spec)
    if problems:
        raise PruningError("invalid depth spec:\n  " + "\n  ".join(problems))
    n, layers = spec.num_layers_to_remove, cfg.num_hidden_layers
    if spec.method == "last" or n == 0:
        kept = list(range(layers - n))
    elif stats is None:
        raise PruningError("depth.method 'similarity' needs calibration statistics (block influence)")
    else:
        removed = np.argsort(block_influence(cfg, stats), kind="stable")[:n]  # least influential; ties: lower index
        kept = sorted(set(range(layers)) - {int(i) for i in removed})
    require_full_attention(cfg, kept)
    return kept


def _moe_pattern(cfg: Qwen3NextConfig, is_moe: list[bool]) -> tuple[int, tuple[int, ...]]:
    """(decoder_sparse_step, mlp_only_layers) that give layer j MoE iff is_moe[j]: the old step if
    it still fits, else step 1 with every dense layer listed."""
    for step in (cfg.decoder_sparse_step, 1):
        dense = tuple(j for j, moe in enumerate(is_moe) if not moe and (j + 1) % step == 0)
        if all(moe == ((j + 1) % step == 0 and j not in dense) for j, moe in enumerate(is_moe)):
            return step, dense
    raise AssertionError("step 1 fits every pattern")


def pruned_depth_config(cfg: Qwen3NextConfig, kept: list[int]) -> Qwen3NextConfig:
    """The config of the model made of layers `kept` (old indices, in order)."""
    step, mlp_only = _moe_pattern(cfg, [cfg.is_moe_layer(i) for i in kept])
    return cfg.replace(
        num_hidden_layers=len(kept),
        layer_types=tuple(cfg.layer_types[i] for i in kept),
        decoder_sparse_step=step,
        mlp_only_layers=mlp_only,
    )


def select_layers(cfg: Qwen3NextConfig, params: nnx.State, kept: list[int]) -> tuple[Qwen3NextConfig, nnx.State]:
    """(config, params) of the model made of decoder layers `kept` (old indices, in order)."""
    new_index = {old: new for new, old in enumerate(kept)}
    flat = flat_params(params)
    renamed = {}
    for path in flat:
        match = _LAYER_PATH.fullmatch(path)
        if match is None:
            renamed[path] = path
        elif int(match["index"]) in new_index:
            renamed[path] = f"model.layers.{new_index[int(match['index'])]}.{match['rest']}"
    values = {new: flat[old].get_value() for old, new in renamed.items()}
    return pruned_depth_config(cfg, kept), with_values(params, values, renamed)


def prune_depth(
    cfg: Qwen3NextConfig, params: nnx.State, stats: CalibrationStats | None, spec: DepthSpec
) -> tuple[Qwen3NextConfig, nnx.State]:
    """Remove `spec.num_layers_to_remove` decoder layers (see module docstring). Pure: the inputs are
    not modified; works on abstract parameters (`stats` may be None for `last`)."""
    return select_layers(cfg, params, layers_to_keep(cfg, spec, stats))
