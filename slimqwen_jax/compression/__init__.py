"""Structural pruning of Qwen3-Next models, driven by calibration statistics (docs/method.md section 3).

    stats = calibrate(model, samples)                          # streaming statistics, save/load
    cfg, params, notes = prune(cfg, nnx.state(model), spec, stats)   # depth -> experts -> width
    pruned = build_model(cfg, params)

    decision = decide(cfg, params, spec, stats)                # the same choice, as data
    mu = apply_decision(decision, mu, "first_moment")           # ... applied to Adam's moments too

Each axis is also a pure transform `(config, params, stats, spec) -> (config, params)`:
`prune_depth`, `prune_width`, `prune_experts`. All of them run on abstract parameters
(`abstract_params(cfg)`) to plan a compression without weights; `count_parameters` gives total
and active counts of any config.
"""

from slimqwen_jax.compression.calibration import (
    CalibrationStats,
    calibrate,
    load_or_calibrate,
    load_statistics,
    residual_norms,
)
from slimqwen_jax.compression.decision import PruningDecision, apply_decision, decide, prune, prune_optimizer_state
from slimqwen_jax.compression.depth import block_influence, block_similarity, layers_to_keep, prune_depth
from slimqwen_jax.compression.experts import ExpertPlan, expert_importance, plan_experts, prune_experts
from slimqwen_jax.compression.param_count import ParameterCount, architecture_table, count_parameters, format_count
from slimqwen_jax.compression.spec import DepthSpec, ExpertSpec, PruneSpec, PruningError, WidthSpec, validate
from slimqwen_jax.compression.state import abstract_params, build_model
from slimqwen_jax.compression.width import channel_importance, prune_width

__all__ = [
    "CalibrationStats",
    "DepthSpec",
    "ExpertPlan",
    "ExpertSpec",
    "ParameterCount",
    "PruneSpec",
    "PruningDecision",
    "PruningError",
    "WidthSpec",
    "abstract_params",
    "architecture_table",
    "apply_decision",
    "block_influence",
    "block_similarity",
    "build_model",
    "calibrate",
    "channel_importance",
    "count_parameters",
    "decide",
    "expert_importance",
    "format_count",
    "layers_to_keep",
    "load_or_calibrate",
    "load_statistics",
    "plan_experts",
    "prune",
    "prune_depth",
    "prune_experts",
    "prune_optimizer_state",
    "prune_width",
    "residual_norms",
    "validate",
]
