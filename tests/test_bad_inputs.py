"""Bad input and damaged state against the command-line tools: each case asserts the exit code, one
clear line (no traceback) and that nothing was written, lost or overwritten."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from tool_runs import REPO, TINY_RUN, run_tool

from slimqwen_jax import data, run_config, stage_plan, train
from slimqwen_jax.checkpoint import TrainingCheckpoints
from slimqwen_jax.testing import checkpoint_params, load_config_file


def run_train(workdir: Path, *overrides: str, steps: int = 6, checkpoint_every: int = 2, fault=None):
    args = [
        f"--config.workdir={workdir}", f"--config.train.steps={steps}", f"--config.train.eval_every={steps}",
        f"--config.train.checkpoint_every={checkpoint_every}", *TINY_RUN, *overrides,
    ]  # fmt: skip
    return run_tool("train", "quickstart.py", *args, fault=fault)


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
        # Independent problems of the optimizer, train and data sections, all named in one error.
        (["--config.optimizer.init_lr=-1e-3", "--config.optimizer.schedule=linear", "--config.optimizer.b2=1.0",
          "--config.train.eval_batches=0", "--config.data.heldout_fraction=0", "--config.data.shuffle_seed=-1",
          "--config.data.source=parquet"],
         ["optimizer.init_lr must be >= 0, got -0.001",
          "optimizer.schedule must be one of ('cosine', 'wsd', 'constant'), got 'linear'",
          "optimizer.b2 must be in [0, 1), got 1.0", "train.eval_batches must be >= 1, got 0",
          "data: heldout_fraction must be in (0, 1), got 0.0", "data: shuffle_seed must be in [0, 2**32), got -1",
          "data: unknown source 'parquet'"]),
        (["--config.init_from=/nonexistent/model"], ["init_from /nonexistent/model does not exist"]),
    ],
    ids=["keep-zero", "zero-sizes", "zero-steps", "accumulation", "optimizer-train-data", "init-from-missing"],
)  # fmt: skip
def test_bad_run_settings_are_refused_before_writing(tmp_path, overrides, messages):
    code, output = run_train(tmp_path / "run", *overrides)
    assert code == 1 and "Traceback" not in output, output
    assert all(message in output for message in messages), output
    assert "not a slimqwen_jax checkpoint" not in output
    assert not (tmp_path / "run").exists()


def test_a_value_of_the_wrong_type_is_a_command_line_error(tmp_path):
    code, output = run_train(tmp_path / "run", "--config.train.steps=ten")
    assert code == 2 and "bad command line" in output and "ten" in output and "Traceback" not in output, output
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


def test_only_the_newest_keep_checkpoints_are_kept(finished):
    # quickstart.py keeps 2 (train.keep_checkpoints); the run saved steps 2, 4 and 6.
    assert sorted(p.name for p in (finished / "checkpoints").iterdir()) == ["4", "6"]


@pytest.mark.parametrize(
    "fault, message",
    [
        ("enospc", r"cannot write {checkpoints}/4\.orbax-checkpoint-tmp\S*/\w+\.orbax-checkpoint-tmp: No space left on "
                   r"device\. The last good checkpoint is {good}: free space"),
        # The first Ctrl-C is only recorded: the save in flight completes and the loop stops after it.
        ("sigint", r"stopping after this step[^\n]*\n(.*\n)*.*interrupted \(Ctrl-C\) after step 4\. The last good "
                   r"checkpoint is {good}: rerun the same command"),
    ],
    ids=["disk-full", "ctrl-c"],
)  # fmt: skip
def test_a_fault_during_a_save_ends_in_one_line_and_keeps_the_previous_checkpoint(tmp_path, fault, message):
    """A full disk (OSError ENOSPC) or a Ctrl-C while orbax writes step 4 (inject_fault.py)."""
    workdir = tmp_path / "run"
    code, output = run_train(workdir, fault=(fault, 4))
    checkpoints = workdir / "checkpoints"
    # Looked at first: opening the checkpoints starts orbax's background cleanup of temporary directories.
    interrupted = list(checkpoints.glob("4.orbax-checkpoint-tmp*"))
    latest = TrainingCheckpoints(workdir).latest_step()  # what a resume takes
    good = re.escape(str(checkpoints / str(latest)))
    assert code == 1 and "Traceback" not in output, output
    assert re.search(message.format(checkpoints=re.escape(str(checkpoints)), good=good), output), output
    # Atomic: a save that failed is never resumed from, only its temporary directory is left; a
    # Ctrl-C lets the save in flight end, and that step is the one a resume takes.
    assert (latest == 2 and interrupted) if fault == "enospc" else latest == 4
    assert (checkpoints / "4").exists() == (latest == 4)
    assert all(np.isfinite(a).all() for a in checkpoint_params(workdir, latest))


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


# ---------------------------------------------------------------------------- data sources, in process
def write_sources(root: Path) -> None:
    """One bad input per file (or folder) under `root`."""
    (root / "empty").mkdir()
    (root / "empty" / "a.txt").write_text("")
    (root / "empty" / "b.txt").write_text("")
    (root / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (root / "latin1.txt").write_bytes("café au lait".encode("latin-1"))
    (root / "number.jsonl").write_text('{"text": "ok"}\n{"text": 42}\n')
    (root / "broken.jsonl").write_text('{"text": "ok"}\n\n{"text": "unterminated\n')
    (root / "list.jsonl").write_text('["text", "in a list"]\n')
    (root / "latin1.jsonl").write_bytes(b'{"text": "ok"}\n' + '{"text": "café"}\n'.encode("latin-1"))
    (root / "docs").mkdir()
    (root / "docs" / "one.txt").write_text("a short document")
    (root / "docs" / "two.txt").write_text("another short document")
    (root / "tokens.txt").write_text("1 2 3")
    np.save(root / "floats.npy", np.linspace(0, 1, 100))
    np.save(root / "matrix.npy", np.zeros((10, 10), np.int32))
    (root / "notes").write_text("a file where a cache directory should go")


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(source="text", paths="{root}/empty/*.txt"), r"text source '.*/empty/\*.txt' is empty"),
        (dict(source="text", paths="{root}/image.txt"),
         r"{root}/image.txt: binary data \(a NUL byte at offset 8\), not text; remove it from data.paths"),
        (dict(source="text", paths="{root}/latin1.txt"),
         r"{root}/latin1.txt: not UTF-8 text \(byte 0xe9 at offset 3\); convert it to UTF-8"),
        (dict(source="jsonl", paths="{root}/number.jsonl"),
         r"{root}/number.jsonl:2: field 'text' holds int, not a string; set data.jsonl_field"),
        (dict(source="jsonl", paths="{root}/broken.jsonl"), r"{root}/broken.jsonl:3: not valid JSON \(.*\); fix or"),
        (dict(source="jsonl", paths="{root}/list.jsonl"), r"{root}/list.jsonl:1: no field 'text' \(set data.jsonl"),
        (dict(source="jsonl", paths="{root}/latin1.jsonl"), r"{root}/latin1.jsonl:2: not UTF-8 text"),
        (dict(source="text", paths="{root}/docs"), r"'{root}/docs' is a directory; name its files with a glob"),
        (dict(source="text", paths="{root}/docs/*.txt", seq_len=4096),
         r"the train split has 0 windows of 4096 tokens, fewer than one global batch"),
        (dict(source="tokens", paths="{root}/tokens.txt"), r"{root}/tokens.txt: token files must end in .npy or .bin"),
        (dict(source="tokens", paths="{root}/floats.npy"), r"floats.npy: expected a 1-D integer array, got float64"),
        (dict(source="tokens", paths="{root}/matrix.npy"), r"matrix.npy: expected a 1-D integer array, .* \(10, 10\)"),
        (dict(source="text", paths="{root}/docs/*.txt", cache_dir="{root}/notes/cache"),
         r"data.cache_dir {root}/notes/cache: cannot write the tokenized cache \(Not a directory\); point it at"),
    ],
    ids=["empty-glob", "binary-text", "latin-1-text", "jsonl-number", "jsonl-malformed", "jsonl-list",
         "jsonl-latin-1", "directory", "seq-len-over-corpus", "tokens-suffix", "tokens-floats", "tokens-2d",
         "cache-dir-under-a-file"],
)  # fmt: skip
def test_bad_data_sources_are_refused_naming_the_file(tmp_path, fields, message):
    """What the trainer's data set-up (`train_iterator`, `heldout_batches`) raises: a RUN_ERROR,
    so one line and exit code 1 from the command line; nothing is written."""
    write_sources(tmp_path)
    data_cfg = run_config.data_section()
    data_cfg.update({k: v.format(root=tmp_path) if isinstance(v, str) else v for k, v in fields.items()})
    before = snapshot(tmp_path)
    with pytest.raises(train.RUN_ERRORS) as error:
        data.train_iterator(data_cfg, data.ByteTokenizer(), batch_size=4)
        data.heldout_batches(data_cfg, data.ByteTokenizer(), batch_size=4, num_batches=1)
    assert re.search(message.format(root=re.escape(str(tmp_path))), str(error.value)), error.value
    assert "\n" not in str(error.value)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "init_from, message",
    [("notes", r"init_from {root}/notes is a file, not a model directory"),
     ("docs", r"init_from {root}/docs is neither an HF checkpoint directory \(no config.json\) nor a slimqwen_jax")],
    ids=["a-file", "neither"],
)  # fmt: skip
def test_an_init_from_that_is_no_model_is_refused_before_the_data(tmp_path, init_from, message):
    """`check_init_from`, which the trainer runs right after planning its stages."""
    write_sources(tmp_path)
    config = load_config_file(REPO / "configs" / "quickstart.py").get_config()
    config.update(dict(init_from=str(tmp_path / init_from), workdir=str(tmp_path / "run")))
    first = stage_plan.plan_stages(config, run_config.model_config(config), tmp_path / "run")[0]
    with pytest.raises(train.RUN_ERRORS, match=message.format(root=re.escape(str(tmp_path)))):
        train.check_init_from(config, run_config.model_config(config), first)
    assert not (tmp_path / "run").exists()
