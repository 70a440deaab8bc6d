"""Total and active parameter counts of a config or a parameter state, and the before / after
architecture table of a pruning step.

Convention (the one behind "80B total / 3.8B active" for Qwen3-Next-80B-A3B): `total` counts every
backbone parameter, the input embedding and the untied lm_head included; `active` counts what one
token uses: every parameter except the routed experts, plus `num_experts_per_tok` of the
`num_experts` routed experts of each MoE layer (the router and the shared expert always count).
The MTP module is a draft head outside the backbone: it is counted separately (`mtp_total`,
`mtp_active`, same rule).
"""

from __future__ import annotations

import dataclasses

from flax import nnx

from slimqwen_jax.compression.state import EXPERT_AXIS, abstract_params, flat_params, logical_axes
from slimqwen_jax.config import Qwen3NextConfig


@dataclasses.dataclass(frozen=True)
class ParameterCount:
    total: int
    active: int
    mtp_total: int
    mtp_active: int
    embeddings: int  # embed_tokens plus the untied lm_head (part of total and active)


def format_count(n: int) -> str:
    """79_674_391_296 -> '79.67B'; small counts in M or K."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def count_parameters(cfg: Qwen3NextConfig, params: nnx.State | None = None) -> ParameterCount:
    """Parameter counts of `params` (real or abstract), or of the model `cfg` describes."""
    params = abstract_params(cfg) if params is None else params
    counts = {"total": 0, "active": 0, "mtp_total": 0, "mtp_active": 0, "embeddings": 0}
    for path, variable in flat_params(params).items():
        size = int(variable.size)
        active = size
        if EXPERT_AXIS in logical_axes(variable) and ".experts." in f".{path}":  # routed experts [E, ...]
            active = size // cfg.num_experts * cfg.num_experts_per_tok
        prefix = "mtp_" if path.startswith("mtp.") else ""
        counts[prefix + "total"] += size
        counts[prefix + "active"] += active
        if path in ("model.embed_tokens.embedding", "lm_head.kernel"):
            counts["embeddings"] += size
    return ParameterCount(**counts)


def _layer_summary(cfg: Qwen3NextConfig) -> str:
    full = sum(t == "full_attention" for t in cfg.layer_types)
    return f"{full} full + {cfg.num_hidden_layers - full} linear"


def architecture_table(before: Qwen3NextConfig, after: Qwen3NextConfig, params_before, params_after) -> str:
    """Every architecture field before and after (changed ones marked), then the parameter counts."""
    a, b = before.architecture(), after.architecture()
    a["layer_types"], b["layer_types"] = _layer_summary(before), _layer_summary(after)
    rows = [(k, str(a[k]), str(b[k]), "*" if a[k] != b[k] else "") for k in a]
    counts = [count_parameters(before, params_before), count_parameters(after, params_after)]
    rows += [
        ("parameters: total", *(format_count(c.total) for c in counts), ""),
        ("parameters: active", *(format_count(c.active) for c in counts), ""),
        ("  of which embeddings + lm_head", *(format_count(c.embeddings) for c in counts), ""),
        ("MTP module (not in total): total", *(format_count(c.mtp_total) for c in counts), ""),
        ("MTP module: active", *(format_count(c.mtp_active) for c in counts), ""),
    ]
    width = max(len(r[0]) for r in rows) + 2
    lines = [f"{'field':<{width}}{'before':>22}  {'after':>22}"]
    lines += [f"{name:<{width}}{x:>22}  {y:>22} {mark}".rstrip() for name, x, y, mark in rows]
    return "\n".join(lines)
