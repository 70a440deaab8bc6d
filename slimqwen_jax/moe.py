"""The Qwen3-Next sparse MoE block as small pure functions: route -> expert FFN -> combine.

Shape letters: N tokens (B*T flattened), D model width, E experts, K experts per token, F expert
width. Expert weights are stacked: gate/up [E, D, F], down [E, F, D].
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from slimqwen_jax.config import Qwen3NextConfig
from slimqwen_jax.layers import MLP, Linear, normal_param


def route(router_logits: jax.Array, top_k: int, normalize: bool) -> tuple[jax.Array, jax.Array]:
    """Softmax over all experts in float32, top-k, optional renormalisation.

    router_logits [N, E] -> (weights [N, K] float32, experts [N, K] int32). Ties go to the lower index.
    """
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)  # [N, E]
    weights, experts = jax.lax.top_k(probs, top_k)  # [N, K]
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts


def swiglu_experts_dense(x, weights, experts, gate_proj, up_proj, down_proj):
    """Reference backend: every expert on every token, combined with a [N, E] weight matrix."""
    num_experts = gate_proj.shape[0]
    combine = jnp.sum(jax.nn.one_hot(experts, num_experts, dtype=weights.dtype) * weights[..., None], axis=1)  # [N, E]
    hidden = jax.nn.silu(jnp.einsum("nd,edf->nef", x, gate_proj)) * jnp.einsum("nd,edf->nef", x, up_proj)
    out = jnp.einsum("nef,efd->ned", hidden, down_proj)  # [N, E, D]
    return jnp.einsum("ne,ned->nd", combine.astype(out.dtype), out)


def swiglu_experts_ragged(x, weights, experts, gate_proj, up_proj, down_proj):
    """Dropless backend: sort the N*K token copies by expert and run grouped matmuls (ragged_dot)."""
    n, k = experts.shape
    num_experts = gate_proj.shape[0]
    flat_experts = experts.reshape(-1)  # [N*K]
    order = jnp.argsort(flat_experts, stable=True)  # [N*K]
    token_of_copy = order // k  # [N*K]
    group_sizes = jnp.bincount(flat_experts, length=num_experts).astype(jnp.int32)  # [E]
    xs = x[token_of_copy]  # [N*K, D]
    hidden = jax.nn.silu(jax.lax.ragged_dot(xs, gate_proj, group_sizes)) * jax.lax.ragged_dot(xs, up_proj, group_sizes)
    out = jax.lax.ragged_dot(hidden, down_proj, group_sizes)  # [N*K, D]
    out = out * weights.reshape(-1)[order][:, None].astype(out.dtype)
    return jnp.zeros((n, x.shape[-1]), out.dtype).at[token_of_copy].add(out)


EXPERT_BACKENDS = {"dense": swiglu_experts_dense, "ragged": swiglu_experts_ragged}


def load_balancing_loss(router_logits: Sequence[jax.Array], top_k: int) -> jax.Array:
    """HF's `load_balancing_loss_func` over all MoE layers: E * sum_{k,e} f[k, e] * P[e].

    f[k, e] is the fraction of tokens whose k-th choice is e, P[e] the mean router probability; not
    divided by K, so perfectly uniform routing gives K.
    """
    logits = jnp.concatenate([r.astype(jnp.float32) for r in router_logits], axis=0)  # [L*N, E]
    num_experts = logits.shape[-1]
    probs = jax.nn.softmax(logits, axis=-1)
    _, selected = jax.lax.top_k(probs, top_k)  # [L*N, K]
    tokens_per_expert = jnp.mean(jax.nn.one_hot(selected, num_experts, dtype=jnp.float32), axis=0)  # [K, E]
    prob_per_expert = jnp.mean(probs, axis=0)  # [E]
    return num_experts * jnp.sum(tokens_per_expert * prob_per_expert[None, :])


class Experts(nnx.Module):
    """The routed experts' SwiGLU weights, stacked over experts."""

    def __init__(self, cfg: Qwen3NextConfig, *, rngs):
        e, d, f = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_proj = normal_param(rngs, (e, d, f), ("expert", "embed", "expert_mlp"), cfg)
        self.up_proj = normal_param(rngs, (e, d, f), ("expert", "embed", "expert_mlp"), cfg)
        self.down_proj = normal_param(rngs, (e, f, d), ("expert", "expert_mlp", "embed"), cfg)
        self.dtype = cfg.compute_dtype
        self.backend = EXPERT_BACKENDS[cfg.moe_backend]

    def __call__(self, x: jax.Array, weights: jax.Array, experts: jax.Array) -> jax.Array:
        cast = lambda p: p[...].astype(self.dtype)  # noqa: E731
        # HF rounds the routing weights to the compute dtype before combining.
        weights = weights.astype(self.dtype)
        return self.backend(x, weights, experts, cast(self.gate_proj), cast(self.up_proj), cast(self.down_proj))


class SparseMoeBlock(nnx.Module):
    """Routed experts plus a sigmoid-gated shared expert. Returns (out [B,T,D], router_logits [N,E])."""

    def __init__(self, cfg: Qwen3NextConfig, *, rngs):
        self.gate = Linear(cfg.hidden_size, cfg.num_experts, ("embed", "expert"), cfg, rngs=rngs)
        self.experts = Experts(cfg, rngs=rngs)
        self.shared_expert = MLP(cfg.shared_expert_intermediate_size, cfg, rngs=rngs)
        self.shared_expert_gate = Linear(cfg.hidden_size, 1, ("embed", None), cfg, rngs=rngs)
        self.top_k, self.norm_topk_prob = cfg.num_experts_per_tok, cfg.norm_topk_prob

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        b, t, d = x.shape
        tokens = x.reshape(b * t, d)  # [N, D]
        router_logits = self.gate(tokens)  # [N, E]
        weights, experts = route(router_logits, self.top_k, self.norm_topk_prob)
        routed = self.experts(tokens, weights, experts)  # [N, D]
        shared = jax.nn.sigmoid(self.shared_expert_gate(tokens)) * self.shared_expert(tokens)
        return (routed + shared).reshape(b, t, d), router_logits
