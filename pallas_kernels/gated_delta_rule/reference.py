"""Gated delta rule in plain jnp: a token-by-token recurrent form and a chunked (WY) form.

Semantics, per value head with state S [Dk, Dv] in float32:
S = exp(g_t) S;  delta = beta_t (v_t - S^T k_t);  S = S + k_t delta^T;  o_t = S^T (scale q_t).

Shape letters: B batch, T tokens, H value heads, K key head dim, V value head dim, N chunks,
C chunk size (I, J positions inside a chunk). Inputs q, k are already repeated to the value-head
count and L2-normalised (`ops.gated_delta_rule` does both). All math is float32.
"""

from __future__ import annotations

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


@jax.custom_vjp
def _unit_lower_inverse(lower: jax.Array) -> jax.Array:
    """(I + lower)^-1 for strictly lower-triangular `lower` [.., C, C], by exact forward substitution.

    Row i of T = (I + L)^-1 is e_i - L[i] T (only rows < i of T are read), so C - 1 batched
    vector-matrix products build it. Matmuls only: no LAPACK triangular solve, whose CPU custom
    call inside the scanned backward pass deadlocked XLA's 2-thread pool in training.
    """
    c = lower.shape[-1]
    eye = jnp.broadcast_to(jnp.eye(c, dtype=lower.dtype), lower.shape)

    def substitute_row(i, inverse):
        row = eye[..., i, :] - _einsum("...j,...jk->...k", lower[..., i, :], inverse)  # [.., C]
        return inverse.at[..., i, :].set(row)

    return jax.lax.fori_loop(1, c, substitute_row, eye)


def _unit_lower_inverse_fwd(lower):
    inverse = _unit_lower_inverse(lower)
    return inverse, inverse


def _unit_lower_inverse_bwd(inverse, cotangent):
    # T = A^-1 with A = I + L: dA = -T^T dT T^T; L is strictly lower, so only that part flows back.
    t_transpose = jnp.swapaxes(inverse, -1, -2)
    return (jnp.tril(-_einsum("...ij,...jk,...kl->...il", t_transpose, cotangent, t_transpose), -1),)


_unit_lower_inverse.defvjp(_unit_lower_inverse_fwd, _unit_lower_inverse_bwd)


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


def _intra_chunk(q, k, v, g, beta):
    """Everything that does not depend on the carried state, for all chunks at once.

    q, k [N, B, H, C, K], v [N, B, H, C, V], g, beta [N, B, H, C]. Returns
    u [.., C, V] and w [.., C, K] (the WY form: v_new = u - w S), q_decayed [.., C, K],
    attn [.., C, C] (causal, decayed q k^T), k_decayed [.., C, K] and chunk_decay [N, B, H].
    """
    c = g.shape[-1]
    g_cum = jnp.cumsum(g, axis=-1)  # [N, B, H, C], log decay from chunk start to position i
    causal = jnp.tril(jnp.ones((c, c), bool))  # [C, C]
    # Mask before exp: above the diagonal G_i - G_j > 0 could overflow.
    gamma = jnp.exp(jnp.where(causal, g_cum[..., :, None] - g_cum[..., None, :], -jnp.inf))  # [.., C, C]
    k_beta = k * beta[..., None]  # [.., C, K]
    strictly_lower = jnp.tril(_einsum("...ik,...jk->...ij", k_beta, k) * gamma, -1)  # L [.., C, C]
    inverse = _unit_lower_inverse(strictly_lower)  # (I + L)^-1 [.., C, C]
    u = _einsum("...ij,...jv->...iv", inverse, v * beta[..., None])  # [.., C, V]
    w = _einsum("...ij,...jk->...ik", inverse, k_beta * jnp.exp(g_cum)[..., None])  # [.., C, K]
    q_decayed = q * jnp.exp(g_cum)[..., None]  # [.., C, K]
    attn = _einsum("...ik,...jk->...ij", q, k) * gamma  # [.., C, C]
    k_decayed = k * jnp.exp(g_cum[..., -1:] - g_cum)[..., None]  # [.., C, K]
    chunk_decay = jnp.exp(g_cum[..., -1])  # [N, B, H]
    return u, w, q_decayed, attn, k_decayed, chunk_decay


def chunked_gated_delta_rule(q, k, v, g, beta, *, scale, initial_state=None, chunk_size=64):
    """Chunked (WY) form, same signature and result as `recurrent_gated_delta_rule`.

    T is zero-padded to a multiple of `chunk_size` with k = v = q = 0, g = 0, beta = 0, which
    leaves the state unchanged; the padded outputs are cropped.
    """
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    state = _initial_state(initial_state, b, h, dk, dv)  # [B, H, K, V]
    q = q.astype(jnp.float32) * scale
    chunks = [_to_chunks(x, chunk_size) for x in (q, k, v, g, beta)]
    per_chunk = _intra_chunk(*chunks)

    def step(state, chunk):
        u, w, q_decayed, attn, k_decayed, chunk_decay = chunk  # one chunk, leading N dropped
        v_new = u - _einsum("bhck,bhkv->bhcv", w, state)  # [B, H, C, V]
        o = _einsum("bhck,bhkv->bhcv", q_decayed, state) + _einsum("bhij,bhjv->bhiv", attn, v_new)
        state = state * chunk_decay[..., None, None] + _einsum("bhck,bhcv->bhkv", k_decayed, v_new)
        return state, o  # o [B, H, C, V]

    final_state, o = jax.lax.scan(step, state, per_chunk)  # o [N, B, H, C, V]
    return _from_chunks(o, t).astype(v.dtype), final_state
