"""Damaged and wrong model files against the loaders (HF directories, our checkpoints, calibration
statistics) and the prune entry point: each case raises one clear error naming the file (and the
tensor or field) and what to do, leaves the files as they were and writes nothing. In-process calls
keep this cheap; one CLI run shows such an error reaching the user as one line with exit code 1."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from hf_reference import make_hf_model
from safetensors.numpy import load_file, save_file
from tool_runs import REPO, run_tool

from slimqwen_jax import loading
from slimqwen_jax import prune as prune_cli
from slimqwen_jax.checkpoint import save_checkpoint
from slimqwen_jax.compression import CalibrationStats, PruningError, load_or_calibrate
from slimqwen_jax.config import ConfigError, tiny
from slimqwen_jax.hf import INDEX_FILE, SINGLE_FILE, CheckpointFileError, CheckpointMismatchError
from slimqwen_jax.model import Qwen3NextForCausalLM
from slimqwen_jax.testing import load_config_file


@pytest.fixture(scope="module")
def hf_source(tmp_path_factory) -> Path:
    """A tiny HF checkpoint (4 layers, D 32, 4 experts top-2), copied by each test that damages it."""
    directory = tmp_path_factory.mktemp("hf") / "source"
    make_hf_model("gqa2_ratio2").save_pretrained(directory)
    return directory


def snapshot(directory: Path) -> dict:
    return {p: p.read_bytes() if p.is_file() else None for p in sorted(directory.rglob("*"))}


# ---------------------------------------------------------------------------- HF directories
def rewrite_tensors(edit):
    def damage(directory: Path):
        tensors = load_file(directory / SINGLE_FILE)
        edit(tensors)
        save_file(tensors, directory / SINGLE_FILE, metadata={"format": "pt"})

    return damage


def rewrite_config(edit):
    def damage(directory: Path):
        config = json.loads((directory / "config.json").read_text())
        edit(config)
        (directory / "config.json").write_text(json.dumps(config))

    return damage


def truncate(path: Path, keep: float = 0.5) -> None:
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])


def corrupt_header(directory: Path) -> None:
    data = bytearray((directory / SINGLE_FILE).read_bytes())
    data[8:16] = b"{garbage"  # the JSON header starts after its 8-byte length
    (directory / SINGLE_FILE).write_bytes(bytes(data))


FIRST_SHARD = "model-00001-of-00002.safetensors"


def behind_an_index(directory: Path, text: str = "", *, lacks: str = "", second_shard: bool = False) -> None:
    """model.safetensors -> model-00001-of-00002.safetensors (less tensor `lacks`) behind an index:
    `text`, by default a true one; `second_shard`: one that puts the last tensor in a
    model-00002-of-00002.safetensors that is not there."""
    tensors = load_file(directory / SINGLE_FILE)
    (directory / SINGLE_FILE).unlink()
    weight_map = dict.fromkeys(tensors, FIRST_SHARD)
    if second_shard:
        weight_map[max(tensors)] = "model-00002-of-00002.safetensors"
    save_file(
        {n: t for n, t in tensors.items() if n != lacks and weight_map[n] == FIRST_SHARD}, directory / FIRST_SHARD
    )
    (directory / INDEX_FILE).write_text(text or json.dumps({"weight_map": weight_map}))


def set_nan(tensors):
    tensors["model.layers.2.mlp.experts.1.down_proj.weight"][0, 0] = np.nan


def wrong_dtype_and_shape(tensors):
    tensors["model.norm.weight"] = tensors["model.norm.weight"].astype(np.int32)
    tensors["model.layers.0.input_layernorm.weight"] = np.zeros(31, np.float32)


def make_directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


HF_CASES = {
    # name: (damage, error type, message pattern)
    "corrupt-header": (corrupt_header, CheckpointFileError,
                       r"model\.safetensors is not a readable safetensors file \(.*invalid JSON.*copy or export"),
    "truncated-safetensors": (lambda d: truncate(d / SINGLE_FILE), CheckpointFileError,
                              r"model\.safetensors is not a readable safetensors file \(.*incomplete metadata"),
    "empty-safetensors": (lambda d: truncate(d / SINGLE_FILE, 0.0), CheckpointFileError,
                          r"model\.safetensors is not a readable safetensors file \(.*header too small"),
    "safetensors-is-a-directory": (lambda d: make_directory(d / SINGLE_FILE), CheckpointFileError,
                                   r"model\.safetensors is not a readable safetensors file"),
    "missing-shard": (lambda d: behind_an_index(d, second_shard=True), FileNotFoundError,
                      r"model-00002-of-00002\.safetensors is listed in model\.safetensors\.index\.json but missing"),
    "shard-lacks-a-tensor": (lambda d: behind_an_index(d, lacks="model.norm.weight"), CheckpointFileError,
                             r"00002\.safetensors lacks 1 tensor\(s\) that .*json places there \(model\.norm\.weight\)"),
    "index-not-json": (lambda d: behind_an_index(d, "{oops"), CheckpointFileError,
                       r"model\.safetensors\.index\.json is not readable JSON"),
    "index-without-weight-map": (lambda d: behind_an_index(d, '{"metadata": {}}'), CheckpointFileError,
                                 r"index\.json has no 'weight_map'"),
    "no-weights": (lambda d: (d / SINGLE_FILE).unlink(), FileNotFoundError,
                   r"has neither model\.safetensors nor model\.safetensors\.index\.json"),
    "config-not-json": (lambda d: (d / "config.json").write_text("{'hidden_size': 32"), ConfigError,
                        r"config\.json is not readable JSON .* replace it"),
    "config-a-list": (lambda d: (d / "config.json").write_text("[32, 4]"), ConfigError,
                      r"config\.json holds a JSON list, not an object"),
    "config-lacks-a-size": (rewrite_config(lambda c: c.pop("hidden_size")), ConfigError,
                            r"config\.json lacks hidden_size; .*copy the checkpoint's config\.json"),
    "config-size-a-string": (rewrite_config(lambda c: c.update(num_experts="4")), ConfigError,
                             r"config\.json: sizes must be integers, got num_experts='4'"),
    "config-inconsistent": (rewrite_config(lambda c: c.update(num_key_value_heads=3)), ConfigError,
                            r"config\.json: invalid Qwen3-Next config:\n.*multiple of num_key_value_heads"),
    "wrong-dtype-and-shape": (rewrite_tensors(wrong_dtype_and_shape), CheckpointMismatchError,
                              r"(?s)model\.layers\.0\.input_layernorm\.weight: checkpoint \(31,\).*"
                              r"model\.norm\.weight: I32, expected one of F64, F32"),
    "nan-in-a-tensor": (rewrite_tensors(set_nan), CheckpointFileError,
                        r"1 tensor\(s\) hold NaN or infinity \(model\.layers\.2\.mlp\.experts\.1\.down_proj"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_a_damaged_hf_directory_raises_one_clear_error(hf_source, tmp_path, case):
    damage, error, pattern = HF_CASES[case]
    directory = Path(shutil.copytree(hf_source, tmp_path / "init"))
    damage(directory)
    before = snapshot(directory)
    with pytest.raises(error, match=pattern) as info:
        loading.load_model(directory, role="init_from")
    print(f"{case}: {info.value}")
    assert str(directory) in str(info.value)
    assert snapshot(directory) == before


def test_the_source_is_a_file(tmp_path):
    (tmp_path / "model").write_text("not a model")
    with pytest.raises(FileNotFoundError, match=r"source .*model is a file, not a model directory"):
        loading.load_model_config(tmp_path / "model", role="source")


# ---------------------------------------------------------------------------- our checkpoints
@pytest.fixture(scope="module")
def our_checkpoint(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("ours") / "model"
    return save_checkpoint(Qwen3NextForCausalLM(tiny(num_mtp_layers=0), rngs=nnx.Rngs(0)), directory)


def largest_file(directory: Path) -> Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize(
    "damage, item",
    [
        (lambda d: [p.write_text("{oops") for p in (d / "config").rglob("*") if p.is_file()], "config"),
        (lambda d: truncate(largest_file(d / "params")), "params"),
        (lambda d: shutil.rmtree(d / "params"), "params"),
    ],
    ids=["corrupt-config", "truncated-params", "deleted-params"],
)
def test_a_damaged_checkpoint_names_the_item(our_checkpoint, tmp_path, damage, item):
    directory = Path(shutil.copytree(our_checkpoint, tmp_path / "model"))
    damage(directory)
    with pytest.raises(CheckpointFileError, match=rf"init_from .*model: its '{item}' item cannot be read") as info:
        loading.load_model(directory, role="init_from")
    print(info.value)
    assert "\n" not in str(info.value) and "another one" in str(info.value)


# ---------------------------------------------------------------------------- calibration statistics
def stats_for(cfg, path: Path) -> Path:
    sums = {"model.layers.0:residual_cos": np.array(9.0), "model.norm:abs_output": np.ones(cfg.hidden_size)}
    return CalibrationStats(sums, 10, {"config": cfg.to_dict()}).save(path)


def nan_sums(path: Path) -> None:
    with np.load(path) as arrays:
        sums = {k: arrays[k] for k in arrays.files}
    sums["model.norm:abs_output"][3] = np.inf
    with open(path, "wb") as f:
        np.savez(f, **sums)


RECALIBRATE = "; delete stats.npz and stats.json to calibrate again"
STATS_CASES = {
    "truncated-npz": (lambda p: truncate(p), r"stats\.npz cannot be read \(BadZipFile: .*" + RECALIBRATE),
    "corrupt-npz": (lambda p: p.write_bytes(b"PK\x03\x04" + b"\x00" * 64), r"stats\.npz cannot be read .*" + RECALIBRATE),
    "truncated-json": (lambda p: truncate(p.with_suffix(".json")),
                       r"stats\.npz cannot be read \(JSONDecodeError: .*" + RECALIBRATE),
    "missing-json": (lambda p: p.with_suffix(".json").unlink(),
                     r"stats\.npz cannot be read \(FileNotFoundError: .*stats\.json.*" + RECALIBRATE),
    "non-finite": (nan_sums, r"stats\.npz hold NaN or infinity in model\.norm:abs_output" + RECALIBRATE),
    "no-tokens": (lambda p: p.with_suffix(".json").write_text('{"num_tokens": 0, "meta": {}}'),
                  r"stats\.npz hold num_tokens 0" + RECALIBRATE),
    "no-config": (lambda p: p.with_suffix(".json").write_text('{"num_tokens": 10, "meta": {}}'),
                  r"stats\.npz name no readable model config .*" + RECALIBRATE),
    "other-architecture": (lambda p: stats_for(tiny(), p), r"stats\.npz were computed on another architecture; move"),
    "a-directory": (lambda p: (p.unlink(), p.mkdir()), r"stats\.npz is a directory; name a \.npz file"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(STATS_CASES))
def test_damaged_calibration_statistics_are_refused(tmp_path, case):
    damage, pattern = STATS_CASES[case]
    cfg = tiny(num_hidden_layers=2)
    path = stats_for(cfg, tmp_path / "stats.npz")
    damage(path)
    model = nnx.eval_shape(lambda: Qwen3NextForCausalLM(cfg, rngs=nnx.Rngs(0)))  # only its config is read
    with pytest.raises(PruningError, match=pattern) as info:
        load_or_calibrate(path, model, data_cfg=None, calibration_cfg=None)
    print(f"{case}: {info.value}")
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------- the prune entry point
# The gqa2_ratio2 source: 4 layers (full attention at 3 only), D 32, 4 experts. A spec that fits it.
FITTING_SPEC = {"depth.num_layers_to_remove": 0, "width.hidden_size": 0, "experts.num_experts": 3}


@pytest.mark.parametrize(
    "overrides, error, pattern",
    [
        ({"experts.num_experts": 9}, PruningError, r"experts\.num_experts is 9; the model has 4 experts"),
        ({"depth.num_layers_to_remove": 4}, PruningError, r"num_layers_to_remove is 4; the model has 4 layers"),
        ({"depth.num_layers_to_remove": 1}, PruningError, r"keep layers \[0, 1, 2\], none of them full attention"),
        ({"stats": "stats.npz"}, PruningError, r"stats\.npz cannot be read .* to calibrate again"),
        ({"export_hf": "a-file"}, FileExistsError, r"export_hf .*a-file exists and is not an empty directory"),
        ({"output": "a-file/model"}, PruningError, r"output .*a-file/model cannot be created: .*a-file is a file"),
    ],
    ids=["too-many-experts", "too-many-layers", "no-full-attention-left", "damaged-statistics", "export-to-a-file",
         "output-under-a-file"],
)  # fmt: skip
def test_the_prune_run_refuses_before_loading_the_source(hf_source, tmp_path, overrides, error, pattern):
    """Each refusal comes from config.json, the statistics file or the paths alone: the source's
    weights are never read (one holds a NaN, so a load would fail with another error), nothing is
    written. The statistics file is truncated; `export_hf` and `output` name paths under tmp_path."""
    source = Path(shutil.copytree(hf_source, tmp_path / "source"))
    rewrite_tensors(set_nan)(source)
    (tmp_path / "a-file").write_text("keep me")
    truncate(stats_for(loading.load_model_config(source), tmp_path / "stats.npz"))
    config = load_config_file(REPO / "configs" / "prune_tiny.py").get_config()
    paths = {k: str(tmp_path / v) for k, v in overrides.items() if k in ("stats", "export_hf", "output")}
    config.update_from_flattened_dict(
        {"source": str(source), "output": str(tmp_path / "out"), **FITTING_SPEC, **overrides, **paths}
    )
    before = snapshot(tmp_path)
    with pytest.raises(error, match=pattern):
        prune_cli.run(config)
    assert snapshot(tmp_path) == before


def test_the_prune_cli_reports_a_damaged_source_in_one_line(hf_source, tmp_path):
    source = Path(shutil.copytree(hf_source, tmp_path / "source"))
    corrupt_header(source)
    spec = [f"--config.{key}={value}" for key, value in FITTING_SPEC.items()]
    code, output = run_tool(
        "prune", "prune_tiny.py", f"--config.source={source}", f"--config.output={tmp_path / 'out'}", *spec
    )
    errors = [line for line in output.splitlines() if "error:" in line]
    assert code == 1 and "Traceback" not in output and len(errors) == 1, output
    assert f"{source / SINGLE_FILE} is not a readable safetensors file" in errors[0], output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"]
