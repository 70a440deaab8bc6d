"""Expert compression: E experts per MoE layer -> E', by pruning or importance-weighted merging.

Importance of expert i (A(x) the top-k set of token x, z_i(x) its routing weight, renormalised
over the top-k when `norm_topk_prob`):
  frequency    E_x[1[i in A(x)]]
  soft_logits  E_x[1[i in A(x)] z_i(x)]
  reap         mean over the tokens routed to i of z_i(x) ||E_i(x)||_2   (0 if none)
Methods (experts ranked by importance, ties to the lower index):
  prune                 keep the top E'.
  merge                 the top E' are bases; every other expert joins its most similar base.
  partial_preservation  the top P = round(preserve_fraction * E') (`preserve_rounding` `round`:
                        Python's, halves to even) or floor(preserve_fraction * E') (`floor`, the
                        paper's) are kept untouched, the next E' - P are bases, the rest join
                        their most similar base.
A base becomes sum_j I_j W_j / sum_j I_j over itself and its joiners (gate, up and down; equal
weights if every I_j is 0). The router keeps the rows of the surviving experts, whose new order is
their old order. Every MoE layer is compressed with its own statistics, the MTP module's included
(calibrated through the MTP forward); without statistics (abstract parameters) a placeholder
ranking (lower index first) gives the right shapes.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from slimqwen_jax.compression.calibration import LOGIT_GRAM, REAP, SELECTED, WEIGHT, CalibrationStats
from slimqwen_jax.compression.spec import ExpertSpec, PruningError, expert_problems
from slimqwen_jax.compression.state import flat_params, require_abstract, take, with_values
from slimqwen_jax.config import Qwen3NextConfig

EXPERT_WEIGHTS = ("gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class ExpertPlan:
    """How one MoE layer's E experts become E' (indices are old expert indices).

    preserved: experts kept untouched; bases: experts other experts merge into; assignment [E]: the
    new index of the expert each old expert becomes part of (-1: dropped); coefficient [E]: its
    weight there (the weights of one new expert sum to 1).
    """

    preserved: np.ndarray
    bases: np.ndarray
    assignment: np.ndarray
    coefficient: np.ndarray

    @property
    def survivors(self) -> np.ndarray:
        """Old index of each new expert [E'] (whose router row it keeps)."""
        return np.sort(np.concatenate([self.preserved, self.bases]))


def moe_blocks(params: nnx.State) -> list[str]:
    """Module paths of the MoE blocks: `model.layers.{i}.mlp`, `mtp.layers.{d}.mlp`."""
    suffix = ".experts.gate_proj"
    return [path.removesuffix(suffix) for path in flat_params(params) if path.endswith(suffix)]


# ---------------------------------------------------------------------------- importance, similarity
def expert_importance(stats: CalibrationStats, moe: str, kind: str) -> np.ndarray:
    """[E] importance of each expert of MoE block `moe` (see module docstring)."""
    selected = stats.mean(moe, SELECTED)
    if kind == "frequency":
        return selected
    if kind == "soft_logits":
        return stats.mean(moe, WEIGHT)
    if kind == "reap":
        reap = stats.mean(moe, REAP)
        return np.divide(reap, selected, out=np.zeros_like(reap), where=selected > 0)
    raise PruningError(f"unknown expert importance {kind!r}")


def cosine_from_gram(gram: np.ndarray) -> np.ndarray:
    """[E, E] cosine similarities from a Gram matrix of E vectors (0 for zero vectors)."""
    norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
    denominator = np.outer(norms, norms)
    return np.divide(gram, denominator, out=np.zeros_like(gram, dtype=np.float64), where=denominator > 0)


def _gram(vectors: jax.Array) -> np.ndarray:
    """[E, X] -> [E, E] in float32 at full matmul precision, returned as float64."""
    v = vectors.astype(jnp.float32)
    return np.asarray(jnp.einsum("ex,fx->ef", v, v, precision=jax.lax.Precision.HIGHEST), np.float64)


def expert_similarity(values: dict, stats: CalibrationStats | None, moe: str, kind: str) -> np.ndarray:
    """[E, E] cosine similarity of the experts of `moe` (values: {dotted path: array})."""
    if kind == "router_logits":
        return cosine_from_gram(stats.sums[f"{moe}:{LOGIT_GRAM}"])
    if kind == "router_weights":
        return cosine_from_gram(_gram(values[f"{moe}.gate.kernel"].T))  # router rows [E, D]
    if kind == "expert_vector":
        flat = [values[f"{moe}.experts.{name}"] for name in EXPERT_WEIGHTS]
        return cosine_from_gram(_gram(jnp.concatenate([w.reshape(w.shape[0], -1) for w in flat], axis=1)))
    raise PruningError(f"unknown expert similarity {kind!r}")


# ---------------------------------------------------------------------------- plans
def preserved_count(preserve_fraction: float, num_experts: int, rounding: str) -> int:
    """How many of `num_experts` kept experts partial preservation leaves untouched: `round`
    (Python's, halves to even) or `floor` of preserve_fraction * num_experts. `floor` allows 1e-9 of
    slack, so that a product that is a whole number on paper (0.29 x 100) is not floored below it
    by binary rounding."""
    if rounding == "round":
        return round(preserve_fraction * num_experts)
    if rounding == "floor":
        return math.floor(preserve_fraction * num_experts + 1e-9)
    raise PruningError(f"unknown preserve rounding {rounding!r}")


def plan_experts(
    importance: np.ndarray,
    similarity: np.ndarray | None,
    num_experts: int,
    method: str,
    preserve_fraction: float,
    preserve_rounding: str = "round",
) -> ExpertPlan:
    """Which experts survive and what merges into them (see module docstring).

    importance [E]; similarity [E, E] (only read for the experts that join a base; may be None for
    `prune`); num_experts: E'; preserve_rounding: `round` | `floor` (`preserved_count`).
    """
    e = len(importance)
    ranked = np.argsort(-np.asarray(importance), kind="stable")
    if method == "prune":
        num_preserved = num_experts
    elif method == "merge":
        num_preserved = 0
    elif method == "partial_preservation":
        num_preserved = preserved_count(preserve_fraction, num_experts, preserve_rounding)
    else:
        raise PruningError(f"unknown expert method {method!r}")
    preserved, bases, joiners = ranked[:num_preserved], ranked[num_preserved:num_experts], ranked[num_experts:]
    survivors = np.sort(ranked[:num_experts])
    assignment = np.full(e, -1)
    assignment[survivors] = np.arange(num_experts)
    if len(bases) and len(joiners):
        best = bases[np.argmax(np.asarray(similarity)[np.ix_(joiners, bases)], axis=1)]  # [joiners] base joined
        assignment[joiners] = assignment[best]
    coefficient = np.zeros(e)
    for new in range(num_experts):
        members = np.flatnonzero(assignment == new)
        weights = np.asarray(importance, np.float64)[members]
        coefficient[members] = weights / weights.sum() if weights.sum() > 0 else 1.0 / len(members)
    return ExpertPlan(np.sort(preserved), np.sort(bases), assignment, coefficient)


def plan_layers(
    cfg: Qwen3NextConfig, params: nnx.State, stats: CalibrationStats | None, spec: ExpertSpec
) -> dict[str, ExpertPlan]:
    """The plan of every MoE block; a lower-index-first placeholder without statistics."""
    values = {path: v.get_value() for path, v in flat_params(params).items()}
    num_experts, _ = spec.new_sizes(cfg)
    if stats is None:
        require_abstract(params, "expert compression")
    plans = {}
    for moe in moe_blocks(params):
        if stats is None:
            importance, similarity = -np.arange(cfg.num_experts, dtype=np.float64), np.zeros((cfg.num_experts,) * 2)
        else:
            importance = expert_importance(stats, moe, spec.importance)
            merges = spec.method != "prune" and num_experts < cfg.num_experts
            similarity = expert_similarity(values, stats, moe, spec.similarity) if merges else None
        plans[moe] = plan_experts(
            importance, similarity, num_experts, spec.method, spec.preserve_fraction, spec.preserve_rounding
        )
    return plans


def merge_experts(weight, plan: ExpertPlan):
    """weight [E, ...] -> [E', ...]: each new expert the coefficient-weighted sum of its members,
    in float32 (a kept expert: 1.0 x itself, exactly)."""
    members = np.flatnonzero(plan.assignment >= 0)
    if isinstance(weight, jax.ShapeDtypeStruct):
        return take(weight, plan.survivors, 0)
    coefficient = jnp.asarray(plan.coefficient[members], jnp.float32).reshape((-1,) + (1,) * (weight.ndim - 1))
    scaled = jnp.take(weight, jnp.asarray(members), axis=0).astype(jnp.float32) * coefficient
    merged = jax.ops.segment_sum(scaled, jnp.asarray(plan.assignment[members]), num_segments=len(plan.survivors))
    return merged.astype(weight.dtype)


def apply_plans(
    cfg: Qwen3NextConfig, params: nnx.State, plans: dict[str, ExpertPlan], num_experts_per_tok: int
) -> tuple[Qwen3NextConfig, nnx.State]:
    """(config, params) with every MoE block compressed by its plan and top-k `num_experts_per_tok`."""
    values = {path: v.get_value() for path, v in flat_params(params).items()}
    for moe, plan in plans.items():
        values[f"{moe}.gate.kernel"] = take(values[f"{moe}.gate.kernel"], plan.survivors, 1)  # [D, E']
        for name in EXPERT_WEIGHTS:
            values[f"{moe}.experts.{name}"] = merge_experts(values[f"{moe}.experts.{name}"], plan)
    num_experts = len(next(iter(plans.values())).survivors) if plans else cfg.num_experts
    new_cfg = cfg.replace(num_experts=num_experts, num_experts_per_tok=num_experts_per_tok)
    return new_cfg, with_values(params, values)


def prune_experts(
    cfg: Qwen3NextConfig, params: nnx.State, stats: CalibrationStats | None, spec: ExpertSpec
) -> tuple[Qwen3NextConfig, nnx.State]:
    """Compress every MoE layer to `spec.num_experts` experts with top-k `spec.num_experts_per_tok`
    (see module docstring). Pure; works on abstract parameters (`stats` may then be None)."""
    problems = expert_problems(cfg, spec)
    if problems:
        raise PruningError("invalid expert spec:\n  " + "\n  ".join(problems))
    _, top_k = spec.new_sizes(cfg)
    plans = plan_layers(cfg, params, stats, spec) if spec.compresses(cfg) else {}
    return apply_plans(cfg, params, plans, top_k)
