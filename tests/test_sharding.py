"""Mesh construction, logical-axis placement and a sharded train step against one device."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from slimqwen_jax import losses, model, run_config, sharding, stage_functions, train_state
from slimqwen_jax.config import tiny
from slimqwen_jax.model import Qwen3NextForCausalLM
from slimqwen_jax.stage_functions import MtpUse
from slimqwen_jax.hlo_stats import collective_arrays


@pytest.mark.parametrize(
    "mesh, message",
    [
        (dict(data=3, fsdp=1, expert=1), "needs 3 devices, but 8"),
        (dict(data=-1, fsdp=3, expert=1), "cannot be split"),
        (dict(data=-1, fsdp=-1, expert=1), "at most one may be -1"),
        (dict(data=0, fsdp=1, expert=1), "must be positive"),
    ],
)
def test_bad_meshes_are_rejected(mesh, message):
    with pytest.raises(sharding.MeshError, match=message):
        sharding.make_mesh(mesh)


def test_parameters_follow_the_logical_rules():
    mesh = sharding.make_mesh(dict(data=-1, fsdp=2, expert=1))
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "expert": 1}
    _, state = nnx.split(nnx.eval_shape(lambda: Qwen3NextForCausalLM(tiny(), rngs=nnx.Rngs(0))))
    shardings = sharding.state_shardings(state, mesh)
    layer = shardings["model"]["layers"][3]
    assert layer["self_attn"]["q_proj"]["kernel"].get_value().spec == PartitionSpec("fsdp", None)
    assert layer["self_attn"]["o_proj"]["kernel"].get_value().spec == PartitionSpec(None, "fsdp")
    assert layer["mlp"]["experts"]["down_proj"].get_value().spec == PartitionSpec("expert", None, "fsdp")
    assert layer["self_attn"]["q_norm"]["weight"].get_value().spec == PartitionSpec(None)
    fsdp3 = jax.sharding.Mesh(np.asarray(jax.devices()[:3]).reshape(1, 3, 1), sharding.MESH_AXES)
    with pytest.raises(sharding.MeshError, match="axis 'embed' of size 64 is not divisible"):
        sharding.state_shardings(state, fsdp3)


def test_experts_not_divisible_by_the_expert_axis_are_rejected():
    mesh = sharding.make_mesh(dict(data=2, fsdp=1, expert=4))
    _, state = nnx.split(nnx.eval_shape(lambda: Qwen3NextForCausalLM(tiny(num_experts=6), rngs=nnx.Rngs(0))))
    with pytest.raises(
        sharding.MeshError, match=r"mlp.experts.\w+_proj: axis 'expert' of size 6 is not divisible by mesh expert \(4\)"
    ):
        sharding.state_shardings(state, mesh)


STUDENT = tiny(hidden_size=32, num_experts=4)
TEACHER = tiny(hidden_size=48, num_hidden_layers=5, num_experts=8)  # float32: no bf16 rounding noise


def distillation_step(graphdef, teacher_graphdef, tx, loss, mesh, param_shardings, opt_shardings):
    """The trainer's jitted distillation step (MTP, MTP-KD from the teacher's MTP) for `STUDENT`, its
    micro-batches over the mesh's batch axes."""
    objective = losses.distillation_objective(aux_coef=STUDENT.router_aux_loss_coef, chunk_size=loss.chunk_size)
    loss_fn = stage_functions.make_loss_fn(
        graphdef, objective, MtpUse(student=True, teacher=True, kd=True), teacher_graphdef
    )
    micro = NamedSharding(mesh, PartitionSpec(None, sharding.LOGICAL_RULES["batch"]))
    step = jax.jit(stage_functions.make_weighted_train_step(loss_fn, tx, 1, micro),
                   out_shardings=(param_shardings, opt_shardings, None))  # fmt: skip
    return stage_functions.AtStep(step, stage_functions.loss_weights_fn(loss, 4))


@pytest.mark.slow
@pytest.mark.parametrize(
    "mesh_shape, moe_backend", [((4, 2, 1), "ragged"), ((2, 1, 4), "expert_parallel")], ids=["fsdp", "expert"]
)
def test_sharded_train_steps_match_one_device(mesh_shape, moe_backend):
    """Two distillation steps on a mesh of 8 devices (data=4 x fsdp=2, or data=2 x expert=4 with the
    expert-parallel MoE), student and teacher placed by the same logical-axis rules, equal two steps
    on one device with the ragged MoE."""
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 257, (2, 8, 33)), jnp.int32)
    tx = optax.sgd(0.5)  # linear in the gradients, so float reassociation noise is not amplified
    loss = run_config.loss_section(distillation=True)
    loss.chunk_size = 48
    results = []
    runs = ((jax.devices()[:1], (1, 1, 1), "ragged"), (jax.devices(), mesh_shape, moe_backend))
    for devices, shape, backend in runs:
        mesh = jax.sharding.Mesh(np.asarray(devices).reshape(shape), sharding.MESH_AXES)
        shapes = train_state.abstract_state(STUDENT.replace(moe_backend=backend), tx, mesh)
        graphdef, param_shardings, opt_shardings = shapes.graphdef, shapes.param_shardings, shapes.opt_shardings
        params = train_state.initial_params(STUDENT, "", 0, param_shardings)
        opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
        teacher_graphdef, teacher_params = nnx.split(
            Qwen3NextForCausalLM(TEACHER.replace(moe_backend=backend), rngs=nnx.Rngs(1)), nnx.Param
        )
        teacher_params = jax.device_put(teacher_params, sharding.state_shardings(teacher_params, mesh))
        step = distillation_step(graphdef, teacher_graphdef, tx, loss, mesh, param_shardings, opt_shardings)
        with jax.set_mesh(mesh):
            for i, batch in enumerate(tokens):
                batch = jax.device_put(batch, sharding.batch_sharding(mesh, 2))
                params, opt_state, metrics = step(params, opt_state, teacher_params, batch, i)
        assert params["model"]["layers"][0]["mlp"]["experts"]["gate_proj"][...].sharding.mesh.size == len(devices)
        assert float(metrics["kd"]) > 0
        results.append((jax.tree.leaves(jax.device_get(params)), float(metrics["loss"])))
    for a, b in zip(results[0][0], results[1][0], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert results[0][1] == pytest.approx(results[1][1], rel=1e-5)


def test_data_parallel_distillation_step_moves_no_token_rows():
    """The trainer's distillation step (student and teacher with the CPU's grouped MoE, MTP, chunked
    KD) compiled for a data=8 mesh: each device routes, sorts and scores its own tokens, so the only
    collectives are all-reduces of the gradients and a few metrics (XLA's partitioner would gather
    every token's routing, expert rows and LM-head inputs on every device for the sort, `top_k` and
    the chunked loss without `sharding.on_batch_shards`)."""
    mesh = sharding.make_mesh(dict(data=-1, fsdp=1, expert=1))
    tx = optax.adamw(1e-3)
    loss = run_config.loss_section(distillation=True)
    loss.chunk_size = 64
    shapes = train_state.abstract_state(STUDENT, tx, mesh)
    graphdef, params, param_shardings, opt_shardings = (shapes.graphdef, shapes.params, shapes.param_shardings,
                                                        shapes.opt_shardings)  # fmt: skip
    teacher_graphdef, teacher_params = model.abstract_model(TEACHER)
    step = distillation_step(graphdef, teacher_graphdef, tx, loss, mesh, param_shardings, opt_shardings)
    tokens = jax.ShapeDtypeStruct((16, 33), jnp.int32, sharding=sharding.batch_sharding(mesh, 2))  # 2 rows per device
    with jax.set_mesh(mesh):
        hlo = step.lower(params, jax.eval_shape(tx.init, params), teacher_params, tokens, 0).compile().as_text()
    results = collective_arrays(hlo)
    assert {op for op, _ in results} == {"all-reduce"}
    sizes = [math.prod(p.shape) for p in jax.tree.leaves(params)]
    assert max(math.prod(shape) for _, shape in results) <= max(sizes)
    # Every gradient once; the embedding's and the LM head's twice (the MTP module uses them too).
    assert sum(sizes) <= sum(math.prod(shape) for _, shape in results) <= 1.25 * sum(sizes)


def test_an_embedding_lookup_on_an_fsdp_mesh_matches_take_and_moves_no_whole_table():
    """`sharding.embedding_lookup` on a data 2 x fsdp 2 x expert 2 mesh against `jnp.take` on one
    device: the same rows (bitwise) and gradient (a repeated token; 6 rows, which 8 shards do not
    divide), and no collective of the table's size (for `jnp.take` of batch-sharded ids the TPU
    compiler gathers the table whole and reduces its whole gradient: docs/tpu.md)."""
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, expert=2))
    vocab, width = 64, 16
    table = jax.random.normal(jax.random.key(0), (vocab, width))
    ids = jax.random.randint(jax.random.key(1), (6, 5), 0, vocab).at[0, :3].set(7).at[4, 1].set(7)

    def score(lookup, table, ids):
        return jnp.sum(jnp.sin(lookup(table, ids)))

    sharded = functools.partial(sharding.embedding_lookup, dtype=jnp.float32)
    plain = functools.partial(jnp.take, axis=0)
    expected_rows, expected_grad = plain(table, ids), jax.grad(score, argnums=1)(plain, table, ids)
    with jax.set_mesh(mesh):
        placed = jax.device_put(table, NamedSharding(mesh, PartitionSpec(None, "fsdp")))
        rows = jax.jit(sharded)(placed, ids)
        grad_fn = jax.jit(jax.grad(functools.partial(score, sharded)))
        grad = grad_fn(placed, ids)
        batch = jax.ShapeDtypeStruct((8, 5), jnp.int32, sharding=sharding.batch_sharding(mesh, 2))  # one row a device
        ours = collective_arrays(grad_fn.lower(placed, batch).compile().as_text())
    np.testing.assert_array_equal(rows, expected_rows)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-6, atol=1e-6)
    # The ids, the rows and the gradient of each device's columns (summed over data and expert).
    assert max(math.prod(shape) for _, shape in ours) <= vocab * width // 2, ours


def test_a_seeded_init_on_a_mesh_equals_the_model_built_with_nnx_rngs():
    """`train_state.initial_params` (the init jitted onto the mesh, its keys counted by
    `layers.InitKeys`) equals the jitted init with `nnx.Rngs(seed)`, bit for bit, and
    `model.abstract_model` has the same graph definition and shapes."""
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, expert=2))
    shapes = train_state.abstract_state(STUDENT, optax.sgd(0.1), mesh)
    graphdef, param_shardings = shapes.graphdef, shapes.param_shardings
    params = train_state.initial_params(STUDENT, "", 3, param_shardings)
    reference = jax.jit(lambda: nnx.split(Qwen3NextForCausalLM(STUDENT, rngs=nnx.Rngs(3)), nnx.Param))
    expected_graphdef, expected = reference()
    assert graphdef == expected_graphdef == model.abstract_model(STUDENT)[0]
    for (path, ours), theirs in zip(jax.tree.leaves_with_path(params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(ours, theirs, err_msg=jax.tree_util.keystr(path))
