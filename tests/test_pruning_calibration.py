"""Calibration statistics: streamed sums against naive numpy loops and against transformers'
own tensors (forward hooks, router logits), instrumentation, save/load."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_reference import make_hf_model

from slimqwen_jax import hf
from slimqwen_jax.compression import CalibrationStats, calibrate, expert_importance
from slimqwen_jax.compression.calibration import cosine_sum, routing_sums
from slimqwen_jax.compression.experts import expert_similarity
from slimqwen_jax.compression.state import flat_params
from slimqwen_jax.config import tiny
from slimqwen_jax.layers import Calibration
from slimqwen_jax.model import Qwen3NextForCausalLM


def hand_made_routing(seed=0, n=60, e=6, k=2):
    """Router logits [N, E], top-k weights, experts and copy norms [N, K]; expert 5 never chosen."""
    rng = np.random.default_rng(seed)
    experts = np.stack([rng.choice(e - 1, k, replace=False) for _ in range(n)])
    weights = rng.random((n, k))
    weights /= weights.sum(1, keepdims=True)
    return rng.standard_normal((n, e)), weights, experts, 3 * rng.random((n, k))


def streamed_stats(logits, weights, experts, norms, splits=(0, 25, 60)) -> CalibrationStats:
    sums = {}
    for a, b in itertools.pairwise(splits):
        batch = routing_sums(*(jnp.asarray(x[a:b]) for x in (logits, weights, experts, norms)))
        for name, value in batch.items():
            sums[f"moe:{name}"] = sums.get(f"moe:{name}", 0.0) + np.asarray(value, np.float64)
    return CalibrationStats(sums, num_tokens=len(logits), meta={})


def test_frequency_soft_logits_and_reap_match_a_naive_loop():
    logits, weights, experts, norms = hand_made_routing()
    n, e = logits.shape
    stats = streamed_stats(logits, weights, experts, norms)
    count, soft, reap = np.zeros(e), np.zeros(e), np.zeros(e)
    for t in range(n):
        for slot, i in enumerate(experts[t]):
            count[i] += 1
            soft[i] += weights[t, slot]
            reap[i] += weights[t, slot] * norms[t, slot]
    expected = {
        "frequency": count / n,
        "soft_logits": soft / n,
        "reap": np.array([reap[i] / count[i] if count[i] else 0.0 for i in range(e)]),
    }
    for kind, values in expected.items():
        np.testing.assert_allclose(expert_importance(stats, "moe", kind), values, rtol=1e-6, err_msg=kind)
    assert expected["reap"][5] == 0.0
    columns = logits / np.linalg.norm(logits, axis=0)
    np.testing.assert_allclose(expert_similarity({}, stats, "moe", "router_logits"), columns.T @ columns, rtol=1e-5)


def test_cosine_sum_matches_numpy():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((2, 3, 5, 8))
    expected = sum(
        np.dot(x, y) / np.linalg.norm(x) / np.linalg.norm(y) for x, y in zip(a.reshape(-1, 8), b.reshape(-1, 8))
    )
    np.testing.assert_allclose(float(cosine_sum(jnp.asarray(a), jnp.asarray(b))), expected, rtol=1e-5)


# ---------------------------------------------------------------------------- through the model
CFG = tiny(initializer_range=0.1)
IDS = np.random.default_rng(2).integers(0, CFG.vocab_size, (4, 16))


@pytest.fixture(scope="module")
def model():
    return Qwen3NextForCausalLM(CFG, rngs=nnx.Rngs(0))


def naive_expert_norm(x: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray) -> float:
    """||down(silu(x gate) * up(x))||_2 for one token and one expert, in float64."""
    h = x @ gate
    return float(np.linalg.norm((h / (1 + np.exp(-h)) * (x @ up)) @ down))


def test_calibration_streams_the_models_own_intermediates(model, tmp_path):
    stats = calibrate(model, IDS, batch_size=2)
    _, sown = nnx.jit(lambda m, ids: nnx.capture(m, Calibration)(ids))(model, jnp.asarray(IDS))
    sown = {k: v.get_value()[0] for k, v in flat_params(sown).items()}  # module path + name -> first call's value
    n = IDS.size
    assert stats.num_tokens == n
    # Block influence and mean residual stream of layer 2 and the channel statistic of one norm,
    # from the per-token tensors.
    x_in, x_out = (np.asarray(v, np.float64).reshape(n, -1) for v in sown["model.layers.2.residual"])
    cos = np.sum(x_in * x_out, 1) / np.linalg.norm(x_in, axis=1) / np.linalg.norm(x_out, axis=1)
    np.testing.assert_allclose(stats.mean("model.layers.2", "residual_cos"), cos.mean(), rtol=1e-5)
    np.testing.assert_allclose(stats.mean("model.layers.2", "residual_in"), x_in.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.mean("model.layers.2", "residual_out"), x_out.mean(0), rtol=1e-5, atol=1e-6)
    norm_out = np.asarray(sown["mtp.pre_fc_norm_hidden.output"], np.float64).reshape(n, -1)
    np.testing.assert_allclose(stats.mean("mtp.pre_fc_norm_hidden", "abs_output"), np.abs(norm_out).mean(0), rtol=1e-5)
    # REAP of layer 1's experts from its router input and a per-expert loop.
    params = {k: np.asarray(v[...], np.float64) for k, v in flat_params(nnx.state(model)).items()}
    x = np.asarray(sown["model.layers.1.post_attention_layernorm.output"], np.float64).reshape(n, -1)
    p = "model.layers.1.mlp"
    logits = x @ params[f"{p}.gate.kernel"]
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    reap, count = np.zeros(CFG.num_experts), np.zeros(CFG.num_experts)
    for t in range(n):
        top = np.argsort(-probs[t], kind="stable")[: CFG.num_experts_per_tok]
        for i in top:
            w = probs[t, i] / probs[t, top].sum()
            e = [params[f"{p}.experts.{name}"][i] for name in ("gate_proj", "up_proj", "down_proj")]
            reap[i] += w * naive_expert_norm(x[t], *e)
            count[i] += 1
    np.testing.assert_allclose(expert_importance(stats, p, "frequency"), count / n, rtol=1e-6)
    np.testing.assert_allclose(expert_importance(stats, p, "reap"), reap / np.maximum(count, 1), rtol=1e-4)
    # Saved and loaded; the statistics of a depth-pruned model follow its layers.
    loaded = CalibrationStats.load(stats.save(tmp_path / "stats.npz"))
    assert loaded.num_tokens == n and loaded.meta["config"] == CFG.to_dict()
    for key, value in stats.sums.items():
        np.testing.assert_array_equal(loaded.sums[key], value)
    kept = loaded.select_layers([0, 2])
    np.testing.assert_array_equal(kept.sums["model.layers.1:residual_cos"], stats.sums["model.layers.2:residual_cos"])
    assert not kept.has("model.layers.2", "residual_cos") and kept.has("mtp.layers.0.mlp", "reap")


def test_instrumentation_is_off_outside_its_own_capture(model):
    """The training loss captures nnx.Intermediate: no calibration values are sown or kept then."""
    graphdef, state = nnx.split(model)

    def training_capture(state):
        return nnx.capture(nnx.merge(graphdef, state), nnx.Intermediate)(jnp.asarray(IDS))[1]

    sown = jax.eval_shape(training_capture, state)
    names = {path.rsplit(".", 1)[-1] for path in flat_params(sown)}
    assert names == {"routing_metrics"}
    assert not hasattr(model.model.norm, "output") and not hasattr(model.model.layers[0], "residual")


def test_calibration_taps_match_transformers_tensors(tmp_path):
    """Every backbone statistic of a model imported from HF, against the same model run in
    transformers: residual stream in / out of each decoder layer (their cosine and their sums over
    tokens) and every norm's output from torch
    forward hooks, routing from its router logits (`output_router_logits=True`), and each token
    copy's expert output norm computed in torch float64 from HF's expert weights."""
    hf_model = make_hf_model("gqa2_ratio2")  # layers: MoE, dense, MoE, MoE; top-2 of 4, normalised
    hf_model.save_pretrained(tmp_path)
    ids = np.random.default_rng(4).integers(0, 97, (2, 24))
    stats = calibrate(hf.load_model(tmp_path), ids, batch_size=2)

    taps, hooks = {}, []

    def record(name):
        def hook(module, args, kwargs, out):  # (input, output) of the module's one call
            taps[name] = (args[0], out)

        return hook

    for i, layer in enumerate(hf_model.model.layers):
        for name, module in (("", layer), (".input_layernorm", layer.input_layernorm),
                             (".post_attention_layernorm", layer.post_attention_layernorm)):  # fmt: skip
            hooks.append(module.register_forward_hook(record(f"model.layers.{i}{name}"), with_kwargs=True))
    hooks.append(hf_model.model.norm.register_forward_hook(record("model.norm"), with_kwargs=True))
    with torch.no_grad():
        router_logits = hf_model(torch.tensor(ids), output_router_logits=True).router_logits
    for hook in hooks:
        hook.remove()
    flat = lambda x: x.double().reshape(-1, x.shape[-1])  # noqa: E731  [N, D] in float64
    n = ids.size
    assert stats.num_tokens == n

    moe_layers = [i for i in range(4) if i not in hf_model.config.mlp_only_layers]
    expected = {}
    for i in range(4):
        x_in, x_out = (flat(x) for x in taps[f"model.layers.{i}"])
        expected[f"model.layers.{i}:residual_cos"] = torch.nn.functional.cosine_similarity(x_in, x_out).sum()
        expected[f"model.layers.{i}:residual_in"] = x_in.sum(0)
        expected[f"model.layers.{i}:residual_out"] = x_out.sum(0)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            expected[f"model.layers.{i}.{norm}:abs_output"] = flat(taps[f"model.layers.{i}.{norm}"][1]).abs().sum(0)
    expected["model.norm:abs_output"] = flat(taps["model.norm"][1]).abs().sum(0)
    k, e = hf_model.config.num_experts_per_tok, hf_model.config.num_experts
    for i, logits in zip(moe_layers, router_logits, strict=True):
        logits = logits.double()  # [N, E]
        weights, chosen = torch.topk(torch.softmax(logits, -1), k, dim=-1)  # [N, K]
        weights = weights / weights.sum(-1, keepdim=True)  # norm_topk_prob
        x = flat(taps[f"model.layers.{i}.post_attention_layernorm"][1])  # the experts' input [N, D]
        experts = hf_model.model.layers[i].mlp.experts
        copy_norms = torch.zeros(n, k, dtype=torch.float64)
        for t, slot in itertools.product(range(n), range(k)):
            gate, up = (x[t] @ experts.gate_up_proj[chosen[t, slot]].double().T).chunk(2)
            y = (torch.nn.functional.silu(gate) * up) @ experts.down_proj[chosen[t, slot]].double().T
            copy_norms[t, slot] = torch.linalg.vector_norm(y)
        one_hot = torch.nn.functional.one_hot(chosen, e).double()  # [N, K, E]
        moe = f"model.layers.{i}.mlp"
        expected[f"{moe}:selected"] = one_hot.sum((0, 1))
        expected[f"{moe}:weight"] = torch.einsum("nk,nke->e", weights, one_hot)
        expected[f"{moe}:reap"] = torch.einsum("nk,nke->e", weights * copy_norms, one_hot)
        expected[f"{moe}:logit_gram"] = logits.T @ logits
    assert sorted(stats.sums) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(stats.sums[key], value.detach().numpy(), rtol=2e-5, atol=1e-6, err_msg=key)
