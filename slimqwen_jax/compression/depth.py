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

from slimqwen_jax.compression.calibration import RESIDUAL_COS, CalibrationStats
from slimqwen_jax.compression.spec import DepthSpec, PruningError, depth_problems
from slimqwen_jax.compression.state import flat_params, require_abstract, with_values
from slimqwen_jax.config import FULL_ATTENTION, Qwen3NextConfig

_LAYER_PATH = re.compile(r"model\.layers\.(?P<index>\d+)\.(?P<rest>.*)")


def block_influence(cfg: Qwen3NextConfig, stats: CalibrationStats) -> np.ndarray:
    """[L] 1 - mean over calibration tokens of cos(residual in, residual out) of each layer."""
    return np.array([1.0 - float(stats.mean(f"model.layers.{i}", RESIDUAL_COS)) for i in range(cfg.num_hidden_layers)])


def layers_to_keep(
    cfg: Qwen3NextConfig, spec: DepthSpec, stats: CalibrationStats | None
) -> tuple[list[int], list[str]]:
    """(indices of the layers that stay, in order; notes on the choice).

    `similarity` removes the least influential layers whose removal keeps the model valid: a layer
    whose removal would leave no full-attention layer is passed over for the next one, and a note
    says so.
    """
    problems = depth_problems(cfg, spec)
    if problems:
        raise PruningError("invalid depth spec:\n  " + "\n  ".join(problems))
    n, layers = spec.num_layers_to_remove, cfg.num_hidden_layers
    if spec.method == "last" or n == 0:  # depth_problems checked that a full-attention layer stays
        return list(range(layers - n)), []
    # Without statistics (planning on abstract parameters only: `decide` and `prune_depth` refuse
    # real ones) a placeholder ranking, lower index first, with the same validity rule.
    influence = block_influence(cfg, stats) if stats is not None else np.zeros(layers)
    full = {i for i, kind in enumerate(cfg.layer_types) if kind == FULL_ATTENTION}
    removed, passed_over = [], []
    for i in np.argsort(influence, kind="stable"):  # least influential first; ties: lower index
        if len(removed) == n:
            break
        if full and full <= {*removed, int(i)}:
            passed_over.append(int(i))
        else:
            removed.append(int(i))
    notes = [
        f"depth: layer {i} (block influence {influence[i]:.4f}) scored for removal but is the last full-attention "
        "layer left; removed the next least influential layer instead"
        for i in passed_over
    ]
    return sorted(set(range(layers)) - set(removed)), notes


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
    not modified; works on abstract parameters (`stats` may then be None: a placeholder choice)."""
    if stats is None and spec.needs_stats():
        require_abstract(params, "depth.method 'similarity'")
    return select_layers(cfg, params, layers_to_keep(cfg, spec, stats)[0])
