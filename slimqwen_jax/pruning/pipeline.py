"""One pruning spec applied to a model: depth, then experts, then width.

Statistics are computed once on the source model. Depth goes first and the statistics follow
the kept layers (`CalibrationStats.select_layers`), so channel importance averages over the norms
that remain; experts go before width so that `expert_vector` similarity sees the full weights.
"""

from __future__ import annotations

from flax import nnx

from slimqwen_jax.config import Qwen3NextConfig
from slimqwen_jax.pruning.calibration import CalibrationStats
from slimqwen_jax.pruning.depth import layers_to_keep, select_layers
from slimqwen_jax.pruning.experts import prune_experts
from slimqwen_jax.pruning.spec import PruneSpec, PruningError, validate
from slimqwen_jax.pruning.state import check_fits, is_abstract
from slimqwen_jax.pruning.width import prune_width

PLACEHOLDER_NOTE = (
    "no calibration statistics (abstract parameters): the kept channels and experts are a placeholder "
    "choice (lowest indices first); shapes and parameter counts are exact"
)


def prune(
    cfg: Qwen3NextConfig, params: nnx.State, spec: PruneSpec, stats: CalibrationStats | None = None
) -> tuple[Qwen3NextConfig, nnx.State, list[str]]:
    """(new config, new params, notes) of `params` pruned along every axis of `spec`.

    `params` may be abstract (`jax.ShapeDtypeStruct` leaves, e.g. `state.abstract_params(cfg)`):
    then `stats` may be None except for depth `similarity`, and the notes say what was a placeholder.
    Raises PruningError for a spec that does not fit the model, naming every problem.
    """
    validate(cfg, spec)
    notes = []
    if stats is None and spec.needs_stats(cfg):
        if not is_abstract(params) or spec.depth.needs_stats():
            raise PruningError("this spec needs calibration statistics: run calibration on the source model first")
        notes.append(PLACEHOLDER_NOTE)
    if not spec.depth.is_identity():
        kept = layers_to_keep(cfg, spec.depth, stats)
        first = kept == list(range(len(kept)))
        notes.append(f"depth: kept {f'the first {len(kept)}' if first else kept} of {cfg.num_hidden_layers} layers")
        cfg, params = select_layers(cfg, params, kept)
        stats = stats.select_layers(kept) if stats is not None else None
    cfg, params = prune_experts(cfg, params, stats, spec.experts)
    cfg, params = prune_width(cfg, params, stats, spec.width)
    check_fits(cfg, params)
    return cfg, params, notes
