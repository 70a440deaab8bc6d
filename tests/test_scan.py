"""The decoder stack scanned over its repeating block against the unrolled loop, HF transformers on
a scanned stack, and chunked full attention against the reference attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_reference import make_hf_model

from slimqwen_jax import hf
from slimqwen_jax.config import FULL_ATTENTION, tiny
from slimqwen_jax.layers import Calibration, causal_attention, chunked_causal_attention
from slimqwen_jax.model import Qwen3NextForCausalLM, repeat_period
from slimqwen_jax.testing import assert_relative_error, forward, random_tokens

F = FULL_ATTENTION


def test_repeat_period():
    assert repeat_period("abcdabcdab") == 4
    assert repeat_period("aaa") == 1
    assert repeat_period("abb") == 3
    assert repeat_period("ab") == 2
    assert repeat_period("") == 0


def step_outputs(model, input_ids):
    """Logits, router logits, gradients of all parameters, and what nnx.capture collects."""
    graphdef, params = nnx.split(model)

    @jax.jit
    def run(params):
        def loss(params):
            out, inter, calib = nnx.capture(nnx.merge(graphdef, params), nnx.Intermediate, Calibration)(input_ids)
            weights = jnp.cos(jnp.arange(out.logits.size, dtype=jnp.float32)).reshape(out.logits.shape)
            return jnp.sum(out.logits * weights) + out.aux_loss, (out, inter, calib)

        return jax.grad(loss, has_aux=True)(params)

    grads, (out, inter, calib) = run(params)
    return {
        "logits": out.logits,
        "router": out.router_logits,
        "aux": out.aux_loss,
        "grads": grads,
        "sown": (inter, calib),
    }


def test_scanned_stack_matches_unrolled_with_remainder_and_dense_layers():
    # Period 2 ([MoE, dense]), two scanned blocks and one layer unrolled after them. Full attention
    # only, to keep the compile short: linear attention in a scanned block is test_scanned_stack_matches_transformers.
    cfg = tiny(layer_types=(F,) * 5, num_hidden_layers=5, mlp_only_layers=(1, 3), num_mtp_layers=0, moe_backend="dense",
               scan_layers=True)  # fmt: skip
    ids = jnp.asarray(random_tokens(2, 12, cfg.vocab_size))
    scanned = step_outputs(Qwen3NextForCausalLM(cfg, rngs=nnx.Rngs(0)), ids)
    unrolled = step_outputs(Qwen3NextForCausalLM(cfg.replace(scan_layers=False), rngs=nnx.Rngs(0)), ids)
    assert len(scanned["router"]) == len(unrolled["router"]) == 3
    for name in ("logits", "router", "aux", "grads"):
        for (path, ours), reference in zip(
            jax.tree_util.tree_leaves_with_path(scanned[name]), jax.tree.leaves(unrolled[name]), strict=True
        ):
            assert_relative_error(ours, reference, 1e-5, f"{name} {jax.tree_util.keystr(path)}")
    # Routing metrics and calibration taps land in the layers they belong to, as unrolled.
    assert jax.tree.structure(scanned["sown"]) == jax.tree.structure(unrolled["sown"])
    for ours, reference in zip(jax.tree.leaves(scanned["sown"]), jax.tree.leaves(unrolled["sown"]), strict=True):
        np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-6)


def count_scans(cfg) -> int:
    model = Qwen3NextForCausalLM(cfg, rngs=nnx.Rngs(0))
    return str(jax.make_jaxpr(lambda ids: model(ids).logits)(jnp.zeros((1, 8), jnp.int32))).count("scan[")


def test_only_periodic_stacks_are_scanned():
    # Full attention only (no delta-rule scans): a scan in the program is the decoder stack's.
    periodic = tiny(layer_types=(F, F, F, F), num_hidden_layers=4, mlp_only_layers=(0, 2), num_mtp_layers=0,
                    scan_layers=True)  # fmt: skip
    non_periodic = periodic.replace(mlp_only_layers=(0,))
    assert count_scans(periodic) == 1
    assert count_scans(periodic.replace(scan_layers=False)) == 0
    assert count_scans(non_periodic) == 0


def test_scanned_stack_matches_transformers(tmp_path):
    """Eight layers of HF's default pattern (two scanned blocks of four); full attention chunked at 16
    of T = 40 queries."""
    hf_model = make_hf_model("gqa3_ratio3", num_hidden_layers=8)
    hf_model.save_pretrained(tmp_path)
    model = hf.load_model(tmp_path, scan_layers=True, attention_impl="chunked", attention_chunk_size=16)
    ids = random_tokens(2, 40, hf_model.config.vocab_size, seed=3)
    with torch.no_grad():
        expected = hf_model(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    assert count_scans(model.config) >= 1
    assert_relative_error(forward(model, jnp.asarray(ids)).logits, expected, 1e-4, "scanned logits vs HF")


@pytest.mark.parametrize(
    "seq_len, chunk_size, dtype, tolerance",
    [(40, 16, "float32", 1e-5), (24, 512, "float32", 1e-5), (40, 16, "bfloat16", 2e-2)],
    ids=["three-blocks-last-short", "one-block", "bfloat16"],
)
def test_chunked_attention_matches_reference_with_gradients(seq_len, chunk_size, dtype, tolerance):
    """GQA 6 heads on 2: the blockwise flash-style attention (its own backward) against autodiff of
    the plain softmax attention in float32, outputs and gradients."""
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((2, seq_len, 6, 8)), dtype)
    k, v = (jnp.asarray(rng.standard_normal((2, seq_len, 2, 8)), dtype) for _ in range(2))
    weights = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)

    def loss_and_grads(attention):
        loss = lambda q, k, v: jnp.sum(attention(q, k, v).astype(jnp.float32) * weights)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))

    as_float32 = [x.astype(jnp.float32) for x in (q, k, v)]
    reference = loss_and_grads(lambda q, k, v: causal_attention(q, k, v, 0.3))(*as_float32)
    chunked = loss_and_grads(lambda q, k, v: chunked_causal_attention(q, k, v, 0.3, chunk_size=chunk_size))(q, k, v)
    assert_relative_error(
        chunked_causal_attention(q, k, v, 0.3, chunk_size).astype(jnp.float32),
        causal_attention(*as_float32, 0.3),
        tolerance,
        "attention output",
    )
    (ours_loss, ours_grads), (ref_loss, ref_grads) = chunked, reference
    np.testing.assert_allclose(ours_loss, ref_loss, rtol=tolerance, atol=tolerance)
    for name, ours, expected in zip("qkv", ours_grads, ref_grads):
        assert ours.dtype == q.dtype
        assert_relative_error(ours.astype(jnp.float32), expected, tolerance, f"d{name}")
