"""Gated delta rule references: chunked == recurrent == float64 loop == HF torch, values and grads."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.gated_delta_rule import gated_delta_rule
from pallas_kernels.gated_delta_rule.reference import (
    chunked_gated_delta_rule,
    recurrent_gated_delta_rule,
)

B, DK, DV = 2, 16, 32  # Dk != Dv so that a swapped state layout cannot pass
FP32_TOL = 1e-5
GRAD_TOL = 1e-4

gdr = jax.jit(gated_delta_rule, static_argnames=("output_final_state", "implementation"))


def make_inputs(seed: int, t: int, hk: int, hv: int, *, with_state: bool = True) -> dict[str, np.ndarray]:
    """Seeded float32 inputs of the ops entry point, with Qwen3-Next style gates.

    g = -exp(A_log) * softplus(a + dt_bias) with A = exp(A_log) ~ U(1, 16) per head and dt_bias the
    Mamba init log(expm1(dt)), dt ~ logU(1e-3, 1e-1): per-token decays from ~0.98 down to ~0.2.
    """
    rng = np.random.default_rng(seed)
    a_log = np.log(rng.uniform(1.0, 16.0, hv))  # [Hv]
    dt_bias = np.log(np.expm1(np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), hv))))  # [Hv]
    a = rng.normal(size=(B, t, hv))  # [B, T, Hv]
    inputs = {
        "q": rng.normal(size=(B, t, hk, DK)),  # [B, T, Hk, Dk]
        "k": rng.normal(size=(B, t, hk, DK)),  # [B, T, Hk, Dk]
        "v": rng.normal(size=(B, t, hv, DV)),  # [B, T, Hv, Dv]
        "g": -np.exp(a_log) * np.logaddexp(0.0, a + dt_bias),  # [B, T, Hv]
        "beta": 1.0 / (1.0 + np.exp(-rng.normal(size=(B, t, hv)))),  # [B, T, Hv]
        "initial_state": rng.normal(size=(B, hv, DK, DV)) if with_state else None,  # [B, Hv, Dk, Dv]
    }
    return {name: None if x is None else x.astype(np.float32) for name, x in inputs.items()}


def normalised_inputs(seed: int, t: int, h: int) -> dict[str, np.ndarray]:
    """Inputs of the reference functions: q, k already L2-normalised, Hk = Hv = h."""
    inputs = make_inputs(seed, t, h, h)
    for name in ("q", "k"):
        x = inputs[name]
        inputs[name] = x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + 1e-6)
    return inputs


def rel_err(x, ref) -> float:
    """max |x - ref| / max |ref|."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(x - ref)) / np.max(np.abs(ref)))


# A covering set rather than the full product: every jitted shape costs ~1 s of CPU compile.
# Every T appears; 65 and 200 (padding, several chunks) with both group sizes and state options.
@pytest.mark.parametrize(
    "t, hk, hv, with_state",
    [
        (1, 2, 4, True),
        (63, 2, 2, False),
        (64, 2, 4, True),
        (65, 2, 2, True),
        (65, 2, 4, False),
        (200, 2, 4, True),
        (200, 2, 2, False),
    ],
    ids=lambda x: str(x),
)
def test_chunked_matches_recurrent(t, hk, hv, with_state):
    inputs = make_inputs(t, t, hk, hv, with_state=with_state)
    o_chunk, s_chunk = gdr(**inputs, output_final_state=True, implementation="chunked")
    o_rec, s_rec = gdr(**inputs, output_final_state=True, implementation="recurrent")
    assert o_chunk.shape == (B, t, hv, DV) and s_chunk.shape == (B, hv, DK, DV)
    assert rel_err(o_chunk, o_rec) <= FP32_TOL
    assert rel_err(s_chunk, s_rec) <= FP32_TOL


def float64_loop(q, k, v, g, beta, initial_state, scale):
    """The recurrence token by token in numpy float64, written from the one-line semantics."""
    b, t, h, _ = q.shape
    state = initial_state.astype(np.float64).copy()  # [B, H, Dk, Dv]
    o = np.zeros(v.shape, np.float64)  # [B, T, H, Dv]
    for bi in range(b):
        for hi in range(h):
            s = state[bi, hi]  # [Dk, Dv]
            for ti in range(t):
                q_t, k_t, v_t = (x[bi, ti, hi].astype(np.float64) for x in (q, k, v))
                s = np.exp(g[bi, ti, hi]) * s
                delta = beta[bi, ti, hi] * (v_t - s.T @ k_t)
                s = s + np.outer(k_t, delta)
                o[bi, ti, hi] = s.T @ (scale * q_t)
            state[bi, hi] = s
    return o, state


def test_recurrent_matches_float64_loop():
    inputs = normalised_inputs(seed=0, t=20, h=2)
    scale = DK**-0.5
    o, state = recurrent_gated_delta_rule(**inputs, scale=scale)
    o_ref, state_ref = float64_loop(**inputs, scale=scale)
    assert rel_err(o, o_ref) <= FP32_TOL
    assert rel_err(state, state_ref) <= FP32_TOL


@pytest.mark.parametrize(
    "implementation, hf_name",
    [("chunked", "torch_chunk_gated_delta_rule"), ("recurrent", "torch_recurrent_gated_delta_rule")],
)
def test_ops_matches_hf(implementation, hf_name):
    torch = pytest.importorskip("torch")
    hf = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
    inputs = make_inputs(seed=1, t=65, hk=2, hv=4)
    o, state = gdr(**inputs, output_final_state=True, implementation=implementation)
    # HF receives the un-repeated q/k, as the HF model passes them; it repeat_interleaves inside.
    q, k, v, g, beta, state0 = (torch.from_numpy(x) for x in inputs.values())
    o_hf, state_hf = getattr(hf, hf_name)(
        q, k, v, g, beta, initial_state=state0, output_final_state=True, use_qk_l2norm_in_kernel=True
    )
    assert rel_err(o, o_hf.numpy()) <= FP32_TOL
    assert rel_err(state, state_hf.numpy()) <= FP32_TOL


def test_chunked_grads_match_recurrent():
    inputs = normalised_inputs(seed=2, t=70, h=2)  # two chunks, the second one padded
    rng = np.random.default_rng(3)
    o_weight = rng.normal(size=(B, 70, 2, DV)).astype(np.float32)  # [B, T, H, Dv]
    state_weight = rng.normal(size=(B, 2, DK, DV)).astype(np.float32)  # [B, H, Dk, Dv]

    def grads(fn):
        def functional(inputs):
            o, state = fn(**inputs, scale=DK**-0.5)
            return jnp.sum(o * o_weight) + jnp.sum(state * state_weight)

        return jax.jit(jax.grad(functional))(inputs)

    grads_chunked, grads_recurrent = grads(chunked_gated_delta_rule), grads(recurrent_gated_delta_rule)
    for name in inputs:
        assert rel_err(grads_chunked[name], grads_recurrent[name]) <= GRAD_TOL, name


@pytest.mark.parametrize(
    "changes, implementation, message",
    [
        (dict(v=(B, 3, 3, DV), g=(B, 3, 3), beta=(B, 3, 3), initial_state=None), "chunked", "multiple of key heads"),
        (dict(k=(B, 3, 2, DK + 1)), "chunked", "k must have q's shape"),
        (dict(v=(B, 4, 4, DV)), "chunked", "v must be"),
        (dict(g=(B, 3, 2)), "chunked", "g must be"),
        (dict(beta=(B, 3)), "recurrent", "beta must be"),
        (dict(initial_state=(B, 4, DV, DK)), "chunked", "initial_state must be"),
        (dict(), "pallas_someday", "implementation must be one of"),
    ],
    ids=["heads", "k_shape", "v_shape", "g_shape", "beta_shape", "state_shape", "implementation"],
)
def test_bad_inputs_raise(changes, implementation, message):
    """`changes` maps an argument to the wrong shape it gets (or to None)."""
    inputs = make_inputs(seed=4, t=3, hk=2, hv=4)  # good inputs: [B, 3, 2, Dk] q/k, 4 value heads
    inputs.update({name: None if shape is None else np.zeros(shape, np.float32) for name, shape in changes.items()})
    with pytest.raises(ValueError, match=message):
        gated_delta_rule(**inputs, implementation=implementation)
