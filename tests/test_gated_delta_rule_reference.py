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


def float64_recurrence(q, k, v, g, beta, initial_state, scale):
    """The recurrence token by token in jnp float64 (call under `jax.enable_x64`), written from the
    one-line semantics; differentiable, so it also gives float64 gradients."""

    def step(state, inputs):  # state [B, H, Dk, Dv]
        q_t, k_t, v_t, g_t, beta_t = inputs  # [B, H, Dk], [B, H, Dk], [B, H, Dv], [B, H], [B, H]
        state = jnp.exp(g_t)[..., None, None] * state
        delta = beta_t[..., None] * (v_t - jnp.einsum("bhkv,bhk->bhv", state, k_t))
        state = state + jnp.einsum("bhk,bhv->bhkv", k_t, delta)
        return state, jnp.einsum("bhkv,bhk->bhv", state, scale * q_t)

    time_major = [jnp.moveaxis(x, 1, 0) for x in (q, k, v, g, beta)]
    state, o = jax.lax.scan(step, initial_state, time_major)
    return jnp.moveaxis(o, 0, 1), state  # o [B, T, H, Dv]


def to_float64(inputs: dict) -> dict:
    return {name: jnp.asarray(x, jnp.float64) for name, x in inputs.items()}


def test_recurrent_matches_float64():
    inputs = normalised_inputs(seed=0, t=20, h=2)
    scale = DK**-0.5
    o, state = recurrent_gated_delta_rule(**inputs, scale=scale)
    with jax.enable_x64(True):
        o_ref, state_ref = float64_recurrence(**to_float64(inputs), scale=scale)
    assert max_relative_error(o, o_ref) <= FP32_TOL
    assert max_relative_error(state, state_ref) <= FP32_TOL


def test_chunked_values_and_grads_match_float64():
    """The chunked form's hand-derived backward against float64 autodiff of the recurrence: every
    input's gradient of sum(o * w_o) + sum(final state * w_s), two chunks, the second one padded."""
    inputs = normalised_inputs(seed=2, t=70, h=2)
    rng = np.random.default_rng(3)
    o_weight = rng.normal(size=(B, 70, 2, DV))  # [B, T, H, Dv]
    state_weight = rng.normal(size=(B, 2, DK, DV))  # [B, H, Dk, Dv]

    def value_and_grads(fn, inputs):
        def functional(inputs):
            o, state = fn(**inputs, scale=DK**-0.5)
            return jnp.sum(o * o_weight) + jnp.sum(state * state_weight), (o, state)

        return jax.jit(jax.grad(functional, has_aux=True))(inputs)

    grads, (o, state) = value_and_grads(chunked_gated_delta_rule, inputs)
    with jax.enable_x64(True):
        grads_ref, (o_ref, state_ref) = value_and_grads(float64_recurrence, to_float64(inputs))
    errors = {"o": max_relative_error(o, o_ref), "state": max_relative_error(state, state_ref)}
    errors |= {f"d{name}": max_relative_error(grads[name], grads_ref[name]) for name in inputs}
    print("chunked vs float64 recurrence:", errors)
    assert max(errors.values()) <= FP32_TOL, errors


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
