"""Width pruning: keep the d' most important hidden channels, one index set for the whole model.

Importance of channel k: mean over the residual-stream RMSNorms (every norm over the hidden
dimension: input/post-attention norms of each layer, the final norm, the MTP norms) of the mean
over calibration tokens of |norm output[k]|. The kept channels (in their original order) are
gathered along every parameter axis whose logical name is `embed` (embeddings, lm_head, norms,
every projection's input or output) and `embed_pair` (the MTP fc input, both halves).

With `rescale_norms` (the default), each residual-stream norm's scale (1 + w) is multiplied by
sqrt(D / d'): the norm then divides by the RMS over d' channels instead of D, and this factor makes
its output unchanged when the removed channels are zero (up to eps), so a model that never used
them is pruned without change. `rescale_norms=False` is the paper's plain slicing: every tensor
(norm weights and Adam's moments included) is only gathered.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from slimqwen_jax.compression.calibration import ABS_OUTPUT, CalibrationStats, residual_norms
from slimqwen_jax.compression.spec import PruningError, WidthSpec, width_problems
from slimqwen_jax.compression.state import (
    EMBED_AXIS,
    EMBED_PAIR_AXIS,
    flat_params,
    logical_axes,
    require_abstract,
    take,
    with_values,
)
from slimqwen_jax.config import Qwen3NextConfig


def channel_importance(params: nnx.State, stats: CalibrationStats) -> np.ndarray:
    """[D] mean over the residual-stream norms of mean |norm output| per channel."""
    return np.mean([stats.mean(norm, ABS_OUTPUT) for norm in residual_norms(params)], axis=0)


def channels_to_keep(
    cfg: Qwen3NextConfig, params: nnx.State, stats: CalibrationStats | None, spec: WidthSpec
) -> np.ndarray:
    """Sorted indices of the kept channels [d']. Without statistics (abstract parameters only) the
    first d' channels: a placeholder that has the right shapes."""
    problems = width_problems(cfg, spec)
    if problems:
        raise PruningError("invalid width spec:\n  " + "\n  ".join(problems))
    if spec.is_identity(cfg):
        return np.arange(cfg.hidden_size)
    if stats is None:
        require_abstract(params, "width pruning")
        return np.arange(spec.hidden_size)
    importance = channel_importance(params, stats)
    return np.sort(np.argsort(-importance, kind="stable")[: spec.hidden_size])  # ties: lower index


# How a residual-stream norm's weight w, and Adam's moments of it, follow the rescaling
# (1 + w) -> s (1 + w): w' = s w + (s - 1), so d/dw' = d/dw / s: the first moment scales by 1 / s,
# the second by 1 / s^2 (the moments of the gradient the new parameter would have seen).
NORM_RESCALE = {
    "params": lambda w, s: s * (1.0 + w) - 1.0,
    "first_moment": lambda mu, s: mu / s,
    "second_moment": lambda nu, s: nu / s**2,
}


def _rescale_norm(weight, scale: float, kind: str):
    if isinstance(weight, jax.ShapeDtypeStruct):
        return weight
    return NORM_RESCALE[kind](weight.astype(jnp.float32), scale).astype(weight.dtype)


def select_channels(
    cfg: Qwen3NextConfig, params: nnx.State, keep: np.ndarray, kind: str = "params", rescale_norms: bool = True
) -> tuple[Qwen3NextConfig, nnx.State]:
    """(config, params) of the model restricted to hidden channels `keep` (sorted indices).

    `kind` (params | first_moment | second_moment) says what the tree holds: the norm weights'
    rescaling differs (`NORM_RESCALE`); every gather is the same. `rescale_norms=False`: gathers
    only (plain slicing)."""
    d = cfg.hidden_size
    if len(keep) == d:
        return cfg, params
    norms = {f"{n}.weight" for n in residual_norms(params)} if rescale_norms else set()
    scale = float(np.sqrt(d / len(keep)))
    values = {}
    for path, variable in flat_params(params).items():
        value = variable.get_value()
        for axis, name in enumerate(logical_axes(variable)):
            if name == EMBED_AXIS:
                value = take(value, keep, axis)
            elif name == EMBED_PAIR_AXIS:  # MTP fc input: [embedding half | hidden half]
                value = take(value, np.concatenate([keep, d + keep]), axis)
        values[path] = _rescale_norm(value, scale, kind) if path in norms else value
    new_cfg = cfg.replace(hidden_size=len(keep))
    return new_cfg, with_values(params, values)


def prune_width(
    cfg: Qwen3NextConfig, params: nnx.State, stats: CalibrationStats | None, spec: WidthSpec
) -> tuple[Qwen3NextConfig, nnx.State]:
    """Keep `spec.hidden_size` hidden channels (see module docstring). Pure; works on abstract
    parameters, where `stats` may be None (placeholder channel choice)."""
    keep = channels_to_keep(cfg, params, stats, spec)
    return select_channels(cfg, params, keep, rescale_norms=spec.rescale_norms)
