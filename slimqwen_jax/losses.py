"""Training objectives. A loss maps (model, tokens [B, L+1]) to (scalar, metrics dict).

Shape letters: B batch, L sequence length, V vocab, M MTP depth, E experts.
`tokens` holds inputs and targets together: inputs = tokens[:, :-1], next-token targets =
tokens[:, 1:]; MTP step d at position i predicts tokens[:, i + 2 + d].
"""

from __future__ import annotations

from typing import Protocol

import jax
import jax.numpy as jnp

from slimqwen_jax.model import CausalLMOutput, Qwen3NextForCausalLM


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


def expert_load(router_logits: tuple[jax.Array, ...], top_k: int) -> jax.Array:
    """Fraction of routed token slots each expert receives, per MoE layer: [L_moe, E], rows sum to 1."""
    if not router_logits:
        return jnp.zeros((0, 0), jnp.float32)
    num_experts = router_logits[0].shape[-1]

    def load(logits):
        _, chosen = jax.lax.top_k(logits.astype(jnp.float32), top_k)  # softmax is monotonic
        return jnp.mean(jnp.sum(jax.nn.one_hot(chosen, num_experts), axis=1), axis=0) / top_k

    return jnp.stack([load(logits) for logits in router_logits])


def language_model_loss(mtp_weight: float) -> LossFn:
    """L = CE + router_aux_loss_coef * aux + mtp_weight * mean over depths of the MTP CE."""

    def loss_fn(model: Qwen3NextForCausalLM, tokens: jax.Array):
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        out: CausalLMOutput = model(inputs, with_mtp=mtp_weight > 0)
        ce = cross_entropy(out.logits, targets, jnp.ones(targets.shape, bool))
        cfg = model.config
        loss = ce + cfg.router_aux_loss_coef * out.aux_loss
        metrics = {"ce": ce, "aux_loss": out.aux_loss, "expert_load": expert_load(out.router_logits, cfg.num_experts_per_tok)}
        if out.mtp_logits is not None:
            mtp_ce = mtp_cross_entropies(out.mtp_logits, tokens)
            loss = loss + mtp_weight * jnp.mean(mtp_ce)
            metrics["mtp_ce"] = jnp.mean(mtp_ce)
        metrics["loss"] = loss
        return loss, metrics

    return loss_fn
