"""`python -m slimqwen_jax.sweep`: grids of overrides, every point checked before any runs, points
run in their own directories, SIGKILL and rerun, a failing point recorded, the gathered report."""

import json
import signal
import time
from pathlib import Path

import pytest
from tool_runs import DATA_CACHE_DIR, REPO, TINY_RUN, run_tool, start_tool

from slimqwen_jax import run_config, sweep
from slimqwen_jax.testing import apply_overrides, load_config_file

# A sweep of tiny quickstart runs over two axes that leave the compiled programs alike (the data
# order and the random init), and a point that fails at run time (its init_from does not exist).
SWEEP_FILE = """
from configs.quickstart import get_config
from slimqwen_jax import sweep


def get_sweep():
    grid = sweep.product(sweep.axis("order", "data.shuffle_seed", [0, 1]), sweep.seeds([0, 1], keys=("seed",)))
    return sweep.Sweep(grid + sweep.points({"missing": {"init_from": "{workdir}/no_such_checkpoint"}}))
"""
# The quickstart runs of test_bad_inputs (the same programs: the compilation cache serves them).
POINT_RUN = ["--config.train.steps=6", "--config.train.eval_every=6", "--config.train.checkpoint_every=3", *TINY_RUN]
TRAIN_POINTS = ["order0_seed0", "order0_seed1", "order1_seed0", "order1_seed1"]


@pytest.fixture(scope="module")
def sweep_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sweep_config") / "tiny_sweep.py"
    path.write_text(SWEEP_FILE)
    return path


def run_sweep(config: Path, workdir: Path, *extra: str, wait: bool = True):
    args = [f"--config.workdir={workdir}", *POINT_RUN, *extra]
    return run_tool("sweep", str(config), *args) if wait else start_tool("sweep", str(config), *args)


@pytest.fixture(scope="module")
def uninterrupted(sweep_file, tmp_path_factory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("uninterrupted") / "sweep"
    code, output = run_sweep(sweep_file, root)
    assert code == 1, output  # the failing point
    return root, output


def snapshot(directory: Path) -> dict:
    return {p: (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else b"") for p in directory.rglob("*")}


# ---------------------------------------------------------------------------- grids
def test_grids_name_their_points_and_merge_their_overrides():
    grid = sweep.product(
        sweep.zipped(sweep.axis("lr", "optimizer.peak_lr", [1e-3, 3e-3]), sweep.axis("wd", "optimizer.weight_decay",
                                                                                     [0.0, 0.1])),
        sweep.seeds([0, 1]),
    )  # fmt: skip
    assert [p.name for p in grid] == ["lr0.001_wd0.0_seed0", "lr0.001_wd0.0_seed1", "lr0.003_wd0.1_seed0",
                                      "lr0.003_wd0.1_seed1"]  # fmt: skip
    assert grid[3].overrides == {"optimizer.peak_lr": 3e-3, "optimizer.weight_decay": 0.1, "seed": 1,
                                 "data.shuffle_seed": 1}  # fmt: skip
    assert grid[0].labels == (("lr", "lr0.001"), ("wd", "wd0.0"), ("seed", "seed0"))
    with pytest.raises(sweep.SweepError, match="equal lengths"):
        sweep.zipped(sweep.seeds([0]), sweep.seeds([0, 1]))
    with pytest.raises(sweep.SweepError, match="seed is set to both 0 and 1"):
        sweep.product(sweep.points({"a": {"seed": 0}}), sweep.points({"b": {"seed": 1}}, axis="other"))


def test_every_bad_point_is_named_in_one_error_before_any_run(tmp_path):
    definition = sweep.Sweep(sweep.points({
        "fine": {"train.steps": 3},
        "typo": {"optimizer.peak_rl": 1e-3},
        "badvalue": {"train.steps": "many", "optimizer.schedule": "linear"},
        "pruned": {"command": "prune", "config": "prune_config", "depth.method": "deepest"},
        "nocommand": {"command": "fly"},
    }))  # fmt: skip
    bases = {"get_config": run_config.base_config, "prune_config": run_config.prune_base_config}
    with pytest.raises(sweep.SweepError) as error:
        sweep.run(definition, bases, tmp_path / "sweep")
    message = str(error.value)
    assert message.startswith("bad sweep (4 of 5 points)") and "point fine" not in message
    assert "point typo: unknown key optimizer.peak_rl (did you mean optimizer.peak_lr?)" in message
    assert "point badvalue: cannot set train.steps = 'many'" in message
    assert "point pruned: depth.method 'deepest' is not one of" in message
    assert "point nocommand: command must be one of" in message
    assert not (tmp_path / "sweep").exists()
    with pytest.raises(sweep.SweepError, match="--only 'fien' matches no point \\(did you mean fine\\?\\)"):
        sweep.run(definition, bases, tmp_path / "sweep", only=["fien"])
    with pytest.raises(sweep.SweepError, match="two points are named 'a'"):
        sweep.run(sweep.Sweep(sweep.points({"a": {}}) * 2), bases, tmp_path / "sweep")


# ---------------------------------------------------------------------------- runs
@pytest.mark.slow
def test_a_sweep_runs_every_point_records_the_failing_one_and_gathers_a_report(uninterrupted, sweep_file):
    root, output = uninterrupted
    records = {r["name"]: r for r in json.loads((root / "sweep.json").read_text())["points"]}
    assert sorted(records) == sorted([*TRAIN_POINTS, "missing"])
    assert {records[p]["status"] for p in TRAIN_POINTS} == {"done"}
    assert records["missing"]["status"] == "failed" and "no_such_checkpoint" in records["missing"]["error"]
    assert "1 point(s) failed: missing" in output
    for name in TRAIN_POINTS:  # each point's summary is its own run's
        summary = json.loads((root / name / "summary.json").read_text())
        assert records[name]["summary"]["heldout_ce"] == summary["heldout_ce"]
        assert records[name]["config"]["workdir"] == str(root / name)
    assert (
        records["order1_seed0"]["config"]["data"]["shuffle_seed"] == 1
        and records["order1_seed0"]["config"]["seed"] == 0
    )
    assert len({records[p]["summary"]["heldout_ce"] for p in TRAIN_POINTS}) == 4  # the seeds and orders differ
    table = (root / "sweep.md").read_text()
    assert "| order | seed | point | status | heldout_ce |" in table and "mean +- standard deviation" in table.lower()
    assert (root / "sweep.png").stat().st_size > 0

    code, listing = run_sweep(sweep_file, root, "--list")
    assert code == 0 and all(f"{name} " in listing for name in TRAIN_POINTS) and "failed" in listing


@pytest.mark.slow
def test_a_sigkilled_sweep_resumes_to_the_uninterrupted_table(uninterrupted, sweep_file, tmp_path):
    root = tmp_path / "sweep"
    second = root / TRAIN_POINTS[1]
    process = run_sweep(sweep_file, root, wait=False)
    deadline = time.time() + 300
    while not (second / "checkpoints" / "3").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    assert json.loads((second / sweep.POINT_FILE).read_text())["status"] == "running"
    finished = snapshot(root / TRAIN_POINTS[0])

    code, output = run_sweep(sweep_file, root)
    assert code == 1, output
    assert snapshot(root / TRAIN_POINTS[0]) == finished  # the finished point is not touched
    assert "sweep: 5 points, 1 done before, 4 to run" in output
    assert "resumed from" in (second / sweep.LOG_FILE).read_text()
    tables = [(r / "sweep.md").read_text().replace(str(r), "<root>") for r in (root, uninterrupted[0])]
    assert tables[0] == tables[1]


def test_a_done_point_whose_config_changed_is_refused(uninterrupted, sweep_file):
    module = load_config_file(sweep_file)
    config = module.get_config()
    apply_overrides(config, POINT_RUN)
    config.workdir, config.data.cache_dir = str(uninterrupted[0]), DATA_CACHE_DIR
    sweep.build_points(module.get_sweep(), sweep.config_bases(module, config), uninterrupted[0])  # as it ran
    config.train.log_every = 1
    with pytest.raises(sweep.SweepError, match="it is done with another config"):
        sweep.run(module.get_sweep(), sweep.config_bases(module, config), uninterrupted[0], only=["order0_*"])


def test_the_example_sweep_lists_its_points():
    code, output = run_tool("sweep", "sweep_quickstart.py", "--list", f"--config.workdir={REPO}/runs/never_written")
    assert code == 0, output
    assert [line.split()[0] for line in output.splitlines() if line.startswith("lr")] == [
        "lr0.001_seed0", "lr0.001_seed1", "lr0.003_seed0", "lr0.003_seed1"]  # fmt: skip
    assert not (REPO / "runs" / "never_written").exists()


def test_prune_and_evaluate_points_run_in_their_directories(tmp_path):
    """A prune point (a random tiny model, cut along the three axes) and an evaluate point that
    reads its output through `{workdir}`, each with its own base config."""
    prune_config, evaluate_config = run_config.prune_base_config(), run_config.evaluate_base_config()
    prune_config.calibration.update(num_samples=4, seq_len=32, batch_size=4)
    prune_config.update(depth={"method": "last", "num_layers_to_remove": 1}, width={"hidden_size": 48,
                        "multiple_of": 16, "rescale_norms": False})  # fmt: skip
    evaluate_config.heldout.update(batch_size=2, num_batches=1, num_drafts=2)
    evaluate_config.decoding.update(num_prompts=1, prompt_len=8, max_new_tokens=4, num_drafts=2, uncached=False)
    for config in (prune_config, evaluate_config):
        config.data.update(seq_len=32, cache_dir=DATA_CACHE_DIR)
    definition = sweep.Sweep(sweep.points({
        "pruned": {"command": "prune", "config": "prune_config", "model.num_hidden_layers": 6},
        "evaluated": {"command": "evaluate", "config": "evaluate_config", "model": "{workdir}/pruned/model"},
    }))  # fmt: skip
    bases = {"prune_config": lambda: prune_config, "evaluate_config": lambda: evaluate_config}
    records = {r["name"]: r for r in sweep.run(definition, bases, tmp_path)}
    assert records["pruned"]["status"] == "done" and records["evaluated"]["status"] == "done", records
    assert records["pruned"]["summary"]["hidden"] == 48 and records["pruned"]["summary"]["layers"] == 5
    assert (tmp_path / "pruned" / "model").is_dir() and (tmp_path / "evaluated" / "eval_report.json").exists()
    report = json.loads((tmp_path / "evaluated" / "eval_report.json").read_text())
    assert records["evaluated"]["summary"]["heldout/loss"] == report["heldout"]["loss"]
    assert "decoding/speculative/acc_0" in records["evaluated"]["summary"]
    assert "| pruned |" in (tmp_path / "sweep.md").read_text()
