"""The reproduction command end to end in its smallest setting (tiny models, two seeds, two tables),
the definitions it refuses, and its statistics."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from slimqwen_jax import reproduce, sweep

REPO = Path(__file__).resolve().parents[1]

SMALLEST = """
from slimqwen_jax.config import tiny
from slimqwen_jax.reproduce import Reproduction, Row, Table
from slimqwen_jax.run_config import base_config, evaluate_base_config, loss_section, model_section

MODEL = tiny(num_hidden_layers=2)  # compiling is most of the time: as few layers as will do


def common(config):
    config.model = model_section(MODEL)
    config.data.update(source="text", paths=TRAIN, seq_len=64, heldout_fraction=0.25)
    config.train.update(global_batch_size=8, eval_every=2, eval_batches=2, eval_batch_size=8, eval_mtp_drafts=2,
                        checkpoint_every=4, log_every=2)
    return config


def get_reproduction(scale=1):
    teacher = common(base_config())
    teacher.train.update(steps=8, eval_every=8, checkpoint_every=8, eval_mtp_drafts=0)
    student = common(base_config())
    student.train.update(steps=0, eval_at_start=True, eval_mtp_drafts=0)
    student.loss = loss_section(distillation=True)
    student.loss.teacher_dtype = "float32"
    student.calibration.update(num_samples=8, seq_len=64)
    student.schedule = "one_stage"
    student.schedule_options.steps = 4
    student.schedule_options.width.update(hidden_size=48, multiple_of=16)
    student.schedule_options.experts.update(num_experts=4)
    evaluation = evaluate_base_config()
    evaluation.heldout.update(batch_size=8, num_batches=1, num_drafts=2)
    evaluation.decoding.update(num_prompts=2, prompt_len=8, max_new_tokens=6, num_drafts=2, uncached=False)
    tables = (
        Table("table1", "Table 1: baselines", (Row("pruned + LM only", "lm-only", 69.96),
              Row("pruned + KD", "full", 73.45)), ("heldout_ce", "kl", "top1_agreement", "oneshot_ce"), curves=True),
        Table("table3", "Table 3: agreement", (Row("LM only", "lm-only"), Row("KD", "full")),
              ("top1_agreement", "kl"), claims=(("LM only", "KD"),), rank_by="top1_agreement"),
    )
    runs = {"full": {}, "lm-only": {"baseline": "pruned_lm_only"}}  # one architecture: one compile
    return Reproduction(teacher=teacher, student=student, evaluation=evaluation, runs=runs, tables=tables,
                        seeds=(0, 1), extra_sources=EXTRA)
"""

NUMBER = re.compile(r"(-?\d+\.\d{4}) \+- (\d+\.\d{4}) \((\d+)\)")


def test_the_real_config_builds_every_point(tmp_path):
    reproduction = reproduce.load_reproduction(str(REPO / "configs" / "reproduce.py"), 1)
    definition, base = reproduce.as_sweep(reproduction, tmp_path)
    runs = sweep.build_points(definition, base, tmp_path)  # every point checked: raises on any problem
    names = {r.name for r in runs}
    for table in reproduction.tables:
        for row in table.rows:
            assert all(f"{row.run}_seed{s}" in names for s in (0, 1, 2)), row
    assert {"full_seed0_speculative", "kd-lm-mtplm_seed2_speculative"} <= names
    teacher_steps = reproduction.teacher.train.steps
    assert all(
        r.config.schedule_options.steps * 5 <= teacher_steps
        for r in runs
        if r.name != "teacher" and r.command == "train"
    )


def test_bad_definitions_are_refused(tmp_path):
    reproduction = reproduce.load_reproduction(str(REPO / "configs" / "reproduce.py"), 1)
    bad = reproduce.Reproduction(
        **{
            **reproduction.__dict__,
            "tables": (reproduce.Table("t", "t", (reproduce.Row("x", "no-such-run"),), ("heldout_ce",)),),
        }
    )
    with pytest.raises(reproduce.ReproduceError, match="no-such-run"):
        reproduce.as_sweep(bad, tmp_path)
    with pytest.raises(reproduce.ReproduceError, match="table9"):
        reproduce.select(reproduction, ["table9"])


def write_smallest(tmp_path: Path) -> Path:
    text_dir = tmp_path / "other"
    text_dir.mkdir()
    for i in range(4):  # another kind of text than the training corpus, split by document
        (text_dir / f"{i}.txt").write_text(
            (f"Document {i}: the quick brown fox jumps over the lazy dog. " * 40 + "\n") * 8
        )
    extra = {"prose": {"source": "text", "paths": str(text_dir / "*.txt"), "heldout_fraction": 0.5}}
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, path in enumerate(sorted(Path(json.__file__).parent.glob("*.py"))):  # a few source files as documents
        (corpus / f"{i}.txt").write_text(path.read_text() * 3)
    config = tmp_path / "smallest.py"
    config.write_text(f"EXTRA = {extra!r}\nTRAIN = {str(corpus / '*.txt')!r}\n" + SMALLEST)
    return config


@pytest.mark.slow
def test_smallest_reproduction_end_to_end(tmp_path):
    config, root, results = write_smallest(tmp_path), tmp_path / "runs", tmp_path / "docs" / "results.md"
    command = [
        sys.executable,
        "-m",
        "slimqwen_jax.reproduce",
        f"--config={config}",
        f"--workdir={root}",
        f"--results={results}",
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    text = results.read_text()
    for heading in ("## Set-up", "## Table 1: baselines", "## Table 3: agreement", "## The runs", "## How it ran"):
        assert heading in text
    for png in ("results_table1.png", "results_table1_curves.png", "results_table3.png"):
        assert (results.parent / png).stat().st_size > 1000
        assert f"]({png})" in text
    assert "69.96" in text and "73.45" in text  # the paper's numbers beside ours
    assert "prose_ce" in text  # the extra source has its own column

    # Every mean +- std (n) in the report is the statistics of the run directories' own numbers.
    records = {json.loads(p.read_text())["name"]: json.loads(p.read_text()) for p in root.glob("*/point.json")}
    per_seed = {}  # run -> [measures of one point], in seed order (the names sort by seed)
    for name, record in sorted(records.items()):
        run_dir = root / name
        labels = record["labels"]
        if labels["run"] == "teacher":
            continue
        if "eval" not in labels:
            summary = json.loads((sorted(run_dir.glob("stage_*/summary.json"))[-1]).read_text())
            heldout = [
                json.loads(line)
                for line in (run_dir / "stage_1" / "metrics.jsonl").read_text().splitlines()
                if "heldout/ce" in line
            ]
            assert heldout[0]["step"] == 0  # evaluated right after the cut, before training
            measures = {
                "heldout_ce": summary["heldout_ce"],
                "kl": summary["heldout_kd"],
                "top1_agreement": summary["heldout_top1_agreement"],
                "oneshot_ce": heldout[0]["heldout/ce"],
            }
        else:
            assert labels["eval"] == "prose"
            measures = {"prose_ce": json.loads((run_dir / "eval_report.json").read_text())["heldout"]["loss"]}
        per_seed.setdefault(labels["run"], []).append(measures)
    values = {}
    for run, points in per_seed.items():
        for measures in points:
            for key, value in measures.items():
                values.setdefault((run, key), []).append(value)
    cells = NUMBER.findall(text)
    assert len(cells) >= 10
    expected = {f"{np.mean(v):.4f} +- {np.std(v, ddof=1):.4f} ({len(v)})" for v in values.values() if len(v) == 2}
    for mean, std, n in cells:
        assert f"{mean} +- {std} ({n})" in expected
    assert n == "2"
    teacher_ce = json.loads((root / "teacher" / "summary.json").read_text())["heldout_ce"]
    assert f"held-out CE {teacher_ce:.4f}" in text

    # Each ordering: the mean per-seed difference (positive: the paper's direction) and its SE.
    def paired(better, worse, sign):
        return sign * (np.array(values[better]) - np.array(values[worse]))

    for label, difference in (
        ("pruned + KD > pruned + LM only", paired(("full", "heldout_ce"), ("lm-only", "heldout_ce"), -1)),
        ("KD > LM only", paired(("full", "top1_agreement"), ("lm-only", "top1_agreement"), 1)),
    ):
        se = difference.std(ddof=1) / np.sqrt(2)
        assert f"paper: {label}; here: " in text
        assert f"difference {difference.mean():+.4f} +- {se:.4f} SE (paired, 2 seeds)" in text, label
    assert "pruned + LM only" in text and "pairs in the paper's direction" in text

    # A rerun runs nothing and rewrites the same tables.
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 to run" in again.stderr
    assert NUMBER.findall(results.read_text()) == cells


def test_calibration_cache_file_is_keyed_by_what_decides_the_statistics(tmp_path):
    from slimqwen_jax import stage_plan, train
    from slimqwen_jax.run_config import base_config

    config = base_config()
    config.init_from = str(tmp_path / "teacher" / "checkpoints" / "5")
    config.calibration.cache_dir = str(tmp_path / "cache")
    stage = lambda index: stage_plan.Stage(index, None, 0, 1, 0, tmp_path / f"stage_{index + 1}", None)  # noqa: E731
    first = train.calibration_file(config, stage(0))
    assert first.parent == tmp_path / "cache"
    assert train.calibration_file(config, stage(1)) == tmp_path / "stage_2" / "calibration.npz"  # a trained model
    other_order = config.copy_and_resolve_references()
    other_order.data.shuffle_seed, other_order.seed = 7, 7  # the data order and the seed do not change them
    assert train.calibration_file(other_order, stage(0)) == first
    for path, value in (("calibration.num_samples", 8), ("data.seq_len", 64), ("init_from", str(tmp_path / "x"))):
        changed = config.copy_and_resolve_references()
        sweep.set_path(changed, path, value)
        assert train.calibration_file(changed, stage(0)) != first, path
    no_cache = config.copy_and_resolve_references()
    no_cache.calibration.cache_dir = ""
    assert train.calibration_file(no_cache, stage(0)) == tmp_path / "stage_1" / "calibration.npz"


def test_orderings_and_two_standard_errors_paired_by_seed():
    table = reproduce.Table(
        "t",
        "t",
        (reproduce.Row("a", "a", 1.0), reproduce.Row("b", "b", 3.0), reproduce.Row("c", "c", 2.0)),
        ("heldout_ce",),
    )
    assert table.paper_pairs() == [("a", "c"), ("c", "b")]  # worse -> better by the paper's numbers
    # Lower CE is better here. The seeds move every row alike (the data order): c beats a by 0.1 at
    # every seed, resolved although the rows' own spreads overlap; b against c moves with the seed.
    values = {"a": {0: 2.0, 1: 2.3, 2: 1.7}, "c": {0: 1.9, 1: 2.2, 2: 1.6}, "b": {0: 1.8, 1: 2.3, 2: 1.55}}
    first, second = reproduce.compare(table, values)
    assert first.holds and first.significant and abs(first.difference - 0.1) < 1e-12 and first.seeds == 3
    differences = np.array([0.1, -0.1, 0.05])  # c - b per seed
    assert abs(second.difference - differences.mean()) < 1e-12
    assert abs(second.standard_error - differences.std(ddof=1) / np.sqrt(3)) < 1e-12
    assert second.holds and not second.significant
    assert "holds here: 2 of 2" in reproduce.verdict([first, second])
    assert "does NOT hold" in reproduce.verdict(reproduce.compare(table, {**values, "b": {0: 2.5, 1: 2.5, 2: 2.5}}))
    # Only the seeds both rows ran are paired; one shared seed gives no error estimate.
    single = reproduce.compare(table, {**values, "a": {1: 2.3, 5: 0.0}})
    assert single[0].seeds == 1 and abs(single[0].difference - 0.1) < 1e-12
    assert single[0].significant is None and "one seed" in single[0].sentence()
    assert reproduce.compare(table, {**values, "a": {}})[0].difference is None


def test_a_teacher_that_trained_on_the_students_heldout_data_is_refused(tmp_path):
    reproduction = reproduce.load_reproduction(str(REPO / "configs" / "reproduce.py"), 1)
    teacher = reproduction.teacher.copy_and_resolve_references()
    teacher.data.heldout_fraction = 0.05
    bad = reproduce.Reproduction(**{**reproduction.__dict__, "teacher": teacher, "extra_sources": {"a_b": {}}})
    with pytest.raises(reproduce.ReproduceError, match="data.heldout_fraction") as error:
        reproduce.as_sweep(bad, tmp_path)
    assert "extra source 'a_b'" in str(error.value)
