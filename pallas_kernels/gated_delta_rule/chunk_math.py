"""Kernel-side math of one chunk of the gated delta rule, shared by both kernel layouts of `kernel.py`.

Everything here runs inside a Pallas kernel on 2-D float32 values: `forward_chunk` and
`backward_chunk` read one chunk from refs, write its outputs (or gradients) to refs and return the
carried [Dk, Dv] state (or its cotangent).

Inside a chunk (C positions, G the chunk-local cumulative log decay, supplied by the caller):
  Gam[i, j] = exp(G_i - G_j) for i >= j else 0,  L = strictly_lower((beta k) k^T * Gam),
  u - w S = (I + L)^-1 (beta v - (beta exp(G) k) S)  = v_new,
  o = (exp(G) q) S + (q k^T * Gam) v_new,  S' = exp(G_C) S + (exp(G_C - G) k)^T v_new.
(I + L)^-1 is built by block doubling with matmuls (no triangular solve, no dynamic row writes),
G's row and column forms by masked reductions (no cumsum: Mosaic TPU cannot lower it).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

_L2_EPS = 1e-6  # FLA / HF: x * rsqrt(sum(x^2) + eps)


# ---------------------------------------------------------------- math on 2-D values (kernel side)


def _dot(a: jax.Array, b: jax.Array, *, transpose_a: bool = False, transpose_b: bool = False) -> jax.Array:
    """a @ b in exact float32, either operand optionally transposed (no transpose materialised)."""
    dims = (((0 if transpose_a else 1,), (1 if transpose_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)


def _iota(c: int) -> tuple[jax.Array, jax.Array]:
    """Row and column indices of a [C, C] matrix."""
    return lax.broadcasted_iota(jnp.int32, (c, c), 0), lax.broadcasted_iota(jnp.int32, (c, c), 1)


def _is_last(c: int) -> jax.Array:
    """[1, C] mask of the last position (built, not sliced: Triton cannot slice values)."""
    return lax.broadcasted_iota(jnp.int32, (1, c), 1) == c - 1


def _row_to_column(x: jax.Array) -> jax.Array:
    """[1, C] -> [C, 1] by a masked lane reduction (exact: one nonzero term per row)."""
    rows, cols = _iota(x.shape[1])
    return jnp.sum(jnp.where(rows == cols, x, 0.0), axis=1, keepdims=True)


def _column_to_row(x: jax.Array) -> jax.Array:
    """[C, 1] -> [1, C] by a masked sublane reduction."""
    rows, cols = _iota(x.shape[0])
    return jnp.sum(jnp.where(rows == cols, x, 0.0), axis=0, keepdims=True)


def l2_normalize(x: jax.Array, axis: int, enabled: bool) -> tuple[jax.Array, jax.Array | None]:
    """(x * r, r) with r = rsqrt(sum(x^2) + 1e-6) along `axis`; (x, None) when not enabled."""
    if not enabled:
        return x, None
    r = lax.rsqrt(jnp.sum(x * x, axis=axis, keepdims=True) + _L2_EPS)
    return x * r, r


def _l2_normalize_backward(dy: jax.Array, y: jax.Array, r: jax.Array | None, axis: int) -> jax.Array:
    """Cotangent of x from that of y = x * r: r (dy - y sum(y dy)); identity when r is None."""
    if r is None:
        return dy
    return r * (dy - y * jnp.sum(y * dy, axis=axis, keepdims=True))


def _unit_lower_inverse(lower: jax.Array) -> jax.Array:
    """(I + lower)^-1 for strictly lower-triangular `lower` [C, C], C a power of two.

    Block doubling: if X inverts the block diagonal of I + L with blocks of size b, and E holds
    the lower-left b x b blocks inside each diagonal 2b x 2b block, then (D + E)^-1 = X - X E X
    exactly (E X E = 0). log2(C) levels of two matmuls; every intermediate is an entry of the
    true inverse, so nothing grows beyond it (unlike a Neumann series).
    """
    c = lower.shape[0]
    rows, cols = _iota(c)
    inverse = jnp.where(rows == cols, 1.0, 0.0).astype(jnp.float32)  # [C, C]
    shift = 0
    while (1 << shift) < c:
        same_block = (rows >> shift) == (cols >> shift)
        same_double = (rows >> (shift + 1)) == (cols >> (shift + 1))
        off_diagonal = jnp.where(same_double & ~same_block, lower, 0.0)  # E [C, C]
        inverse = inverse - _dot(_dot(inverse, off_diagonal), inverse)
        shift += 1
    return inverse


class _Chunk(NamedTuple):
    """One chunk's inputs in float32, q / k normalised (norm factors kept for the backward)."""

    q_unit: jax.Array  # [C, K] normalised q
    q: jax.Array  # [C, K] normalised q times scale
    k: jax.Array  # [C, K] normalised k
    v: jax.Array  # [C, V]
    beta: jax.Array  # [C, 1]
    g_column: jax.Array  # [C, 1] chunk-local cumulative log decay G
    g_row: jax.Array  # [1, C] the same as a row
    g_last: jax.Array  # [1, 1] G at the chunk's last position
    q_norm: jax.Array | None  # [C, 1] rsqrt factor of q, None without L2 norm
    k_norm: jax.Array | None  # [C, 1]


def _rows(i, chunk_size: int) -> pl.Slice:
    """Rows of chunk i in a [Tp, D] ref (or of the only chunk, i = 0, in a [C, D] block)."""
    return pl.ds(pl.multiple_of(i * chunk_size, chunk_size), chunk_size)


def _load_chunk(q_ref, k_ref, v_ref, g_ref, beta_ref, i, *, chunk_size: int, scale: float, use_qk_l2norm: bool):
    """Read chunk i of q/k/v [Tp, D] and gates [N, C] refs (or i = 0 of [C, D], [1, C] blocks) into a `_Chunk`."""
    rows = _rows(i, chunk_size)
    q, q_norm = l2_normalize(q_ref[rows, :].astype(jnp.float32), 1, use_qk_l2norm)
    k, k_norm = l2_normalize(k_ref[rows, :].astype(jnp.float32), 1, use_qk_l2norm)
    g_row = g_ref[pl.ds(i, 1), :]  # [1, C]
    return _Chunk(
        q_unit=q,
        q=q * scale,
        k=k,
        v=v_ref[rows, :].astype(jnp.float32),
        beta=_row_to_column(beta_ref[pl.ds(i, 1), :]),
        g_column=_row_to_column(g_row),
        g_row=g_row,
        g_last=jnp.sum(jnp.where(_is_last(chunk_size), g_row, 0.0), axis=1, keepdims=True),
        q_norm=q_norm,
        k_norm=k_norm,
    )


class _Intra(NamedTuple):
    """State-independent quantities of a chunk."""

    gamma: jax.Array  # [C, C] exp(G_i - G_j) on and below the diagonal, 0 above
    k_beta: jax.Array  # [C, K] beta k
    k_beta_decayed: jax.Array  # [C, K] beta exp(G) k
    inverse: jax.Array  # [C, C] (I + L)^-1
    attn: jax.Array  # [C, C] q k^T * gamma
    decay: jax.Array  # [C, 1] exp(G)
    decay_to_end: jax.Array  # [C, 1] exp(G_last - G)
    chunk_decay: jax.Array  # [1, 1] exp(G_last)


def _intra_chunk(chunk: _Chunk) -> _Intra:
    rows, cols = _iota(chunk.g_row.shape[1])
    causal = cols <= rows
    # Mask before exp: above the diagonal G_i - G_j > 0 could overflow.
    gamma = jnp.where(causal, jnp.exp(jnp.where(causal, chunk.g_column - chunk.g_row, 0.0)), 0.0)
    k_beta = chunk.k * chunk.beta
    strictly_lower = jnp.where(cols < rows, _dot(k_beta, chunk.k, transpose_b=True) * gamma, 0.0)  # L
    decay = jnp.exp(chunk.g_column)
    return _Intra(
        gamma=gamma,
        k_beta=k_beta,
        k_beta_decayed=k_beta * decay,
        inverse=_unit_lower_inverse(strictly_lower),
        attn=_dot(chunk.q, chunk.k, transpose_b=True) * gamma,
        decay=decay,
        decay_to_end=jnp.exp(chunk.g_last - chunk.g_column),
        chunk_decay=jnp.exp(chunk.g_last),
    )


def _new_values(chunk: _Chunk, intra: _Intra, state: jax.Array) -> jax.Array:
    """v_new = (I + L)^-1 (beta v - beta exp(G) k S) [C, V]: values minus what S already predicts."""
    return _dot(intra.inverse, chunk.v * chunk.beta - _dot(intra.k_beta_decayed, state))


# ---------------------------------------------------------------- per-chunk steps (shared by both layouts)


def forward_chunk(
    q_ref, k_ref, v_ref, g_ref, beta_ref, o_ref, states_ref, i, state, *, chunk_size, scale, use_qk_l2norm
):
    """Chunk i: write its output rows of o_ref (and, if states_ref, its input state at states_ref[i]);
    return the state after it. state [K, V] float32 is the state before chunk i."""
    chunk = _load_chunk(
        q_ref, k_ref, v_ref, g_ref, beta_ref, i, chunk_size=chunk_size, scale=scale, use_qk_l2norm=use_qk_l2norm
    )
    intra = _intra_chunk(chunk)
    if states_ref is not None:
        states_ref[i] = state
    v_new = _new_values(chunk, intra, state)  # [C, V]
    o = _dot(chunk.q * intra.decay, state) + _dot(intra.attn, v_new)  # [C, V]
    o_ref[_rows(i, chunk_size), :] = o.astype(o_ref.dtype)
    return state * intra.chunk_decay + _dot(chunk.k * intra.decay_to_end, v_new, transpose_a=True)


def backward_chunk(
    q_ref,
    k_ref,
    v_ref,
    g_ref,
    beta_ref,
    states_ref,
    do_ref,
    dq_ref,
    dk_ref,
    dv_ref,
    dg_ref,
    dbeta_ref,
    i,
    d_state,
    *,
    chunk_size,
    scale,
    use_qk_l2norm,
):
    """Chunk i: write its rows of dq, dk [., K], dv [., V], dG, dbeta [., C]; return the cotangent of
    the state before it. d_state [K, V] is that of the state after chunk i. Chunk quantities are
    recomputed from the inputs and the chunk's input state states_ref[i] (saved by a forward pass)."""
    chunk = _load_chunk(
        q_ref, k_ref, v_ref, g_ref, beta_ref, i, chunk_size=chunk_size, scale=scale, use_qk_l2norm=use_qk_l2norm
    )
    intra = _intra_chunk(chunk)
    rows, cols = _iota(chunk_size)
    state = states_ref[i]  # [K, V] state before chunk i
    t_rows = _rows(i, chunk_size)
    d_o = do_ref[t_rows, :].astype(jnp.float32)  # [C, V]
    v_new = _new_values(chunk, intra, state)  # [C, V]
    k_to_end = chunk.k * intra.decay_to_end  # [C, K]

    # Through o = (exp(G) q) S + attn v_new and S' = exp(G_C) S + (exp(G_C - G) k)^T v_new.
    d_v_new = _dot(intra.attn, d_o, transpose_a=True) + _dot(k_to_end, d_state)  # [C, V]
    d_q_decayed = _dot(d_o, state, transpose_b=True)  # [C, K]
    d_k_to_end = _dot(v_new, d_state, transpose_b=True)  # [C, K]
    d_attn = jnp.where(cols <= rows, _dot(d_o, v_new, transpose_b=True), 0.0)  # [C, C]
    # Through v_new = A^-1 x, x = beta v - (beta exp(G) k) S: dx = A^-T dv_new, dA = -dx v_new^T.
    d_x = _dot(intra.inverse, d_v_new, transpose_a=True)  # [C, V]
    d_lower = jnp.where(cols < rows, -_dot(d_x, v_new, transpose_b=True), 0.0)  # [C, C]
    d_k_beta_decayed = -_dot(d_x, state, transpose_b=True)  # [C, K]
    d_state_in = (
        d_state * intra.chunk_decay
        + _dot(chunk.q * intra.decay, d_o, transpose_a=True)
        - _dot(intra.k_beta_decayed, d_x, transpose_a=True)
    )  # [K, V]

    # Back to q, k, v, beta and G.
    d_attn_gamma = d_attn * intra.gamma  # cotangent of q k^T
    d_lower_gamma = d_lower * intra.gamma  # cotangent of (beta k) k^T
    d_k_beta = _dot(d_lower_gamma, chunk.k) + d_k_beta_decayed * intra.decay  # [C, K]
    d_q = d_q_decayed * intra.decay + _dot(d_attn_gamma, chunk.k)  # [C, K]
    d_k = (
        _dot(d_attn_gamma, chunk.q, transpose_a=True)
        + _dot(d_lower_gamma, intra.k_beta, transpose_a=True)
        + d_k_beta * chunk.beta
        + d_k_to_end * intra.decay_to_end
    )  # [C, K]
    d_beta = jnp.sum(d_x * chunk.v, axis=1, keepdims=True) + jnp.sum(d_k_beta * chunk.k, axis=1, keepdims=True)
    d_gamma = d_attn * _dot(chunk.q, chunk.k, transpose_b=True) + d_lower * _dot(
        intra.k_beta, chunk.k, transpose_b=True
    )
    d_log_gamma = d_gamma * intra.gamma  # [C, C], d/d(G_i - G_j)
    d_g_to_end = jnp.sum(d_k_to_end * k_to_end, axis=1, keepdims=True)  # [C, 1]
    d_g_column = (
        jnp.sum(d_q_decayed * chunk.q * intra.decay, axis=1, keepdims=True)
        + jnp.sum(d_k_beta_decayed * intra.k_beta_decayed, axis=1, keepdims=True)
        - d_g_to_end
        + jnp.sum(d_log_gamma, axis=1, keepdims=True)
    )  # [C, 1]
    d_g_last = jnp.sum(d_g_to_end, axis=0, keepdims=True) + intra.chunk_decay * jnp.sum(
        jnp.sum(state * d_state, axis=1, keepdims=True), axis=0, keepdims=True
    )  # [1, 1]
    d_g_row = (
        _column_to_row(d_g_column)
        - jnp.sum(d_log_gamma, axis=0, keepdims=True)
        + jnp.where(_is_last(chunk_size), d_g_last, 0.0)
    )  # [1, C]

    dq_ref[t_rows, :] = _l2_normalize_backward(d_q * scale, chunk.q_unit, chunk.q_norm, 1)
    dk_ref[t_rows, :] = _l2_normalize_backward(d_k, chunk.k, chunk.k_norm, 1)
    dv_ref[t_rows, :] = d_x * chunk.beta
    dg_ref[pl.ds(i, 1), :] = d_g_row
    dbeta_ref[pl.ds(i, 1), :] = _column_to_row(d_beta)
    return d_state_in
