"""The jitted functions of a stage and what they are made of: the loss function over student and
teacher, the lam / beta weights, the train step with gradient accumulation, the eval step and the
teacher-forced MTP acceptance, built together by `build` as one `StageFunctions`.

The loss weights are arguments of the compiled train and eval steps, evaluated on the host from the
step (`AtStep`), so that runs differing only in their weight schedules (the objective's variants,
a pruned + LM-only baseline) share compiled programs. Which MTP modules run is decided once per
run (`decide_mtp_use`) and passed on. The trainer
(`slimqwen_jax.train`) builds a stage's functions with `build`, and so do the benchmarks
(`tools/bench_train_step.py`, `tools/bench_kd_memory.py`); tests also call the pieces directly.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from slimqwen_jax import losses, model_metrics, sharding, stacking
from slimqwen_jax.config import ConfigError, Qwen3NextConfig
from slimqwen_jax.moe import stack_routing_metrics


# ---------------------------------------------------------------------------- the MTP decision
@dataclasses.dataclass(frozen=True)
class MtpUse:
    """Which MTP modules a run computes.

    student: the student runs its MTP module (it has one and beta is not always 0): the MTP terms;
    teacher: the teacher runs its MTP module (MTP-KD targets it and it is as deep as the student's);
    kd: the MTP-KD term is computed (a teacher that has the target `loss.mtp_kd_target` names; with
    an MTP KD share `mtp_lam` of 0 throughout it is only reported).
    """

    student: bool = False
    teacher: bool = False
    kd: bool = False


def decide_mtp_use(loss: ml_collections.ConfigDict, student: Qwen3NextConfig, teacher: Qwen3NextConfig | None
                   ) -> MtpUse:  # fmt: skip
    """The run's `MtpUse`. Raises ConfigError when MTP-KD with a nonzero MTP KD share targets a
    teacher MTP module shallower than the student's (with the share 0 throughout it is allowed, and
    MTP-KD is not reported)."""
    student_mtp = student.num_mtp_layers > 0 and not losses.is_always_zero(loss.beta)
    if not student_mtp or teacher is None:
        return MtpUse(student=student_mtp)
    if loss.mtp_kd_target == "teacher_backbone":
        return MtpUse(student=True, kd=True)
    if teacher.num_mtp_layers >= student.num_mtp_layers:
        return MtpUse(student=True, teacher=True, kd=True)
    if not losses.is_always_zero(losses.mtp_lam_spec(loss)):
        raise ConfigError(
            f"loss.mtp_kd_target='teacher_mtp' needs a teacher MTP module of depth >= {student.num_mtp_layers}, "
            f"but it has {teacher.num_mtp_layers}: use --config.loss.mtp_kd_target=teacher_backbone"
        )
    return MtpUse(student=True)


# ---------------------------------------------------------------------------- steps
class LossFn(Protocol):
    def __call__(
        self, params: nnx.State, teacher_params: nnx.State | None, tokens: jax.Array, weights: dict[str, jax.Array]
    ) -> tuple[jax.Array, dict[str, jax.Array]]: ...


def make_loss_fn(
    graphdef: nnx.GraphDef, objective: losses.Objective, mtp: MtpUse, teacher_graphdef: nnx.GraphDef | None = None
) -> LossFn:
    """(params, teacher params, tokens [B, L+1], loss weights) -> (loss, metrics): both models run up
    to their LM heads, the objective applies the heads chunk by chunk. The student's per-MoE-layer
    routing metrics (`moe.stack_routing_metrics`) join the objective's metrics. Either model's
    parameters may be in the stacked layout of `stacking`."""

    def loss_fn(params, teacher_params, tokens, weights):
        inputs = tokens[:, :-1]
        model = nnx.merge(graphdef, stacking.unstack(params))
        out, intermediates = nnx.capture(model, nnx.Intermediate)(inputs, with_mtp=mtp.student, with_logits=False)
        teacher = None
        if teacher_graphdef is not None:
            teacher_model = nnx.merge(teacher_graphdef, stacking.unstack(teacher_params))
            teacher_out = teacher_model(inputs, with_mtp=mtp.teacher, with_logits=False)
            teacher = jax.lax.stop_gradient(losses.head_inputs(teacher_model, teacher_out))
        loss, metrics = objective(losses.head_inputs(model, out), teacher, tokens, weights)
        return loss, {**metrics, **stack_routing_metrics(intermediates)}

    return loss_fn


WeightsFn = Callable[[jax.Array], dict[str, jax.Array]]


def make_weighted_train_step(loss_fn: LossFn, tx, grad_accum_steps: int, micro_sharding):
    """One optimizer step over a global batch [B, L+1], accumulating gradients over micro-batches.

    train_step(params, opt_state, teacher_params, tokens, weights) -> (params, opt_state, metrics);
    `weights` are the loss weights (lam, mtp_lam, beta) of the step, arguments rather than constants,
    so that runs whose schedules differ share one compiled program.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(params, opt_state, teacher_params, tokens, weights):
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


def make_weighted_eval_step(loss_fn: LossFn):
    """eval_step(params, teacher_params, tokens, weights) -> metrics (no gradient)."""
    return lambda params, teacher_params, tokens, weights: loss_fn(params, teacher_params, tokens, weights)[1]


def loss_weights_fn(loss: ml_collections.ConfigDict, steps: int, first_step: int = 0) -> WeightsFn:
    """lam, mtp_lam and beta at a 0-based global step, their schedules running over the `steps`
    global steps from `first_step` (the whole run, or one stage: `weight_span`)."""
    schedules = {name: losses.weight_schedule(spec, steps) for name, spec in
                 (("lam", loss.lam), ("mtp_lam", losses.mtp_lam_spec(loss)), ("beta", loss.beta))}  # fmt: skip
    return lambda step: {name: schedule(step - first_step) for name, schedule in schedules.items()}


def weight_span(loss: ml_collections.ConfigDict, total_steps: int, start_step: int, steps: int) -> tuple[int, int]:
    """(steps, first step) the loss weights' schedules run over in a stage of `steps` global steps
    from `start_step`: the whole run of `total_steps`, or with loss.weight_span 'stage' the stage."""
    return (steps, start_step) if loss.weight_span == "stage" else (total_steps, 0)


def make_objective(loss: ml_collections.ConfigDict, cfg: Qwen3NextConfig, mtp: MtpUse) -> losses.Objective:
    """The run's objective (`losses.distillation_objective`) from `config.loss`."""
    return losses.distillation_objective(
        aux_coef=cfg.router_aux_loss_coef,
        chunk_size=loss.chunk_size,
        temperature=loss.temperature,
        mtp_kd_target=loss.mtp_kd_target,
        mtp_kd=mtp.kd,
    )


# ---------------------------------------------------------------------------- a stage's functions
@dataclasses.dataclass(frozen=True)
class AtStep:
    """A jitted function whose last argument is the loss weights, called (and lowered) with a 0-based
    global step in their place: the weights are evaluated outside the compiled program."""

    jitted: Any
    loss_weights: WeightsFn

    def __call__(self, *args):
        *inputs, step = args
        return self.jitted(*inputs, self.loss_weights(step))

    def lower(self, *args):
        *inputs, step = args
        return self.jitted.lower(*inputs, self.loss_weights(step))


@dataclasses.dataclass(frozen=True)
class StageFunctions:
    """The jitted functions of one stage, over its layout (`stacking`) and shardings.

    train_step(params, opt_state, teacher_params, tokens [B, L+1], step) -> (params, opt_state,
    metrics), parameters and optimizer state donated; eval_step(params, teacher_params, tokens,
    step) -> metrics; acceptance(params, tokens) -> `model_metrics.batch_statistics` with MTP
    drafts, or None when the stage drafts none. `step` is the 0-based global step.
    """

    train_step: Callable
    eval_step: Callable
    acceptance: Callable | None
    param_shardings: Any
    opt_shardings: Any


def build(
    config: ml_collections.ConfigDict,
    cfg: Qwen3NextConfig,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    shardings: tuple[Any, Any],
    *,
    mtp: MtpUse,
    weight_steps: tuple[int, int],
    teacher_graphdef: nnx.GraphDef | None = None,
    teacher_shardings: Any = None,
    objective: losses.Objective | None = None,
) -> StageFunctions:
    """The stage's functions for the student `cfg` (`graphdef`) under the run config `config`
    (`loss`, `train.grad_accum_steps`, `train.eval_mtp_drafts`). `shardings`: the (parameter,
    optimizer state) shardings in the stage's layout; `weight_steps`: the (steps, first step) of
    the loss weights' schedules (`weight_span`); `objective` replaces `make_objective`'s."""
    param_shardings, opt_shardings = shardings
    objective = objective or make_objective(config.loss, cfg, mtp)
    loss_fn = make_loss_fn(graphdef, objective, mtp, teacher_graphdef)
    loss_weights = loss_weights_fn(config.loss, *weight_steps)  # evaluated outside the programs
    tokens = sharding.batch_sharding(mesh, 2)
    micro = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, sharding.LOGICAL_RULES["batch"]))
    weighted_train_step = jax.jit(
        make_weighted_train_step(loss_fn, tx, config.train.grad_accum_steps, micro),
        in_shardings=(param_shardings, opt_shardings, teacher_shardings, tokens, None),
        out_shardings=(param_shardings, opt_shardings, None),
        donate_argnums=(0, 1),
    )
    weighted_eval_step = jax.jit(
        make_weighted_eval_step(loss_fn), in_shardings=(param_shardings, teacher_shardings, tokens, None)
    )
    train_step, eval_step = AtStep(weighted_train_step, loss_weights), AtStep(weighted_eval_step, loss_weights)

    num_drafts = config.train.eval_mtp_drafts if cfg.num_mtp_layers else 0
    acceptance = None
    if num_drafts:
        acceptance = jax.jit(
            lambda params, batch: model_metrics.batch_statistics(
                nnx.merge(graphdef, stacking.unstack(params)), batch, num_drafts=num_drafts,
                chunk_size=config.loss.chunk_size,
            ),
            in_shardings=(param_shardings, tokens),
        )  # fmt: skip
    return StageFunctions(train_step, eval_step, acceptance, param_shardings, opt_shardings)
