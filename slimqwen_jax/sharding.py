"""Device mesh and the one table of logical-axis rules.

Model code names logical axes only (`logical_axes` metadata on every parameter, `batch` for
inputs); `LOGICAL_RULES` maps them to mesh axes. Mesh axes: `data` (pure data parallelism),
`fsdp` (data parallelism with parameters sharded along the hidden dimension) and `expert`.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "expert")

# Logical axis -> mesh axis or axes (missing or None: replicated).
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp", "expert"),
    "embed": "fsdp",
    "expert": "expert",
}


class MeshError(ValueError):
    """A mesh that does not fit the devices or the model."""


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
    """A mesh with axes (data, fsdp, expert); one size may be -1 to take the remaining devices."""
    devices = jax.devices() if devices is None else devices
    sizes = [int(mesh_cfg[axis]) for axis in MESH_AXES]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise MeshError(f"mesh sizes {dict(zip(MESH_AXES, sizes))}: each must be positive, at most one may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise MeshError(f"{len(devices)} devices cannot be split into a mesh with fixed axes of product {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise MeshError(
            f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, but {len(devices)} are available"
        )
    return jax.sharding.Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_to_spec(logical_axes, shape, mesh: jax.sharding.Mesh, name: str = "") -> PartitionSpec:
    """The PartitionSpec for an array with the given logical axes, checking divisibility."""
    spec = []
    for axis_name, size in zip(logical_axes, shape):
        mesh_axes = LOGICAL_RULES.get(axis_name) if axis_name else None
        if mesh_axes is not None:
            parts = math.prod(mesh.shape[a] for a in ((mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes))
            if size % parts:
                raise MeshError(
                    f"{name or 'array'}: axis '{axis_name}' of size {size} is not divisible by mesh {mesh_axes} ({parts})"
                )
        spec.append(mesh_axes)
    return PartitionSpec(*spec)


def state_shardings(state: nnx.State, mesh: jax.sharding.Mesh):
    """NamedShardings for every variable of an (abstract) state, from its `logical_axes` metadata."""

    def sharding(path, variable):
        axes = variable.get_metadata().get("logical_axes") or (None,) * len(variable.shape)
        name = ".".join(str(p) for p in path)
        return variable.replace(NamedSharding(mesh, logical_to_spec(axes, variable.shape, mesh, name)))

    return nnx.map_state(sharding, state)


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int, batch_dim: int = 0) -> NamedSharding:
    """Sharding of a token batch: `batch_dim` over the batch mesh axes, the rest replicated."""
    spec = [None] * ndim
    spec[batch_dim] = LOGICAL_RULES["batch"]
    return NamedSharding(mesh, PartitionSpec(*spec))
