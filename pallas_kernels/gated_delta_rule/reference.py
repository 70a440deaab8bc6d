"""Gated delta rule in plain jnp: a token-by-token recurrent form and a chunked (WY) form.

Semantics, per value head with state S [Dk, Dv] in float32:
S = exp(g_t) S;  delta = beta_t (v_t - S^T k_t);  S = S + k_t delta^T;  o_t = S^T (scale q_t).

Shape letters: B batch, T tokens, H value heads, K key head dim, V value head dim, N chunks,
C chunk size (I, J positions inside a chunk). Inputs q, k are already repeated to the value-head
count and L2-normalised (`ops.gated_delta_rule` does both). All math is float32.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


def _einsum(spec: str, *operands: jax.Array) -> jax.Array:
    """Exact float32 einsum on every backend (no bf16 passes on TPU/GPU)."""
    return jnp.einsum(spec, *operands, precision=HIGHEST)


def _initial_state(initial_state, b: int, h: int, dk: int, dv: int) -> jax.Array:
    if initial_state is None:
        return jnp.zeros((b, h, dk, dv), jnp.float32)  # [B, H, K, V]
    return initial_state.astype(jnp.float32)


def recurrent_gated_delta_rule(q, k, v, g, beta, *, scale, initial_state=None):
    """One token at a time with `lax.scan`: q, k [B, T, H, K], v [B, T, H, V], g, beta [B, T, H].

    Returns (o [B, T, H, V] in v's dtype, final state [B, H, K, V] float32).
    """
    b, _, h, dk = q.shape
    dv = v.shape[-1]
    state = _initial_state(initial_state, b, h, dk, dv)  # [B, H, K, V]

    def step(state, inputs):
        q_t, k_t, v_t, g_t, beta_t = inputs  # [B, H, K], [B, H, K], [B, H, V], [B, H], [B, H]
        state = state * jnp.exp(g_t)[..., None, None]  # decay first, then read
        delta = beta_t[..., None] * (v_t - _einsum("bhkv,bhk->bhv", state, k_t))  # [B, H, V]
        state = state + _einsum("bhk,bhv->bhkv", k_t, delta)  # [B, H, K, V]
        return state, _einsum("bhkv,bhk->bhv", state, q_t)  # o_t [B, H, V]

    q = q.astype(jnp.float32) * scale
    time_major = [jnp.moveaxis(x.astype(jnp.float32), 1, 0) for x in (q, k, v, g, beta)]
    final_state, o = jax.lax.scan(step, state, time_major)  # o [T, B, H, V]
    return jnp.moveaxis(o, 0, 1).astype(v.dtype), final_state


_SUBSTITUTION_BLOCK = 16  # (I + L)^-1 by forward substitution on diagonal blocks up to this size


def _forward_substitution(lower: jax.Array) -> jax.Array:
    """(I + lower)^-1 for strictly lower-triangular `lower` [.., C, C], row by row.

    Row i of T = (I + L)^-1 is e_i - L[i] T (only rows < i of T are read): C - 1 batched
    vector-matrix products. No LAPACK triangular solve: its CPU custom call inside a scanned
    backward pass deadlocked XLA's 2-thread pool in training.
    """
    c = lower.shape[-1]
    eye = jnp.broadcast_to(jnp.eye(c, dtype=lower.dtype), lower.shape)

    def substitute_row(i, inverse):
        row = eye[..., i, :] - _einsum("...j,...jk->...k", lower[..., i, :], inverse)  # [.., C]
        return inverse.at[..., i, :].set(row)

    return jax.lax.fori_loop(1, c, substitute_row, eye)


def _unit_lower_inverse(lower: jax.Array) -> jax.Array:
    """(I + lower)^-1 for strictly lower-triangular `lower` [.., C, C], exactly.

    By halves: [[A, 0], [E, B]]^-1 = [[A^-1, 0], [-B^-1 E A^-1, B^-1]], the two diagonal halves
    inverted together (stacked on a new batch axis), down to blocks of `_SUBSTITUTION_BLOCK` solved
    by forward substitution: 15 sequential steps instead of 63 at C = 64, and two small matmul
    levels. Every intermediate is a block of the true inverse (no Neumann series growth).
    """
    c = lower.shape[-1]
    if c <= _SUBSTITUTION_BLOCK or c % 2:
        return _forward_substitution(lower)
    h = c // 2
    upper_left, lower_right = _unit_lower_inverse(jnp.stack([lower[..., :h, :h], lower[..., h:, h:]]))
    lower_left = -_einsum("...ij,...jk,...kl->...il", lower_right, lower[..., h:, :h], upper_left)  # [.., h, h]
    top = jnp.concatenate([upper_left, jnp.zeros_like(upper_left)], axis=-1)
    return jnp.concatenate([top, jnp.concatenate([lower_left, lower_right], axis=-1)], axis=-2)


def _to_chunks(x: jax.Array, chunk_size: int) -> jax.Array:
    """[B, T, H, ...] -> [N, B, H, C, ...] float32, zero-padding T up to a multiple of C."""
    b, t = x.shape[:2]
    n = -(-t // chunk_size)
    pad = [(0, 0), (0, n * chunk_size - t)] + [(0, 0)] * (x.ndim - 2)
    x = jnp.pad(x.astype(jnp.float32), pad).reshape(b, n, chunk_size, *x.shape[2:])  # [B, N, C, H, ...]
    return jnp.moveaxis(jnp.moveaxis(x, 3, 2), 1, 0)


def _from_chunks(x: jax.Array, t: int) -> jax.Array:
    """[N, B, H, C, V] -> [B, T, H, V], dropping the padding."""
    n, b, h, c, dv = x.shape
    x = jnp.moveaxis(jnp.moveaxis(x, 0, 1), 2, 3)  # [B, N, C, H, V]
    return x.reshape(b, n * c, h, dv)[:, :t]


class _Intra(NamedTuple):
    """What does not depend on the carried state, for all chunks at once ([N, B, H] leading).

    With G the chunk-local cumulative log decay and gamma[i, j] = exp(G_i - G_j) for i >= j, else 0:
    L = strictly_lower((beta k) k^T * gamma), v_new = (I + L)^-1 (beta v - beta exp(G) k S) = u - w S.
    """

    gamma: jax.Array  # [.., C, C]
    lower: jax.Array  # [.., C, C] L
    inverse: jax.Array  # [.., C, C] (I + L)^-1
    attn: jax.Array  # [.., C, C] q k^T * gamma (causal)
    k_beta: jax.Array  # [.., C, K] beta k
    k_beta_decayed: jax.Array  # [.., C, K] beta exp(G) k
    w: jax.Array  # [.., C, K] (I + L)^-1 beta exp(G) k
    decay: jax.Array  # [.., C, 1] exp(G)
    q_decayed: jax.Array  # [.., C, K] exp(G) q
    decay_to_end: jax.Array  # [.., C, 1] exp(G_C - G)
    k_decayed: jax.Array  # [.., C, K] exp(G_C - G) k
    chunk_decay: jax.Array  # [N, B, H] exp(G_C)


def _intra_chunk(q, k, g_cum, beta) -> _Intra:
    """q, k [N, B, H, C, K], g_cum (G) and beta [N, B, H, C]."""
    c = g_cum.shape[-1]
    causal = jnp.tril(jnp.ones((c, c), bool))  # [C, C]
    # Mask before exp: above the diagonal G_i - G_j > 0 could overflow.
    gamma = jnp.exp(jnp.where(causal, g_cum[..., :, None] - g_cum[..., None, :], -jnp.inf))  # [.., C, C]
    k_beta = k * beta[..., None]  # [.., C, K]
    lower = jnp.tril(_einsum("...ik,...jk->...ij", k_beta, k) * gamma, -1)  # [.., C, C]
    inverse = _unit_lower_inverse(lower)
    decay = jnp.exp(g_cum)[..., None]  # [.., C, 1]
    decay_to_end = jnp.exp(g_cum[..., -1:] - g_cum)[..., None]  # [.., C, 1]
    k_beta_decayed = k_beta * decay
    return _Intra(
        gamma=gamma,
        lower=lower,
        inverse=inverse,
        attn=_einsum("...ik,...jk->...ij", q, k) * gamma,
        k_beta=k_beta,
        k_beta_decayed=k_beta_decayed,
        w=_einsum("...ij,...jk->...ik", inverse, k_beta_decayed),
        decay=decay,
        q_decayed=q * decay,
        decay_to_end=decay_to_end,
        k_decayed=k * decay_to_end,
        chunk_decay=jnp.exp(g_cum[..., -1]),
    )


def _forward_scan(intra: _Intra, u: jax.Array, state: jax.Array):
    """The sequential part, chunk by chunk from state S_0 [B, H, K, V]:
    v_new = u - w S_n,  o = exp(G) q S_n + attn v_new,  S_{n+1} = exp(G_C) S_n + (exp(G_C - G) k)^T v_new.

    o is computed in the loop: emitting the states [N, B, H, K, V] to compute it outside costs more
    than the two matmuls a step; without differentiation the states and v_new outputs are dead code.
    Returns (o [N, B, H, C, V], the state entering each chunk [N, B, H, K, V], v_new [N, B, H, C, V],
    the final state).
    """

    def step(state, chunk):
        u, w, k_decayed, chunk_decay, q_decayed, attn = chunk  # one chunk, leading N dropped
        v_new = u - _einsum("bhck,bhkv->bhcv", w, state)  # [B, H, C, V]
        o = _einsum("bhck,bhkv->bhcv", q_decayed, state) + _einsum("bhij,bhjv->bhiv", attn, v_new)
        new_state = state * chunk_decay[..., None, None] + _einsum("bhck,bhcv->bhkv", k_decayed, v_new)
        return new_state, (o, state, v_new)

    chunks = (u, intra.w, intra.k_decayed, intra.chunk_decay, intra.q_decayed, intra.attn)
    final_state, (o, states, v_new) = jax.lax.scan(step, state, chunks)
    return o, states, v_new, final_state


def _backward_states(d_o_attn, d_o_q, w, k_decayed, chunk_decay, d_final_state):
    """The sequential part of the backward, chunks in reverse, carrying dS (the cotangent of the state).

    Per chunk, from dS_{n+1}: dv_new = attn^T dO + k_decayed dS_{n+1} and
    dS_n = exp(G_C) dS_{n+1} + q_decayed^T dO - w^T dv_new; `d_o_attn` = attn^T dO [N, B, H, C, V]
    and `d_o_q` = q_decayed^T dO [N, B, H, K, V] come precomputed.
    Returns (dS_{n+1} of each chunk [N, B, H, K, V], dv_new [N, B, H, C, V], dS_0 [B, H, K, V]).
    """

    def step(d_state, chunk):
        d_o_attn, d_o_q, w, k_decayed, chunk_decay = chunk
        d_v_new = d_o_attn + _einsum("bhck,bhkv->bhcv", k_decayed, d_state)  # [B, H, C, V]
        d_previous = d_state * chunk_decay[..., None, None] + d_o_q - _einsum("bhck,bhcv->bhkv", w, d_v_new)
        return d_previous, (d_state, d_v_new)

    chunks = (d_o_attn, d_o_q, w, k_decayed, chunk_decay)
    d_initial, (d_states, d_v_new) = jax.lax.scan(step, d_final_state, chunks, reverse=True)
    return d_states, d_v_new, d_initial


def _row_dot(a: jax.Array, b: jax.Array) -> jax.Array:
    """sum(a * b, -1): [.., C, D] -> [.., C]. As a dot, not a multiply-and-reduce, which XLA:CPU fuses
    into a reduction ~10x slower."""
    return _einsum("...cd,...cd->...c", a, b)


@jax.custom_vjp
def _chunked(q, k, v, g_cum, beta, state):
    """The chunked form on chunked inputs: q (scaled), k [N, B, H, C, K], v [N, B, H, C, V], g_cum (the
    chunk-local cumulative log decay) and beta [N, B, H, C], state [B, H, K, V].
    Returns (o [N, B, H, C, V], final state [B, H, K, V])."""
    return _chunked_fwd(q, k, v, g_cum, beta, state)[0]


def _chunked_fwd(q, k, v, g_cum, beta, state):
    intra = _intra_chunk(q, k, g_cum, beta)
    u = _einsum("...ij,...jv->...iv", intra.inverse, v * beta[..., None])  # [.., C, V]
    o, states, v_new, final_state = _forward_scan(intra, u, state)
    # Residuals: the inputs, from which the backward recomputes the state-independent part (under one
    # jit XLA shares it with the forward), and the states and v_new, which only the scan can give.
    return (o, final_state), (q, k, v, g_cum, beta, states, v_new)


def _chunked_bwd(residuals, cotangents):
    """Hand-derived: one reverse scan for dS, everything else batched over chunks (see the forward's
    formulas in `_Intra` and `_forward_scan`)."""
    q, k, v, g_cum, beta, states, v_new = residuals
    d_o, d_final_state = cotangents
    intra = _intra_chunk(q, k, g_cum, beta)
    d_o_attn = _einsum("...ij,...iv->...jv", intra.attn, d_o)  # attn^T dO [.., C, V]
    d_o_q = _einsum("...ck,...cv->...kv", intra.q_decayed, d_o)  # q_decayed^T dO [.., K, V]
    d_states, d_v_new, d_state = _backward_states(
        d_o_attn, d_o_q, intra.w, intra.k_decayed, intra.chunk_decay, d_final_state
    )  # dS after each chunk [.., K, V], dv_new [.., C, V], dS_0

    # o = q_decayed S + attn v_new, S' = exp(G_C) S + k_decayed^T v_new.
    d_q_decayed = _einsum("...cv,...kv->...ck", d_o, states)  # [.., C, K]
    d_attn = jnp.tril(_einsum("...iv,...jv->...ij", d_o, v_new))  # [.., C, C]
    d_k_decayed = _einsum("...cv,...kv->...ck", v_new, d_states)  # [.., C, K]
    d_chunk_decay = _einsum("...kv,...kv->...", states, d_states)  # [N, B, H]
    # v_new = (I + L)^-1 x with x = beta v - beta exp(G) k S: dx = (I + L)^-T dv_new, dL = -dx v_new^T.
    d_x = _einsum("...ji,...jv->...iv", intra.inverse, d_v_new)  # [.., C, V]
    d_lower = jnp.tril(-_einsum("...iv,...jv->...ij", d_x, v_new), -1)  # [.., C, C]
    d_k_beta_decayed = -_einsum("...cv,...kv->...ck", d_x, states)  # [.., C, K]

    # Back to q, k, v, beta through attn = q k^T * gamma, L = (beta k) k^T * gamma and the decays.
    d_attn_gamma = d_attn * intra.gamma  # cotangent of q k^T
    d_lower_gamma = d_lower * intra.gamma  # cotangent of (beta k) k^T
    d_k_beta = _einsum("...ij,...jk->...ik", d_lower_gamma, k) + d_k_beta_decayed * intra.decay  # [.., C, K]
    d_q = d_q_decayed * intra.decay + _einsum("...ij,...jk->...ik", d_attn_gamma, k)
    d_k = (
        _einsum("...ij,...ik->...jk", d_attn_gamma, q)
        + _einsum("...ij,...ik->...jk", d_lower_gamma, intra.k_beta)
        + d_k_beta * beta[..., None]
        + d_k_decayed * intra.decay_to_end
    )  # [.., C, K]
    d_v = d_x * beta[..., None]
    d_beta = _row_dot(d_x, v) + _row_dot(d_k_beta, k)  # [.., C]

    # G enters through exp(G_i - G_j) (gamma), exp(G) (q_decayed, beta exp(G) k), exp(G_C - G) and exp(G_C).
    d_to_end = _row_dot(d_k_decayed, intra.k_decayed)  # [.., C]
    d_g_cum = (
        _row_dot(d_q_decayed, intra.q_decayed)
        + _row_dot(d_k_beta_decayed, intra.k_beta_decayed)
        - d_to_end
        # Through gamma: the cotangent of G_i - G_j is d_attn * attn + d_lower * L, summed over j minus over i.
        + _row_dot(d_attn, intra.attn)
        + _row_dot(d_lower, intra.lower)
        - _einsum("...ij,...ij->...j", d_attn, intra.attn)
        - _einsum("...ij,...ij->...j", d_lower, intra.lower)
    )
    d_g_last = jnp.sum(d_to_end, axis=-1) + intra.chunk_decay * d_chunk_decay  # [N, B, H]
    d_g_cum = d_g_cum.at[..., -1].add(d_g_last)
    return d_q, d_k, d_v, d_g_cum, d_beta, d_state


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def chunked_gated_delta_rule(q, k, v, g, beta, *, scale, initial_state=None, chunk_size=64):
    """Chunked (WY) form, same signature and result as `recurrent_gated_delta_rule`.

    T is zero-padded to a multiple of `chunk_size` with k = v = q = 0, g = 0, beta = 0, which
    leaves the state unchanged; the padded outputs are cropped. Differentiable by a hand-derived
    backward (`_chunked_bwd`), not by autodiff through the scan.
    """
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    state = _initial_state(initial_state, b, h, dk, dv)  # [B, H, K, V]
    q = q.astype(jnp.float32) * scale
    chunks = [_to_chunks(x, chunk_size) for x in (q, k, v, g, beta)]  # [N, B, H, C, ...]
    chunks[3] = jnp.cumsum(chunks[3], axis=-1)  # g -> G, the log decay from the chunk's start to position i
    o, final_state = _chunked(*chunks, state)  # o [N, B, H, C, V]
    return _from_chunks(o, t).astype(v.dtype), final_state
