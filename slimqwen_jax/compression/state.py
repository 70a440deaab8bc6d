"""Parameter states as flat `{dotted path: variable}` maps, real or abstract.

A pruning transform reads the model's `nnx.State` (real arrays or `jax.ShapeDtypeStruct` leaves),
computes new values path by path and returns a new state of the same variables (`with_values`);
`check_fits` compares a state with the model a config describes (`pruning.prune` does it once at
the end).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from slimqwen_jax.compression.spec import PruningError
from slimqwen_jax.config import Qwen3NextConfig
from slimqwen_jax.model import Qwen3NextForCausalLM, abstract_model

# The logical axis of the hidden dimension, and of the MTP fc input [2D] = [embedding half | hidden half].
EMBED_AXIS = "embed"
EMBED_PAIR_AXIS = "embed_pair"
EXPERT_AXIS = "expert"


def abstract_params(cfg: Qwen3NextConfig) -> nnx.State:
    """Shapes-only parameters of the model `cfg` describes: plan a compression without weights."""
    return abstract_model(cfg)[1]


def _path_parts(path: str) -> tuple[str | int, ...]:
    return tuple(int(p) if p.isdigit() else p for p in path.split("."))


def _dotted(parts) -> str:
    return ".".join(str(k) for k in parts)


def flat_params(params: nnx.State) -> dict[str, nnx.Variable]:
    """{dotted path: variable}: `model.layers.0.self_attn.q_proj.kernel`, ..."""
    return {_dotted(parts): variable for parts, variable in nnx.to_flat_state(params)}


def is_abstract(params: nnx.State) -> bool:
    """True when the parameters are shapes only (`jax.ShapeDtypeStruct` leaves)."""
    return any(isinstance(v.get_value(), jax.ShapeDtypeStruct) for v in flat_params(params).values())


def require_abstract(params: nnx.State, what: str) -> None:
    """Statistics may be absent only when planning on abstract parameters."""
    if not is_abstract(params):
        raise PruningError(f"{what} needs calibration statistics to choose what to keep (run calibration first)")


def logical_axes(variable: nnx.Variable) -> tuple[str | None, ...]:
    return tuple(variable.get_metadata().get("logical_axes") or (None,) * len(variable.shape))


def take(value: Any, index, axis: int) -> Any:
    """`jnp.take(value, index, axis)`, or its shape for a `jax.ShapeDtypeStruct`."""
    index = np.asarray(index)
    if isinstance(value, jax.ShapeDtypeStruct):
        shape = list(value.shape)
        shape[axis] = len(index)
        return jax.ShapeDtypeStruct(tuple(shape), value.dtype)
    return jnp.take(value, jnp.asarray(index), axis=axis)


def to_state(variables: dict[str, nnx.Variable]) -> nnx.State:
    """An `nnx.State` from {dotted path: variable} (numeric path parts become list indices)."""
    return nnx.from_flat_state([(_path_parts(path), variable) for path, variable in variables.items()])


def with_values(params: nnx.State, values: dict[str, Any], renamed: dict[str, str] | None = None) -> nnx.State:
    """A new state: each variable of `params` whose path is in `values` (after `renamed`: old -> new
    path) holds its new value, metadata kept; paths missing from `values` are dropped."""
    renamed = renamed or {}
    variables = {}
    for path, variable in flat_params(params).items():
        new_path = renamed.get(path, path)
        if new_path in values:
            variables[new_path] = variable.replace(values[new_path])
    return to_state(variables)


def check_fits(cfg: Qwen3NextConfig, params: nnx.State) -> None:
    """Raise ValueError naming every parameter missing, extra or misshapen for the model of `cfg`."""
    expected = {path: tuple(v.shape) for path, v in flat_params(abstract_params(cfg)).items()}
    found = {path: tuple(v.shape) for path, v in flat_params(params).items()}
    problems = [f"{path}: missing" for path in expected if path not in found]
    problems += [f"{path}: not a parameter of this model" for path in found if path not in expected]
    problems += [
        f"{path}: {found[path]}, expected {shape}"
        for path, shape in expected.items()
        if found.get(path, shape) != shape
    ]
    if problems:
        raise ValueError("parameters do not fit the config:\n  " + "\n  ".join(problems))


def build_model(cfg: Qwen3NextConfig, params: nnx.State) -> Qwen3NextForCausalLM:
    """The model for `cfg` holding `params` (e.g. the output of a pruning transform)."""
    return nnx.merge(abstract_model(cfg)[0], params)
