"""The paper's pruning variants beside our defaults: depth `block_similarity` on hand-made
statistics (a block that is not where the most similar single layer is, the full-attention rule,
statistics files that predate it, the placeholder without statistics), partial preservation's
`floor` count through the whole expert compression, and the config keys of the prune command and of
train stages. The block choice on a real model's activations and plain width slicing
(`rescale_norms=False`) are in test_pruning_transforms.py, the moments of plain slicing in
test_pruning_optimizer.py."""

import numpy as np
import pruning_reference as ref
import pytest
from flax import nnx
from tool_runs import REPO

from slimqwen_jax import prune as prune_cli
from slimqwen_jax import run_config, stage_plan
from slimqwen_jax.compression import (
    CalibrationStats,
    DepthSpec,
    ExpertSpec,
    PruneSpec,
    PruningError,
    WidthSpec,
    abstract_params,
    apply_decision,
    decide,
    layers_to_keep,
    prune,
)
from slimqwen_jax.compression.decision import PLACEHOLDER_NOTE
from slimqwen_jax.compression.experts import moe_blocks, preserved_count
from slimqwen_jax.compression.state import flat_params
from slimqwen_jax.config import FULL_ATTENTION, ConfigError, tiny
from slimqwen_jax.model import Qwen3NextForCausalLM
from slimqwen_jax.testing import apply_overrides, load_config_file

LINEAR, FULL = "linear_attention", FULL_ATTENTION


def boundary_stats(degrees, num_tokens: int = 7, seed: int = 0) -> CalibrationStats:
    """Statistics whose mean residual stream at layer boundary b (b = 0: entering layer 0) points at
    `degrees[b]` in a plane, with a random length (the cosine must not see it): layer l's
    `residual_in` is boundary l, its `residual_out` boundary l + 1 (sums over `num_tokens` tokens)."""
    lengths = np.random.default_rng(seed).uniform(0.5, 3.0, len(degrees))
    radians = np.radians(degrees)
    boundaries = num_tokens * lengths[:, None] * np.stack([np.cos(radians), np.sin(radians)], axis=1)  # [L + 1, 2]
    sums = {f"model.layers.{i}:residual_in": boundaries[i] for i in range(len(degrees) - 1)}
    sums.update({f"model.layers.{i}:residual_out": boundaries[i + 1] for i in range(len(degrees) - 1)})
    return CalibrationStats(sums, num_tokens, {})


def removed(kept: list[int], num_layers: int) -> list[int]:
    return [i for i in range(num_layers) if i not in kept]


# ---------------------------------------------------------------------------- depth block_similarity
def test_the_most_similar_block_is_not_where_the_most_similar_layer_is():
    """Boundary angles 0 10 25 30 60 61 120 degrees: the most similar single layer is 4 (1 degree
    between its ends), but the most similar block of 2 is layers 1-2 (20 degrees) and of 3 layers
    0-2 (30 degrees); none of them holds the full-attention layer 3."""
    cfg = tiny(num_hidden_layers=6)
    assert cfg.layer_types == (LINEAR,) * 3 + (FULL,) + (LINEAR,) * 2
    stats = boundary_stats([0, 10, 25, 30, 60, 61, 120])
    for n, expected in ((1, [4]), (2, [1, 2]), (3, [0, 1, 2])):
        start = ref.most_similar_block(stats.sums, cfg.layer_types, n)
        assert list(range(start, start + n)) == expected
        kept, notes = layers_to_keep(cfg, DepthSpec("block_similarity", n), stats)
        assert removed(kept, 6) == expected and notes == []
        new_cfg, _, _ = prune(cfg, abstract_params(cfg), PruneSpec(DepthSpec("block_similarity", n)), stats)
        assert new_cfg.layer_types == tuple(cfg.layer_types[i] for i in kept)


def test_a_block_that_would_remove_the_only_full_attention_layer_is_passed_over():
    """The quickstart layout (full attention at 3 only), angles 0 30 72 100 101: the most similar
    block always holds layer 3; the next most similar one goes instead and a note says so."""
    cfg = tiny()
    stats = boundary_stats([0, 30, 72, 100, 101])
    for n, expected, passed_over in ((1, [2], "layer 3 "), (2, [1, 2], "layers 2-3 "), (3, [0, 1, 2], "layers 1-3 ")):
        unconstrained = ref.most_similar_block(stats.sums, (LINEAR,) * 4, n)
        assert unconstrained <= 3 < unconstrained + n
        start = ref.most_similar_block(stats.sums, cfg.layer_types, n)
        assert list(range(start, start + n)) == expected
        kept, notes = layers_to_keep(cfg, DepthSpec("block_similarity", n), stats)
        assert removed(kept, 4) == expected and 3 in kept
        assert len(notes) == 1 and notes[0].startswith(f"depth: {passed_over}") and "every full-attention" in notes[0]
        new_cfg, _, prune_notes = prune(cfg, abstract_params(cfg), PruneSpec(DepthSpec("block_similarity", n)), stats)
        assert FULL in new_cfg.layer_types and notes[0] in prune_notes


def test_a_model_where_every_block_holds_the_full_attention_layers_is_refused():
    cfg = tiny(num_hidden_layers=3, layer_types=(LINEAR, FULL, LINEAR))
    with pytest.raises(PruningError, match="every block of 2 adjacent layers holds every full-attention layer"):
        prune(cfg, abstract_params(cfg), PruneSpec(DepthSpec("block_similarity", 2)))
    two_full = tiny(layer_types=(LINEAR, FULL) * 2)  # block 1-3 holds both; block 0-2 leaves layer 3
    assert layers_to_keep(two_full, DepthSpec("block_similarity", 3), boundary_stats([0, 80, 81, 82, 83]))[0] == [3]


def test_without_statistics_the_placeholder_is_the_lowest_valid_block():
    """Abstract parameters and no statistics (a dry run): the lowest block that leaves a
    full-attention layer, exact shapes, and the placeholder note."""
    for layer_types, n, kept in (((LINEAR,) * 3 + (FULL,), 2, [2, 3]), ((FULL,) + (LINEAR,) * 3, 2, [0, 3])):
        cfg = tiny(layer_types=layer_types)
        decision = decide(cfg, abstract_params(cfg), PruneSpec(DepthSpec("block_similarity", n)))
        assert list(decision.kept_layers) == kept and PLACEHOLDER_NOTE in decision.notes
        params = apply_decision(decision, abstract_params(cfg))  # checks the shapes against the target
        assert decision.target.layer_types == tuple(layer_types[i] for i in kept)
        assert {p.split(".")[2] for p in flat_params(params) if p.startswith("model.layers.")} == {"0", "1"}


def test_statistics_written_before_block_similarity_are_refused_with_what_to_do(tmp_path):
    """A statistics file without `residual_in` / `residual_out` (as every file written before they
    existed): block_similarity fails naming the file and how to recompute it; `similarity` still
    reads the same file."""
    cfg = tiny()
    sums = {f"model.layers.{i}:residual_cos": np.array(9.0 - i) for i in range(4)}
    path = CalibrationStats(sums, 10, {"config": cfg.to_dict()}).save(tmp_path / "old.npz")
    stats = CalibrationStats.load(path)
    with pytest.raises(PruningError) as error:
        prune(cfg, abstract_params(cfg), PruneSpec(DepthSpec("block_similarity", 1)), stats)
    message = str(error.value)
    print(message)
    assert str(path) in message and "'model.layers.0:residual_in'" in message and "block_similarity" in message
    assert "recompute them: delete old.npz and old.json" in message and "`stats`" in message
    assert layers_to_keep(cfg, DepthSpec("similarity", 1), stats)[0] == [1, 2, 3]


# ---------------------------------------------------------------------------- partial preservation's count
IMPORTANCE = np.array([5.0, 9.0, 1.0, 7.0, 3.0, 8.0, 2.0, 6.0])
RANKED = [1, 5, 3, 7, 0, 4, 6, 2]  # by hand: most important first


def expert_stats(cfg, similar_pairs=()) -> CalibrationStats:
    """Soft-logits importance IMPORTANCE in every MoE block, and router-logit Gram matrices whose
    cosines are 0 but for `similar_pairs` ((i, j, cosine), symmetric)."""
    gram = np.eye(cfg.num_experts)
    for i, j, cosine in similar_pairs:
        gram[i, j] = gram[j, i] = cosine
    sums = {}
    for moe in moe_blocks(abstract_params(cfg)):
        sums.update({f"{moe}:selected": np.full(8, 10.0), f"{moe}:weight": 10 * IMPORTANCE, f"{moe}:logit_gram": gram})
    return CalibrationStats(sums, 10, {})


# (E', fraction) -> experts preserved with floor, with round (Python's: halves to even)
PRESERVED = {(7, 0.5): (3, 4), (5, 0.5): (2, 2), (6, 0.5): (3, 3), (3, 0.5): (1, 2), (5, 0.3): (1, 2),
             (7, 0.3): (2, 2), (4, 0.75): (3, 3), (2, 0.25): (0, 0)}  # fmt: skip


@pytest.mark.parametrize("rounding", ["floor", "round"])
def test_preserved_and_base_experts_by_hand(rounding):
    """Through `decide` (every MoE block, the MTP's included): the top P experts are untouched, the
    next E' - P are the bases, for P by hand."""
    cfg = tiny()
    stats = expert_stats(cfg)
    for (num_experts, fraction), counts in PRESERVED.items():
        p = counts[0] if rounding == "floor" else counts[1]
        spec = ExpertSpec(num_experts, 2, importance="soft_logits", similarity="router_logits",
                          preserve_fraction=fraction, preserve_rounding=rounding)  # fmt: skip
        plans = decide(cfg, abstract_params(cfg), PruneSpec(experts=spec), stats).expert_plans
        assert len(plans) == 5
        for moe, plan in plans.items():
            case = f"{moe}, E' {num_experts}, fraction {fraction}, {rounding}"
            assert plan.preserved.tolist() == sorted(RANKED[:p]), case
            assert plan.bases.tolist() == sorted(RANKED[p:num_experts]), case
    assert preserved_count(0.29, 100, "floor") == 29  # 0.29 * 100 is 28.999999999999996 in binary


@pytest.mark.parametrize("rounding, preserved, merged", [("floor", [1, 3, 5], 7), ("round", [1, 3, 5, 7], 0)])
def test_floor_changes_which_expert_absorbs_the_dropped_one(rounding, preserved, merged):
    """8 -> 7 experts, fraction 0.5: floor preserves 3 (the 4th most important, expert 7, becomes a
    base and takes in expert 2, most similar to it), round preserves 4 (expert 2 joins its next
    most similar base, 0). Every weight against numpy: preserved experts untouched, the merged base
    the importance-weighted average."""
    cfg = tiny(initializer_range=0.1)
    model = Qwen3NextForCausalLM(cfg, rngs=nnx.Rngs(0))
    params = nnx.state(model)
    stats = expert_stats(cfg, [(2, 7, 0.9), (2, 0, 0.5)])
    spec = ExpertSpec(7, 2, importance="soft_logits", similarity="router_logits", preserve_rounding=rounding)
    decision = decide(cfg, params, PruneSpec(experts=spec), stats)
    source = {path: np.asarray(v[...], np.float64) for path, v in flat_params(params).items()}
    pruned = {path: np.asarray(v[...], np.float64) for path, v in flat_params(apply_decision(decision, params)).items()}
    num_preserved = len(preserved)
    similarity = np.eye(8)
    similarity[2, 7] = similarity[7, 2] = 0.9
    similarity[2, 0] = similarity[0, 2] = 0.5
    groups = ref.expert_groups(IMPORTANCE, similarity, num_experts=7, num_preserved=num_preserved)
    assert [merged, 2] in groups and sum(len(g) > 1 for g in groups) == 1
    for moe, plan in decision.expert_plans.items():
        assert plan.preserved.tolist() == preserved and merged in plan.bases
        survivors = sorted(group[0] for group in groups)
        for name in ("gate_proj", "up_proj", "down_proj"):
            weight = source[f"{moe}.experts.{name}"]
            np.testing.assert_allclose(
                pruned[f"{moe}.experts.{name}"], ref.merged_experts(weight, groups, IMPORTANCE), rtol=1e-6, atol=1e-7
            )
            for expert in preserved:  # untouched, bit for bit
                np.testing.assert_array_equal(pruned[f"{moe}.experts.{name}"][survivors.index(expert)], weight[expert])


# ---------------------------------------------------------------------------- config keys
def prune_tiny(*overrides: str):
    config = load_config_file(REPO / "configs" / "prune_tiny.py").get_config()
    apply_overrides(config, ["--config.dry_run=True", *overrides])
    return config


def test_the_prune_command_takes_the_new_keys(capsys):
    config = prune_tiny(
        "--config.depth.method=block_similarity",
        "--config.width.rescale_norms=False",
        "--config.experts.preserve_rounding=floor",
    )
    assert PruneSpec.from_config(config) == PruneSpec(
        DepthSpec("block_similarity", 2),
        WidthSpec(48, 16, rescale_norms=False),
        ExpertSpec(6, preserve_rounding="floor"),
    )
    new_cfg, _ = prune_cli.run(config)
    printed = capsys.readouterr().out
    assert new_cfg.num_hidden_layers == 4 and "depth: kept [2, 3, 4, 5] of 6 layers" in printed
    defaults = prune_tiny()
    assert (defaults.width.rescale_norms, defaults.experts.preserve_rounding) == (True, "round")


@pytest.mark.parametrize(
    "override, line",
    [
        (
            "--config.depth.method=blocks",
            "depth.method 'blocks' is not one of ('last', 'similarity', 'block_similarity')",
        ),
        (
            "--config.experts.preserve_rounding=ceil",
            "experts.preserve_rounding 'ceil' is not one of ('round', 'floor')",
        ),
    ],
)
def test_a_bad_choice_is_refused_with_one_line(override, line):
    with pytest.raises(ConfigError) as error:
        prune_cli.run(prune_tiny(override))
    assert str(error.value) == f"bad prune config: {line}"


def test_train_stages_carry_the_new_keys(tmp_path):
    """`stages[k].depth.method`, `stages[k].width.rescale_norms`, `stages[k].experts.preserve_rounding`
    reach each stage's spec (as the trainer plans them), checked like the prune command's."""
    cfg = tiny(num_hidden_layers=6)
    config = run_config.base_config()
    config.model = run_config.model_section(cfg)
    config.train.steps = 0  # the stages' sum
    config.stages = [run_config.stage_section(5, spec=PruneSpec(DepthSpec("last", 1), experts=ExpertSpec(6))),
                     run_config.stage_section(5, spec=PruneSpec(DepthSpec("last", 1), WidthSpec(48, 16)))]  # fmt: skip
    apply_overrides(config, ["--config.stages[0].depth.method=block_similarity",
                             "--config.stages[0].experts.preserve_rounding=floor",
                             "--config.stages[1].width.rescale_norms=False"])  # fmt: skip
    (first, second), found = stage_plan.plan(config, cfg, tmp_path)
    assert found == []
    assert first.spec.depth == DepthSpec("block_similarity", 1) and first.spec.experts.preserve_rounding == "floor"
    assert second.spec.width == WidthSpec(48, 16, rescale_norms=False) and second.spec.depth.method == "last"
    config.stages[0].experts.preserve_rounding = "ceil"
    (found,) = stage_plan.plan(config, cfg, tmp_path)[1]
    assert found.startswith("stages[0] does not fit") and "experts.preserve_rounding 'ceil' is not one of" in found
