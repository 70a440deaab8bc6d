"""The train step's layout of parameter-shaped trees: the scanned decoder layers stacked.

With `scan_layers`, the model scans its repeating block of layers, but its parameters stay one tree
per layer (`model.layers.{i}`, as HF import / export, checkpoints and pruning read them). A train
step on that tree still has one optimizer update, one norm term and one gradient slice per layer
and leaf: in a 48-layer model about 5,000 small kernels, most of the step's compile time. Inside a
training stage the parameters and the Adam moments are therefore held stacked: layer
j * period + r (j < num_blocks) is index j of block position r's [num_blocks, ...] leaves, the
layers after the last whole block stay as they are. The loss function unstacks the parameters
before merging the model, whose scan stacks them again; XLA folds those slices and that stack
away, in the forward and in the backward. Checkpoints, pruning and evaluation outside a stage see
the per-layer tree.

A `Layout` converts any tree whose `nnx.State` nodes are parameter-shaped (the parameters, their
shardings, an optax state holding moments) between the two forms.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from slimqwen_jax.model import block_plan

LAYERS = ("model", "layers")  # the path of the decoder layers in the model's state


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StackedState:
    """A parameter-shaped state with its scanned layers stacked (see `Layout`)."""

    rest: nnx.State  # every variable outside the stacked layers, at its own path
    blocks: tuple[nnx.State, ...]  # per block position r: layer r's variables, each [num_blocks, ...]
    period: int = dataclasses.field(metadata=dict(static=True))
    num_blocks: int = dataclasses.field(metadata=dict(static=True))

    def unstacked(self) -> nnx.State:
        """The per-layer state: layer j * period + r from index j of block position r."""
        flat = list(nnx.to_flat_state(self.rest))
        for r, block in enumerate(self.blocks):
            for sub, v in nnx.to_flat_state(block):
                slices = unstack_array(v.get_value())
                flat += [((*LAYERS, j * self.period + r, *sub), v.replace(x)) for j, x in enumerate(slices)]
        return nnx.from_flat_state(flat)


@jax.custom_vjp
def unstack_array(x: jax.Array) -> tuple[jax.Array, ...]:
    """x [N, ...] -> (x[0], ..., x[N-1]), whose cotangent is the stack of theirs. (Autodiff would
    sum N zero-padded copies, which XLA does not fold into one array as it folds a stack of slices.)"""
    return tuple(x[j] for j in range(x.shape[0]))


def _unstack_array_fwd(x):
    return unstack_array(x), None


def _unstack_array_bwd(_, cotangents):
    return (jnp.stack(cotangents),)


unstack_array.defvjp(_unstack_array_fwd, _unstack_array_bwd)


def unstack(tree):
    """Every `StackedState` in `tree` -> the per-layer `nnx.State` it holds; anything else as it is."""
    return _map_states(StackedState.unstacked, tree, StackedState)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Layer j * period + r of `model.layers`, for j < num_blocks, held at index j of block position
    r's stacked leaves; `num_blocks` 0: every tree as the model holds it (no conversion)."""

    period: int = 0
    num_blocks: int = 0

    def stack(self, tree):
        """Every parameter-shaped `nnx.State` in `tree` -> its `StackedState`."""
        return _map_states(lambda state: self._stack(state, _stack_values), tree, nnx.State)

    def stack_shardings(self, tree):
        """Shardings of `stack(x)` from a tree of x's (NamedSharding values): a leading replicated
        block axis on each stacked leaf."""
        return _map_states(lambda state: self._stack(state, _stack_shardings), tree, nnx.State)

    def stack_placed(self, tree, shardings):
        """`stack(tree)` placed by `stack_shardings(shardings)`, in one jitted call; `tree` itself
        when nothing is stacked."""
        if not self.num_blocks:
            return tree
        return jax.jit(self.stack, out_shardings=self.stack_shardings(shardings))(tree)

    def _stack(self, state: nnx.State, combine: Callable[[Sequence], object]):
        if not self.num_blocks:
            return state
        flat = nnx.to_flat_state(state)
        scanned = self.period * self.num_blocks
        rest = [(path, v) for path, v in flat if not (path[:2] == LAYERS and path[2] < scanned)]
        by_layer = [[(path[3:], v) for path, v in flat if path[:3] == (*LAYERS, i)] for i in range(scanned)]
        blocks = []
        for r in range(self.period):
            members = by_layer[r :: self.period]  # layers r, r + period, ...: the same structure
            stacked = [(sub, v.replace(combine([m[k][1].get_value() for m in members])))
                       for k, (sub, v) in enumerate(members[0])]  # fmt: skip
            blocks.append(nnx.from_flat_state(stacked))
        return StackedState(nnx.from_flat_state(rest), tuple(blocks), self.period, self.num_blocks)


def _stack_values(values: Sequence[jax.Array]) -> jax.Array:
    return jnp.stack(values)  # [num_blocks, ...]


def _stack_shardings(shardings: Sequence[NamedSharding]) -> NamedSharding:
    return NamedSharding(shardings[0].mesh, PartitionSpec(None, *shardings[0].spec))


def _map_states(fn, tree, node_type: type):
    return jax.tree.map(lambda x: fn(x) if isinstance(x, node_type) else x, tree,
                        is_leaf=lambda x: isinstance(x, node_type))  # fmt: skip


def layout_for(params: nnx.State, scan_layers: bool) -> Layout:
    """The layout that matches the model's scan (`model.decoder_stack`): the layers' repeat period
    from their parameter structure, shapes and dtypes; no stacking without `scan_layers` or with
    fewer than two whole blocks (the model then runs its layers unrolled)."""
    if not scan_layers:
        return Layout()
    layers = params[LAYERS[0]][LAYERS[1]]
    signatures = [
        (jax.tree.structure(layers[i]), tuple((x.shape, x.dtype) for x in jax.tree.leaves(layers[i])))
        for i in sorted(layers.keys())
    ]
    return Layout(*block_plan(signatures))


def per_layer_ndims(tree):
    """The number of dimensions of each leaf of `tree` per layer (a stacked leaf has one more)."""

    def ndims(x):
        if isinstance(x, StackedState):
            blocks = tuple(jax.tree.map(lambda a: a.ndim - 1, block) for block in x.blocks)
            return StackedState(per_layer_ndims(x.rest), blocks, x.period, x.num_blocks)
        return x.ndim

    return jax.tree.map(ndims, tree, is_leaf=lambda x: isinstance(x, StackedState))
