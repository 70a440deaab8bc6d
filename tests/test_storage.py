"""Runs, models, statistics and data at gs:// URLs (slimqwen_jax/storage.py), against the GCS
emulator of tests/gcs_emulator.py: each read back equals its local-disk counterpart, every object
is listed through the emulator itself, and an unreachable bucket is one clear error."""

import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from tool_runs import REPO, TINY_RUN, history, run_tool

from slimqwen_jax import checkpoint, hf, loading, storage
from slimqwen_jax.compression.calibration import CalibrationStats
from slimqwen_jax.config import tiny
from slimqwen_jax.data import sources
from slimqwen_jax.model import Qwen3NextForCausalLM
from slimqwen_jax.testing import checkpoint_params


def upload(local: Path, url: str) -> str:
    """Copy the file or directory `local` to `url` (through epath, as the package reads it)."""
    target = storage.path(url)
    if local.is_dir():
        for child in local.iterdir():
            upload(child, f"{url}/{child.name}")
    else:
        with local.open("rb") as reader, target.open("wb") as writer:
            shutil.copyfileobj(reader, writer)
    return url


def params(model) -> list[np.ndarray]:
    return [np.asarray(v) for v in jax.tree.leaves(nnx.state(model, nnx.Param))]


def test_hf_model_and_orbax_checkpoint_at_gcs_read_back_as_the_local_ones(gcs, tmp_path):
    bucket = gcs.new_bucket()
    model = Qwen3NextForCausalLM(tiny(), rngs=nnx.Rngs(3))
    local = hf.save_model(model, tmp_path / "hf", max_shard_bytes=200_000)  # sharded: index + several files
    url = upload(local, f"{bucket}/models/hf")
    assert loading.is_hf_directory(url)
    assert loading.load_model_config(url) == loading.load_model_config(local)
    for a, b in zip(params(loading.load_model(url)), params(loading.load_model(local)), strict=True):
        np.testing.assert_array_equal(a, b)
    # Our orbax checkpoint: orbax writes through epath, its arrays through tensorstore's GCS driver.
    saved = checkpoint.save_checkpoint(model, f"{bucket}/models/ours")
    assert str(saved) == f"{bucket}/models/ours"
    assert any(name.startswith("models/ours/params/") for name in gcs.objects(bucket))
    for a, b in zip(params(loading.load_model(saved)), params(model), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not (REPO / "gs:").exists() and not Path("gs:").exists()


def test_calibration_statistics_round_trip_through_gcs(gcs):
    bucket = gcs.new_bucket()
    stats = CalibrationStats({"a": np.arange(6.0).reshape(2, 3), "b": np.ones(4)}, 64, {"config": {}})
    stats.save(f"{bucket}/stats/calibration.npz")
    assert gcs.objects(f"{bucket}/stats") == ["stats/calibration.json", "stats/calibration.npz"]
    loaded = CalibrationStats.load(f"{bucket}/stats/calibration.npz")
    assert loaded.num_tokens == 64 and loaded.meta == {"config": {}}
    assert sorted(loaded.sums) == ["a", "b"]
    for key in stats.sums:
        np.testing.assert_array_equal(loaded.sums[key], stats.sums[key])


def test_data_paths_and_globs_at_gcs_read_as_the_local_ones(gcs, tmp_path):
    bucket = gcs.new_bucket()
    for i in range(3):
        (tmp_path / "data" / "sub").mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / "sub" / f"{i}.txt").write_text(f"document {i}\n")
    (tmp_path / "data" / "skip.md").write_text("not text data\n")
    upload(tmp_path / "data", f"{bucket}/data")
    local = sources.text_documents(f"{tmp_path}/data/sub/*.txt,{tmp_path}/data/skip.md")
    remote = sources.text_documents(f"{bucket}/data/sub/*.txt,{bucket}/data/skip.md")
    assert remote == local and len(remote) == 4
    with pytest.raises(sources.DataError, match="matches no file"):
        sources.resolve_paths(f"{bucket}/data/*.jsonl")


def test_appends_and_atomic_writes_at_gcs(gcs):
    target = f"{gcs.new_bucket()}/run/metrics.jsonl"
    storage.append_text(target, "1\n")
    storage.append_text(target, "2\n")
    assert storage.path(target).read_text() == "1\n2\n"
    storage.write_text(target, "3\n")
    assert storage.path(target).read_text() == "3\n"
    assert gcs.objects(target) == ["run/metrics.jsonl"]  # no temporary object left beside it


# ---------------------------------------------------------------------------- bad input
def test_a_missing_bucket_is_one_clear_error_before_anything_is_written(gcs):
    missing = "gs://no-such-bucket-here/run"
    code, output = run_tool("train", "quickstart.py", f"--config.workdir={missing}", *TINY_RUN)
    assert code == 1 and "Traceback" not in output, output
    assert f"workdir {missing} cannot be reached: the bucket gs://no-such-bucket-here does not exist" in output
    assert not (REPO / "gs:").exists()


def test_no_credentials_is_one_clear_error(tmp_path, monkeypatch):
    # No emulator and credentials that cannot be found: refused at once, naming the path. (The
    # command line's handling of such a line is the missing-bucket test's.)
    for name in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "absent.json"))
    lines = storage.url_problems([("workdir", "gs://some-bucket/run"), ("teacher", "gs://some-bucket/teacher")])
    assert [line.split(": no Google credentials found")[0] for line in lines] == [
        "workdir gs://some-bucket/run cannot be reached", "teacher gs://some-bucket/teacher cannot be reached"]


# ---------------------------------------------------------------------------- a run
def test_a_run_with_its_workdir_at_gcs_writes_there_what_a_local_run_writes(gcs, tmp_path):
    bucket = gcs.new_bucket()
    args = ["--config.train.steps=4", "--config.train.eval_every=4", "--config.train.checkpoint_every=2", *TINY_RUN]
    code, output = run_tool("train", "quickstart.py", f"--config.workdir={tmp_path / 'local'}", *args)
    assert code == 0, output
    code, output = run_tool("train", "quickstart.py", f"--config.workdir={bucket}/run", *args)
    assert code == 0, output
    objects = gcs.objects(f"{bucket}/run")
    for name in ("summary.json", "metrics.jsonl", "loss_curve.png", "checkpoints/2/commit_success.txt",
                 "checkpoints/4/commit_success.txt"):  # fmt: skip
        assert f"run/{name}" in objects, objects
    assert any(name.startswith("run/tensorboard/events.out.tfevents.") for name in objects), objects
    assert not (REPO / "gs:").exists()
    remote, local = storage.path(f"{bucket}/run"), tmp_path / "local"
    assert history(remote) == history(local)
    for a, b in zip(checkpoint_params(remote, 4), checkpoint_params(local, 4), strict=True):
        np.testing.assert_array_equal(a, b)
    # Rerun: resumes from the bucket's last checkpoint and has nothing left to do.
    code, output = run_tool("train", "quickstart.py", f"--config.workdir={bucket}/run", *args)
    assert code == 0 and "resumed" in output, output
