"""The training objective: chunked LM / KD / MTP terms against naive full-vocabulary references, the
MTP target alignment, the lam / beta schedules, and train steps with a teacher."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from hf_reference import add_mtp_tensors, make_hf_model

from slimqwen_jax import hf, losses, run_config, sharding, stage_functions, train_state
from slimqwen_jax.config import tiny
from slimqwen_jax.losses import HeadInputs
from slimqwen_jax.model import Qwen3NextForCausalLM, abstract_model
from slimqwen_jax.hlo_stats import collective_arrays
from slimqwen_jax.testing import forward, random_tokens

N, D, V = 45, 8, 37  # tokens, width, vocabulary (small: the references build full [N, V] logits)


def log_softmax64(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def numpy_kd(student_logits, teacher_logits, tau: float) -> np.ndarray:
    """Per-token tau^2 KL(softmax(t / tau) || softmax(s / tau)) in float64, written from the formula."""
    log_p = log_softmax64(np.asarray(teacher_logits, np.float64) / tau)
    log_q = log_softmax64(np.asarray(student_logits, np.float64) / tau)
    return tau**2 * np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)


def numpy_ce(logits, targets) -> np.ndarray:
    return -np.take_along_axis(log_softmax64(logits), np.asarray(targets)[:, None], axis=-1)[:, 0]


def random_inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    arrays = dict(
        student=rng.normal(size=(N, D)), student_head=rng.normal(size=(D, V)),
        teacher=rng.normal(size=(N, D + 3)), teacher_head=rng.normal(size=(D + 3, V)),
    )  # fmt: skip
    arrays = {k: jnp.asarray(v, jnp.float32) for k, v in arrays.items()}
    targets = jnp.asarray(rng.integers(0, V, N), jnp.int32)
    mask = jnp.asarray(rng.random(N) < 0.8)
    return arrays, targets, mask


def chunked_means(arrays, targets, mask, chunk_size, temperature=1.0):
    sums = losses.chunked_token_sums(
        arrays["student"], arrays["student_head"], arrays["teacher"], arrays["teacher_head"], targets, mask,
        chunk_size=chunk_size, temperature=temperature,
    )  # fmt: skip
    return {k: sums[k] / sums["count"] for k in ("ce", "kd", "agree")}


def naive_means(arrays, targets, mask, temperature=1.0):
    """Full [N, V] logits and softmaxes in jnp: the unchunked objective, for gradients."""
    student = arrays["student"] @ arrays["student_head"]
    teacher = arrays["teacher"] @ arrays["teacher_head"]
    ce = jax.nn.logsumexp(student, -1) - jnp.take_along_axis(student, targets[:, None], -1)[:, 0]
    p = jax.nn.softmax(teacher / temperature)
    kd = temperature**2 * jnp.sum(
        p * (jax.nn.log_softmax(teacher / temperature) - jax.nn.log_softmax(student / temperature)), -1
    )
    weight = mask.astype(jnp.float32)
    return {"ce": jnp.sum(ce * weight) / jnp.sum(weight), "kd": jnp.sum(kd * weight) / jnp.sum(weight)}


@pytest.mark.parametrize("chunk_size", [5, 16, 45, 64])  # divides N, does not, all of N, more than N
def test_chunked_terms_equal_full_softmax_in_value_and_gradient(chunk_size):
    arrays, targets, mask = random_inputs()
    ours = chunked_means(arrays, targets, mask, chunk_size)
    student = np.asarray(arrays["student"] @ arrays["student_head"])
    teacher = np.asarray(arrays["teacher"] @ arrays["teacher_head"])
    m = np.asarray(mask)
    np.testing.assert_allclose(float(ours["ce"]), numpy_ce(student, targets)[m].mean(), rtol=1e-5)
    np.testing.assert_allclose(float(ours["kd"]), numpy_kd(student, teacher, 1.0)[m].mean(), rtol=1e-5)
    agree = (student.argmax(-1) == teacher.argmax(-1))[m].mean()
    np.testing.assert_allclose(float(ours["agree"]), agree, rtol=1e-6)

    def objective(fn):
        def value(student, student_head):
            terms = fn({**arrays, "student": student, "student_head": student_head})
            return terms["ce"] + 2.0 * terms["kd"]

        return jax.grad(value, argnums=(0, 1))(arrays["student"], arrays["student_head"])

    chunked = objective(lambda a: chunked_means(a, targets, mask, chunk_size))
    naive = objective(lambda a: naive_means(a, targets, mask))
    for ours_grad, reference in zip(chunked, naive):
        np.testing.assert_allclose(ours_grad, reference, rtol=1e-5, atol=1e-7)


def mesh_objective(arrays, terms_of):
    """jit(value_and_grad) of ce + 2 kd in (student, student_head), with the teacher's hidden states,
    the targets and the mask arguments too: the rows the mesh tests place on the batch shards."""

    def value(student, student_head, teacher, targets, mask):
        terms = terms_of({**arrays, "student": student, "student_head": student_head, "teacher": teacher},
                         targets, mask)  # fmt: skip
        return terms["ce"] + 2.0 * terms["kd"], terms

    return jax.jit(jax.value_and_grad(value, argnums=(0, 1), has_aux=True))


def assert_equals_unchunked(arrays, rows, head, terms, grads, atol):
    """`terms` and `grads` of `mesh_objective` equal those of the unchunked objective, one device."""
    (_, expected), reference = mesh_objective(arrays, naive_means)(rows[0], head, *rows[1:])
    for name in ("ce", "kd"):
        np.testing.assert_allclose(float(terms[name]), float(expected[name]), rtol=1e-5)
    for ours, expected_grad in zip(grads, reference, strict=True):
        np.testing.assert_allclose(ours, expected_grad, rtol=1e-5, atol=atol)


def test_chunked_terms_on_the_batch_shards_of_a_mesh():
    """Under a context mesh of 8 batch shards that shards no parameters (data x expert; 45 tokens:
    padded to 48), each shard scans its own tokens and the sums meet once: values and gradients
    equal the unchunked objective, greedy tokens equal numpy's argmax, and, with 48 tokens placed on
    the shards, no collective carries token rows or a head gradient per chunk."""
    arrays, targets, mask = random_inputs()
    mesh = sharding.make_mesh({"data": 4, "fsdp": 1, "expert": 2})

    chunked = mesh_objective(arrays, lambda a, t, m: chunked_means(a, t, m, 4))
    argmax = jax.jit(lambda hidden, head: losses.chunked_argmax(hidden, head, chunk_size=4))
    rows = (arrays["student"], arrays["teacher"], targets, mask)  # [N, ...]
    head = arrays["student_head"]
    with jax.set_mesh(mesh):
        (_, terms), grads = chunked(rows[0], head, *rows[1:])
        greedy = argmax(rows[0], head)
        by_rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(sharding.LOGICAL_RULES["batch"]))
        placed = jax.device_put([jnp.concatenate([a, a[: 48 - N]]) for a in rows], by_rows)  # 6 tokens per shard
        hlo = chunked.lower(placed[0], head, *placed[1:]).compile().as_text()
    assert_equals_unchunked(arrays, rows, head, terms, grads, atol=1e-7)
    np.testing.assert_array_equal(greedy, np.argmax(np.asarray(rows[0] @ head), -1))
    # One reduction of the sums and one of the head's gradient (not one per chunk inside the scan).
    results = collective_arrays(hlo)
    assert {shape for _, shape in results} <= {(), (D, V)} and results.count(("all-reduce", (D, V))) == 1


@pytest.mark.parametrize("fsdp", [2, 4])
def test_chunked_terms_with_the_heads_split_by_vocabulary(fsdp):
    """On a mesh that shards parameters over fsdp (2 or 4 devices, whose count does not divide the
    37-word vocabulary: padded), the heads are split by vocabulary (`losses.vocab_sharded_token_sums`):
    values, top-1 agreement and gradients equal the unchunked objective, and no collective carries a
    whole head or its gradient (the padding included)."""
    arrays, targets, mask = random_inputs()
    rng = np.random.default_rng(1)  # a teacher that agrees with the student on some tokens
    arrays["teacher"] = jnp.concatenate([arrays["student"], arrays["teacher"][:, D:]], axis=1)
    arrays["teacher_head"] = arrays["teacher_head"].at[:D].set(arrays["student_head"] + 0.3 * rng.normal(size=(D, V)))
    mesh = sharding.make_mesh({"data": 8 // fsdp // 2, "fsdp": fsdp, "expert": 2})

    chunked = mesh_objective(arrays, lambda a, t, m: chunked_means(a, t, m, 4))
    rows, head = (arrays["student"], arrays["teacher"], targets, mask), arrays["student_head"]  # [N, ...]
    with jax.set_mesh(mesh):
        assert sharding.embed_group_axes(mesh) == ("fsdp",)
        (_, terms), grads = chunked(rows[0], head, *rows[1:])
        # As in a train step: 48 tokens on the batch shards, the head sharded by width over fsdp.
        placed = [jax.ShapeDtypeStruct((48, *a.shape[1:]), a.dtype, sharding=sharding.batch_sharding(mesh, a.ndim))
                  for a in rows]  # fmt: skip
        by_width = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp", None))
        head_shape = jax.ShapeDtypeStruct((D, V), jnp.float32, sharding=by_width)
        hlo = chunked.lower(placed[0], head_shape, *placed[1:]).compile().as_text()
    assert_equals_unchunked(arrays, rows, head, terms, grads, atol=1e-6)
    student = np.asarray(arrays["student"] @ arrays["student_head"])
    teacher = np.asarray(arrays["teacher"] @ arrays["teacher_head"])
    agree = (student.argmax(-1) == teacher.argmax(-1))[np.asarray(mask)].mean()
    assert 0.2 < agree < 1 and float(terms["agree"]) == pytest.approx(agree, rel=1e-6)
    assert max(math.prod(shape) for _, shape in collective_arrays(hlo)) < D * V  # a chunk's rows, a head's columns


@pytest.mark.parametrize("tau", [0.5, 2.0])
def test_temperature_against_the_numpy_formula(tau):
    arrays, targets, mask = random_inputs(seed=1)
    ours = chunked_means(arrays, targets, mask, chunk_size=16, temperature=tau)
    student = np.asarray(arrays["student"] @ arrays["student_head"])
    teacher = np.asarray(arrays["teacher"] @ arrays["teacher_head"])
    expected = numpy_kd(student, teacher, tau)[np.asarray(mask)].mean()
    np.testing.assert_allclose(float(ours["kd"]), expected, rtol=1e-5)
    # The tau^2 factor: not the plain KL of the softened distributions.
    assert not math.isclose(expected, expected / tau**2, rel_tol=1e-3)


# ---------------------------------------------------------------------------- MTP alignment
def test_mtp_targets_and_masks_on_a_hand_made_window():
    tokens = jnp.asarray([[10, 11, 12, 13, 14, 15]])  # L = 5 inputs
    for depth, expected_targets, expected_mask in [
        (0, [12, 13, 14, 15, 0], [1, 1, 1, 1, 0]),
        (1, [13, 14, 15, 0, 0], [1, 1, 1, 0, 0]),
    ]:
        targets, mask = losses.mtp_targets(tokens, depth)
        np.testing.assert_array_equal(np.asarray(targets)[0], expected_targets)
        np.testing.assert_array_equal(np.asarray(mask)[0], np.asarray(expected_mask, bool))


def objective_terms(student: HeadInputs, teacher: HeadInputs, tokens, target: str) -> dict:
    objective = losses.distillation_objective(aux_coef=0.0, chunk_size=4, mtp_kd_target=target)
    return objective(student, teacher, tokens, {"lam": jnp.float32(0.5), "mtp_lam": jnp.float32(0.5),
                                                "beta": jnp.float32(0.5)})[1]  # fmt: skip


@pytest.mark.parametrize("depths", [1, 2])
def test_mtp_kd_reads_the_teacher_at_the_aligned_position(depths):
    """A student MTP head that reproduces the teacher's distribution for the same target token has
    MTP-KD 0; the same hidden states one position off do not."""
    rng = np.random.default_rng(depths)
    b, length = 2, 9
    tokens = jnp.asarray(rng.integers(0, V, (b, length + 1)))
    head = jnp.asarray(rng.normal(size=(D, V)), jnp.float32)
    hidden = jnp.asarray(rng.normal(size=(b, length, D)), jnp.float32)
    teacher_mtp = jnp.asarray(rng.normal(size=(depths, b, length, D)), jnp.float32)
    teacher = HeadInputs(hidden, teacher_mtp, head, jnp.float32(0))

    # teacher_backbone: MTP depth d at position i predicts t_{i+2+d}, as the backbone does at i + 1 + d.
    aligned = jnp.stack([jnp.roll(hidden, -(d + 1), axis=1) for d in range(depths)])  # row i <- row i + 1 + d
    terms = objective_terms(HeadInputs(hidden, aligned, head, jnp.float32(0)), teacher, tokens, "teacher_backbone")
    assert float(terms["mtp_kd"]) < 1e-6 and float(terms["kd"]) < 1e-6
    off_by_one = jnp.stack([jnp.roll(hidden, -(d + 2), axis=1) for d in range(depths)])
    terms = objective_terms(HeadInputs(hidden, off_by_one, head, jnp.float32(0)), teacher, tokens, "teacher_backbone")
    assert float(terms["mtp_kd"]) > 0.1

    # teacher_mtp: the teacher's own MTP head at the same depth and position.
    terms = objective_terms(HeadInputs(hidden, teacher_mtp, head, jnp.float32(0)), teacher, tokens, "teacher_mtp")
    assert float(terms["mtp_kd"]) < 1e-6
    shifted = jnp.roll(teacher_mtp, 1, axis=2)
    terms = objective_terms(HeadInputs(hidden, shifted, head, jnp.float32(0)), teacher, tokens, "teacher_mtp")
    assert float(terms["mtp_kd"]) > 0.1


def test_mtp_cross_entropy_matches_a_naive_loop():
    rng = np.random.default_rng(0)
    b, length, depths = 2, 8, 2
    tokens = rng.integers(0, V, (b, length + 1))
    head = rng.normal(size=(D, V)).astype(np.float32)
    mtp_hidden = rng.normal(size=(depths, b, length, D)).astype(np.float32)
    student = HeadInputs(jnp.zeros((b, length, D)), jnp.asarray(mtp_hidden), jnp.asarray(head), jnp.float32(0))
    objective = losses.distillation_objective(aux_coef=0.0, chunk_size=3)
    weights = {"lam": jnp.float32(0), "mtp_lam": jnp.float32(0), "beta": jnp.float32(1)}
    metrics = objective(student, None, jnp.asarray(tokens), weights)[1]
    per_depth = []
    for depth in range(depths):
        terms = [
            numpy_ce((mtp_hidden[depth, i, j] @ head)[None], [tokens[i, j + 2 + depth]])[0]
            for i in range(b)
            for j in range(length)
            if j + 2 + depth <= length
        ]
        per_depth.append(np.mean(terms))
    np.testing.assert_allclose(float(metrics["mtp_ce"]), np.mean(per_depth), rtol=1e-5)


# ---------------------------------------------------------------------------- schedules
def schedule(kind, start, end):
    return ml_collections.ConfigDict(dict(schedule=kind, start=start, end=end))


def test_weight_schedules():
    linear = losses.weight_schedule(schedule("linear", 1.0, 0.75), 100)
    cosine = losses.weight_schedule(schedule("cosine", 0.3, 0.1), 100)
    constant = losses.weight_schedule(schedule("constant", 0.4, 0.4), 100)
    for step in (0, 30, 50, 100, 150):
        progress = min(step / 100, 1.0)
        assert float(linear(step)) == pytest.approx(1.0 - 0.25 * progress)
        assert float(cosine(step)) == pytest.approx(0.1 + 0.1 * (1 + math.cos(math.pi * progress)), abs=1e-6)
        assert float(constant(step)) == pytest.approx(0.4)


@pytest.mark.parametrize("span", ["run", "stage"])
def test_loss_weights_over_the_run_or_restarting_at_each_stage(span):
    """lam, mtp_lam and beta of the second of two stages (steps 40..99 of 100): on the global step,
    or from their start values again over the stage's own 60 steps."""
    loss = run_config.loss_section(distillation=True)  # lam linear 1.0 -> 0.75, beta cosine 0.3 -> 0.1
    loss.mtp_lam, loss.weight_span = schedule("linear", 0.5, 0.0), span
    weights = stage_functions.loss_weights_fn(loss, *stage_functions.weight_span(loss, 100, 40, 60))
    for step in (40, 70, 99):
        progress = step / 100 if span == "run" else (step - 40) / 60
        values = {k: float(v) for k, v in weights(jnp.int32(step)).items()}
        assert values["lam"] == pytest.approx(1.0 - 0.25 * progress)
        assert values["mtp_lam"] == pytest.approx(0.5 - 0.5 * progress)
        assert values["beta"] == pytest.approx(0.1 + 0.1 * (1 + math.cos(math.pi * progress)), abs=1e-6)
    loss.mtp_lam.schedule = losses.FOLLOW_LAM  # the default: the MTP terms' KD share is lam
    weights = stage_functions.loss_weights_fn(loss, 100)
    assert float(weights(jnp.int32(30))["mtp_lam"]) == float(weights(jnp.int32(30))["lam"]) == pytest.approx(0.925)


def test_bad_loss_configs_name_every_problem():
    loss = run_config.loss_section(distillation=True)
    loss.lam.schedule, loss.beta.start, loss.temperature, loss.chunk_size = "step", -1.0, 0.0, 0
    loss.mtp_kd_target, loss.weight_span, loss.mtp_lam.end = "teacher", "epoch", 1.5
    problems = "\n".join(losses.loss_problems(loss, has_teacher=False))
    for message in ("loss.lam.schedule", "loss.beta.start", "no teacher is set", "temperature", "mtp_kd_target",
                    "chunk_size", "loss.weight_span", "loss.mtp_lam.end"):  # fmt: skip
        assert message in problems


# ---------------------------------------------------------------------------- train steps
STUDENT = tiny(hidden_size=32, num_mtp_layers=1)
TOKENS = jnp.asarray(random_tokens(4, 17, 257))


def graphdef_of(cfg):
    return abstract_model(cfg)[0]


def loss_fn_of(cfg, loss_cfg, teacher_cfg=None):
    """The trainer's loss function for a student of `cfg` (and a teacher of `teacher_cfg`)."""
    teacher_graphdef = None if teacher_cfg is None else graphdef_of(teacher_cfg)
    mtp = stage_functions.decide_mtp_use(loss_cfg, cfg, teacher_cfg)
    objective = stage_functions.make_objective(loss_cfg, cfg, mtp)
    return stage_functions.make_loss_fn(graphdef_of(cfg), objective, mtp, teacher_graphdef)


def step_fn(cfg, tx, loss_cfg, teacher_cfg=None, grad_accum_steps=1):
    """The trainer's jitted step for a student of `cfg` (and a teacher of `teacher_cfg`)."""
    loss_fn = loss_fn_of(cfg, loss_cfg, teacher_cfg)
    replicated = jax.sharding.NamedSharding(
        jax.sharding.Mesh(jax.devices()[:1], ("batch",)), jax.sharding.PartitionSpec()
    )
    weights = stage_functions.loss_weights_fn(loss_cfg, 10)
    return stage_functions.AtStep(
        jax.jit(stage_functions.make_weighted_train_step(loss_fn, tx, grad_accum_steps, replicated)), weights
    )


def params_of(cfg, seed):
    return nnx.state(Qwen3NextForCausalLM(cfg, rngs=nnx.Rngs(seed)), nnx.Param)


def distillation_loss(chunk_size=8, **weights):
    loss = run_config.loss_section(distillation=True)
    loss.chunk_size = chunk_size
    for name, (kind, start, end) in weights.items():
        loss[name] = schedule(kind, start, end)
    return loss


def test_zero_lam_and_beta_reproduce_lm_only_training_bitwise():
    tx = optax.adamw(1e-2)
    zero = dict(lam=("constant", 0.0, 0.0), beta=("constant", 0.0, 0.0))
    teacher_cfg = tiny(hidden_size=32, num_hidden_layers=5, num_experts=8)
    runs = {}
    for name, teacher in (("lm", None), ("distil", teacher_cfg)):
        step = step_fn(STUDENT, tx, distillation_loss(**zero), teacher)
        params = params_of(STUDENT, 0)
        opt_state = tx.init(params)
        teacher_params = None if teacher is None else params_of(teacher, 1)
        for i in range(3):
            params, opt_state, metrics = step(params, opt_state, teacher_params, TOKENS, i)
        runs[name] = (jax.tree.leaves(params), metrics)
    assert float(runs["distil"][1]["kd"]) > 0  # the KD term was computed, with weight 0
    for a, b in zip(runs["lm"][0], runs["distil"][0], strict=True):
        np.testing.assert_array_equal(a, b)
    assert float(runs["lm"][1]["loss"]) == float(runs["distil"][1]["loss"])


def test_teacher_equal_to_the_student_gives_zero_kd_and_zero_kd_gradient():
    loss = distillation_loss(lam=("constant", 1.0, 1.0), beta=("constant", 1.0, 1.0))
    cfg = STUDENT.replace(router_aux_loss_coef=0.0)  # the objective is then the two KD terms alone
    step = step_fn(cfg, optax.sgd(1.0), loss, cfg)
    params = params_of(cfg, 0)
    teacher_params = jax.tree.map(jnp.copy, params)
    new_params, _, metrics = step(params, optax.sgd(1.0).init(params), teacher_params, TOKENS, 0)
    print(f"teacher == student: kd {float(metrics['kd']):.2e}, mtp_kd {float(metrics['mtp_kd']):.2e}, "
          f"grad norm {float(metrics['grad_norm']):.2e}")  # fmt: skip
    assert abs(float(metrics["kd"])) < 1e-6 and abs(float(metrics["mtp_kd"])) < 1e-6
    assert float(metrics["top1_agreement"]) == 1.0
    assert float(metrics["grad_norm"]) < 1e-5
    for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(params)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_teacher_of_another_architecture_against_full_logits():
    """A deeper teacher with more experts and a wider MTP: the step's KD and agreement metrics equal
    numpy's from the two models' full logits."""
    teacher_cfg = tiny(hidden_size=48, num_hidden_layers=6, num_experts=8, num_experts_per_tok=3, num_mtp_layers=2)
    loss = distillation_loss(chunk_size=24, lam=("constant", 0.5, 0.5), beta=("constant", 0.3, 0.3))
    step = step_fn(STUDENT, optax.sgd(0.1), loss, teacher_cfg)
    params, teacher_params = params_of(STUDENT, 0), params_of(teacher_cfg, 1)
    _, _, metrics = step(params, optax.sgd(0.1).init(params), teacher_params, TOKENS, 0)
    inputs = TOKENS[:, :-1]
    ours = forward(nnx.merge(graphdef_of(STUDENT), params), inputs)
    theirs = forward(nnx.merge(graphdef_of(teacher_cfg), teacher_params), inputs)
    s, t = (
        np.asarray(ours.logits).reshape(-1, STUDENT.vocab_size),
        np.asarray(theirs.logits).reshape(-1, STUDENT.vocab_size),
    )
    np.testing.assert_allclose(float(metrics["kd"]), numpy_kd(s, t, 1.0).mean(), rtol=1e-4)
    np.testing.assert_allclose(float(metrics["top1_agreement"]), (s.argmax(-1) == t.argmax(-1)).mean(), rtol=1e-6)
    valid = slice(0, inputs.shape[1] - 1)  # MTP depth 0: the last position has no target
    s_mtp = np.asarray(ours.mtp_logits[0][:, valid]).reshape(-1, STUDENT.vocab_size)
    t_mtp = np.asarray(theirs.mtp_logits[0][:, valid]).reshape(-1, STUDENT.vocab_size)
    np.testing.assert_allclose(float(metrics["mtp_kd"]), numpy_kd(s_mtp, t_mtp, 1.0).mean(), rtol=1e-4)
    assert np.isfinite(float(metrics["loss"]))


def test_teacher_without_mtp_while_lam_is_zero_reports_kd_but_no_mtp_kd():
    """An LM-only run (lam = 0) may watch a teacher without MTP: KD and agreement as metrics only."""
    teacher_cfg = tiny(hidden_size=32, num_mtp_layers=0)
    loss = distillation_loss(lam=("constant", 0.0, 0.0), beta=("constant", 0.3, 0.3))
    step = step_fn(STUDENT, optax.sgd(0.1), loss, teacher_cfg)
    params = params_of(STUDENT, 0)
    _, _, metrics = step(params, optax.sgd(0.1).init(params), params_of(teacher_cfg, 1), TOKENS, 0)
    assert "mtp_kd" not in metrics and float(metrics["kd"]) > 0 and float(metrics["mtp_ce"]) > 0


def test_gradient_accumulation_equals_one_big_batch():
    cfg = tiny(hidden_size=32, num_mtp_layers=1)
    tx = optax.sgd(1.0)
    params = nnx.state(Qwen3NextForCausalLM(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    results = []
    for accumulation in (1, 2):
        step = step_fn(cfg, tx, run_config.loss_section(distillation=False), grad_accum_steps=accumulation)
        new_params, _, metrics = step(params, tx.init(params), None, TOKENS, 0)
        results.append((jax.tree.leaves(new_params), float(metrics["loss"])))
    # MoE aux loss is computed per micro-batch, so losses differ slightly; the CE gradients dominate.
    for a, b in zip(results[0][0], results[1][0]):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)
    assert abs(results[0][1] - results[1][1]) < 1e-2


# ---------------------------------------------------------------------------- against transformers
# Student and teacher: tiny random HF models of two architectures (same vocabulary), two layers each
# (linear then full attention: compile time grows with depth), imported through our HF loader; the
# student has an MTP module. The aux coefficient is raised to 0.1 so that a dropped aux term moves
# the loss by ~0.2, far above float32 rounding.
HF_VOCAB = 97
HF_TOKENS = random_tokens(2, 26, HF_VOCAB, seed=3)  # [B, L+1]: L = 25 inputs


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """{"student": (HF model, our import with an MTP module), "teacher": (HF model, our import)}."""
    pair = {}
    two_layers = dict(num_hidden_layers=2, layer_types=["linear_attention", "full_attention"], mlp_only_layers=[])
    for role, name, seed, mtp_depths in (("student", "gqa2_ratio2", 0, 1), ("teacher", "gqa3_ratio3", 1, 0)):
        hf_model = make_hf_model(name, seed=seed, router_aux_loss_coef=0.1, **two_layers)
        directory = tmp_path_factory.mktemp(role)
        hf_model.save_pretrained(directory)
        if mtp_depths:
            add_mtp_tensors(directory, num_layers=mtp_depths, seed=seed)
        pair[role] = (hf_model, hf.load_model(directory))
    return pair


def hf_outputs(hf_model, tokens: np.ndarray):
    """transformers' own loss on tokens [B, L+1]: inputs tokens[:, :-1], `shift_labels` tokens[:, 1:]
    (the targets this window holds), router logits on, so `loss` = CE + router_aux_loss_coef x aux."""
    ids = torch.tensor(tokens, dtype=torch.long)
    with torch.no_grad():
        return hf_model(
            ids[:, :-1], labels=ids[:, :-1], shift_labels=ids[:, 1:].contiguous(), output_router_logits=True
        )


def mtp_reference_terms(mtp_logits, tokens, teacher_logits=None, tau=1.0) -> tuple[float, float]:
    """(MTP CE, MTP KD against the teacher backbone) in numpy, averaged over depths: depth d at
    position i (i <= L-2-d) predicts tokens[:, i+2+d], which the teacher backbone predicts at i+1+d.
    mtp_logits [M, B, L, V]; tokens [B, L+1]; teacher_logits [B, L, V]."""
    ce, kd = [], []
    length = tokens.shape[1] - 1
    for depth, logits in enumerate(np.asarray(mtp_logits)):
        student = logits[:, : length - 1 - depth].reshape(-1, logits.shape[-1])
        ce.append(numpy_ce(student, tokens[:, 2 + depth :].reshape(-1)).mean())
        if teacher_logits is not None:
            teacher = teacher_logits[:, 1 + depth : length].reshape(student.shape)
            kd.append(numpy_kd(student, teacher, tau).mean())
    return float(np.mean(ce)), float(np.mean(kd)) if kd else 0.0


def test_lm_objective_equals_transformers_labels_loss_plus_a_hand_computed_mtp_term(hf_pair):
    """lam = 0, no teacher: the train loss is transformers' `labels=` loss (CE + aux_coef x aux, aux
    from its own router logits) plus beta x the MTP cross-entropy against the tokens 2 ahead (depth
    alignment beyond 1: test_mtp_cross_entropy_matches_a_naive_loop)."""
    hf_model, model = hf_pair["student"]
    cfg = model.config
    assert cfg.router_aux_loss_coef == 0.1 and cfg.num_mtp_layers == 1
    loss_fn = jax.jit(loss_fn_of(cfg, distillation_loss(chunk_size=16, lam=("constant", 0.0, 0.0))))
    theirs = hf_outputs(hf_model, HF_TOKENS)
    hf_loss, hf_aux = float(theirs.loss), float(theirs.aux_loss)
    mtp_ce, _ = mtp_reference_terms(forward(model, HF_TOKENS[:, :-1]).mtp_logits, HF_TOKENS)
    print(f"transformers loss {hf_loss:.6f} (aux {hf_aux:.4f}), hand-computed MTP CE {mtp_ce:.6f}")
    for beta in (0.0, 0.5):
        weights = {"lam": jnp.float32(0), "mtp_lam": jnp.float32(0), "beta": jnp.float32(beta)}
        loss, metrics = loss_fn(nnx.state(model, nnx.Param), None, jnp.asarray(HF_TOKENS), weights)
        np.testing.assert_allclose(float(metrics["aux_loss"]), hf_aux, rtol=1e-5)
        np.testing.assert_allclose(float(metrics["ce"]), hf_loss - 0.1 * hf_aux, rtol=1e-5)
        np.testing.assert_allclose(float(metrics["mtp_ce"]), mtp_ce, rtol=1e-5)
        np.testing.assert_allclose(float(loss), hf_loss + beta * mtp_ce, rtol=1e-5)


@pytest.mark.parametrize("mtp_lam", [None, 0.0], ids=["mtp_lam=lam", "mtp_lam=0"])
def test_distillation_objective_equals_numpy_terms_from_full_softmaxes(hf_pair, mtp_lam):
    """lam, beta in (0, 1), tau = 2, MTP-KD against the teacher backbone, the MTP terms' KD share
    following lam or 0 (the paper's KD + LM + MTP-LM): every term from full [N, V] logits in float64
    numpy (backbone logits and aux loss from transformers, the student's MTP logits from our
    forward), the weights from the config's schedules. (teacher_mtp's alignment:
    test_mtp_kd_reads_the_teacher_at_the_aligned_position; its values:
    test_teacher_of_another_architecture_against_full_logits.)"""
    (hf_student, student), (hf_teacher, teacher) = hf_pair["student"], hf_pair["teacher"]
    lam, beta, tau = 0.4, 0.3, 2.0
    loss_cfg = distillation_loss(chunk_size=16, lam=("constant", lam, lam), beta=("constant", beta, beta))
    loss_cfg.temperature, loss_cfg.mtp_kd_target = tau, "teacher_backbone"
    if mtp_lam is not None:
        loss_cfg.mtp_lam = schedule("constant", mtp_lam, mtp_lam)
    mu = lam if mtp_lam is None else mtp_lam
    loss_fn = jax.jit(loss_fn_of(student.config, loss_cfg, teacher.config))
    weights = stage_functions.loss_weights_fn(loss_cfg, 10)(jnp.int32(3))
    loss, metrics = loss_fn(nnx.state(student, nnx.Param), nnx.state(teacher, nnx.Param), jnp.asarray(HF_TOKENS),
                            weights)  # fmt: skip

    student_out, teacher_logits = hf_outputs(hf_student, HF_TOKENS), hf_outputs(hf_teacher, HF_TOKENS).logits.numpy()
    s, t = student_out.logits.numpy().reshape(-1, HF_VOCAB), teacher_logits.reshape(-1, HF_VOCAB)
    ce, kd = numpy_ce(s, HF_TOKENS[:, 1:].reshape(-1)).mean(), numpy_kd(s, t, tau).mean()
    student_mtp = forward(student, HF_TOKENS[:, :-1]).mtp_logits
    mtp_ce, mtp_kd = mtp_reference_terms(student_mtp, HF_TOKENS, teacher_logits, tau)
    aux = float(student_out.aux_loss)
    expected = (1 - lam) * ce + lam * kd + beta * ((1 - mu) * mtp_ce + mu * mtp_kd) + 0.1 * aux
    print(f"ce {ce:.5f} kd {kd:.5f} mtp_ce {mtp_ce:.5f} mtp_kd {mtp_kd:.5f} aux {aux:.4f}: loss {expected:.6f}")
    for name, value in (("ce", ce), ("kd", kd), ("mtp_ce", mtp_ce), ("mtp_kd", mtp_kd), ("aux_loss", aux)):
        np.testing.assert_allclose(float(metrics[name]), value, rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(float(metrics["mtp_lam"]), mu, rtol=1e-6)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    if mtp_lam == 0.0:  # without its KD share the MTP-KD term is still reported, at weight 0
        assert not math.isclose(expected, (1 - lam) * ce + lam * kd + beta * ((1 - lam) * mtp_ce + lam * mtp_kd)
                                + 0.1 * aux, rel_tol=1e-4)  # fmt: skip


def test_runs_whose_weight_schedules_differ_share_the_compiled_step():
    """The loss weights are arguments of the built train and eval steps, not constants: a
    different lam / beta schedule or span lowers to the same program text, and the weights still
    reach the loss (the eval step's loss follows lam)."""
    mesh = sharding.make_mesh(dict(data=1, fsdp=1, expert=1), jax.devices()[:1])
    tx = optax.adamw(1e-3)
    shapes = train_state.abstract_state(STUDENT, tx, mesh)

    def built(loss_cfg, weight_steps):
        config = run_config.base_config()
        config.loss = loss_cfg
        mtp = stage_functions.decide_mtp_use(loss_cfg, STUDENT, STUDENT)
        teacher_shardings = sharding.state_shardings(params_of(STUDENT, 1), mesh)
        return stage_functions.build(config, STUDENT, shapes.graphdef, tx, mesh, shapes.shardings, mtp=mtp,
                                     weight_steps=weight_steps, teacher_graphdef=shapes.graphdef,
                                     teacher_shardings=teacher_shardings)  # fmt: skip

    full = built(distillation_loss(), (100, 0))
    lm_heavy = built(distillation_loss(lam=("constant", 0.0, 0.0), beta=("linear", 0.5, 0.0)), (60, 40))
    teacher = params_of(STUDENT, 1)
    for name in ("train_step", "eval_step"):
        args = (shapes.params, shapes.opt_state) if name == "train_step" else (shapes.params,)
        texts = [getattr(fns, name).lower(*args, teacher, TOKENS, 7).as_text() for fns in (full, lm_heavy)]
        assert texts[0] == texts[1], name
    student = params_of(STUDENT, 0)
    kd_only = built(distillation_loss(lam=("constant", 1.0, 1.0), beta=("constant", 0.0, 0.0)), (100, 0))
    lm_only = built(distillation_loss(lam=("constant", 0.0, 0.0), beta=("constant", 0.0, 0.0)), (100, 0))
    kd_metrics, lm_metrics = (fns.eval_step(student, teacher, TOKENS, 3) for fns in (kd_only, lm_only))
    assert float(kd_metrics["loss"]) == pytest.approx(float(kd_metrics["kd"]) + STUDENT.router_aux_loss_coef
                                                      * float(kd_metrics["aux_loss"]), rel=1e-5)  # fmt: skip
    assert float(lm_metrics["loss"]) == pytest.approx(float(lm_metrics["ce"]) + STUDENT.router_aux_loss_coef
                                                      * float(lm_metrics["aux_loss"]), rel=1e-5)  # fmt: skip
