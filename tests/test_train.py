"""The training entry point: pulse run, exact resume after SIGKILL, bad input, step and loss pieces."""

import json
import re
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from tool_runs import TINY_RUN, run_tool, start_tool

from slimqwen_jax import hf, optimizer, train
from slimqwen_jax.checkpoint import save_checkpoint
from slimqwen_jax.config import tiny
from slimqwen_jax.model import Qwen3NextForCausalLM
from slimqwen_jax.testing import checkpoint_params


def run_train(workdir: Path, *overrides: str, steps: int = 6, checkpoint_every: int = 3, wait: bool = True):
    args = [
        f"--config.workdir={workdir}", f"--config.train.steps={steps}", f"--config.train.eval_every={steps}",
        f"--config.train.checkpoint_every={checkpoint_every}", *TINY_RUN, *overrides,
    ]  # fmt: skip
    if not wait:
        return start_tool("train", "quickstart.py", *args)
    return run_tool("train", "quickstart.py", *args)


def test_pulse_run_writes_checkpoint_and_tensorboard_events(tmp_path):
    code, output = run_train(tmp_path)  # the programs of test_bad_inputs.py's runs: compiled once
    assert code == 0, output
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["3", "6"]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["step"] == 6 and np.isfinite(summary["heldout_ce"])
    assert (tmp_path / "loss_curve.png").stat().st_size > 0
    assert "tok/s" in output and "ETA" in output
    # A finished run rerun with the same command resumes at its last step and does nothing more.
    code, output = run_train(tmp_path)
    assert code == 0 and "resumed" in output, output


@pytest.mark.slow
def test_sigkill_and_rerun_resumes_bitwise_exactly(tmp_path):
    # Eight scanned layers (two blocks of 3 linear + 1 full attention): the stage holds them stacked
    # (slimqwen_jax/stacking.py) and its checkpoints per layer, so the rerun restores per layer and
    # stacks again. Unrolled runs resume through the same save and restore: test_stages.py's kill test.
    scanned = ("--config.model.num_hidden_layers=8", "--config.model.scan_layers=True")
    steps, every = 12, 4
    code, output = run_train(tmp_path / "straight", *scanned, steps=steps, checkpoint_every=every)
    assert code == 0, output

    killed = tmp_path / "killed"
    process = run_train(killed, *scanned, steps=steps, checkpoint_every=every, wait=False)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / str(every)).exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "checkpoints" / str(steps)).exists()

    code, output = run_train(killed, *scanned, steps=steps, checkpoint_every=every)
    assert code == 0 and "resumed" in output, output
    for a, b in zip(checkpoint_params(tmp_path / "straight", steps), checkpoint_params(killed, steps), strict=True):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------- bad input
def test_unknown_config_key_is_a_clear_error(tmp_path):
    code, output = run_train(tmp_path, "--config.train.stepz=3")
    assert code == 2 and "bad command line" in output and "stepz" in output
    assert "Traceback" not in output
    assert not tmp_path.joinpath("checkpoints").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--config.data.source=text", "--config.data.paths=/nonexistent/*.txt"], "nonexistent"),
        (["--config.data.source=jsonl"], "needs paths"),
    ],
)
def test_missing_data_source_fails_before_writing(tmp_path, overrides, message):
    code, output = run_train(tmp_path / "run", *overrides)
    assert code == 1 and message in output and "Traceback" not in output, output
    assert not (tmp_path / "run").exists()


def test_init_from_with_another_architecture_is_refused(tmp_path):
    save_checkpoint(Qwen3NextForCausalLM(tiny(hidden_size=48), rngs=nnx.Rngs(0)), tmp_path / "other")
    code, output = run_train(tmp_path / "run", f"--config.init_from={tmp_path / 'other'}")
    assert code == 1 and "does not match config.model" in output and "hidden_size" in output, output
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_workdir_of_another_architecture_is_refused_and_kept(tmp_path):
    code, output = run_train(tmp_path)
    assert code == 0, output
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    code, output = run_train(tmp_path, "--config.model.num_experts=8")
    assert code == 1 and "different architecture" in output and "num_experts" in output, output
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    # Step 1 at a sane learning rate (checkpointed), then one that blows the parameters up: the
    # update of step 2 stays finite but its loss does not, so step 2 never becomes a checkpoint.
    code, output = run_train(
        tmp_path, "--config.optimizer.schedule=constant", "--config.optimizer.init_lr=1e-3",
        "--config.optimizer.peak_lr=1e12", "--config.optimizer.clip_norm=1e12", steps=10, checkpoint_every=1,
    )  # fmt: skip
    assert code == 1 and "non-finite" in output and "Traceback" not in output, output
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir())
    assert saved == [1] and f"last good checkpoint is {tmp_path / 'checkpoints' / '1'}" in output, output
    assert all(np.isfinite(a).all() for a in checkpoint_params(tmp_path, 1))
    # The named checkpoint really is good: rerun with a sane learning rate, it resumes and finishes.
    code, output = run_train(tmp_path, "--config.optimizer.peak_lr=1e-3", steps=4, checkpoint_every=2)
    assert code == 0 and "at step 1" in output, output


# ---------------------------------------------------------------------------- distillation
DISTIL = ["--config.loss.lam.schedule=linear", "--config.loss.lam.start=1.0", "--config.loss.lam.end=0.75",
          "--config.loss.beta.schedule=cosine", "--config.loss.beta.start=0.3", "--config.loss.beta.end=0.1",
          "--config.loss.chunk_size=48"]  # fmt: skip


def save_teacher(directory: Path, **overrides) -> Path:
    """A random teacher of another architecture than TINY_RUN's student (deeper, wider, more experts)."""
    cfg = tiny(vocab_size=260, hidden_size=48, num_hidden_layers=8, num_experts=8, **overrides)
    return save_checkpoint(Qwen3NextForCausalLM(cfg, rngs=nnx.Rngs(7)), directory)


def test_distillation_run_logs_every_term_and_weight(tmp_path):
    teacher = save_teacher(tmp_path / "teacher")
    code, output = run_train(tmp_path / "run", f"--config.teacher={teacher}", *DISTIL, steps=4, checkpoint_every=4)
    assert code == 0, output
    assert re.search(r"step 4/4 \| loss .*kd .*mtp_kd .*top1_agreement .*\| lam 0\.812 beta", output), output
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = set().union(*history)
    for name in ("ce", "kd", "mtp_ce", "mtp_kd", "aux_loss", "lam", "beta", "top1_agreement"):
        assert f"train/{name}" in logged, name
    assert {"heldout/kd", "heldout/top1_agreement"} <= logged
    lam = [entry["train/lam"] for entry in history if "train/lam" in entry]
    assert lam == pytest.approx([1.0 - 0.25 * s / 4 for s in (1, 3)], abs=1e-6)  # logged at steps 2 and 4
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert 0.0 <= summary["heldout_top1_agreement"] <= 1.0 and summary["heldout_kd"] > 0
    # Teacher-forced MTP acceptance (model_metrics.batch_statistics): acc_0 >= acc_1 >= acc_2.
    acceptance = [summary[f"heldout_mtp_acc_{k}"] for k in (0, 1, 2)]
    assert 1.0 >= acceptance[0] >= acceptance[1] >= acceptance[2] >= 0.0


@pytest.mark.parametrize(
    "teacher_overrides, flags, message",
    [
        (None, [], "does not exist"),
        (dict(vocab_size=300), [], "vocab_size is 300, the student's is 260"),
        (dict(num_mtp_layers=0), [], "teacher_mtp' needs a teacher MTP module"),
        ({}, ["--config.loss.lam.start=1.5"], "loss.lam.start must be in [0.0, 1.0]"),
    ],
    ids=["missing", "vocabulary", "no-mtp", "bad-lam"],
)
def test_bad_teacher_is_refused_before_writing(tmp_path, teacher_overrides, flags, message):
    teacher = tmp_path / "teacher"
    if teacher_overrides is not None:  # one of ours, except the vocabulary case: an HF directory
        model = Qwen3NextForCausalLM(tiny(**{"vocab_size": 260, **teacher_overrides}), rngs=nnx.Rngs(0))
        (hf.save_model if "vocab_size" in teacher_overrides else save_checkpoint)(model, teacher)
    code, output = run_train(tmp_path / "run", f"--config.teacher={teacher}", *DISTIL, *flags)
    assert code == 1 and message in output and "Traceback" not in output, output
    assert not (tmp_path / "run").exists()


def test_lam_without_a_teacher_is_refused(tmp_path):
    code, output = run_train(tmp_path / "run", *DISTIL)
    assert code == 1 and "no teacher is set" in output and "Traceback" not in output, output
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------- pieces
@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_learning_rate_schedules(schedule):
    opt = train.ml_collections.ConfigDict(
        dict(schedule=schedule, init_lr=0.0, peak_lr=1.0, end_lr=0.1, warmup_steps=10, decay_fraction=0.5)
    )
    lr = optimizer.learning_rate_schedule(opt, 110)
    assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(0.5) and float(lr(10)) == pytest.approx(1.0)
    end = {"cosine": 0.1, "wsd": 0.1, "constant": 1.0}[schedule]
    assert float(lr(110)) == pytest.approx(end, abs=1e-6)
    if schedule == "wsd":
        assert float(lr(60)) == pytest.approx(1.0) and float(lr(85)) == pytest.approx(0.55)


def test_a_stage_can_rewarm_the_learning_rate():
    """with_rewarmups: a linear ramp 1/n .. 1 over the stage's first n global steps, the base
    schedule elsewhere (other stages continue without a ramp)."""
    base = lambda count: 0.5 + 0.0 * count  # noqa: E731
    lr = optimizer.with_rewarmups(base, [(10, 4)])
    values = [float(lr(step)) for step in range(8, 16)]
    assert values == pytest.approx([0.5, 0.5, 0.125, 0.25, 0.375, 0.5, 0.5, 0.5])
    assert optimizer.with_rewarmups(base, []) is base
