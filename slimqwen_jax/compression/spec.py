"""What to cut: one frozen spec per axis (depth, width, experts) and their validation.

A spec whose fields keep everything (`num_layers_to_remove=0`, `hidden_size=0`, `num_experts=0`,
`num_experts_per_tok=0`) is the identity. `PruneSpec.from_config` reads the `depth`, `width` and
`experts` sections of a prune config (`configs/prune_*.py`) or of a train stage (`stages[k]`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from slimqwen_jax.config import FULL_ATTENTION, ConfigError, Qwen3NextConfig

DEPTH_METHODS = ("last", "similarity", "block_similarity")
EXPERT_IMPORTANCES = ("frequency", "soft_logits", "reap")
EXPERT_METHODS = ("prune", "merge", "partial_preservation")
EXPERT_SIMILARITIES = ("router_logits", "router_weights", "expert_vector")
PRESERVE_ROUNDINGS = ("round", "floor")


class PruningError(ConfigError):
    """A pruning spec that does not fit the model (or statistics that do not fit either)."""


@dataclasses.dataclass(frozen=True)
class DepthSpec:
    """Remove `num_layers_to_remove` decoder layers: the `last` ones, the least influential
    (`similarity`: lowest 1 - cos(input, output) of the residual stream, ShortGPT's block influence,
    not necessarily adjacent), or the contiguous block whose two ends are most alike
    (`block_similarity`: highest cos(mean residual input of its first layer, mean residual output
    of its last), the paper's activation similarity)."""

    method: str = "last"
    num_layers_to_remove: int = 0

    def is_identity(self) -> bool:
        return self.num_layers_to_remove == 0

    def needs_stats(self) -> bool:
        return not self.is_identity() and self.method in ("similarity", "block_similarity")


@dataclasses.dataclass(frozen=True)
class WidthSpec:
    """Keep the `hidden_size` most important hidden channels (0 = keep the width).

    `multiple_of`: the new width must be a multiple of it (128 by default: the TPU lane width, which
    the MXU tiles and grouped-matmul kernels' hidden-dimension blocks assume); keeping the source
    width is always allowed. Lower it for toy models.

    `rescale_norms`: multiply each residual-stream norm's scale (1 + w) by sqrt(D / d') (and Adam's
    moments of w by its inverse and inverse square), so that the norms' outputs do not change when
    the removed channels carry nothing; False: the paper's plain slicing, every tensor only gathered.
    """

    hidden_size: int = 0
    multiple_of: int = 128
    rescale_norms: bool = True

    def is_identity(self, cfg: Qwen3NextConfig) -> bool:
        return self.hidden_size in (0, cfg.hidden_size)

    def needs_stats(self, cfg: Qwen3NextConfig) -> bool:
        return not self.is_identity(cfg)


@dataclasses.dataclass(frozen=True)
class ExpertSpec:
    """Compress every MoE layer (the MTP module's included) to `num_experts` experts, top-k
    `num_experts_per_tok` (0 = keep either).

    importance: frequency | soft_logits | reap; method: prune | merge | partial_preservation (the
    top `preserve_fraction` of the kept experts untouched, the rest merge bases; `preserve_rounding`
    turns the fraction into a count: `round`, Python's round(fraction * E') with halves to even, or
    `floor`, the paper's floor(fraction * E')); similarity (merge groups): router_logits |
    router_weights | expert_vector.
    """

    num_experts: int = 0
    num_experts_per_tok: int = 0
    importance: str = "reap"
    method: str = "partial_preservation"
    similarity: str = "expert_vector"
    preserve_fraction: float = 0.5
    preserve_rounding: str = "round"

    def new_sizes(self, cfg: Qwen3NextConfig) -> tuple[int, int]:
        """(experts, top-k) after compression."""
        return self.num_experts or cfg.num_experts, self.num_experts_per_tok or cfg.num_experts_per_tok

    def is_identity(self, cfg: Qwen3NextConfig) -> bool:
        return self.new_sizes(cfg) == (cfg.num_experts, cfg.num_experts_per_tok)

    def compresses(self, cfg: Qwen3NextConfig) -> bool:
        return self.new_sizes(cfg)[0] != cfg.num_experts

    def needs_stats(self, cfg: Qwen3NextConfig) -> bool:
        return self.compresses(cfg)


@dataclasses.dataclass(frozen=True)
class PruneSpec:
    depth: DepthSpec = DepthSpec()
    width: WidthSpec = WidthSpec()
    experts: ExpertSpec = ExpertSpec()

    @classmethod
    def from_config(cls, config: Any) -> PruneSpec:
        """From a ConfigDict (or dict) with `depth`, `width` and `experts` sections."""
        return cls(
            depth=DepthSpec(**dict(config["depth"])),
            width=WidthSpec(**dict(config["width"])),
            experts=ExpertSpec(**dict(config["experts"])),
        )

    def is_identity(self, cfg: Qwen3NextConfig) -> bool:
        """Whether the spec keeps the model `cfg` as it is."""
        return self.depth.is_identity() and self.width.is_identity(cfg) and self.experts.is_identity(cfg)

    def needs_stats(self, cfg: Qwen3NextConfig) -> bool:
        """Whether any axis needs calibration statistics (real parameters) to choose what to keep."""
        return self.depth.needs_stats() or self.width.needs_stats(cfg) or self.experts.needs_stats(cfg)


def _choice(name: str, value: str, options: tuple[str, ...]) -> list[str]:
    return [] if value in options else [f"{name} {value!r} is not one of {options}"]


def _expert_choice_problems(spec: ExpertSpec) -> list[str]:
    problems = _choice("experts.importance", spec.importance, EXPERT_IMPORTANCES)
    problems += _choice("experts.method", spec.method, EXPERT_METHODS)
    problems += _choice("experts.preserve_rounding", spec.preserve_rounding, PRESERVE_ROUNDINGS)
    return problems + _choice("experts.similarity", spec.similarity, EXPERT_SIMILARITIES)


def choice_problems(spec: PruneSpec) -> list[str]:
    """The fields of `spec` that name no known method (no model needed to see them)."""
    return _choice("depth.method", spec.depth.method, DEPTH_METHODS) + _expert_choice_problems(spec.experts)


def depth_problems(cfg: Qwen3NextConfig, spec: DepthSpec) -> list[str]:
    problems = _choice("depth.method", spec.method, DEPTH_METHODS)
    n, layers = spec.num_layers_to_remove, cfg.num_hidden_layers
    if not 0 <= n < layers:
        problems.append(f"depth.num_layers_to_remove is {n}; the model has {layers} layers and must keep at least one")
    elif spec.method == "last":
        problems += full_attention_problems(cfg, list(range(layers - n)))
    elif spec.method == "block_similarity" and not valid_block_starts(cfg, n):
        problems.append(
            f"depth.method 'block_similarity': every block of {n} adjacent layers holds every full-attention layer; "
            "HF transformers needs at least one (remove fewer layers, or use another depth.method)"
        )
    return problems


def width_problems(cfg: Qwen3NextConfig, spec: WidthSpec) -> list[str]:
    d = spec.hidden_size
    if spec.multiple_of < 1:
        return [f"width.multiple_of must be >= 1, got {spec.multiple_of}"]
    if not 0 <= d <= cfg.hidden_size:
        return [f"width.hidden_size is {d}; the model has {cfg.hidden_size} hidden channels (0 keeps them all)"]
    if not spec.is_identity(cfg) and d % spec.multiple_of:
        return [
            (
                f"width.hidden_size {d} is not a multiple of width.multiple_of={spec.multiple_of} (the kernels' "
                "hidden-dimension tile); pick a multiple or lower width.multiple_of for a toy model"
            )
        ]
    return []


def expert_problems(cfg: Qwen3NextConfig, spec: ExpertSpec) -> list[str]:
    problems = _expert_choice_problems(spec)
    if not 0.0 <= spec.preserve_fraction <= 1.0:
        problems.append(f"experts.preserve_fraction must be in [0, 1], got {spec.preserve_fraction}")
    if spec.is_identity(cfg):
        return problems
    if cfg.num_experts == 0:
        return problems + ["experts: the model has no MoE layers to compress"]
    experts, top_k = spec.new_sizes(cfg)
    if not 0 < experts <= cfg.num_experts:
        problems.append(f"experts.num_experts is {experts}; the model has {cfg.num_experts} experts per MoE layer")
    elif not 0 < top_k <= experts:
        problems.append(f"experts.num_experts_per_tok ({top_k}) must be in [1, num_experts={experts}]")
    return problems


def validate(cfg: Qwen3NextConfig, spec: PruneSpec) -> None:
    """Raise one PruningError naming every field of `spec` that does not fit `cfg`."""
    problems = depth_problems(cfg, spec.depth) + width_problems(cfg, spec.width) + expert_problems(cfg, spec.experts)
    if problems:
        raise PruningError("invalid pruning spec:\n  " + "\n  ".join(problems))


def without_block(layers: int, start: int, n: int) -> list[int]:
    """The layers of a `layers`-layer model that stay when the n adjacent layers from `start` go."""
    return [i for i in range(layers) if not start <= i < start + n]


def valid_block_starts(cfg: Qwen3NextConfig, n: int) -> list[int]:
    """First layers of the blocks of n adjacent layers whose removal keeps the model valid
    (`full_attention_problems`)."""
    layers = cfg.num_hidden_layers
    return [s for s in range(layers - n + 1) if not full_attention_problems(cfg, without_block(layers, s, n))]


def full_attention_problems(cfg: Qwen3NextConfig, kept: list[int]) -> list[str]:
    """A hybrid model must keep a full-attention layer: transformers' Qwen3-Next (its cache) fails
    on a model made of linear-attention layers only."""
    if FULL_ATTENTION in cfg.layer_types and all(cfg.layer_types[i] != FULL_ATTENTION for i in kept):
        return [
            f"depth pruning would keep layers {kept}, none of them full attention; HF transformers needs at least "
            "one (remove fewer layers, or other ones)"
        ]
    return []
