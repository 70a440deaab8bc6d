"""Our own model checkpoints: orbax-written parameters with the model config stored beside them.

A checkpoint directory holds two orbax items: `params` (the nnx.Param state) and `config` (the
model config as JSON). The training loop's CheckpointManager writes the same two items per step
(plus optimizer and data state), so every tool can read a model back with `load_checkpoint`.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from slimqwen_jax.config import Qwen3NextConfig
from slimqwen_jax.model import Qwen3NextForCausalLM

PARAMS_ITEM = "params"
CONFIG_ITEM = "config"


def _checkpointer() -> ocp.Checkpointer:
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def save_checkpoint(model: Qwen3NextForCausalLM, directory: str | os.PathLike) -> Path:
    """Write the model's parameters and config to `directory` (which must not exist yet).

    Orbax writes to a temporary directory and renames it when complete, so an interrupted save
    leaves no half-written checkpoint.
    """
    directory = Path(directory).absolute()
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
    directory = Path(directory).absolute()
    if not (directory / CONFIG_ITEM).exists():
        raise FileNotFoundError(f"{directory} is not a slimqwen_jax checkpoint (no '{CONFIG_ITEM}' item)")
    restored = _checkpointer().restore(directory, args=ocp.args.Composite(**{CONFIG_ITEM: ocp.args.JsonRestore()}))
    return Qwen3NextConfig.from_dict({**restored[CONFIG_ITEM], **runtime})


def load_checkpoint(directory: str | os.PathLike, **runtime) -> Qwen3NextForCausalLM:
    """Restore a model written by `save_checkpoint` (or a training checkpoint step directory)."""
    directory = Path(directory).absolute()
    cfg = load_checkpoint_config(directory, **runtime)
    abstract = nnx.eval_shape(lambda: Qwen3NextForCausalLM(cfg, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    target = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), nnx.state(abstract, nnx.Param))
    restored = _checkpointer().restore(
        directory, args=ocp.args.Composite(**{PARAMS_ITEM: ocp.args.StandardRestore(target)})
    )
    nnx.replace_by_pure_dict(abstract_state, restored[PARAMS_ITEM].to_pure_dict())
    return nnx.merge(graphdef, abstract_state)
