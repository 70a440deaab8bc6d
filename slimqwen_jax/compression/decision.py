"""One pruning spec applied to a model: depth, then experts, then width.

`decide` turns (config, params, spec, statistics) into a `PruningDecision`: plain data (kept
layers, expert plans, kept channels) that `apply_decision` applies to any tree shaped like the
parameters: the parameters themselves, and Adam's first and second moments, so that training
continues through pruning. Statistics are computed once on the source model. Depth goes first and
the statistics follow the kept layers (`CalibrationStats.select_layers`), so channel importance
averages over the norms that remain; experts go before width so that `expert_vector` similarity
sees the full weights.

Moments follow their parameters' index sets exactly. Where a parameter is not only gathered, the
rule is: a merged expert's moments are the same importance-weighted average as its weights (a
convex combination, so the second moment stays a second moment's scale); a residual-stream norm
weight rescaled (1 + w) -> s (1 + w) has its moments scaled by 1 / s and 1 / s^2
(`width.NORM_RESCALE`); with `width.rescale_norms=False` norm weights and their moments are only
gathered, like every other tensor.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import optax
from flax import nnx

from slimqwen_jax.compression.calibration import CalibrationStats
from slimqwen_jax.compression.depth import layers_to_keep, select_layers
from slimqwen_jax.compression.experts import ExpertPlan, apply_plans, plan_layers
from slimqwen_jax.compression.spec import PruneSpec, PruningError, validate
from slimqwen_jax.compression.state import abstract_params, check_fits, is_abstract
from slimqwen_jax.compression.width import channels_to_keep, select_channels
from slimqwen_jax.config import Qwen3NextConfig

PLACEHOLDER_NOTE = (
    "no calibration statistics (abstract parameters): the kept layers, experts and channels are a placeholder "
    "choice (lowest indices first); shapes and parameter counts are exact"
)
TREE_KINDS = ("params", "first_moment", "second_moment")


@dataclasses.dataclass(frozen=True)
class PruningDecision:
    """What one pruning spec keeps of one model, as data.

    kept_layers: old indices of the decoder layers that stay, in order; expert_plans: one
    `ExpertPlan` per MoE block (paths after the depth renumbering; empty when the experts stay),
    num_experts_per_tok: the new top-k; kept_channels: sorted hidden channels [d']; rescale_norms:
    whether the residual-stream norms (and their moments) are rescaled (`WidthSpec.rescale_norms`);
    source / target: the configs before and after; notes: what the choice had to work around.
    """

    source: Qwen3NextConfig
    target: Qwen3NextConfig
    kept_layers: tuple[int, ...]
    expert_plans: dict[str, ExpertPlan]
    num_experts_per_tok: int
    kept_channels: np.ndarray
    rescale_norms: bool = True
    notes: tuple[str, ...] = ()

    def summary(self) -> dict:
        """The decision as JSON-serialisable data (for reports)."""
        return {
            "kept_layers": list(self.kept_layers),
            "kept_channels": int(len(self.kept_channels)),
            "rescale_norms": self.rescale_norms,
            "experts": {
                block: {
                    "survivors": plan.survivors.tolist(),
                    "preserved": plan.preserved.tolist(),
                    "bases": plan.bases.tolist(),
                }
                for block, plan in self.expert_plans.items()
            },  # fmt: skip
            "num_experts_per_tok": self.num_experts_per_tok,
            "notes": list(self.notes),
        }


def decide(
    cfg: Qwen3NextConfig, params: nnx.State, spec: PruneSpec, stats: CalibrationStats | None = None
) -> PruningDecision:
    """The decision of `spec` on the model (`cfg`, `params`), from calibration statistics.

    `params` may be abstract (`jax.ShapeDtypeStruct` leaves): then `stats` may be None, and a note
    says the choice of layers, experts and channels is a placeholder (the shapes are exact). Raises PruningError for a spec
    that does not fit the model, naming every problem.
    """
    validate(cfg, spec)
    notes = []
    if stats is None and spec.needs_stats(cfg):
        if not is_abstract(params):
            raise PruningError("this spec needs calibration statistics: run calibration on the source model first")
        notes.append(PLACEHOLDER_NOTE)
    kept = list(range(cfg.num_hidden_layers))
    if not spec.depth.is_identity():
        kept, depth_notes = layers_to_keep(cfg, spec.depth, stats)
        first = kept == list(range(len(kept)))
        notes += depth_notes
        notes.append(f"depth: kept {f'the first {len(kept)}' if first else kept} of {cfg.num_hidden_layers} layers")
    layers_cfg, layers_params = select_layers(cfg, params, kept)
    layers_stats = stats.select_layers(kept) if stats is not None else None
    plans = plan_layers(layers_cfg, layers_params, layers_stats, spec.experts) if spec.experts.compresses(cfg) else {}
    num_experts, top_k = spec.experts.new_sizes(cfg)
    experts_cfg = layers_cfg.replace(num_experts=num_experts, num_experts_per_tok=top_k)
    keep = channels_to_keep(experts_cfg, layers_params, layers_stats, spec.width)
    target = experts_cfg.replace(hidden_size=len(keep))
    return PruningDecision(cfg, target, tuple(kept), plans, top_k, keep, spec.width.rescale_norms, tuple(notes))


def apply_decision(decision: PruningDecision, tree: nnx.State, kind: str = "params") -> nnx.State:
    """`tree` (shaped like the source model's parameters: the parameters, or an Adam moment) pruned
    by `decision`. `kind` (params | first_moment | second_moment) selects the norm-rescaling rule
    (`decision.rescale_norms`: whether there is one)."""
    if kind not in TREE_KINDS:
        raise ValueError(f"kind must be one of {TREE_KINDS}, got {kind!r}")
    cfg, tree = select_layers(decision.source, tree, list(decision.kept_layers))
    cfg, tree = apply_plans(cfg, tree, decision.expert_plans, decision.num_experts_per_tok)
    cfg, tree = select_channels(cfg, tree, decision.kept_channels, kind, decision.rescale_norms)
    check_fits(decision.target, tree)
    return tree


def prune(
    cfg: Qwen3NextConfig, params: nnx.State, spec: PruneSpec, stats: CalibrationStats | None = None
) -> tuple[Qwen3NextConfig, nnx.State, list[str]]:
    """(new config, new params, notes) of `params` pruned along every axis of `spec`
    (`decide` then `apply_decision`; see there)."""
    decision = decide(cfg, params, spec, stats)
    return decision.target, apply_decision(decision, params), list(decision.notes)


def prune_optimizer_state(decision: PruningDecision, opt_state, tx: optax.GradientTransformation):
    """The optimizer state of the source model's parameters, pruned like them: every Adam state's
    first and second moments go through `apply_decision` (see the module docstring for the rules);
    step counts and everything else stay. Raises PruningError if the result is not the state `tx`
    keeps for the pruned parameters (an optimizer with other per-parameter state)."""

    def prune_adam(node):
        if isinstance(node, optax.ScaleByAdamState):
            return node._replace(
                mu=apply_decision(decision, node.mu, "first_moment"),
                nu=apply_decision(decision, node.nu, "second_moment"),
            )
        return node

    pruned = jax.tree.map(prune_adam, opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
    expected = jax.eval_shape(tx.init, abstract_params(decision.target))
    shapes = lambda tree: [(x.shape, x.dtype) for x in jax.tree.leaves(tree)]  # noqa: E731
    if jax.tree.structure(pruned) != jax.tree.structure(expected) or shapes(pruned) != shapes(expected):
        raise PruningError("the optimizer keeps per-parameter state other than Adam's moments; cannot prune it")
    return pruned
