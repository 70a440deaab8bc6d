"""Progressive prune -> distill schedules (method.md section 5): stage configs, presets, planning.

`config.stages` is a list; each stage has a pruning spec (`depth`, `width`, `experts`: the fields
of the prune configs; all-zero keeps the model) applied to the current student before the stage
trains, and a budget in `steps` (or `tokens`, rounded up to whole steps). `warmup_steps` > 0
re-warms the learning rate at the start of the stage; otherwise the learning-rate, lam and beta
schedules run on the global step across stages.

Presets build the list from the source and target architectures and the token split:
`one_stage`, `depth_first` (the paper's), `width_first`, `joint` and `n_stage`. With dL layers and
dW channels to remove: depth_first removes dL/2 layers in stage 1 and the rest of the layers plus
all of dW in stage 2; width_first the same with depth and width swapped; joint half of each then
the rest; n_stage an equal share of both per stage. Experts are compressed in `expert_stage`
(stage 1 by default; the paper does not say).

`plan_stages` checks a schedule against the model before any work, on abstract parameters, and
returns each stage's global step range and architecture.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from slimqwen_jax import sharding
from slimqwen_jax.config import ConfigError, Qwen3NextConfig
from slimqwen_jax.pruning import PruneSpec, PruningError, abstract_params, count_parameters, decide, format_count

EXPERT_DEFAULTS = dict(
    importance="reap", method="partial_preservation", similarity="expert_vector", preserve_fraction=0.5
)


# ---------------------------------------------------------------------------- stage configs
def stage_config(
    steps: int = 0,
    *,
    tokens: int = 0,
    num_layers_to_remove: int = 0,
    depth_method: str = "last",
    hidden_size: int = 0,
    multiple_of: int = 128,
    num_experts: int = 0,
    num_experts_per_tok: int = 0,
    warmup_steps: int = 0,
    **expert_options,
) -> ml_collections.ConfigDict:
    """One entry of `config.stages` (every field overridable: `--config.stages[1].steps=500`)."""
    return ml_collections.ConfigDict(
        dict(
            steps=steps,  # optimizer steps of this stage (or 0 and `tokens`)
            tokens=tokens,  # token budget, rounded up to whole steps (used when steps is 0)
            warmup_steps=warmup_steps,  # > 0: re-warm the learning rate over this stage's first steps
            depth=dict(method=depth_method, num_layers_to_remove=num_layers_to_remove),
            width=dict(hidden_size=hidden_size, multiple_of=multiple_of),
            experts=dict(num_experts=num_experts, num_experts_per_tok=num_experts_per_tok,
                         **{**EXPERT_DEFAULTS, **expert_options}),
        )
    )  # fmt: skip


def _split(total: int, fractions: Sequence[float]) -> list[int]:
    """`total` split by `fractions` (normalised), rounded so that the parts add up to `total`."""
    fractions = [f / sum(fractions) for f in fractions]
    bounds = [round(total * sum(fractions[: i + 1])) for i in range(len(fractions))]
    return [b - a for a, b in zip([0, *bounds[:-1]], bounds)]


def _width_share(source: int, target: int, share: float, multiple_of: int) -> int:
    """The width after removing `share` of (source - target) channels, on the multiple_of grid."""
    removed = math.floor((source - target) * share / multiple_of) * multiple_of
    return source - removed


def n_stage(
    source: Qwen3NextConfig,
    target: Qwen3NextConfig,
    steps: int,
    split: Sequence[float],
    *,
    depth_shares: Sequence[float] | None = None,
    width_shares: Sequence[float] | None = None,
    expert_stage: int = 1,
    depth_method: str = "last",
    multiple_of: int = 128,
    **expert_options,
) -> list[ml_collections.ConfigDict]:
    """Stages going from `source` to `target` (layers, hidden size, experts, top-k), the budget
    `steps` split by `split`. `depth_shares` / `width_shares`: the cumulative share of the layers /
    channels to remove that is gone after each stage (default: equal steps, all gone at the end)."""
    n = len(split)
    if not 1 <= expert_stage <= n:
        raise ConfigError(f"expert_stage must be in [1, {n}], got {expert_stage}")
    equal = [(i + 1) / n for i in range(n)]
    depth_shares, width_shares = list(depth_shares or equal), list(width_shares or equal)
    if len(depth_shares) != n or len(width_shares) != n:
        raise ConfigError(f"depth_shares and width_shares need one entry per stage ({n})")
    d_layers = source.num_hidden_layers - target.num_hidden_layers
    stages, layers, width = [], source.num_hidden_layers, source.hidden_size
    for i, stage_steps in enumerate(_split(steps, split)):
        new_layers = source.num_hidden_layers - round(d_layers * depth_shares[i])
        new_width = _width_share(source.hidden_size, target.hidden_size, width_shares[i], multiple_of)
        compress = i + 1 == expert_stage
        stages.append(
            stage_config(
                stage_steps, num_layers_to_remove=layers - new_layers, depth_method=depth_method,
                hidden_size=new_width if new_width != width else 0, multiple_of=multiple_of,
                num_experts=target.num_experts if compress else 0,
                num_experts_per_tok=target.num_experts_per_tok if compress else 0, **expert_options,
            )
        )  # fmt: skip
        layers, width = new_layers, new_width
    return stages


def one_stage(source, target, steps, **options) -> list[ml_collections.ConfigDict]:
    """Everything at once, then the whole budget."""
    return n_stage(source, target, steps, [1.0], **options)


def depth_first(source, target, steps, split=(0.1, 0.9), **options) -> list[ml_collections.ConfigDict]:
    """The paper's final recipe: half the layers, then the other half and all the width."""
    return n_stage(source, target, steps, split, depth_shares=(0.5, 1.0), width_shares=(0.0, 1.0), **options)


def width_first(source, target, steps, split=(0.1, 0.9), **options) -> list[ml_collections.ConfigDict]:
    """Half the width, then the other half and all the layers."""
    return n_stage(source, target, steps, split, depth_shares=(0.0, 1.0), width_shares=(0.5, 1.0), **options)


def joint(source, target, steps, split=(0.1, 0.9), **options) -> list[ml_collections.ConfigDict]:
    """Half of both, then the rest of both."""
    return n_stage(source, target, steps, split, **options)


PRESETS = {"one_stage": one_stage, "depth_first": depth_first, "width_first": width_first, "joint": joint}


def calibration_config(**overrides) -> ml_collections.ConfigDict:
    """`config.calibration`: the sequences each pruning stage calibrates the current student on
    (paper: 1,024 samples of pretraining data)."""
    return ml_collections.ConfigDict(
        {**dict(num_samples=64, seq_len=256, batch_size=8, seed=0, log_every=4), **overrides}
    )


# ---------------------------------------------------------------------------- baselines
BASELINES = ("", "from_scratch", "pruned_lm_only")


def apply_baseline(config: ml_collections.ConfigDict, source: Qwen3NextConfig) -> ml_collections.ConfigDict:
    """The run config of `config.baseline`, for comparisons at equal tokens: `from_scratch` trains
    the final architecture of the stages from a random init on their whole budget (same objective;
    set lam to 0 too for LM only); `pruned_lm_only` keeps the stages and sets lam = 0 (the teacher,
    if any, is only watched: KD and agreement as metrics). "" is the config itself."""
    baseline = config.get("baseline", "")
    if baseline not in BASELINES:
        raise ConfigError(f"baseline must be one of {BASELINES}, got {baseline!r}")
    if not baseline:
        return config
    config = copy.deepcopy(config)
    if baseline == "pruned_lm_only":
        config.loss.lam = dict(schedule="constant", start=0.0, end=0.0)
        return config
    stages = plan_stages(config, source, Path(config.workdir))
    config.model = stages[-1].architecture.to_flag_dict()
    config.init_from = ""
    config.stages = [stage_config(stages[-1].end_step)]
    return config


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


def plan_stages(config: ml_collections.ConfigDict, source: Qwen3NextConfig, workdir: Path) -> list[Stage]:
    """The run's stages, each checked on abstract parameters against the model it will meet.

    A config without `stages` is one stage of `train.steps` that keeps the model and writes to the
    workdir itself. Raises one ConfigError naming every problem of every stage (a spec that does not
    fit the model of that stage, a zero budget, a stage that grows the model) before any work.
    """
    tokens_per_step = config.train.global_batch_size * config.data.seq_len
    if "stages" not in config or not config.stages:
        steps = int(config.train.steps)
        if steps <= 0:
            raise ConfigError(f"train.steps must be > 0, got {steps}")
        return [Stage(0, PruneSpec(), 0, steps, 0, workdir, source)]
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


def dry_run(config: ml_collections.ConfigDict, source: Qwen3NextConfig, teacher: Qwen3NextConfig) -> list[dict]:
    """Every stage's architecture, parameter counts, steps, tokens and per-device memory (student
    parameters + two Adam moments + the teacher's parameters) on the configured mesh, from shapes
    alone. Prints a table; returns its rows."""
    mesh_sizes = [int(config.mesh[a]) for a in sharding.MESH_AXES]
    if any(s < 1 for s in mesh_sizes):
        raise ConfigError(
            f"a dry run needs every mesh size given (no -1), got {dict(zip(sharding.MESH_AXES, mesh_sizes))}"
        )
    mesh = jax.sharding.AbstractMesh(tuple(mesh_sizes), sharding.MESH_AXES)
    tokens_per_step = config.train.global_batch_size * config.data.seq_len
    stages = plan_stages(config, source, Path(config.workdir))
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
