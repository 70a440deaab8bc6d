"""The jitted train step and what it is made of: the optimizer and its schedules, the loss
function over student and teacher, the lam / beta weights, the step with gradient accumulation.

Pure builders: the trainer (`slimqwen_jax.train`) composes them per stage; tests and benchmarks
call them directly (`tools/bench_kd_memory.py` compiles the very step the trainer runs).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from slimqwen_jax import losses, stacking
from slimqwen_jax.config import ConfigError, Qwen3NextConfig
from slimqwen_jax.moe import stack_routing_metrics


# ---------------------------------------------------------------------------- optimizer
def optimizer_config(**overrides) -> ml_collections.ConfigDict:
    """`config.optimizer`: AdamW (decoupled weight decay on matrices only), global-norm clipping, a
    linear warmup from init_lr to peak_lr, then `schedule` (cosine | wsd | constant) towards end_lr."""
    defaults = dict(
        schedule="cosine", init_lr=0.0, peak_lr=3e-3, end_lr=3e-4, warmup_steps=40,
        decay_fraction=0.2,  # wsd only: the share of post-warmup steps spent decaying
        weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0,
    )  # fmt: skip
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ConfigError(f"unknown optimizer fields: {unknown}")
    return ml_collections.ConfigDict({**defaults, **overrides})


def learning_rate_schedule(opt: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup to peak_lr, then `cosine` (to end_lr), `wsd` (stable, then a linear decay over
    the last decay_fraction of the run) or `constant`."""
    warmup = optax.linear_schedule(opt.init_lr, opt.peak_lr, opt.warmup_steps)
    remaining = max(total_steps - opt.warmup_steps, 1)
    if opt.schedule == "cosine":
        after = optax.cosine_decay_schedule(opt.peak_lr, remaining, alpha=opt.end_lr / opt.peak_lr)
    elif opt.schedule == "wsd":
        decay = max(int(remaining * opt.decay_fraction), 1)
        after = optax.join_schedules(
            [optax.constant_schedule(opt.peak_lr), optax.linear_schedule(opt.peak_lr, opt.end_lr, decay)],
            [remaining - decay],
        )
    elif opt.schedule == "constant":
        after = optax.constant_schedule(opt.peak_lr)
    else:
        raise ConfigError(f"optimizer.schedule must be 'cosine', 'wsd' or 'constant', got {opt.schedule!r}")
    return optax.join_schedules([warmup, after], [opt.warmup_steps])


def with_rewarmups(schedule: optax.Schedule, rewarmups: Sequence[tuple[int, int]]) -> optax.Schedule:
    """`schedule` times a linear ramp 1/n, 2/n, ..., 1 over each (start, n) window of global steps
    (a stage that asks to re-warm its learning rate)."""
    if not rewarmups:
        return schedule

    def rewarmed(count):
        factor = jnp.ones((), jnp.float32)
        for start, length in rewarmups:
            ramp = (count - start + 1) / length
            factor = jnp.where((count >= start) & (count < start + length), ramp, factor)
        return schedule(count) * factor

    return rewarmed


def make_optimizer(
    opt: ml_collections.ConfigDict, total_steps: int, rewarmups: Sequence[tuple[int, int]] = ()
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with global-norm clipping; weight decay skips vectors (norms, gates' biases, decays),
    per layer in a stacked layout too (`stacking`). The schedule runs on the global step;
    `rewarmups`: see `with_rewarmups`."""
    schedule = with_rewarmups(learning_rate_schedule(opt, total_steps), rewarmups)
    decay_mask = lambda params: jax.tree.map(lambda ndim: ndim >= 2, stacking.per_layer_ndims(params))  # noqa: E731
    tx = optax.chain(
        optax.clip_by_global_norm(opt.clip_norm),
        optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay, mask=decay_mask),
    )
    return tx, schedule


# ---------------------------------------------------------------------------- steps
class LossFn(Protocol):
    def __call__(
        self, params: nnx.State, teacher_params: nnx.State | None, tokens: jax.Array, weights: dict[str, jax.Array]
    ) -> tuple[jax.Array, dict[str, jax.Array]]: ...


def make_loss_fn(
    graphdef: nnx.GraphDef,
    objective: losses.Objective,
    *,
    with_mtp: bool,
    teacher_graphdef: nnx.GraphDef | None = None,
    teacher_mtp: bool = False,
) -> LossFn:
    """(params, teacher params, tokens [B, L+1], loss weights) -> (loss, metrics): both models run up
    to their LM heads, the objective applies the heads chunk by chunk. The student's per-MoE-layer
    routing metrics (`moe.stack_routing_metrics`) join the objective's metrics. Either model's
    parameters may be in the stacked layout of `stacking`."""

    def loss_fn(params, teacher_params, tokens, weights):
        inputs = tokens[:, :-1]
        model = nnx.merge(graphdef, stacking.unstack(params))
        out, intermediates = nnx.capture(model, nnx.Intermediate)(inputs, with_mtp=with_mtp, with_logits=False)
        teacher = None
        if teacher_graphdef is not None:
            teacher_model = nnx.merge(teacher_graphdef, stacking.unstack(teacher_params))
            teacher_out = teacher_model(inputs, with_mtp=teacher_mtp, with_logits=False)
            teacher = jax.lax.stop_gradient(losses.head_inputs(teacher_model, teacher_out))
        loss, metrics = objective(losses.head_inputs(model, out), teacher, tokens, weights)
        return loss, {**metrics, **stack_routing_metrics(intermediates)}

    return loss_fn


WeightsFn = Callable[[jax.Array], dict[str, jax.Array]]


def make_train_step(loss_fn: LossFn, tx, loss_weights: WeightsFn, grad_accum_steps: int, micro_sharding):
    """One optimizer step over a global batch [B, L+1], accumulating gradients over micro-batches.

    train_step(params, opt_state, teacher_params, tokens, step) -> (params, opt_state, metrics);
    `step` is the 0-based global step that sets the loss weights (lam, beta).
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(params, opt_state, teacher_params, tokens, step):
        weights = loss_weights(step)
        b = tokens.shape[0]
        # Micro-batch a takes rows a, a + A, a + 2A, ... so each stays spread over the batch axes.
        micro = tokens.reshape(b // grad_accum_steps, grad_accum_steps, -1).swapaxes(0, 1)  # [A, B/A, L+1]
        micro = jax.lax.with_sharding_constraint(micro, micro_sharding)

        def accumulate(carry, tokens_a):
            (_, metrics), grads = grad_fn(params, teacher_params, tokens_a, weights)
            return jax.tree.map(jnp.add, carry, (grads, metrics)), None

        if grad_accum_steps == 1:  # no loop: the model is traced once, not also for the carry's shapes
            (_, metrics), grads = grad_fn(params, teacher_params, micro[0], weights)
        else:
            # The carry's shapes from a forward-only trace: gradients are shaped like the parameters.
            zero_metrics = jax.tree.map(
                jnp.zeros_like, jax.eval_shape(loss_fn, params, teacher_params, micro[0], weights)[1]
            )
            (grads, metrics), _ = jax.lax.scan(accumulate, (jax.tree.map(jnp.zeros_like, params), zero_metrics), micro)
            grads, metrics = jax.tree.map(lambda x: x / grad_accum_steps, (grads, metrics))
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics["grad_norm"] = optax.global_norm(grads)
        metrics["param_norm"] = optax.global_norm(params)
        return params, opt_state, metrics

    return train_step


def make_eval_step(loss_fn: LossFn, loss_weights: WeightsFn):
    """eval_step(params, teacher_params, tokens, step) -> metrics (no gradient)."""

    def eval_step(params, teacher_params, tokens, step):
        return loss_fn(params, teacher_params, tokens, loss_weights(step))[1]

    return eval_step


def loss_weights_fn(loss: ml_collections.ConfigDict, total_steps: int) -> WeightsFn:
    """lam and beta at a 0-based global step, from their schedules over the whole run."""
    lam = losses.weight_schedule(loss.lam, total_steps)
    beta = losses.weight_schedule(loss.beta, total_steps)
    return lambda step: {"lam": lam(step), "beta": beta(step)}


def make_objective(config: ml_collections.ConfigDict, cfg: Qwen3NextConfig) -> losses.Objective:
    loss = config.loss
    return losses.distillation_objective(
        aux_coef=cfg.router_aux_loss_coef,
        chunk_size=loss.chunk_size,
        temperature=loss.temperature,
        mtp_kd_target=loss.mtp_kd_target,
    )
