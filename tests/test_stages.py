"""Progressive prune -> distill stages: presets, planning and refusals, schedules across stages, the
stage transition against the prune CLI, exact resume after SIGKILL, the 23A2B dry run."""

import json
import math
import signal
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from tool_runs import DATA_CACHE_DIR, REPO, run_tool, start_tool

from slimqwen_jax import compression, data, losses, optimizer, run_config, stage_plan, train
from slimqwen_jax.checkpoint import load_checkpoint
from slimqwen_jax.config import ConfigError, qwen3_next_80b_a3b, slimqwen_23a2b, tiny
from slimqwen_jax.testing import apply_overrides, checkpoint_params, load_config_file

# The tiny pipeline's student config, shrunk: a 6-layer source (3 linear + 1 full + 2 linear),
# stage 1 removes the last layer and compresses 4 -> 2 experts, stage 2 removes one more layer
# (3 linear + 1 full left) and cuts the width 32 -> 16.
SOURCE = tiny(hidden_size=32, head_dim=8, linear_key_head_dim=8, linear_value_head_dim=8, num_hidden_layers=6,
              num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=16)  # fmt: skip
STAGED_RUN_MODEL = {k: getattr(SOURCE, k) for k in (
    "hidden_size", "head_dim", "linear_key_head_dim", "linear_value_head_dim", "num_hidden_layers", "num_experts",
    "moe_intermediate_size", "shared_expert_intermediate_size", "num_attention_heads", "linear_num_key_heads",
    "linear_num_value_heads")}  # fmt: skip
STAGED_RUN = [
    *(f"--config.model.{k}={v}" for k, v in STAGED_RUN_MODEL.items()),
    "--config.stages[0].steps=4", "--config.stages[0].depth.num_layers_to_remove=1",
    "--config.stages[0].experts.num_experts=2", "--config.stages[0].experts.num_experts_per_tok=2",
    "--config.stages[0].width.hidden_size=0",
    "--config.stages[1].steps=16", "--config.stages[1].depth.num_layers_to_remove=1",
    "--config.stages[1].width.hidden_size=16", "--config.stages[1].width.multiple_of=16",
    "--config.stages[1].experts.num_experts=0", "--config.stages[1].experts.num_experts_per_tok=0",
    "--config.data.seq_len=32", "--config.train.global_batch_size=4", "--config.train.eval_batches=2",
    "--config.train.eval_batch_size=4", "--config.train.log_every=1", "--config.train.eval_every=100",
    "--config.train.checkpoint_every=4", "--config.calibration.num_samples=8", "--config.calibration.seq_len=32",
    "--config.optimizer.warmup_steps=3", "--config.loss.chunk_size=64",
]  # fmt: skip
STAGE_STEPS = (4, 16)


def staged_overrides(workdir: Path, teacher: Path) -> list[str]:
    return [f"--config.workdir={workdir}", f"--config.teacher={teacher}", f"--config.init_from={teacher}", *STAGED_RUN]


def run_staged(workdir: Path, teacher: Path, *extra: str, wait: bool = True):
    args = [*staged_overrides(workdir, teacher), *extra]
    return run_tool("train", "slimqwen_tiny.py", *args) if wait else start_tool("train", "slimqwen_tiny.py", *args)


def staged_config(workdir: Path, teacher: Path):
    """The same run's config, in process (the overrides applied by hand)."""
    config = load_config_file(REPO / "configs" / "slimqwen_tiny.py").get_config()
    apply_overrides(config, staged_overrides(workdir, teacher))
    config.data.cache_dir = DATA_CACHE_DIR
    return config


TEACHER_TRAIN = dict(steps=6, global_batch_size=4, eval_batches=2, eval_batch_size=4, eval_every=6,
                     checkpoint_every=6, log_every=3, eval_mtp_drafts=0)  # fmt: skip


def pipeline_overrides(root: Path) -> list[str]:
    """The main job's command in miniature: a teacher of the staged run's source architecture,
    pretrained for a few steps, then the staged run itself as its student, then the baseline."""
    return [
        *staged_overrides(root, Path("unused")),  # the pipeline points the student at its own teacher
        *(f"--config.pipeline.teacher.model.{k}={v}" for k, v in STAGED_RUN_MODEL.items()),
        "--config.pipeline.teacher.data.seq_len=32",
        f"--config.pipeline.teacher.data.cache_dir={DATA_CACHE_DIR}",
        *(f"--config.pipeline.teacher.train.{k}={v}" for k, v in TEACHER_TRAIN.items()),
    ]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> tuple[Path, str]:
    """One pipeline run shared by the tests of this file: (root, output). Its `student/` is the
    uninterrupted staged run (`staged_overrides`) from the teacher in `teacher/`."""
    root = tmp_path_factory.mktemp("pipeline") / "root"
    code, output = run_tool("pipeline", "slimqwen_tiny.py", *pipeline_overrides(root))
    assert code == 0, output
    return root, output


@pytest.fixture(scope="module")
def teacher(pipeline) -> Path:
    """The pipeline's pretrained teacher: the source of the staged run (6 layers, hidden 32, 4 experts)."""
    return pipeline[0] / "teacher" / "checkpoints" / str(TEACHER_TRAIN["steps"])


@pytest.fixture(scope="module")
def straight(pipeline) -> tuple[Path, str]:
    """The uninterrupted staged run, the pipeline's student: (workdir, output)."""
    return pipeline[0] / "student", pipeline[1]


# ---------------------------------------------------------------------------- presets and planning
TARGET = slimqwen_23a2b()


@pytest.mark.parametrize("preset", sorted(run_config.PRESET_STAGES))
def test_presets_reach_the_target_by_their_route(preset):
    source = qwen3_next_80b_a3b()
    planned = plan(run_config.SCHEDULE_PRESETS[preset](source, TARGET, 1000), source)
    last = planned[-1].architecture
    assert (last.num_hidden_layers, last.hidden_size, last.num_experts, last.num_experts_per_tok) == (36, 1536, 256, 8)
    first = planned[0].architecture
    expected_first = {
        "one_stage": (36, 1536),
        "depth_first": (42, 2048),
        "width_first": (48, 1792),
        "joint": (42, 1792),
    }
    assert (first.num_hidden_layers, first.hidden_size) == expected_first[preset]
    assert first.num_experts == 256  # experts go in stage 1
    assert [s.steps for s in planned] == ([1000] if preset == "one_stage" else [100, 900])


def plan(stage_list, source):
    config = load_config_file(REPO / "configs" / "slimqwen_23a2b.py").get_config()
    config.stages = stage_list
    return stage_plan.plan_stages(config, source, Path("/nonexistent"))


def test_n_stage_splits_budget_and_cuts_evenly():
    source = qwen3_next_80b_a3b()
    planned = plan(run_config.n_stage(source, TARGET, 999, [1, 1, 1], expert_stage=2), source)
    assert [s.steps for s in planned] == [333, 333, 333]
    assert [s.architecture.num_hidden_layers for s in planned] == [44, 40, 36]
    assert [s.architecture.hidden_size for s in planned] == [1920, 1792, 1536]
    assert [s.architecture.num_experts for s in planned] == [512, 256, 256]
    assert [(s.start_step, s.end_step) for s in planned] == [(0, 333), (333, 666), (666, 999)]


@pytest.mark.parametrize("preset", sorted(run_config.SCHEDULE_PRESETS))
def test_the_schedule_field_builds_the_presets_stages(preset):
    """`--config.schedule=<preset>` with the whole cut in schedule_options plans the stages the
    Python preset builds (methods included), and bad schedule options are each named."""
    config = load_config_file(REPO / "configs" / "slimqwen_23a2b.py").get_config()
    source, steps = run_config.model_config(config), config.schedule_options.steps
    apply_overrides(config, [f"--config.schedule={preset}", "--config.schedule_options.experts.importance=frequency",
                             "--config.schedule_options.expert_stage=2", "--config.schedule_options.depth.method=similarity"]
                    + (["--config.schedule_options.num_stages=3"] if preset == "n_stage" else []))  # fmt: skip
    if preset in ("one_stage", "n_stage"):  # their own default split
        config.schedule_options.update(split=(), expert_stage=1 if preset == "one_stage" else 2)
    expanded, planned = run_config.planned(config)
    methods = compression.PruneSpec.from_config(config.schedule_options)
    split = {"one_stage": (1.0,), "n_stage": (1.0, 1.0, 1.0)}.get(preset, (0.1, 0.9))
    by_hand = run_config.SCHEDULE_PRESETS[preset](source, TARGET, steps, split, methods=methods,
                                                  expert_stage=config.schedule_options.expert_stage)  # fmt: skip
    assert [entry.to_dict() for entry in expanded.stages] == [entry.to_dict() for entry in by_hand]
    assert expanded.schedule == "" and len(planned) == len(split)
    assert planned[-1].architecture.architecture() == plan(by_hand, source)[-1].architecture.architecture()
    assert {s.spec.experts.importance for s in planned} == {"frequency"} and planned[0].spec.depth.method == "similarity"

    config.stages = by_hand
    config.schedule_options.update(split=(0.5, 0.3, 0.2, 0.1), expert_stage=7)
    problems = "\n".join(run_config.problems(config))
    assert "leave stages empty" in problems and "expert_stage must be in" in problems and "has 4 entries" in problems


def test_bad_stages_are_refused_before_any_work_naming_every_problem(tmp_path, teacher):
    code, output = run_staged(
        tmp_path / "run", teacher,
        "--config.stages[0].steps=0",  # zero budget
        "--config.stages[1].depth.num_layers_to_remove=9",  # more layers than stage 2 meets
        "--config.stages[1].experts.num_experts=3",  # more experts than stage 1 left
    )  # fmt: skip
    assert code == 1 and "Traceback" not in output, output
    assert "stages[0]: the budget is zero" in output
    assert "stages[1] does not fit the model it prunes (5 layers, hidden 32, 2 experts top-2)" in output
    assert "num_layers_to_remove is 9" in output and "num_experts is 3" in output
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------- the staged run
def history(workdir: Path, name: str) -> dict[int, dict]:
    lines = (workdir / name / "metrics.jsonl").read_text().splitlines()
    return {entry["step"]: entry for entry in map(json.loads, lines) if "train/loss" in entry}


def test_stages_prune_between_them_and_schedules_run_on_the_global_step(straight, teacher):
    workdir, output = straight
    assert "stage_2: pruned at step 4" in output
    report = json.loads((workdir / "stage_2" / "pruning.json").read_text())
    assert report["before"]["num_hidden_layers"] == 5 and report["after"]["num_hidden_layers"] == 4
    assert (report["before"]["hidden_size"], report["after"]["hidden_size"]) == (32, 16)
    assert (workdir / "stage_2" / "calibration.npz").exists() and (workdir / "stage_1" / "pruning.txt").exists()
    assert load_checkpoint(workdir / "stage_2" / "checkpoints" / "20").config.hidden_size == 16
    assert set(json.loads((workdir / "summary.json").read_text())) == {"stage_1", "stage_2"}

    config = staged_config(workdir, teacher)
    total = sum(STAGE_STEPS)
    lr = optimizer.learning_rate_schedule(config.optimizer, total)
    lam = losses.weight_schedule(config.loss.lam, total)
    beta = losses.weight_schedule(config.loss.beta, total)
    logged = {**history(workdir, "stage_1"), **history(workdir, "stage_2")}
    assert sorted(logged) == list(range(1, total + 1))
    for step in (4, 5, 6):  # the last step of stage 1 and the first two of stage 2
        entry = logged[step]
        assert entry["train/learning_rate"] == pytest.approx(float(lr(step - 1)), rel=1e-6)
        assert entry["train/lam"] == pytest.approx(float(lam(step - 1)), rel=1e-6)
        assert entry["train/beta"] == pytest.approx(float(beta(step - 1)), rel=1e-6)
    assert logged[5]["train/learning_rate"] > 0.5 * float(lr(3))  # no re-warmup from zero


def test_stage_transition_equals_the_prune_cli_on_the_same_statistics(straight, teacher, tmp_path):
    """The second stage's statistics are the calibration of the first stage's last checkpoint, and
    its pruned parameters equal the prune CLI's output for the same spec and statistics."""
    workdir, _ = straight
    config = staged_config(workdir, teacher)
    source = workdir / "stage_1" / "checkpoints" / str(STAGE_STEPS[0])
    ours = compression.CalibrationStats.load(workdir / "stage_2" / "calibration.npz")
    cal = config.calibration
    samples = data.calibration_samples(config.data, data.make_tokenizer(config.data.tokenizer),
                                       num_samples=cal.num_samples, seq_len=cal.seq_len, seed=cal.seed)  # fmt: skip
    theirs = compression.calibrate(load_checkpoint(source), samples, batch_size=cal.batch_size)
    assert ours.sums.keys() == theirs.sums.keys() and ours.num_tokens == theirs.num_tokens
    for key, value in ours.sums.items():
        np.testing.assert_allclose(value, theirs.sums[key], rtol=1e-5, err_msg=key)

    spec = ["--config.depth.num_layers_to_remove=1", "--config.width.hidden_size=16", "--config.width.multiple_of=16",
            "--config.experts.num_experts=0"]  # fmt: skip
    code, output = run_tool("prune", "prune_tiny.py", f"--config.source={source}", f"--config.output={tmp_path / 'cli'}",
                            f"--config.stats={workdir / 'stage_2' / 'calibration.npz'}", *spec)  # fmt: skip
    assert code == 0 and "reusing calibration statistics" in output, output

    # The transition itself, in process (on the 8 fake devices: batches of 8), with stage 2's
    # checkpoints moved away.
    config.train.update(global_batch_size=8, eval_batch_size=8)
    plan = train.plan_run(config)
    context, planned = train.prepare_run(plan), plan.stages
    second = planned[1]
    moved = second.directory / "checkpoints"
    moved.rename(tmp_path / "stage_2_checkpoints")
    try:
        start = train.stage_start(context, second, planned[0])
        cfg, state = start.model_cfg, start.state
    finally:
        (tmp_path / "stage_2_checkpoints").rename(moved)
    cli = load_checkpoint(tmp_path / "cli")
    assert cfg.architecture() == cli.config.architecture()
    for (path, a), (_, b) in zip(nnx.to_flat_state(state.params), nnx.to_flat_state(nnx.state(cli, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(path))
    assert int(jax.tree.leaves(state.opt_state)[0]) == STAGE_STEPS[0]  # the Adam step count carries on


@pytest.mark.slow
def test_sigkill_around_a_stage_transition_resumes_bitwise(straight, teacher, tmp_path):
    """Killed after stage 2's pruning and before its first checkpoint, then killed again mid-stage,
    then rerun to the end: parameters bitwise equal to the uninterrupted run."""
    workdir = tmp_path / "run"
    stage_2 = workdir / "stage_2"

    def kill_when(ready):
        process = run_staged(workdir, teacher, wait=False)
        deadline = time.time() + 300
        while not ready() and time.time() < deadline and process.poll() is None:
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        output, _ = process.communicate()
        assert process.returncode == -signal.SIGKILL, f"the run finished before it could be killed:\n{output}"
        return output

    kill_when(lambda: (stage_2 / "pruning.json").exists())
    assert not (stage_2 / "checkpoints").exists()
    output = kill_when(lambda: (stage_2 / "checkpoints" / "8").exists())
    assert "stage_2: reusing calibration statistics" in output  # back to stage 1's end, pruned again
    assert not (stage_2 / "checkpoints" / "20").exists()
    code, output = run_staged(workdir, teacher)
    assert code == 0 and "resumed from" in output and "stage_2/checkpoints/8" in output, output
    for a, b in zip(checkpoint_params(straight[0] / "stage_2", 20), checkpoint_params(stage_2, 20), strict=True):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------- baselines and dry run
def test_from_scratch_baseline_is_the_final_architecture_on_the_whole_budget(teacher, straight, tmp_path):
    config = staged_config(tmp_path / "run", teacher)
    config.baseline = "from_scratch"
    plan = train.plan_run(config)
    baseline, planned = plan.config, plan.stages
    assert len(planned) == 1 and planned[0].steps == sum(STAGE_STEPS) and baseline.init_from == ""
    assert (baseline.model.num_hidden_layers, baseline.model.hidden_size, baseline.model.num_experts) == (4, 16, 2)
    # A layer choice made from statistics is known only after the stages ran: taken from the run.
    config.stages[1].depth.method = "similarity"
    with pytest.raises(ConfigError, match="stage_2 remove are chosen from calibration statistics"):
        train.plan_run(config)
    config.baseline_from = str(straight[0])
    config.model.dtype = "bfloat16"  # the run-time options stay the config's
    ran = load_checkpoint(straight[0] / "stage_2" / "checkpoints" / str(sum(STAGE_STEPS))).config
    planned_cfg = train.plan_run(config).model_cfg
    assert planned_cfg.architecture() == ran.architecture() and planned_cfg.dtype == "bfloat16"
    config.baseline_from = str(tmp_path)
    with pytest.raises(train.TrainError, match="holds no finished run"):
        train.plan_run(config)
    config.baseline_from, config.baseline = "", "pruned_lm_only"
    lm_only = train.plan_run(config).config.loss
    assert losses.is_always_zero(lm_only.lam) and losses.is_always_zero(losses.mtp_lam_spec(lm_only))
    config.baseline = "scratch"
    with pytest.raises(ConfigError, match="baseline must be one of"):
        train.plan_run(config)


def test_the_23a2b_dry_run_matches_the_paper_and_the_docs(capsys):
    config = load_config_file(REPO / "configs" / "slimqwen_23a2b.py").get_config()
    config.dry_run = True
    rows = train.run(config)["stages"]
    printed = capsys.readouterr().out
    assert [r["architecture"] for r in rows] == [
        "42 layers, hidden 2048, 256 experts top-8",
        "36 layers, hidden 1536, 256 experts top-8",
    ]
    assert math.isclose(rows[-1]["total"], 23.2e9, rel_tol=0.01) and math.isclose(
        rows[-1]["active"], 2.1e9, rel_tol=0.03
    )
    assert [r["tokens"] // 10**9 for r in rows] == [40, 360]
    documented = (REPO / "docs" / "stages.md").read_text()
    for line in printed.splitlines():
        if line.startswith("stage_"):
            assert line in documented, line


def printed_table(output: str) -> str:
    """The lines of the report table a pipeline run printed."""
    return "\n".join(line for line in output.splitlines() if line.startswith("|"))


@pytest.mark.slow
def test_pipeline_runs_teacher_stages_and_baseline_and_reports(pipeline):
    """`python -m slimqwen_jax.pipeline`: teacher pretraining, the staged student, the pruned +
    LM-only and from-scratch baselines, the report; rerun, it reuses the teacher and redoes nothing."""
    root, output = pipeline
    rows = json.loads((root / "report.json").read_text())
    assert [r["run"] for r in rows] == ["teacher", "pruned + KD", "pruned + LM only", "from scratch"]
    assert [(r["layers"], r["hidden"], r["experts"]) for r in rows] == [(6, 32, 4)] + [(4, 16, 2)] * 3
    assert rows[1]["tokens"] == rows[2]["tokens"] == rows[3]["tokens"] == sum(STAGE_STEPS) * 4 * 32
    for name in ("student", "pruned_lm_only", "from_scratch"):
        assert train.final_architecture(root / name) == train.final_architecture(root / "student")
    lm_only = history(root / "pruned_lm_only", "stage_2")
    assert {entry["train/lam"] for entry in lm_only.values()} == {0.0} and "train/kd" in lm_only[5]  # KD watched
    assert rows[0]["top1_agreement"] == 1.0 and (root / "report.png").stat().st_size > 0
    table = printed_table(output)
    assert "from scratch" in table and table in (root / "report.md").read_text()
    assert (
        load_checkpoint(root / "from_scratch" / "stage_1" / "checkpoints" / str(sum(STAGE_STEPS))).config.hidden_size
        == 16
    )
    before = (root / "student" / "stage_2" / "metrics.jsonl").read_text()
    code, output = run_tool("pipeline", "slimqwen_tiny.py", *pipeline_overrides(root))
    assert code == 0 and printed_table(output) == table, output  # all done: the report is rewritten, nothing retrained
    assert "teacher: reusing" in output
    assert (root / "student" / "stage_2" / "metrics.jsonl").read_text() == before
