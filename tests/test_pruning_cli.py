"""The prune entry point: a tiny run end to end, refusals, bad flags, and the 80B dry run."""

import numpy as np
from tool_runs import REPO, run_tool

from slimqwen_jax import prune as prune_cli
from slimqwen_jax.checkpoint import load_checkpoint
from slimqwen_jax.config import FULL_ATTENTION, preset
from slimqwen_jax.pruning import CalibrationStats, count_parameters, format_count
from slimqwen_jax.testing import hand_count_parameters, load_config_file

SMALL_CALIBRATION = [
    "--config.calibration.num_samples=8", "--config.calibration.seq_len=64", "--config.calibration.batch_size=4",
]  # fmt: skip


def run_prune(*args: str) -> tuple[int, str]:
    return run_tool("prune", "prune_tiny.py", *args)


def load_config(name: str):
    module = load_config_file(REPO / "configs" / f"{name}.py")
    return module, module.get_config()


def test_tiny_prune_run_writes_checkpoint_statistics_and_refuses_to_overwrite(tmp_path):
    output = tmp_path / "model"
    code, log = run_prune(f"--config.output={output}", *SMALL_CALIBRATION)
    assert code == 0, log
    assert "tok/s" in log and "parameters: total" in log
    model = load_checkpoint(output)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_experts) == (4, 48, 6)
    assert model.mtp.layers[0].mlp.experts.gate_proj.shape == (6, 48, cfg.moe_intermediate_size)
    stats = CalibrationStats.load(tmp_path / "model.calibration.npz")
    assert stats.num_tokens == 8 * 64
    # Nothing is overwritten; the refusal comes before any work.
    code, log = run_prune(f"--config.output={output}", *SMALL_CALIBRATION)
    assert code == 1 and "already exists" in log, log


def test_unknown_flag_exits_2():
    code, log = run_prune("--config.depht.num_layers_to_remove=1")
    assert code == 2 and "bad command line" in log, log


def test_dry_run_of_the_80b_to_23a2b_plan(capsys):
    _, config = load_config("prune_80b_to_23a2b")
    config.dry_run = True
    new_cfg, new_params = prune_cli.run(config)
    printed = capsys.readouterr().out
    print(printed)
    source = preset("qwen3_next_80b_a3b")
    assert new_cfg.architecture() == preset("slimqwen_23a2b").architecture()
    assert sum(t == FULL_ATTENTION for t in new_cfg.layer_types) == 9
    (total_before, active_before), (total_after, active_after) = (
        hand_count_parameters(source),
        hand_count_parameters(new_cfg),
    )
    assert count_parameters(new_cfg, new_params).total == total_after
    assert 79e9 < total_before < 81e9 and 3.7e9 < active_before < 3.95e9  # paper: 80B / 3.8B
    assert 22.5e9 < total_after < 23.5e9 and 1.9e9 < active_after < 2.2e9  # paper: 23B / 2.0B
    total_line = next(line for line in printed.splitlines() if line.startswith("parameters: total"))
    active_line = next(line for line in printed.splitlines() if line.startswith("parameters: active"))
    assert total_line.split()[-2:] == [format_count(total_before), format_count(total_after)]
    assert active_line.split()[-2:] == [format_count(active_before), format_count(active_after)]
    assert "placeholder" in printed and np.all([s in printed for s in ("hidden_size", "num_experts_per_tok")])
