"""The optimizer of a run: AdamW with global-norm clipping and its learning-rate schedule, built
from `config.optimizer` (its fields and defaults: `run_config.optimizer_section`)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax

from slimqwen_jax import stacking
from slimqwen_jax.config import ConfigError

LEARNING_RATE_SCHEDULES = ("cosine", "wsd", "constant")


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
        raise ConfigError(f"optimizer.schedule must be one of {LEARNING_RATE_SCHEDULES}, got {opt.schedule!r}")
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


def optimizer_problems(opt: ml_collections.ConfigDict) -> list[str]:
    """Every unusable field of `config.optimizer`, one line each."""
    problems = [f"optimizer.{name} must be >= 0, got {opt[name]}" for name in
                ("init_lr", "end_lr", "warmup_steps", "weight_decay") if not opt[name] >= 0]  # fmt: skip
    problems += [f"optimizer.{name} must be > 0, got {opt[name]}" for name in ("peak_lr", "eps", "clip_norm")
                 if not opt[name] > 0]  # fmt: skip
    problems += [f"optimizer.{name} must be in [0, 1), got {opt[name]}" for name in ("b1", "b2")
                 if not 0 <= opt[name] < 1]  # fmt: skip
    if not 0 < opt.decay_fraction <= 1:
        problems.append(f"optimizer.decay_fraction must be in (0, 1], got {opt.decay_fraction}")
    if opt.schedule not in LEARNING_RATE_SCHEDULES:
        problems.append(f"optimizer.schedule must be one of {LEARNING_RATE_SCHEDULES}, got {opt.schedule!r}")
    return problems
