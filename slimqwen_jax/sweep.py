"""Config sweeps: every point of a grid of config overrides run in its own directory, then one table.

    python -m slimqwen_jax.sweep --config configs/<name>.py [--list] [--only a,b] [--config.key=value ...]

A config file defines its sweep beside `get_config()`:

    from slimqwen_jax import sweep

    def get_sweep():
        return sweep.Sweep(sweep.product(
            sweep.axis("lr", "optimizer.peak_lr", [1e-3, 3e-3]),
            sweep.seeds([0, 1]),
        ))

A point is a set of overrides ({dotted config path: value}, `stages[1].steps` included) with one
label per axis; its name joins its labels with "_". `points` gives named points, `axis` one key
over values, `seeds` the run's seed (and data order) as an axis, `product` and `zipped` combine
grids. Two keys of a point's overrides are not config paths: "command" (train, pipeline, prune or
evaluate; default `Sweep.command`) and "config" (the name of the config file's function that gives
the point's base config; default "get_config", the config the command line overrides). A string
value may name `{workdir}`, the sweep's directory (a point reading another point's output).

Every point is built and checked (`run_config.problems`) before any runs: one error names every bad
point. Point `p` runs in `<workdir>/<p>` (train and pipeline: its workdir; prune: `model/` there;
evaluate: `eval_report.json` there), its state in `point.json` (running, done with its summary,
or failed with its error) and its log lines in `log.txt`. A rerun skips the points that are done
with the same config, resumes the interrupted ones (train and pipeline resume from their
checkpoints) and retries the failed ones; a done point whose config has changed is refused. A
failing point is recorded and the sweep goes on, exiting 1 at the end. After the points: sweep.json
(every point's record), sweep.md (a table: the axes' labels and the metrics; with a seed axis also
mean +- std over the seeds) and sweep.png (the metrics per point, with the seeds' spread).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import fnmatch
import itertools
import json
import logging
import math
import re
import sys
import time
import traceback
import types
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from slimqwen_jax import cli, evaluate, loading, pipeline, prune, run_config, storage, train
from slimqwen_jax.compression import count_parameters
from slimqwen_jax.config import ConfigError, Qwen3NextConfig
from slimqwen_jax.progress import format_duration
from slimqwen_jax.testing import load_config_file

log = logging.getLogger("slimqwen_jax.sweep")

COMMANDS = ("train", "pipeline", "prune", "evaluate")
COMMAND_KEY, CONFIG_KEY = "command", "config"  # the two override keys that are not config paths
SEED_AXIS = "seed"
POINT_FILE, LOG_FILE = "point.json", "log.txt"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9.=+-]*(_[A-Za-z0-9.=+-]+)*")
# The metrics a table shows by default, those that the points' summaries have, in this order.
DEFAULT_METRICS = (
    "heldout_ce", "heldout_kd", "heldout_top1_agreement", "heldout_mtp_acc_0",  # train
    "pruned + KD/heldout_ce", "pruned + LM only/heldout_ce", "from scratch/heldout_ce",  # pipeline
    "heldout/loss", "heldout/bits_per_byte", "heldout/top1_agreement", "heldout/teacher_forced_acc_0",  # evaluate
    "total_parameters", "active_parameters",  # prune
)  # fmt: skip


class SweepError(ConfigError):
    """A sweep that cannot run: a bad definition, bad points, unknown --only names, stale points."""


# ---------------------------------------------------------------------------- the definition
@dataclasses.dataclass(frozen=True)
class Point:
    """One run of a sweep: its labels ((axis, label) pairs, in axis order) and its overrides."""

    labels: tuple[tuple[str, str], ...]
    overrides: Mapping[str, Any]

    @property
    def name(self) -> str:
        return "_".join(label for _, label in self.labels)


Grid = tuple[Point, ...]


@dataclasses.dataclass(frozen=True)
class Sweep:
    """A sweep: its points, the default command of a point, the metrics its table and plot show
    (empty: those of DEFAULT_METRICS the summaries have), and its directory ("": the workdir of
    the config the command line gives)."""

    points: Grid
    command: str = "train"
    metrics: tuple[str, ...] = ()
    workdir: str = ""


def points(named: Mapping[str, Mapping[str, Any]], axis: str = "point") -> Grid:
    """Named points: {label: overrides} as one axis."""
    return tuple(Point(((axis, label),), dict(overrides)) for label, overrides in named.items())


def axis(name: str, key: str, values: Sequence[Any], labels: Sequence[str] | None = None) -> Grid:
    """One config key over `values`, labelled `labels` (default: the axis name and the value)."""
    labels = labels or [f"{name}{value}" for value in values]
    if len(labels) != len(values):
        raise SweepError(f"axis {name}: {len(values)} values but {len(labels)} labels")
    return tuple(Point(((name, str(label)),), {key: value}) for label, value in zip(labels, values))


def seeds(values: Sequence[int], keys: Sequence[str] = ("seed", "data.shuffle_seed")) -> Grid:
    """The seed axis: each value set on every key of `keys` (by default the student's random init
    and the order of the training windows); tables average over it."""
    return tuple(Point(((SEED_AXIS, f"seed{s}"),), {key: s for key in keys}) for s in values)


def _merge(parts: Sequence[Point]) -> Point:
    """One point of several points' labels and overrides; a key two of them set differently is refused."""
    overrides: dict[str, Any] = {}
    for part in parts:
        for key, value in part.overrides.items():
            if key in overrides and overrides[key] != value:
                raise SweepError(f"{'_'.join(p.name for p in parts)}: {key} is set to both {overrides[key]!r} "
                                 f"and {value!r}")  # fmt: skip
            overrides[key] = value
    return Point(tuple(label for part in parts for label in part.labels), overrides)


def product(*grids: Grid) -> Grid:
    """Every combination of one point of each grid (the last grid varies fastest)."""
    return tuple(_merge(parts) for parts in itertools.product(*grids))


def zipped(*grids: Grid) -> Grid:
    """The i-th points of grids of equal length together."""
    if len({len(grid) for grid in grids}) > 1:
        raise SweepError(f"zipped grids must have equal lengths, got {[len(grid) for grid in grids]}")
    return tuple(_merge(parts) for parts in zip(*grids))


# ---------------------------------------------------------------------------- points as runs
@dataclasses.dataclass(frozen=True)
class PointRun:
    """A point ready to run: its command, full config and directory."""

    point: Point
    command: str
    config: ml_collections.ConfigDict
    directory: Path

    @property
    def name(self) -> str:
        return self.point.name

    def record(self) -> dict | None:
        """The point's point.json, or None if it never started."""
        path = self.directory / POINT_FILE
        return json.loads(path.read_text()) if path.exists() else None

    def config_json(self) -> Any:
        return json.loads(self.config.to_json())


def set_path(config: ml_collections.ConfigDict, path: str, value: Any) -> None:
    """Set dotted `path` (`train.steps`, `stages[1].depth.method`) of `config` to `value`."""
    *parents, leaf = re.split(r"\.(?![^\[]*\])", path)
    node = config
    for part in parents:
        match = re.fullmatch(r"(\w+)(?:\[(\d+)\])?", part)
        if match is None:
            raise KeyError(part)
        name, index = match.groups()
        node = node[name] if index is None else node[name][int(index)]
    node[leaf] = value


def _with_workdir(value: Any, workdir: Path) -> Any:
    return value.replace("{workdir}", str(workdir)) if isinstance(value, str) else value


def _place(config: ml_collections.ConfigDict, command: str, directory: Path) -> None:
    """Point the outputs of a `command` config into `directory`."""
    if command in ("train", "pipeline"):
        config.workdir = str(directory)
    elif command == "prune":
        config.output = str(directory / "model")
    else:
        config.report, config.overwrite = str(directory / "eval_report.json"), True


def build_point(point: Point, default_command: str, bases: Mapping[str, Callable[[], ml_collections.ConfigDict]],
                root: Path) -> tuple[PointRun | None, list[str]]:  # fmt: skip
    """The run of `point` (its base config, its overrides, its outputs under root/<name>) and its
    problems; None when it cannot be built."""
    command = point.overrides.get(COMMAND_KEY, default_command)
    base_name = point.overrides.get(CONFIG_KEY, "get_config")
    if command not in COMMANDS:
        return None, [f"command must be one of {COMMANDS}, got {command!r}"]
    if base_name not in bases:
        return None, [f"config {base_name!r} is not a function of the config file (it has {sorted(bases)})"]
    config = copy.deepcopy(bases[base_name]())
    config.unlock()
    found = []
    for key, value in point.overrides.items():
        if key in (COMMAND_KEY, CONFIG_KEY):
            continue
        try:
            set_path(config, key, _with_workdir(value, root))
        except (KeyError, AttributeError, IndexError, TypeError, ValueError) as error:
            found.append(f"cannot set {key} = {value!r}: {error}")
    if found:
        return None, found
    directory = root / point.name
    _place(config, command, directory)
    found = run_config.problems(config, "train" if command == "pipeline" else command)
    if command == "pipeline" and not found and config.pipeline.teacher is None:
        found.append("a pipeline point needs pipeline.teacher")
    return PointRun(point, command, config, directory), found


def build_points(definition: Sweep, bases: Mapping[str, Callable[[], ml_collections.ConfigDict]], root: Path,
                 only: Sequence[str] = ()) -> list[PointRun]:  # fmt: skip
    """Every point of `definition` selected by `only` (names or fnmatch patterns; empty: all),
    built and checked; raises one SweepError naming every bad point."""
    names = [point.name for point in definition.points]
    found = [f"two points are named {name!r}" for name in sorted({n for n in names if names.count(n) > 1})]
    found += [f"point name {name!r}: use letters, digits and . = + - (labels joined by _)" for name in names
              if not _NAME.fullmatch(name)]  # fmt: skip
    for pattern in only:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            guess = difflib.get_close_matches(pattern, names, n=1)
            found.append(f"--only {pattern!r} matches no point" + (f" (did you mean {guess[0]}?)" if guess else ""))
    if definition.command not in COMMANDS:
        found.append(f"Sweep.command must be one of {COMMANDS}, got {definition.command!r}")
    if found:
        raise SweepError("bad sweep:\n  " + "\n  ".join(found))
    selected = [p for p in definition.points if not only or any(fnmatch.fnmatchcase(p.name, o) for o in only)]
    runs, bad = [], []
    for point in selected:
        point_run, problems = build_point(point, definition.command, bases, root)
        record = point_run.record() if point_run else None
        if record and record["status"] == "done" and record["config"] != point_run.config_json():
            problems.append(f"it is done with another config ({point_run.directory / POINT_FILE}); delete its "
                            "directory to rerun it, or use another workdir")  # fmt: skip
        if problems:
            bad.append(f"point {point.name}: " + "; ".join(problems))
        runs.append(point_run)
    if bad:
        raise SweepError(f"bad sweep ({len(bad)} of {len(selected)} points):\n  " + "\n  ".join(bad))
    return runs


# ---------------------------------------------------------------------------- running a point
def _numbers(tree: Mapping, prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a nested dict, keyed by their '/'-joined path."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_numbers(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = float(value)
    return flat


def _run_train(config: ml_collections.ConfigDict) -> dict[str, float]:
    train.run(config)
    return _numbers({k: v for k, v in train.final_summary(Path(config.workdir)).items() if k != "architecture"})


def _run_pipeline(config: ml_collections.ConfigDict) -> dict[str, float]:
    pipeline.run(config)
    rows = json.loads((Path(config.workdir) / "report.json").read_text())
    return _numbers({row["run"]: {k: v for k, v in row.items() if k != "run"} for row in rows})


def _prune_summary(cfg: Qwen3NextConfig) -> dict[str, float]:
    count = count_parameters(cfg)
    return {"total_parameters": float(count.total), "active_parameters": float(count.active),
            "layers": float(cfg.num_hidden_layers), "hidden": float(cfg.hidden_size),
            "experts": float(cfg.num_experts)}  # fmt: skip


def _run_prune(config: ml_collections.ConfigDict) -> dict[str, float]:
    output = Path(config.output)
    if output.exists():  # written before the sweep could record it: the pruning is done
        return _prune_summary(loading.load_model_config(output))
    return _prune_summary(prune.run(config)[0])


def _run_evaluate(config: ml_collections.ConfigDict) -> dict[str, float]:
    return _numbers(evaluate.run(config))


RUNNERS = {"train": _run_train, "pipeline": _run_pipeline, "prune": _run_prune, "evaluate": _run_evaluate}


def _write_record(directory: Path, record: dict) -> None:
    """point.json, written whole or not at all."""
    directory.mkdir(parents=True, exist_ok=True)
    storage.write_text(directory / POINT_FILE, json.dumps(record, indent=2, default=str) + "\n")


def run_point(point_run: PointRun) -> dict:
    """Run one point, its log lines in log.txt; returns its record (done or failed)."""
    record = {
        "name": point_run.name, "command": point_run.command, "labels": dict(point_run.point.labels),
        "overrides": dict(point_run.point.overrides), "config": point_run.config_json(), "status": "running",
    }  # fmt: skip
    _write_record(point_run.directory, record)
    handler = logging.FileHandler(point_run.directory / LOG_FILE)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.getLogger("slimqwen_jax").addHandler(handler)
    start = time.perf_counter()
    try:
        record.update(status="done", summary=RUNNERS[point_run.command](point_run.config))
    except (KeyboardInterrupt, train.Interrupted):  # the sweep stops; a rerun resumes this point
        record.update(status="interrupted", wall_seconds=time.perf_counter() - start)
        _write_record(point_run.directory, record)
        raise
    except Exception as error:  # noqa: BLE001 - a failing point is recorded and the sweep goes on
        handler.stream.write(traceback.format_exc())
        record.update(status="failed", error=" ".join(f"{type(error).__name__}: {error}".split()))
    finally:
        logging.getLogger("slimqwen_jax").removeHandler(handler)
        handler.close()
    record["wall_seconds"] = time.perf_counter() - start
    _write_record(point_run.directory, record)
    return record


def run_points(runs: Sequence[PointRun]) -> list[dict]:
    """Run every point that is not done, with progress over the whole sweep; returns the records."""
    todo = [r for r in runs if (r.record() or {}).get("status") != "done"]
    log.info("sweep: %d points, %d done before, %d to run", len(runs), len(runs) - len(todo), len(todo))
    walls, failed = [], 0
    for i, point_run in enumerate(todo):
        previous = (point_run.record() or {}).get("status")
        log.info("sweep: point %d/%d %s (%s%s) in %s", i + 1, len(todo), point_run.name, point_run.command,
                 ", resuming" if previous else "", point_run.directory)  # fmt: skip
        record = run_point(point_run)
        walls.append(record["wall_seconds"])
        failed += record["status"] == "failed"
        eta = format_duration(np.mean(walls) * (len(todo) - i - 1))
        outcome = "done" if record["status"] == "done" else f"FAILED: {record['error']}"
        log.info("sweep: %s %s in %s | %d/%d run, %d failed | ETA %s", point_run.name, outcome,
                 format_duration(record["wall_seconds"]), i + 1, len(todo), failed, eta)  # fmt: skip
    return [r.record() or pending(r.point) for r in runs]


def pending(point: Point) -> dict:
    """The record of a point that never started."""
    return {"name": point.name, "labels": dict(point.labels), "status": "pending"}


def records_of(definition: Sweep, root: Path) -> list[dict]:
    """Every point's record as its directory holds it (pending if it never started)."""
    files = [(point, root / point.name / POINT_FILE) for point in definition.points]
    return [json.loads(path.read_text()) if path.exists() else pending(point) for point, path in files]


# ---------------------------------------------------------------------------- the report
def table_metrics(definition: Sweep, records: Sequence[dict]) -> list[str]:
    """The metrics of the table: the definition's, or those of DEFAULT_METRICS the summaries have."""
    if definition.metrics:
        return list(definition.metrics)
    present = {key for record in records for key in record.get("summary", {})}
    return [metric for metric in DEFAULT_METRICS if metric in present]


def _axes(definition: Sweep) -> list[str]:
    return list(dict.fromkeys(axis for point in definition.points for axis, _ in point.labels))


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}" if abs(value) >= 1e4 else f"{value:.4f}"


def groups_over_seeds(records: Sequence[dict], metrics: Sequence[str]) -> list[dict]:
    """The done records grouped by their labels other than the seed: mean, std (ddof 1) and n per metric."""
    grouped: dict[tuple, list[dict]] = {}
    for record in records:
        if record.get("status") == "done":
            key = tuple((a, l) for a, l in record["labels"].items() if a != SEED_AXIS)
            grouped.setdefault(key, []).append(record)
    rows = []
    for key, members in grouped.items():
        stats = {}
        for metric in metrics:
            values = [m["summary"][metric] for m in members if metric in m["summary"]]
            if values:
                stats[metric] = (float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                                 len(values))  # fmt: skip
        rows.append({"labels": dict(key), "metrics": stats})
    return rows


def markdown(definition: Sweep, records: Sequence[dict], metrics: Sequence[str]) -> str:
    """The table of every point (axes' labels, status, metrics) and, with a seed axis, the means."""
    axes = _axes(definition)
    lines = ["| " + " | ".join([*axes, "status", *metrics]) + " |", "|" + "---|" * len(axes) + "---|" +
             "---:|" * len(metrics)]  # fmt: skip
    for record in records:
        labels = record["labels"]
        status = record["status"] if record["status"] != "failed" else f"failed: {record['error']}".replace("|", "/")
        values = [_cell(record.get("summary", {}).get(metric)) for metric in metrics]
        lines.append("| " + " | ".join([*(labels.get(a, "") for a in axes), status, *values]) + " |")
    if SEED_AXIS in axes:
        others = [a for a in axes if a != SEED_AXIS]
        lines += [
            "",
            "Mean +- standard deviation over the seeds (n runs):",
            "",
            "| " + " | ".join([*others, *metrics]) + " |",
            "|" + "---|" * len(others) + "---:|" * len(metrics),
        ]
        for group in groups_over_seeds(records, metrics):
            cells = [f"{m:.4f} +- {s:.4f} ({n})" if n else "" for m, s, n in
                     (group["metrics"].get(metric, (0.0, 0.0, 0)) for metric in metrics)]  # fmt: skip
            lines.append("| " + " | ".join([*(group["labels"].get(a, "") for a in others), *cells]) + " |")
    return "\n".join(lines)


def plot(definition: Sweep, records: Sequence[dict], metrics: Sequence[str], output: Path) -> None:
    """One bar chart per metric (up to four): the mean over the seeds of each group, the seeds' std as
    error bars, each seed's value as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = list(metrics)[:4]
    groups = groups_over_seeds(records, shown)
    fig, axes = plt.subplots(len(shown) or 1, 1, figsize=(max(6, 0.6 * len(groups) + 3), 2.6 * max(len(shown), 1)),
                             squeeze=False)  # fmt: skip
    names = ["_".join(group["labels"].values()) or "all" for group in groups]
    for ax, metric in zip(axes[:, 0], shown):
        means = [group["metrics"].get(metric, (math.nan, 0.0, 0))[0] for group in groups]
        stds = [group["metrics"].get(metric, (math.nan, 0.0, 0))[1] for group in groups]
        ax.bar(range(len(groups)), means, yerr=stds, capsize=3, color="tab:blue", alpha=0.6)
        for i, group in enumerate(groups):
            key = tuple(group["labels"].items())
            values = [r["summary"][metric] for r in records if r.get("status") == "done" and metric in r["summary"]
                      and tuple((a, l) for a, l in r["labels"].items() if a != SEED_AXIS) == key]  # fmt: skip
            ax.plot([i] * len(values), values, "k.", ms=4)
        ax.set_ylabel(metric)
        ax.set_xticks(range(len(groups)), names, rotation=30, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        finite = [v for v in means if np.isfinite(v)]
        if finite:
            spread = max(finite) - min(finite) + max(stds, default=0.0)
            ax.set_ylim(min(finite) - spread - 1e-6, max(finite) + spread + 1e-6)
    axes[0, 0].set_title("sweep: mean over the seeds (bars), each seed (dots)")
    fig.tight_layout()
    fig.savefig(output, dpi=120)
    plt.close(fig)


def write_report(definition: Sweep, records: Sequence[dict], root: Path) -> str:
    """sweep.json, sweep.md and sweep.png in `root`; returns the markdown."""
    metrics = table_metrics(definition, records)
    root.mkdir(parents=True, exist_ok=True)
    (root / "sweep.json").write_text(json.dumps({"metrics": metrics, "points": list(records)}, indent=2,
                                                default=str) + "\n")  # fmt: skip
    table = markdown(definition, records, metrics)
    (root / "sweep.md").write_text(table + "\n")
    if metrics and any(r.get("status") == "done" for r in records):
        plot(definition, records, metrics, root / "sweep.png")
    return table


# ---------------------------------------------------------------------------- the command
def config_bases(module: types.ModuleType, config: ml_collections.ConfigDict
                 ) -> dict[str, Callable[[], ml_collections.ConfigDict]]:  # fmt: skip
    """The base configs a point may start from: `get_config` as the command line gave it (its
    overrides applied), and every other public function of the config file, as it is."""
    bases = {
        name: value
        for name, value in vars(module).items()
        if callable(value) and not name.startswith("_") and getattr(value, "__module__", None) == module.__name__
    }
    return {**bases, "get_config": lambda: config}  # fmt: skip


def sweep_root(definition: Sweep, config: ml_collections.ConfigDict) -> Path:
    """The sweep's directory: Sweep.workdir, else the command-line config's workdir."""
    if definition.workdir:
        return Path(definition.workdir)
    if "workdir" not in config:
        raise SweepError("the sweep has no directory: set Sweep.workdir (get_config() has no workdir)")
    return Path(config.workdir)


def status_lines(runs: Sequence[PointRun]) -> list[str]:
    """One line per point: name, command, status, overrides."""
    lines = []
    for point_run in runs:
        status = (point_run.record() or {}).get("status", "pending")
        overrides = ", ".join(f"{k}={v!r}" for k, v in point_run.point.overrides.items())
        lines.append(f"{point_run.name:<32} {point_run.command:<9} {status:<8} {overrides}")
    return lines


def run(definition: Sweep, bases: Mapping[str, Callable[[], ml_collections.ConfigDict]], root: Path, *,
        only: Sequence[str] = (), list_only: bool = False) -> list[dict]:  # fmt: skip
    """Check every point, then (unless `list_only`) run what is not done and write the report;
    returns the records of the selected points. Raises SweepError before any run."""
    runs = build_points(definition, bases, root, only)
    print("\n".join(status_lines(runs)))
    if list_only:
        return [r.record() or pending(r.point) for r in runs]
    records = run_points(runs)
    print(write_report(definition, records_of(definition, root), root))
    log.info("sweep: report in %s (sweep.json, sweep.md, sweep.png)", root)
    return records


def main(argv: list[str]) -> None:
    del argv
    cli.start_tool()
    fl = flags.FLAGS
    try:
        module = load_config_file(config_flags.get_config_filename(fl["config"]))
        if not hasattr(module, "get_sweep"):
            raise SweepError(f"{module.__file__} defines no get_sweep(): the sweep's points")
        definition = module.get_sweep()
        definition = definition if isinstance(definition, Sweep) else Sweep(tuple(definition))  # a bare Grid
        only = [name.strip() for name in fl.only.split(",") if name.strip()] if fl.only else []
        records = run(definition, config_bases(module, fl.config), sweep_root(definition, fl.config), only=only,
                      list_only=fl.list)  # fmt: skip
    except ConfigError as error:
        log.error("error: %s", error)
        sys.exit(1)
    except (KeyboardInterrupt, train.Interrupted) as error:
        log.error("error: sweep interrupted (%s); rerun the same command to resume", error or "Ctrl-C")
        sys.exit(1)
    failed = [r["name"] for r in records if r.get("status") == "failed"]
    if failed and not fl.list:
        log.error("error: %d point(s) failed: %s (their errors: sweep.md, <point>/log.txt)", len(failed),
                  ", ".join(failed))  # fmt: skip
        sys.exit(1)


def define_flags() -> None:
    """--config (the config file and its overrides), --list and --only."""
    config_flags.DEFINE_config_file("config", None, "Sweep config file: get_config() and get_sweep().",
                                    lock_config=True)  # fmt: skip
    flags.DEFINE_bool("list", False, "List the points and their status; run nothing.")
    flags.DEFINE_string("only", "", "Run only these points: comma-separated names or fnmatch patterns.")


if __name__ == "__main__":
    # Run as the imported module, whose Sweep and Point the config files' get_sweep() build.
    from slimqwen_jax import sweep as imported

    imported.define_flags()
    app.run(imported.main, flags_parser=cli.parse_flags)
