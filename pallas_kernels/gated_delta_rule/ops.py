"""Public entry points of the gated delta rule: input checks, then dispatch to an implementation.

"pallas" runs the kernels of `kernel.py` (interpreted on CPU) under a `jax.custom_vjp` whose
backward is also Pallas, T padded to the chunk and, on TPU, the head dims zero-padded to the 128
lanes Mosaic tiles by (exact; so the tiny test models' heads of 16 / 32 compile for TPU too); "chunked" and "recurrent" are the jnp references, for which q/k L2 norm,
scale and head repeat happen here. `gated_delta_rule_step` is the one-token decode step.

Shape letters: B batch, T tokens, Hk key heads, Hv value heads, Dk / Dv key / value head dims.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.gated_delta_rule import kernel
from pallas_kernels.gated_delta_rule.kernel import KernelOptions
from pallas_kernels.gated_delta_rule.reference import (
    chunked_gated_delta_rule,
    recurrent_gated_delta_rule,
)

REFERENCES = {"chunked": chunked_gated_delta_rule, "recurrent": recurrent_gated_delta_rule}
IMPLEMENTATIONS = (*REFERENCES, "pallas")


def _check_inputs(q, k, v, g, beta, initial_state, implementation: str) -> None:
    """Raise ValueError naming the offending argument when shapes or options do not fit."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {sorted(IMPLEMENTATIONS)}, got {implementation!r}")
    if q.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q and v must be [B, T, H, D], got q {q.shape} and v {v.shape}")
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape {q.shape}, got {k.shape}")
    b, t, hk, dk = q.shape
    hv, dv = v.shape[2:]
    if v.shape[:2] != (b, t):
        raise ValueError(f"v must be [B={b}, T={t}, Hv, Dv] like q, got {v.shape}")
    if hv % hk:
        raise ValueError(f"value heads ({hv}) must be a multiple of key heads ({hk})")
    for name, x in (("g", g), ("beta", beta)):
        if x.shape != (b, t, hv):
            raise ValueError(f"{name} must be [B, T, Hv] = {(b, t, hv)}, got {x.shape}")
    if initial_state is not None and initial_state.shape != (b, hv, dk, dv):
        raise ValueError(f"initial_state must be [B, Hv, Dk, Dv] = {(b, hv, dk, dv)}, got {initial_state.shape}")


def _l2norm(x: jax.Array) -> jax.Array:
    """x * rsqrt(sum(x^2) + 1e-6) over the head dim, the FLA / HF definition (eps inside the sum).

    Both products as exact dots, so that their transposes in the backward are dots too: XLA:CPU
    turns a multiply-and-reduce into a much slower fused reduction."""
    squares = jnp.einsum("...d,...d->...", x, x, precision=jax.lax.Precision.HIGHEST)
    return jnp.einsum("...d,...->...d", x, jax.lax.rsqrt(squares + 1e-6), precision=jax.lax.Precision.HIGHEST)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _pallas_chunked(q, k, v, g_cum, beta, initial_state, scale, use_qk_l2norm, options):
    """The kernels on a padded sequence: (o [B, Tp, Hv, Dv], final state [B, Hv, Dk, Dv])."""
    return kernel.chunk_forward(
        q, k, v, g_cum, beta, initial_state, scale=scale, use_qk_l2norm=use_qk_l2norm, options=options
    )


def _pallas_chunked_fwd(q, k, v, g_cum, beta, initial_state, scale, use_qk_l2norm, options):
    outputs = _pallas_chunked(q, k, v, g_cum, beta, initial_state, scale, use_qk_l2norm, options)
    return outputs, (q, k, v, g_cum, beta, initial_state)


def _pallas_chunked_bwd(scale, use_qk_l2norm, options, residuals, cotangents):
    # Recompute the state entering each chunk rather than keep [B, Hv, N, Dk, Dv] alive from the
    # forward pass: one more forward kernel in exchange for activation memory.
    settings = {"scale": scale, "use_qk_l2norm": use_qk_l2norm, "options": options}
    _, _, chunk_states = kernel.chunk_forward(*residuals, **settings, output_chunk_states=True)
    q, k, v, g_cum, beta, _ = residuals
    d_o, d_final_state = cotangents
    return kernel.chunk_backward(q, k, v, g_cum, beta, chunk_states, d_o, d_final_state, **settings)


_pallas_chunked.defvjp(_pallas_chunked_fwd, _pallas_chunked_bwd)


def _pad_axes(x: jax.Array, sizes: dict[int, int]) -> jax.Array:
    """Zero-pad axis a of x at the end up to length sizes[a]."""
    widths = [(0, sizes.get(axis, n) - n) for axis, n in enumerate(x.shape)]
    return jnp.pad(x, widths)


def _pallas_gated_delta_rule(q, k, v, g, beta, *, scale, initial_state, use_qk_l2norm, options):
    """Pad T to a multiple of the chunk (g = beta = 0 there keeps the state) and the head dims to
    `options.head_dim_multiple()`, take the chunk-local cumulative log decay in jnp, run the kernels
    and crop.

    Zero head-dim padding is exact: zero q / k entries leave the L2 norms and every q k^T, k S
    product unchanged, and the state rows / columns of zero k / v entries stay zero, so the real
    entries of o, the state and the gradients are those of the unpadded problem (`scale` is taken
    from the unpadded Dk by the caller)."""
    b, t, _, dk = q.shape
    hv, dv = v.shape[2:]
    c = options.chunk_size
    tp = -(-t // c) * c
    m = options.head_dim_multiple()
    dkp, dvp = -(-dk // m) * m, -(-dv // m) * m

    g_cum = jnp.cumsum(_pad_axes(g.astype(jnp.float32), {1: tp}).reshape(b, tp // c, c, hv), axis=2)
    if initial_state is None:
        initial_state = jnp.zeros((b, hv, dk, dv), jnp.float32)  # [B, Hv, Dk, Dv]
    o, final_state = _pallas_chunked(
        _pad_axes(q, {1: tp, 3: dkp}),  # [B, Tp, Hk, Dkp]
        _pad_axes(k, {1: tp, 3: dkp}),
        _pad_axes(v, {1: tp, 3: dvp}),  # [B, Tp, Hv, Dvp]
        g_cum.reshape(b, tp, hv),  # [B, Tp, Hv]
        _pad_axes(beta.astype(jnp.float32), {1: tp}),  # [B, Tp, Hv]
        _pad_axes(initial_state.astype(jnp.float32), {2: dkp, 3: dvp}),  # [B, Hv, Dkp, Dvp]
        scale,
        use_qk_l2norm,
        options,
    )
    return o[:, :t, :, :dv], final_state[:, :, :dk, :dv]


def gated_delta_rule(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    *,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    output_final_state: bool = False,
    use_qk_l2norm: bool = True,
    implementation: str = "chunked",
    chunk_size: int = 64,
    platform: str | None = None,
    layout: str | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """Gated delta rule over a whole sequence (see `reference.py` for the recurrence).

    Args:
      q, k: [B, T, Hk, Dk]; value head j reads key head j // (Hv / Hk).
      v: [B, T, Hv, Dv].
      g: [B, T, Hv], log of the per-token state decay (<= 0).
      beta: [B, T, Hv], delta-rule write strength in (0, 1).
      scale: multiplies q after the L2 norm; default Dk ** -0.5.
      initial_state: [B, Hv, Dk, Dv]; default zeros. Computed in float32.
      output_final_state: return the final state [B, Hv, Dk, Dv] float32, else None.
      use_qk_l2norm: L2-normalise q and k per head first.
      implementation: "chunked" (default, jnp), "recurrent" (jnp `lax.scan`) or "pallas".
      chunk_size: chunk length of "chunked" and "pallas", a power of two for "pallas".
      platform: "pallas" only: "tpu" or "gpu" compiles for that backend, "cpu" interprets;
        None means the default backend.
      layout: "pallas" only: "grid" (a chunk grid axis, on-chip memory independent of T; TPU and
        the interpreter) or "loop" (chunks looped inside the kernel; GPU); None picks by platform.

    Returns:
      (o [B, T, Hv, Dv] in v's dtype, final state or None).
    """
    _check_inputs(q, k, v, g, beta, initial_state, implementation)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if implementation == "pallas":
        options = KernelOptions(chunk_size=chunk_size, platform=platform, layout=layout)
        o, final_state = _pallas_gated_delta_rule(
            q, k, v, g, beta, scale=scale, initial_state=initial_state, use_qk_l2norm=use_qk_l2norm, options=options
        )
        return o, final_state if output_final_state else None
    # Upcast before the L2 norm, as HF transformers 5.x and FLA do (HF 4.57 normalised in the input
    # dtype first; identical for float32 inputs, differs only in bf16 rounding).
    q, k = q.astype(jnp.float32), k.astype(jnp.float32)  # [B, T, Hk, Dk]
    if use_qk_l2norm:
        q, k = _l2norm(q), _l2norm(k)
    group = v.shape[2] // q.shape[2]
    q, k = jnp.repeat(q, group, axis=2), jnp.repeat(k, group, axis=2)  # [B, T, Hv, Dk]
    reference = REFERENCES[implementation]
    if implementation == "chunked":
        reference = functools.partial(reference, chunk_size=chunk_size)
    o, final_state = reference(q, k, v, g, beta, scale=scale, initial_state=initial_state)
    return o, final_state if output_final_state else None


def gated_delta_rule_step(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    state: jax.Array,
    *,
    scale: float | None = None,
    use_qk_l2norm: bool = True,
    implementation: str = "pallas",
    platform: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """One decode token: the recurrence applied once to `state`.

    Args:
      q, k: [B, Hk, Dk]; v: [B, Hv, Dv]; g, beta: [B, Hv]; state: [B, Hv, Dk, Dv].
      scale, use_qk_l2norm, platform: as in `gated_delta_rule`.
      implementation: "pallas" (default) or "recurrent" (the jnp reference on one token).

    Returns:
      (o [B, Hv, Dv] in v's dtype, new state [B, Hv, Dk, Dv] float32).
    """
    if implementation not in ("pallas", "recurrent"):
        raise ValueError(f"implementation must be 'pallas' or 'recurrent', got {implementation!r}")
    token = [x[:, None] for x in (q, k, v, g, beta)]  # one-token sequences [B, 1, ...]
    _check_inputs(*token, state, implementation)
    if implementation == "recurrent":
        o, new_state = gated_delta_rule(
            *token, scale=scale, initial_state=state, output_final_state=True, use_qk_l2norm=use_qk_l2norm,
            implementation="recurrent",
        )  # fmt: skip
        return o[:, 0], new_state
    if scale is None:
        scale = q.shape[-1] ** -0.5
    options = KernelOptions(platform=platform)
    return kernel.decode_step(q, k, v, g, beta, state, scale=scale, use_qk_l2norm=use_qk_l2norm, options=options)
