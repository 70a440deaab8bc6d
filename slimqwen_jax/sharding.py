"""Device mesh and the one table of logical-axis rules.

Model code names logical axes only (`logical_axes` metadata on every parameter, `batch` for
inputs); `LOGICAL_RULES` maps them to mesh axes. Mesh axes: `data` (pure data parallelism),
`fsdp` (data parallelism with parameters sharded along the hidden dimension) and `expert`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
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


def mesh_size_problems(mesh_cfg) -> list[str]:
    """The problem of mesh sizes that no device count fits: every size positive, or -1 once."""
    sizes = [int(mesh_cfg[axis]) for axis in MESH_AXES]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        return [f"mesh sizes {dict(zip(MESH_AXES, sizes))}: each must be positive, at most one may be -1"]
    return []


def mesh_sizes(mesh_cfg, num_devices: int) -> list[int]:
    """The (data, fsdp, expert) sizes of `mesh_cfg` over `num_devices`, a -1 resolved. Raises MeshError."""
    if problems := mesh_size_problems(mesh_cfg):
        raise MeshError(problems[0])
    sizes = [int(mesh_cfg[axis]) for axis in MESH_AXES]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise MeshError(f"{num_devices} devices cannot be split into a mesh with fixed axes of product {known}")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise MeshError(
            f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, but {num_devices} are available"
        )
    return sizes


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
    """A mesh with axes (data, fsdp, expert); one size may be -1 to take the remaining devices."""
    devices = jax.devices() if devices is None else devices
    sizes = mesh_sizes(mesh_cfg, len(devices))
    return jax.sharding.Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_to_spec(logical_axes, shape, mesh: jax.sharding.Mesh, name: str = "") -> PartitionSpec:
    """The PartitionSpec for an array with the given logical axes, checking divisibility."""
    spec = []
    for axis_name, size in zip(logical_axes, shape):
        mesh_axes = LOGICAL_RULES.get(axis_name) if axis_name else None
        if mesh_axes is not None:
            parts = math.prod(mesh.shape[a] for a in rule_axes(mesh_axes))
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


def rule_axes(rule) -> tuple[str, ...]:
    """The mesh axes of a `LOGICAL_RULES` value, as a tuple."""
    return () if rule is None else (rule,) if isinstance(rule, str) else tuple(rule)


def batch_shards(mesh) -> tuple[tuple[str, ...], int]:
    """The mesh axes that the `batch` rule shards tokens over, and their number of shards."""
    axes = tuple(a for a in rule_axes(LOGICAL_RULES["batch"]) if a in mesh.axis_names)
    return axes, math.prod(mesh.shape[a] for a in axes)


def pad_rows(arrays, pad_values, multiple: int):
    """Each [N, ...] array padded with its pad value to a multiple of `multiple` rows."""
    pad = -arrays[0].shape[0] % multiple
    if not pad:
        return arrays
    return tuple(
        jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1), constant_values=v) for a, v in zip(arrays, pad_values)
    )


def on_batch_shards(fn, rows, pad_values, whole=(), *, summed: bool = False, mesh=None):
    """fn(*rows, *whole) on each batch shard of the mesh separately (inside `jax.shard_map`).

    `rows` are [N, ...] arrays split by rows over the mesh's batch axes, padded with `pad_values` to
    a multiple of the shards; `whole` arrays are whole on every device (gathered where sharded).
    Returns fn's outputs (a pytree) [N, ...] with the padded rows cut off, or with `summed` their
    sums over the shards (fn must then give padded rows no weight). For row-wise work that XLA's
    partitioner would otherwise run on all rows on every device: sorting token copies by expert
    (one global permutation), `jax.lax.top_k` (not partitioned along its rows), and sums over
    token chunks that would reduce over the devices once per chunk.

    mesh: a `Mesh`, or None for the context mesh (`jax.set_mesh`). Without one, or when it does not
    shard the batch, this is fn(*rows, *whole).
    """
    context = mesh is None
    mesh = jax.sharding.get_abstract_mesh() if context else mesh
    axes, shards = ((), 1) if mesh.empty else batch_shards(mesh)
    if shards == 1:
        return fn(*rows, *whole)

    def local(*args):
        out = fn(*args)
        return jax.lax.psum(out, axes) if summed else out

    n = rows[0].shape[0]
    tokens = PartitionSpec(axes)
    out = jax.shard_map(
        local,
        mesh=None if context else mesh,
        in_specs=(tokens,) * len(rows) + (PartitionSpec(),) * len(whole),
        out_specs=PartitionSpec() if summed else tokens,
        check_vma=False,
    )(*pad_rows(rows, pad_values, shards), *whole)
    return out if summed else jax.tree.map(lambda a: a[:n], out)


def embed_group_axes(mesh) -> tuple[str, ...]:
    """The mesh axes of the `embed` rule that shard parameters over more than one device, when they
    also split the batch: the devices of such a group hold different columns of every parameter
    and different tokens (`embedding_lookup`, `losses.vocab_sharded_token_sums`). () otherwise, or
    for an empty mesh."""
    if mesh.empty:
        return ()
    batch_axes, _ = batch_shards(mesh)
    axes = tuple(a for a in rule_axes(LOGICAL_RULES["embed"]) if a in mesh.axis_names and mesh.shape[a] > 1)
    return axes if set(axes) <= set(batch_axes) else ()


def embedding_lookup(table: jax.Array, ids: jax.Array, dtype, *, mesh=None) -> jax.Array:
    """table[ids] in `dtype`: table [V, D] with D sharded over the `embed` rule's axes (a group of G
    devices), ids [B, ...] over the batch axes -> [B, ..., D] over the batch axes.

    For such a lookup XLA's partitioner gathers the table whole onto every device, and the gradient
    is a whole [V, D] scatter before it is reduced: two [V, D] arrays per device (1.16 GiB each at
    Qwen3-Next's vocabulary in float32). Here each device looks up its own D / G columns for the ids
    of its whole group (gathered: they are small), and an all-to-all over the group gives every
    device the full rows of its own ids; the gradient is a scatter into each device's own columns.

    mesh: a `Mesh`, or None for the context mesh. Without one, or when the table's columns are not
    split among devices that also split the batch, this is `jnp.take`.
    """
    context = mesh is None
    mesh = jax.sharding.get_abstract_mesh() if context else mesh
    axes = embed_group_axes(mesh)
    if not axes or table.shape[1] % math.prod(mesh.shape[a] for a in axes):
        return jnp.take(table, ids, axis=0).astype(dtype)
    batch_axes, shards = batch_shards(mesh)

    def local(ids, table):  # ids [b, ...] this device's; table [V, D / G] its columns
        group_ids = jax.lax.all_gather(ids, axes, axis=0, tiled=True)  # [G b, ...], in group order
        columns = jnp.take(table, group_ids, axis=0).astype(dtype)  # [G b, ..., D / G]
        return jax.lax.all_to_all(columns, axes, 0, columns.ndim - 1, tiled=True)  # [b, ..., D]

    n = ids.shape[0]
    (ids,) = pad_rows((ids,), (0,), shards)
    out = jax.shard_map(
        local,
        mesh=None if context else mesh,
        in_specs=(PartitionSpec(batch_axes), PartitionSpec(None, axes)),
        out_specs=PartitionSpec(batch_axes),
    )(ids, table)
    return out[:n]
