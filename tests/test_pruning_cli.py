"""The prune entry point: a tiny run end to end (its weights against a numpy reference of the
documented rules), refusals, bad flags, and the 80B dry run."""

import numpy as np
import pruning_reference as ref
import pytest
from flax import nnx
from tool_runs import REPO, run_tool

from slimqwen_jax import prune as prune_cli
from slimqwen_jax.checkpoint import load_checkpoint, save_checkpoint
from slimqwen_jax.compression import CalibrationStats, count_parameters, format_count
from slimqwen_jax.compression.state import flat_params
from slimqwen_jax.config import FULL_ATTENTION, preset, tiny
from slimqwen_jax.model import Qwen3NextForCausalLM
from slimqwen_jax.testing import hand_count_parameters, load_config_file

SMALL_CALIBRATION = [
    "--config.calibration.num_samples=8", "--config.calibration.seq_len=64", "--config.calibration.batch_size=4",
]  # fmt: skip


def run_prune(*args: str) -> tuple[int, str]:
    return run_tool("prune", "prune_tiny.py", *args)


def load_config(name: str):
    module = load_config_file(REPO / "configs" / f"{name}.py")
    return module, module.get_config()


def params_of(model) -> dict[str, np.ndarray]:
    return {path: np.asarray(v[...], np.float64) for path, v in flat_params(nnx.state(model, nnx.Param)).items()}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """configs/prune_tiny.py on a saved source (the config's 6-layer model, seeded, norm weights far
    from 0): (source parameters, output directory, exit code, log)."""
    directory = tmp_path_factory.mktemp("prune")
    source = Qwen3NextForCausalLM(tiny(num_hidden_layers=6), rngs=nnx.Rngs(3))
    rng = np.random.default_rng(3)
    for path, variable in flat_params(nnx.state(source)).items():
        if path.endswith("norm.weight"):
            variable.set_value(variable[...] + 0.3 * rng.standard_normal(variable.shape).astype(np.float32))
    save_checkpoint(source, directory / "source")
    output = directory / "model"
    code, log = run_prune(f"--config.source={directory / 'source'}", f"--config.output={output}", *SMALL_CALIBRATION)
    return params_of(source), output, code, log


def test_tiny_prune_run_writes_checkpoint_statistics_and_refuses_to_overwrite(tiny_run):
    _, output, code, log = tiny_run
    assert code == 0, log
    assert "tok/s" in log and "parameters: total" in log
    model = load_checkpoint(output)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_experts) == (4, 48, 6)
    assert model.mtp.layers[0].mlp.experts.gate_proj.shape == (6, 48, cfg.moe_intermediate_size)
    stats = CalibrationStats.load(output.with_name("model.calibration.npz"))
    assert stats.num_tokens == 8 * 64
    # Nothing is overwritten; the refusal comes before any work.
    code, log = run_prune(f"--config.output={output}", *SMALL_CALIBRATION)
    assert code == 1 and "already exists" in log, log


def test_pruned_weights_are_the_source_weights_at_the_kept_layers_experts_and_channels(tiny_run):
    """Every tensor the run wrote, against numpy from the source weights, the saved statistics and
    the documented rules: the first 4 of 6 layers; per MoE block (the MTP's too) 6 of 8 experts by
    REAP, the top 3 kept as they are, the next 3 bases, the other 2 averaged into their most similar
    base (cosine of flattened weights) with REAP weights; the 48 of 64 channels of highest mean
    |residual-norm output| over the kept norms, those norms rescaled by sqrt(64 / 48)."""
    source, output, code, log = tiny_run
    assert code == 0, log
    sums, num_tokens = ref.load_stats(output.with_name("model.calibration.npz"))
    kept_layers = range(4)
    renamed = {}  # pruned path -> source path: the first 4 layers keep their indices
    for path in source:
        layer = path.split(".")[2] if path.startswith("model.layers.") else None
        if layer is None or int(layer) in kept_layers:
            renamed[path] = path
    expected = {path: source[path] for path in renamed}
    for moe in [f"model.layers.{i}.mlp" for i in kept_layers] + ["mtp.layers.0.mlp"]:
        importance = ref.expert_importance(sums, moe, "reap")
        similarity = ref.cosine_matrix(ref.expert_vectors(source, moe))
        groups = ref.expert_groups(importance, similarity, num_experts=6, num_preserved=3)
        assert sorted(j for g in groups for j in g) == list(range(8)) and max(map(len, groups)) > 1
        for name in ("gate_proj", "up_proj", "down_proj"):
            expected[f"{moe}.experts.{name}"] = ref.merged_experts(source[f"{moe}.experts.{name}"], groups, importance)
        expected[f"{moe}.gate.kernel"] = source[f"{moe}.gate.kernel"][:, sorted(g[0] for g in groups)]
    keep = ref.kept_channels(sums, num_tokens, ref.residual_norm_modules(kept_layers, 1), width=48)
    expected = {path: ref.gather_channels(path, value, keep, 64) for path, value in expected.items()}

    pruned = params_of(load_checkpoint(output))
    assert sorted(pruned) == sorted(expected)
    for path, value in expected.items():
        np.testing.assert_allclose(pruned[path], value, rtol=1e-6, atol=1e-7, err_msg=path)


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
