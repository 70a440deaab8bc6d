"""Gated delta rule (Qwen3-Next linear attention): `gated_delta_rule` over a sequence (jnp references
or the Pallas kernel) and `gated_delta_rule_step` for one decode token."""

from pallas_kernels.gated_delta_rule.ops import gated_delta_rule, gated_delta_rule_step

__all__ = ["gated_delta_rule", "gated_delta_rule_step"]
