"""The Qwen3-Next sparse MoE block as small pure functions: route -> expert FFN -> combine.

Shape letters: N tokens (B*T flattened), D model width, E experts, K experts per token, F expert
width, P devices on the mesh's expert axis, L = E / P experts per device, C capacity (token copies
one device may send to another). Expert weights are stacked: gate/up [E, D, F], down [E, F, D].

Backends (`cfg.moe_backend`, resolved once per platform by `resolve_backend` when `Experts` is
built): `dense` (every expert on every token: the reference) and three dropless grouped matmuls
over the N*K token copies sorted by expert, which do only the routed work where they are native:
`grouped` (block-sparse in plain jnp: the CPU), `gmm` (megablox's Pallas kernel: TPU) and `ragged`
(`jax.lax.ragged_dot`: GPU); `auto` picks the platform's one. `expert_parallel` shards the experts
over the mesh's expert axis and runs the platform's grouped matmul on each device's experts (see
`expert_parallel_experts`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental.pallas.ops.tpu.megablox import ops as megablox
from jax.sharding import PartitionSpec

from slimqwen_jax.config import Qwen3NextConfig
from slimqwen_jax.platforms import target_platform
from slimqwen_jax.layers import MLP, Calibration, Linear, capturing, normal_param
from slimqwen_jax.sharding import LOGICAL_RULES, batch_shards, on_batch_shards, pad_rows, rule_axes


def route(router_logits: jax.Array, top_k: int, normalize: bool) -> tuple[jax.Array, jax.Array]:
    """Softmax over all experts in float32, top-k, optional renormalisation.

    router_logits [N, E] -> (weights [N, K] float32, experts [N, K] int32). Ties go to the lower index.
    """
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)  # [N, E]
    weights, experts = batch_local_top_k(probs, top_k)  # [N, K]
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts


def batch_local_top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """`jax.lax.top_k` of x [N, E] on each batch shard of the context mesh: (values, indices) [N, k]."""
    return on_batch_shards(lambda rows: jax.lax.top_k(rows, k), (x,), (0,))


def swiglu_experts_dense(x, weights, experts, gate_proj, up_proj, down_proj):
    """Reference backend: every expert on every token, combined with a [N, E] weight matrix."""
    num_experts = gate_proj.shape[0]
    combine = jnp.sum(jax.nn.one_hot(experts, num_experts, dtype=weights.dtype) * weights[..., None], axis=1)  # [N, E]
    hidden = jax.nn.silu(jnp.einsum("nd,edf->nef", x, gate_proj)) * jnp.einsum("nd,edf->nef", x, up_proj)
    out = jnp.einsum("nef,efd->ned", hidden, down_proj)  # [N, E, D]
    return jnp.einsum("ne,ned->nd", combine.astype(out.dtype), out)


@jax.custom_vjp
def gather_rows(x: jax.Array, rows: jax.Array, readers: jax.Array) -> jax.Array:
    """x[rows] with a zero row wherever rows[r] >= M; its gradient is a gather too.

    x [M, D], rows [R], readers [M, J]: every r with rows[r] == m listed in readers[m] (>= R: none).
    Autodiff would transpose the gather into a scatter-add, which XLA runs serially on the CPU; with
    the inverse map the transpose is a gather and a sum over J.
    """
    return jnp.take(x, rows, axis=0, mode="fill", fill_value=0)


def _gather_rows_fwd(x, rows, readers):
    return gather_rows(x, rows, readers), readers


def _gather_rows_bwd(readers, cotangent):
    return jnp.sum(jnp.take(cotangent, readers, axis=0, mode="fill", fill_value=0), axis=1), None, None


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


def expert_layout(row_experts: jax.Array, num_experts: int, num_rows: int, block: int = 1):
    """Rows sorted by expert (stable), each expert's group padded to a multiple of `block` rows.

    row_experts [M] (values >= E: no expert, left out) -> (source [num_rows]: the input row at each
    layout row, M for padding; dest [M]: the layout row of each input row, num_rows for none;
    group_sizes [E]: padded group sizes). Groups start at row 0 in expert order; `num_rows` must
    bound the total (M for block 1; M + E (block - 1) in general).
    """
    row_experts = jnp.asarray(row_experts)
    m = row_experts.shape[0]
    order = jnp.argsort(row_experts, stable=True)  # [M]
    sizes = jnp.zeros(num_experts, jnp.int32).at[row_experts].add(1, mode="drop")  # [E]
    padded = (sizes + block - 1) // block * block  # [E]
    starts, padded_starts = jnp.cumsum(sizes) - sizes, jnp.cumsum(padded) - padded  # [E]
    sorted_experts = row_experts[order]  # [M]
    expert = jnp.minimum(sorted_experts, num_experts - 1)
    rank = jnp.arange(m, dtype=jnp.int32) - starts[expert]  # place within its group
    dest_sorted = jnp.where(sorted_experts < num_experts, padded_starts[expert] + rank, num_rows)  # [M]
    dest = jnp.zeros(m, jnp.int32).at[order].set(dest_sorted)
    source = jnp.full(num_rows, m, jnp.int32).at[dest_sorted].set(order.astype(jnp.int32), mode="drop")
    return source, dest, padded


def grouped_block_size(rows: int, num_experts: int) -> int:
    """Rows per block of the `grouped` backend: the largest power of two <= rows / (4 E), in [8, 128].

    The static row bound pays E (block - 1) rows of padding, under a quarter of the routed rows with
    this choice; 128-row blocks reach near plain-matmul speed in XLA's CPU batched matmul, smaller
    ones run markedly slower per FLOP (measured by tools/bench_moe.py, docs/performance.md).
    """
    target = max(1, rows // (4 * num_experts))
    return int(min(128, max(8, 1 << (target.bit_length() - 1))))


def _swiglu_blocks(xs, block_experts, gate_proj, up_proj, down_proj):
    """Each block of rows through its own expert: xs [G, b, D], block_experts [G] -> [G, b, D]."""
    gate = jnp.einsum("gbd,gdf->gbf", xs, gate_proj[block_experts])
    up = jnp.einsum("gbd,gdf->gbf", xs, up_proj[block_experts])
    return jnp.einsum("gbf,gfd->gbd", jax.nn.silu(gate) * up, down_proj[block_experts])


def expert_ffn_grouped(rows, row_experts, gate_proj, up_proj, down_proj):
    """Block-sparse grouped SwiGLU in plain jnp (the CPU path): rows [M, D], row_experts [M] -> [M, D].

    Each expert's rows are padded to whole blocks of `grouped_block_size` rows, at most
    G = (M + E (b - 1)) / b blocks; each block is multiplied by its own expert's weights (gathered
    per block), so the work is the routed rows plus at most E (b - 1) padding rows. Rows with an
    expert >= E give 0.
    """
    m, d = rows.shape
    num_experts = gate_proj.shape[0]
    block = grouped_block_size(m, num_experts)
    num_blocks = (m + num_experts * (block - 1)) // block  # G
    source, dest, padded = expert_layout(row_experts, num_experts, num_blocks * block, block)
    block_experts = jnp.repeat(
        jnp.arange(num_experts, dtype=jnp.int32), padded // block, total_repeat_length=num_blocks
    )  # [G]; unused trailing blocks (all zero rows) repeat the last expert
    xs = gather_rows(rows, source, dest[:, None]).reshape(num_blocks, block, d)  # [G, b, D]
    ys = _swiglu_blocks(xs, block_experts, gate_proj, up_proj, down_proj).reshape(num_blocks * block, d)
    return gather_rows(ys, dest, source[:, None])


def _sorted_swiglu(rows, row_experts, num_rows, matmul, gate_proj, up_proj, down_proj):
    """rows sorted by expert into `num_rows` rows, SwiGLU with `matmul(lhs, rhs [E, ., .], group_sizes)`,
    unsorted: [M, D] -> [M, D] (0 for rows with an expert >= E)."""
    source, dest, group_sizes = expert_layout(row_experts, gate_proj.shape[0], num_rows)
    xs = gather_rows(rows, source, dest[:, None])  # [num_rows, D]
    hidden = jax.nn.silu(matmul(xs, gate_proj, group_sizes)) * matmul(xs, up_proj, group_sizes)
    return gather_rows(matmul(hidden, down_proj, group_sizes), dest, source[:, None])


def expert_ffn_ragged(rows, row_experts, gate_proj, up_proj, down_proj):
    """Grouped SwiGLU with `jax.lax.ragged_dot` (native on GPU and TPU; a masked dense product on CPU)."""
    return _sorted_swiglu(rows, row_experts, rows.shape[0], jax.lax.ragged_dot, gate_proj, up_proj, down_proj)


def _gmm_tiling(m: int, k: int, n: int) -> tuple[int, int, int]:
    """megablox tiles (tm, tk, tn): 128 or the whole dimension (TPU blocks need multiples of (8, 128)
    or full dims; m is padded to a multiple of tm by `expert_ffn_gmm`, ragged k and n are masked)."""
    return min(128, m), min(128, k), min(128, n)


def expert_ffn_gmm(rows, row_experts, gate_proj, up_proj, down_proj, *, interpret: bool = False):
    """Grouped SwiGLU with the megablox Pallas grouped matmul that jax ships for TPU (`interpret`:
    Pallas' interpreter, for CPU tests). Rows are padded to a multiple of the 128-row tile (16 when
    fewer: bfloat16's sublane tile); rows after the last group are never read back."""
    m = rows.shape[0]
    num_rows = -(-m // 16) * 16 if m <= 128 else -(-m // 128) * 128

    def matmul(lhs, rhs, group_sizes):
        # ops.gmm is a custom_vjp whose non-differentiable arguments must be positional:
        # (lhs, rhs, group_sizes, preferred_element_type, tiling, group_offset, existing_out, transpose_rhs, interpret)
        return megablox.gmm(lhs, rhs, group_sizes, lhs.dtype, _gmm_tiling, None, None, False, interpret)

    return _sorted_swiglu(rows, row_experts, num_rows, matmul, gate_proj, up_proj, down_proj)


def routed_swiglu_experts(x, weights, experts, gate_proj, up_proj, down_proj, *, ffn):
    """The N*K token copies through `ffn` (an `expert_ffn_*`), combined with the routing weights."""
    n, k = experts.shape
    copies = jnp.repeat(x, k, axis=0)  # [N*K, D]: copy j of token i is row i*K + j
    out = ffn(copies, experts.reshape(-1), gate_proj, up_proj, down_proj).reshape(n, k, -1)  # [N, K, D]
    return jnp.einsum("nkd,nk->nd", out, weights.astype(out.dtype))


def swiglu_experts_ragged(x, weights, experts, gate_proj, up_proj, down_proj):
    """`routed_swiglu_experts` with `jax.lax.ragged_dot` (the `ragged` backend)."""
    return routed_swiglu_experts(x, weights, experts, gate_proj, up_proj, down_proj, ffn=expert_ffn_ragged)


def batch_local_experts(x, weights, experts, gate_proj, up_proj, down_proj, *, ffn, mesh=None):
    """`routed_swiglu_experts` on each batch shard of the mesh (`on_batch_shards`): out [N, D]. Each
    device sorts and multiplies only its own tokens' copies; padded tokens name expert E (none)."""
    routed = functools.partial(routed_swiglu_experts, ffn=ffn)
    pad_values = (0, 0, gate_proj.shape[0])
    return on_batch_shards(routed, (x, weights, experts), pad_values, (gate_proj, up_proj, down_proj), mesh=mesh)


def expert_capacity(local_tokens: int, top_k: int, expert_axis_size: int, capacity_factor: float | None) -> int:
    """Token copies one device may send to each device of the expert axis.

    ceil(capacity_factor * local_tokens * top_k / expert_axis_size), at least 1; a capacity factor of
    None or <= 0 means dropless (local_tokens * top_k: every copy may go to one device).
    """
    copies = local_tokens * top_k
    if not capacity_factor or capacity_factor <= 0:
        return copies
    return max(1, min(copies, math.ceil(capacity_factor * copies / expert_axis_size)))


def expert_parallel_experts(
    x, weights, experts, gate_proj, up_proj, down_proj, *, mesh=None, capacity_factor=None, ffn=None, exchange=None
):
    """Expert-parallel SwiGLU experts: (out [N, D], dropped_fraction scalar float32).

    Experts are sharded over the mesh axis that `LOGICAL_RULES["expert"]` names (P devices, L = E / P
    experts each) and tokens over the `batch` axes. Inside `jax.shard_map` each device writes its
    local token copies into fixed-size buffers [P, C, D], one per destination device (copies of
    first choices before second choices, then in token order; copies beyond C are dropped and
    contribute 0), exchanges them with `all_to_all` over the expert axis, runs the grouped matmul
    `ffn` (an `expert_ffn_*`; None: the platform's, `platform_ffn`) on its L experts, sends the
    results back with the reverse `all_to_all` and combines them with the routing weights.
    `dropped_fraction` is the fraction of all N * K copies dropped (0 when dropless: capacity_factor
    None or <= 0).

    mesh: a `Mesh`, or None for the context mesh (`jax.set_mesh`). Without a mesh, or with an expert
    axis of size 1, this is `batch_local_experts` with `ffn` (nothing dropped). Token counts not
    divisible by the batch shards are padded with copies that go nowhere.

    Dropless with fixed buffers sizes every send buffer for the worst case (C = n K: P times the
    copies that exist, all of them exchanged). With `exchange` (`jax.lax.ragged_all_to_all` or a
    function of its signature; `ragged_exchange_for` picks it on GPU and TPU) a dropless call sends
    only the copies that exist instead (`_ragged_dispatch`). XLA:CPU has no ragged all-to-all (jax
    0.10.2: "HLO opcode `ragged-all-to-all` is not supported by XLA:CPU ThunkEmitter"), so the CPU
    keeps the fixed buffers. A capacity factor always uses the fixed buffers.
    """
    n, k = experts.shape
    d = x.shape[-1]
    num_experts = gate_proj.shape[0]
    context = mesh is None
    mesh = jax.sharding.get_abstract_mesh() if context else mesh
    (expert_axis,) = rule_axes(LOGICAL_RULES["expert"])
    no_dropped = jnp.zeros((), jnp.float32)
    ffn = expert_ffn_for(platform_ffn(), target_platform()) if ffn is None else ffn
    if mesh is None or mesh.empty or expert_axis not in mesh.axis_names or mesh.shape[expert_axis] == 1:
        out = batch_local_experts(
            x, weights, experts, gate_proj, up_proj, down_proj, ffn=ffn, mesh=None if context else mesh
        )
        return out, no_dropped
    p = mesh.shape[expert_axis]
    if num_experts % p:
        raise ValueError(
            f"expert_parallel: num_experts ({num_experts}) is not divisible by the size of the mesh's "
            f"'{expert_axis}' axis ({p})"
        )
    per_device = num_experts // p  # L
    batch_axes, shards = batch_shards(mesh)
    # Padded copies name expert E: they are sent nowhere and not counted as dropped.
    x, weights, experts = pad_rows((x, weights, experts), (0, 0, num_experts), shards)
    local_tokens = x.shape[0] // shards
    capacity = expert_capacity(local_tokens, k, p, capacity_factor)  # C
    dropless = capacity == local_tokens * k

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
        ys = ffn(recv_x, recv_e, gate_proj, up_proj, down_proj)  # [P*C, D]; empty rows give 0
        back = exchange(ys)  # [P*C, D] results of the copies this device sent, in its own buffer layout
        y = back.at[slot].get(mode="fill", fill_value=0)  # [K*n, D]; dropped copies read 0
        y = y.reshape(k, -1, d) * weights.T[..., None].astype(y.dtype)  # [K, n, D]
        dropped = jax.lax.psum(jnp.sum(valid & ~kept, dtype=jnp.int32), mesh.axis_names)
        return jnp.sum(y, axis=0), dropped

    if exchange is not None and dropless:
        local = functools.partial(_ragged_dispatch, expert_axis=expert_axis, devices=p, ffn=ffn, exchange=exchange)
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


def _ragged_dispatch(x, weights, experts, gate_proj, up_proj, down_proj, *, expert_axis, devices, ffn, exchange):
    """One device's dropless expert-parallel step with a ragged all-to-all: (out [n, D], dropped 0).

    x [n, D], weights/experts [n, K] (this device's tokens; expert E marks padding, sent nowhere);
    gate/up [L, D, F], down [L, F, D] (this device's experts). The n K copies, sorted by destination
    device, go out as one slice per device; every device lays the slices it receives one after the
    other, in source order, in a buffer of P n K rows (the worst case: all copies of all devices to
    it), runs `ffn` on them (unwritten rows name expert L: they give 0) and sends each slice back to
    where it came from.
    """
    n, k = experts.shape
    per_device = gate_proj.shape[0]  # L
    copies = experts.reshape(-1)  # [n*K]: copy j of token i is row i*K + j
    # Copies sorted by destination device (expert E's padding copies go nowhere): `source` [n*K] the
    # copy in each send row (n*K: none), `position` [n*K] the send row of each copy (n*K: none).
    source, position, send_sizes = expert_layout(copies // per_device, devices, n * k)
    counts = jax.lax.all_gather(send_sizes, expert_axis)  # [P source, P destination]
    me = jax.lax.axis_index(expert_axis)
    sent_from = jnp.cumsum(counts, axis=1) - counts  # [source, destination]: slice start in the source's buffer
    lands_at = jnp.cumsum(counts, axis=0) - counts  # [source, destination]: slice start in the destination's
    outbound = (sent_from[me], send_sizes, lands_at[me], counts[:, me])  # offsets, sizes, offsets there, recv sizes
    inbound = (lands_at[:, me], counts[:, me], sent_from[:, me], send_sizes)  # the same slices, sent back

    def send(rows, into, slices):  # rows land in `into` (its rows not written keep their value)
        return exchange(rows, into, *slices, axis_name=expert_axis)

    buffer_rows = devices * n * k
    send_x = gather_rows(x, source // k, position.reshape(n, k))  # [n K, D]
    send_e = jnp.take(copies % per_device, source, mode="fill", fill_value=per_device)  # [n K]
    recv_x = send(send_x, jnp.zeros((buffer_rows, x.shape[-1]), x.dtype), outbound)  # [P n K, D]
    recv_e = send(send_e, jnp.full(buffer_rows, per_device, jnp.int32), outbound)  # L: an empty row
    ys = ffn(recv_x, recv_e, gate_proj, up_proj, down_proj)  # [P n K, D]
    back = send(ys, jnp.zeros((n * k, ys.shape[-1]), ys.dtype), inbound)  # [n K, D] in send order
    y = gather_rows(back, position, source[:, None]).reshape(n, k, -1)  # [n, K, D] in copy order; padding 0
    return jnp.einsum("nkd,nk->nd", y, weights.astype(y.dtype)), jnp.zeros((), jnp.int32)


def ragged_exchange_for(platform: str) -> Callable | None:
    """The dropless expert-parallel exchange of `platform`: `jax.lax.ragged_all_to_all` on GPU and
    TPU, None (fixed buffers) on the CPU, which cannot run it."""
    return jax.lax.ragged_all_to_all if platform in ("gpu", "tpu") else None


PLATFORM_FFNS = {"tpu": "gmm", "gpu": "ragged"}  # every other platform (the CPU): "grouped"
EXPERT_FFNS = {"grouped": expert_ffn_grouped, "gmm": expert_ffn_gmm, "ragged": expert_ffn_ragged}
_expert_ffn_gmm_interpreted = functools.partial(expert_ffn_gmm, interpret=True)


def platform_ffn(platform: str | None = None) -> str:
    """The grouped matmul native to `platform` (default `platforms.target_platform()`): `gmm` on TPU,
    `ragged` on GPU, `grouped` elsewhere."""
    return PLATFORM_FFNS.get(platform or target_platform(), "grouped")


def resolve_backend(name: str, platform: str | None = None) -> str:
    """`cfg.moe_backend` with `auto` replaced by `platform_ffn(platform)`; other names unchanged."""
    return platform_ffn(platform) if name == "auto" else name


def expert_ffn_for(name: str, platform: str) -> Callable:
    """The `expert_ffn_*` of a grouped-matmul name on `platform`; `gmm` off TPU runs in Pallas'
    interpreter (slow: for tests)."""
    return _expert_ffn_gmm_interpreted if name == "gmm" and platform != "tpu" else EXPERT_FFNS[name]


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
    num_experts = router_logits[0].shape[-1]
    rows = sum(logits.shape[0] for logits in router_logits)  # HF concatenates the layers: L*N rows
    chosen = jnp.zeros((top_k, num_experts), jnp.float32)  # [K, E] rows whose k-th choice is e
    probs_sum = jnp.zeros((num_experts,), jnp.float32)  # [E]
    for logits in router_logits:  # layer by layer: each layer's rows stay sharded over the batch
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)  # [N, E]
        _, selected = batch_local_top_k(probs, top_k)  # [N, K]
        chosen += jnp.sum(jax.nn.one_hot(selected, num_experts, dtype=jnp.float32), axis=0)
        probs_sum += jnp.sum(probs, axis=0)
    return num_experts * jnp.sum((chosen / rows) * (probs_sum / rows)[None, :])


class Experts(nnx.Module):
    """The routed experts' SwiGLU weights, stacked over experts."""

    def __init__(self, cfg: Qwen3NextConfig, *, rngs):
        e, d, f = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_proj = normal_param(rngs, (e, d, f), ("expert", "embed", "expert_mlp"), cfg)
        self.up_proj = normal_param(rngs, (e, d, f), ("expert", "embed", "expert_mlp"), cfg)
        self.down_proj = normal_param(rngs, (e, f, d), ("expert", "expert_mlp", "embed"), cfg)
        self.dtype = cfg.compute_dtype
        platform = target_platform()
        self.backend = resolve_backend(cfg.moe_backend, platform)  # resolved here, once
        self.ffn = expert_ffn_for(self.backend if self.backend in EXPERT_FFNS else platform_ffn(platform), platform)
        self.exchange = ragged_exchange_for(platform)
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
        if self.backend == "expert_parallel":  # the mesh is the caller's: `jax.set_mesh(mesh)` around the call
            return expert_parallel_experts(
                x, weights, experts, *params, capacity_factor=self.capacity_factor, ffn=self.ffn, exchange=self.exchange
            )
        if self.backend == "dense":
            return swiglu_experts_dense(x, weights, experts, *params), jnp.zeros((), jnp.float32)
        # The mesh, if any, is the caller's context mesh: each batch shard sorts its own copies.
        return batch_local_experts(x, weights, experts, *params, ffn=self.ffn), jnp.zeros((), jnp.float32)

    def copy_outputs(self, x: jax.Array, experts: jax.Array) -> jax.Array:
        """Each token copy's expert output before weighting: x [N, D], experts [N, K] -> [N, K, D].

        The backend runs on the N*K copies with one expert each (weight 1), so every backend gives
        them; calibration sows their norms (REAP importance, `slimqwen_jax.compression`).
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
