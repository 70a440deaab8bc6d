"""Pruning transforms: parameter counts, identity, depth (block_similarity on recorded activations
included), width (plain slicing included), expert plans and bad specs."""

import jax.numpy as jnp
import numpy as np
import pruning_reference as ref
import pytest
from flax import nnx

from slimqwen_jax.compression import (
    CalibrationStats,
    DepthSpec,
    ExpertSpec,
    PruneSpec,
    PruningError,
    WidthSpec,
    abstract_params,
    build_model,
    calibrate,
    count_parameters,
    layers_to_keep,
    plan_experts,
    prune,
    prune_depth,
    prune_experts,
)
from slimqwen_jax.compression.experts import apply_plans, expert_similarity, moe_blocks, plan_layers
from slimqwen_jax.compression.state import flat_params, logical_axes
from slimqwen_jax.config import FULL_ATTENTION, tiny
from slimqwen_jax.model import Qwen3NextForCausalLM
from slimqwen_jax.testing import forward, hand_count_parameters, max_relative_error

# Every layer kind (full attention at 1 and 3), a dense-MLP layer (1), MoE elsewhere, MTP.
CFG = tiny(layer_types=("linear_attention", "full_attention") * 2, mlp_only_layers=(1,), initializer_range=0.1)
IDS = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 24))


def logits(model, input_ids):
    out = forward(model, input_ids)
    return out.logits, out.mtp_logits


def random_model(cfg=CFG, seed=0):
    model = Qwen3NextForCausalLM(cfg, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed + 1)
    for path, variable in flat_params(nnx.state(model)).items():  # norm weights far from their init
        if path.endswith("norm.weight"):
            variable.set_value(variable[...] + 0.3 * rng.standard_normal(variable.shape).astype(np.float32))
    return model


# ---------------------------------------------------------------------------- parameter counts
@pytest.mark.parametrize("cfg", [CFG, tiny(tie_word_embeddings=True, decoder_sparse_step=2)], ids=["untied", "tied"])
def test_parameter_count_matches_a_hand_count(cfg):
    count = count_parameters(cfg)
    assert (count.total, count.active) == hand_count_parameters(cfg)


# ---------------------------------------------------------------------------- identity and depth
@pytest.fixture(scope="module")
def model_and_stats():
    model = random_model()
    return model, calibrate(model, IDS, batch_size=2)


def test_keeping_everything_is_the_identity(model_and_stats):
    model, stats = model_and_stats
    cfg, params = model.config, nnx.state(model)
    spec = PruneSpec(
        DepthSpec("similarity", 0), WidthSpec(cfg.hidden_size, 7), ExpertSpec(cfg.num_experts, method="merge")
    )
    new_cfg, new_params, _ = prune(cfg, params, spec, stats)
    # The expert path with every expert kept: plans, then gathers and (trivial) merges.
    new_cfg, new_params = apply_plans(
        new_cfg, new_params, plan_layers(cfg, params, stats, spec.experts), cfg.num_experts_per_tok
    )
    assert new_cfg == cfg
    for ours, theirs in zip(logits(model, IDS), logits(build_model(new_cfg, new_params), IDS)):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_depth_last_equals_the_first_layers_then_norm_and_head(model_and_stats):
    model, _ = model_and_stats
    new_cfg, new_params = prune_depth(model.config, nnx.state(model), None, DepthSpec("last", 2))
    pruned = build_model(new_cfg, new_params)
    assert new_cfg.num_hidden_layers == 2 and new_cfg.mlp_only_layers == (1,)

    @nnx.jit
    def truncated(model, ids):
        positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
        x = model.model.embed_tokens(ids)
        for layer in list(model.model.layers)[:2]:
            x, _ = layer(x, positions)
        hidden = model.model.norm(x)
        return model.logits(hidden), model.logits(model._mtp_hidden_states(ids, hidden, positions)[0])

    pruned_logits, pruned_mtp_logits = logits(pruned, IDS)
    expected_logits, expected_mtp = truncated(model, IDS)
    # Two different jitted programs: XLA may fuse and sum in another order, so float32 rounding only.
    assert max_relative_error(pruned_logits, expected_logits) <= 1e-6
    assert max_relative_error(pruned_mtp_logits[0], expected_mtp) <= 1e-6


def test_depth_similarity_drops_the_least_influential_layers_and_keeps_the_moe_pattern():
    cfg = tiny(num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=(3,))  # MoE at 1 and 5
    influence = np.array([0.5, 0.1, 0.9, 0.7, 0.05, 0.3])  # 1 - mean cos; least: layers 4 then 1
    sums = {f"model.layers.{i}:residual_cos": (1.0 - b) * 10 for i, b in enumerate(influence)}
    stats = CalibrationStats(sums, num_tokens=10, meta={})
    new_cfg, params = prune_depth(cfg, abstract_params(cfg), stats, DepthSpec("similarity", 2))
    kept = [0, 2, 3, 5]
    assert new_cfg.layer_types == tuple(cfg.layer_types[i] for i in kept)
    assert [new_cfg.is_moe_layer(j) for j in range(4)] == [cfg.is_moe_layer(i) for i in kept]
    assert flat_params(params)["model.layers.3.mlp.experts.gate_proj"].shape[0] == cfg.num_experts  # old layer 5


def test_depth_similarity_passes_over_the_last_full_attention_layer():
    """The quickstart layout (3 linear + 1 full attention): when the full-attention layer scores
    lowest, the next least influential layers go instead, and a note says so."""
    cfg = tiny()
    assert cfg.layer_types.index(FULL_ATTENTION) == 3
    influence = np.array([0.5, 0.3, 0.9, 0.05])  # 1 - mean cos: the full-attention layer 3 scores lowest
    stats = CalibrationStats(
        {f"model.layers.{i}:residual_cos": (1.0 - b) * 10 for i, b in enumerate(influence)}, 10, {}
    )
    for n, expected_kept in ((1, [0, 2, 3]), (2, [2, 3]), (3, [3])):
        kept, notes = layers_to_keep(cfg, DepthSpec("similarity", n), stats)
        assert kept == expected_kept
        assert len(notes) == 1 and "layer 3" in notes[0] and "last full-attention layer" in notes[0]
        new_cfg, _, prune_notes = prune(cfg, abstract_params(cfg), PruneSpec(DepthSpec("similarity", n)), stats)
        assert FULL_ATTENTION in new_cfg.layer_types and notes[0] in prune_notes


@nnx.jit
def residual_stream(model, input_ids):
    """[L + 1, B, T, D] the residual stream entering each decoder layer, then leaving the last one,
    from the layers run one by one (not the calibration taps)."""
    positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
    x = model.model.embed_tokens(input_ids)
    stream = [x]
    for layer in model.model.layers:
        x, _ = layer(x, positions)
        stream.append(x)
    return jnp.stack(stream)


def test_depth_block_similarity_removes_the_most_similar_block_of_recorded_activations(model_and_stats):
    """On CFG (full attention at 1 and 3), for N = 1, 2, 3: the block numpy picks from the recorded
    residual stream (cosine of the token means at its two ends), a note exactly when the most
    similar block would remove both full-attention layers (here N = 3: block 1-3), and a pruned
    model made of exactly the other layers, unchanged."""
    model, stats = model_and_stats
    cfg, params = model.config, nnx.state(model)
    stream = np.asarray(residual_stream(model, IDS), np.float64).reshape(cfg.num_hidden_layers + 1, IDS.size, -1)
    sums = {f"model.layers.{i}:residual_in": stream[i].sum(0) for i in range(cfg.num_hidden_layers)}
    sums.update({f"model.layers.{i}:residual_out": stream[i + 1].sum(0) for i in range(cfg.num_hidden_layers)})
    source = {path: np.asarray(v[...]) for path, v in flat_params(params).items()}
    starts, passed_over = [], []
    for n in (1, 2, 3):
        start = ref.most_similar_block(sums, cfg.layer_types, n)
        passed_over.append(ref.most_similar_block(sums, ("linear_attention",) * cfg.num_hidden_layers, n) != start)
        kept = [i for i in range(cfg.num_hidden_layers) if not start <= i < start + n]
        kept_by_us, notes = layers_to_keep(cfg, DepthSpec("block_similarity", n), stats)
        assert kept_by_us == kept and bool(notes) == passed_over[-1], notes
        new_cfg, new_params, _ = prune(cfg, params, PruneSpec(DepthSpec("block_similarity", n)), stats)
        assert new_cfg.layer_types == tuple(cfg.layer_types[i] for i in kept)
        assert [new_cfg.is_moe_layer(j) for j in range(len(kept))] == [cfg.is_moe_layer(i) for i in kept]
        pruned = {path: np.asarray(v[...]) for path, v in flat_params(new_params).items()}
        renamed = {path: path for path in source if not path.startswith("model.layers.")}
        for j, i in enumerate(kept):
            renamed.update({p.replace(f"model.layers.{i}.", f"model.layers.{j}.", 1): p for p in source
                            if p.startswith(f"model.layers.{i}.")})  # fmt: skip
        assert sorted(pruned) == sorted(renamed)
        for new_path, old_path in renamed.items():
            np.testing.assert_array_equal(pruned[new_path], source[old_path], err_msg=new_path)
        starts.append(start)
    print(f"block_similarity: first removed layer for N = 1, 2, 3: {starts}; full attention in the way: {passed_over}")
    assert starts != [0, 0, 0], "the data should pick something other than the placeholder's lowest block"
    assert any(passed_over), "the data should meet the full-attention rule once"


# ---------------------------------------------------------------------------- width
def zero_channels(model, dropped: np.ndarray) -> None:
    """Zero hidden channels `dropped` in every weight that reads or writes them (embed axes)."""
    d = model.config.hidden_size
    for variable in flat_params(nnx.state(model)).values():
        value = np.array(variable[...])
        for axis, name in enumerate(logical_axes(variable)):
            index = {"embed": dropped, "embed_pair": np.concatenate([dropped, d + dropped])}.get(name)
            if index is not None:
                value[(slice(None),) * axis + (index,)] = 0.0
        variable.set_value(jnp.asarray(value))


def test_width_removes_unused_channels_without_changing_logits():
    model = random_model(seed=3)
    # A residual stream of RMS ~1 (embeddings x10), so the norms' eps (1e-6) is negligible: the
    # width transform is exact only up to eps (mean over d' instead of D channels).
    model.model.embed_tokens.embedding.set_value(10.0 * model.model.embed_tokens.embedding[...])
    dropped = np.array([1, 4, 5, 10, 17, 20, 33, 34, 40, 41, 50, 52, 55, 60, 62, 63])
    zero_channels(model, dropped)
    stats = calibrate(model, IDS, batch_size=2)
    spec = PruneSpec(width=WidthSpec(48, 16))
    new_cfg, new_params, _ = prune(model.config, nnx.state(model), spec, stats)
    kept = np.setdiff1d(np.arange(64), dropped)
    embedding = np.asarray(flat_params(new_params)["model.embed_tokens.embedding"][...])
    np.testing.assert_array_equal(embedding, np.asarray(model.model.embed_tokens.embedding[...])[:, kept])
    for ours, theirs in zip(logits(model, IDS), logits(build_model(new_cfg, new_params), IDS)):
        error = max_relative_error(theirs, ours)
        print(f"width 64 -> 48 on unused channels: max relative logit error {error:.1e}")
        assert error < 1e-5


def test_width_plain_slicing_gathers_every_tensor_without_rescaling(model_and_stats):
    """`rescale_norms=False`: every tensor, the residual-stream norm weights included (their values
    unchanged), is the numpy gather of the source along its hidden axes, at the channels numpy picks."""
    model, stats = model_and_stats
    spec = PruneSpec(width=WidthSpec(48, 16, rescale_norms=False))
    new_cfg, new_params, _ = prune(model.config, nnx.state(model), spec, stats)
    source = {path: np.asarray(v[...], np.float64) for path, v in flat_params(nnx.state(model)).items()}
    norms = ref.residual_norm_modules(range(CFG.num_hidden_layers), CFG.num_mtp_layers)
    keep = ref.kept_channels(stats.sums, stats.num_tokens, norms, width=48)
    pruned = {path: np.asarray(v[...], np.float64) for path, v in flat_params(new_params).items()}
    assert new_cfg.hidden_size == 48 and sorted(pruned) == sorted(source)
    for path, value in source.items():
        expected = ref.gather_channels(path, value, keep, CFG.hidden_size, rescale_norms=False)
        np.testing.assert_array_equal(pruned[path], expected, err_msg=path)
    assert np.abs(source["model.norm.weight"]).max() > 0.1  # norm weights far from 0: rescaling would show


# ---------------------------------------------------------------------------- expert plans
def test_partial_preservation_sets_and_merge_coefficients_on_hand_made_importances():
    importance = np.array([5.0, 9.0, 1.0, 7.0, 3.0, 8.0, 2.0, 6.0])  # ranking: 1 5 3 7 0 4 6 2
    similarity = np.zeros((8, 8))
    similarity[0, 7] = similarity[4, 3] = similarity[6, 7] = similarity[2, 3] = 0.9
    similarity[0, 1] = similarity[4, 5] = 1.0  # preserved experts are never merge bases
    plan = plan_experts(importance, similarity, num_experts=4, method="partial_preservation", preserve_fraction=0.5)
    assert plan.preserved.tolist() == [1, 5] and plan.bases.tolist() == [3, 7]
    assert plan.survivors.tolist() == [1, 3, 5, 7]
    assert plan.assignment.tolist() == [3, 0, 1, 1, 1, 2, 3, 3]  # 0, 6 -> 7 (new 3); 4, 2 -> 3 (new 1)
    np.testing.assert_allclose(plan.coefficient[[3, 4, 2]], np.array([7, 3, 1]) / 11)
    np.testing.assert_allclose(plan.coefficient[[7, 0, 6]], np.array([6, 5, 2]) / 13)
    assert plan.coefficient[1] == plan.coefficient[5] == 1.0

    merged = plan_experts(importance, similarity, 4, "merge", 0.5)
    assert merged.preserved.tolist() == [] and merged.bases.tolist() == [1, 3, 5, 7]
    assert merged.assignment.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]  # 0 -> 1, 4 -> 5 now allowed
    pruned = plan_experts(importance, None, 4, "prune", 0.5)
    assert pruned.assignment.tolist() == [-1, 0, -1, 1, -1, 2, -1, 3] and pruned.coefficient.sum() == 4


# ---------------------------------------------------------------------------- experts on a model
NEVER_CHOSEN = [6, 7]


@pytest.fixture(scope="module")
def routed_away():
    """A model whose experts 6 and 7 are never chosen (expert 7 a copy of expert 2), and its stats.

    Channel 0 of the residual stream is held at 1 (embedding column 0; nothing writes it; the MTP fc
    copies its embedding half's channel 0, which is positive), and every router row reads it with
    +5 (or -5 for experts 6, 7), so those two stay far below the top-k.
    """
    model = random_model(seed=5)
    for path, variable in flat_params(nnx.state(model)).items():
        value = np.array(variable[...])
        if path == "model.embed_tokens.embedding":
            value[:, 0] = 1.0
        elif path == "mtp.fc.kernel":  # [2D, D]
            value[:, 0] = 0.0
            value[0, 0] = 1.0
        elif path.endswith(".gate.kernel"):  # router [D, E]
            value[0, :] = 5.0
            value[0, NEVER_CHOSEN] = -5.0
        elif path.endswith("norm.weight") and logical_axes(variable) == ("embed",):
            value[0] = 0.0
        elif logical_axes(variable)[-1] == "embed" and value.ndim >= 2:  # writes the residual stream
            value[..., 0] = 0.0
        if ".experts." in path:
            value[7] = value[2]
        variable.set_value(jnp.asarray(value))
    return model, calibrate(model, IDS, batch_size=2)


def test_pruning_never_chosen_experts_leaves_outputs_unchanged(routed_away):
    model, stats = routed_away
    for moe in ("model.layers.0.mlp", "mtp.layers.0.mlp"):
        np.testing.assert_array_equal(stats.mean(moe, "selected")[NEVER_CHOSEN], 0.0)
    spec = PruneSpec(experts=ExpertSpec(6, importance="frequency", method="prune"))
    new_cfg, new_params, _ = prune(model.config, nnx.state(model), spec, stats)
    router = np.asarray(flat_params(new_params)["model.layers.2.mlp.gate.kernel"][...])
    np.testing.assert_array_equal(router, np.asarray(model.model.layers[2].mlp.gate.kernel[...])[:, :6])
    for ours, theirs in zip(logits(model, IDS), logits(build_model(new_cfg, new_params), IDS)):
        assert max_relative_error(theirs, ours) < 1e-6


def test_merging_an_expert_into_its_identical_duplicate_leaves_outputs_unchanged(routed_away):
    model, stats = routed_away
    cfg, params = model.config, nnx.state(model)
    values = {path: v[...] for path, v in flat_params(params).items()}
    importance = np.array([8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0])  # expert 7 weighs 1/7 in the merge
    plans = {}
    for moe in moe_blocks(params):
        similarity = expert_similarity(values, stats, moe, "expert_vector")
        plans[moe] = plan_experts(importance, similarity, num_experts=7, method="merge", preserve_fraction=0.0)
        assert plans[moe].assignment.tolist() == [0, 1, 2, 3, 4, 5, 6, 2]  # 7 joins its duplicate 2
    new_cfg, new_params = apply_plans(cfg, params, plans, cfg.num_experts_per_tok)
    for ours, theirs in zip(logits(model, IDS), logits(build_model(new_cfg, new_params), IDS)):
        assert max_relative_error(theirs, ours) < 1e-5  # (6/7 W + 1/7 W) is W up to rounding


def test_merging_distinct_experts_gives_the_importance_weighted_average():
    """Random (distinct) experts merged 8 -> 5 by hand-made soft_logits importances and router-row
    similarity: each new expert is sum_j I_j W_j / sum_j I_j over its group, against numpy. In
    the MTP block experts 3 and 5 copy expert 1's router row (plus noise) and all three weigh 0:
    their merge is the plain mean."""
    model = random_model(seed=7)
    cfg, params = model.config, nnx.state(model)
    source = {path: np.asarray(v[...], np.float64) for path, v in flat_params(params).items()}
    rng = np.random.default_rng(7)
    router = np.array(source["mtp.layers.0.mlp.gate.kernel"])  # [D, E]
    router[:, [3, 5]] = router[:, [1]] + 0.01 * rng.standard_normal((cfg.hidden_size, 2))
    model.mtp.layers[0].mlp.gate.kernel.set_value(jnp.asarray(router, jnp.float32))
    source["mtp.layers.0.mlp.gate.kernel"] = np.asarray(router, np.float32).astype(np.float64)
    importances = {
        "model.layers.0.mlp": [6.0, 1.0, 3.0, 2.0, 5.0, 4.0, 0.5, 7.0],
        "model.layers.2.mlp": [0.2, 0.9, 0.4, 0.1, 0.8, 0.3, 0.7, 0.6],
        "model.layers.3.mlp": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0],
        "mtp.layers.0.mlp": [3.0, 0.0, 2.0, 0.0, 1.0, 0.0, 0.0, 4.0],
    }
    assert sorted(importances) == sorted(moe_blocks(params))
    sums = {}
    for moe, importance in importances.items():
        sums[f"{moe}:weight"] = np.asarray(importance) * 10
        sums[f"{moe}:selected"] = np.full(8, 10.0)
    spec = ExpertSpec(5, importance="soft_logits", method="merge", similarity="router_weights")
    new_cfg, new_params = prune_experts(cfg, nnx.state(model), CalibrationStats(sums, 10, {}), spec)
    assert new_cfg.num_experts == 5
    pruned = {path: np.asarray(v[...], np.float64) for path, v in flat_params(new_params).items()}
    for moe, importance in importances.items():
        similarity = ref.cosine_matrix(source[f"{moe}.gate.kernel"].T)  # router rows [E, D]
        groups = ref.expert_groups(importance, similarity, num_experts=5, num_preserved=0)
        print(f"{moe}: groups {groups}")
        assert max(map(len, groups)) > 1
        if moe == "mtp.layers.0.mlp":
            assert [1, 3, 5] in groups  # every member weighs 0: the plain mean
        for name in ("gate_proj", "up_proj", "down_proj"):
            expected = ref.merged_experts(source[f"{moe}.experts.{name}"], groups, importance)
            np.testing.assert_allclose(pruned[f"{moe}.experts.{name}"], expected, rtol=1e-6, atol=1e-7, err_msg=name)
        survivors = sorted(group[0] for group in groups)
        np.testing.assert_array_equal(pruned[f"{moe}.gate.kernel"], source[f"{moe}.gate.kernel"][:, survivors])


# ---------------------------------------------------------------------------- bad specs
@pytest.mark.parametrize(
    "spec, message",
    [
        (PruneSpec(depth=DepthSpec("last", 4)), "has 4 layers and must keep at least one"),
        (PruneSpec(depth=DepthSpec("middle", 1)), "depth.method 'middle'"),
        (PruneSpec(depth=DepthSpec("last", 3)), "none of them full attention"),
        (PruneSpec(width=WidthSpec(80, 16)), "the model has 64 hidden channels"),
        (PruneSpec(width=WidthSpec(40, 16)), "not a multiple of width.multiple_of=16"),
        (PruneSpec(width=WidthSpec(48)), "not a multiple of width.multiple_of=128"),
        (PruneSpec(experts=ExpertSpec(4, 5)), "num_experts_per_tok (5) must be in [1, num_experts=4]"),
        (PruneSpec(experts=ExpertSpec(9)), "the model has 8 experts"),
        (PruneSpec(experts=ExpertSpec(4, importance="loud")), "experts.importance 'loud'"),
    ],
)
def test_bad_specs_raise_clear_errors(spec, message):
    with pytest.raises(PruningError) as error:
        prune(CFG, abstract_params(CFG), spec)
    assert message in str(error.value)


def test_real_parameters_need_statistics(model_and_stats):
    model, _ = model_and_stats
    with pytest.raises(PruningError, match="needs calibration statistics"):
        prune(model.config, nnx.state(model), PruneSpec(experts=ExpertSpec(4)))
