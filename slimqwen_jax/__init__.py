"""slimqwen_jax: prune and distil Qwen3-Next-style hybrid MoE language models in JAX."""

from slimqwen_jax.config import Qwen3NextConfig, preset
from slimqwen_jax.model import CausalLMOutput, Qwen3NextForCausalLM

__all__ = ["CausalLMOutput", "Qwen3NextConfig", "Qwen3NextForCausalLM", "preset"]
