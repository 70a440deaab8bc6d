"""The grouped-matmul MoE backends (grouped, gmm, ragged) and the expert-parallel backend on 8 fake CPU
devices against the dense reference."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from slimqwen_jax import losses, moe, sharding, stage_functions
from slimqwen_jax.config import ConfigError, tiny
from slimqwen_jax.model import Qwen3NextForCausalLM
from slimqwen_jax.stage_functions import MtpUse
from slimqwen_jax.hlo_stats import collective_arrays
from slimqwen_jax.testing import max_relative_error

N, D, F, E, K = 64, 16, 8, 16, 2
TOL = 1e-5
MESHES = {"2x4": (2, 1, 4), "1x8": (1, 1, 8)}  # (data, fsdp, expert)


def make_mesh(name):
    return sharding.make_mesh(dict(zip(sharding.MESH_AXES, MESHES[name])))


def inputs(routing: str, seed: int = 0):
    """(x, weights, experts, gate, up, down); `skewed`: expert 0 in every token, 3 others share the
    second choice, 12 experts idle (whole devices of the 1x8 mesh get nothing); `two_experts`: every
    token to the last expert and expert 3, the 14 others idle."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, D)).astype(np.float32)
    gate, up = (0.3 * rng.standard_normal((E, D, F)).astype(np.float32) for _ in range(2))
    down = 0.3 * rng.standard_normal((E, F, D)).astype(np.float32)
    weights = rng.uniform(size=(N, K)).astype(np.float32)
    if routing == "uniform":
        experts = np.argsort(rng.standard_normal((N, E)), axis=1)[:, :K]
    elif routing == "two_experts":
        experts = np.broadcast_to([E - 1, 3], (N, K))
    else:
        experts = np.stack([np.zeros(N, int), rng.choice([1, 5, 9], N, p=[0.8, 0.1, 0.1])], axis=1)
    return x, weights, experts.astype(np.int32), gate, up, down


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name):
    """`jax.lax.ragged_all_to_all`'s documented semantics (one slice per device) from `all_gather`, which
    XLA:CPU runs: output row r of this device comes from the source s whose slice lands on it."""
    del recv_sizes  # implied by the senders' send_sizes
    me = jax.lax.axis_index(axis_name)
    gather = functools.partial(jax.lax.all_gather, axis_name=axis_name)
    operands = gather(operand)  # [P, M, ...]
    starts, sizes, sources = gather(output_offsets)[:, me], gather(send_sizes)[:, me], gather(input_offsets)[:, me]
    rows = jnp.arange(output.shape[0])
    inside = (rows >= starts[:, None]) & (rows < (starts + sizes)[:, None])  # [P, R]
    source = jnp.argmax(inside, axis=0)  # [R]
    received = operands[source, jnp.clip(sources[source] + rows - starts[source], 0, operand.shape[0] - 1)]
    mask = jnp.any(inside, axis=0).reshape(-1, *[1] * (output.ndim - 1))
    return jnp.where(mask, received, output)


@functools.cache
def value_and_grads(backend, mesh_name=None, capacity_factor=None, exchange=None):
    """jit(x, weights, experts, gate, up, down -> ((loss, out, dropped), grads w.r.t. all but experts))."""
    kwargs = {} if mesh_name is None else {"mesh": make_mesh(mesh_name), "capacity_factor": capacity_factor}
    if exchange is not None:
        kwargs["exchange"] = exchange

    def loss(x, weights, gate, up, down, experts):
        if backend is moe.expert_parallel_experts:
            out, dropped = backend(x, weights, experts, gate, up, down, **kwargs)
        else:
            out, dropped = backend(x, weights, experts, gate, up, down), jnp.zeros(())
        return jnp.sum(out * jnp.sin(out)), (out, dropped)

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)
    return jax.jit(lambda x, weights, experts, gate, up, down: grad(x, weights, gate, up, down, experts))


# Token-level backends over the grouped matmuls; `gmm` runs megablox's kernel in Pallas' interpreter.
GROUPED = {
    name: functools.partial(moe.routed_swiglu_experts, ffn=moe.expert_ffn_for(name, "cpu")) for name in moe.EXPERT_FFNS
}


def test_eight_devices():
    assert len(jax.devices()) == 8


@pytest.mark.parametrize("name", sorted(GROUPED))
def test_grouped_backends_match_dense_outputs_and_gradients(name):
    """Outputs and gradients (x, routing weights, expert weights) with balanced routing, an
    overloaded expert and idle ones, and all tokens on two experts (one jit per backend)."""
    for routing in ("uniform", "skewed", "two_experts"):
        args = inputs(routing)
        (_, (expected, _)), expected_grads = value_and_grads(moe.swiglu_experts_dense)(*args)
        (_, (out, _)), grads = value_and_grads(GROUPED[name])(*args)
        assert max_relative_error(out, expected) <= TOL, routing
        for grad, g, eg in zip(("x", "weights", "gate", "up", "down"), grads, expected_grads, strict=True):
            assert max_relative_error(g, eg) <= TOL, (routing, grad)


def test_expert_layout_pads_each_group_to_whole_blocks():
    """Against a numpy construction: groups in expert order, each padded to a multiple of the block,
    rows stable within a group, rows naming no expert (>= E) left out."""
    row_experts = np.array([2, 0, 2, 5, 2, 0, 7, 2])  # 5, 7 >= E = 4: no expert; 1 and 3 idle
    block, num_rows = 2, 8 + 4 * (2 - 1)
    source, dest, sizes = map(np.asarray, moe.expert_layout(row_experts, 4, num_rows, block))
    expected_source, expected_sizes = [], []
    for e in range(4):
        rows = list(np.flatnonzero(row_experts == e))
        padded = -(-len(rows) // block) * block
        expected_source += rows + [len(row_experts)] * (padded - len(rows))
        expected_sizes.append(padded)
    expected_source += [len(row_experts)] * (num_rows - len(expected_source))
    np.testing.assert_array_equal(source, expected_source)
    np.testing.assert_array_equal(sizes, expected_sizes)
    np.testing.assert_array_equal(
        dest, [expected_source.index(m) if e < 4 else num_rows for m, e in enumerate(row_experts)]
    )
    assert moe.grouped_block_size(8 * 512 * 2, 16) == 128 and moe.grouped_block_size(128, 16) == 8


@pytest.mark.parametrize(
    "name, platform, marker", [("gmm", "tpu", "tpu_custom_call"), ("ragged", "cuda", "chlo.ragged_dot")]
)
def test_accelerator_paths_lower_natively(name, platform, marker):
    """Forward and backward lower for their platform on this CPU: megablox's kernel (3 grouped matmuls
    forward, 6 backward; at least 6 distinct) and XLA's native ragged dot."""

    def loss(x, weights, experts, gate, up, down):
        return jnp.sum(moe.routed_swiglu_experts(x, weights, experts, gate, up, down, ffn=moe.EXPERT_FFNS[name]))

    grad = jax.grad(loss, argnums=(0, 1, 3, 4, 5))
    text = jax.jit(grad).trace(*inputs("uniform")).lower(lowering_platforms=(platform,)).as_text()
    assert text.count(marker) >= 6, text.count(marker)  # identical calls share one lowered function


def test_auto_backend_resolves_by_platform_when_the_model_is_built(monkeypatch):
    assert [moe.resolve_backend("auto", p) for p in ("cpu", "gpu", "tpu")] == ["grouped", "ragged", "gmm"]
    assert moe.resolve_backend("dense", "tpu") == "dense"
    for platform, backend, ffn in (
        ("cpu", "grouped", moe.expert_ffn_grouped),
        ("gpu", "ragged", moe.expert_ffn_ragged),
        ("tpu", "gmm", moe.expert_ffn_gmm),
    ):
        monkeypatch.setattr(jax, "default_backend", lambda platform=platform: platform)
        experts = moe.Experts(tiny(), rngs=nnx.Rngs(0))
        assert (experts.backend, experts.ffn) == (backend, ffn)
        parallel = moe.Experts(tiny(moe_backend="expert_parallel"), rngs=nnx.Rngs(0))
        assert (parallel.backend, parallel.ffn) == ("expert_parallel", ffn)
        assert parallel.exchange is (None if platform == "cpu" else jax.lax.ragged_all_to_all)
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert moe.Experts(tiny(moe_backend="gmm"), rngs=nnx.Rngs(0)).ffn.keywords == {"interpret": True}


@pytest.mark.parametrize("routing", ["uniform", "skewed"])
@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_expert_parallel_matches_dense_outputs_and_gradients(mesh_name, routing):
    args = inputs(routing)
    (_, (expected, _)), expected_grads = value_and_grads(moe.swiglu_experts_dense)(*args)
    (_, (out, dropped)), grads = value_and_grads(moe.expert_parallel_experts, mesh_name)(*args)
    assert float(dropped) == 0.0
    assert max_relative_error(out, expected) <= TOL
    for name, g, eg in zip(("x", "weights", "gate", "up", "down"), grads, expected_grads, strict=True):
        assert max_relative_error(g, eg) <= TOL, name


@pytest.mark.parametrize("routing", ["uniform", "skewed", "two_experts"])
@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_ragged_exchange_matches_dense_outputs_and_gradients(mesh_name, routing):
    """The accelerators' dropless path (only existing copies sent) with the ragged all-to-all emulated."""
    args = inputs(routing)
    (_, (expected, _)), expected_grads = value_and_grads(moe.swiglu_experts_dense)(*args)
    f = value_and_grads(moe.expert_parallel_experts, mesh_name, exchange=emulated_ragged_all_to_all)
    (_, (out, dropped)), grads = f(*args)
    assert float(dropped) == 0.0
    assert max_relative_error(out, expected) <= TOL
    for name, g, eg in zip(("x", "weights", "gate", "up", "down"), grads, expected_grads, strict=True):
        assert max_relative_error(g, eg) <= TOL, name


@pytest.mark.parametrize(
    "ffn, platform, marker", [("gmm", "tpu", "tpu_custom_call"), ("ragged", "cuda", "chlo.ragged_dot")]
)
def test_ragged_exchange_lowers_for_accelerators(ffn, platform, marker):
    """Forward and backward with XLA's ragged all-to-all and the platform's grouped matmul, on the 1x8
    mesh, lower for the accelerator from this CPU (which cannot run them): three exchanges forward
    (copies, their experts, results), their transposes backward."""
    mesh = make_mesh("1x8")

    def loss(x, weights, experts, gate, up, down):
        out, _ = moe.expert_parallel_experts(
            x, weights, experts, gate, up, down, mesh=mesh, ffn=moe.EXPERT_FFNS[ffn], exchange=jax.lax.ragged_all_to_all
        )
        return jnp.sum(out)

    shard = lambda a, spec: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=jax.NamedSharding(mesh, spec))
    x, weights, experts, gate, up, down = inputs("uniform")
    tokens, stacked = jax.P(sharding.LOGICAL_RULES["batch"]), jax.P("expert")
    abstract = [shard(a, tokens) for a in (x, weights, experts)] + [shard(a, stacked) for a in (gate, up, down)]
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 3, 4, 5)))
    text = grad.trace(*abstract).lower(lowering_platforms=(platform,)).as_text()
    assert text.count("ragged_all_to_all") >= 5 and marker in text, text.count("ragged_all_to_all")


def overflowing_copies(experts, shards, devices, capacity):
    """Independent count of the policy: per token shard and destination device, first choices
    before second choices, then token order; copies past `capacity` are dropped. -> bool [N, K]."""
    dropped = np.zeros(experts.shape, bool)
    per_device = E // devices
    for tokens in np.split(np.arange(len(experts)), shards):
        used = np.zeros(devices, int)
        for slot in range(experts.shape[1]):
            for t in tokens:
                dest = experts[t, slot] // per_device
                dropped[t, slot] = used[dest] >= capacity
                used[dest] += 1
    return dropped


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_capacity_overflow_is_counted_and_dropped(mesh_name):
    capacity_factor = 1.25
    x, weights, experts, gate, up, down = inputs("skewed")
    devices = MESHES[mesh_name][-1]
    local_tokens = N // math.prod(MESHES[mesh_name])
    capacity = math.ceil(capacity_factor * local_tokens * K / devices)
    assert moe.expert_capacity(local_tokens, K, devices, capacity_factor) == capacity
    dropped = overflowing_copies(experts, math.prod(MESHES[mesh_name]), devices, capacity)
    assert 0 < dropped.mean() < 1
    (_, (out, fraction)), _ = value_and_grads(moe.expert_parallel_experts, mesh_name, capacity_factor)(
        x, weights, experts, gate, up, down
    )
    assert float(fraction) == pytest.approx(dropped.mean(), abs=1e-7)
    expected = moe.swiglu_experts_dense(x, np.where(dropped, 0.0, weights), experts, gate, up, down)
    assert max_relative_error(out, expected) <= TOL


def test_experts_not_divisible_by_the_expert_axis_are_refused():
    x, weights, experts, gate, up, down = inputs("uniform")
    mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "expert": 4})
    with pytest.raises(
        ValueError, match=r"num_experts \(6\) is not divisible by the size of the mesh's 'expert' axis \(4\)"
    ):
        moe.expert_parallel_experts(x, weights, experts % 6, gate[:6], up[:6], down[:6], mesh=mesh)
    with pytest.raises(ConfigError, match="moe_capacity_factor must be >= 0"):
        tiny(moe_capacity_factor=-1.0)


def test_without_an_expert_axis_it_is_the_grouped_backend():
    args = inputs("skewed")
    expected = GROUPED["grouped"](*args)
    for mesh in (None, sharding.make_mesh({"data": 4, "fsdp": 2, "expert": 1})):
        out, dropped = moe.expert_parallel_experts(*args, mesh=mesh)
        assert max_relative_error(out, expected) == 0.0 and float(dropped) == 0.0


@pytest.mark.parametrize("routing", ["uniform", "skewed"])
def test_each_batch_shard_routes_its_own_tokens(routing):
    """`batch_local_experts` and `batch_local_top_k` under a context mesh of 8 batch shards (62 tokens:
    the last shard padded) equal the unsharded grouped backend and `jax.lax.top_k`, with gradients;
    the compiled program moves no token rows between devices (each shard sorts its own copies)."""
    x, weights, experts, gate, up, down = (jnp.asarray(a) for a in inputs(routing))
    ffn = moe.expert_ffn_for("grouped", "cpu")

    def loss(fn):
        def value(x, weights, gate, up, down):
            out = fn(x, weights, experts[: x.shape[0]], gate, up, down, ffn=ffn)
            return jnp.sum(out * jnp.sin(out))

        return jax.jit(jax.value_and_grad(value, argnums=(0, 1, 2, 3, 4)))

    expected = loss(moe.routed_swiglu_experts)(x[:62], weights[:62], gate, up, down)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "expert": 2})
    with jax.set_mesh(mesh):
        step = loss(moe.batch_local_experts)
        sharded = step(x[:62], weights[:62], gate, up, down)
        placed = jax.device_put((x, weights), sharding.batch_sharding(mesh, 2))  # 64 tokens, 8 per shard
        collectives = step.lower(*placed, gate, up, down).compile().as_text()
        probs = jax.nn.softmax(x[:62] @ gate[:, :, 0].T)
        top_k = jax.jit(moe.batch_local_top_k, static_argnums=1)(probs, K)
    for ours, reference in zip(jax.tree.leaves(sharded), jax.tree.leaves(expected), strict=True):
        assert max_relative_error(ours, reference) <= TOL
    # What is left to sum over the shards: the loss and the expert weights' gradients, no token rows.
    assert {shape for _, shape in collective_arrays(collectives)} <= {(), gate.shape, down.shape}
    for ours, reference in zip(top_k, jax.lax.top_k(probs, K), strict=True):
        np.testing.assert_array_equal(ours, reference)


def test_block_uses_the_context_mesh_and_sows_routing_metrics():
    """SparseMoeBlock with `expert_parallel` under `jax.set_mesh` equals the default block; 14 tokens
    (not a multiple of 8 shards) exercise the padding; `nnx.capture` returns the routing metrics."""
    cfg = tiny(hidden_size=32, num_experts=8)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 7, 32)), jnp.float32)
    expected, expected_logits = moe.SparseMoeBlock(cfg, rngs=nnx.Rngs(0))(x)
    for capacity_factor in (0.0, 0.5):
        block = moe.SparseMoeBlock(
            cfg.replace(moe_backend="expert_parallel", moe_capacity_factor=capacity_factor), rngs=nnx.Rngs(0)
        )
        with jax.set_mesh(make_mesh("2x4")):
            (out, logits), intermediates = nnx.jit(lambda m, x: nnx.capture(m, nnx.Intermediate)(x))(block, x)
        (metrics,) = intermediates["routing_metrics"]
        _, chosen = moe.route(logits, cfg.num_experts_per_tok, cfg.norm_topk_prob)
        load = np.bincount(np.asarray(chosen).ravel(), minlength=cfg.num_experts) / chosen.size
        np.testing.assert_allclose(metrics["expert_load"], load, rtol=1e-6)
        assert max_relative_error(logits, expected_logits) <= TOL
        if capacity_factor == 0.0:
            assert float(metrics["dropped_fraction"]) == 0.0
            assert max_relative_error(out, expected) <= TOL
        else:  # capacity 1 copy per (shard, device): 2 local tokens x 2 slots cannot all fit
            assert moe.expert_capacity(2, 2, 4, capacity_factor) == 1
            assert 0 < float(metrics["dropped_fraction"]) < 1
    assert not hasattr(block, "routing_metrics")  # nothing stored outside nnx.capture


def lm_loss(graphdef, cfg):
    """The trainer's pretraining loss (CE + 0.3 x MTP CE + aux) as (params, tokens) -> (loss, metrics)."""
    objective = losses.distillation_objective(aux_coef=cfg.router_aux_loss_coef, chunk_size=16)
    loss_fn = stage_functions.make_loss_fn(graphdef, objective, MtpUse(student=True))
    return lambda params, tokens: loss_fn(params, None, tokens, {"lam": 0.0, "mtp_lam": 0.0, "beta": 0.3})


def sharded_model(cfg, mesh=None):
    """The tiny model (seed 0), its parameters placed by the logical-axis rules on `mesh` if given."""
    graphdef, state = nnx.split(Qwen3NextForCausalLM(cfg, rngs=nnx.Rngs(0)))
    return graphdef, state if mesh is None else jax.device_put(state, sharding.state_shardings(state, mesh))


def test_whole_model_with_expert_parallelism_matches_one_device():
    """Logits and all parameter gradients: expert_parallel on a data=2 x expert=4 mesh (dropless)
    against the default (grouped) backend on one device."""
    cfg = tiny(hidden_size=32, num_experts=8)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab_size, (4, 13)), jnp.int32)

    def logits_and_grads(graphdef, state, tokens):
        forward = lambda state: lm_loss(graphdef, cfg)(state, tokens)  # noqa: E731
        (_, metrics), grads = jax.value_and_grad(forward, has_aux=True)(state)
        return nnx.merge(graphdef, state)(tokens[:, :-1]).logits, metrics, grads

    single = jax.jit(logits_and_grads, static_argnums=0)(*sharded_model(cfg), tokens)
    mesh = make_mesh("2x4")
    graphdef, state = sharded_model(cfg.replace(moe_backend="expert_parallel"), mesh)
    assert state["model"]["layers"][0]["mlp"]["experts"]["gate_proj"][...].sharding.spec[0] == "expert"
    with jax.set_mesh(mesh):
        sharded = jax.jit(logits_and_grads, static_argnums=0)(graphdef, state, tokens)
    assert max_relative_error(sharded[0], single[0]) <= TOL
    assert float(jnp.max(sharded[1]["dropped_fraction"])) == 0.0
    # Each gradient relative to its largest entry, floored at 1e-3 of the largest gradient anywhere:
    # A_log and dt_bias gradients are ~1e-6 sums with cancellation, where reassociation shows.
    floor = 1e-3 * max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(single[2]))
    for (path, g), eg in zip(jax.tree.leaves_with_path(sharded[2]), jax.tree.leaves(single[2]), strict=True):
        error = float(jnp.max(jnp.abs(g - eg))) / max(float(jnp.max(jnp.abs(eg))), floor)
        assert error <= TOL, jax.tree_util.keystr(path)


def test_loss_reports_routing_metrics_of_every_moe_layer():
    """expert_load [L_moe, E] (decoder MoE layers, then MTP) equals a numpy count of the top-k
    choices of the router logits the model returns; max_load is its max times E; layer_aux_loss is
    HF's load-balancing loss of that layer alone (`load_balancing_loss` is checked against HF)."""
    cfg = tiny(num_experts=8, mlp_only_layers=(1,))
    model = Qwen3NextForCausalLM(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 17)), jnp.int32)
    graphdef, params = nnx.split(model)
    _, metrics = lm_loss(graphdef, cfg)(params, tokens)
    router_logits = model(tokens[:, :-1]).router_logits  # decoder MoE layers only
    assert metrics["expert_load"].shape == (len(router_logits) + cfg.num_mtp_layers, cfg.num_experts)
    for layer, logits in enumerate(router_logits):
        chosen = np.argsort(-np.asarray(logits), axis=1, kind="stable")[:, : cfg.num_experts_per_tok]
        load = np.bincount(chosen.ravel(), minlength=cfg.num_experts) / chosen.size
        np.testing.assert_allclose(metrics["expert_load"][layer], load)
        aux = moe.load_balancing_loss((logits,), cfg.num_experts_per_tok)
        np.testing.assert_allclose(metrics["layer_aux_loss"][layer], aux, rtol=1e-6)
    np.testing.assert_allclose(metrics["max_load"], np.max(metrics["expert_load"], axis=1) * cfg.num_experts)
    assert not np.any(metrics["dropped_fraction"])
