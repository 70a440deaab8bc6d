"""Depth pruning: remove whole decoder layers of the backbone (the MTP module stays on top).

`last` drops the last N layers; `similarity` drops the N layers of lowest block influence
1 - mean cos(residual in, residual out) (ShortGPT; not necessarily adjacent); `block_similarity`
drops the N adjacent layers l..l+N-1 of highest cos(mean residual input of layer l, mean residual
output of layer l+N-1), the means taken over the calibration tokens (the paper's activation
similarity; ties: the lower l). Either of the last two passes over a choice that would leave no
full-attention layer, and a note says so. `layer_types` follows the kept layers, and the MoE/dense
pattern is re-expressed for the new indices (`mlp_only_layers`, and `decoder_sparse_step` = 1 when
the old step no longer describes it).
"""

from __future__ import annotations

import re

import numpy as np
from flax import nnx

from slimqwen_jax.compression.calibration import RESIDUAL_COS, RESIDUAL_IN, RESIDUAL_OUT, CalibrationStats
from slimqwen_jax.compression.spec import (
    DepthSpec,
    PruningError,
    depth_problems,
    full_attention_problems,
    valid_block_starts,
    without_block,
)
from slimqwen_jax.compression.state import flat_params, require_abstract, with_values
from slimqwen_jax.config import Qwen3NextConfig

_LAYER_PATH = re.compile(r"model\.layers\.(?P<index>\d+)\.(?P<rest>.*)")


def block_influence(cfg: Qwen3NextConfig, stats: CalibrationStats) -> np.ndarray:
    """[L] 1 - mean over calibration tokens of cos(residual in, residual out) of each layer."""
    return np.array([1.0 - float(stats.mean(f"model.layers.{i}", RESIDUAL_COS)) for i in range(cfg.num_hidden_layers)])


def block_similarity(cfg: Qwen3NextConfig, stats: CalibrationStats, n: int) -> np.ndarray:
    """[L - n + 1] for each first layer l of a block of n adjacent layers: cos(mean residual input
    of layer l, mean residual output of layer l + n - 1), means over the calibration tokens."""
    layers = [f"model.layers.{i}" for i in range(cfg.num_hidden_layers)]
    for name in (RESIDUAL_IN, RESIDUAL_OUT):
        stats.require(layers, name, "depth.method 'block_similarity'")
    x_in = np.stack([stats.mean(layer, RESIDUAL_IN) for layer in layers[: len(layers) - n + 1]])  # [L - n + 1, D]
    x_out = np.stack([stats.mean(layer, RESIDUAL_OUT) for layer in layers[n - 1 :]])  # [L - n + 1, D]
    dot = np.sum(x_in * x_out, axis=1)
    norms = np.linalg.norm(x_in, axis=1) * np.linalg.norm(x_out, axis=1)
    return np.divide(dot, norms, out=np.zeros_like(dot), where=norms > 0)


def layers_to_keep(
    cfg: Qwen3NextConfig, spec: DepthSpec, stats: CalibrationStats | None
) -> tuple[list[int], list[str]]:
    """(indices of the layers that stay, in order; notes on the choice).

    `similarity` removes the least influential layers whose removal keeps the model valid: a layer
    whose removal would leave no full-attention layer is passed over for the next one, and a note
    says so. `block_similarity` removes the most similar block of adjacent layers that leaves a
    full-attention layer; a note names every more similar block passed over.
    """
    problems = depth_problems(cfg, spec)
    if problems:
        raise PruningError("invalid depth spec:\n  " + "\n  ".join(problems))
    n, layers = spec.num_layers_to_remove, cfg.num_hidden_layers
    if spec.method == "last" or n == 0:  # depth_problems checked that a full-attention layer stays
        return list(range(layers - n)), []
    if spec.method == "block_similarity":
        return _most_similar_block(cfg, n, stats)
    # Without statistics (planning on abstract parameters only: `decide` and `prune_depth` refuse
    # real ones) a placeholder ranking, lower index first, with the same validity rule.
    influence = block_influence(cfg, stats) if stats is not None else np.zeros(layers)
    removed, passed_over = [], []
    for i in np.argsort(influence, kind="stable"):  # least influential first; ties: lower index
        if len(removed) == n:
            break
        if full_attention_problems(cfg, [j for j in range(layers) if j not in {*removed, int(i)}]):
            passed_over.append(int(i))
        else:
            removed.append(int(i))
    notes = [
        f"depth: layer {i} (block influence {influence[i]:.4f}) scored for removal but is the last full-attention "
        "layer left; removed the next least influential layer instead"
        for i in passed_over
    ]
    return sorted(set(range(layers)) - set(removed)), notes


def _most_similar_block(cfg: Qwen3NextConfig, n: int, stats: CalibrationStats | None) -> tuple[list[int], list[str]]:
    """`layers_to_keep` of `block_similarity` (a placeholder without statistics: the lowest valid block)."""
    layers = cfg.num_hidden_layers
    similarity = block_similarity(cfg, stats, n) if stats is not None else np.zeros(layers - n + 1)
    valid = set(valid_block_starts(cfg, n))  # not empty: depth_problems checked it
    ranked = [int(s) for s in np.argsort(-similarity, kind="stable")]  # most similar first; ties: lower start
    start = next(s for s in ranked if s in valid)
    notes = [
        f"depth: {_block_name(s, n)} (block similarity {similarity[s]:.4f}) scored for removal but would remove "
        f"every full-attention layer; removed the next most similar block, {_block_name(start, n)}, instead"
        for s in ranked[: ranked.index(start)]
    ]
    return without_block(layers, start, n), notes


def _block_name(start: int, n: int) -> str:
    return f"layer {start}" if n == 1 else f"layers {start}-{start + n - 1}"


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
        require_abstract(params, f"depth.method {spec.method!r}")
    return select_layers(cfg, params, layers_to_keep(cfg, spec, stats)[0])
