"""Bad input and damaged state against the command-line tools: each case asserts the exit code, one
clear line (no traceback) and that nothing was written, lost or overwritten."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from tool_runs import TINY_RUN, run_tool

from slimqwen_jax.testing import checkpoint_params


def run_train(workdir: Path, *overrides: str, steps: int = 6, checkpoint_every: int = 2):
    args = [
        f"--config.workdir={workdir}", f"--config.train.steps={steps}", f"--config.train.eval_every={steps}",
        f"--config.train.checkpoint_every={checkpoint_every}", *TINY_RUN, *overrides,
    ]  # fmt: skip
    return run_tool("train", "quickstart.py", *args)


def snapshot(directory: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in directory.rglob("*")} if directory.exists() else {}


@pytest.mark.parametrize(
    "overrides, messages",
    [
        (["--config.train.keep_checkpoints=0"], ["train.keep_checkpoints must be >= 1"]),
        (["--config.train.grad_accum_steps=0", "--config.train.checkpoint_every=0", "--config.train.global_batch_size=0"],
         ["train.grad_accum_steps must be >= 1", "train.checkpoint_every must be >= 1",
          "train.global_batch_size must be >= 1"]),
        (["--config.train.steps=0"], ["train.steps must be > 0"]),
        (["--config.train.global_batch_size=6", "--config.train.grad_accum_steps=4"],
         ["multiple of train.grad_accum_steps"]),
    ],
    ids=["keep-zero", "zero-sizes", "zero-steps", "accumulation"],
)  # fmt: skip
def test_bad_run_settings_are_refused_before_writing(tmp_path, overrides, messages):
    code, output = run_train(tmp_path / "run", *overrides)
    assert code == 1 and "Traceback" not in output, output
    assert all(message in output for message in messages), output
    assert not (tmp_path / "run").exists()


def test_a_workdir_that_is_a_file_is_refused_and_kept(tmp_path):
    (tmp_path / "run").write_text("my notes")
    code, output = run_train(tmp_path / "run")
    assert code == 1 and "is a file, not a directory" in output and "Traceback" not in output, output
    assert (tmp_path / "run").read_text() == "my notes"


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 6-step run (checkpoints 4 and 6 kept), copied by the tests that change it."""
    workdir = tmp_path_factory.mktemp("finished") / "run"
    code, output = run_train(workdir)
    assert code == 0, output
    return workdir


def copy_of(finished: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(finished, tmp_path / "run"))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--config.train.steps=4"], "already holds step 6, past this run's last step 4"),
        (["--config.data.seq_len=16"], "data.seq_len: 32 -> 16"),
        (["--config.train.global_batch_size=8", "--config.train.eval_batch_size=8"], "train.global_batch_size: 4 -> 8"),
    ],
    ids=["fewer-steps", "other-seq-len", "other-batch"],
)
def test_resuming_with_settings_that_break_the_run_is_refused(finished, tmp_path, overrides, message):
    workdir = copy_of(finished, tmp_path)
    before = snapshot(workdir)
    code, output = run_tool("train", "quickstart.py", f"--config.workdir={workdir}", "--config.train.eval_every=6",
                            "--config.train.checkpoint_every=2", "--config.train.steps=6", *TINY_RUN, *overrides)  # fmt: skip
    assert code == 1 and message in output and "Traceback" not in output, output
    assert snapshot(workdir) == before


@pytest.mark.parametrize("damage", ["truncated-array", "deleted-item", "corrupt-json"])
def test_a_damaged_latest_checkpoint_is_set_aside_and_the_one_before_resumes(finished, tmp_path, damage):
    workdir = copy_of(finished, tmp_path)
    latest = workdir / "checkpoints" / "6"
    if damage == "truncated-array":
        chunk = max((p for p in (latest / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
        chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    elif damage == "deleted-item":
        shutil.rmtree(latest / "opt_state")
    else:
        (latest / "train_state" / "metadata").write_text("{not json")
    code, output = run_train(workdir)
    assert code == 0 and "checkpoint step 6 is damaged" in output and "at step 4" in output, output
    assert (workdir / "checkpoints" / "6.damaged").is_dir()  # kept, not deleted
    # Resumed from step 4, the run redid steps 5 and 6 exactly as the undamaged run did them.
    for a, b in zip(checkpoint_params(finished, 6), checkpoint_params(workdir, 6), strict=True):
        np.testing.assert_array_equal(a, b)
    entries = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    logged = [(e["step"], tuple(sorted(e))) for e in entries]  # a train and a held-out record per step
    assert len(logged) == len(set(logged)), "metrics.jsonl holds the replayed steps twice"


def test_the_prune_cli_checks_the_spec_from_config_json_before_loading(tmp_path):
    code, output = run_tool(
        "prune", "prune_tiny.py", f"--config.output={tmp_path / 'out'}", "--config.depth.num_layers_to_remove=9",
        "--config.width.hidden_size=100",
    )  # fmt: skip
    assert code == 1 and "num_layers_to_remove is 9" in output and "width.hidden_size is 100" in output, output
    assert "calibrating" not in output and "Traceback" not in output
    assert list(tmp_path.iterdir()) == []  # no checkpoint, no statistics file


@pytest.mark.parametrize("bad_id", [260, -1], ids=["past-the-vocabulary", "negative"])  # model vocabulary: 260
def test_token_ids_outside_the_vocabulary_are_refused_before_training(tmp_path, bad_id):
    tokens = np.arange(4000, dtype=np.int64) % 256
    tokens[1234] = bad_id
    np.save(tmp_path / "tokens.npy", tokens)
    code, output = run_train(
        tmp_path / "run", "--config.data.source=tokens", f"--config.data.paths={tmp_path / 'tokens.npy'}"
    )
    assert code == 1 and f"token ids span [{min(bad_id, 0)}, {max(bad_id, 255)}]" in output, output
    assert "Traceback" not in output and not (tmp_path / "run").exists()
