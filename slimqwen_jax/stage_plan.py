"""Planning of a progressive prune -> distill run (docs/method.md section 5): each stage's global
step range, directory and architecture, checked on abstract parameters before any work.

`config.stages` is a list of `run_config.stage_section` entries; each has a pruning spec (`depth`,
`width`, `experts`; all-zero keeps the model) applied to the current student before the stage
trains, and a budget in `steps` (or `tokens`, rounded up to whole steps). `warmup_steps` > 0
re-warms the learning rate at the start of the stage; otherwise the learning-rate, lam and beta
schedules run on the global step across stages. An empty list is one stage of `train.steps` that
keeps the model. The schedule presets that build the list live in `run_config`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from slimqwen_jax import sharding
from slimqwen_jax.compression import PruneSpec, PruningError, abstract_params, count_parameters, decide, format_count
from slimqwen_jax.config import ConfigError, Qwen3NextConfig


# ---------------------------------------------------------------------------- planning
@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of a run: its pruning spec, the global steps it trains (start_step, end_step]
    (1-based, as logged), where it writes, and the architecture it trains (exact shapes; with depth
    `similarity` the layer choice is a placeholder until the stage calibrates)."""

    index: int
    spec: PruneSpec
    start_step: int
    end_step: int
    warmup_steps: int
    directory: Path
    architecture: Qwen3NextConfig

    @property
    def name(self) -> str:
        return f"stage_{self.index + 1}"

    @property
    def steps(self) -> int:
        return self.end_step - self.start_step


def stage_steps(stage: ml_collections.ConfigDict, tokens_per_step: int) -> int:
    """A stage's budget in optimizer steps: `steps`, or `tokens` rounded up to whole steps."""
    return int(stage.steps) if stage.steps else -(-int(stage.tokens) // tokens_per_step)


def _growth(before: Qwen3NextConfig, after: Qwen3NextConfig) -> list[str]:
    fields = ("num_hidden_layers", "hidden_size", "num_experts", "num_experts_per_tok")
    return [f"{f} grows from {getattr(before, f)} to {getattr(after, f)}" for f in fields
            if getattr(after, f) > getattr(before, f)]  # fmt: skip


def plan(config: ml_collections.ConfigDict, source: Qwen3NextConfig, workdir: Path) -> tuple[list[Stage], list[str]]:
    """The run's stages, each checked on abstract parameters against the model it will meet, and
    every problem of every stage (a spec that does not fit the model of that stage, a zero budget, a
    stage that grows the model, a `train.steps` that disagrees with their sum)."""
    tokens_per_step = config.train.global_batch_size * config.data.seq_len
    if not config.stages:
        steps = int(config.train.steps)
        problems = [] if steps > 0 else [f"train.steps must be > 0, got {steps}"]
        return [Stage(0, PruneSpec(), 0, max(steps, 0), 0, workdir, source)], problems
    problems, stages, cfg, step = [], [], source, 0
    for i, entry in enumerate(config.stages):
        name = f"stages[{i}]"
        try:
            spec = PruneSpec.from_config(entry)
        except TypeError as error:
            problems.append(f"{name}: {error}")
            continue
        steps = stage_steps(entry, tokens_per_step)
        if steps <= 0:
            problems.append(f"{name}: the budget is zero (set steps > 0 or tokens > 0)")
        if entry.warmup_steps < 0:
            problems.append(f"{name}: warmup_steps must be >= 0, got {entry.warmup_steps}")
        try:
            target = decide(cfg, abstract_params(cfg), spec).target
        except PruningError as error:
            problems.append(f"{name} does not fit the model it prunes ({_summary(cfg)}): {error}")
            continue
        problems += [f"{name}: {growth}" for growth in _growth(cfg, target)]
        stages.append(
            Stage(i, spec, step, step + max(steps, 0), int(entry.warmup_steps), workdir / f"stage_{i + 1}", target)
        )
        cfg, step = target, step + max(steps, 0)
    train_steps = int(config.train.steps)
    if not problems and train_steps not in (0, step):
        problems.append(f"train.steps is {train_steps} but the stages add up to {step}; set it to 0 (derived)")
    return stages, problems


def plan_stages(config: ml_collections.ConfigDict, source: Qwen3NextConfig, workdir: Path) -> list[Stage]:
    """`plan`'s stages; raises one ConfigError naming every problem."""
    stages, problems = plan(config, source, workdir)
    if problems:
        raise ConfigError("bad stages:\n  " + "\n  ".join(problems))
    return stages


def _summary(cfg: Qwen3NextConfig) -> str:
    return (f"{cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.num_experts} experts "
            f"top-{cfg.num_experts_per_tok}")  # fmt: skip


def describe(stages: Sequence[Stage], tokens_per_step: int) -> list[dict]:
    """Per stage: architecture summary, total / active parameters (backbone; MTP apart), steps, tokens."""
    rows = []
    for stage in stages:
        count = count_parameters(stage.architecture)
        rows.append(
            dict(stage=stage.name, architecture=_summary(stage.architecture), total=count.total, active=count.active,
                 mtp_total=count.mtp_total, steps=stage.steps, tokens=stage.steps * tokens_per_step,
                 start_step=stage.start_step, end_step=stage.end_step)
        )  # fmt: skip
    return rows


# ---------------------------------------------------------------------------- dry run
def per_device_bytes(cfg: Qwen3NextConfig, mesh: jax.sharding.AbstractMesh, copies: int = 1) -> int:
    """Bytes of `copies` parameter-shaped trees of the model `cfg` on one device of `mesh`, each
    parameter split as the logical-axis rules shard it (`sharding.logical_to_spec`)."""
    total = 0
    for path, variable in nnx.to_flat_state(abstract_params(cfg)):
        axes = variable.get_metadata().get("logical_axes") or (None,) * len(variable.shape)
        spec = sharding.logical_to_spec(axes, variable.shape, mesh, ".".join(map(str, path)))
        parts = math.prod(
            mesh.shape[a] for entry in spec if entry for a in ((entry,) if isinstance(entry, str) else entry)
        )
        total += variable.size * jnp.dtype(variable.dtype).itemsize // parts
    return total * copies


def print_plan(
    config: ml_collections.ConfigDict, source: Qwen3NextConfig, stages: Sequence[Stage], teacher: Qwen3NextConfig
) -> list[dict]:
    """Every stage's architecture, parameter counts, steps, tokens and per-device memory (student
    parameters + two Adam moments + the teacher's parameters) on the configured mesh (every size
    given), from shapes alone. Prints a table; returns its rows."""
    mesh_sizes = [int(config.mesh[a]) for a in sharding.MESH_AXES]
    mesh = jax.sharding.AbstractMesh(tuple(mesh_sizes), sharding.MESH_AXES)
    tokens_per_step = config.train.global_batch_size * config.data.seq_len
    teacher_bytes = per_device_bytes(teacher, mesh)
    rows = describe(stages, tokens_per_step)
    for row, stage in zip(rows, stages):
        row["student_gib_per_device"] = per_device_bytes(stage.architecture, mesh, copies=3) / 2**30
        row["teacher_gib_per_device"] = teacher_bytes / 2**30
    print(f"dry run: {len(stages)} stage(s) on a {'x'.join(map(str, mesh_sizes))} mesh ({math.prod(mesh_sizes)} "
          f"devices), {tokens_per_step:,} tokens per step; nothing is read or written")  # fmt: skip
    print(f"source / teacher: {_summary(source)}, {format_count(count_parameters(source).total)} / "
          f"{format_count(count_parameters(teacher).total)} parameters")  # fmt: skip
    header = ("stage", "architecture", "total", "active", "steps", "tokens", "student+Adam GiB/dev", "teacher GiB/dev")
    print(" | ".join(header))
    for r in rows:
        print(" | ".join([r["stage"], r["architecture"], format_count(r["total"]), format_count(r["active"]),
                          f"{r['steps']:,}", f"{r['tokens'] / 1e9:,.1f}B", f"{r['student_gib_per_device']:.2f}",
                          f"{r['teacher_gib_per_device']:.2f}"]))  # fmt: skip
    return rows
