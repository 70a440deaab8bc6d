"""Training entry point: pretraining, or distillation from a frozen teacher (`config.teacher`).

    python -m slimqwen_jax.train --config configs/<name>.py [--config.key=value ...]

A run reads top to bottom: `plan_run` (every check of the config, the stages planned once) ->
`prepare_run` (mesh, data, teacher, optimizer) -> per stage: `stage_start` (resume, or start and
prune) -> `train_stage` (the stage's jitted functions, `stage_functions.build`, then the loop:
log, evaluate, checkpoint) -> the run's report. The objective (`losses.distillation_objective`)
sees both models' hidden states and applies the LM heads chunk by chunk. Resume order: the
workdir's own latest checkpoint, else `init_from` (an HF directory or one of our checkpoints),
else random init. Rerunning the same command resumes exactly, data order included.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
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

from slimqwen_jax import (
    cli,
    compile_plan,
    compression,
    data,
    loading,
    model_metrics,
    optimizer,
    run_config,
    sharding,
    stacking,
    stage_functions,
    stage_plan,
    storage,
)
from slimqwen_jax.checkpoint import TrainingCheckpoints
from slimqwen_jax.config import RUNTIME_FIELDS, ConfigError, Qwen3NextConfig
from slimqwen_jax.hf import CheckpointMismatchError
from slimqwen_jax.progress import HELDOUT_METRICS, ProgressLogger, plot_loss_curves, plot_runs
from slimqwen_jax.stage_functions import MtpUse, StageFunctions
from slimqwen_jax.train_state import (
    StageStart,
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


# ---------------------------------------------------------------------------- the plan
@dataclasses.dataclass(frozen=True)
class RunPlan:
    """A checked run config (its `baseline` resolved), the student's model config and the stages."""

    config: ml_collections.ConfigDict
    model_cfg: Qwen3NextConfig
    stages: list[stage_plan.Stage]


def plan_run(config: ml_collections.ConfigDict, architecture: Qwen3NextConfig | None = None) -> RunPlan:
    """Every check of `config` that needs no weights and no data (one ConfigError naming every
    problem), then its stages, planned once; `baseline` turned into the run it names. The
    `from_scratch` baseline trains `architecture`, else the final one of `baseline_from` (a finished
    run), else the planned one, which is refused when calibration statistics decide it."""
    config, stages = run_config.planned(config)
    if config.baseline == "from_scratch" and architecture is None:
        architecture = baseline_architecture(config, stages)
    if config.baseline:
        config = run_config.resolve_baseline(config, stages, architecture)
        if config.baseline == "from_scratch":  # one stage of the final architecture
            stages = stage_plan.plan_stages(config, run_config.model_config(config), storage.absolute(config.workdir))
    return RunPlan(config, run_config.model_config(config), stages)


def baseline_architecture(config: ml_collections.ConfigDict, stages: Sequence[stage_plan.Stage]
                          ) -> Qwen3NextConfig | None:  # fmt: skip
    """The architecture the `from_scratch` baseline of `config` trains: the final one of the finished
    run `baseline_from`, or None (the planned one) when no stage's layer choice needs statistics."""
    if config.baseline_from:
        return final_architecture(storage.path(config.baseline_from))
    chosen = run_config.depends_on_statistics(stages)
    if chosen:
        raise ConfigError(
            f"baseline from_scratch: the layers {', '.join(chosen)} remove are chosen from calibration statistics, "
            "so the pruned architecture is known only once those stages ran; run them first and set "
            "--config.baseline_from=<their workdir>"
        )
    return None


def final_summary(workdir: Path) -> dict:
    """The last stage's summary.json of a finished run (single-stage runs: the workdir's own)."""
    stages = sorted(workdir.glob("stage_*"), key=lambda p: int(p.name.split("_")[1]))
    summary = (stages[-1] if stages else workdir) / "summary.json"
    if not summary.exists():
        raise TrainError(f"{workdir} holds no finished run: {summary} does not exist")
    return json.loads(summary.read_text())


def final_architecture(workdir: Path) -> Qwen3NextConfig:
    """The architecture the finished run in `workdir` ended with."""
    return Qwen3NextConfig.from_dict(final_summary(workdir)["architecture"])


# ---------------------------------------------------------------------------- the teacher
@dataclasses.dataclass(frozen=True)
class Teacher:
    """The frozen teacher: graph definition and (sharded) parameters. It has no optimizer state and
    gets no gradient; the train step takes its parameters as an argument, never as a constant."""

    config: Qwen3NextConfig
    graphdef: nnx.GraphDef
    params: nnx.State | stacking.StackedState  # stacked with `scan_layers`

    @property
    def shardings(self):
        return jax.tree.map(lambda x: x.sharding, self.params)


def plan_teacher(config: ml_collections.ConfigDict, cfg: Qwen3NextConfig) -> tuple[Qwen3NextConfig | None, MtpUse]:
    """The teacher's config (read from disk, no tensors; None without a teacher), checked against the
    student's, and the run's MTP decision (`stage_functions.decide_mtp_use`)."""
    if not config.teacher:
        return None, stage_functions.decide_mtp_use(config.loss, cfg, None)
    runtime = {k: getattr(cfg, k) for k in RUNTIME_FIELDS if k not in ("dtype", "param_dtype")}
    dtype = config.loss.teacher_dtype
    teacher = loading.load_model_config(config.teacher, role="teacher", dtype=dtype, param_dtype=dtype, **runtime)
    problems, mtp = [], MtpUse()
    if teacher.vocab_size != cfg.vocab_size:
        problems.append(f"its vocab_size is {teacher.vocab_size}, the student's is {cfg.vocab_size}: they must match")
    try:
        mtp = stage_functions.decide_mtp_use(config.loss, cfg, teacher)
    except ConfigError as error:
        problems.append(str(error))
    if problems:
        raise TrainError(f"teacher {config.teacher} does not fit the student:\n  " + "\n  ".join(problems))
    return teacher, mtp


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


def check_init_from(config: ml_collections.ConfigDict, cfg: Qwen3NextConfig, first: stage_plan.Stage) -> None:
    """`init_from`, when the first stage will start from it (no checkpoint of its own yet), must
    exist and hold `cfg`'s architecture; its config alone is read."""
    if not config.init_from or TrainingCheckpoints(first.directory).latest_step() is not None:
        return
    problems = architecture_mismatch(cfg, loading.load_model_config(config.init_from, role="init_from"))
    if problems:
        raise TrainError(f"init_from {config.init_from} does not match config.model:\n  " + "\n  ".join(problems))


# ---------------------------------------------------------------------------- the shared parts
@dataclasses.dataclass
class RunContext:
    """What every stage of a run shares: the plan, mesh, data, teacher, MTP decision, optimizer."""

    plan: RunPlan
    mesh: jax.sharding.Mesh
    tokenizer: Any  # data.ByteTokenizer or data.HFTokenizer
    train_batches: Any
    heldout: list[np.ndarray]
    teacher: Teacher | None
    mtp: MtpUse
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    interrupts: InterruptRequests = dataclasses.field(default_factory=InterruptRequests)

    @property
    def config(self) -> ml_collections.ConfigDict:
        return self.plan.config

    @property
    def total_steps(self) -> int:
        return self.plan.stages[-1].end_step

    @property
    def teacher_params(self):
        return self.teacher.params if self.teacher else None

    @property
    def token_sharding(self):
        return sharding.batch_sharding(self.mesh, 2)

    def to_global(self, batch: np.ndarray) -> jax.Array:
        """The global train batch [B, L + 1] from this process's own rows [B / processes, L + 1]."""
        return jax.make_array_from_process_local_data(self.token_sharding, batch)

    def heldout_to_global(self, batch: np.ndarray) -> jax.Array:
        """A global held-out batch [B, L + 1] from the whole batch, which every process holds."""
        return jax.make_array_from_callback(batch.shape, self.token_sharding, lambda index: batch[index])


def prepare_run(plan: RunPlan) -> RunContext:
    """The checks that read the teacher's and init_from's configs and the data, then the shared parts
    of the run (mesh, data, teacher, optimizer). Nothing is written."""
    config, cfg, stages, tc = plan.config, plan.model_cfg, plan.stages, plan.config.train
    if tc.global_batch_size % (tc.grad_accum_steps * jax.process_count()):
        raise ConfigError("train.global_batch_size must be a multiple of train.grad_accum_steps x process count")
    teacher_cfg, mtp = plan_teacher(config, cfg)
    check_init_from(config, cfg, stages[0])
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
    tx, schedule = optimizer.make_optimizer(config.optimizer, total_steps, rewarmups)
    return RunContext(plan, mesh, tokenizer, train_batches, heldout, teacher, mtp, tx, schedule)


# ---------------------------------------------------------------------------- a stage's start
def stage_start(context: RunContext, stage: stage_plan.Stage, previous: stage_plan.Stage | None) -> StageStart:
    """Where `stage` starts or resumes: its own latest checkpoint; else the previous stage's last
    checkpoint (or, for the first stage, `init_from` or random init), pruned by the stage's spec."""
    config, cfg = context.config, context.plan.model_cfg
    checkpoints = TrainingCheckpoints(stage.directory)
    first = previous is None
    if checkpoints.latest_step() is not None:
        check_same_data_order(config, checkpoints)
        check_architecture = first and stage.spec.is_identity(cfg)
        return restore(checkpoints, context.tx, context.mesh, cfg, check_architecture=check_architecture)
    if first:
        start = initial_state(config, cfg, context.tx, context.mesh)
    else:
        previous_checkpoints = TrainingCheckpoints(previous.directory)
        start = restore(previous_checkpoints, context.tx, context.mesh, cfg, check_architecture=False)
        if start.state.step != previous.end_step:  # its last checkpoint was damaged and set aside
            raise TrainError(
                f"{previous.name} must end at step {previous.end_step} but its newest intact checkpoint is step "
                f"{start.state.step}; rerun the same command to redo {previous.name} from there"
            )
    if stage.spec.is_identity(start.model_cfg):
        return start
    return prune_start(context, stage, start)


def prune_start(context: RunContext, stage: stage_plan.Stage, start: StageStart) -> StageStart:
    """Calibrate the current student, prune its parameters and Adam moments with one decision, and
    place them on the mesh for the pruned architecture. Writes the stage's pruning report."""
    cfg, state = start.model_cfg, start.state
    model = nnx.merge(start.graphdef, state.params)
    config = context.config
    stats = compression.load_or_calibrate(
        calibration_file(config, stage), model, config.data, config.calibration, name=stage.name
    )
    decision = compression.decide(cfg, state.params, stage.spec, stats)
    params = compression.apply_decision(decision, state.params)
    opt_state = compression.prune_optimizer_state(decision, state.opt_state, context.tx)
    new_cfg = decision.target
    shapes = abstract_state(new_cfg, context.tx, context.mesh)
    params, opt_state = jax.device_put((params, opt_state), shapes.shardings)
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
    return StageStart(new_cfg, shapes.graphdef, pruned, shapes.shardings)


def calibration_file(config: ml_collections.ConfigDict, stage: stage_plan.Stage) -> Path:
    """Where `stage` reads or writes its calibration statistics: its own directory, or for the first
    stage of a run from `init_from` with `calibration.cache_dir`, that directory under a digest of
    what decides the statistics (the source, the calibration settings, the data but its order), so
    that runs pruning the same source share one calibration."""
    cache_dir = config.calibration.cache_dir
    if stage.index or not config.init_from or not cache_dir:
        return stage.directory / "calibration.npz"
    data_cfg = {k: v for k, v in config.data.to_dict().items() if k not in ("shuffle_seed", "cache_dir")}
    calibration = {k: v for k, v in config.calibration.to_dict().items() if k not in ("cache_dir", "log_every")}
    key = {"source": str(storage.absolute(config.init_from)), "calibration": calibration, "data": data_cfg}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return storage.path(cache_dir) / f"calibration-{digest}.npz"


def pruning_report(before: Qwen3NextConfig, after: Qwen3NextConfig, params_before, params_after, decision) -> str:
    """The architecture table (every field before / after, parameter counts) and the notes."""
    lines = [compression.architecture_table(before, after, params_before, params_after)]
    lines += [f"kept layers: {list(decision.kept_layers)}"]
    lines += [f"note: {note}" for note in decision.notes]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- a stage's loop
def stage_functions_for(context: RunContext, stage: stage_plan.Stage, start: StageStart, layout: stacking.Layout
                        ) -> StageFunctions:  # fmt: skip
    """`stage_functions.build` for `stage`, which `start` begins, in `layout`."""
    teacher = context.teacher
    weight_steps = stage_functions.weight_span(context.config.loss, context.total_steps, stage.start_step, stage.steps)
    return stage_functions.build(
        context.config, start.model_cfg, start.graphdef, context.tx, context.mesh,
        layout.stack_shardings(start.shardings), mtp=context.mtp, weight_steps=weight_steps,
        teacher_graphdef=teacher.graphdef if teacher else None,
        teacher_shardings=teacher.shardings if teacher else None,
    )  # fmt: skip


def evaluate_heldout(context: RunContext, fns: StageFunctions, params, step: int) -> dict[str, float]:
    """The objective's terms on the held-out batches, and the teacher-forced MTP acceptance."""
    batches = [context.heldout_to_global(b) for b in context.heldout]
    results = [fns.eval_step(params, context.teacher_params, b, step - 1) for b in batches]
    metrics = {k: float(np.mean([r[k] for r in results])) for k in HELDOUT_METRICS if k in results[0]}
    if fns.acceptance is not None:
        totals = None
        for batch in batches:
            totals = model_metrics.add_statistics(totals, fns.acceptance(params, batch))
        rates = model_metrics.summarize(totals)
        num_drafts = context.config.train.eval_mtp_drafts
        metrics.update({f"mtp_acc_{k}": rates[f"teacher_forced_acc_{k}"] for k in range(num_drafts)})  # k+1 drafts
    return metrics


def stop_error(checkpoints: TrainingCheckpoints, reason: str, advice: str, error: type[TrainError] = TrainError
               ) -> TrainError:  # fmt: skip
    """Why a stage stops, the last good checkpoint of `checkpoints` and what to do next, as one error."""
    return error(f"{reason}. The last good checkpoint is {checkpoints.last_complete()}: {advice}")


def finite_or_stop(values: dict[str, float], what: str, checkpoints: TrainingCheckpoints) -> None:
    """Raise TrainError, naming the last good checkpoint, when any of `values` is not finite."""
    if all(np.isfinite(v) for v in values.values()):
        return
    shown = ", ".join(f"{k} {v}" for k, v in values.items())
    raise stop_error(checkpoints, f"non-finite values {what} ({shown}); stopped without saving",
                     "lower the learning rate or tighten clip_norm, then rerun")  # fmt: skip


def train_stage(context: RunContext, stage: stage_plan.Stage, start: StageStart) -> dict:
    """Train the student from `start` to the end of `stage`, checkpointing into its directory;
    returns the stage's summary."""
    config, tc, cfg, state = context.config, context.config.train, start.model_cfg, start.state
    if state.data_state is not None:
        context.train_batches.set_state(state.data_state)
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    log.info("%s: %s parameters, %d layers, hidden %d, %d experts top-%d, steps %d-%d", stage.name,
             f"{num_params:,}", cfg.num_hidden_layers, cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok,
             stage.start_step + 1, stage.end_step)  # fmt: skip
    # The stage holds its parameters and Adam moments in the train step's layout (scanned layers
    # stacked, `stacking`; the per-layer arrays are dropped); checkpoints get the per-layer tree.
    layout = stacking.layout_for(state.params, cfg.scan_layers)
    state.params, state.opt_state = layout.stack_placed((state.params, state.opt_state), start.shardings)
    to_checkpoint_layout = jax.jit(stacking.unstack, out_shardings=start.shardings) if layout.num_blocks else None
    fns = stage_functions_for(context, stage, start, layout)
    teacher_params = context.teacher_params
    checkpoints = TrainingCheckpoints(stage.directory, max_to_keep=tc.keep_checkpoints)
    progress = ProgressLogger(stage.directory, total_steps=context.total_steps, start_step=state.step,
                              tokens_per_step=tc.global_batch_size * config.data.seq_len, log_every=tc.log_every,
                              is_main=jax.process_index() == 0, end_step=stage.end_step)  # fmt: skip

    def save(step: int) -> None:
        state.data_state = context.train_batches.get_state()
        train_state = {"step": step, "seed": config.seed, "data": state.data_state, "config": config.to_json()}
        train_state = json.loads(json.dumps(train_state, default=_json_default))
        tree = (state.params, state.opt_state)
        checkpoints.save(step, *(to_checkpoint_layout(tree) if to_checkpoint_layout else tree), cfg, train_state)

    with jax.set_mesh(context.mesh):  # the context mesh of the expert-parallel MoE's shard_map
        try:
            if tc.eval_at_start and state.step == stage.start_step:
                progress.heldout(state.step, evaluate_heldout(context, fns, state.params, state.step + 1))
            first_step = state.step + 1
            for step in range(first_step, stage.end_step + 1):
                local_batch = next(context.train_batches)  # [B / processes, L + 1]: this process's own rows
                if step == first_step:
                    log.info("process %d/%d reads its own shard of the train windows: first batch %s, rows %s",
                             jax.process_index(), jax.process_count(), list(local_batch.shape),
                             " ".join(data.row_digests(local_batch)))  # fmt: skip
                batch = context.to_global(local_batch)
                state.params, state.opt_state, metrics = fns.train_step(
                    state.params, state.opt_state, teacher_params, batch, step - 1
                )
                state.step = step
                # The loss is that of the parameters before the step, param_norm that of the updated
                # ones: a step whose update overflowed never becomes a checkpoint either.
                finite_or_stop({"loss": float(metrics["loss"]), "parameter norm": float(metrics["param_norm"])},
                               f"at step {step}", checkpoints)  # fmt: skip
                progress.train(step, metrics, float(context.schedule(step - 1)))
                if step % tc.eval_every == 0 or step == stage.end_step:
                    progress.heldout(step, evaluate_heldout(context, fns, state.params, step))
                if step % tc.checkpoint_every == 0 or step == stage.end_step:
                    # Only parameters whose own loss is finite become a checkpoint: an update can
                    # explode them while staying finite (the next step's loss would be the first sign).
                    probe = float(fns.eval_step(state.params, teacher_params, batch, step - 1)["loss"])
                    finite_or_stop({"loss": probe}, f"of the parameters updated at step {step}", checkpoints)
                    save(step)
                if context.interrupts.requested:
                    checkpoints.wait_until_finished()  # the checkpoint in flight becomes the one to resume from
                    raise stop_error(checkpoints, f"interrupted (Ctrl-C) after step {step}",
                                     "rerun the same command to resume", Interrupted)  # fmt: skip
            checkpoints.wait_until_finished()  # a failed write of the last save shows here
        except KeyboardInterrupt:
            raise stop_error(checkpoints, f"interrupted (Ctrl-C) after step {state.step}",
                             "rerun the same command to resume", Interrupted) from None  # fmt: skip
        except OSError as error:  # a full disk or a lost mount, in a save (orbax's writer threads) or a log file
            where = error.filename or stage.directory
            raise stop_error(checkpoints, f"cannot write {where}: {error.strerror or error}",
                             "free space (or fix the directory), then rerun the same command to resume") from error
        finally:
            checkpoints.close()
            progress.close()
    return write_stage_summary(context, stage, progress, cfg, num_params)


def write_stage_summary(context: RunContext, stage: stage_plan.Stage, progress: ProgressLogger,
                        cfg: Qwen3NextConfig, num_params: int) -> dict:  # fmt: skip
    """The stage's final metrics: summary.json and loss_curve.png in its directory (main process)."""
    summary = progress.summary()
    if jax.process_index() == 0 and summary:
        entropy = data.unigram_entropy(data.token_stream(context.config.data, "heldout", context.tokenizer))
        summary.update(heldout_unigram_entropy=entropy, parameters=num_params, architecture=cfg.architecture())
        (stage.directory / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        plot_loss_curves(
            progress.history_file, stage.directory / "loss_curve.png", {"held-out unigram entropy": entropy}
        )
        log.info("%s done: %s", stage.name, json.dumps({k: v for k, v in summary.items() if k != "architecture"}))
    return summary


# ---------------------------------------------------------------------------- the run
def run_stage(context: RunContext, stage: stage_plan.Stage, previous: stage_plan.Stage | None) -> dict:
    """Resume or start `stage` and train it to its end; returns its summary."""
    latest = TrainingCheckpoints(stage.directory).latest_step()
    if latest is not None and latest > stage.end_step:
        raise TrainError(
            f"{stage.directory} already holds step {latest}, past this run's last step {stage.end_step} "
            f"for {stage.name}; raise train.steps (or the stage's steps) to continue, or use another workdir"
        )
    start = stage_start(context, stage, previous)  # restores even a finished stage: damage shows here
    if start.state.step < stage.end_step:
        return train_stage(context, stage, start)
    log.info("%s: resumed at its last step %d; nothing left to do", stage.name, stage.end_step)
    summary_file = stage.directory / "summary.json"
    return json.loads(summary_file.read_text()) if summary_file.exists() else {}


def execute(plan: RunPlan) -> dict:
    """Run the stages of `plan` (see `run`); returns the last stage's final metrics."""
    context = prepare_run(plan)
    summaries, previous = [], None
    with context.interrupts.installed():
        for stage in plan.stages:
            summaries.append(run_stage(context, stage, previous))
            previous = stage
    if len(plan.stages) > 1 and jax.process_index() == 0:
        write_run_report(storage.absolute(plan.config.workdir), plan.stages, summaries)
    return summaries[-1]


def run(config: ml_collections.ConfigDict) -> dict:
    """Train (or distil, with `config.teacher`) as configured, in one stage or in the prune ->
    train stages of `config.stages`; returns the last stage's final metrics. With
    `config.dry_run`, prints the stages' plan from shapes alone instead.

    Raises one of RUN_ERRORS, before writing anything whenever the problem can be seen from the
    configs alone.
    """
    plan = plan_run(config)
    if plan.config.dry_run:
        return {"stages": dry_run(plan)}
    return execute(plan)


def dry_run(plan: RunPlan) -> list[dict]:
    """The plan's table (`stage_plan.print_plan`) without weights and, with `compile_topology`, each
    stage's train step compiled for that TPU slice (`compile_plan.compile_stages`; its rows join
    the stages' as `compiled`)."""
    config, cfg = plan.config, plan.model_cfg
    if config.compile_topology:
        config = compile_plan.on_topology(config, compile_plan.parse_topology(config.compile_topology))
    teacher = planned_teacher(config, cfg)
    rows = stage_plan.print_plan(config, cfg, plan.stages, teacher)
    if config.compile_topology:
        with_teacher = teacher if config.teacher else None
        mtp = stage_functions.decide_mtp_use(config.loss, cfg, with_teacher)
        for row, compiled in zip(rows, compile_plan.compile_stages(config, plan.stages, with_teacher, mtp)):
            row["compiled"] = compiled
    return rows


def planned_teacher(config: ml_collections.ConfigDict, cfg: Qwen3NextConfig) -> Qwen3NextConfig:
    """The teacher a dry run plans with: its config from its files, else (not at hand, or no teacher)
    the source `cfg`, in `loss.teacher_dtype` with the student's other run-time fields."""
    teacher = loading.load_model_config(config.teacher) if config.teacher and storage.path(config.teacher).exists() else cfg
    dtype = config.loss.teacher_dtype
    runtime = {k: getattr(cfg, k) for k in RUNTIME_FIELDS if k not in ("dtype", "param_dtype")}
    return teacher.replace(dtype=dtype, param_dtype=dtype, **runtime)


def write_run_report(workdir: Path, stages: Sequence[stage_plan.Stage], summaries: Sequence[dict]) -> None:
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
    fl = flags.FLAGS
    cli.start_tool(cpu_only=fl.config.dry_run)
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
