"""Pallas kernels of the gated delta rule: chunked (WY) forward, its backward, one-token decode step.

The forward walks the chunks of each (batch, value head) in order, carrying the [Dk, Dv] state in
float32; the backward walks them in reverse, carrying dState. One per-chunk step function holds the
math of each (`chunk_math.forward_chunk`, `backward_chunk`; the formulas are in chunk_math.py); two
layouts drive it (`KernelOptions.layout`):
  "grid" (TPU, and the interpreter on CPU): grid (B, Hv, N), chunk axis "arbitrary"; each step
    gets one chunk's [C, D] blocks and carries the state in a [Dk, Dv] float32 VMEM scratch, set
    from the initial state at chunk 0 and written out at the last (the backward's index maps take
    chunk N - 1 - i at step i). On-chip memory does not grow with T.
  "loop" (GPU, Triton): grid (B, Hv), whole-sequence [Tp, D] blocks (global memory on GPU),
    chunks walked with `lax.fori_loop` inside the program. GPU grid programs run in parallel, so
    the state cannot be carried along a grid axis there.
Value head h reads key head h // (Hv / Hk) straight from the un-repeated q / k through the
BlockSpec index map.
The optional q / k L2 norm and the scale are fused (forward and backward). All arithmetic is
float32; bfloat16 inputs are upcast when loaded and the output is written in v's dtype.

Backends: Mosaic TPU, and Triton on GPU (`pltriton.CompilerParams`). Mosaic GPU, the default
for "cuda" in jax 0.10.2, was tried and rejected: lowering this kernel to it fails (the whole-T
blocks are staged in shared memory, 388 KiB > 227 KiB at T = 256, and at T = 64 "No support for
axes yet" on the masked reductions), and its `pallas_call` path is deprecated in favour of
`plgpu.kernel`, which would need a separate warpgroup-level kernel. Triton lowers this kernel
unchanged (checked by cross-lowering to "cuda"), though it is deprecated from JAX 0.11 on.
Every ref is sliced, never a value (Triton cannot slice values), and every array is 2-D with
power-of-two sizes when Dk, Dv and C are powers of two.

Arrays the kernels see: q, k [B, Tp, Hk * Dk] and v / o [B, Tp, Hv * Dv] (free reshapes, so a
block is [C or Tp, Dk] with Dk = 128 lane-aligned on TPU), gates [B, Hv, N, C] ("loop") or
[B, Hv, N, 1, C] ("grid": a [1, C] block spans the last two dims, which TPU requires for C < 128),
states [B, Hv, Dk, Dv], chunk states [B, Hv, N, Dk, Dv]. Tp = N * C.

TPU VMEM per "grid" step (C = 64, Dk = Dv = 128, bfloat16 q / k / v / o, estimated from the block
sizes, every block double-buffered, plus the 64 KiB scratch): forward ~0.6 MiB (q, k, v, o 16 KiB
each, gates 4 KiB each as one padded (8, 128) tile, initial / final / chunk state 64 KiB each),
backward ~0.8 MiB (q, k, v, dO 16 KiB, float32 dq, dk, dv 32 KiB, chunk state, dState in / out
64 KiB), plus the step's float32 temporaries ([C, C] 16 KiB, [C, D] 32 KiB, [D, D] 64 KiB each;
about 1 MiB): a few MiB at any T, under the 16 MiB default scoped limit. The "loop" layout on TPU
would need ~8 MiB (forward) / ~28 MiB (backward) at T = 4096. Checked by interpret-mode tests
(also under `pltpu.InterpretParams`), by lowering to TPU at T = 1000 and 8192, and by compiling for
v5e / v5p / v6e at T = 4096 (tools/compile_kernels_tpu.py, docs/kernels_tpu.md: the compiler
allocates 0.9-1.0 MiB of scoped VMEM to the forward, 2.1-2.5 MiB to the backward), not on hardware.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.gated_delta_rule import chunk_math

PLATFORMS = ("cpu", "tpu", "gpu")
LAYOUTS = ("grid", "loop")


@dataclasses.dataclass(frozen=True)
class KernelOptions:
    """How the kernels run.

    chunk_size: positions per chunk, a power of two (>= 16 on GPU, where Triton dots need it).
    platform: "tpu" (Mosaic) or "gpu" (Triton) compiles for that backend, "cpu" runs the Pallas
      interpreter; None means the default backend.
    layout: "grid" (grid (B, Hv, N), one chunk per step, the state carried in a VMEM scratch: on-chip
      memory independent of T; TPU and the interpreter) or "loop" (grid (B, Hv), whole-sequence
      blocks, chunks walked inside the kernel: needed on GPU, whose grid programs run in parallel);
      None means "loop" on GPU, else "grid".
    """

    chunk_size: int = 64
    platform: str | None = None
    layout: str | None = None

    def __post_init__(self):
        c = self.chunk_size
        if c < 2 or c & (c - 1):
            raise ValueError(f"chunk_size must be a power of two >= 2, got {c}")
        if self.platform is not None and self.platform not in PLATFORMS:
            raise ValueError(f"platform must be one of {PLATFORMS} or None, got {self.platform!r}")
        if self.layout is not None and self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS} or None, got {self.layout!r}")

    def resolved(self) -> tuple[str, str]:
        """(platform, layout), defaults filled in."""
        platform = self.platform or jax.default_backend()
        layout = self.layout or ("loop" if platform == "gpu" else "grid")
        if platform == "gpu" and layout == "grid":
            raise ValueError("layout 'grid' needs sequential grid steps (TPU or the interpreter), not GPU")
        return platform, layout

    def head_dim_multiple(self) -> int:
        """What q / k / v head dims must be a multiple of: the 128 lanes on TPU, where Mosaic needs
        the last dim of a [C, D] block to be a multiple of 128 (or the whole array's); else 1."""
        return 128 if self.resolved()[0] == "tpu" else 1

    def call_settings(self, grid: tuple[int, ...]) -> dict:
        """`pallas_call` arguments for this platform: (batch, head) axes parallel, a chunk axis sequential."""
        platform, _ = self.resolved()
        if platform == "cpu":
            return {"grid": grid, "interpret": True}
        if platform == "tpu":
            semantics = ("parallel", "parallel", "arbitrary")[: len(grid)]
            return {"grid": grid, "compiler_params": pltpu.CompilerParams(dimension_semantics=semantics)}
        return {"grid": grid, "compiler_params": pltriton.CompilerParams(num_warps=4, num_stages=1)}


# ---------------------------------------------------------------- kernels
# "loop": grid (B, Hv), whole-sequence blocks, chunks walked by lax.fori_loop.
# "grid": grid (B, Hv, N), one chunk's blocks per step, the carried state in a VMEM scratch.


def _carry_in_loop(step, num_chunks: int, initial_ref, final_ref, *, reverse: bool = False):
    """ "loop": carry [K, V] from initial_ref through step(i, carry) over chunks 0..N-1 (N-1..0 if
    `reverse`) with `lax.fori_loop`; the last carry goes to final_ref."""
    chunk = (lambda j: num_chunks - 1 - j) if reverse else (lambda j: j)
    initial = initial_ref[...].astype(jnp.float32)
    final_ref[...] = lax.fori_loop(0, num_chunks, lambda j, carry: step(chunk(j), carry), initial)


def _carry_along_grid(step, initial_ref, final_ref, carry_ref):
    """ "grid": one step(0, carry) per step of the sequential grid axis 2 (the index maps choose the
    chunk order); carry_ref (the scratch) is set from initial_ref at the first step and copied to
    final_ref after the last."""

    @pl.when(pl.program_id(2) == 0)
    def _init():
        carry_ref[...] = initial_ref[...].astype(jnp.float32)

    carry_ref[...] = step(0, carry_ref[...])

    @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
    def _final():
        final_ref[...] = carry_ref[...]


def _forward_step(q_ref, k_ref, v_ref, g_ref, beta_ref, o_ref, states_ref, settings):
    states = states_ref[0] if states_ref else None
    return functools.partial(chunk_math.forward_chunk, q_ref, k_ref, v_ref, g_ref, beta_ref, o_ref, states, **settings)


def _forward_loop_kernel(q_ref, k_ref, v_ref, g_ref, beta_ref, h0_ref, o_ref, ht_ref, *states_ref, **settings):
    """One (batch, value head): o [Tp, V], final state [K, V] and, if asked, each chunk's input
    state [N, K, V]; gates [N, C]."""
    step = _forward_step(q_ref, k_ref, v_ref, g_ref, beta_ref, o_ref, states_ref, settings)
    _carry_in_loop(step, g_ref.shape[0], h0_ref, ht_ref)


def _forward_grid_kernel(q_ref, k_ref, v_ref, g_ref, beta_ref, h0_ref, o_ref, ht_ref, *refs, **settings):
    """One (batch, value head, chunk): q, k [C, K], v, o [C, V], gates [1, C], if asked the chunk's
    input state [1, K, V]; the state [K, V] lives in the scratch across the chunk axis."""
    *states_ref, state_ref = refs
    step = _forward_step(q_ref, k_ref, v_ref, g_ref, beta_ref, o_ref, states_ref, settings)
    _carry_along_grid(step, h0_ref, ht_ref, state_ref)


def _backward_loop_kernel(q_ref, k_ref, v_ref, g_ref, beta_ref, states_ref, do_ref, dht_ref, *grads_ref, **settings):
    """One (batch, value head), chunks in reverse: per-value-head dq, dk [Tp, K], dv [Tp, V],
    dG, dbeta [N, C] and d initial state [K, V]."""
    *chunk_grads_ref, dh0_ref = grads_ref
    inputs = (q_ref, k_ref, v_ref, g_ref, beta_ref, states_ref, do_ref)
    step = functools.partial(chunk_math.backward_chunk, *inputs, *chunk_grads_ref, **settings)
    _carry_in_loop(step, g_ref.shape[0], dht_ref, dh0_ref, reverse=True)


def _backward_grid_kernel(q_ref, k_ref, v_ref, g_ref, beta_ref, states_ref, do_ref, dht_ref, *refs, **settings):
    """One (batch, value head, chunk), the chunk axis walked in reverse by the index maps: blocks as
    in the forward grid kernel, dState [K, V] carried in the scratch."""
    *chunk_grads_ref, dh0_ref, d_state_ref = refs
    inputs = (q_ref, k_ref, v_ref, g_ref, beta_ref, states_ref, do_ref)
    step = functools.partial(chunk_math.backward_chunk, *inputs, *chunk_grads_ref, **settings)
    _carry_along_grid(step, dht_ref, dh0_ref, d_state_ref)


_KERNELS = {
    "forward": {"loop": _forward_loop_kernel, "grid": _forward_grid_kernel},
    "backward": {"loop": _backward_loop_kernel, "grid": _backward_grid_kernel},
}


def _decode_kernel(q_ref, k_ref, v_ref, g_ref, beta_ref, state_ref, o_ref, new_state_ref, *, scale, use_qk_l2norm):
    """One token, one (batch, value head): q, k [K, 1] columns, v [1, V], g, beta [1, 1]."""
    q, _ = chunk_math.l2_normalize(q_ref[...].astype(jnp.float32), 0, use_qk_l2norm)
    k, _ = chunk_math.l2_normalize(k_ref[...].astype(jnp.float32), 0, use_qk_l2norm)
    state = state_ref[...] * jnp.exp(g_ref[...])  # [K, V], decay first, then read
    delta = beta_ref[...] * (v_ref[...].astype(jnp.float32) - jnp.sum(state * k, axis=0, keepdims=True))  # [1, V]
    state = state + k * delta
    new_state_ref[...] = state
    o_ref[...] = jnp.sum(state * (q * scale), axis=0, keepdims=True).astype(o_ref.dtype)  # [1, V]


# ---------------------------------------------------------------- wrappers (layouts and pallas_calls)


def _gate_shape(b: int, hv: int, n: int, c: int, layout: str) -> tuple[int, ...]:
    """Gates as the kernels see them: [B, Hv, N, C] ("loop") or [B, Hv, N, 1, C] ("grid", whose
    [1, C] blocks then span the last two dims, as TPU needs for C < 128)."""
    return (b, hv, n, c) if layout == "loop" else (b, hv, n, 1, c)


def _gate_layout(x: jax.Array, chunk_size: int, layout: str) -> jax.Array:
    """[B, Tp, Hv] -> `_gate_shape` float32."""
    b, tp, hv = x.shape
    return jnp.moveaxis(x.astype(jnp.float32), 2, 1).reshape(_gate_shape(b, hv, tp // chunk_size, chunk_size, layout))


def _gate_from_layout(x: jax.Array) -> jax.Array:
    """`_gate_shape` -> [B, Tp, Hv]."""
    b, hv = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, hv, -1), 1, 2)


def _sequence_layout(q, k, v, g_cum, beta, chunk_size: int, layout: str) -> tuple[jax.Array, ...]:
    """The kernels' view of a sequence: q, k [B, Tp, Hk * K], v [B, Tp, Hv * V], gates `_gate_shape`."""
    b, tp = q.shape[:2]
    flat = lambda x: x.reshape(b, tp, -1)
    gates = (_gate_layout(g_cum, chunk_size, layout), _gate_layout(beta, chunk_size, layout))
    return flat(q), flat(k), flat(v), *gates


def _key_head(h: jax.Array, group: int) -> jax.Array:
    """Key head read by value head h (a grid index): h // group. By lax.div, not //, which lowers
    through `sign` (Mosaic resolves it per TPU chip); the divisor in h's dtype, which stays int32
    under jax_enable_x64, where a Python int would become int64."""
    return lax.div(h, jnp.asarray(group, h.dtype))


class _Specs(NamedTuple):
    qk: pl.BlockSpec  # [B, Tp, Hk * K], value head h reads key head h // group
    qk_per_value_head: pl.BlockSpec  # [B, Tp, Hv * K]
    v: pl.BlockSpec  # [B, Tp, Hv * V]
    gate: pl.BlockSpec  # `_gate_shape`
    state: pl.BlockSpec  # [B, Hv, K, V]
    chunk_states: pl.BlockSpec  # [B, Hv, N, K, V]


def _block_specs(layout: str, n: int, c: int, dk: int, dv: int, group: int, *, reverse: bool = False) -> _Specs:
    """Block specs of a layout. "loop": grid (B, Hv), whole-sequence blocks. "grid": grid (B, Hv, N),
    one chunk's blocks, chunk n - 1 - i at step i when `reverse`; state blocks stay put along N."""
    if layout == "loop":
        return _Specs(
            qk=pl.BlockSpec((None, n * c, dk), lambda b, h: (b, 0, _key_head(h, group))),
            qk_per_value_head=pl.BlockSpec((None, n * c, dk), lambda b, h: (b, 0, h)),
            v=pl.BlockSpec((None, n * c, dv), lambda b, h: (b, 0, h)),
            gate=pl.BlockSpec((None, None, n, c), lambda b, h: (b, h, 0, 0)),
            state=pl.BlockSpec((None, None, dk, dv), lambda b, h: (b, h, 0, 0)),
            chunk_states=pl.BlockSpec((None, None, n, dk, dv), lambda b, h: (b, h, 0, 0, 0)),
        )
    chunk = (lambda i: n - 1 - i) if reverse else (lambda i: i)
    return _Specs(
        qk=pl.BlockSpec((None, c, dk), lambda b, h, i: (b, chunk(i), _key_head(h, group))),
        qk_per_value_head=pl.BlockSpec((None, c, dk), lambda b, h, i: (b, chunk(i), h)),
        v=pl.BlockSpec((None, c, dv), lambda b, h, i: (b, chunk(i), h)),
        gate=pl.BlockSpec((None, None, None, 1, c), lambda b, h, i: (b, h, chunk(i), 0, 0)),
        state=pl.BlockSpec((None, None, dk, dv), lambda b, h, i: (b, h, 0, 0)),
        chunk_states=pl.BlockSpec((None, None, 1, dk, dv), lambda b, h, i: (b, h, chunk(i), 0, 0)),
    )


def _cost_estimate(grid: tuple[int, int, int], c: int, dk: int, dv: int, arrays, *, backward: bool) -> pl.CostEstimate:
    """What XLA's cost analysis sees of a sequence kernel over the (B, Hv, N) grid: per chunk the
    (I + L)^-1 doubling's 2 log2(C) [C, C] products plus the [C, C] x [C, K], [C, C] x [C, V] and
    [C, K] x [K, V] products of `chunk_math.forward_chunk` (2, 2, 3) or `backward_chunk` (8, 5, 7,
    the forward's intra-chunk terms and v_new recomputed); an exp per [C, C] entry; each array of
    `arrays` (operands and results) read or written once."""
    chunks = grid[0] * grid[1] * grid[2]
    cck, ccv, ckv = (8, 5, 7) if backward else (2, 2, 3)
    per_chunk = 4 * c**3 * (c.bit_length() - 1) + 2 * (cck * c * c * dk + ccv * c * c * dv + ckv * c * dk * dv)
    return pl.CostEstimate(
        flops=chunks * per_chunk,
        transcendentals=chunks * c * c,
        bytes_accessed=sum(x.size * jnp.dtype(x.dtype).itemsize for x in arrays),
    )


def _sequence_call(kernel, layout: str, options: KernelOptions, grid: tuple[int, int, int], dk: int, dv: int, **kw):
    """`pallas_call` of a sequence kernel: grid (B, Hv, N) with the [K, V] float32 scratch that carries
    the state along the chunk axis ("grid"), or grid (B, Hv) ("loop")."""
    if layout == "loop":
        return pl.pallas_call(kernel, **options.call_settings(grid[:2]), **kw)
    scratch = [pltpu.VMEM((dk, dv), jnp.float32)]
    return pl.pallas_call(kernel, **options.call_settings(grid), scratch_shapes=scratch, **kw)


def chunk_forward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g_cum: jax.Array,
    beta: jax.Array,
    initial_state: jax.Array,
    *,
    scale: float,
    use_qk_l2norm: bool,
    options: KernelOptions,
    output_chunk_states: bool = False,
) -> tuple[jax.Array, ...]:
    """Chunked forward over a padded sequence.

    Args:
      q, k: [B, Tp, Hk, K]; v: [B, Tp, Hv, V]; Tp a multiple of the chunk size.
      g_cum: [B, Tp, Hv] chunk-local cumulative sum of the log decay g; beta: [B, Tp, Hv].
      initial_state: [B, Hv, K, V] float32.
    Returns:
      o [B, Tp, Hv, V] in v's dtype, final state [B, Hv, K, V] float32 and, when
      `output_chunk_states`, the state entering each chunk [B, Hv, N, K, V] float32.
    """
    b, tp, hk, dk = q.shape
    hv, dv = v.shape[2:]
    c = options.chunk_size
    n = tp // c
    _, layout = options.resolved()
    specs = _block_specs(layout, n, c, dk, dv, hv // hk)
    out_shape = [
        jax.ShapeDtypeStruct((b, tp, hv * dv), v.dtype),
        jax.ShapeDtypeStruct((b, hv, dk, dv), jnp.float32),
    ]
    out_specs = [specs.v, specs.state]
    if output_chunk_states:
        out_shape.append(jax.ShapeDtypeStruct((b, hv, n, dk, dv), jnp.float32))
        out_specs.append(specs.chunk_states)
    kernel = functools.partial(_KERNELS["forward"][layout], chunk_size=c, scale=scale, use_qk_l2norm=use_qk_l2norm)
    operands = (*_sequence_layout(q, k, v, g_cum, beta, c, layout), initial_state.astype(jnp.float32))
    outputs = _sequence_call(
        kernel,
        layout,
        options,
        (b, hv, n),
        dk,
        dv,
        in_specs=[specs.qk, specs.qk, specs.v, specs.gate, specs.gate, specs.state],
        out_specs=out_specs,
        out_shape=out_shape,
        cost_estimate=_cost_estimate((b, hv, n), c, dk, dv, (*operands, *out_shape), backward=False),
    )(*operands)
    return (outputs[0].reshape(b, tp, hv, dv), *outputs[1:])


def chunk_backward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g_cum: jax.Array,
    beta: jax.Array,
    chunk_states: jax.Array,
    d_o: jax.Array,
    d_final_state: jax.Array,
    *,
    scale: float,
    use_qk_l2norm: bool,
    options: KernelOptions,
) -> tuple[jax.Array, ...]:
    """Cotangents of `chunk_forward`'s inputs from those of o [B, Tp, Hv, V] and the final state.

    `chunk_states` [B, Hv, N, K, V] is `chunk_forward(..., output_chunk_states=True)[2]`.
    Returns dq, dk [B, Tp, Hk, K] (summed over the value heads sharing a key head), dv like v,
    dg_cum, dbeta [B, Tp, Hv] float32 and d initial state [B, Hv, K, V] float32.
    """
    b, tp, hk, dk = q.shape
    hv, dv = v.shape[2:]
    c = options.chunk_size
    n = tp // c
    group = hv // hk
    _, layout = options.resolved()
    specs = _block_specs(layout, n, c, dk, dv, group, reverse=True)
    kernel = functools.partial(_KERNELS["backward"][layout], chunk_size=c, scale=scale, use_qk_l2norm=use_qk_l2norm)
    gate_shape = jax.ShapeDtypeStruct(_gate_shape(b, hv, n, c, layout), jnp.float32)
    operands = (
        *_sequence_layout(q, k, v, g_cum, beta, c, layout),
        chunk_states,
        d_o.reshape(b, tp, hv * dv),
        d_final_state.astype(jnp.float32),
    )
    out_shape = [
        jax.ShapeDtypeStruct((b, tp, hv * dk), jnp.float32),
        jax.ShapeDtypeStruct((b, tp, hv * dk), jnp.float32),
        jax.ShapeDtypeStruct((b, tp, hv * dv), jnp.float32),
        gate_shape,
        gate_shape,
        jax.ShapeDtypeStruct((b, hv, dk, dv), jnp.float32),
    ]
    dq, dk_, dv_, dg, dbeta, dh0 = _sequence_call(
        kernel,
        layout,
        options,
        (b, hv, n),
        dk,
        dv,
        in_specs=[specs.qk, specs.qk, specs.v, specs.gate, specs.gate, specs.chunk_states, specs.v, specs.state],
        out_specs=[specs.qk_per_value_head, specs.qk_per_value_head, specs.v, specs.gate, specs.gate, specs.state],
        out_shape=out_shape,
        cost_estimate=_cost_estimate((b, hv, n), c, dk, dv, (*operands, *out_shape), backward=True),
    )(*operands)

    def sum_groups(x):  # [B, Tp, Hv * K] -> [B, Tp, Hk, K]
        return x.reshape(b, tp, hk, group, dk).sum(axis=3).astype(q.dtype)

    return (
        sum_groups(dq),
        sum_groups(dk_),
        dv_.reshape(b, tp, hv, dv).astype(v.dtype),
        _gate_from_layout(dg),
        _gate_from_layout(dbeta),
        dh0,
    )


def decode_step(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    state: jax.Array,
    *,
    scale: float,
    use_qk_l2norm: bool,
    options: KernelOptions,
) -> tuple[jax.Array, jax.Array]:
    """One recurrent step: q, k [B, Hk, K], v [B, Hv, V], g, beta [B, Hv], state [B, Hv, K, V].

    Returns (o [B, Hv, V] in v's dtype, new state [B, Hv, K, V] float32); the state buffer is
    updated in place when the caller donates it.
    """
    b, hk, dk = q.shape
    hv, dv = v.shape[1:]
    group = hv // hk
    column = pl.BlockSpec((None, None, dk, 1), lambda b, h: (b, _key_head(h, group), 0, 0))  # [B, Hk, K, 1]
    row = pl.BlockSpec((None, None, 1, dv), lambda b, h: (b, h, 0, 0))  # [B, Hv, 1, V]
    scalar = pl.BlockSpec((None, None, 1, 1), lambda b, h: (b, h, 0, 0))  # [B, Hv, 1, 1]
    state_spec = pl.BlockSpec((None, None, dk, dv), lambda b, h: (b, h, 0, 0))
    kernel = functools.partial(_decode_kernel, scale=scale, use_qk_l2norm=use_qk_l2norm)
    o, new_state = pl.pallas_call(
        kernel,
        **options.call_settings((b, hv)),
        in_specs=[column, column, row, scalar, scalar, state_spec],
        out_specs=[row, state_spec],
        out_shape=[
            jax.ShapeDtypeStruct((b, hv, 1, dv), v.dtype),
            jax.ShapeDtypeStruct((b, hv, dk, dv), jnp.float32),
        ],
        input_output_aliases={5: 1},
    )(
        q[..., None],
        k[..., None],
        v[:, :, None, :],
        g.astype(jnp.float32)[..., None, None],
        beta.astype(jnp.float32)[..., None, None],
        state.astype(jnp.float32),
    )
    return o[:, :, 0, :], new_state
