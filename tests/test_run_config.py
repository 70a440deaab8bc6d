"""The run-config schema: every config file builds from its base and passes `problems`, with the
overrides of the command its docstring documents; a misspelt, missing or bad key is refused in one
line, every problem of every section at once, before any work."""

import re

import pytest
from tool_runs import REPO, run_tool

from slimqwen_jax import run_config, sweep
from slimqwen_jax.config import ConfigError
from slimqwen_jax.testing import apply_overrides, load_config_file

CONFIGS = sorted((REPO / "configs").glob("*.py"))
# The reproduction's config defines get_reproduction instead: tests/test_reproduce.py builds its points.
REPRODUCTIONS = [path for path in CONFIGS if "def get_reproduction(" in path.read_text()]
RUN_CONFIGS = [path for path in CONFIGS if path not in REPRODUCTIONS]
COMMAND = re.compile(
    r"python -m slimqwen_jax\.(train|prune|evaluate|pipeline|sweep) --config configs/(\S+)((?: --config\.\S+)*)"
)


def documented(path):
    """(command, config, module) of a config file: its docstring's command, and the config with that
    command's overrides applied."""
    module = load_config_file(path)
    match = COMMAND.match(module.__doc__)
    assert match and match.group(2) == path.name, f"{path.name}'s docstring must open with its exact command"
    config = module.get_config()
    apply_overrides(config, match.group(3).split())
    tool = match.group(1)
    return {"pipeline": "train", "sweep": "train"}.get(tool, tool), config, module


def test_every_config_file_is_a_run_config_or_a_reproduction():
    for path in REPRODUCTIONS:
        module = load_config_file(path)
        assert module.__doc__.startswith(f"python -m slimqwen_jax.reproduce --config configs/{path.name}"), path
        assert not hasattr(module, "get_config"), path
    assert all(hasattr(load_config_file(path), "get_config") for path in RUN_CONFIGS)


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_every_config_passes_its_checks_as_documented(path, tmp_path):
    command, config, module = documented(path)
    assert run_config.problems(config, command) == []
    assert run_config.key_problems(config, run_config.BASES[command]()) == []
    if hasattr(module, "get_sweep"):  # every point of its sweep too (build_points raises naming the bad ones)
        assert sweep.build_points(module.get_sweep(), sweep.config_bases(module, config), tmp_path / "sweep")


def quickstart():
    return load_config_file(REPO / "configs" / "quickstart.py").get_config()


def test_a_misspelt_key_is_refused_in_one_line_with_the_nearest_key():
    config = quickstart()
    config.train.stpes = 3
    with pytest.raises(ConfigError) as error:
        run_config.check(config)
    assert str(error.value) == "bad train config: unknown key train.stpes (did you mean train.steps?)"


def test_a_missing_key_is_refused_in_one_line():
    config = quickstart()
    del config.loss["temperature"]
    with pytest.raises(ConfigError) as error:
        run_config.check(config)
    assert str(error.value) == "bad train config: missing key loss.temperature"


def test_keys_of_stages_and_the_pipeline_teacher_are_checked_too():
    config = load_config_file(REPO / "configs" / "slimqwen_tiny.py").get_config()
    config.stages[1].experts.simlarity = "router_logits"
    config.pipeline.teacher.optimizer.peek_lr = 1.0
    assert run_config.problems(config) == [
        "unknown key pipeline.teacher.optimizer.peek_lr (did you mean pipeline.teacher.optimizer.peak_lr?)",
        "unknown key stages[1].experts.simlarity (did you mean stages[1].experts.similarity?)",
    ]


def test_every_bad_value_of_every_section_is_named_in_one_error():
    config = quickstart()
    config.model.num_experts_per_tok = 99
    config.train.eval_every = 0
    config.optimizer.peak_lr = -1.0
    config.loss.lam.start = 0.5  # KD without a teacher
    config.data.source = "parquet"
    config.calibration.num_samples = 0
    config.baseline = "scratch"
    found = run_config.problems(config)
    expected = ["model: num_experts_per_tok (99)", "train.eval_every must be >= 1", "optimizer.peak_lr must be > 0",
                "loss.lam is not 0 but no teacher", "data: unknown source 'parquet'",
                "calibration.num_samples must be >= 1", "baseline must be one of"]  # fmt: skip
    for part in expected:
        assert sum(part in line for line in found) == 1, (part, found)
    assert len(found) == len(expected), found


def test_a_stage_that_does_not_fit_is_refused_with_the_rest():
    config = load_config_file(REPO / "configs" / "slimqwen_tiny.py").get_config()
    config.stages[0].depth.num_layers_to_remove = 8
    config.train.log_every = 0
    found = run_config.problems(config)
    assert any(line.startswith("stages[0] does not fit the model it prunes") for line in found), found
    assert "train.log_every must be >= 1, got 0" in found


@pytest.mark.parametrize("command, base", [("prune", run_config.prune_base_config),
                                           ("evaluate", run_config.evaluate_base_config)])  # fmt: skip
def test_prune_and_evaluate_configs_have_their_own_schema(command, base):
    config = base()
    assert run_config.problems(config, command) == []
    config.dtyp = "float32"
    assert run_config.problems(config, command) == ["unknown key dtyp (did you mean dtype?)"]


def test_the_entry_point_refuses_a_config_file_typo_in_one_line_before_any_work(tmp_path):
    config_file = tmp_path / "typo.py"
    config_file.write_text(
        "from configs.quickstart import get_config as quickstart\n\n"
        "def get_config():\n    config = quickstart()\n    config.optimizer.warmup_step = 10\n    return config\n"
    )
    code, output = run_tool("train", str(config_file), f"--config.workdir={tmp_path / 'run'}")
    assert code == 1, output
    errors = [line for line in output.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].endswith(
        "bad train config: unknown key optimizer.warmup_step (did you mean optimizer.warmup_steps?)"
    ), output
    assert not (tmp_path / "run").exists()
