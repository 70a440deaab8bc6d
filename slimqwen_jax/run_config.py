"""The run config: every section and key an entry point reads, with its default, and its checks.

A config file starts from the base of its command and changes only what it needs:

    config = run_config.base_config()          # train, pipeline
    config = run_config.prune_base_config()    # prune
    config = run_config.evaluate_base_config() # evaluate

`problems(config, command)` gathers every problem of every section (unknown keys with a "did you
mean", missing keys, bad values, stages that do not fit the model) and `check` raises them as one
ConfigError; every entry point calls `check` before any work. Nothing downstream probes for
optional keys: every key is always there.

The schedule presets (`one_stage`, `depth_first`, `width_first`, `joint`, `n_stage`) build the
`stages` list from a source and a target architecture (docs/method.md section 5), in Python or from
the command line (`config.schedule` and `config.schedule_options`, expanded by `with_schedule`),
and `resolve_baseline` turns a config into the comparison run its `baseline` names.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
from collections.abc import Sequence

import ml_collections
from ml_collections import config_dict

from slimqwen_jax import compile_plan, data, losses, optimizer, sharding, stage_plan, storage
from slimqwen_jax.compression import DepthSpec, ExpertSpec, PruneSpec, WidthSpec
from slimqwen_jax.compression.spec import choice_problems
from slimqwen_jax.config import DTYPES, RUNTIME_FIELDS, ConfigError, Qwen3NextConfig, tiny

COMMANDS = ("train", "prune", "evaluate")
BASELINES = ("", "from_scratch", "pruned_lm_only")
PIPELINE_BASELINES = ("pruned_lm_only", "from_scratch")


# ---------------------------------------------------------------------------- sections
def model_section(cfg: Qwen3NextConfig | None = None) -> ml_collections.ConfigDict:
    """`config.model`: the fields of `Qwen3NextConfig` (HF names plus run-time options); the tiny
    preset unless `cfg` is given. An empty `layer_types` means HF's default 3:1 pattern."""
    return ml_collections.ConfigDict((cfg or tiny()).to_flag_dict())


def data_section() -> ml_collections.ConfigDict:
    """`config.data`: where the tokens come from (`slimqwen_jax.data`). `paths` is a comma-separated
    string of files and globs so that `--config.data.paths=a,b` works from the command line."""
    return ml_collections.ConfigDict(
        dict(
            source="stdlib",  # stdlib | text | jsonl | tokens
            paths="",  # files and globs of text, jsonl or token files
            jsonl_field="text",  # the text field of jsonl records
            token_dtype="uint16",  # of raw .bin token files
            tokenizer="byte",  # "byte" or a path to an HF tokenizer.json
            heldout_fraction=0.01,  # share of documents (or tokens) held out for evaluation
            seq_len=256,  # tokens per training window
            shuffle_seed=0,  # order of the training windows
            cache_dir=config_dict.placeholder(str),  # None: no on-disk cache of tokenized streams
        )
    )


def mesh_section() -> ml_collections.ConfigDict:
    """`config.mesh`: device mesh sizes; one of them may be -1 to take the remaining devices."""
    return ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=1))


def train_section() -> ml_collections.ConfigDict:
    """`config.train`: the loop's budget, batch, and how often it logs, evaluates and saves."""
    return ml_collections.ConfigDict(
        dict(
            steps=500,  # optimizer steps; with stages 0 (their sum) or that sum
            global_batch_size=8,  # sequences per optimizer step, over all processes
            grad_accum_steps=1,  # micro-batches per step (global_batch_size must divide evenly)
            log_every=20,  # steps between progress lines
            eval_every=100,  # steps between held-out evaluations (and at each stage's end)
            eval_batches=8,  # held-out batches per evaluation
            eval_batch_size=8,  # sequences per held-out batch
            eval_mtp_drafts=3,  # teacher-forced MTP acceptance acc_0..acc_{J-1} at each evaluation; 0: none
            eval_at_start=False,  # also evaluate at each stage's start, after its pruning (the one-shot loss)
            checkpoint_every=100,  # steps between checkpoints (and at each stage's end)
            keep_checkpoints=2,  # newest checkpoints kept per stage
        )
    )


def loss_section(*, distillation: bool = False) -> ml_collections.ConfigDict:
    """`config.loss`: the objective (docs/method.md section 4). With `distillation`, the paper's
    schedules (lam linear 1.0 -> 0.75, beta cosine 0.3 -> 0.1); otherwise pretraining: lam 0 and a
    constant MTP weight beta 0.3. The MTP terms' KD share follows lam unless `mtp_lam` is given."""
    if distillation:
        lam, beta = dict(schedule="linear", start=1.0, end=0.75), dict(schedule="cosine", start=0.3, end=0.1)
    else:
        lam, beta = dict(schedule="constant", start=0.0, end=0.0), dict(schedule="constant", start=0.3, end=0.3)
    return ml_collections.ConfigDict(
        dict(
            lam=lam,  # KD share: (1 - lam) L_LM + lam L_KD
            # KD share of the MTP terms, (1 - mtp_lam) L_MTP_LM + mtp_lam L_MTP_KD; schedule "lam": equal to lam
            mtp_lam=dict(schedule="lam", start=0.0, end=0.0),
            beta=beta,  # weight of the MTP terms
            weight_span="run",  # run | stage: lam, mtp_lam and beta run over the whole run, or restart each stage
            temperature=1.0,  # KD temperature tau (the KD terms are scaled by tau^2)
            mtp_kd_target="teacher_mtp",  # teacher_mtp | teacher_backbone
            chunk_size=1024,  # tokens per [chunk, vocab] block of the LM head and the loss
            teacher_dtype="bfloat16",  # the frozen teacher's parameter and compute dtype
        )
    )


def optimizer_section(**overrides) -> ml_collections.ConfigDict:
    """`config.optimizer`: AdamW (decoupled weight decay on matrices only), global-norm clipping, a
    linear warmup from init_lr to peak_lr, then `schedule` towards end_lr (`optimizer`)."""
    section = ml_collections.ConfigDict(
        dict(
            schedule="cosine",  # cosine | wsd | constant
            init_lr=0.0,  # learning rate at step 0
            peak_lr=3e-3,  # after warmup
            end_lr=3e-4,  # at the last step (cosine, wsd)
            warmup_steps=40,  # linear warmup, on the global step
            decay_fraction=0.2,  # wsd only: the share of post-warmup steps spent decaying
            weight_decay=0.1,  # AdamW's decoupled decay, matrices only
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            clip_norm=1.0,  # global gradient-norm clipping
        )
    )
    section.update(overrides)
    return section


def calibration_section() -> ml_collections.ConfigDict:
    """`config.calibration`: the sequences each pruning calibrates the current model on (the paper:
    1,024 samples of pretraining data)."""
    return ml_collections.ConfigDict(
        dict(
            num_samples=64,  # calibration windows, from the training split
            seq_len=256,  # tokens per window
            batch_size=8,  # windows per forward
            seed=0,  # which windows
            log_every=4,  # batches between progress lines
            # "": each stage writes its own. A directory: the first stage's statistics of init_from are
            # kept there under a key of (init_from, calibration, data) and reused by every run with that key
            cache_dir="",
        )
    )


def depth_section(spec: DepthSpec = DepthSpec()) -> ml_collections.ConfigDict:
    """`depth` of a pruning spec (`compression.DepthSpec`; 0 layers to remove keeps the depth)."""
    return ml_collections.ConfigDict(
        dict(
            method=spec.method,  # last | similarity (per-layer influence) | block_similarity (adjacent block)
            num_layers_to_remove=spec.num_layers_to_remove,
        )
    )


def width_section(spec: WidthSpec = WidthSpec()) -> ml_collections.ConfigDict:
    """`width` of a pruning spec (`compression.WidthSpec`; hidden_size 0 keeps the width)."""
    return ml_collections.ConfigDict(
        dict(
            hidden_size=spec.hidden_size,  # the new hidden size; 0 keeps it
            multiple_of=spec.multiple_of,  # the new width's grid (128: the TPU lane width)
            rescale_norms=spec.rescale_norms,  # norm scales x sqrt(D / D'); False: the paper's plain slicing
        )
    )


def experts_section(spec: ExpertSpec = ExpertSpec()) -> ml_collections.ConfigDict:
    """`experts` of a pruning spec (`compression.ExpertSpec`; zeros keep the experts and top-k)."""
    return ml_collections.ConfigDict(
        dict(
            num_experts=spec.num_experts,  # experts per MoE layer after compression; 0 keeps them
            num_experts_per_tok=spec.num_experts_per_tok,  # the new top-k; 0 keeps it
            importance=spec.importance,  # frequency | soft_logits | reap
            method=spec.method,  # prune | merge | partial_preservation
            similarity=spec.similarity,  # router_logits | router_weights | expert_vector (merge groups)
            preserve_fraction=spec.preserve_fraction,  # partial_preservation: share of kept experts untouched
            preserve_rounding=spec.preserve_rounding,  # round (half to even) | floor (the paper) of that share
        )
    )


def spec_sections(spec: PruneSpec) -> dict[str, ml_collections.ConfigDict]:
    """The `depth`, `width` and `experts` sections that `PruneSpec.from_config` reads back as `spec`."""
    return dict(depth=depth_section(spec.depth), width=width_section(spec.width), experts=experts_section(spec.experts))


def stage_section(steps: int = 0, *, tokens: int = 0, warmup_steps: int = 0, spec: PruneSpec = PruneSpec()
                  ) -> ml_collections.ConfigDict:  # fmt: skip
    """One entry of `config.stages` (each field overridable: `--config.stages[1].steps=500`): a
    pruning spec applied to the current student before the stage trains, and a budget."""
    return ml_collections.ConfigDict(
        dict(
            steps=steps,  # optimizer steps of this stage (or 0 and `tokens`)
            tokens=tokens,  # token budget, rounded up to whole steps (used when steps is 0)
            warmup_steps=warmup_steps,  # > 0: re-warm the learning rate over this stage's first steps
            **spec_sections(spec),
        )
    )


# ---------------------------------------------------------------------------- base configs
def base_config() -> ml_collections.ConfigDict:
    """The base of every train and pipeline config: pretraining of the tiny model on the standard
    library, one stage, no teacher."""
    config = ml_collections.ConfigDict()
    config.workdir = "runs/run"  # checkpoints, logs, summaries; a rerun resumes from it
    config.init_from = ""  # start from an HF directory or one of our checkpoints; "": random init
    config.teacher = ""  # distil from this model (HF directory or our checkpoint); "": no teacher
    config.seed = 0  # random init and the student's random parts
    config.dry_run = False  # print the stages' plan from shapes alone; nothing is read or written
    config.compile_topology = ""  # dry run: also compile each stage's train step for this TPU slice (compile_plan)
    config.compile_mfu = 0.4  # dry run with compile_topology: the MFU its step times and stage durations assume
    config.baseline = ""  # "" | from_scratch | pruned_lm_only (`resolve_baseline`)
    config.baseline_from = ""  # from_scratch: train the final architecture of this finished run (its workdir)
    config.model = model_section()
    config.data = data_section()
    config.mesh = mesh_section()
    config.train = train_section()
    config.loss = loss_section()
    config.optimizer = optimizer_section()
    config.stages = []  # prune -> train stages (`stage_section`, the schedule presets); []: one stage
    config.schedule = ""  # "": `stages` as written; a preset (SCHEDULE_PRESETS) builds them from schedule_options
    config.schedule_options = schedule_options_section()
    config.calibration = calibration_section()
    config.pipeline = ml_collections.ConfigDict(
        dict(
            teacher=None,  # pipeline only: the train config of the teacher it pretrains first (like this one)
            baselines=PIPELINE_BASELINES,  # pipeline only: the comparison runs beside the student
        )
    )
    return config


def prune_base_config() -> ml_collections.ConfigDict:
    """The base of every `python -m slimqwen_jax.prune` config: a one-shot pruning of a model."""
    config = ml_collections.ConfigDict()
    config.source = ""  # an HF directory or our checkpoint; "": `model` randomly initialised with `seed`
    config.model = model_section()  # only read when source is ""
    config.seed = 0
    config.dtype = "float32"  # the dtype the source is loaded and calibrated in
    config.output = "runs/prune/model"  # our checkpoint; must not exist
    config.export_hf = ""  # optional HF directory
    config.stats = ""  # calibration statistics (.npz): reused if it exists, else written; "": <output>.calibration.npz
    config.dry_run = False  # plan on abstract parameters only; nothing is read or written
    config.data = data_section()
    config.calibration = calibration_section()
    config.update(spec_sections(PruneSpec()))
    return config


def evaluate_base_config() -> ml_collections.ConfigDict:
    """The base of every `python -m slimqwen_jax.evaluate` config."""
    config = ml_collections.ConfigDict()
    config.model = "runs/run/checkpoints/500"  # an HF directory or one of our checkpoints
    config.reference = ""  # optional reference model (the teacher), same kinds of path
    config.dtype = "float32"
    config.report = "runs/run/eval_report.json"  # refused if it exists, unless overwrite
    config.overwrite = False  # replace an existing report
    config.data = data_section()
    config.heldout = ml_collections.ConfigDict(
        dict(
            batch_size=8,  # held-out windows per batch
            num_batches=8,  # 0 skips the held-out measures
            num_drafts=3,  # teacher-forced MTP acceptance acc_0..acc_{J-1} (first k+1 drafts accepted); 0: none
        )
    )
    config.decoding = ml_collections.ConfigDict(
        dict(
            num_prompts=8,  # held-out windows of prompt_len tokens; 0 skips decoding
            prompt_len=64,
            max_new_tokens=64,
            batch_size=1,  # rows decoded together
            num_drafts=3,  # speculative decoding; 0 skips it
            uncached=True,  # also time generation without caches (a full forward per token)
        )
    )
    return config


BASES = {"train": base_config, "prune": prune_base_config, "evaluate": evaluate_base_config}


def model_config(config: ml_collections.ConfigDict) -> Qwen3NextConfig:
    """The model config that `config.model` describes."""
    return Qwen3NextConfig.from_dict(config.model.to_dict())


# ---------------------------------------------------------------------------- schedule presets
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
    methods: PruneSpec = PruneSpec(),
) -> list[ml_collections.ConfigDict]:
    """Stages going from `source` to `target` (layers, hidden size, experts, top-k), the budget
    `steps` split by `split`. `depth_shares` / `width_shares`: the cumulative share of the layers /
    channels to remove that is gone after each stage (default: equal steps, all gone at the end).
    Experts (and top-k) are compressed in `expert_stage` (1-based). `methods`: how every stage cuts
    (depth method, width grid and norm rescaling, expert importance and method); its sizes are
    ignored."""
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
        new_width = _width_share(source.hidden_size, target.hidden_size, width_shares[i], methods.width.multiple_of)
        compress = i + 1 == expert_stage
        spec = PruneSpec(
            depth=dataclasses.replace(methods.depth, num_layers_to_remove=layers - new_layers),
            width=dataclasses.replace(methods.width, hidden_size=new_width if new_width != width else 0),
            experts=dataclasses.replace(methods.experts, num_experts=target.num_experts if compress else 0,
                                        num_experts_per_tok=target.num_experts_per_tok if compress else 0),
        )  # fmt: skip
        stages.append(stage_section(stage_steps, spec=spec))
        layers, width = new_layers, new_width
    return stages


def one_stage(source, target, steps, split=(1.0,), **options) -> list[ml_collections.ConfigDict]:
    """Everything at once, then the whole budget."""
    return n_stage(source, target, steps, split, **options)


def depth_first(source, target, steps, split=(0.1, 0.9), **options) -> list[ml_collections.ConfigDict]:
    """The paper's final recipe: half the layers, then the other half and all the width."""
    return n_stage(source, target, steps, split, depth_shares=(0.5, 1.0), width_shares=(0.0, 1.0), **options)


def width_first(source, target, steps, split=(0.1, 0.9), **options) -> list[ml_collections.ConfigDict]:
    """Half the width, then the other half and all the layers."""
    return n_stage(source, target, steps, split, depth_shares=(0.0, 1.0), width_shares=(0.5, 1.0), **options)


def joint(source, target, steps, split=(0.1, 0.9), **options) -> list[ml_collections.ConfigDict]:
    """Half of both, then the rest of both."""
    return n_stage(source, target, steps, split, **options)


SCHEDULE_PRESETS = {"one_stage": one_stage, "depth_first": depth_first, "width_first": width_first, "joint": joint,
                    "n_stage": n_stage}  # fmt: skip
# The number of stages of each preset (n_stage: any).
PRESET_STAGES = {"one_stage": 1, "depth_first": 2, "width_first": 2, "joint": 2}


def schedule_options_section() -> ml_collections.ConfigDict:
    """`config.schedule_options`: what `config.schedule` (a preset) builds `stages` from. The
    `depth`, `width` and `experts` sections are the whole cut from `config.model` to the target,
    and how every stage cuts (the methods)."""
    return ml_collections.ConfigDict(
        dict(
            steps=0,  # the whole budget in optimizer steps; 0: train.steps
            split=(),  # budget share of each stage; (): the preset's (0.1, 0.9), or equal shares for n_stage
            num_stages=0,  # n_stage: the number of stages; 0: one per split entry
            expert_stage=1,  # the stage (1-based) that compresses the experts and top-k
            **spec_sections(PruneSpec()),
        )
    )


def schedule_target(source: Qwen3NextConfig, cut: PruneSpec) -> Qwen3NextConfig:
    """The sizes `cut` leaves of `source` (layers, hidden size, experts, top-k)."""
    num_experts, top_k = cut.experts.new_sizes(source)
    return source.replace(
        num_hidden_layers=source.num_hidden_layers - cut.depth.num_layers_to_remove, layer_types=None,
        hidden_size=cut.width.hidden_size or source.hidden_size, num_experts=num_experts, num_experts_per_tok=top_k,
    )  # fmt: skip


def schedule_problems(config: ml_collections.ConfigDict) -> list[str]:
    """Every problem of `config.schedule` and `config.schedule_options` (none without a schedule)."""
    name, options = config.schedule, config.schedule_options
    if not name:
        return []
    if name not in SCHEDULE_PRESETS:
        return [f"schedule must be one of {('', *SCHEDULE_PRESETS)}, got {name!r}"]
    found = [] if not config.stages else [f"schedule {name!r} builds stages: leave stages empty (it has "
                                          f"{len(config.stages)})"]  # fmt: skip
    split, n = tuple(options.split), int(options.num_stages)
    stages = PRESET_STAGES.get(name, n or len(split))
    if name == "n_stage" and not (n or split):
        found.append("schedule n_stage needs schedule_options.num_stages or schedule_options.split")
    elif split and len(split) != stages:
        found.append(f"schedule_options.split has {len(split)} entries but schedule {name!r} has {stages} stages")
    if name != "n_stage" and n not in (0, stages):
        found.append(f"schedule_options.num_stages is {n} but schedule {name!r} has {stages} stages")
    if any(not float(share) > 0 for share in split):
        found.append(f"schedule_options.split entries must be > 0, got {split}")
    if stages and not 1 <= options.expert_stage <= stages:
        found.append(f"schedule_options.expert_stage must be in [1, {stages}], got {options.expert_stage}")
    if options.steps < 0:
        found.append(f"schedule_options.steps must be >= 0, got {options.steps}")
    return found


def with_schedule(config: ml_collections.ConfigDict, source: Qwen3NextConfig) -> ml_collections.ConfigDict:
    """`config` with the stages its `schedule` preset builds from `source` (`config.model`) and
    `schedule_options`, and `schedule` cleared; a config without a schedule as it is. Call after
    `schedule_problems` found nothing."""
    if not config.schedule:
        return config
    options = config.schedule_options
    cut = PruneSpec.from_config(options)
    split = tuple(options.split) or {"one_stage": (1.0,), "n_stage": (1.0,) * int(options.num_stages)}.get(
        config.schedule, (0.1, 0.9))
    config = copy.deepcopy(config)
    config.stages = SCHEDULE_PRESETS[config.schedule](
        source, schedule_target(source, cut), int(options.steps or config.train.steps), split,
        expert_stage=int(options.expert_stage), methods=cut,
    )  # fmt: skip
    config.schedule = ""
    return config


# ---------------------------------------------------------------------------- baselines
def resolve_baseline(
    config: ml_collections.ConfigDict, stages: Sequence[stage_plan.Stage], architecture: Qwen3NextConfig | None = None
) -> ml_collections.ConfigDict:
    """The run config of `config.baseline`, for comparisons at equal tokens, given the planned
    `stages` of `config`: `from_scratch` trains `architecture` (by default the final architecture
    of the stages, exact unless a depth cut depends on calibration statistics) from a random init
    on their whole budget (same objective; set lam to 0 too for LM only); `pruned_lm_only` keeps
    the stages and sets lam and the MTP terms' KD share to 0 (the teacher, if any, is only watched:
    KD and agreement as metrics). "" is the config itself."""
    if not config.baseline:
        return config
    config = copy.deepcopy(config)
    if config.baseline == "pruned_lm_only":
        config.loss.lam = dict(schedule="constant", start=0.0, end=0.0)
        config.loss.mtp_lam = dict(schedule="constant", start=0.0, end=0.0)
        return config
    source = model_config(config)  # its run-time options (dtype, kernels, layout) carry over
    architecture = (architecture or stages[-1].architecture).replace(**{f: getattr(source, f) for f in RUNTIME_FIELDS})
    config.model = architecture.to_flag_dict()
    config.init_from = config.baseline_from = ""
    config.stages = [stage_section(stages[-1].end_step)]
    return config


def depends_on_statistics(stages: Sequence[stage_plan.Stage]) -> list[str]:
    """The stages whose pruned architecture (not only its values) depends on calibration statistics:
    a depth cut that chooses its layers from them (their layer types and MoE pattern follow)."""
    return [stage.name for stage in stages if stage.spec.depth.needs_stats()]


# ---------------------------------------------------------------------------- checks
# Keys whose value is a list of sections, each shaped like the base's; keys holding a whole run config.
LIST_ITEM_BASES = {"stages": stage_section}
NESTED_RUN_CONFIGS = ("pipeline.teacher",)


def key_problems(config: ml_collections.ConfigDict, base: ml_collections.ConfigDict, where: str = "") -> list[str]:
    """Keys of `config` that `base` does not have (with the nearest known key), keys it lacks, and
    sections that are not sections, recursively; `where` is the dotted prefix of both."""
    keys, known = set(config.keys()), set(base.keys())
    found = []
    for key in sorted(keys - known):
        guess = difflib.get_close_matches(key, sorted(known), n=1)
        hint = f"did you mean {where}{guess[0]}?" if guess else f"known keys: {', '.join(sorted(known))}"
        found.append(f"unknown key {where}{key} ({hint})")
    found += [f"missing key {where}{key}" for key in sorted(known - keys)]
    for key in sorted(keys & known):
        path, value, default = f"{where}{key}", config[key], base[key]
        if path in NESTED_RUN_CONFIGS:
            if value is not None:
                found += key_problems(value, base_config(), f"{path}.")
        elif path in LIST_ITEM_BASES:
            for i, item in enumerate(value):
                found += key_problems(item, LIST_ITEM_BASES[path](), f"{path}[{i}].")
        elif isinstance(default, ml_collections.ConfigDict):
            if isinstance(value, ml_collections.ConfigDict):
                found += key_problems(value, default, f"{path}.")
            else:
                found.append(f"{path} must be a section with keys {', '.join(sorted(default.keys()))}")
    return found


def _at_least(section: ml_collections.ConfigDict, where: str, names: Sequence[str], low: int) -> list[str]:
    return [f"{where}.{name} must be >= {low}, got {section[name]}" for name in names if not section[name] >= low]


def _model_problems(config: ml_collections.ConfigDict) -> tuple[Qwen3NextConfig | None, list[str]]:
    """The model config of `config.model`, or None and its found."""
    try:
        return model_config(config), []
    except ConfigError as error:
        lines = [line.strip() for line in str(error).splitlines()[1:]] or [str(error)]
        return None, [f"model: {line}" for line in lines]


def _mesh_problems(mesh: ml_collections.ConfigDict, *, dry_run: bool) -> list[str]:
    found = sharding.mesh_size_problems(mesh)
    sizes = {axis: int(mesh[axis]) for axis in sharding.MESH_AXES}
    if not found and dry_run and -1 in sizes.values():
        return [f"a dry run needs every mesh size given (no -1), got {sizes}"]
    return found


def _compile_problems(config: ml_collections.ConfigDict) -> list[str]:
    if not config.compile_topology:
        return []
    found = [] if config.dry_run else ["compile_topology is read by dry runs only: add --config.dry_run=True"]
    try:
        compile_plan.parse_topology(config.compile_topology)
    except ConfigError as error:
        found.append(str(error))
    if not 0 < config.compile_mfu <= 1:
        found.append(f"compile_mfu must be in (0, 1], got {config.compile_mfu}")
    return found


def _calibration_problems(calibration: ml_collections.ConfigDict) -> list[str]:
    return _at_least(calibration, "calibration", ("num_samples", "seq_len", "batch_size", "log_every"), 1)


def _train_findings(config: ml_collections.ConfigDict
                    ) -> tuple[ml_collections.ConfigDict, list[stage_plan.Stage], list[str]]:  # fmt: skip
    """A train (or pipeline) config with the stages its schedule builds, those stages as planned, and
    every problem that needs no model weights and no data."""
    cfg, found = _model_problems(config)
    stages = []
    schedule_found = schedule_problems(config)
    found += schedule_found
    if cfg is not None and not schedule_found:
        config = with_schedule(config, cfg)
    tc = config.train
    found += losses.loss_problems(config.loss, has_teacher=bool(config.teacher))
    found += _at_least(tc, "train", ("global_batch_size", "grad_accum_steps", "log_every", "eval_every",
                                        "eval_batches", "eval_batch_size", "checkpoint_every", "keep_checkpoints"), 1)
    found += _at_least(tc, "train", ("eval_mtp_drafts",), 0)
    if tc.global_batch_size >= 1 and tc.grad_accum_steps >= 1 and tc.global_batch_size % tc.grad_accum_steps:
        found.append("train.global_batch_size must be a multiple of train.grad_accum_steps")
    found += optimizer.optimizer_problems(config.optimizer)
    found += [f"data: {problem}" for problem in data.data_config_problems(config.data)]
    found += _mesh_problems(config.mesh, dry_run=config.dry_run and not config.compile_topology)
    found += _compile_problems(config)
    found += _calibration_problems(config.calibration)
    if config.baseline not in BASELINES:
        found.append(f"baseline must be one of {BASELINES}, got {config.baseline!r}")
    if config.baseline_from and config.baseline != "from_scratch":
        found.append(f"baseline_from is only read by baseline 'from_scratch' (baseline is {config.baseline!r})")
    unreachable = storage.url_problems(storage_paths(config))
    found += unreachable
    workdir = storage.path(config.workdir)
    if not unreachable and workdir.exists() and not workdir.is_dir():
        found.append(f"workdir {workdir} is a file, not a directory")
    if cfg is not None and not schedule_found and tc.global_batch_size >= 1 and config.data.seq_len >= 1:
        stages, stage_found = stage_plan.plan(config, cfg, storage.absolute(config.workdir))
        found += stage_found
    if config.pipeline.teacher is not None:
        found += [f"pipeline.teacher: {problem}" for problem in problems(config.pipeline.teacher, "train")]
    unknown = sorted(set(config.pipeline.baselines) - set(PIPELINE_BASELINES))
    if unknown:
        found.append(f"pipeline.baselines: unknown {unknown}; choose from {PIPELINE_BASELINES}")
    return config, stages, found


def storage_paths(config: ml_collections.ConfigDict) -> list[tuple[str, str]]:
    """(field, path) of every path a train config reads or writes, each data path on its own."""
    paths = config.data.paths
    entries = paths.split(",") if isinstance(paths, str) else [str(p) for p in paths]
    fields = ("workdir", "init_from", "teacher", "baseline_from")
    return [*((field, config[field]) for field in fields), ("calibration.cache_dir", config.calibration.cache_dir),
            *(("data.paths", entry.strip()) for entry in entries)]  # fmt: skip


def _prune_problems(config: ml_collections.ConfigDict) -> list[str]:
    """Every problem of a prune config that needs no weights (the source's own config.json aside)."""
    found = []
    if config.dtype not in DTYPES:
        found.append(f"dtype must be one of {sorted(DTYPES)}, got {config.dtype!r}")
    if not config.source:
        found += _model_problems(config)[1]
    found += choice_problems(PruneSpec.from_config(config))
    found += [f"data: {problem}" for problem in data.data_config_problems(config.data)]
    found += _calibration_problems(config.calibration)
    if not config.dry_run and not config.output:
        found.append("output (the pruned checkpoint directory) is required unless dry_run")
    return found


def _evaluate_problems(config: ml_collections.ConfigDict) -> list[str]:
    """Every problem of an evaluate config that needs no model: sizes, dtype, the report's path."""
    found = _at_least(config.heldout, "heldout", ("batch_size",), 1)
    found += _at_least(config.decoding, "decoding", ("prompt_len", "max_new_tokens", "batch_size"), 1)
    found += _at_least(config.heldout, "heldout", ("num_batches", "num_drafts"), 0)
    found += _at_least(config.decoding, "decoding", ("num_prompts", "num_drafts"), 0)
    if config.heldout.num_batches == 0 and config.decoding.num_prompts == 0:
        found.append("nothing to evaluate: heldout.num_batches and decoding.num_prompts are both 0")
    if config.dtype not in DTYPES:
        found.append(f"dtype must be one of {sorted(DTYPES)}, got {config.dtype!r}")
    if not config.model:
        found.append("model is empty: name an HF directory or one of our checkpoints")
    if not config.report:
        found.append("report is empty: name the JSON report file (--config.report=<path>)")
    found += [f"data: {problem}" for problem in data.data_config_problems(config.data)]
    return found


VALUE_CHECKS = {"train": lambda config: _train_findings(config)[2], "prune": _prune_problems,
                "evaluate": _evaluate_problems}


def problems(config: ml_collections.ConfigDict, command: str = "train") -> list[str]:
    """Every problem of a `command` config (train, prune, evaluate; pipeline configs are train
    configs), one line each; empty when it can run. Keys are checked first: the value checks read
    every key of the base."""
    if command not in COMMANDS:
        raise ValueError(f"command must be one of {COMMANDS}, got {command!r}")
    return key_problems(config, BASES[command]()) or VALUE_CHECKS[command](config)


def _refuse(command: str, found: Sequence[str]) -> None:
    """Raise one ConfigError naming every problem in `found` (one problem: one line); none: return."""
    if len(found) == 1:
        raise ConfigError(f"bad {command} config: {found[0]}")
    if found:
        raise ConfigError(f"bad {command} config ({len(found)} problems):\n  " + "\n  ".join(found))


def check(config: ml_collections.ConfigDict, command: str = "train") -> None:
    """Raise one ConfigError naming every problem of `config` (`problems`)."""
    _refuse(command, problems(config, command))


def planned(config: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, list[stage_plan.Stage]]:
    """`check` of a train config, then the config with the stages its schedule builds (`with_schedule`)
    and the stages its check planned (each once)."""
    found = key_problems(config, base_config())
    if found:
        _refuse("train", found)
    config, stages, found = _train_findings(config)
    _refuse("train", found)
    return config, stages
