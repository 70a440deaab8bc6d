"""Reproduce the paper's findings: every table's runs as one sweep over seeds, and a report of our
numbers beside the paper's.

    python -m slimqwen_jax.reproduce --config configs/reproduce.py [--quick] [--seeds 0,1,2] [--scale 1]
        [--workdir runs/reproduce] [--results <workdir>/results.md] [--tables table1,table3] [--list]

A reproduction config file defines `get_reproduction(scale)`, a `Reproduction`: the teacher's train
config, the students' base train config, the runs (each a set of overrides of that base), the
tables (rows naming runs, the paper's numbers or ordering beside them) and the seeds. The command
turns it into sweep points (`slimqwen_jax.sweep`) under `workdir`: `teacher` (pretrained once),
`<run>_seed<s>` for every run of the selected tables and every seed (the seed moves the student's
random parts and the order of its training windows), `<run>_seed<s>_speculative` (speculative
decoding with MTP drafts, for the runs that measure it) and `<run>_seed<s>_<source>` (the held-out
measures on every extra evaluation source). Every student starts from the teacher's last checkpoint and distils from it; the
first stage's calibration statistics of the teacher are computed once (`calibration.cache_dir`);
compiled programs are kept in `<workdir>/compile_cache`, so the seeds after the first compile little.
A rerun skips the finished points (the teacher included), resumes an interrupted one and retries
failed ones; progress is logged over the whole reproduction.

The report (`--results`, with a PNG per table beside it) has, for each table, our measures as
mean +- standard deviation over the seeds (n), the paper's numbers, whether the paper's ordering
holds here and whether each difference (paired by seed) exceeds two standard errors, and the command, machine,
versions and wall times of every invocation. Every number in it is read from the run directories.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import importlib.metadata
import json
import logging
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from absl import app, flags

from slimqwen_jax import cli, pipeline, storage, sweep, train
from slimqwen_jax.compression import count_parameters, format_count
from slimqwen_jax.config import ConfigError
from slimqwen_jax.progress import format_duration, read_history
from slimqwen_jax.testing import load_config_file

log = logging.getLogger("slimqwen_jax.reproduce")

TEACHER = "teacher"
SPECULATIVE = "speculative"
INVOCATIONS_FILE = "invocations.jsonl"
# The data keys that decide which documents are held out: teacher and students must agree on them.
SPLIT_KEYS = ("source", "paths", "jsonl_field", "token_dtype", "tokenizer", "heldout_fraction")
VERSIONS = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")
# Our measures per run and what they are; `<source>_ce` / `<source>_top1_agreement` join them for
# every extra evaluation source.
MEASURES = {
    "heldout_ce": "held-out cross-entropy (nats/byte) after training",
    "oneshot_ce": "held-out cross-entropy right after the first pruning, before any training",
    "kl": "held-out KL(teacher || student) per token",
    "top1_agreement": "share of held-out positions where student and teacher agree on the top token",
    "tf_acc_k": "teacher-forced MTP acceptance: share of positions whose first k+1 drafts are all accepted",
    "spec_acc_k": "speculative decoding (greedy): share of rounds whose first k+1 drafts were all accepted",
}


class ReproduceError(ConfigError):
    """A reproduction that cannot run: a bad definition or command line."""


# ---------------------------------------------------------------------------- the definition
@dataclasses.dataclass(frozen=True)
class Row:
    """One row of a table: its label, the run whose measures it shows, the paper's number (if any)."""

    label: str
    run: str
    paper: float | None = None


@dataclasses.dataclass(frozen=True)
class Table:
    """One of the paper's tables. `metrics`: the measures shown; `rank_by`: the measure our ordering
    uses (lower is better unless `higher_is_better`); the paper's numbers are better when higher.
    `claims`: the paper's (worse, better) pairs of row labels where it states an ordering without
    numbers (`chain` builds them from an ordering); with numbers they come from those. `curves`:
    also plot the rows' held-out loss curves; `bars`: the measures of its bar chart."""

    key: str
    title: str
    rows: tuple[Row, ...]
    metrics: tuple[str, ...]
    paper_metric: str = ""
    claims: tuple[tuple[str, str], ...] = ()
    paper_claim: str = ""
    rank_by: str = "heldout_ce"
    curves: bool = False
    bars: tuple[str, ...] = ("heldout_ce",)

    @property
    def higher_is_better(self) -> bool:
        return self.rank_by.startswith(("spec_acc", "tf_acc", "top1_agreement"))

    def paper_pairs(self) -> list[tuple[str, str]]:
        """(worse, better) pairs of row labels by the paper: consecutive rows of its numbers sorted
        ascending, else its `claims`."""
        numbered = sorted((row.paper, row.label) for row in self.rows if row.paper is not None)
        return list(chain(*(label for _, label in numbered)) if len(numbered) > 1 else self.claims)


def chain(*labels: str) -> tuple[tuple[str, str], ...]:
    """The (worse, better) pairs of an ordering given worst to best."""
    return tuple(zip(labels, labels[1:]))


@dataclasses.dataclass(frozen=True)
class Reproduction:
    """Everything a reproduction runs: the teacher's and the students' train configs, the evaluate
    config of the extra evaluations, the runs ({name: overrides of the student config}), the
    tables, the seeds, the runs measured by speculative decoding and the extra evaluation sources
    ({name: overrides of the evaluation's `data` section}, each reported in its own columns)."""

    teacher: ml_collections.ConfigDict
    student: ml_collections.ConfigDict
    evaluation: ml_collections.ConfigDict
    runs: Mapping[str, Mapping[str, Any]]
    tables: tuple[Table, ...]
    seeds: tuple[int, ...] = (0, 1, 2)
    speculative_runs: tuple[str, ...] = ()
    extra_sources: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    description: str = ""  # markdown that opens the report's set-up (what the runs are)

    def problems(self) -> list[str]:
        """Tables naming unknown runs or claiming about unknown rows, duplicate keys, bad run names."""
        found = [f"{t.key}: row {r.label!r} names run {r.run!r}, which is not in runs" for t in self.tables
                 for r in t.rows if r.run not in self.runs]  # fmt: skip
        found += [f"{t.key}: claim names {label!r}, which is no row label" for t in self.tables
                  for pair in t.claims for label in pair if label not in {r.label for r in t.rows}]  # fmt: skip
        keys = [table.key for table in self.tables]
        found += [f"two tables are keyed {key!r}" for key in sorted({k for k in keys if keys.count(k) > 1})]
        found += [f"speculative run {run!r} is not in runs" for run in self.speculative_runs if run not in self.runs]
        found += [
            f"run name {name!r} has an underscore (it joins a point's labels)" for name in self.runs if "_" in name
        ]
        found += [f"extra source {name!r}: name it with letters, digits and - (not {SPECULATIVE!r})"
                  for name in self.extra_sources if "_" in name or name == SPECULATIVE]  # fmt: skip
        split = [key for key in SPLIT_KEYS if self.teacher.data[key] != self.student.data[key]]
        if split:  # the teacher would have trained on the students' held-out documents
            found.append(f"teacher and students split their data differently ({', '.join(f'data.{k}' for k in split)})")
        if not self.seeds:
            found.append("no seeds")
        return found


def select(reproduction: Reproduction, tables: Sequence[str] = (), seeds: Sequence[int] | None = None
           ) -> Reproduction:  # fmt: skip
    """The reproduction restricted to the `tables` named (empty: all) and run over `seeds` (None: its own)."""
    known = [table.key for table in reproduction.tables]
    unknown = [key for key in tables if key not in known]
    if unknown:
        raise ReproduceError(f"unknown table(s) {', '.join(unknown)}; the config has {', '.join(known)}")
    chosen = tuple(t for t in reproduction.tables if not tables or t.key in tables)
    return dataclasses.replace(reproduction, tables=chosen, seeds=tuple(reproduction.seeds if seeds is None else seeds))


def used_runs(reproduction: Reproduction) -> list[str]:
    """The runs the tables show, in the order they first appear."""
    return list(dict.fromkeys(row.run for table in reproduction.tables for row in table.rows))


# ---------------------------------------------------------------------------- as a sweep
def teacher_checkpoint(reproduction: Reproduction, root: Path) -> Path:
    return root / TEACHER / "checkpoints" / str(reproduction.teacher.train.steps)


def bases(reproduction: Reproduction, root: Path) -> dict[str, Any]:
    """The sweep's base configs: the teacher; the student, starting from and distilling from the
    teacher's last checkpoint with the shared calibration cache; the evaluation on the students' data."""
    checkpoint = str(teacher_checkpoint(reproduction, root))
    student = copy.deepcopy(reproduction.student)
    student.init_from = student.teacher = checkpoint
    student.calibration.cache_dir = str(root / "calibration")
    evaluation = copy.deepcopy(reproduction.evaluation)
    evaluation.data = copy.deepcopy(student.data)
    evaluation.reference = checkpoint
    return {TEACHER: lambda: reproduction.teacher, "student": lambda: student, "evaluation": lambda: evaluation}


def seed_label(seed: int) -> str:
    return f"seed{seed}"


def student_point(reproduction: Reproduction, run: str, seed: int) -> sweep.Point:
    overrides = {sweep.CONFIG_KEY: "student", **reproduction.runs[run], "seed": seed, "data.shuffle_seed": seed}
    return sweep.Point((("run", run), (sweep.SEED_AXIS, seed_label(seed))), overrides)


def final_checkpoint(point: sweep.Point, base: dict[str, Any], root: Path) -> Path:
    """The last checkpoint a student point will write, from its planned stages."""
    point_run, found = sweep.build_point(point, "train", base, root)
    if found:
        raise ReproduceError(f"point {point.name}: " + "; ".join(found))
    last = train.plan_run(point_run.config).stages[-1]
    return last.directory / "checkpoints" / str(last.end_step)


def evaluation_point(point: sweep.Point, kind: str, model: Path, overrides: Mapping[str, Any]) -> sweep.Point:
    return sweep.Point((*point.labels, ("eval", kind)),
                       {sweep.COMMAND_KEY: "evaluate", sweep.CONFIG_KEY: "evaluation", "model": str(model), **overrides})  # fmt: skip


# A speculative point only decodes; an extra source's point only measures the held-out loss.
DECODING_ONLY = {"heldout.num_batches": 0}
HELDOUT_ONLY = {"decoding.num_prompts": 0, "heldout.num_drafts": 0}


def as_sweep(reproduction: Reproduction, root: Path) -> tuple[sweep.Sweep, dict[str, Any]]:
    """The sweep of `reproduction` under `root` (teacher first, then run by run with its seeds
    together, each followed by its evaluations) and its base configs."""
    found = reproduction.problems()
    if found:
        raise ReproduceError("bad reproduction:\n  " + "\n  ".join(found))
    base = bases(reproduction, root)
    points = [sweep.Point((("run", TEACHER),), {sweep.CONFIG_KEY: TEACHER})]
    for run in used_runs(reproduction):
        for seed in reproduction.seeds:
            point = student_point(reproduction, run, seed)
            points.append(point)
            evaluations = {source: {**HELDOUT_ONLY, **{f"data.{k}": v for k, v in data.items()}}
                           for source, data in reproduction.extra_sources.items()}  # fmt: skip
            if run in reproduction.speculative_runs:
                evaluations = {SPECULATIVE: DECODING_ONLY, **evaluations}
            if evaluations:
                model = final_checkpoint(point, base, root)
                points += [evaluation_point(point, kind, model, o) for kind, o in evaluations.items()]
    return sweep.Sweep(tuple(points), command="train", workdir=str(root)), base


# ---------------------------------------------------------------------------- measures
def train_measures(summary: Mapping[str, float], run_dir: Path) -> dict[str, float]:
    """A finished student's measures from its final summary and its held-out record at step 0."""
    out = {"heldout_ce": summary["heldout_ce"]}
    if "heldout_kd" in summary:
        out["kl"] = summary["heldout_kd"]
    if "heldout_top1_agreement" in summary:
        out["top1_agreement"] = summary["heldout_top1_agreement"]
    out.update({f"tf_acc_{key.rsplit('_', 1)[1]}": value for key, value in summary.items()
                if key.startswith("heldout_mtp_acc_")})  # fmt: skip
    history = pipeline.histories(run_dir)[0]  # step 0: evaluated right after the first cut (eval_at_start)
    if history.exists():
        for metric in ("ce", "top1_agreement"):
            at_start = read_history(history, f"heldout/{metric}").get(0)
            if at_start is not None:
                out[f"oneshot_{metric}"] = at_start
    return out


def evaluation_measures(kind: str, summary: Mapping[str, float]) -> dict[str, float]:
    """Speculative acceptance, or an extra source's held-out loss and agreement."""
    if kind == SPECULATIVE:
        prefix = "decoding/speculative/"
        return {f"spec_{k.removeprefix(prefix)}": v for k, v in summary.items()
                if k.startswith(prefix + "acc_") or k == prefix + "speedup"}  # fmt: skip
    out = {f"{kind}_ce": summary["heldout/loss"]}
    if "heldout/top1_agreement" in summary:
        out[f"{kind}_top1_agreement"] = summary["heldout/top1_agreement"]
    return out


def collect(records: Sequence[dict], root: Path) -> dict[str, dict[int, dict[str, float]]]:
    """{run: {seed: measures}} of every done student point and its evaluations; the teacher is run
    "teacher", seed -1."""
    measures: dict[str, dict[int, dict[str, float]]] = {}
    for record in records:
        if record.get("status") != "done":
            continue
        labels = record["labels"]
        run = labels["run"]
        seed = int(labels[sweep.SEED_AXIS].removeprefix("seed")) if sweep.SEED_AXIS in labels else -1
        target = measures.setdefault(run, {}).setdefault(seed, {})
        if "eval" in labels:
            target.update(evaluation_measures(labels["eval"], record["summary"]))
        else:
            target.update(train_measures(record["summary"], root / record["name"]))
    return measures


Stat = tuple[float, float, int]  # mean, standard deviation (ddof 1; 0 for one value), n


def statistics(values: Sequence[float]) -> Stat | None:
    if not values:
        return None
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0, len(values)


def row_statistics(measures: Mapping[int, Mapping[str, float]], metric: str) -> Stat | None:
    return statistics([m[metric] for _, m in sorted(measures.items()) if metric in m])


# ---------------------------------------------------------------------------- orderings
@dataclasses.dataclass(frozen=True)
class Comparison:
    """The paper's `better` row against its `worse` one, here: the mean over the seeds both rows ran of
    their per-seed difference in our ranking measure (positive: `better` is better here too), and its
    standard error. Paired by seed: a seed fixes the training tokens, so the pairing removes the
    spread that the data order puts into both rows alike."""

    worse: str
    better: str
    difference: float | None
    standard_error: float | None
    seeds: int = 0

    @property
    def holds(self) -> bool | None:
        return None if self.difference is None else self.difference > 0

    @property
    def significant(self) -> bool | None:
        """|difference| > 2 SE; None without an error estimate (fewer than two seeds both rows ran)."""
        if self.difference is None or not self.standard_error:
            return None
        return abs(self.difference) > 2 * self.standard_error

    def sentence(self) -> str:
        if self.difference is None:
            return f"{self.better} vs {self.worse}: not measured (a run is missing)"
        direction = "holds" if self.holds else "does NOT hold"
        noise = {True: "beyond 2 SE", False: "within 2 SE (not resolved)", None: "no error estimate (one seed)"}
        se = f" +- {self.standard_error:.4f} SE" if self.standard_error else ""
        return (f"paper: {self.better} > {self.worse}; here: {direction}, difference {self.difference:+.4f}{se} "
                f"(paired, {self.seeds} seed{'s' if self.seeds > 1 else ''}), {noise[self.significant]}")  # fmt: skip


def compare(table: Table, values: Mapping[str, Mapping[int, float]]) -> list[Comparison]:
    """Each of the paper's (worse, better) pairs in our `rank_by` measure, paired by seed (`values`:
    {row label: {seed: value}})."""
    sign = 1.0 if table.higher_is_better else -1.0
    comparisons = []
    for worse, better in table.paper_pairs():
        a, b = values.get(worse, {}), values.get(better, {})
        seeds = sorted(a.keys() & b.keys())
        if not seeds:
            comparisons.append(Comparison(worse, better, None, None))
            continue
        differences = [sign * (b[seed] - a[seed]) for seed in seeds]  # [n]
        se = float(np.std(differences, ddof=1)) / math.sqrt(len(seeds)) if len(seeds) > 1 else None
        comparisons.append(Comparison(worse, better, float(np.mean(differences)), se, len(seeds)))
    return comparisons


def verdict(comparisons: Sequence[Comparison]) -> str:
    """One line: whether the paper's ordering holds here, and how much of it is resolved."""
    measured = [c for c in comparisons if c.difference is not None]
    if not comparisons:
        return "The paper states no ordering for these rows."
    if not measured:
        return "Not measured yet."
    held = [c for c in measured if c.holds]
    resolved = [c for c in measured if c.significant]
    whole = "holds here" if len(held) == len(comparisons) else "does NOT hold here"
    return (f"The paper's ordering {whole}: {len(held)} of {len(comparisons)} pairs in the paper's direction, "
            f"{len(resolved)} of {len(measured)} differences beyond two standard errors.")  # fmt: skip


# ---------------------------------------------------------------------------- the report
def table_metrics(table: Table, reproduction: Reproduction) -> list[str]:
    return [*table.metrics, *(f"{source}_ce" for source in reproduction.extra_sources)]


def _cell(stat: Stat | None) -> str:
    if stat is None:
        return "-"
    mean, std, n = stat
    return f"{mean:.4f} +- {std:.4f} ({n})"


def table_markdown(table: Table, reproduction: Reproduction, measures: Mapping[str, Mapping[int, dict]]) -> str:
    metrics = table_metrics(table, reproduction)
    lines = [f"## {table.title}", ""]
    if table.paper_metric:
        lines += [f"Paper's numbers: {table.paper_metric}.", ""]
    lines += ["| row | run | paper | " + " | ".join(metrics) + " |", "|---|---|---:|" + "---:|" * len(metrics)]
    ranking = {}
    for row in table.rows:
        cells = [row_statistics(measures.get(row.run, {}), metric) for metric in metrics]
        ranking[row.label] = {seed: m[table.rank_by] for seed, m in measures.get(row.run, {}).items()
                              if table.rank_by in m}  # fmt: skip
        paper = "" if row.paper is None else f"{row.paper:g}"
        lines.append(f"| {row.label} | `{row.run}` | {paper} | " + " | ".join(map(_cell, cells)) + " |")
    lines.append("")
    better = "higher" if table.higher_is_better else "lower"
    lines.append(f"Ranked by `{table.rank_by}` ({better} is better here; the paper's numbers: higher is better).")
    if table.paper_claim:
        lines.append(f"The paper: {table.paper_claim}.")
    comparisons = compare(table, ranking)
    lines += ["", verdict(comparisons), ""]
    lines += [f"- {comparison.sentence()}" for comparison in comparisons]
    return "\n".join(lines)


def environment() -> dict[str, str]:
    import jax

    versions = {}
    for name in VERSIONS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return {
        "python": platform.python_version(), **versions, "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(), "cpu_count": str(os.cpu_count()),
        "backend": jax.default_backend(), "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
    }  # fmt: skip


def read_invocations(root: Path) -> list[dict]:
    path = root / INVOCATIONS_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def record_invocation(root: Path, entry: dict) -> None:
    root.mkdir(parents=True, exist_ok=True)
    with (root / INVOCATIONS_FILE).open("a") as f:
        f.write(json.dumps(entry) + "\n")


def setup_markdown(reproduction: Reproduction, records: Sequence[dict], root: Path) -> str:
    teacher, student = reproduction.teacher, reproduction.student
    tokens_per_step = student.train.global_batch_size * student.data.seq_len
    teacher_tokens = teacher.train.steps * teacher.train.global_batch_size * teacher.data.seq_len
    budgets = sorted({int(r["summary"]["step"]) for r in records if r.get("status") == "done" and "eval" not in r["labels"]
                      and r["labels"]["run"] != TEACHER and "step" in r["summary"]})  # fmt: skip
    lines = ["## Set-up", "", reproduction.description.strip(), ""] if reproduction.description else ["## Set-up", ""]
    teacher_record = next((r for r in records if r["name"] == TEACHER and r.get("status") == "done"), None)
    if teacher_record:
        arch = train.final_architecture(root / TEACHER)
        count = count_parameters(arch)
        lines.append(f"- Teacher: {arch.num_hidden_layers} layers, hidden {arch.hidden_size}, {arch.num_experts} "
                     f"experts top-{arch.num_experts_per_tok}, MTP {arch.num_mtp_layers}; {format_count(count.total)} "
                     f"parameters ({format_count(count.active)} active); pretrained on {teacher_tokens:,} tokens; "
                     f"held-out CE {teacher_record['summary']['heldout_ce']:.4f}.")  # fmt: skip
    for steps in budgets:
        lines.append(f"- Students: {steps} steps = {steps * tokens_per_step:,} tokens each "
                     f"({steps * tokens_per_step / teacher_tokens:.2f} of the teacher's), the same tokens for every "
                     "student of a seed.")  # fmt: skip
    lines.append(f"- Seeds: {', '.join(map(str, reproduction.seeds))} (the student's random parts and the order of "
                 "its training windows); mean +- standard deviation (ddof 1) over them, n in brackets. A seed "
                 "gives every student the same tokens, so the orderings compare rows seed by seed: the mean "
                 "per-seed difference and its standard error.")  # fmt: skip
    lines.append("- Held-out data: the data config's held-out documents, never seen in training or calibration "
                 "(calibration draws from the training split).")  # fmt: skip
    if reproduction.extra_sources:
        lines.append(f"- Extra evaluation sources: {', '.join(reproduction.extra_sources)} (`<source>_ce` columns).")
    lines += ["", "Measures:", ""] + [f"- `{name}`: {text}" for name, text in MEASURES.items()]
    return "\n".join(lines)


def runs_markdown(reproduction: Reproduction) -> str:
    """Every run the tables show and its overrides of the students' base config."""
    lines = ["## The runs", "", "| run | overrides of the students' base config |", "|---|---|"]
    for run in used_runs(reproduction):
        overrides = ", ".join(f"`{k}={v!r}`" for k, v in reproduction.runs[run].items()) or "(none: the base)"
        lines.append(f"| `{run}` | {overrides} |")
    return "\n".join(lines)


def run_markdown(records: Sequence[dict], invocations: Sequence[dict]) -> str:
    done = [r for r in records if r.get("status") == "done"]
    failed = [r for r in records if r.get("status") == "failed"]
    pending = [r for r in records if r.get("status") not in ("done", "failed")]
    compute = sum(r.get("wall_seconds", 0.0) for r in done)
    lines = ["## How it ran", ""]
    lines.append(f"- Points: {len(done)} done, {len(failed)} failed, {len(pending)} not run; the done points' "
                 f"wall times add up to {format_duration(compute)}.")  # fmt: skip
    lines += [f"- The teacher: trained once in {format_duration(r['wall_seconds'])}; the invocations after it "
              "reuse it." for r in done if r["name"] == TEACHER and "wall_seconds" in r]  # fmt: skip
    lines += [f"- FAILED: `{r['name']}`: {r.get('error', '')}" for r in failed]
    if invocations:
        lines += ["", "| started (UTC) | command | points run | wall time |", "|---|---|---:|---:|"]
        lines += [f"| {i['started']} | `{i['command']}` | {i['points_run']} | {format_duration(i['wall_seconds'])} |"
                  for i in invocations]  # fmt: skip
        env = invocations[-1]["environment"]
        lines += ["", "Machine and versions (last invocation): " + ", ".join(f"{k} {v}" for k, v in env.items()) + "."]
    return "\n".join(lines)


def plot_table(table: Table, measures: Mapping[str, Mapping[int, dict]], output: Path) -> None:
    """One panel per `bars` measure: the rows' means, their standard deviation as error bars, each
    seed as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(table.bars), figsize=(3.2 * len(table.bars) + 1.5, 3.6), squeeze=False)
    labels = [row.label for row in table.rows]
    for ax, metric in zip(axes[0], table.bars):
        stats = [row_statistics(measures.get(row.run, {}), metric) for row in table.rows]
        means = [s[0] if s else math.nan for s in stats]
        ax.bar(range(len(labels)), means, yerr=[s[1] if s else 0.0 for s in stats], capsize=3, alpha=0.6)
        for i, row in enumerate(table.rows):
            values = [m[metric] for m in measures.get(row.run, {}).values() if metric in m]
            ax.plot([i] * len(values), values, "k.", ms=4)
        finite = [v for v in means if np.isfinite(v)]
        if finite:
            spread = max(finite) - min(finite) + max((s[1] for s in stats if s), default=0.0)
            ax.set_ylim(min(finite) - spread - 1e-3, max(finite) + spread + 1e-3)
        ax.set_title(metric, fontsize=9)
        ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(table.title, fontsize=9)
    fig.tight_layout()
    fig.savefig(output, dpi=110)
    plt.close(fig)


def plot_curves(table: Table, records: Sequence[dict], root: Path, teacher_ce: float | None, output: Path) -> None:
    """The rows' held-out cross-entropy against the step: the mean over the seeds, +- one standard
    deviation shaded (the paper's Fig. 2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for row in table.rows:
        curves = []
        for record in records:
            labels = record["labels"]
            if record.get("status") == "done" and labels.get("run") == row.run and "eval" not in labels:
                points = {}
                for history in pipeline.histories(root / record["name"]):
                    points.update(read_history(history, "heldout/ce"))
                curves.append(points)
        steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        if not steps:
            continue
        values = np.array([[c[s] for s in steps] for c in curves])  # [seeds, steps]
        mean, std = values.mean(0), values.std(0, ddof=1) if len(values) > 1 else np.zeros(len(steps))
        ax.plot(steps, mean, marker="o", ms=3, label=f"{row.label} (n={len(values)})")
        ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
    if teacher_ce is not None:
        ax.axhline(teacher_ce, ls="--", color="gray", lw=1, label=f"teacher ({teacher_ce:.3f})")
    ax.set_xlabel("student step")
    ax.set_ylabel("held-out cross-entropy (nats/byte)")
    ax.set_title(table.title.split(" (")[0] + ": held-out loss during training", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(output, dpi=110)
    plt.close(fig)


def write_results(reproduction: Reproduction, definition: sweep.Sweep, root: Path, results: Path) -> str:
    """`results` (markdown) and its PNGs beside it (`<stem>_<table>.png`, `<stem>_<table>_curves.png`)
    from the run directories under `root`; returns the markdown."""
    records = sweep.records_of(definition, root)
    measures = collect(records, root)
    results.parent.mkdir(parents=True, exist_ok=True)
    teacher = measures.get(TEACHER, {}).get(-1, {})
    lines = ["# The paper's findings at small scale", "",
             f"Written by `python -m slimqwen_jax.reproduce` from the runs in `{root}`, "
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.", "",
             setup_markdown(reproduction, records, root), ""]  # fmt: skip
    for table in reproduction.tables:
        lines += [table_markdown(table, reproduction, measures), ""]
        chart = results.with_name(f"{results.stem}_{table.key}.png")
        if any(measures.get(row.run) for row in table.rows):
            plot_table(table, measures, chart)
            lines += [f"![{table.key}]({chart.name})", ""]
            if table.curves:
                curves = results.with_name(f"{results.stem}_{table.key}_curves.png")
                plot_curves(table, records, root, teacher.get("heldout_ce"), curves)
                lines += [f"![{table.key} curves]({curves.name})", ""]
    lines += [runs_markdown(reproduction), "", run_markdown(records, read_invocations(root)), ""]
    text = "\n".join(lines)
    storage.write_text(results, text)
    return text


# ---------------------------------------------------------------------------- the command
def use_compile_cache(root: Path) -> None:
    """Keep compiled programs in `<root>/compile_cache` (unless JAX_COMPILATION_CACHE_DIR names
    another), so that points of equal programs (the seeds of one run) compile once."""
    import jax

    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", str(root / "compile_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def run(reproduction: Reproduction, root: Path, results: Path | None = None, *, list_only: bool = False,
        command: str = "") -> list[dict]:  # fmt: skip
    """Run what is missing of `reproduction` under `root`, then write the report to `results`
    (default `<root>/results.md`); returns the points' records. Every point is checked first."""
    definition, base = as_sweep(reproduction, root)
    runs = sweep.build_points(definition, base, root)
    print("\n".join(sweep.status_lines(runs)))
    if list_only:
        return [r.record() or sweep.pending(r.point) for r in runs]
    use_compile_cache(root)
    todo = sum((r.record() or {}).get("status") != "done" for r in runs)
    started, start = datetime.datetime.now(datetime.timezone.utc), time.perf_counter()
    try:
        teacher = sweep.run_points(runs[:1])[0]  # every other point starts from it
        if teacher["status"] != "done":
            raise ReproduceError(
                f"the teacher failed: {teacher.get('error')} (its log: {runs[0].directory / 'log.txt'})"
            )
        records = sweep.run_points(runs)
    finally:
        if todo:
            record_invocation(root, {"started": f"{started:%Y-%m-%d %H:%M}", "command": command or "reproduce.run",
                                     "points_run": todo, "wall_seconds": time.perf_counter() - start,
                                     "environment": environment()})  # fmt: skip
    sweep.write_report(definition, records, root)
    results = results or root / "results.md"
    write_results(reproduction, definition, root, results)
    log.info("reproduce: report in %s", results)
    return records


def load_reproduction(path: str, scale: int) -> Reproduction:
    module = load_config_file(path)
    if not hasattr(module, "get_reproduction"):
        raise ReproduceError(f"{path} defines no get_reproduction(scale)")
    reproduction = module.get_reproduction(scale)
    if not isinstance(reproduction, Reproduction):
        raise ReproduceError(f"{path}: get_reproduction() returned {type(reproduction).__name__}, not a Reproduction")
    return reproduction


def parse_seeds(text: str) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ReproduceError(f"--seeds must be comma-separated integers, got {text!r}") from None


def main(argv: list[str]) -> None:
    del argv
    cli.start_tool()
    fl = flags.FLAGS
    try:
        if fl.scale < 1:
            raise ReproduceError(f"--scale must be >= 1, got {fl.scale}")
        seeds = [0] if fl.quick else parse_seeds(fl.seeds)
        if fl.quick and fl.seeds:
            raise ReproduceError("--quick runs seed 0 alone; drop --seeds")
        tables = [key.strip() for key in fl.tables.split(",") if key.strip()]
        reproduction = select(load_reproduction(fl.config, fl.scale), tables, seeds)
        root = Path(fl.workdir or f"runs/reproduce{'' if fl.scale == 1 else f'_scale{fl.scale}'}")
        records = run(reproduction, root, Path(fl.results) if fl.results else None, list_only=fl.list,
                      command=shlex.join(["python", "-m", "slimqwen_jax.reproduce", *sys.argv[1:]]))  # fmt: skip
    except ConfigError as error:
        log.error("error: %s", error)
        sys.exit(1)
    except (KeyboardInterrupt, train.Interrupted) as error:
        log.error("error: reproduction interrupted (%s); rerun the same command to resume", error or "Ctrl-C")
        sys.exit(1)
    failed = [r["name"] for r in records if r.get("status") == "failed"]
    if failed and not fl.list:
        log.error("error: %d point(s) failed: %s (their logs: <point>/log.txt)", len(failed), ", ".join(failed))
        sys.exit(1)


def define_flags() -> None:
    flags.DEFINE_string("config", None, "Reproduction config file: get_reproduction(scale).", required=True)
    flags.DEFINE_string("workdir", "", "Where the runs go (default runs/reproduce, runs/reproduce_scale<k>).")
    flags.DEFINE_string("results", "", "The report's path (default <workdir>/results.md); PNGs beside it.")
    flags.DEFINE_bool("quick", False, "One seed (0) for every table.")
    flags.DEFINE_string("seeds", "", "Comma-separated seeds (default: the config's).")
    flags.DEFINE_integer("scale", 1, "Grow the models and budgets by this factor (the config's get_reproduction).")
    flags.DEFINE_string("tables", "", "Only these tables (comma-separated keys, e.g. table1,table8).")
    flags.DEFINE_bool("list", False, "List the points and their status; run nothing.")


if __name__ == "__main__":
    from slimqwen_jax import reproduce as imported  # the module whose classes the config files build

    imported.define_flags()
    app.run(imported.main, flags_parser=cli.parse_flags)
