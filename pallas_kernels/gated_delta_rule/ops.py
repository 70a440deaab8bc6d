"""Public entry point of the gated delta rule: input checks, q/k L2 norm and scale, head repeat,
then dispatch to an implementation (the jnp reference forms today; the Pallas kernel later).

Shape letters: B batch, T tokens, Hk key heads, Hv value heads, Dk / Dv key / value head dims.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.gated_delta_rule.reference import (
    chunked_gated_delta_rule,
    recurrent_gated_delta_rule,
)

IMPLEMENTATIONS = {
    "chunked": chunked_gated_delta_rule,
    "recurrent": recurrent_gated_delta_rule,
}


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
    """x * rsqrt(sum(x^2) + 1e-6) over the head dim, the FLA / HF definition (eps inside the sum)."""
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-6)


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
      implementation: "chunked" (default) or "recurrent".

    Returns:
      (o [B, T, Hv, Dv] in v's dtype, final state or None).
    """
    _check_inputs(q, k, v, g, beta, initial_state, implementation)
    # Upcast before the L2 norm, as HF transformers 5.x and FLA do (HF 4.57 normalised in the input
    # dtype first; identical for float32 inputs, differs only in bf16 rounding).
    q, k = q.astype(jnp.float32), k.astype(jnp.float32)  # [B, T, Hk, Dk]
    if use_qk_l2norm:
        q, k = _l2norm(q), _l2norm(k)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    group = v.shape[2] // q.shape[2]
    q, k = jnp.repeat(q, group, axis=2), jnp.repeat(k, group, axis=2)  # [B, T, Hv, Dk]
    o, final_state = IMPLEMENTATIONS[implementation](q, k, v, g, beta, scale=scale, initial_state=initial_state)
    return o, final_state if output_final_state else None
