"""The Qwen3-Next sparse MoE block as small pure functions: route -> expert FFN -> combine.

Shape letters: N tokens (B*T flattened), D model width, E experts, K experts per token, F expert
width, P devices on the mesh's expert axis, L = E / P experts per device, C capacity (token copies
one device may send to another). Expert weights are stacked: gate/up [E, D, F], down [E, F, D].

Backends (`EXPERT_BACKENDS`, chosen by `cfg.moe_backend`): `dense` (every expert on every token:
the reference), `ragged` (dropless grouped matmuls on one device) and `expert_parallel` (experts
sharded over the mesh's expert axis, tokens dispatched with all-to-all; see
`expert_parallel_experts`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from slimqwen_jax.config import Qwen3NextConfig
from slimqwen_jax.layers import MLP, Calibration, Linear, capturing, normal_param
from slimqwen_jax.sharding import LOGICAL_RULES


def route(router_logits: jax.Array, top_k: int, normalize: bool) -> tuple[jax.Array, jax.Array]:
    """Softmax over all experts in float32, top-k, optional renormalisation.

    router_logits [N, E] -> (weights [N, K] float32, experts [N, K] int32). Ties go to the lower index.
    """
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)  # [N, E]
    weights, experts = jax.lax.top_k(probs, top_k)  # [N, K]
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts


def swiglu_experts_dense(x, weights, experts, gate_proj, up_proj, down_proj):
    """Reference backend: every expert on every token, combined with a [N, E] weight matrix."""
    num_experts = gate_proj.shape[0]
    combine = jnp.sum(jax.nn.one_hot(experts, num_experts, dtype=weights.dtype) * weights[..., None], axis=1)  # [N, E]
    hidden = jax.nn.silu(jnp.einsum("nd,edf->nef", x, gate_proj)) * jnp.einsum("nd,edf->nef", x, up_proj)
    out = jnp.einsum("nef,efd->ned", hidden, down_proj)  # [N, E, D]
    return jnp.einsum("ne,ned->nd", combine.astype(out.dtype), out)


def swiglu_experts_ragged(x, weights, experts, gate_proj, up_proj, down_proj):
    """Dropless backend: sort the N*K token copies by expert and run grouped matmuls (ragged_dot)."""
    n, k = experts.shape
    num_experts = gate_proj.shape[0]
    flat_experts = experts.reshape(-1)  # [N*K]
    order = jnp.argsort(flat_experts, stable=True)  # [N*K]
    token_of_copy = order // k  # [N*K]
    group_sizes = jnp.bincount(flat_experts, length=num_experts).astype(jnp.int32)  # [E]
    xs = x[token_of_copy]  # [N*K, D]
    hidden = jax.nn.silu(jax.lax.ragged_dot(xs, gate_proj, group_sizes)) * jax.lax.ragged_dot(xs, up_proj, group_sizes)
    out = jax.lax.ragged_dot(hidden, down_proj, group_sizes)  # [N*K, D]
    out = out * weights.reshape(-1)[order][:, None].astype(out.dtype)
    return jnp.zeros((n, x.shape[-1]), out.dtype).at[token_of_copy].add(out)


def _mesh_axes(rule) -> tuple[str, ...]:
    return () if rule is None else (rule,) if isinstance(rule, str) else tuple(rule)


def expert_capacity(local_tokens: int, top_k: int, expert_axis_size: int, capacity_factor: float | None) -> int:
    """Token copies one device may send to each device of the expert axis.

    ceil(capacity_factor * local_tokens * top_k / expert_axis_size), at least 1; a capacity factor of
    None or <= 0 means dropless (local_tokens * top_k: every copy may go to one device).
    """
    copies = local_tokens * top_k
    if not capacity_factor or capacity_factor <= 0:
        return copies
    return max(1, min(copies, math.ceil(capacity_factor * copies / expert_axis_size)))


def expert_parallel_experts(x, weights, experts, gate_proj, up_proj, down_proj, *, mesh=None, capacity_factor=None):
    """Expert-parallel SwiGLU experts: (out [N, D], dropped_fraction scalar float32).

    Experts are sharded over the mesh axis that `LOGICAL_RULES["expert"]` names (P devices, L = E / P
    experts each) and tokens over the `batch` axes. Inside `jax.shard_map` each device writes its
    local token copies into fixed-size buffers [P, C, D], one per destination device (copies of
    first choices before second choices, then in token order; copies beyond C are dropped and
    contribute 0), exchanges them with `all_to_all` over the expert axis, runs grouped matmuls
    (`ragged_dot`) on its L experts, sends the results back with the reverse `all_to_all` and combines
    them with the routing weights. `dropped_fraction` is the fraction of all N * K copies dropped
    (0 when dropless: capacity_factor None or <= 0).

    mesh: a `Mesh`, or None for the context mesh (`jax.set_mesh`). Without a mesh, or with an expert
    axis of size 1, this is `swiglu_experts_ragged` (nothing dropped). Token counts not divisible by
    the batch shards are padded with copies that go nowhere.
    """
    n, k = experts.shape
    d = x.shape[-1]
    num_experts = gate_proj.shape[0]
    context = mesh is None
    mesh = jax.sharding.get_abstract_mesh() if context else mesh
    (expert_axis,) = _mesh_axes(LOGICAL_RULES["expert"])
    no_dropped = jnp.zeros((), jnp.float32)
    if mesh is None or mesh.empty or expert_axis not in mesh.axis_names or mesh.shape[expert_axis] == 1:
        return swiglu_experts_ragged(x, weights, experts, gate_proj, up_proj, down_proj), no_dropped
    p = mesh.shape[expert_axis]
    if num_experts % p:
        raise ValueError(
            f"expert_parallel: num_experts ({num_experts}) is not divisible by the size of the mesh's "
            f"'{expert_axis}' axis ({p})"
        )
    per_device = num_experts // p  # L
    batch_axes = tuple(a for a in _mesh_axes(LOGICAL_RULES["batch"]) if a in mesh.axis_names)
    shards = math.prod(mesh.shape[a] for a in batch_axes)
    pad = -n % shards
    if pad:  # padded copies name expert E: they are sent nowhere and not counted as dropped
        x = jnp.pad(x, ((0, pad), (0, 0)))
        weights = jnp.pad(weights, ((0, pad), (0, 0)))
        experts = jnp.pad(experts, ((0, pad), (0, 0)), constant_values=num_experts)
    local_tokens = (n + pad) // shards
    capacity = expert_capacity(local_tokens, k, p, capacity_factor)  # C

    def local(x, weights, experts, gate_proj, up_proj, down_proj):
        # x [n, D], weights/experts [n, K] (this device's tokens); gate/up [L, D, F], down [L, F, D].
        copies = experts.T.reshape(-1)  # [K*n], slot-major: first choices get capacity first
        dest = copies // per_device  # [K*n] device owning the expert; P for padding copies
        one_hot = jax.nn.one_hot(dest, p, dtype=jnp.int32)  # [K*n, P]
        rank = jnp.sum((jnp.cumsum(one_hot, axis=0) - 1) * one_hot, axis=1)  # [K*n] place in its buffer
        valid = dest < p
        kept = valid & (rank < capacity)
        slot = jnp.where(kept, dest * capacity + rank, p * capacity)  # [K*n]; out of range: not sent
        send_x = jnp.zeros((p * capacity, d), x.dtype).at[slot].set(jnp.tile(x, (k, 1)), mode="drop")
        send_e = jnp.full((p * capacity,), per_device, jnp.int32).at[slot].set(copies % per_device, mode="drop")
        # [P, C, ...] per destination -> [P, C, ...] per source.
        exchange = lambda a: jax.lax.all_to_all(a, expert_axis, 0, 0, tiled=True)
        recv_x, recv_e = exchange(send_x), exchange(send_e)  # [P*C, D], [P*C] (L marks an empty row)
        order = jnp.argsort(recv_e, stable=True)  # empty rows sort last and are left out of the groups
        group_sizes = jnp.bincount(recv_e, length=per_device).astype(jnp.int32)  # [L]
        xs = recv_x[order]
        hidden = jax.nn.silu(jax.lax.ragged_dot(xs, gate_proj, group_sizes)) * jax.lax.ragged_dot(
            xs, up_proj, group_sizes
        )
        ys = jnp.zeros_like(recv_x).at[order].set(jax.lax.ragged_dot(hidden, down_proj, group_sizes))  # [P*C, D]
        back = exchange(ys)  # [P*C, D] results of the copies this device sent, in its own buffer layout
        y = back.at[slot].get(mode="fill", fill_value=0)  # [K*n, D]; dropped copies read 0
        y = y.reshape(k, -1, d) * weights.T[..., None].astype(y.dtype)  # [K, n, D]
        dropped = jax.lax.psum(jnp.sum(valid & ~kept, dtype=jnp.int32), mesh.axis_names)
        return jnp.sum(y, axis=0), dropped

    tokens = PartitionSpec(batch_axes or None)
    stacked = PartitionSpec(expert_axis)
    out, dropped = jax.shard_map(
        local,
        mesh=None if context else mesh,
        in_specs=(tokens, tokens, tokens, stacked, stacked, stacked),
        out_specs=(tokens, PartitionSpec()),
        check_vma=False,
    )(x, weights, experts, gate_proj, up_proj, down_proj)
    return out[:n], dropped.astype(jnp.float32) / (n * k)


def swiglu_experts_expert_parallel(
    x, weights, experts, gate_proj, up_proj, down_proj, *, mesh=None, capacity_factor=None
):
    """`expert_parallel_experts` without the dropped fraction (the `EXPERT_BACKENDS` signature)."""
    return expert_parallel_experts(
        x, weights, experts, gate_proj, up_proj, down_proj, mesh=mesh, capacity_factor=capacity_factor
    )[0]


EXPERT_BACKENDS = {
    "dense": swiglu_experts_dense,
    "ragged": swiglu_experts_ragged,
    "expert_parallel": swiglu_experts_expert_parallel,
}


def routing_metrics(
    router_logits: jax.Array, experts: jax.Array, dropped_fraction: jax.Array | float = 0.0
) -> dict[str, jax.Array]:
    """One MoE layer's routing metrics from its router logits [N, E] and chosen experts [N, K].

    expert_load [E]: fraction of the N * K token copies routed to each expert (sums to 1);
    max_load: its maximum times E (1 = perfectly balanced); layer_aux_loss: this layer's term of
    `load_balancing_loss` (K at perfect balance); dropped_fraction: copies dropped by the
    expert-parallel capacity (0 for dropless backends).
    """
    num_experts = router_logits.shape[-1]
    load = jnp.bincount(experts.reshape(-1), length=num_experts).astype(jnp.float32) / experts.size  # [E]
    mean_probs = jnp.mean(jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1), axis=0)  # [E]
    return {
        "expert_load": load,
        "max_load": jnp.max(load) * num_experts,
        "layer_aux_loss": num_experts * experts.shape[-1] * jnp.sum(load * mean_probs),
        "dropped_fraction": jnp.asarray(dropped_fraction, jnp.float32),
    }


def stack_routing_metrics(intermediates: nnx.State) -> dict[str, jax.Array]:
    """The `routing_metrics` sown under `nnx.capture`, stacked over MoE layers (decoder layers in order,
    then the MTP layers): expert_load [L_moe, E]; max_load, layer_aux_loss, dropped_fraction [L_moe]."""
    per_layer = []

    def visit(node):
        if isinstance(node, dict) and "routing_metrics" in node:
            sown = node["routing_metrics"]  # one entry per call
            per_layer.extend(sown.values() if isinstance(sown, dict) else sown)
        elif isinstance(node, dict):
            for key in sorted(node, key=lambda k: (isinstance(k, str), k)):  # layer indices numerically
                visit(node[key])

    visit(nnx.to_pure_dict(intermediates))
    if not per_layer:
        return {}
    return {name: jnp.stack([m[name] for m in per_layer]) for name in per_layer[0]}


def load_balancing_loss(router_logits: Sequence[jax.Array], top_k: int) -> jax.Array:
    """HF's `load_balancing_loss_func` over all MoE layers: E * sum_{k,e} f[k, e] * P[e].

    f[k, e] is the fraction of tokens whose k-th choice is e, P[e] the mean router probability; not
    divided by K, so perfectly uniform routing gives K.
    """
    logits = jnp.concatenate([r.astype(jnp.float32) for r in router_logits], axis=0)  # [L*N, E]
    num_experts = logits.shape[-1]
    probs = jax.nn.softmax(logits, axis=-1)
    _, selected = jax.lax.top_k(probs, top_k)  # [L*N, K]
    tokens_per_expert = jnp.mean(jax.nn.one_hot(selected, num_experts, dtype=jnp.float32), axis=0)  # [K, E]
    prob_per_expert = jnp.mean(probs, axis=0)  # [E]
    return num_experts * jnp.sum(tokens_per_expert * prob_per_expert[None, :])


class Experts(nnx.Module):
    """The routed experts' SwiGLU weights, stacked over experts."""

    def __init__(self, cfg: Qwen3NextConfig, *, rngs):
        e, d, f = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_proj = normal_param(rngs, (e, d, f), ("expert", "embed", "expert_mlp"), cfg)
        self.up_proj = normal_param(rngs, (e, d, f), ("expert", "embed", "expert_mlp"), cfg)
        self.down_proj = normal_param(rngs, (e, f, d), ("expert", "expert_mlp", "embed"), cfg)
        self.dtype = cfg.compute_dtype
        self.backend = EXPERT_BACKENDS[cfg.moe_backend]
        self.expert_parallel = cfg.moe_backend == "expert_parallel"
        self.capacity_factor = cfg.moe_capacity_factor

    def __call__(self, x: jax.Array, weights: jax.Array, experts: jax.Array) -> jax.Array:
        return self.with_dropped_fraction(x, weights, experts)[0]

    def with_dropped_fraction(
        self, x: jax.Array, weights: jax.Array, experts: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """(out [N, D], fraction of token copies dropped by the expert-parallel capacity)."""
        cast = lambda p: p[...].astype(self.dtype)
        # HF rounds the routing weights to the compute dtype before combining.
        weights = weights.astype(self.dtype)
        params = (cast(self.gate_proj), cast(self.up_proj), cast(self.down_proj))
        if self.expert_parallel:  # the mesh is the caller's: `jax.set_mesh(mesh)` around the call
            return expert_parallel_experts(x, weights, experts, *params, capacity_factor=self.capacity_factor)
        return self.backend(x, weights, experts, *params), jnp.zeros((), jnp.float32)

    def copy_outputs(self, x: jax.Array, experts: jax.Array) -> jax.Array:
        """Each token copy's expert output before weighting: x [N, D], experts [N, K] -> [N, K, D].

        The backend runs on the N*K copies with one expert each (weight 1), so every backend gives
        them; calibration sows their norms (REAP importance, `slimqwen_jax.pruning`).
        """
        n, k = experts.shape
        copies = jnp.repeat(x, k, axis=0)  # [N*K, D]: copy j of token i is row i*K + j
        return self(copies, jnp.ones((n * k, 1), jnp.float32), experts.reshape(n * k, 1)).reshape(n, k, -1)


class SparseMoeBlock(nnx.Module):
    """Routed experts plus a sigmoid-gated shared expert. Returns (out [B,T,D], router_logits [N,E]).

    Under `nnx.capture(..., nnx.Intermediate)` each call also sows `routing_metrics(...)` (expert
    load, max load, the layer's aux loss, dropped fraction) as the intermediate `routing_metrics` of this block, e.g.
    `_, inter = nnx.capture(model, nnx.Intermediate)(ids, pos)`, then
    `inter["model"]["layers"][i]["mlp"]["routing_metrics"][0]`; outside `nnx.capture` nothing is
    stored or computed. Under `nnx.capture(..., Calibration)` it sows `routing` instead (router
    logits, top-k weights and experts, each token copy's expert output norm) for pruning statistics.
    """

    def __init__(self, cfg: Qwen3NextConfig, *, rngs):
        self.gate = Linear(cfg.hidden_size, cfg.num_experts, ("embed", "expert"), cfg, rngs=rngs)
        self.experts = Experts(cfg, rngs=rngs)
        self.shared_expert = MLP(cfg.shared_expert_intermediate_size, cfg, rngs=rngs)
        self.shared_expert_gate = Linear(cfg.hidden_size, 1, ("embed", None), cfg, rngs=rngs)
        self.top_k, self.norm_topk_prob = cfg.num_experts_per_tok, cfg.norm_topk_prob

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        b, t, d = x.shape
        tokens = x.reshape(b * t, d)  # [N, D]
        router_logits = self.gate(tokens)  # [N, E]
        weights, experts = route(router_logits, self.top_k, self.norm_topk_prob)
        routed, dropped_fraction = self.experts.with_dropped_fraction(tokens, weights, experts)  # [N, D]
        if capturing(self, nnx.Intermediate):  # only then: sow would otherwise store an attribute
            self.sow(nnx.Intermediate, "routing_metrics", routing_metrics(router_logits, experts, dropped_fraction))
        if capturing(self, Calibration):  # pruning statistics only: a second expert pass over the copies
            copy_norms = jnp.linalg.norm(self.experts.copy_outputs(tokens, experts).astype(jnp.float32), axis=-1)
            routing = {"logits": router_logits, "weights": weights, "experts": experts, "copy_norms": copy_norms}
            self.sow(Calibration, "routing", routing)  # [N, E], then [N, K] each
        shared = jax.nn.sigmoid(self.shared_expert_gate(tokens)) * self.shared_expert(tokens)
        return (routed + shared).reshape(b, t, d), router_logits
