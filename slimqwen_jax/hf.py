"""Read and write Qwen3-Next checkpoints in the HF on-disk layout (config.json + safetensors).

One table, `_TENSOR_RULES`, maps each of our parameter paths to its HF tensor name(s) and the
layout change between them; loading and saving both read it. Tensors are read one at a time from
memory-mapped safetensors files, so an 80B checkpoint never needs two copies in host memory.

A directory that cannot be loaded fails with one error naming the file (and tensor) at fault:
`ConfigError` for config.json, `FileNotFoundError` for a missing file, `CheckpointFileError` for a
damaged one, `CheckpointMismatchError` listing every tensor that does not fit the config, all
before any tensor data is read (non-finite values, found while reading, come last).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.typing import DTypeLike
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from slimqwen_jax import storage
from slimqwen_jax.config import ConfigError, Qwen3NextConfig
from slimqwen_jax.model import Qwen3NextForCausalLM, abstract_model

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DEFAULT_MAX_SHARD_BYTES = 4 * 2**30
_NUMPY_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # safetensors dtypes a parameter is converted from
# The sizes every Qwen3-Next config.json states: the defaults would give tensors of other shapes.
REQUIRED_CONFIG_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "intermediate_size", "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
    "linear_value_head_dim", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
    "shared_expert_intermediate_size",
)  # fmt: skip
REWRITE = "copy or export the checkpoint again"


class CheckpointMismatchError(ValueError):
    """A checkpoint that cannot be loaded as the model its config describes (its tensors missing,
    misshapen, of a non-float dtype or unused; subclass `CheckpointFileError`: a file damaged)."""


class CheckpointFileError(CheckpointMismatchError):
    """A checkpoint file that cannot be read: truncated, corrupt, or not what its index says."""


# ---------------------------------------------------------------------------- the tensor table
@dataclasses.dataclass(frozen=True)
class TensorRule:
    """Our parameter path pattern, its HF name template and how the layout changes (ours <-> HF)."""

    ours: str  # regex with named groups, matched against the dotted parameter path
    hf: str  # format template using those groups (and {e} for the expert index)
    to_hf: Callable[[np.ndarray], np.ndarray]
    from_hf: Callable[[np.ndarray], np.ndarray]
    per_expert: bool = False


def _identity(x):
    return x


_TENSOR_RULES = (
    # Experts: ours [E, in, out] stacked; HF one torch Linear weight [out, in] per expert.
    TensorRule(r"(?P<p>.*)\.experts\.(?P<proj>gate_proj|up_proj|down_proj)", "{p}.experts.{e}.{proj}.weight",
               np.transpose, np.transpose, per_expert=True),
    # Depthwise conv: ours [K, C]; HF torch Conv1d weight [C, 1, K].
    TensorRule(r"(?P<p>.*)\.conv1d\.kernel", "{p}.conv1d.weight",
               lambda w: np.transpose(w)[:, None, :], lambda w: np.transpose(w[:, 0, :])),
    TensorRule(r"(?P<p>.*)\.embed_tokens\.embedding", "{p}.embed_tokens.weight", _identity, _identity),
    # Linear: ours kernel [in, out]; HF weight [out, in].
    TensorRule(r"(?P<p>.*)\.kernel", "{p}.weight", np.transpose, np.transpose),
    # Norm weights, dt_bias, A_log: same name and layout.
    TensorRule(r"(?P<p>.*)", "{p}", _identity, _identity),
)  # fmt: skip


def _rule_for(path: str) -> tuple[TensorRule, dict[str, str]]:
    for rule in _TENSOR_RULES:
        match = re.fullmatch(rule.ours, path)
        if match:
            return rule, match.groupdict()
    raise AssertionError(f"no tensor rule matches {path}")  # the last rule matches everything


def _hf_names(path: str, shape: tuple[int, ...]) -> list[str]:
    rule, groups = _rule_for(path)
    if rule.per_expert:
        return [rule.hf.format(e=e, **groups) for e in range(shape[0])]
    return [rule.hf.format(**groups)]


def _hf_shape(path: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of (each of) the HF tensor(s) holding our parameter of the given shape."""
    rule, _ = _rule_for(path)
    if rule.per_expert:
        shape = shape[1:]
    return rule.to_hf(np.empty(shape, np.bool_)).shape


def _param_paths(state: nnx.State) -> Iterator[tuple[str, nnx.Variable]]:
    """(dotted path, variable) of every variable: `model.layers.0.self_attn.q_proj.kernel`, ..."""
    for key_path, variable in nnx.to_flat_state(state):
        yield ".".join(str(k) for k in key_path), variable


# ---------------------------------------------------------------------------- reading
def _read_json_object(path: Path, error: type[Exception], what_to_do: str) -> dict:
    """The JSON object in `path`; anything else raises `error` naming the file and `what_to_do`."""
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as reason:
        raise error(f"{path} is not readable JSON ({reason}); {what_to_do}") from None
    if not isinstance(value, dict):
        raise error(f"{path} holds a JSON {type(value).__name__}, not an object; {what_to_do}")
    return value


def _open_safetensors(path: Path):
    """A safe_open handle of `path`; a damaged file raises CheckpointFileError naming it. A file at
    a URL is copied to local temporary storage first (safe_open maps a local file), removed once open:
    the handle's mapping keeps its data."""
    try:
        with storage.local_copy(path) as local:
            return safe_open(local, framework="np")
    except (SafetensorError, OSError) as reason:
        raise CheckpointFileError(f"{path} is not a readable safetensors file ({reason}); {REWRITE}") from None


class _SafetensorsDir:
    """Lazy, name-indexed access to the tensors of one HF checkpoint directory."""

    def __init__(self, directory: Path):
        index = directory / INDEX_FILE
        self._handles = {}
        if index.exists():
            weight_map = _read_json_object(index, CheckpointFileError, REWRITE).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise CheckpointFileError(f"{index} has no 'weight_map' of tensor name -> file name; {REWRITE}")
        elif (directory / SINGLE_FILE).exists():
            self._handles[SINGLE_FILE] = _open_safetensors(directory / SINGLE_FILE)
            weight_map = {name: SINGLE_FILE for name in self._handles[SINGLE_FILE].keys()}
        else:
            raise FileNotFoundError(f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE}: not an HF checkpoint")
        self.directory = directory
        self.weight_map = weight_map

    def _file(self, name: str):
        filename = self.weight_map[name]
        if filename not in self._handles:
            path = self.directory / filename
            if not path.exists():
                raise FileNotFoundError(f"{path} is listed in {INDEX_FILE} but missing; {REWRITE}")
            handle = _open_safetensors(path)
            held = set(handle.keys())
            absent = sorted(n for n, f in self.weight_map.items() if f == filename and n not in held)
            if absent:
                raise CheckpointFileError(
                    f"{path} lacks {len(absent)} tensor(s) that {INDEX_FILE} places there ({', '.join(absent[:3])}"
                    f"{', ...' if len(absent) > 3 else ''}); {REWRITE}"
                )
            self._handles[filename] = handle
        return self._handles[filename]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._file(name).get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """The safetensors dtype name: F32, BF16, I64, F8_E4M3, ..."""
        return self._file(name).get_slice(name).get_dtype()

    def read(self, name: str) -> np.ndarray:
        return self._file(name).get_tensor(name)


def _count_mtp_layers(names) -> int:
    depths = {int(m.group(1)) for n in names if (m := re.match(r"mtp\.layers\.(\d+)\.", n))}
    return max(depths) + 1 if depths else 0


def _check_tensors(state: nnx.State, tensors: _SafetensorsDir, cfg: Qwen3NextConfig) -> None:
    """Raise one CheckpointMismatchError listing every missing, misshapen, non-float and unused tensor."""
    missing, misshapen, not_float, used = [], [], [], set()
    for path, variable in _param_paths(state):
        expected = _hf_shape(path, variable.shape)
        for name in _hf_names(path, variable.shape):
            if name not in tensors.weight_map:
                missing.append(f"{name} (for {path})")
                continue
            used.add(name)
            if tensors.shape(name) != expected:
                misshapen.append(f"{name}: checkpoint {tensors.shape(name)}, model expects {expected} (for {path})")
            if tensors.dtype(name) not in FLOAT_DTYPES:
                not_float.append(f"{name}: {tensors.dtype(name)}, expected one of {', '.join(FLOAT_DTYPES)}")
    unused = sorted(set(tensors.weight_map) - used - ({"lm_head.weight"} if cfg.tie_word_embeddings else set()))
    if missing or misshapen or not_float or unused:
        sections = [
            ("parameters left unfilled", missing),
            ("wrong shapes", misshapen),
            ("wrong dtypes (dequantize or convert the checkpoint first)", not_float),
            ("HF tensors left unused", unused),
        ]
        report = "\n".join(
            f"{title} ({len(items)}):\n    " + "\n    ".join(items) for title, items in sections if items
        )
        raise CheckpointMismatchError(f"checkpoint {tensors.directory} does not match its config:\n{report}")


def _check_sizes(hf: dict, config_file: Path) -> None:
    """Every field of REQUIRED_CONFIG_FIELDS present and an integer, or one ConfigError naming them."""
    missing = [name for name in REQUIRED_CONFIG_FIELDS if name not in hf]
    if missing:
        raise ConfigError(
            f"{config_file} lacks {', '.join(missing)}; a Qwen3-Next config.json states every size: "
            "copy the checkpoint's config.json again"
        )
    bad = [f"{name}={hf[name]!r}" for name in REQUIRED_CONFIG_FIELDS if type(hf[name]) is not int]
    if bad:
        raise ConfigError(f"{config_file}: sizes must be integers, got {', '.join(bad)}; fix these fields")


def load_config(path: str | os.PathLike, **runtime) -> Qwen3NextConfig:
    """The model config of an HF checkpoint directory; MTP depth comes from its `mtp.*` tensors.
    Raises ConfigError naming config.json for a file that is not a Qwen3-Next config."""
    directory = storage.path(path)
    config_file = directory / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} not found: not an HF checkpoint directory")
    hf = _read_json_object(config_file, ConfigError, "replace it with the checkpoint's transformers config.json")
    if hf.get("model_type") == "qwen3_next":  # any other model type: from_hf_dict names it
        _check_sizes(hf, config_file)
    hf["num_nextn_predict_layers"] = _count_mtp_layers(_SafetensorsDir(directory).weight_map)
    try:
        return Qwen3NextConfig.from_hf_dict(hf, **runtime)
    except ConfigError as error:
        raise ConfigError(f"{config_file}: {error}") from None


def load_model(
    path: str | os.PathLike, *, dtype: DTypeLike = "float32", param_dtype: DTypeLike | None = None, **runtime
) -> Qwen3NextForCausalLM:
    """Load an HF Qwen3-Next checkpoint directory (single or sharded safetensors, `mtp.*` included).

    Args:
      path: directory with config.json and model.safetensors or model.safetensors.index.json.
      dtype: compute dtype: "float32" or "bfloat16", or jnp.float32 / jnp.bfloat16.
      param_dtype: parameter dtype; defaults to `dtype`.
      **runtime: other run-time config fields (gated_delta_rule_impl, moe_backend).
    Raises:
      ConfigError (config.json), FileNotFoundError (a missing file), CheckpointFileError (a damaged
      file), CheckpointMismatchError listing every HF tensor left unused and every parameter left
      unfilled or of the wrong shape or dtype: all before any tensor data is read. Last,
      CheckpointFileError naming every tensor that holds NaN or infinity.
    """
    cfg = load_config(path, dtype=dtype, param_dtype=param_dtype or dtype, **runtime)
    tensors = _SafetensorsDir(storage.path(path))
    graphdef, state = abstract_model(cfg)
    _check_tensors(state, tensors, cfg)
    np_dtype = _NUMPY_DTYPES[cfg.param_dtype]
    non_finite = []

    def read(name: str) -> np.ndarray:
        tensor = tensors.read(name)
        if not np.isfinite(tensor).all():
            non_finite.append(name)
        return tensor

    for path_str, variable in _param_paths(state):
        rule, _ = _rule_for(path_str)
        names = _hf_names(path_str, variable.shape)
        if rule.per_expert:
            buffer = np.empty(variable.shape, np_dtype)
            for e, name in enumerate(names):
                buffer[e] = rule.from_hf(read(name)).astype(np_dtype)
        else:
            buffer = rule.from_hf(read(names[0])).astype(np_dtype)
        variable.set_value(jnp.asarray(buffer))
        del buffer
    if non_finite:
        raise CheckpointFileError(
            f"{path}: {len(non_finite)} tensor(s) hold NaN or infinity ({', '.join(non_finite[:3])}"
            f"{', ...' if len(non_finite) > 3 else ''}); the checkpoint is damaged or diverged: use another one"
        )
    return nnx.merge(graphdef, state)


# ---------------------------------------------------------------------------- writing
def _hf_tensors(model: Qwen3NextForCausalLM) -> Iterator[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]]:
    """(HF name, shape, lazy producer) for every tensor of the model, in parameter order."""
    for path, variable in _param_paths(nnx.state(model, nnx.Param)):
        rule, _ = _rule_for(path)
        shape = _hf_shape(path, variable.shape)
        for e, name in enumerate(_hf_names(path, variable.shape)):
            index = e if rule.per_expert else ...
            yield name, shape, lambda v=variable, i=index, r=rule: np.ascontiguousarray(r.to_hf(np.asarray(v[...][i])))


def _plan_shards(sizes: list[int], max_shard_bytes: int) -> list[int]:
    """Shard number of each tensor, filling shards in order up to max_shard_bytes."""
    shard, filled, plan = 0, 0, []
    for size in sizes:
        if filled and filled + size > max_shard_bytes:
            shard, filled = shard + 1, 0
        plan.append(shard)
        filled += size
    return plan


def save_model(
    model: Qwen3NextForCausalLM,
    path: str | os.PathLike,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> Path:
    """Write `model` as an HF checkpoint directory that `transformers` loads (`mtp.*` included).

    Tensors go to `model.safetensors`, or to numbered shards with `model.safetensors.index.json` when
    they exceed `max_shard_bytes`. The directory is written under a temporary name and renamed at
    the end, so a failure never leaves a half-written checkpoint; an existing non-empty `path` is
    refused unless `overwrite`.
    """
    target = Path(path)
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"{target} exists and is not empty; pass overwrite=True to replace it")
    cfg = model.config
    tensors = list(_hf_tensors(model))
    itemsize = np.dtype(_NUMPY_DTYPES[cfg.param_dtype]).itemsize
    plan = _plan_shards([itemsize * int(np.prod(shape)) for _, shape, _ in tensors], max_shard_bytes)
    num_shards = plan[-1] + 1
    filenames = (
        [SINGLE_FILE]
        if num_shards == 1
        else [f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors" for i in range(num_shards)]
    )

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        (staging / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2) + "\n")
        for shard in range(num_shards):
            arrays = {name: produce() for (name, _, produce), s in zip(tensors, plan) if s == shard}
            save_file(arrays, staging / filenames[shard], metadata={"format": "pt"})
            del arrays
        if num_shards > 1:
            index = {
                "metadata": {"total_size": sum(itemsize * int(np.prod(shape)) for _, shape, _ in tensors)},
                "weight_map": {name: filenames[s] for (name, _, _), s in zip(tensors, plan)},
            }
            (staging / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
