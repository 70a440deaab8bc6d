"""What a training run resumes from and how it gets there: `TrainState`, its abstract (sharded)
shapes, a fresh start (`init_from` or a seeded random init) and the restore of the newest intact
checkpoint, with the checks a resume must pass (same architecture, same data order)."""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import jax
import ml_collections
import optax
from flax import nnx

from slimqwen_jax import loading, sharding
from slimqwen_jax.checkpoint import TrainingCheckpoints, on_every_process
from slimqwen_jax.config import RUNTIME_FIELDS, Qwen3NextConfig
from slimqwen_jax.layers import InitKeys
from slimqwen_jax.model import Qwen3NextForCausalLM, abstract_model

log = logging.getLogger("slimqwen_jax.train")

# Fields that do not change the parameters or the function the model computes.
NON_ARCHITECTURE_FIELDS = ("initializer_range", "router_aux_loss_coef", "max_position_embeddings")


class TrainError(RuntimeError):
    """A run that cannot start or must stop; the message says why and what was kept."""


def architecture_mismatch(expected: Qwen3NextConfig, found: Qwen3NextConfig) -> list[str]:
    """Human-readable differences between two configs' architectures."""
    a, b = expected.architecture(), found.architecture()
    return [f"{k}: expected {a[k]!r}, found {b[k]!r}" for k in a if k not in NON_ARCHITECTURE_FIELDS and a[k] != b[k]]


@dataclasses.dataclass
class TrainState:
    """What a run resumes from: the global step, parameters, optimizer state, data iterator state.
    During a stage's loop, parameters and optimizer state are in the train step's layout (`stacking`)."""

    step: int
    params: nnx.State
    opt_state: optax.OptState
    data_state: dict | None = None


@dataclasses.dataclass(frozen=True)
class AbstractState:
    """The shapes of a student's state on a mesh: graph definition, abstract (sharded
    ShapeDtypeStruct) parameters and optimizer state, and their shardings."""

    graphdef: nnx.GraphDef
    params: Any
    opt_state: Any
    param_shardings: Any
    opt_shardings: Any

    @property
    def shardings(self) -> tuple[Any, Any]:
        return self.param_shardings, self.opt_shardings


@dataclasses.dataclass
class StageStart:
    """Where a stage starts or resumes: the student's model config, graph definition, state and its
    (parameter, optimizer-state) shardings in the per-layer layout."""

    model_cfg: Qwen3NextConfig
    graphdef: nnx.GraphDef
    state: TrainState
    shardings: tuple[Any, Any]


def abstract_state(cfg: Qwen3NextConfig, tx, mesh) -> AbstractState:
    """The `AbstractState` of the model `cfg` with optimizer `tx` on `mesh`."""
    graphdef, params = abstract_model(cfg)
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
    return AbstractState(graphdef, abstract_params, abstract_opt, param_shardings, opt_shardings)


def initial_params(cfg: Qwen3NextConfig, init_from: str, seed: int, param_shardings):
    """Parameters from `init_from` (HF directory or our checkpoint, checked by `check_init_from`)
    or a seeded random init."""
    if not init_from:
        init = lambda: nnx.state(Qwen3NextForCausalLM(cfg, rngs=InitKeys(seed)), nnx.Param)  # noqa: E731
        return jax.jit(init, out_shardings=param_shardings)()
    model = loading.load_model(init_from, role="init_from", **{k: getattr(cfg, k) for k in RUNTIME_FIELDS})
    return jax.device_put(nnx.state(model, nnx.Param), param_shardings)


def restore(checkpoints: TrainingCheckpoints, tx, mesh, model_cfg: Qwen3NextConfig, *, check_architecture: bool
            ) -> StageStart:  # fmt: skip
    """The `StageStart` of the newest intact checkpoint in `checkpoints`, with the run's run-time
    fields (`model_cfg`: dtypes, kernels). A damaged checkpoint (unreadable
    config, metadata or arrays) is moved aside as `<step>.damaged`, never deleted, and the next
    older one is tried. With `check_architecture` the stored architecture must be `model_cfg`'s (a
    workdir of another model is refused, never touched); otherwise it is whatever the checkpoint
    holds (a stage after pruning)."""
    for step in sorted(checkpoints.all_steps(), reverse=True):
        try:
            stored = checkpoints.model_config(step)
        except Exception as error:  # noqa: BLE001  (any damage: JSON, tensorstore, missing items)
            checkpoints.set_aside_damaged(step, error)
            continue
        problems = architecture_mismatch(model_cfg, stored) if check_architecture else []
        if problems:
            raise TrainError(
                f"{checkpoints.directory.parent} holds a checkpoint of a different architecture (step {step}); "
                "refusing to touch it. Use another workdir or the matching config:\n  " + "\n  ".join(problems)
            )
        cfg = stored.replace(**{k: getattr(model_cfg, k) for k in RUNTIME_FIELDS})
        shapes = abstract_state(cfg, tx, mesh)
        try:
            params, opt_state, saved = checkpoints.restore(step, shapes.params, shapes.opt_state)
            error = None
        except Exception as exception:  # noqa: BLE001
            error = exception
        # Each process reads its own shards: a damaged one may show on one process only.
        if not on_every_process(error is None):
            checkpoints.set_aside_damaged(step, error or RuntimeError("unreadable on another process"))
            continue
        log.info("resumed from %s at step %d", checkpoints.step_directory(step), step)
        return StageStart(cfg, shapes.graphdef, TrainState(step, params, opt_state, saved["data"]), shapes.shardings)
    raise TrainError(
        f"no intact checkpoint left in {checkpoints.directory} (the damaged ones are kept as <step>.damaged); "
        "move the workdir away to start over"
    )


# Run-config fields that fix the order of the training data: a resume must not change them.
DATA_ORDER_FIELDS = ("data.source", "data.paths", "data.tokenizer", "data.seq_len", "data.shuffle_seed",
                     "train.global_batch_size")  # fmt: skip


def check_same_data_order(config: ml_collections.ConfigDict, checkpoints: TrainingCheckpoints) -> None:
    """Refuse to resume with settings that change the data order the checkpoint continues."""
    saved = checkpoints.run_config(checkpoints.latest_step())
    if saved is None:
        return

    def value(tree, path):
        for part in path.split("."):
            tree = tree.get(part) if isinstance(tree, dict) else None
        return tree

    current = json.loads(config.to_json())
    changed = [f"{path}: {value(saved, path)!r} -> {value(current, path)!r}" for path in DATA_ORDER_FIELDS
               if value(saved, path) != value(current, path)]  # fmt: skip
    if changed:
        raise TrainError(
            f"{checkpoints.directory} was written with another data order; resuming would not continue it:\n  "
            + "\n  ".join(changed)
            + "\nUse the original values, or another workdir for the new ones"
        )


def initial_state(config: ml_collections.ConfigDict, cfg: Qwen3NextConfig, tx, mesh) -> StageStart:
    """The `StageStart` at step 0: `init_from`, else a seeded random init."""
    shapes = abstract_state(cfg, tx, mesh)
    params = initial_params(cfg, config.init_from, config.seed, shapes.param_shardings)
    opt_state = jax.jit(tx.init, out_shardings=shapes.opt_shardings)(params)
    log.info("started from %s", config.init_from or f"random init (seed {config.seed})")
    return StageStart(cfg, shapes.graphdef, TrainState(0, params, opt_state), shapes.shardings)
