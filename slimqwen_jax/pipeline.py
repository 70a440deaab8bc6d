"""The SlimQwen pipeline as one command: teacher, pruned + distilled student, baseline, report.

    python -m slimqwen_jax.pipeline --config configs/slimqwen_tiny.py [--config.key=value ...]

The config is a staged train config (the student) with `pipeline.teacher`, the train config that
pretrains the teacher. Under `workdir`: `teacher/` (skipped when its last checkpoint exists),
`student/` (init_from and teacher: the teacher's last checkpoint), `from_scratch/` (the
`from_scratch` baseline of the student config: the final architecture, random init, same objective
and tokens), then `report.md`, `report.json` and `report.png` (held-out loss curves). Every run
resumes where it was killed. Exit codes: 0 done, 1 bad input or a failed run, 2 bad command line.
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

from slimqwen_jax import cli, train
from slimqwen_jax.checkpoint import TrainingCheckpoints
from slimqwen_jax.compression import count_parameters, format_count
from slimqwen_jax.config import ConfigError, Qwen3NextConfig
from slimqwen_jax.progress import plot_runs

log = logging.getLogger("slimqwen_jax.pipeline")


def run_configs(config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
    """The three train configs (teacher, student, from_scratch), all under `config.workdir`."""
    root = Path(config.workdir)
    teacher = copy.deepcopy(config.pipeline.teacher)
    teacher.workdir = str(root / "teacher")
    teacher_checkpoint = str(root / "teacher" / "checkpoints" / str(teacher.train.steps))
    student = copy.deepcopy(config)
    student.pipeline.teacher = None  # a plain staged train run from here on
    student.workdir, student.init_from, student.teacher = str(root / "student"), teacher_checkpoint, teacher_checkpoint
    scratch = copy.deepcopy(student)
    scratch.workdir, scratch.baseline = str(root / "from_scratch"), "from_scratch"
    return {"teacher": teacher, "student": student, "from_scratch": scratch}


def final_summary(workdir: Path) -> dict:
    """The last stage's summary.json of a finished run (single-stage runs: the workdir's own)."""
    stages = sorted(workdir.glob("stage_*"), key=lambda p: int(p.name.split("_")[1]))
    return json.loads(((stages[-1] if stages else workdir) / "summary.json").read_text())


def histories(workdir: Path) -> list[Path]:
    return sorted(workdir.glob("stage_*/metrics.jsonl")) or [workdir / "metrics.jsonl"]


def write_report(root: Path, configs: dict[str, ml_collections.ConfigDict]) -> str:
    """report.json, report.md (the table) and report.png (held-out CE of student and baseline)."""
    rows = []
    for name, label in (("teacher", "teacher"), ("student", "pruned + KD"), ("from_scratch", "from scratch")):
        summary = final_summary(Path(configs[name].workdir))
        cfg = Qwen3NextConfig.from_dict(summary["architecture"])
        count = count_parameters(cfg)
        rows.append(dict(
            run=label, layers=cfg.num_hidden_layers, hidden=cfg.hidden_size, experts=cfg.num_experts,
            top_k=cfg.num_experts_per_tok, total=count.total, active=count.active,
            heldout_ce=summary["heldout_ce"], top1_agreement=summary.get("heldout_top1_agreement", 1.0),
            tokens=summary["step"] * configs[name].train.global_batch_size * configs[name].data.seq_len,
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
    student, scratch = rows[1]["heldout_ce"], rows[2]["heldout_ce"]
    verdict = (f"pruned + KD ends {scratch - student:.3f} nats below from scratch" if student < scratch
               else f"pruned + KD does NOT beat from scratch ({student:.4f} vs {scratch:.4f})")  # fmt: skip
    lines += ["", verdict]
    table = "\n".join(lines)
    (root / "report.md").write_text(table + "\n")
    curves = {f"pruned + KD, {p.parent.name}": p for p in histories(Path(configs["student"].workdir))}
    curves.update({"from scratch": p for p in histories(Path(configs["from_scratch"].workdir))})
    teacher = {f"teacher ({rows[0]['heldout_ce']:.3f})": rows[0]["heldout_ce"]}
    plot_runs(curves, root / "report.png", "heldout/ce", "held-out cross-entropy at equal tokens", teacher)
    return table


def run(config: ml_collections.ConfigDict) -> str:
    """Run what is missing of the pipeline and write its report; returns the report table. Every
    run is planned (every config checked) before the first minute of training."""
    if config.pipeline.teacher is None:
        raise ConfigError("a pipeline config needs pipeline.teacher: the train config that pretrains the teacher")
    configs = run_configs(config)
    plans = {name: train.plan_run(configs[name]) for name in configs}
    teacher = configs["teacher"]
    if TrainingCheckpoints(teacher.workdir).latest_step() == teacher.train.steps:
        log.info("teacher: reusing %s", teacher.workdir)
    else:
        log.info("teacher: pretraining in %s", teacher.workdir)
        train.execute(plans["teacher"])
    for name in ("student", "from_scratch"):
        log.info("%s: %s", name, configs[name].workdir)
        train.execute(plans[name])
    table = write_report(Path(config.workdir), configs) if jax.process_index() == 0 else ""
    print(table)
    return table


def main(argv: list[str]) -> None:
    del argv
    cli.start_tool()
    try:
        run(flags.FLAGS.config)
    except train.RUN_ERRORS as error:
        log.error("error: %s", error)
        sys.exit(1)


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "Pipeline config file (configs/slimqwen_*.py).", lock_config=True)
    app.run(main, flags_parser=cli.parse_flags)
