"""Gated delta rule (Qwen3-Next linear attention): `gated_delta_rule` is the public entry point."""

from pallas_kernels.gated_delta_rule.ops import gated_delta_rule

__all__ = ["gated_delta_rule"]
