"""The SlimQwen pipeline as one command: teacher, pruned + distilled student, baselines, report.

    python -m slimqwen_jax.pipeline --config configs/slimqwen_tiny.py [--config.key=value ...]

The config is a staged train config (the student) with `pipeline.teacher`, the train config that
pretrains the teacher. Under `workdir`: `teacher/` (skipped when its last checkpoint exists),
`student/` (init_from and teacher: the teacher's last checkpoint), then the runs
`pipeline.baselines` names at the same tokens: `pruned_lm_only/` (the same stages, LM and MTP-LM
losses only) and `from_scratch/` (the student's final architecture as it came out of its stages,
random init, same objective), then `report.md`, `report.json` and `report.png` (the held-out loss
curves of every run together). Every run resumes where it was killed. Exit codes: 0 done, 1 bad
input or a failed run, 2 bad command line.
"""

from __future__ import annotations

import copy
import json
import logging
import sys
from pathlib import Path

import jax
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from slimqwen_jax import cli, storage, train
from slimqwen_jax.checkpoint import TrainingCheckpoints
from slimqwen_jax.compression import count_parameters, format_count
from slimqwen_jax.config import ConfigError
from slimqwen_jax.progress import plot_runs

log = logging.getLogger("slimqwen_jax.pipeline")

# The report's label of each run, in the report's order.
LABELS = {"teacher": "teacher", "student": "pruned + KD", "pruned_lm_only": "pruned + LM only",
          "from_scratch": "from scratch"}  # fmt: skip


def run_configs(config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
    """The train configs of the pipeline's runs (teacher, student, then `pipeline.baselines` in the
    report's order), each in its own directory under `config.workdir`."""
    root = storage.path(config.workdir)
    teacher = copy.deepcopy(config.pipeline.teacher)
    teacher.workdir = str(root / "teacher")
    teacher.update({key: config[key] for key in ("dry_run", "compile_topology", "compile_mfu")})
    teacher_checkpoint = str(root / "teacher" / "checkpoints" / str(teacher.train.steps))
    student = copy.deepcopy(config)
    student.pipeline.teacher = None  # a plain staged train run from here on
    student.workdir, student.init_from, student.teacher = str(root / "student"), teacher_checkpoint, teacher_checkpoint
    configs = {"teacher": teacher, "student": student}
    for name in (name for name in LABELS if name in config.pipeline.baselines):
        configs[name] = copy.deepcopy(student)
        configs[name].workdir, configs[name].baseline = str(root / name), name
    return configs


def histories(workdir: Path) -> list[Path]:
    """The metrics.jsonl of a run's stages in order (single-stage runs: the workdir's own)."""
    stages = sorted(workdir.glob("stage_*/metrics.jsonl"), key=lambda p: int(p.parent.name.split("_")[1]))
    return stages or [workdir / "metrics.jsonl"]


def write_report(root: Path, configs: dict[str, ml_collections.ConfigDict]) -> str:
    """report.json, report.md (the table) and report.png (held-out CE of every run)."""
    rows = []
    for name, config in configs.items():
        summary = train.final_summary(storage.path(config.workdir))
        cfg = train.final_architecture(storage.path(config.workdir))
        count = count_parameters(cfg)
        rows.append(dict(
            run=LABELS[name], layers=cfg.num_hidden_layers, hidden=cfg.hidden_size, experts=cfg.num_experts,
            top_k=cfg.num_experts_per_tok, total=count.total, active=count.active,
            heldout_ce=summary["heldout_ce"], top1_agreement=summary.get("heldout_top1_agreement", 1.0),
            tokens=summary["step"] * config.train.global_batch_size * config.data.seq_len,
        ))  # fmt: skip
    (root / "report.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [
        "| run | layers | hidden | experts (top-k) | parameters (active) | training tokens | held-out CE | "
        "top-1 agreement with the teacher |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['run']} | {r['layers']} | {r['hidden']} | {r['experts']} ({r['top_k']}) | {format_count(r['total'])} "
        f"({format_count(r['active'])}) | {r['tokens']:,} | {r['heldout_ce']:.4f} | {r['top1_agreement']:.1%} |"
        for r in rows
    ]
    ce = {name: row["heldout_ce"] for name, row in zip(configs, rows)}
    lines.append("")
    for name in ("pruned_lm_only", "from_scratch"):
        if name in ce:
            difference = ce[name] - ce["student"]
            lines.append(f"pruned + KD ends {difference:.3f} nats below {LABELS[name]}" if difference > 0 else
                         f"pruned + KD does NOT beat {LABELS[name]} ({ce['student']:.4f} vs {ce[name]:.4f})")  # fmt: skip
    table = "\n".join(lines)
    (root / "report.md").write_text(table + "\n")
    curves = {LABELS[name] + (" (its pretraining)" if name == "teacher" else ""): histories(storage.path(config.workdir))
              for name, config in configs.items()}  # fmt: skip
    teacher = {f"teacher's final ({ce['teacher']:.3f})": ce["teacher"]}
    plot_runs(curves, root / "report.png", "heldout/ce", "held-out cross-entropy of every run", teacher)
    return table


def run(config: ml_collections.ConfigDict) -> str:
    """Run what is missing of the pipeline and write its report; returns the report table. Every
    run is planned (every config checked) before the first minute of training; the from-scratch
    baseline is planned again once the student has run, on the architecture its stages produced.
    With `dry_run` (and `compile_topology`), prints every run's plan (and compiled steps) instead."""
    if config.pipeline.teacher is None:
        raise ConfigError("a pipeline config needs pipeline.teacher: the train config that pretrains the teacher")
    configs = run_configs(config)
    plans = {name: train.plan_run(configs[name]) for name in configs if name != "from_scratch"}
    if "from_scratch" in configs:  # checked now on the planned architecture
        plans["from_scratch"] = train.plan_run(configs["from_scratch"], plans["student"].stages[-1].architecture)
    if config.dry_run:  # every run's plan, and with compile_topology its steps compiled; nothing trained
        for name, plan in plans.items():
            print(f"\n{LABELS[name]} ({configs[name].workdir}):")
            train.dry_run(plan)
        return ""
    teacher = configs["teacher"]
    if TrainingCheckpoints(teacher.workdir).latest_step() == teacher.train.steps:
        log.info("teacher: reusing %s", teacher.workdir)
    else:
        log.info("teacher: pretraining in %s", teacher.workdir)
        train.execute(plans["teacher"])
    for name in configs:
        if name == "teacher":
            continue
        if name == "from_scratch":  # planned again on the architecture the student's stages produced
            architecture = train.final_architecture(storage.path(configs["student"].workdir))
            plans[name] = train.plan_run(configs[name], architecture)
        log.info("%s: %s", name, configs[name].workdir)
        train.execute(plans[name])
    table = write_report(storage.path(config.workdir), configs) if jax.process_index() == 0 else ""
    print(table)
    return table


def main(argv: list[str]) -> None:
    del argv
    cli.start_tool(cpu_only=flags.FLAGS.config.dry_run)
    try:
        run(flags.FLAGS.config)
    except train.RUN_ERRORS as error:
        log.error("error: %s", error)
        sys.exit(1)


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "Pipeline config file (configs/slimqwen_*.py).", lock_config=True)
    app.run(main, flags_parser=cli.parse_flags)
