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
from slimqwen_jax.testing import gated_delta_rule_inputs, max_relative_error

B, DK, DV = 2, 16, 32  # the shapes of gated_delta_rule_inputs
FP32_TOL = 1e-5
GRAD_TOL = 1e-4

gdr = jax.jit(gated_delta_rule, static_argnames=("output_final_state", "implementation"))


def normalised_inputs(seed: int, t: int, h: int) -> dict[str, np.ndarray]:
    """Inputs of the reference functions: q, k already L2-normalised, Hk = Hv = h."""
    inputs = gated_delta_rule_inputs(seed, t, h, h)
    for name in ("q", "k"):
        x = inputs[name]
        inputs[name] = x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + 1e-6)
    return inputs


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
    inputs = gated_delta_rule_inputs(t, t, hk, hv, with_state=with_state)
    o_chunk, s_chunk = gdr(**inputs, output_final_state=True, implementation="chunked")
    o_rec, s_rec = gdr(**inputs, output_final_state=True, implementation="recurrent")
    assert o_chunk.shape == (B, t, hv, DV) and s_chunk.shape == (B, hv, DK, DV)
    assert max_relative_error(o_chunk, o_rec) <= FP32_TOL
    assert max_relative_error(s_chunk, s_rec) <= FP32_TOL


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
    assert max_relative_error(o, o_ref) <= FP32_TOL
    assert max_relative_error(state, state_ref) <= FP32_TOL


@pytest.mark.parametrize(
    "implementation, hf_name",
    [("chunked", "torch_chunk_gated_delta_rule"), ("recurrent", "torch_recurrent_gated_delta_rule")],
)
def test_ops_matches_hf(implementation, hf_name):
    torch = pytest.importorskip("torch")
    hf = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
    inputs = gated_delta_rule_inputs(seed=1, t=65, hk=2, hv=4)
    o, state = gdr(**inputs, output_final_state=True, implementation=implementation)
    # HF receives the un-repeated q/k, as the HF model passes them; it repeat_interleaves inside.
    q, k, v, g, beta, state0 = (torch.from_numpy(x) for x in inputs.values())
    o_hf, state_hf = getattr(hf, hf_name)(
        q, k, v, g, beta, initial_state=state0, output_final_state=True, use_qk_l2norm_in_kernel=True
    )
    assert max_relative_error(o, o_hf.numpy()) <= FP32_TOL
    assert max_relative_error(state, state_hf.numpy()) <= FP32_TOL


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
        assert max_relative_error(grads_chunked[name], grads_recurrent[name]) <= GRAD_TOL, name


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
    inputs = gated_delta_rule_inputs(seed=4, t=3, hk=2, hv=4)  # good inputs: [B, 3, 2, Dk] q/k, 4 value heads
    inputs.update({name: None if shape is None else np.zeros(shape, np.float32) for name, shape in changes.items()})
    with pytest.raises(ValueError, match=message):
        gated_delta_rule(**inputs, implementation=implementation)
