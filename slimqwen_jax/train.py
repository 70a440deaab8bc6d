"""Training entry point: pretraining, or distillation from a frozen teacher (`config.teacher`).

    python -m slimqwen_jax.train --config configs/<name>.py [--config.key=value ...]

The run reads top to bottom: checks (configs, teacher config) -> mesh -> data -> teacher ->
`TrainState` (init or restore) -> one jitted, donated train step -> loop (log, eval, checkpoint).
The objective (`losses.distillation_objective`) sees both models' hidden states and applies the LM
heads chunk by chunk. Resume order: the workdir's own latest checkpoint, else `init_from` (an HF
directory or one of our checkpoints), else random init. Rerunning the same command resumes
exactly, data order included.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from slimqwen_jax import cli, data, evaluation, loading, losses, pruning, sharding, stacking, steps
from slimqwen_jax import stages as stages_lib
from slimqwen_jax.checkpoint import TrainingCheckpoints
from slimqwen_jax.config import RUNTIME_FIELDS, ConfigError, Qwen3NextConfig
from slimqwen_jax.hf import CheckpointMismatchError
from slimqwen_jax.progress import HELDOUT_METRICS, ProgressLogger, plot_loss_curves, plot_runs
from slimqwen_jax.train_state import (
    TrainError,
    TrainState,
    abstract_state,
    architecture_mismatch,
    check_same_data_order,
    initial_state,
    restore,
)

log = logging.getLogger("slimqwen_jax.train")


class Interrupted(TrainError):
    """A Ctrl-C during a stage; the message names the checkpoint a rerun resumes from."""


class InterruptRequests:
    """Ctrl-C (SIGINT) while a run is installed: the first one is recorded, and the stage stops at
    its next step boundary once the checkpoint being written (if any) is complete; a second one
    raises KeyboardInterrupt at once. A KeyboardInterrupt raised wherever Python happens to be can
    land in a garbage-collection callback or a finalizer, where it is printed and lost."""

    def __init__(self):
        self.requested = False

    @contextlib.contextmanager
    def installed(self):
        """SIGINT handled by this object within the block (in the main thread; elsewhere as before)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(signal.SIGINT, self._handle)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("Ctrl-C: stopping after this step and the checkpoint being written; press again to stop at once")


# ---------------------------------------------------------------------------- configuration
def model_config(config: ml_collections.ConfigDict) -> Qwen3NextConfig:
    """The model config from `config.model` (fields of `Qwen3NextConfig.to_flag_dict`)."""
    return Qwen3NextConfig.from_dict(config.model.to_dict())


# ---------------------------------------------------------------------------- the teacher
@dataclasses.dataclass(frozen=True)
class Teacher:
    """The frozen teacher: graph definition and (sharded) parameters. It has no optimizer state and
    gets no gradient; the train step takes its parameters as an argument, never as a constant."""

    config: Qwen3NextConfig
    graphdef: nnx.GraphDef
    params: nnx.State | stacking.StackedState  # stacked with `scan_layers`


def targets_teacher_mtp(config: ml_collections.ConfigDict, cfg: Qwen3NextConfig) -> bool:
    """Whether the student's MTP terms are computed and MTP-KD targets the teacher's MTP head."""
    uses_mtp = cfg.num_mtp_layers > 0 and not losses.is_always_zero(config.loss.beta)
    return uses_mtp and config.loss.mtp_kd_target == "teacher_mtp"


def needs_teacher_mtp(config: ml_collections.ConfigDict, cfg: Qwen3NextConfig) -> bool:
    """Whether the loss needs the teacher's MTP module: MTP-KD from it with a nonzero weight."""
    return targets_teacher_mtp(config, cfg) and not losses.is_always_zero(config.loss.lam)


def teacher_mtp_available(config: ml_collections.ConfigDict, cfg: Qwen3NextConfig, teacher: Qwen3NextConfig) -> bool:
    """Whether to run the teacher's MTP module: it is targeted and as deep as the student's (with
    lam 0 throughout a shallower one is allowed; MTP-KD is then not reported)."""
    return targets_teacher_mtp(config, cfg) and teacher.num_mtp_layers >= cfg.num_mtp_layers


def teacher_config(config: ml_collections.ConfigDict, cfg: Qwen3NextConfig) -> Qwen3NextConfig | None:
    """The teacher's config (read from disk, no tensors), checked against the student's; None without one."""
    if not config.teacher:
        return None
    runtime = {k: getattr(cfg, k) for k in RUNTIME_FIELDS if k not in ("dtype", "param_dtype")}
    dtype = config.loss.teacher_dtype
    teacher = loading.load_model_config(config.teacher, role="teacher", dtype=dtype, param_dtype=dtype, **runtime)
    problems = []
    if teacher.vocab_size != cfg.vocab_size:
        problems.append(f"its vocab_size is {teacher.vocab_size}, the student's is {cfg.vocab_size}: they must match")
    if needs_teacher_mtp(config, cfg) and teacher.num_mtp_layers < cfg.num_mtp_layers:
        problems.append(
            f"loss.mtp_kd_target='teacher_mtp' needs a teacher MTP module of depth >= {cfg.num_mtp_layers}, "
            f"but it has {teacher.num_mtp_layers}: use --config.loss.mtp_kd_target=teacher_backbone"
        )
    if problems:
        raise TrainError(f"teacher {config.teacher} does not fit the student:\n  " + "\n  ".join(problems))
    return teacher


def load_teacher(config: ml_collections.ConfigDict, teacher_cfg: Qwen3NextConfig, mesh) -> Teacher:
    """Load the teacher in its own dtype and shard it by the same logical-axis rules as the student;
    with `scan_layers` its scanned layers are held stacked (`stacking`), as the student's are."""
    runtime = {k: getattr(teacher_cfg, k) for k in RUNTIME_FIELDS}
    model = loading.load_model(config.teacher, role="teacher", **runtime)
    graphdef, params = nnx.split(model, nnx.Param)
    shardings = sharding.state_shardings(params, mesh)
    params = jax.device_put(params, shardings)
    params = stacking.layout_for(params, teacher_cfg.scan_layers).stack_placed(params, shardings)
    num_params = sum(x.size for x in jax.tree.leaves(params))
    log.info("teacher %s: %s parameters in %s", config.teacher, f"{num_params:,}", teacher_cfg.param_dtype)
    return Teacher(teacher_cfg, graphdef, params)


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
    if opt.peak_lr > 0:  # the schedule's own check names the valid schedules
        try:
            steps.learning_rate_schedule(opt, 1)
        except ConfigError as error:
            problems.append(str(error))
    return problems


def check_run_config(config: ml_collections.ConfigDict) -> None:
    """Refuse, before any work, a run config whose problems need no model or data to see; one
    ConfigError names them all."""
    tc = config.train
    problems = losses.check_loss_config(config.loss, has_teacher=bool(config.teacher))
    positive = ("global_batch_size", "grad_accum_steps", "log_every", "eval_every", "eval_batches",
                "eval_batch_size", "checkpoint_every", "keep_checkpoints")  # fmt: skip
    problems += [f"train.{name} must be >= 1, got {tc[name]}" for name in positive if not tc[name] >= 1]
    if tc.eval_mtp_drafts < 0:
        problems.append(f"train.eval_mtp_drafts must be >= 0, got {tc.eval_mtp_drafts}")
    if not problems and tc.global_batch_size % (tc.grad_accum_steps * jax.process_count()):
        problems.append("train.global_batch_size must be a multiple of train.grad_accum_steps x process count")
    problems += optimizer_problems(config.optimizer)
    problems += [f"data: {problem}" for problem in data.data_config_problems(config.data)]
    workdir = Path(config.workdir)
    if workdir.exists() and not workdir.is_dir():
        problems.append(f"workdir {workdir} is a file, not a directory")
    if problems:
        raise ConfigError("bad run config:\n  " + "\n  ".join(problems))


def check_init_from(config: ml_collections.ConfigDict, cfg: Qwen3NextConfig, first: stages_lib.Stage) -> None:
    """`init_from`, when the first stage will start from it (no checkpoint of its own yet), must
    exist and hold `cfg`'s architecture; its config alone is read."""
    if not config.init_from or TrainingCheckpoints(first.directory).latest_step() is not None:
        return
    problems = architecture_mismatch(cfg, loading.load_model_config(config.init_from, role="init_from"))
    if problems:
        raise TrainError(f"init_from {config.init_from} does not match config.model:\n  " + "\n  ".join(problems))


# ---------------------------------------------------------------------------- the run
@dataclasses.dataclass
class Run:
    """What every stage of a run shares: configs, mesh, data, teacher, optimizer and schedules."""

    config: ml_collections.ConfigDict
    model_cfg: Qwen3NextConfig
    mesh: jax.sharding.Mesh
    tokenizer: Any  # data.ByteTokenizer or data.HFTokenizer
    train_batches: Any
    heldout: list[np.ndarray]
    teacher: Teacher | None
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    total_steps: int
    interrupts: InterruptRequests = dataclasses.field(default_factory=InterruptRequests)

    @property
    def token_sharding(self):
        return sharding.batch_sharding(self.mesh, 2)

    def to_global(self, batch: np.ndarray) -> jax.Array:
        """The global train batch [B, L + 1] from this process's own rows [B / processes, L + 1]."""
        return jax.make_array_from_process_local_data(self.token_sharding, batch)

    def heldout_to_global(self, batch: np.ndarray) -> jax.Array:
        """A global held-out batch [B, L + 1] from the whole batch, which every process holds."""
        return jax.make_array_from_callback(batch.shape, self.token_sharding, lambda index: batch[index])


def stage_start(run: Run, stage: stages_lib.Stage, previous: stages_lib.Stage | None):
    """(config, graphdef, state, shardings) where `stage` starts or resumes: its own latest
    checkpoint; else the previous stage's last checkpoint (or, for the first stage, `init_from` or
    random init), pruned by the stage's spec."""
    checkpoints = TrainingCheckpoints(stage.directory)
    first = previous is None
    if checkpoints.latest_step() is not None:
        check_same_data_order(run.config, checkpoints)
        return restore(
            checkpoints,
            run.tx,
            run.mesh,
            run.model_cfg,
            check_architecture=first and stage.spec.is_identity(run.model_cfg),
        )
    if first:
        start = initial_state(run.config, run.model_cfg, run.tx, run.mesh)
    else:
        start = restore(
            TrainingCheckpoints(previous.directory), run.tx, run.mesh, run.model_cfg, check_architecture=False
        )
        if start[2].step != previous.end_step:  # its last checkpoint was damaged and set aside
            raise TrainError(
                f"{previous.name} must end at step {previous.end_step} but its newest intact checkpoint is step "
                f"{start[2].step}; rerun the same command to redo {previous.name} from there"
            )
    if stage.spec.is_identity(start[0]):
        return start
    return prune_state(run, stage, *start)


def prune_state(run: Run, stage: stages_lib.Stage, cfg, graphdef, state: TrainState, shardings):
    """Calibrate the current student, prune its parameters and Adam moments with one decision, and
    place them on the mesh for the pruned architecture. Writes the stage's pruning report."""
    del shardings
    model = nnx.merge(graphdef, state.params)
    stats = pruning.load_or_calibrate(
        stage.directory / "calibration.npz", model, run.config.data, run.config.calibration, name=stage.name
    )
    decision = pruning.decide(cfg, state.params, stage.spec, stats)
    params = pruning.apply_decision(decision, state.params)
    opt_state = pruning.prune_optimizer_state(decision, state.opt_state, run.tx)
    new_cfg = decision.target
    new_graphdef, _, _, param_shardings, opt_shardings = abstract_state(new_cfg, run.tx, run.mesh)
    params, opt_state = jax.device_put((params, opt_state), (param_shardings, opt_shardings))
    report = pruning_report(cfg, new_cfg, state.params, params, decision)
    for note in decision.notes:
        log.info("%s: %s", stage.name, note)
    log.info("%s: pruned at step %d\n%s", stage.name, state.step, report)
    if jax.process_index() == 0:
        stage.directory.mkdir(parents=True, exist_ok=True)
        (stage.directory / "pruning.txt").write_text(report + "\n")
        summary = {"step": state.step, "spec": dataclasses.asdict(stage.spec), "before": cfg.to_dict(),
                   "after": new_cfg.to_dict(), "decision": decision.summary()}  # fmt: skip
        (stage.directory / "pruning.json").write_text(json.dumps(summary, indent=2, default=_json_default) + "\n")
    pruned = TrainState(state.step, params, opt_state, state.data_state)
    return new_cfg, new_graphdef, pruned, (param_shardings, opt_shardings)


def pruning_report(before: Qwen3NextConfig, after: Qwen3NextConfig, params_before, params_after, decision) -> str:
    """The architecture table (every field before / after, parameter counts) and the notes."""
    lines = [pruning.architecture_table(before, after, params_before, params_after)]
    lines += [f"kept layers: {list(decision.kept_layers)}"]
    lines += [f"note: {note}" for note in decision.notes]
    return "\n".join(lines)


def train_stage(run: Run, stage: stages_lib.Stage, cfg: Qwen3NextConfig, graphdef, state: TrainState, shardings):
    """Train the student from `state` to the end of `stage`, checkpointing into its directory."""
    config, tc, teacher = run.config, run.config.train, run.teacher
    if state.data_state is not None:
        run.train_batches.set_state(state.data_state)
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    log.info("%s: %s parameters, %d layers, hidden %d, %d experts top-%d, steps %d-%d", stage.name,
             f"{num_params:,}", cfg.num_hidden_layers, cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok,
             stage.start_step + 1, stage.end_step)  # fmt: skip

    loss_fn = steps.make_loss_fn(
        graphdef,
        steps.make_objective(config, cfg),
        with_mtp=not losses.is_always_zero(config.loss.beta),
        teacher_graphdef=teacher.graphdef if teacher else None,
        teacher_mtp=teacher is not None and teacher_mtp_available(config, cfg, teacher.config),
    )
    loss_weights = steps.loss_weights_fn(config.loss, run.total_steps)
    teacher_params = teacher.params if teacher else None
    teacher_shardings = jax.tree.map(lambda x: x.sharding, teacher_params)
    # The stage holds its parameters and Adam moments in the train step's layout (scanned layers
    # stacked, `stacking`; the per-layer arrays are dropped); checkpoints get the per-layer tree.
    layout = stacking.layout_for(state.params, cfg.scan_layers)
    state.params, state.opt_state = layout.stack_placed((state.params, state.opt_state), shardings)
    param_shardings, opt_shardings = layout.stack_shardings(shardings)
    to_checkpoint_layout = jax.jit(stacking.unstack, out_shardings=shardings) if layout.num_blocks else lambda t: t
    micro_sharding = jax.sharding.NamedSharding(
        run.mesh, jax.sharding.PartitionSpec(None, sharding.LOGICAL_RULES["batch"])
    )
    train_step = jax.jit(
        steps.make_train_step(loss_fn, run.tx, loss_weights, tc.grad_accum_steps, micro_sharding),
        in_shardings=(param_shardings, opt_shardings, teacher_shardings, run.token_sharding, None),
        out_shardings=(param_shardings, opt_shardings, None),
        donate_argnums=(0, 1),
    )
    eval_step = jax.jit(
        steps.make_eval_step(loss_fn, loss_weights),
        in_shardings=(param_shardings, teacher_shardings, run.token_sharding, None),
    )

    num_drafts = tc.eval_mtp_drafts if cfg.num_mtp_layers else 0
    acceptance_step = jax.jit(
        lambda params, tokens: evaluation.batch_statistics(
            nnx.merge(graphdef, stacking.unstack(params)),
            tokens,
            num_drafts=num_drafts,
            chunk_size=config.loss.chunk_size,
        ),
        in_shardings=(param_shardings, run.token_sharding),
    )

    def evaluate(step: int) -> dict[str, float]:
        """The objective's terms on the held-out batches, and the teacher-forced MTP acceptance."""
        batches = [run.heldout_to_global(b) for b in run.heldout]
        results = [eval_step(state.params, teacher_params, b, step - 1) for b in batches]
        metrics = {k: float(np.mean([r[k] for r in results])) for k in HELDOUT_METRICS if k in results[0]}
        if num_drafts:
            totals = None
            for batch in batches:
                totals = evaluation.add_statistics(totals, acceptance_step(state.params, batch))
            rates = evaluation.summarize(totals)
            metrics.update({f"mtp_acc_{j}": rates[f"teacher_forced_acc_{j}"] for j in range(1, num_drafts + 1)})
        return metrics

    checkpoints = TrainingCheckpoints(stage.directory, max_to_keep=tc.keep_checkpoints)
    tokens_per_step = tc.global_batch_size * config.data.seq_len
    progress = ProgressLogger(stage.directory, total_steps=run.total_steps, start_step=state.step,
                              tokens_per_step=tokens_per_step, log_every=tc.log_every,
                              is_main=jax.process_index() == 0, end_step=stage.end_step)  # fmt: skip

    def stop(reason: str, advice: str, error: type[TrainError] = TrainError):
        raise error(f"{reason}. The last good checkpoint is {checkpoints.last_complete()}: {advice}")

    with jax.set_mesh(run.mesh):  # the context mesh of the expert-parallel MoE's shard_map
        try:
            first_step = state.step + 1
            for step in range(first_step, stage.end_step + 1):
                local_batch = next(run.train_batches)  # [B / processes, L + 1]: this process's own rows
                if step == first_step:
                    log.info("process %d/%d reads its own shard of the train windows: first batch %s, rows %s",
                             jax.process_index(), jax.process_count(), list(local_batch.shape),
                             " ".join(data.row_digests(local_batch)))  # fmt: skip
                batch = run.to_global(local_batch)
                state.params, state.opt_state, metrics = train_step(
                    state.params, state.opt_state, teacher_params, batch, step - 1
                )
                state.step = step
                # The loss is that of the parameters before the step, param_norm that of the updated
                # ones: a step whose update overflowed never becomes a checkpoint either.
                loss, param_norm = float(metrics["loss"]), float(metrics["param_norm"])
                if not (np.isfinite(loss) and np.isfinite(param_norm)):
                    stop(f"non-finite values at step {step} (loss {loss}, parameter norm {param_norm}); stopped "
                         "without saving", "lower the learning rate or tighten clip_norm, then rerun")  # fmt: skip
                progress.train(step, metrics, float(run.schedule(step - 1)))
                if step % tc.eval_every == 0 or step == stage.end_step:
                    progress.heldout(step, evaluate(step))
                if step % tc.checkpoint_every == 0 or step == stage.end_step:
                    # Only parameters whose own loss is finite become a checkpoint: an update can
                    # explode them while staying finite (the next step's loss would be the first sign).
                    probe = float(eval_step(state.params, teacher_params, batch, step - 1)["loss"])
                    if not np.isfinite(probe):
                        stop(f"a non-finite loss ({probe}) of the parameters updated at step {step}; stopped "
                             "without saving", "lower the learning rate or tighten clip_norm, then rerun")  # fmt: skip
                    state.data_state = run.train_batches.get_state()
                    train_state = {"step": step, "seed": config.seed, "data": state.data_state,
                                   "config": config.to_json()}  # fmt: skip
                    train_state = json.loads(json.dumps(train_state, default=_json_default))
                    checkpoints.save(step, *to_checkpoint_layout((state.params, state.opt_state)), cfg, train_state)
                if run.interrupts.requested:
                    checkpoints.wait_until_finished()  # the checkpoint in flight becomes the one to resume from
                    stop(f"interrupted (Ctrl-C) after step {step}", "rerun the same command to resume", Interrupted)
            checkpoints.wait_until_finished()  # a failed write of the last save shows here
        except KeyboardInterrupt:
            stop(f"interrupted (Ctrl-C) after step {state.step}", "rerun the same command to resume", Interrupted)
        except OSError as error:  # a full disk or a lost mount, in a save (orbax's writer threads) or a log file
            stop(f"cannot write {error.filename or stage.directory}: {error.strerror or error}",
                 "free space (or fix the directory), then rerun the same command to resume")  # fmt: skip
        finally:
            checkpoints.close()
            progress.close()
    summary = progress.summary()
    if jax.process_index() == 0 and summary:
        entropy = data.unigram_entropy(data.token_stream(config.data, "heldout", run.tokenizer))
        summary.update(heldout_unigram_entropy=entropy, parameters=num_params, architecture=cfg.architecture())
        (stage.directory / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        plot_loss_curves(
            progress.history_file, stage.directory / "loss_curve.png", {"held-out unigram entropy": entropy}
        )
        log.info("%s done: %s", stage.name, json.dumps({k: v for k, v in summary.items() if k != "architecture"}))
    return summary


def prepare_run(config: ml_collections.ConfigDict) -> tuple[Run, list[stages_lib.Stage]]:
    """Every check, then the shared parts of the run (mesh, data, teacher, optimizer) and its
    stages. Nothing is written."""
    config = stages_lib.apply_baseline(config, model_config(config))
    cfg = model_config(config)
    check_run_config(config)
    teacher_cfg = teacher_config(config, cfg)
    stages = stages_lib.plan_stages(config, cfg, Path(config.workdir).absolute())
    check_init_from(config, cfg, stages[0])
    tc = config.train
    mesh = sharding.make_mesh(config.mesh)
    batch_devices = math.prod(mesh.shape[a] for a in sharding.LOGICAL_RULES["batch"])
    for name in ("global_batch_size", "eval_batch_size"):
        if tc[name] % batch_devices:
            raise ConfigError(
                f"train.{name} ({tc[name]}) must be a multiple of the mesh's {batch_devices} batch shards"
            )

    tokenizer = data.make_tokenizer(config.data.tokenizer)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ConfigError(f"tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is {cfg.vocab_size}")
    data.check_token_ids(config.data, cfg.vocab_size)
    train_batches = data.train_iterator(config.data, tokenizer, batch_size=tc.global_batch_size // jax.process_count())
    heldout = data.heldout_batches(config.data, tokenizer, batch_size=tc.eval_batch_size, num_batches=tc.eval_batches)

    teacher = load_teacher(config, teacher_cfg, mesh) if teacher_cfg is not None else None
    total_steps = stages[-1].end_step
    if config.optimizer.warmup_steps > total_steps:
        log.warning("optimizer.warmup_steps (%d) exceeds the run's %d steps: the learning rate never reaches "
                    "peak_lr", config.optimizer.warmup_steps, total_steps)  # fmt: skip
    rewarmups = [(stage.start_step, stage.warmup_steps) for stage in stages if stage.warmup_steps]
    tx, schedule = steps.make_optimizer(config.optimizer, total_steps, rewarmups)
    return Run(config, cfg, mesh, tokenizer, train_batches, heldout, teacher, tx, schedule, total_steps), stages


def run(config: ml_collections.ConfigDict) -> dict:
    """Train (or distil, with `config.teacher`) as configured, in one stage or in the prune ->
    train stages of `config.stages`; returns the last stage's final metrics. With
    `config.dry_run`, prints the stages' plan from shapes alone instead.

    Raises one of RUN_ERRORS, before writing anything whenever the problem can be seen from the
    configs alone.
    """
    if config.get("dry_run", False):
        return {"stages": dry_run(config)}
    run, stages = prepare_run(config)
    summaries, previous = [], None
    with run.interrupts.installed():
        for stage in stages:
            latest = TrainingCheckpoints(stage.directory).latest_step()
            if latest is not None and latest > stage.end_step:
                raise TrainError(
                    f"{stage.directory} already holds step {latest}, past this run's last step {stage.end_step} "
                    f"for {stage.name}; raise train.steps (or the stage's steps) to continue, or use another workdir"
                )
            start = stage_start(run, stage, previous)  # restores even a finished stage: damage shows here
            if start[2].step == stage.end_step:
                log.info("%s: resumed at its last step %d; nothing left to do", stage.name, stage.end_step)
                summary_file = stage.directory / "summary.json"
                summaries.append(json.loads(summary_file.read_text()) if summary_file.exists() else {})
            else:
                summaries.append(train_stage(run, stage, *start))
            previous = stage
    if len(stages) > 1 and jax.process_index() == 0:
        write_run_report(Path(run.config.workdir).absolute(), stages, summaries)
    return summaries[-1]


def dry_run(config: ml_collections.ConfigDict) -> list[dict]:
    """The plan of a run (`stages.dry_run`) without weights. Without the teacher's files at hand,
    the teacher is taken to be the source (the student starts as the teacher)."""
    config = stages_lib.apply_baseline(config, model_config(config))
    cfg = model_config(config)
    check_run_config(config)
    teacher = loading.load_model_config(config.teacher) if config.teacher and Path(config.teacher).exists() else cfg
    dtype = config.loss.teacher_dtype
    return stages_lib.dry_run(config, cfg, teacher.replace(dtype=dtype, param_dtype=dtype))


def write_run_report(workdir: Path, stages: Sequence[stages_lib.Stage], summaries: Sequence[dict]) -> None:
    """workdir/summary.json (each stage's final metrics) and loss_curve.png (held-out CE across stages)."""
    report = {stage.name: summary for stage, summary in zip(stages, summaries)}
    (workdir / "summary.json").write_text(json.dumps(report, indent=2) + "\n")
    histories = {stage.name: stage.directory / "metrics.jsonl" for stage in stages}
    plot_runs(histories, workdir / "loss_curve.png", "heldout/ce", "held-out CE across the stages")
    log.info("done: %d stages; %s", len(stages), workdir / "summary.json")


# What a run refuses with one line and exit code 1 (anything else is a bug: a traceback).
RUN_ERRORS = (TrainError, ConfigError, data.DataError, CheckpointMismatchError, sharding.MeshError, FileNotFoundError)


def _json_default(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, bytes):
        return value.decode()
    raise TypeError(f"cannot serialise {type(value).__name__} in the train state")


def define_flags() -> None:
    """--config (the config file plus --config.key=value overrides) and the multi-process flags."""
    config_flags.DEFINE_config_file("config", None, "Training config file (configs/<name>.py).", lock_config=True)
    flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first (multi-host TPU/GPU/CPU).")
    flags.DEFINE_string("coordinator_address", None, "With --distributed: host:port of process 0 (default: detected).")
    flags.DEFINE_integer("num_processes", None, "With --distributed: the number of processes (default: detected).")
    flags.DEFINE_integer("process_id", None, "With --distributed: this process's index (default: detected).")


def initialize_distributed(
    distributed: bool, coordinator_address: str | None, num_processes: int | None, process_id: int | None
) -> None:
    """`jax.distributed.initialize` with the given coordinator, process count and index; any left
    unset are detected from the environment (TPU pods, SLURM, ...). Raises TrainError for explicit
    settings without --distributed, or an index outside [0, num_processes)."""
    explicit = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
    given = [f"--{name}" for name, value in explicit.items() if value is not None]
    if not distributed:
        if given:
            raise TrainError(f"{', '.join(given)}: only with --distributed (add it, or drop these flags)")
        return
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise TrainError(f"--process_id must be in [0, --num_processes={num_processes}), got {process_id}")
    jax.distributed.initialize(**explicit)
    log.info("process %d of %d, %d local devices of %d", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())  # fmt: skip


def main(argv: list[str]) -> None:
    del argv
    cli.start_tool()
    fl = flags.FLAGS
    try:
        initialize_distributed(fl.distributed, fl.coordinator_address, fl.num_processes, fl.process_id)
        run(fl.config)
    except Interrupted as error:
        log.error("error: %s", error)
        abandon_background_threads()
    except RUN_ERRORS as error:
        log.error("error: %s", error)
        sys.exit(1)
    except KeyboardInterrupt:  # outside a stage's loop, which names the last good checkpoint itself
        log.error("error: interrupted (Ctrl-C); rerun the same command to resume from the last checkpoint")
        abandon_background_threads()


def abandon_background_threads() -> None:
    """Exit 1 now, after a Ctrl-C: orbax's writer threads may still post to event loops the
    interrupt closed, and each would print a traceback at interpreter shutdown. What is on disk is
    already complete or left in a temporary directory that a resume ignores."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
