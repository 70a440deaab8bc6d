"""Pruning carries the optimizer through: Adam's moments follow the parameters' index sets, with
the documented rules for merged experts and rescaled norms (or plain slicing), checked against numpy loops."""

import dataclasses

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from slimqwen_jax import losses, optimizer, run_config, stage_functions
from slimqwen_jax.compression import (
    DepthSpec,
    ExpertSpec,
    PruneSpec,
    PruningError,
    WidthSpec,
    apply_decision,
    calibrate,
    decide,
    prune,
    prune_optimizer_state,
)
from slimqwen_jax.compression.state import flat_params, logical_axes, to_state
from slimqwen_jax.config import tiny
from slimqwen_jax.model import Qwen3NextForCausalLM, abstract_model
from slimqwen_jax.stage_functions import MtpUse
from slimqwen_jax.testing import max_relative_error, random_tokens

CFG = tiny(initializer_range=0.1)
SPEC = PruneSpec(
    DepthSpec("similarity", 1),
    WidthSpec(48, multiple_of=16),
    ExpertSpec(5, 2, importance="reap", method="partial_preservation", similarity="expert_vector"),
)
TOKENS = random_tokens(4, 25, CFG.vocab_size, seed=3)


def train_step(cfg, tx):
    objective = losses.distillation_objective(aux_coef=cfg.router_aux_loss_coef, chunk_size=32)
    loss_fn = stage_functions.make_loss_fn(abstract_model(cfg)[0], objective, MtpUse(student=True))
    replicated = jax.sharding.NamedSharding(jax.sharding.Mesh(jax.devices()[:1], ("b",)), jax.sharding.PartitionSpec())
    weights = lambda step: {"lam": 0.0, "mtp_lam": 0.0, "beta": 0.3}  # noqa: E731
    return stage_functions.AtStep(jax.jit(stage_functions.make_weighted_train_step(loss_fn, tx, 1, replicated)), weights)


@pytest.fixture(scope="module")
def trained():
    """A model, its AdamW state after two steps (nonzero moments), and calibration statistics."""
    model = Qwen3NextForCausalLM(CFG, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    tx, _ = optimizer.make_optimizer(run_config.optimizer_section(warmup_steps=0, peak_lr=1e-2), total_steps=10)
    opt_state = tx.init(params)
    step = train_step(CFG, tx)
    for i in range(2):
        params, opt_state, _ = step(params, opt_state, None, TOKENS, i)
    stats = calibrate(nnx.merge(abstract_model(CFG)[0], params), random_tokens(8, 32, CFG.vocab_size, seed=4))
    return params, opt_state, tx, stats


def reference_moment(decision, moment: nnx.State, power: int) -> nnx.State:
    """The pruned moment from numpy loops: layers renumbered, every `embed` axis gathered, each new
    expert the coefficient-weighted sum of its members, norm weights' moments / s**power (power 0:
    plain slicing, gathered only)."""
    old = {path: np.asarray(v.get_value(), np.float64) for path, v in flat_params(moment).items()}
    variables = flat_params(moment)
    keep, d = decision.kept_channels, decision.source.hidden_size
    scale = np.sqrt(d / len(keep))
    new = {}
    for new_layer, old_layer in enumerate(decision.kept_layers):
        for path in old:
            if path.startswith(f"model.layers.{old_layer}."):
                new[path.replace(f"model.layers.{old_layer}.", f"model.layers.{new_layer}.", 1)] = path
    new.update({path: path for path in old if not path.startswith("model.layers.")})
    result = {}
    for new_path, old_path in new.items():
        value = old[old_path]
        block = new_path.rsplit(".experts.", 1)[0] if ".experts." in new_path else new_path.rsplit(".gate.kernel", 1)[0]
        plan = decision.expert_plans.get(block)
        if plan is not None and ".experts." in new_path:
            merged = np.zeros((len(plan.survivors),) + value.shape[1:])
            for expert, target in enumerate(plan.assignment):
                if target >= 0:
                    merged[target] += plan.coefficient[expert] * value[expert]
            value = merged
        elif plan is not None and new_path.endswith(".gate.kernel"):
            value = value[:, plan.survivors]
        for axis, name in enumerate(logical_axes(variables[old_path])):
            if name == "embed":
                value = np.take(value, keep, axis=axis)
            elif name == "embed_pair":
                value = np.take(value, np.concatenate([keep, d + keep]), axis=axis)
        if new_path.endswith(".weight") and logical_axes(variables[old_path]) == ("embed",):  # every RMSNorm over D
            value = value / scale**power
        result[new_path] = variables[old_path].replace(value.astype(np.float32))
    return to_state(result)


def adam_state(opt_state):
    return next(x for x in jax.tree.leaves(opt_state, is_leaf=lambda x: hasattr(x, "mu")) if hasattr(x, "mu"))


def test_pruned_moments_follow_the_parameters_and_train_on(trained):
    params, opt_state, tx, stats = trained
    decision = decide(CFG, params, SPEC, stats)
    assert decision.target.num_hidden_layers == 3 and decision.target.hidden_size == 48
    assert any(len(p.bases) for p in decision.expert_plans.values()), "the spec should merge experts"
    new_params = apply_decision(decision, params)
    new_opt = prune_optimizer_state(decision, opt_state, tx)
    adam = adam_state(opt_state)
    expected = {
        "mu": reference_moment(decision, adam.mu, 1),
        "nu": reference_moment(decision, adam.nu, 2),
    }
    for name in ("mu", "nu"):
        ours = flat_params(getattr(adam_state(new_opt), name))
        reference = flat_params(expected[name])
        assert ours.keys() == reference.keys()
        for path, variable in ours.items():
            # Relative to each moment's largest entry: merged experts' sums cancel in places.
            error = max_relative_error(variable.get_value(), reference[path].get_value())
            assert error <= 1e-6, f"{name} {path}: {error:.2e}"
    assert int(adam_state(new_opt).count) == int(adam.count) == 2

    # One step from the pruned state equals one step of a model built at the pruned shape holding
    # the reference moments.
    reference_opt = jax.tree.map(
        lambda node: node._replace(mu=expected["mu"], nu=expected["nu"]) if hasattr(node, "mu") else node,
        new_opt, is_leaf=lambda x: hasattr(x, "mu"),
    )  # fmt: skip
    step = train_step(decision.target, tx)
    ours, _, metrics = step(new_params, new_opt, None, TOKENS, 2)
    theirs, _, _ = step(new_params, reference_opt, None, TOKENS, 2)
    assert np.isfinite(float(metrics["loss"]))
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_plain_slicing_only_gathers_the_moments(trained):
    """`width.rescale_norms=False`: the norm weights' moments are gathered like every other tensor."""
    params, opt_state, tx, stats = trained
    spec = dataclasses.replace(SPEC, width=WidthSpec(48, multiple_of=16, rescale_norms=False))
    decision = decide(CFG, params, spec, stats)
    new_opt = adam_state(prune_optimizer_state(decision, opt_state, tx))
    assert not decision.rescale_norms and not decision.summary()["rescale_norms"]
    for name in ("mu", "nu"):
        ours = flat_params(getattr(new_opt, name))
        reference = flat_params(reference_moment(decision, getattr(adam_state(opt_state), name), power=0))
        assert ours.keys() == reference.keys()
        for path, variable in ours.items():
            error = max_relative_error(variable.get_value(), reference[path].get_value())
            assert error <= 1e-6, f"{name} {path}: {error:.2e}"


def test_decision_as_data_equals_the_one_shot_prune(trained):
    params, _, _, stats = trained
    decision = decide(CFG, params, SPEC, stats)
    cfg, pruned, notes = prune(CFG, params, SPEC, stats)
    assert cfg == decision.target and notes == list(decision.notes)
    for (path, a), (_, b) in zip(nnx.to_flat_state(pruned), nnx.to_flat_state(apply_decision(decision, params))):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(path))
    summary = decision.summary()
    assert summary["kept_layers"] == list(decision.kept_layers) and summary["kept_channels"] == 48


def test_an_optimizer_with_other_per_parameter_state_is_refused(trained):
    params, _, _, stats = trained
    decision = decide(CFG, params, SPEC, stats)
    tx = optax.chain(optax.scale_by_adam(), optax.trace(decay=0.9))  # momentum: a second per-parameter tree
    with pytest.raises(PruningError, match="other than Adam's moments"):
        prune_optimizer_state(decision, tx.init(params), tx)
