"""Training objectives. A loss maps (model, tokens [B, L+1]) to (scalar, metrics dict).

Shape letters: B batch, L sequence length, V vocab, M MTP depth, E experts, L_moe MoE layers.
`tokens` holds inputs and targets together: inputs = tokens[:, :-1], next-token targets =
tokens[:, 1:]; MTP step d at position i predicts tokens[:, i + 2 + d].
"""

from __future__ import annotations

from typing import Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from slimqwen_jax.model import CausalLMOutput, Qwen3NextForCausalLM
from slimqwen_jax.moe import stack_routing_metrics


class LossFn(Protocol):
    def __call__(self, model: Qwen3NextForCausalLM, tokens: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]: ...


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy in float32 over positions where mask is true. logits [B, T, V]."""
    logits = logits.astype(jnp.float32)
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # [B, T]
    losses = jax.nn.logsumexp(logits, axis=-1) - target_logits
    return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1)


def mtp_cross_entropies(mtp_logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Cross-entropy of each MTP depth [M]; positions whose target lies past the window are masked."""
    _, b, length, _ = mtp_logits.shape
    losses = []
    for depth in range(mtp_logits.shape[0]):
        shift = depth + 2
        targets = jnp.pad(tokens[:, shift:], ((0, 0), (0, shift - 1)))  # [B, L]
        mask = jnp.broadcast_to(jnp.arange(length) < length + 1 - shift, (b, length))
        losses.append(cross_entropy(mtp_logits[depth], targets, mask))
    return jnp.stack(losses)


def language_model_loss(mtp_weight: float) -> LossFn:
    """L = CE + router_aux_loss_coef * aux + mtp_weight * mean over depths of the MTP CE.

    Metrics: the loss terms, and per MoE layer the routing metrics of `moe.stack_routing_metrics`
    (expert_load [L_moe, E]; max_load, layer_aux_loss and dropped_fraction [L_moe]).
    """

    def loss_fn(model: Qwen3NextForCausalLM, tokens: jax.Array):
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        out: CausalLMOutput
        out, intermediates = nnx.capture(model, nnx.Intermediate)(inputs, with_mtp=mtp_weight > 0)
        ce = cross_entropy(out.logits, targets, jnp.ones(targets.shape, bool))
        loss = ce + model.config.router_aux_loss_coef * out.aux_loss
        metrics = {"ce": ce, "aux_loss": out.aux_loss, **stack_routing_metrics(intermediates)}
        if out.mtp_logits is not None:
            mtp_ce = mtp_cross_entropies(out.mtp_logits, tokens)
            loss = loss + mtp_weight * jnp.mean(mtp_ce)
            metrics["mtp_ce"] = jnp.mean(mtp_ce)
        metrics["loss"] = loss
        return loss, metrics

    return loss_fn
