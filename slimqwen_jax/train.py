"""Language-model training entry point.

    python -m slimqwen_jax.train --config configs/<name>.py [--config.key=value ...]

The run reads top to bottom: mesh -> data -> abstract model and optimizer -> sharded init or
restore -> one jitted, donated train step -> loop (log, eval, checkpoint). Resume order: the
workdir's own latest checkpoint, else `init_from` (an HF directory or one of our checkpoints),
else random init. Rerunning the same command resumes exactly, data order included.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from slimqwen_jax import cli, data, hf, sharding
from slimqwen_jax.checkpoint import TrainingCheckpoints, load_checkpoint, load_checkpoint_config
from slimqwen_jax.config import RUNTIME_FIELDS, ConfigError, Qwen3NextConfig
from slimqwen_jax.hf import CheckpointMismatchError
from slimqwen_jax.losses import LossFn, language_model_loss
from slimqwen_jax.model import Qwen3NextForCausalLM
from slimqwen_jax.progress import ProgressLogger, plot_loss_curves

log = logging.getLogger("slimqwen_jax.train")

# Fields that do not change the parameters or the function the model computes.
NON_ARCHITECTURE_FIELDS = ("initializer_range", "router_aux_loss_coef", "max_position_embeddings")


class TrainError(RuntimeError):
    """A run that cannot start or must stop; the message says why and what was kept."""


# ---------------------------------------------------------------------------- configuration
def model_config(config: ml_collections.ConfigDict) -> Qwen3NextConfig:
    """The model config from `config.model` (fields of `Qwen3NextConfig.to_flag_dict`)."""
    return Qwen3NextConfig.from_dict(config.model.to_dict())


def architecture_mismatch(expected: Qwen3NextConfig, found: Qwen3NextConfig) -> list[str]:
    """Human-readable differences between two configs' architectures."""
    a, b = expected.architecture(), found.architecture()
    return [f"{k}: expected {a[k]!r}, found {b[k]!r}" for k in a if k not in NON_ARCHITECTURE_FIELDS and a[k] != b[k]]


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


def make_optimizer(
    opt: ml_collections.ConfigDict, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with global-norm clipping; weight decay skips vectors (norms, gates' biases, decays)."""
    schedule = learning_rate_schedule(opt, total_steps)
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    tx = optax.chain(
        optax.clip_by_global_norm(opt.clip_norm),
        optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay, mask=decay_mask),
    )
    return tx, schedule


# ---------------------------------------------------------------------------- model state
def abstract_state(cfg: Qwen3NextConfig, tx, mesh):
    """Graphdef, abstract (sharded ShapeDtypeStruct) params and opt state, and their shardings."""
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Qwen3NextForCausalLM(cfg, rngs=nnx.Rngs(0))))
    param_shardings = sharding.state_shardings(params, mesh)
    opt_state = jax.eval_shape(tx.init, params)
    # Optimizer moments take their parameter's sharding; everything else (counts) is replicated.
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    opt_shardings = optax.tree_map_params(
        tx, lambda _, s: s, opt_state, param_shardings,
        transform_non_params=lambda _: replicated, is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct),
    )  # fmt: skip
    with_sharding = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)  # noqa: E731
    abstract_params = jax.tree.map(with_sharding, params, param_shardings)
    abstract_opt = jax.tree.map(with_sharding, opt_state, opt_shardings)
    return graphdef, abstract_params, abstract_opt, param_shardings, opt_shardings


def initial_params(cfg: Qwen3NextConfig, init_from: str, seed: int, param_shardings):
    """Parameters from `init_from` (HF directory or our checkpoint) or a seeded random init."""
    if not init_from:
        init = lambda: nnx.state(Qwen3NextForCausalLM(cfg, rngs=nnx.Rngs(seed)))  # noqa: E731
        return jax.jit(init, out_shardings=param_shardings)()
    source = Path(init_from)
    is_hf = (source / "config.json").exists()
    problems = architecture_mismatch(cfg, (hf.load_config if is_hf else load_checkpoint_config)(source))
    if problems:
        raise TrainError(f"init_from {source} does not match config.model:\n  " + "\n  ".join(problems))
    runtime = {k: getattr(cfg, k) for k in RUNTIME_FIELDS}
    model = (hf.load_model if is_hf else load_checkpoint)(source, **runtime)
    return jax.device_put(nnx.state(model), param_shardings)


# ---------------------------------------------------------------------------- steps
def make_train_step(graphdef, tx, loss_fn: LossFn, grad_accum_steps: int, token_sharding):
    """One optimizer step over a global batch [B, L+1], accumulating gradients over micro-batches."""

    def micro_loss(params, tokens):
        return loss_fn(nnx.merge(graphdef, params), tokens)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def train_step(params, opt_state, tokens):
        b = tokens.shape[0]
        # Micro-batch a takes rows a, a + A, a + 2A, ... so each stays spread over the batch axes.
        micro = tokens.reshape(b // grad_accum_steps, grad_accum_steps, -1).swapaxes(0, 1)  # [A, B/A, L+1]
        micro = jax.lax.with_sharding_constraint(micro, token_sharding)

        def accumulate(carry, tokens_a):
            (_, metrics), grads = grad_fn(params, tokens_a)
            return jax.tree.map(jnp.add, carry, (grads, metrics)), None

        zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, params, micro[0]))
        (grads, metrics), _ = jax.lax.scan(accumulate, (zeros[1], zeros[0][1]), micro)
        grads, metrics = jax.tree.map(lambda x: x / grad_accum_steps, (grads, metrics))
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics["grad_norm"] = optax.global_norm(grads)
        metrics["param_norm"] = optax.global_norm(params)
        return params, opt_state, metrics

    return train_step


def make_eval_step(graphdef, loss_fn: LossFn):
    def eval_step(params, tokens):
        return loss_fn(nnx.merge(graphdef, params), tokens)[1]

    return eval_step


# ---------------------------------------------------------------------------- the run
def run(config: ml_collections.ConfigDict, loss_fn: LossFn | None = None) -> dict:
    """Train as configured; returns the final metrics. Raises TrainError / ConfigError / DataError."""
    cfg = model_config(config)
    tc = config.train
    if tc.global_batch_size % (tc.grad_accum_steps * jax.process_count()):
        raise ConfigError("train.global_batch_size must be a multiple of train.grad_accum_steps x process count")
    workdir = Path(config.workdir).absolute()

    # Mesh.
    mesh = sharding.make_mesh(config.mesh)

    # Data.
    tokenizer = data.make_tokenizer(config.data.tokenizer)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ConfigError(f"tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is {cfg.vocab_size}")
    train_batches = data.train_iterator(config.data, tokenizer, batch_size=tc.global_batch_size // jax.process_count())
    heldout = data.heldout_batches(config.data, tokenizer, batch_size=tc.eval_batch_size, num_batches=tc.eval_batches)
    token_sharding = sharding.batch_sharding(mesh, 2)

    # Abstract model and optimizer.
    tx, schedule = make_optimizer(config.optimizer, tc.steps)
    graphdef, abstract_params, abstract_opt, param_shardings, opt_shardings = abstract_state(cfg, tx, mesh)
    loss_fn = loss_fn or language_model_loss(tc.mtp_loss_weight)

    # Sharded init or restore: own checkpoint, else init_from, else random.
    checkpoints = TrainingCheckpoints(workdir, max_to_keep=tc.keep_checkpoints)
    start_step = checkpoints.latest_step()
    if start_step is not None:
        problems = architecture_mismatch(cfg, checkpoints.model_config(start_step))
        if problems:
            raise TrainError(
                f"{workdir} holds a checkpoint of a different architecture (step {start_step}); refusing to touch it. "
                "Use another workdir or the matching config:\n  " + "\n  ".join(problems)
            )
        params, opt_state, train_state = checkpoints.restore(start_step, abstract_params, abstract_opt)
        train_batches.set_state(train_state["data"])
        log.info("resumed from %s at step %d", checkpoints.step_directory(start_step), start_step)
    else:
        start_step = 0
        params = initial_params(cfg, config.init_from, config.seed, param_shardings)
        opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
        log.info("started from %s", config.init_from or f"random init (seed {config.seed})")
    num_params = sum(x.size for x in jax.tree.leaves(params))
    log.info("model: %s parameters, %d layers, %d experts", f"{num_params:,}", cfg.num_hidden_layers, cfg.num_experts)

    # Step functions.
    micro_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, sharding.LOGICAL_RULES["batch"]))
    train_step = jax.jit(
        make_train_step(graphdef, tx, loss_fn, tc.grad_accum_steps, micro_sharding),
        in_shardings=(param_shardings, opt_shardings, token_sharding),
        out_shardings=(param_shardings, opt_shardings, None),
        donate_argnums=(0, 1),
    )
    eval_step = jax.jit(make_eval_step(graphdef, loss_fn), in_shardings=(param_shardings, token_sharding))

    def to_global(batch: np.ndarray) -> jax.Array:
        return jax.make_array_from_process_local_data(token_sharding, batch)

    def evaluate() -> float:
        losses = [float(eval_step(params, to_global(b))["ce"]) for b in heldout]
        return float(np.mean(losses))

    # Loop.
    tokens_per_step = tc.global_batch_size * config.data.seq_len
    progress = ProgressLogger(workdir, total_steps=tc.steps, start_step=start_step, tokens_per_step=tokens_per_step,
                              log_every=tc.log_every, is_main=jax.process_index() == 0)  # fmt: skip
    last_saved = start_step
    metrics = {}
    with jax.set_mesh(mesh):  # the context mesh of the expert-parallel MoE's shard_map
        try:
            for step in range(start_step + 1, tc.steps + 1):
                params, opt_state, metrics = train_step(params, opt_state, to_global(next(train_batches)))
                loss = float(metrics["loss"])
                if not np.isfinite(loss):
                    last_good = f"step {last_saved} in {checkpoints.directory}" if last_saved else "none (none saved)"
                    raise TrainError(
                        f"non-finite loss ({loss}) at step {step}; stopped without saving. "
                        f"The last good checkpoint is {last_good}"
                    )
                progress.train(step, metrics, float(schedule(step - 1)))
                if step % tc.eval_every == 0 or step == tc.steps:
                    progress.heldout(step, evaluate())
                if step % tc.checkpoint_every == 0 or step == tc.steps:
                    train_state = {
                        "step": step,
                        "seed": config.seed,
                        "data": train_batches.get_state(),
                        "config": config.to_json(),
                    }
                    checkpoints.save(
                        step, params, opt_state, cfg, json.loads(json.dumps(train_state, default=_json_default))
                    )
                    last_saved = step
        finally:
            checkpoints.wait_until_finished()
            checkpoints.close()
            progress.close()
    summary = progress.summary()
    if jax.process_index() == 0 and summary:
        entropy = data.unigram_entropy(data.token_stream(config.data, "heldout", tokenizer))
        summary["heldout_unigram_entropy"] = entropy
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        plot_loss_curves(progress.history_file, workdir / "loss_curve.png", {"held-out unigram entropy": entropy})
        log.info("done: %s", json.dumps(summary))
    return summary


def _json_default(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, bytes):
        return value.decode()
    raise TypeError(f"cannot serialise {type(value).__name__} in the train state")


def define_flags() -> None:
    """--config (the config file plus --config.key=value overrides) and --distributed."""
    config_flags.DEFINE_config_file("config", None, "Training config file (configs/<name>.py).", lock_config=True)
    flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first (multi-host TPU/GPU).")


def main(argv: list[str]) -> None:
    del argv
    cli.setup_logging()
    if flags.FLAGS.distributed:
        jax.distributed.initialize()
    try:
        run(flags.FLAGS.config)
    except (
        TrainError,
        ConfigError,
        data.DataError,
        CheckpointMismatchError,
        sharding.MeshError,
        FileNotFoundError,
    ) as error:
        log.error("error: %s", error)
        sys.exit(1)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
