"""Our own model checkpoints: orbax-written parameters with the model config stored beside them.

A checkpoint directory holds two orbax items: `params` (the nnx.Param state) and `config` (the
model config as JSON). The training loop's CheckpointManager writes the same two items per step
(plus optimizer and data state), so every tool can read a model back with `load_checkpoint`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from slimqwen_jax import storage
from slimqwen_jax.config import Qwen3NextConfig
from slimqwen_jax.model import Qwen3NextForCausalLM, abstract_model

log = logging.getLogger("slimqwen_jax.checkpoint")

PARAMS_ITEM = "params"
CONFIG_ITEM = "config"


def _checkpointer() -> ocp.Checkpointer:
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def save_checkpoint(model: Qwen3NextForCausalLM, directory: str | os.PathLike) -> Path:
    """Write the model's parameters and config to `directory` (which must not exist yet).

    Orbax writes to a temporary directory and renames it when complete, so an interrupted save
    leaves no half-written checkpoint.
    """
    directory = storage.absolute(directory)
    if directory.exists():
        raise FileExistsError(f"{directory} already exists; refusing to overwrite a checkpoint")
    _checkpointer().save(
        directory,
        args=ocp.args.Composite(
            **{
                PARAMS_ITEM: ocp.args.StandardSave(nnx.state(model, nnx.Param)),
                CONFIG_ITEM: ocp.args.JsonSave(model.config.to_dict()),
            }
        ),
    )
    return directory


def load_checkpoint_config(directory: str | os.PathLike, **runtime) -> Qwen3NextConfig:
    """The model config stored in a checkpoint, with run-time fields overridden by `runtime`."""
    directory = storage.absolute(directory)
    if not (directory / CONFIG_ITEM).exists():
        raise FileNotFoundError(f"{directory} is not a slimqwen_jax checkpoint (no '{CONFIG_ITEM}' item)")
    restored = _checkpointer().restore(directory, args=ocp.args.Composite(**{CONFIG_ITEM: ocp.args.JsonRestore()}))
    return Qwen3NextConfig.from_dict({**restored[CONFIG_ITEM], **runtime})


def load_checkpoint(directory: str | os.PathLike, **runtime) -> Qwen3NextForCausalLM:
    """Restore a model written by `save_checkpoint` (or a training checkpoint step directory),
    sharded as saved when these are the devices that saved it, else (another mesh or number of
    processes) on this process's first device."""
    directory = storage.absolute(directory)
    cfg = load_checkpoint_config(directory, **runtime)
    graphdef, params = abstract_model(cfg)
    target = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), params)
    first_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    restored = _checkpointer().restore(
        directory,
        args=ocp.args.Composite(**{PARAMS_ITEM: ocp.args.StandardRestore(target, fallback_sharding=first_device)}),
    )
    nnx.replace_by_pure_dict(params, restored[PARAMS_ITEM].to_pure_dict())
    return nnx.merge(graphdef, params)


def sync_processes(name: str) -> None:
    """A barrier across processes (every process must call it with the same `name`); free with one."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def on_every_process(ok: bool) -> bool:
    """Whether `ok` holds on every process (collective); `ok` itself with one process."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


class _OrbaxTracebacksReportedByCaller(logging.Filter):
    """Drops orbax's log records that carry a traceback: orbax logs a failed background write in
    each of its threads, and the same error reaches the caller (`wait_until_finished`, `save`,
    `restore`), which reports it once."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and f"{os.sep}orbax{os.sep}" in record.pathname)


_ORBAX_TRACEBACKS = _OrbaxTracebacksReportedByCaller()


class TrainingCheckpoints:
    """Step checkpoints of a training run in `<workdir>/checkpoints/<step>/`.

    Items: `params` and `config` (as in `save_checkpoint`, so `load_checkpoint` reads any step
    directory), `opt_state`, and `train_state` (JSON: step, seed, data iterator state, run config).
    Saves are asynchronous and atomic: a run killed mid-save resumes from the previous step.
    """

    def __init__(self, workdir: str | os.PathLike, max_to_keep: int | None = 3):
        self.directory = storage.absolute(workdir) / "checkpoints"
        logging.getLogger("absl").addFilter(_ORBAX_TRACEBACKS)  # orbax logs through absl
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=False, cleanup_tmp_directories=True),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def set_aside_damaged(self, step: int, error: BaseException) -> Path:
        """Move a damaged step directory to `<step>.damaged` (or `.damaged.1`, ...): kept for
        inspection, out of the way of resume and of the save that will redo that step."""
        source = self.step_directory(step)
        target = source.with_name(f"{step}.damaged")
        suffix = 0
        while target.exists():
            suffix += 1
            target = source.with_name(f"{step}.damaged.{suffix}")
        sync_processes(f"chose where to set aside checkpoint {step}")  # every process, the same target
        if jax.process_index() == 0:
            source.rename(target)
        sync_processes(f"set aside checkpoint {step}")
        self._manager.reload()
        reason = f"{type(error).__name__}: {error}".splitlines()[0][:300]
        log.warning("checkpoint step %d is damaged (%s); moved it to %s, trying the one before", step, reason, target)
        return target

    def run_config(self, step: int) -> dict | None:
        """The run config a step was saved with (its train_state JSON), None if unreadable."""
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(train_state=ocp.args.JsonRestore()))
            return json.loads(restored["train_state"]["config"])
        except Exception:  # noqa: BLE001  (a damaged step: `restore` in the trainer sets it aside)
            return None

    def step_directory(self, step: int) -> Path:
        return self.directory / str(step)

    def model_config(self, step: int) -> Qwen3NextConfig:
        return load_checkpoint_config(self.step_directory(step))

    def save(self, step: int, params, opt_state, model_config: Qwen3NextConfig, train_state: dict) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._manager.save(
            step,
            args=ocp.args.Composite(
                **{
                    PARAMS_ITEM: ocp.args.StandardSave(params),
                    CONFIG_ITEM: ocp.args.JsonSave(model_config.to_dict()),
                    "opt_state": ocp.args.StandardSave(opt_state),
                    "train_state": ocp.args.JsonSave(train_state),
                }
            ),
        )

    def restore(self, step: int, abstract_params, abstract_opt_state):
        """(params, opt_state, train_state) of `step`, placed like the abstract targets."""
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                **{
                    PARAMS_ITEM: ocp.args.StandardRestore(abstract_params),
                    "opt_state": ocp.args.StandardRestore(abstract_opt_state),
                    "train_state": ocp.args.JsonRestore(),
                }
            ),
        )
        return restored[PARAMS_ITEM], restored["opt_state"], restored["train_state"]

    def wait_until_finished(self) -> None:
        """Wait for the save in flight; raises its error (OSError for a full disk, ...)."""
        self._manager.wait_until_finished()

    def last_complete(self) -> str:
        """Where a rerun resumes: the newest complete step directory, once the save in flight (if
        any) has ended. For messages about a run that stops: that save's own error is not raised."""
        with contextlib.suppress(Exception):
            self._manager.wait_until_finished()
        self._manager.reload()
        latest = self._manager.latest_step()
        return str(self.step_directory(latest)) if latest is not None else f"none in {self.directory}"

    def close(self) -> None:
        """Close the manager; a failed save has raised from `wait_until_finished` already."""
        with contextlib.suppress(Exception):
            self._manager.close()
