"""Pallas gated delta rule: forward, gradients and decode step against the jnp recurrence; real
lowering for TPU (Mosaic) and GPU (Triton) at production shapes; the whole model on the kernel.

On CPU the kernels run in interpret mode (the default platform); on a GPU or TPU the same tests run
the compiled kernels. Interpret mode accepts code that real backends reject, hence the
cross-lowering tests. layout None is the platform's default ("grid" on CPU and TPU, "loop" on GPU);
a few cases pin "loop" so that both kernel layouts run in interpret mode.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_reference import make_hf_model
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.gated_delta_rule import gated_delta_rule, gated_delta_rule_step
from pallas_kernels.gated_delta_rule.kernel import KernelOptions
from slimqwen_jax import hf
from slimqwen_jax.testing import forward, gated_delta_rule_inputs, max_relative_error

FP32_TOL = 1e-5
STATIC = ("output_final_state", "implementation", "chunk_size", "use_qk_l2norm", "platform", "layout")
gdr = jax.jit(gated_delta_rule, static_argnames=STATIC)


def weights(inputs: dict, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random cotangents for o [B, T, Hv, Dv] and the final state [B, Hv, Dk, Dv]."""
    rng = np.random.default_rng(seed)
    b, t, hv, dv = inputs["v"].shape
    dk = inputs["q"].shape[-1]
    return rng.normal(size=(b, t, hv, dv)).astype(np.float32), rng.normal(size=(b, hv, dk, dv)).astype(np.float32)


def loss_grads(inputs: dict, o_weight, state_weight, **options) -> dict:
    """Gradients of sum(o * o_weight) + sum(final_state * state_weight) w.r.t. every input given."""
    inputs = {name: x for name, x in inputs.items() if x is not None}

    def loss(inputs):
        o, state = gated_delta_rule(**inputs, output_final_state=True, **options)
        return jnp.sum(o.astype(jnp.float32) * o_weight) + jnp.sum(state * state_weight)

    return jax.jit(jax.grad(loss))(inputs)


def to_bfloat16(inputs: dict) -> dict:
    """q, k, v, beta in bfloat16, as the model feeds them; g and the state stay float32."""
    cast = ("q", "k", "v", "beta")
    return {name: jnp.asarray(x, jnp.bfloat16) if name in cast else x for name, x in inputs.items()}


# Every T of the issue; 63 / 64 / 65 around the real chunk of 64; both group sizes and state options.
@pytest.mark.parametrize(
    "t, hk, hv, with_state, chunk_size, layout",
    [
        (1, 2, 4, True, 64, None),
        (63, 2, 2, False, 64, None),
        (64, 2, 4, True, 64, None),
        (65, 2, 2, True, 64, None),
        (65, 2, 4, False, 64, None),
        (200, 2, 4, True, 64, None),
        (200, 2, 2, False, 16, None),
        (65, 2, 4, True, 64, "loop"),
        (200, 2, 2, False, 16, "loop"),
    ],
    ids=lambda x: str(x),
)
def test_forward_matches_recurrence(t, hk, hv, with_state, chunk_size, layout):
    inputs = gated_delta_rule_inputs(t, t, hk, hv, with_state=with_state)
    o, state = gdr(**inputs, output_final_state=True, implementation="pallas", chunk_size=chunk_size, layout=layout)
    o_ref, state_ref = gdr(**inputs, output_final_state=True, implementation="recurrent")
    o_err, state_err = max_relative_error(o, o_ref), max_relative_error(state, state_ref)
    print(f"T={t} Hk={hk} Hv={hv} state={with_state} C={chunk_size} {layout}: o {o_err:.2e}, state {state_err:.2e}")
    assert o.shape == o_ref.shape and o.dtype == jnp.float32 and state.shape == state_ref.shape
    assert o_err <= FP32_TOL and state_err <= FP32_TOL


@pytest.mark.parametrize(
    "t, hk, hv, with_state, chunk_size, use_qk_l2norm, layout",
    [
        (1, 2, 4, True, 64, True, None),
        (65, 2, 4, True, 64, True, None),
        (40, 2, 2, False, 16, True, None),
        (40, 2, 4, True, 16, False, None),
        (65, 2, 4, True, 64, True, "loop"),
        (40, 2, 4, True, 16, False, "loop"),
    ],
    ids=lambda x: str(x),
)
def test_gradients_match_recurrence(t, hk, hv, with_state, chunk_size, use_qk_l2norm, layout):
    inputs = gated_delta_rule_inputs(100 + t, t, hk, hv, with_state=with_state)
    o_weight, state_weight = weights(inputs, seed=t)
    options = {"use_qk_l2norm": use_qk_l2norm}
    grads = loss_grads(
        inputs, o_weight, state_weight, implementation="pallas", chunk_size=chunk_size, layout=layout, **options
    )
    grads_ref = loss_grads(inputs, o_weight, state_weight, implementation="recurrent", **options)
    errors = {name: max_relative_error(grads[name], grads_ref[name]) for name in grads_ref}
    print(f"T={t} Hk={hk} Hv={hv} state={with_state} C={chunk_size} l2={use_qk_l2norm} {layout}: gradients", errors)
    assert set(errors) == {"q", "k", "v", "g", "beta"} | ({"initial_state"} if with_state else set())
    assert max(errors.values()) <= FP32_TOL, errors


def test_grid_layout_under_the_tpu_interpreter(monkeypatch):
    """The chunk-grid kernels under `pltpu.InterpretParams`: TPU grid semantics, uninitialised
    memory NaN-filled (so a state not carried in the scratch, or a final state written before the
    last chunk, would show) and race detection; forward and gradients against the recurrence."""
    call_settings = KernelOptions.call_settings

    def tpu_interpreter(options, grid):
        return {
            **call_settings(options, grid),
            "interpret": pltpu.InterpretParams(uninitialized_memory="nan", detect_races=True),
        }

    monkeypatch.setattr(KernelOptions, "call_settings", tpu_interpreter)
    inputs = gated_delta_rule_inputs(3, 40, 2, 4, with_state=True)
    o_weight, state_weight = weights(inputs, seed=1)
    options = {"chunk_size": 16, "platform": "cpu", "layout": "grid"}
    o, state = gated_delta_rule(**inputs, output_final_state=True, implementation="pallas", **options)
    o_ref, state_ref = gdr(**inputs, output_final_state=True, implementation="recurrent")
    grads = loss_grads(inputs, o_weight, state_weight, implementation="pallas", **options)
    grads_ref = loss_grads(inputs, o_weight, state_weight, implementation="recurrent")
    errors = {"o": max_relative_error(o, o_ref), "state": max_relative_error(state, state_ref)}
    errors |= {f"d{name}": max_relative_error(grads[name], grads_ref[name]) for name in grads_ref}
    print("grid layout, TPU interpreter:", errors)
    assert max(errors.values()) <= FP32_TOL, errors


def test_bfloat16_within_the_error_of_the_bfloat16_reference():
    """bfloat16 q, k, v, beta against the float32 recurrence on the unrounded inputs.

    Tolerance: the jnp chunked reference fed the same bfloat16 inputs is the yardstick. Both round
    the inputs to bfloat16 (relative 2^-9) and compute in float32, so the kernel may not be worse
    than that yardstick beyond float32 noise: error <= 1.1 * yardstick. The output, returned in
    bfloat16, carries one more rounding of 2^-9; the float32 final state and the gradients not.
    """
    inputs = gated_delta_rule_inputs(7, 65, 2, 4)
    bf16 = to_bfloat16(inputs)
    o_weight, state_weight = weights(inputs, seed=8)
    ref = gdr(**inputs, output_final_state=True, implementation="recurrent")
    kernel = gdr(**bf16, output_final_state=True, implementation="pallas")
    yardstick = gdr(**bf16, output_final_state=True, implementation="chunked")
    grads_ref = loss_grads(inputs, o_weight, state_weight, implementation="recurrent")
    grads_kernel = loss_grads(bf16, o_weight, state_weight, implementation="pallas")
    grads_yardstick = loss_grads(bf16, o_weight, state_weight, implementation="chunked")
    assert kernel[0].dtype == jnp.bfloat16
    pairs = {"o": (kernel[0], yardstick[0], ref[0]), "final_state": (kernel[1], yardstick[1], ref[1])}
    pairs |= {f"d{name}": (grads_kernel[name], grads_yardstick[name], grads_ref[name]) for name in grads_ref}
    for name, (ours, theirs, exact) in pairs.items():
        error, allowed = max_relative_error(ours, exact), 1.1 * max_relative_error(theirs, exact)
        print(f"bfloat16 {name}: kernel {error:.2e}, jnp chunked reference {allowed / 1.1:.2e}")
        assert error <= allowed, name


def test_decode_steps_match_recurrence():
    """Five decode steps chained through the state equal the recurrence over the five tokens."""
    inputs = gated_delta_rule_inputs(9, 5, 2, 4)
    step = jax.jit(gated_delta_rule_step, static_argnames=("implementation",))
    state, outputs = inputs["initial_state"], []
    for t in range(5):
        token = {name: inputs[name][:, t] for name in ("q", "k", "v", "g", "beta")}
        o, state = step(**token, state=state)
        outputs.append(o)
    o_ref, state_ref = gdr(**inputs, output_final_state=True, implementation="recurrent")
    o_err, state_err = max_relative_error(jnp.stack(outputs, axis=1), o_ref), max_relative_error(state, state_ref)
    token = {name: inputs[name][:, 0] for name in ("q", "k", "v", "g", "beta")}
    o_jnp, _ = step(**token, state=inputs["initial_state"], implementation="recurrent")
    print(f"decode: o {o_err:.2e}, state {state_err:.2e}")
    assert o_err <= FP32_TOL and state_err <= FP32_TOL
    assert max_relative_error(outputs[0], o_jnp) <= FP32_TOL


# Production shapes of Qwen3-Next-80B: Dk = Dv = 128, Hk = 16, Hv = 32, chunk 64, bfloat16;
# T = 1000 is not a multiple of the chunk. Only traced and lowered, never run.
def production_shapes(t: int) -> tuple[jax.ShapeDtypeStruct, ...]:
    b, hk, hv, d = 1, 16, 32, 128
    bf16, f32 = jnp.bfloat16, jnp.float32
    lead = (b, t) if t else (b,)
    return (
        jax.ShapeDtypeStruct((*lead, hk, d), bf16),  # q
        jax.ShapeDtypeStruct((*lead, hk, d), bf16),  # k
        jax.ShapeDtypeStruct((*lead, hv, d), bf16),  # v
        jax.ShapeDtypeStruct((*lead, hv), f32),  # g
        jax.ShapeDtypeStruct((*lead, hv), bf16),  # beta
        jax.ShapeDtypeStruct((b, hv, d, d), f32),  # state
    )


def assert_lowers(platform: str, marker: str, layout: str, t: int) -> None:
    """Forward, forward+backward and decode step lower for `platform` ("tpu" or "gpu") to the `layout`
    kernels, each lowered program holding at least its number of `marker` custom calls."""

    def forward(q, k, v, g, beta, state):
        return gated_delta_rule(
            q, k, v, g, beta, initial_state=state, output_final_state=True, implementation="pallas", platform=platform
        )

    def loss(*args):
        o, state = forward(*args)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(state)

    # value_and_grad: under plain grad the primal forward kernel is dead code and dropped.

    def decode(*args):
        return gated_delta_rule_step(*args, platform=platform)

    lowering_platform = {"tpu": "tpu", "gpu": "cuda"}[platform]
    other = {"grid": "loop", "loop": "grid"}[layout]
    for fn, args, kernels, names in (
        (forward, production_shapes(t), 1, ("_forward",)),
        # forward, recompute, backward
        (jax.value_and_grad(loss, argnums=range(6)), production_shapes(t), 3, ("_forward", "_backward")),
        (decode, production_shapes(0), 1, ()),
    ):
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=(lowering_platform,)).as_text()
        assert text.count(marker) >= kernels, (fn, text.count(marker))
        assert all(f"{name}_{layout}_kernel" in text for name in names), (fn, names)
        assert f"_{other}_kernel" not in text, fn


# TPU lowers the chunk-grid kernels (on-chip memory independent of T, hence T = 8192 too), GPU the
# loop kernels; the kernel names in the lowered text tell which.
@pytest.mark.parametrize(
    "platform, marker, layout, t",
    [
        ("tpu", "tpu_custom_call", "grid", 1000),
        ("tpu", "tpu_custom_call", "grid", 8192),
        ("gpu", "xla.gpu.triton", "loop", 1000),
    ],
)
def test_cross_lowering_at_production_shapes(platform, marker, layout, t):
    assert_lowers(platform, marker, layout, t)


@pytest.mark.parametrize(
    "platform, marker, layout", [("tpu", "tpu_custom_call", "grid"), ("gpu", "xla.gpu.triton", "loop")]
)
def test_cross_lowering_with_x64(platform, marker, layout):
    """Under jax_enable_x64 a Python int in an index map becomes int64 against the int32 grid
    indices; both layouts' index maps and the decode step's must still trace and lower."""
    with jax.enable_x64(True):
        assert_lowers(platform, marker, layout, 64)
    assert not jax.config.jax_enable_x64


def test_model_logits_with_pallas_equal_chunked(tmp_path):
    make_hf_model("gqa2_ratio2").save_pretrained(tmp_path)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 97, (2, 40)))
    logits = {
        impl: forward(hf.load_model(tmp_path, gated_delta_rule_impl=impl), ids).logits for impl in ("chunked", "pallas")
    }
    error = max_relative_error(logits["pallas"], logits["chunked"])
    print(f"model logits, pallas vs chunked: max relative error {error:.2e}")
    assert error <= FP32_TOL


@pytest.mark.parametrize(
    "options, message",
    [
        ({"chunk_size": 48}, "power of two"),
        ({"platform": "metal"}, "platform must be"),
        ({"layout": "tiles"}, "layout must be"),
    ],
)
def test_bad_kernel_options_raise(options, message):
    with pytest.raises(ValueError, match=message):
        KernelOptions(**options)


def test_grid_layout_refused_on_gpu():
    """GPU grid programs run in parallel: a state carried along a chunk grid axis would be wrong."""
    with pytest.raises(ValueError, match="sequential grid steps"):
        KernelOptions(platform="gpu", layout="grid").resolved()


def test_head_dims_padded_to_the_tpu_lanes_match_recurrence(monkeypatch):
    """The TPU path zero-pads Dk = 16 and Dv = 32 to 128 lanes inside the op (Mosaic cannot tile
    them); forced here under the interpreter, forward and gradients still match the recurrence and
    the unpadded kernel."""
    inputs = gated_delta_rule_inputs(11, 40, 2, 4, with_state=True)
    o_weight, state_weight = weights(inputs, seed=11)
    options = {"implementation": "pallas", "chunk_size": 16}
    unpadded = loss_grads(inputs, o_weight, state_weight, **options)
    monkeypatch.setattr(KernelOptions, "head_dim_multiple", lambda self: 128)
    o, state = gated_delta_rule(**inputs, output_final_state=True, **options)
    padded = loss_grads(inputs, o_weight, state_weight, **options)
    o_ref, state_ref = gdr(**inputs, output_final_state=True, implementation="recurrent")
    grads_ref = loss_grads(inputs, o_weight, state_weight, implementation="recurrent")
    assert o.shape == o_ref.shape and state.shape == state_ref.shape
    errors = {"o": max_relative_error(o, o_ref), "state": max_relative_error(state, state_ref)}
    errors |= {f"d{name}": max_relative_error(padded[name], grads_ref[name]) for name in grads_ref}
    errors |= {f"d{name} vs unpadded": max_relative_error(padded[name], unpadded[name]) for name in grads_ref}
    print("head dims padded to 128:", errors)
    assert max(errors.values()) <= FP32_TOL, errors
