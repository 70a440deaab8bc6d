"""Layer-by-layer parity with HF transformers: norms, attention, linear attention, MoE, one layer.

Each test feeds the same random hidden states to one HF submodule and to ours (weights loaded
through `slimqwen_jax.hf.load_model`), so a whole-model mismatch can be pinned to a layer.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_reference import causal_mask, make_hf_model

from slimqwen_jax import hf
from slimqwen_jax.moe import swiglu_experts_dense, swiglu_experts_ragged
from slimqwen_jax.testing import max_relative_error

B, T = 2, 70  # T > 64 and not a multiple of it: two chunks in linear attention
TOL = 1e-5


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(HF model, its directory) for the Hv/Hk = 2, GQA 2 config."""
    hf_model = make_hf_model("gqa2_ratio2")
    directory = tmp_path_factory.mktemp("layers")
    hf_model.save_pretrained(directory)
    return hf_model, directory


@pytest.fixture(scope="module")
def models(checkpoint):
    """(HF model, our model)."""
    hf_model, directory = checkpoint
    return hf_model, hf.load_model(directory)


@pytest.fixture(scope="module")
def hidden():
    return np.random.default_rng(0).standard_normal((B, T, 32)).astype(np.float32)


def run_hf(module, *args, **kwargs):
    with torch.no_grad():
        out = module(*[torch.tensor(a) for a in args], **kwargs)
    return (out[0] if isinstance(out, tuple) else out).numpy()


def hf_rope(hf_model, x):
    positions = torch.arange(T)[None].expand(B, -1)
    return hf_model.model.rotary_emb(torch.tensor(x), positions)


def positions():
    return jnp.broadcast_to(jnp.arange(T), (B, T))


def test_zero_centred_rms_norm(models, hidden):
    hf_model, model = models
    error = max_relative_error(
        model.model.layers[0].input_layernorm(jnp.asarray(hidden)),
        run_hf(hf_model.model.layers[0].input_layernorm, hidden),
    )
    assert error <= TOL


def test_gated_rms_norm(models):
    hf_model, model = models
    x, z = np.random.default_rng(1).standard_normal((2, 64, 8)).astype(np.float32)
    expected = run_hf(hf_model.model.layers[0].linear_attn.norm, x, z)
    assert max_relative_error(model.model.layers[0].linear_attn.norm(jnp.asarray(x), jnp.asarray(z)), expected) <= TOL


@pytest.mark.parametrize("implementation", ["reference", "chunked"])
def test_full_attention(checkpoint, hidden, implementation):
    hf_model, directory = checkpoint
    model = hf.load_model(directory, attention_impl=implementation, attention_chunk_size=32)  # T = 70: 3 chunks
    expected = run_hf(
        hf_model.model.layers[3].self_attn,
        hidden,
        position_embeddings=hf_rope(hf_model, hidden),
        attention_mask=causal_mask(B, T),
    )
    ours = jax.jit(lambda x: model.model.layers[3].self_attn(x, positions()))(hidden)
    assert max_relative_error(ours, expected) <= TOL


@pytest.mark.parametrize("implementation", ["chunked", "recurrent"])
def test_gated_deltanet(checkpoint, hidden, implementation):
    hf_model, directory = checkpoint
    model = hf.load_model(directory, gated_delta_rule_impl=implementation)
    expected = run_hf(hf_model.model.layers[0].linear_attn, hidden)
    assert max_relative_error(model.model.layers[0].linear_attn(jnp.asarray(hidden)), expected) <= TOL


@pytest.mark.parametrize("backend", ["dense", "ragged"])
def test_sparse_moe_block(checkpoint, hidden, backend):
    hf_model, directory = checkpoint
    model = hf.load_model(directory, moe_backend=backend)
    expected = run_hf(hf_model.model.layers[0].mlp, hidden)
    ours, router_logits = model.model.layers[0].mlp(jnp.asarray(hidden))
    assert router_logits.shape == (B * T, 4)
    assert max_relative_error(ours, expected) <= TOL


def test_dense_mlp_layer(models, hidden):
    hf_model, model = models
    assert (
        max_relative_error(model.model.layers[1].mlp(jnp.asarray(hidden)), run_hf(hf_model.model.layers[1].mlp, hidden))
        <= TOL
    )


@pytest.mark.parametrize("layer_idx", [0, 3])
def test_decoder_layer(models, hidden, layer_idx):
    hf_model, model = models
    # HF's linear-attention layers take the 2-D padding mask, attention layers the 4-D causal one.
    mask = causal_mask(B, T) if layer_idx == 3 else None
    expected = run_hf(
        hf_model.model.layers[layer_idx], hidden, position_embeddings=hf_rope(hf_model, hidden), attention_mask=mask
    )
    ours, _ = jax.jit(lambda x: model.model.layers[layer_idx](x, positions()))(hidden)
    assert max_relative_error(ours, expected) <= TOL


def test_expert_backends_agree_with_a_loop_over_experts():
    """Both backends equal a per-expert Python loop, with skewed routing and idle experts."""
    rng = np.random.default_rng(2)
    n, d, f, e, k = 40, 8, 6, 5, 2
    x = rng.standard_normal((n, d)).astype(np.float32)
    gate, up = (rng.standard_normal((e, d, f)).astype(np.float32) for _ in range(2))
    down = rng.standard_normal((e, f, d)).astype(np.float32)
    experts = np.stack([np.zeros(n, int), rng.choice([1, 3], n)], axis=1)  # expert 0 always, 2 and 4 never
    weights = rng.uniform(size=(n, k)).astype(np.float32)
    expected = np.zeros((n, d))
    for i in range(n):
        for slot in range(k):
            j = experts[i, slot]
            h = x[i] @ gate[j]
            expected[i] += weights[i, slot] * ((h / (1 + np.exp(-h))) * (x[i] @ up[j])) @ down[j]
    for backend in (swiglu_experts_dense, swiglu_experts_ragged):
        out = backend(jnp.asarray(x), jnp.asarray(weights), jnp.asarray(experts), gate, up, down)
        assert max_relative_error(out, expected) <= TOL, backend.__name__
