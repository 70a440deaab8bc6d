"""The train step's stacked layout (slimqwen_jax/stacking.py): exact round trips of parameters,
Adam moments and shardings, the layout the model's scan implies, and a train step in the stacked
layout equal to one on the per-layer tree (weight decay on matrices only, per layer)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from slimqwen_jax import losses, optimizer, run_config, sharding, stacking, stage_functions
from slimqwen_jax.config import FULL_ATTENTION, LINEAR_ATTENTION, tiny
from slimqwen_jax.model import Qwen3NextForCausalLM
from slimqwen_jax.stage_functions import MtpUse
from slimqwen_jax.testing import random_tokens

F, L = FULL_ATTENTION, LINEAR_ATTENTION
# Nine layers of period 4 (3 linear + 1 full attention): two stacked blocks and layer 8 left as it is.
CFG = tiny(num_hidden_layers=9, layer_types=(L, L, L, F) * 2 + (L,), num_mtp_layers=1, moe_backend="dense",
           scan_layers=True)  # fmt: skip


def split(cfg=CFG):
    return nnx.split(Qwen3NextForCausalLM(cfg, rngs=nnx.Rngs(0)), nnx.Param)


def test_stack_and_unstack_are_exact_for_params_moments_and_shardings():
    _, params = split()
    layout = stacking.layout_for(params, scan_layers=True)
    assert layout == stacking.Layout(period=4, num_blocks=2)
    tx, _ = optimizer.make_optimizer(run_config.optimizer_section(), 10)
    opt_state = jax.tree.map(lambda x: x + 1.0, tx.init(params))  # moments unlike the zeros they start as
    stacked_params, stacked_opt = layout.stack((params, opt_state))

    per_layer = {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(params)}
    for r, block in enumerate(stacked_params.blocks):  # layer j * 4 + r at index j
        for sub, v in nnx.to_flat_state(block):
            np.testing.assert_array_equal(v.get_value()[0], per_layer[("model", "layers", r, *sub)])
            np.testing.assert_array_equal(v.get_value()[1], per_layer[("model", "layers", 4 + r, *sub)])
    rest = {path for path, _ in nnx.to_flat_state(stacked_params.rest)}
    assert {path for path in per_layer if path[:2] != ("model", "layers") or path[2] == 8} == rest

    for original, stacked in ((params, stacked_params), (opt_state, stacked_opt)):
        back = jax.jit(stacking.unstack)(stacked)
        assert jax.tree.structure(back) == jax.tree.structure(original)
        for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(original), strict=True):
            np.testing.assert_array_equal(a, b)

    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=4, expert=1)))
    shardings = sharding.state_shardings(params, mesh)
    placed = jax.jit(layout.stack, out_shardings=layout.stack_shardings(shardings))(params)
    for r, block in enumerate(placed.blocks):
        for sub, v in nnx.to_flat_state(block):
            layer_spec = shardings["model"]["layers"][r]
            for key in sub:
                layer_spec = layer_spec[key]
            assert v.get_value().sharding.spec == jax.sharding.PartitionSpec(None, *layer_spec.get_value().spec)


def test_layout_follows_the_models_scan():
    _, params = split()
    assert stacking.layout_for(params, scan_layers=False) == stacking.Layout()
    one_block = tiny(num_hidden_layers=5, layer_types=(L, L, L, F, L), num_mtp_layers=0, scan_layers=True)
    assert stacking.layout_for(split(one_block)[1], scan_layers=True) == stacking.Layout()
    # MoE and dense layers alternating: period 2 by parameter structure alone.
    alternating = tiny(num_hidden_layers=5, layer_types=(F,) * 5, mlp_only_layers=(1, 3), num_mtp_layers=0)
    assert stacking.layout_for(split(alternating)[1], scan_layers=True) == stacking.Layout(period=2, num_blocks=2)
    irregular = tiny(num_hidden_layers=4, layer_types=(F,) * 4, mlp_only_layers=(1,), num_mtp_layers=0)
    assert stacking.layout_for(split(irregular)[1], scan_layers=True) == stacking.Layout()
    # A stacked [blocks, D] norm weight is still a vector: no weight decay on it.
    ndims = stacking.per_layer_ndims(stacking.layout_for(params, True).stack(params))
    assert ndims.blocks[0]["input_layernorm"]["weight"].get_value() == 1
    assert ndims.blocks[0]["linear_attn"]["in_proj_ba"]["kernel"].get_value() == 2


def test_a_train_step_in_the_stacked_layout_equals_one_per_layer():
    # Period 2 (MoE, dense), two blocks and a last layer as it is; full attention only, for a short compile.
    cfg = tiny(num_hidden_layers=5, layer_types=(F,) * 5, mlp_only_layers=(1, 3), num_mtp_layers=0,
               moe_backend="dense", scan_layers=True)  # fmt: skip
    graphdef, params = split(cfg)
    layout = stacking.layout_for(params, scan_layers=True)
    # A large learning rate and weight decay: decaying a stacked vector would show.
    opt = run_config.optimizer_section(peak_lr=3e-2, init_lr=3e-2, warmup_steps=0, schedule="constant", weight_decay=0.5)
    tx, _ = optimizer.make_optimizer(opt, 10)
    objective = losses.distillation_objective(aux_coef=cfg.router_aux_loss_coef, chunk_size=64)
    loss_fn = stage_functions.make_loss_fn(graphdef, objective, MtpUse())
    weights = stage_functions.loss_weights_fn(run_config.loss_section(distillation=False), 10)
    replicated = jax.sharding.NamedSharding(
        jax.sharding.Mesh(jax.devices()[:1], ("batch",)), jax.sharding.PartitionSpec()
    )
    train_step = stage_functions.AtStep(jax.jit(stage_functions.make_weighted_train_step(loss_fn, tx, 1, replicated)), weights)
    tokens = jnp.asarray(random_tokens(2, 17, cfg.vocab_size))

    def two_steps(params):
        opt_state, history = tx.init(params), []
        for step in range(2):
            params, opt_state, metrics = train_step(params, opt_state, None, tokens, step)
            history.append(metrics)
        return params, opt_state, history

    per_layer = two_steps(params)
    stacked = two_steps(layout.stack(params))
    assert isinstance(stacked[0], stacking.StackedState)
    # Adam magnifies float rounding (the norms sum in another order) where second moments are tiny;
    # decaying a vector (A_log, dt_bias, norms) by mistake would move it by ~1e-2.
    for a, b in zip(jax.tree.leaves(stacking.unstack(stacked[:2])), jax.tree.leaves(per_layer[:2]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-5)
    for a, b in zip(stacked[2], per_layer[2]):
        for name in ("loss", "grad_norm", "param_norm"):
            np.testing.assert_allclose(a[name], b[name], rtol=1e-6)


def test_a_stacked_teacher_gives_the_same_distillation_loss():
    cfg = tiny(num_hidden_layers=5, layer_types=(F,) * 5, mlp_only_layers=(1, 3), num_mtp_layers=0,
               moe_backend="dense", scan_layers=True)  # fmt: skip
    graphdef, params = split(cfg)
    teacher_graphdef, teacher_params = nnx.split(Qwen3NextForCausalLM(cfg, rngs=nnx.Rngs(1)), nnx.Param)
    objective = losses.distillation_objective(aux_coef=cfg.router_aux_loss_coef, chunk_size=64)
    loss_fn = stage_functions.make_loss_fn(graphdef, objective, MtpUse(), teacher_graphdef)
    weights = stage_functions.loss_weights_fn(run_config.loss_section(distillation=True), 10)
    eval_step = stage_functions.AtStep(jax.jit(stage_functions.make_weighted_eval_step(loss_fn)), weights)
    tokens = jnp.asarray(random_tokens(2, 17, cfg.vocab_size))
    stacked_teacher = stacking.layout_for(teacher_params, scan_layers=True).stack(teacher_params)
    per_layer, stacked = eval_step(params, teacher_params, tokens, 0), eval_step(params, stacked_teacher, tokens, 0)
    assert per_layer["kd"] > 0
    for name in per_layer:
        np.testing.assert_allclose(stacked[name], per_layer[name], rtol=1e-6, err_msg=name)
