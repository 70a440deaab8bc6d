"""Pruning entry point: source model -> calibration -> depth/width/expert pruning -> checkpoint.

    python -m slimqwen_jax.prune --config configs/<name>.py [--config.key=value ...]

Reads `source` (an HF checkpoint directory or one of our checkpoints; empty: the model `model`
describes, randomly initialised with `seed`, for demos and tests), calibrates it on `calibration.num_samples`
sequences of the data pipeline when the spec needs statistics (or reuses the statistics file
`stats`), applies the `depth`, `width` and `experts` specs, writes our checkpoint to `output` and,
if `export_hf` is set, an HF directory. Prints the architecture and parameter counts before and
after. `--config.dry_run=True` plans the same on abstract parameters (shapes only) and writes
nothing. Exit codes: 0 done, 1 bad input (nothing written), 2 bad command line.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import ml_collections
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from slimqwen_jax import cli, data, hf, loading, run_config
from slimqwen_jax.checkpoint import save_checkpoint
from slimqwen_jax.compression import (
    PruneSpec,
    PruningError,
    count_parameters,
    load_or_calibrate,
    load_statistics,
    prune,
    validate,
)
from slimqwen_jax.compression.param_count import architecture_table, format_count
from slimqwen_jax.compression.state import abstract_params, build_model
from slimqwen_jax.config import ConfigError, Qwen3NextConfig
from slimqwen_jax.hf import CheckpointMismatchError
from slimqwen_jax.model import Qwen3NextForCausalLM

log = logging.getLogger("slimqwen_jax.prune")

# Without a source, config.model is randomly initialised: fine for demos, never for a model this large.
MAX_RANDOM_INIT_PARAMS = 10**9


# ---------------------------------------------------------------------------- source
def source_config(config: ml_collections.ConfigDict) -> Qwen3NextConfig:
    """The source model's config: `config.model` when `source` is empty, else the directory's."""
    dtypes = {"dtype": config.dtype, "param_dtype": config.dtype}
    if not config.source:
        return Qwen3NextConfig.from_dict({**config.model.to_dict(), **dtypes})
    return loading.load_model_config(config.source, role="source", **dtypes)


def load_source(config: ml_collections.ConfigDict) -> Qwen3NextForCausalLM:
    """The source model with its weights (`config.model` randomly initialised with `seed` when
    `source` is empty: for demos and tests, refused above MAX_RANDOM_INIT_PARAMS)."""
    if not config.source:
        cfg = source_config(config)
        total = count_parameters(cfg).total
        if total > MAX_RANDOM_INIT_PARAMS:
            raise PruningError(
                f"no source given: config.model ({format_count(total)} parameters) would be randomly initialised; "
                "set --config.source to an HF or checkpoint directory, or plan with --config.dry_run=True"
            )
        return Qwen3NextForCausalLM(cfg, rngs=nnx.Rngs(config.seed))
    return loading.load_model(config.source, role="source", dtype=config.dtype)


# ---------------------------------------------------------------------------- the run
def statistics_path(config: ml_collections.ConfigDict) -> Path:
    """The calibration statistics file: `config.stats`, by default beside the output."""
    return Path(config.stats or f"{config.output}.calibration.npz")


def _check_creatable(path: Path, field: str) -> None:
    """`path` can be created: its nearest existing ancestor is a directory."""
    parent = next(p for p in path.absolute().parents if p.exists())
    if not parent.is_dir():
        raise PruningError(f"{field} {path} cannot be created: {parent} is a file, not a directory; pick another path")


def check_outputs(config: ml_collections.ConfigDict) -> None:
    """Refuse, before any work, to write over an existing checkpoint or HF directory, or to write
    where a file stands in the way."""
    if Path(config.output).exists():
        raise FileExistsError(f"output {config.output} already exists; refusing to overwrite it")
    _check_creatable(Path(config.output), "output")
    if not statistics_path(config).exists():
        _check_creatable(statistics_path(config), "stats")
    if config.export_hf:
        export = Path(config.export_hf)
        if export.exists() and (not export.is_dir() or any(export.iterdir())):
            raise FileExistsError(f"export_hf {export} exists and is not an empty directory; refusing to overwrite it")
        _check_creatable(export, "export_hf")


def run(config: ml_collections.ConfigDict) -> tuple[Qwen3NextConfig, nnx.State]:
    """Prune as configured; returns the pruned (config, params). Raises PruningError / ConfigError /
    DataError / CheckpointMismatchError / FileExistsError / FileNotFoundError, each before anything
    is written."""
    run_config.check(config, "prune")
    spec = PruneSpec.from_config(config)
    if config.dry_run:
        cfg = source_config(config)
        params, stats = abstract_params(cfg), None
        print(f"dry run of {config.source or 'config.model'} on abstract parameters (shapes only); nothing is written")
    else:
        check_outputs(config)
        cfg = source_config(config)
        validate(cfg, spec)  # from config.json alone: before any load or calibration
        # An existing statistics file is read and checked against config.json before the load too.
        stats = load_statistics(statistics_path(config), cfg, name="prune") if spec.needs_stats(cfg) else None
        model = load_source(config)
        cfg, params = model.config, nnx.state(model, nnx.Param)
        if stats is None and spec.needs_stats(cfg):
            stats = load_or_calibrate(statistics_path(config), model, config.data, config.calibration, name="prune")
    new_cfg, new_params, notes = prune(cfg, params, spec, stats)
    print(f"spec: {spec}")
    print(architecture_table(cfg, new_cfg, params, new_params))
    for note in notes:
        print(f"note: {note}")
    if not config.dry_run:
        pruned = build_model(new_cfg, new_params)
        log.info("wrote checkpoint %s", save_checkpoint(pruned, config.output))
        if config.export_hf:
            log.info("wrote HF directory %s", hf.save_model(pruned, config.export_hf))
    return new_cfg, new_params


def define_flags() -> None:
    """--config: the prune config file plus --config.key=value overrides."""
    config_flags.DEFINE_config_file("config", None, "Prune config file (configs/prune_*.py).", lock_config=True)


def main(argv: list[str]) -> None:
    del argv
    cli.start_tool()
    try:
        run(flags.FLAGS.config)
    except (ConfigError, data.DataError, CheckpointMismatchError, FileExistsError, FileNotFoundError) as error:
        log.error("error: %s", error)
        sys.exit(1)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
