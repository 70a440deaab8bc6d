"""One way to read a model from disk, whichever format it is in: an HF checkpoint directory
(config.json + safetensors) or one of our orbax checkpoints (`checkpoint.save_checkpoint`, or any
training step directory `checkpoints/<step>/`).

The config is readable alone, so callers check architecture, vocabulary and MTP depth before any
tensor is read. A path that holds no model raises FileNotFoundError, a damaged model one clear error
naming the file (`hf.CheckpointFileError`, `ConfigError`, `hf.CheckpointMismatchError`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, TypeVar

from slimqwen_jax import checkpoint, hf, storage
from slimqwen_jax.config import ConfigError, Qwen3NextConfig
from slimqwen_jax.model import Qwen3NextForCausalLM

T = TypeVar("T")


def is_hf_directory(path: str | os.PathLike) -> bool:
    """An HF checkpoint directory has a config.json; ours has a `config` orbax item instead."""
    return (storage.path(path) / "config.json").is_file()


def _require_model_directory(path: Path, role: str) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{role} {path} does not exist")
    if not path.is_dir():
        raise FileNotFoundError(f"{role} {path} is a file, not a model directory")
    if not is_hf_directory(path) and not (path / checkpoint.CONFIG_ITEM).exists():
        raise FileNotFoundError(
            f"{role} {path} is neither an HF checkpoint directory (no config.json) nor a slimqwen_jax checkpoint "
            f"(no '{checkpoint.CONFIG_ITEM}' item); for a training run, name a step directory checkpoints/<step>"
        )


def _read_checkpoint(read: Callable[[], T], path: Path, role: str, item: str) -> T:
    """`read()` of our checkpoint at `path`; the orbax / tensorstore / JSON errors of a damaged one
    become one CheckpointFileError naming the item."""
    try:
        return read()
    except (ConfigError, hf.CheckpointMismatchError):
        raise
    except Exception as error:  # noqa: BLE001  (whatever a damaged orbax item raises)
        # The first line, without tensorstore's "See full TensorStore details: <bound method ...>".
        reason = f"{type(error).__name__}: {error}".splitlines()[0].split(" See full")[0][:200]
        raise hf.CheckpointFileError(
            f"{role} {path}: its '{item}' item cannot be read ({reason}); the checkpoint is damaged: "
            "use another one (an earlier step) or write it again"
        ) from None


def load_model_config(path: str | os.PathLike, *, role: str = "model", **runtime) -> Qwen3NextConfig:
    """The config of the model at `path` (HF directory or our checkpoint), run-time fields from
    `runtime` (dtype, param_dtype, moe_backend, ...). Reads no tensor. `role` names the path in errors."""
    path = storage.path(path)
    _require_model_directory(path, role)
    if is_hf_directory(path):
        return hf.load_config(path, **runtime)
    return _read_checkpoint(
        lambda: checkpoint.load_checkpoint_config(path, **runtime), path, role, checkpoint.CONFIG_ITEM
    )


def load_model(path: str | os.PathLike, *, role: str = "model", **runtime) -> Qwen3NextForCausalLM:
    """The model at `path` (HF directory or our checkpoint) with its weights, run-time fields from
    `runtime`; `dtype` alone sets both the compute and the parameter dtype unless `param_dtype` is given."""
    path = storage.path(path)
    _require_model_directory(path, role)
    if "dtype" in runtime:
        runtime.setdefault("param_dtype", runtime["dtype"])
    if is_hf_directory(path):
        return hf.load_model(path, **runtime)
    load_model_config(path, role=role, **runtime)  # a damaged config item: named as such
    return _read_checkpoint(lambda: checkpoint.load_checkpoint(path, **runtime), path, role, checkpoint.PARAMS_ITEM)
