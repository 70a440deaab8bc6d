"""Training objectives: language modelling and knowledge distillation, chunked over tokens.

    L = (1 - lam) L_LM + lam L_KD + beta ((1 - mu) L_MTP_LM + mu L_MTP_KD) + aux_coef * L_aux

(docs/method.md section 4), where the MTP terms' KD share mu (`mtp_lam`) is lam unless its own
schedule is given. An objective reads the models' hidden states before the LM head
(`HeadInputs`) and applies the head itself, `chunk_size` tokens at a time inside a rematerialised
scan: one [C, V] block of student and teacher logits lives at a time, in the forward pass and in
the backward pass, whatever the batch and sequence length.

Shape letters: B batch, L sequence length, N = B*L tokens, C tokens per chunk, D width, V vocab,
M MTP depth. `tokens` [B, L+1] holds inputs and targets together: inputs = tokens[:, :-1],
next-token targets = tokens[:, 1:]; MTP depth d at position i predicts tokens[:, i + 2 + d], so
its last d + 1 positions (whose target lies past the window) are masked, in L_MTP_LM and L_MTP_KD.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Protocol

import jax
import jax.numpy as jnp
import ml_collections
from flax import struct
from jax.sharding import PartitionSpec

from slimqwen_jax.model import CausalLMOutput, Qwen3NextForCausalLM
from slimqwen_jax.sharding import batch_shards, embed_group_axes, on_batch_shards, pad_rows

WEIGHT_SCHEDULES = ("constant", "linear", "cosine")
FOLLOW_LAM = "lam"  # loss.mtp_lam.schedule: the MTP terms' KD share is lam at every step
WEIGHT_SPANS = ("run", "stage")
MTP_KD_TARGETS = ("teacher_mtp", "teacher_backbone")


# ---------------------------------------------------------------------------- model outputs
@struct.dataclass
class HeadInputs:
    """What an objective reads of one model's forward pass: the hidden states the LM head reads.

    hidden [B, L, D] (after the final norm); mtp_hidden [M, B, L, D] or None; head [D, V] (the LM
    head's kernel, or the transposed embedding when tied); aux_loss: the unscaled MoE aux loss.
    """

    hidden: jax.Array
    mtp_hidden: jax.Array | None
    head: jax.Array
    aux_loss: jax.Array


def head_weight(model: Qwen3NextForCausalLM) -> jax.Array:
    """The LM head as a [D, V] matrix: `model.logits(h) == h @ head_weight(model)`."""
    if model.lm_head is None:
        return model.model.embed_tokens.embedding[...].T
    return model.lm_head.kernel[...]


def head_inputs(model: Qwen3NextForCausalLM, out: CausalLMOutput) -> HeadInputs:
    """What the objective needs of `out = model(input_ids, with_logits=False)`."""
    return HeadInputs(out.hidden_states, out.mtp_hidden_states, head_weight(model), out.aux_loss)


def chunk_logits(hidden: jax.Array, head: jax.Array) -> jax.Array:
    """hidden [C, D] @ head [D, V] -> logits [C, V] in float32 (inputs in the hidden states' dtype)."""
    return jnp.einsum("cd,dv->cv", hidden, head.astype(hidden.dtype), preferred_element_type=jnp.float32)


# ---------------------------------------------------------------------------- per-token terms
def token_terms(student: jax.Array, teacher: jax.Array | None, targets: jax.Array, temperature: float) -> dict:
    """Per-token loss terms [C] from float32 logits [C, V]: `ce` (student vs targets) and, with a
    teacher, `kd` = tau^2 KL(softmax(teacher / tau) || softmax(student / tau)) and `agree` (1 where
    the two argmaxes are equal)."""
    target_logits = jnp.take_along_axis(student, targets[:, None], axis=-1)[:, 0]
    terms = {"ce": jax.nn.logsumexp(student, axis=-1) - target_logits}
    if teacher is not None:
        log_p_teacher = jax.nn.log_softmax(teacher / temperature, axis=-1)
        log_p_student = jax.nn.log_softmax(student / temperature, axis=-1)
        kl = jnp.sum(jnp.exp(log_p_teacher) * (log_p_teacher - log_p_student), axis=-1)
        terms["kd"] = temperature**2 * kl
        terms["agree"] = (jnp.argmax(student, axis=-1) == jnp.argmax(teacher, axis=-1)).astype(jnp.float32)
    return terms


def _chunk_sums(student_hidden, student_head, teacher_hidden, teacher_head, targets, mask, temperature):
    """Masked sums of `token_terms` over one chunk: hidden [C, D] (teacher [C, D'] or None)."""
    student = chunk_logits(student_hidden, student_head)
    teacher = None if teacher_hidden is None else chunk_logits(teacher_hidden, teacher_head)
    weight = mask.astype(jnp.float32)
    return {k: jnp.sum(v * weight) for k, v in token_terms(student, teacher, targets, temperature).items()}


def _chunk_logits_cotangent(student, teacher, targets, weight, cotangent, temperature):
    """d(sums)/d(student logits) [C, V], written out: d ce / ds = softmax(s) - onehot(target) and
    d kd / ds = tau (softmax(s / tau) - softmax(t / tau)); `agree` has no gradient."""
    grad = cotangent["ce"] * (jax.nn.softmax(student, axis=-1) - jax.nn.one_hot(targets, student.shape[-1]))
    if teacher is not None:
        softened = jax.nn.softmax(student / temperature, axis=-1) - jax.nn.softmax(teacher / temperature, axis=-1)
        grad = grad + cotangent["kd"] * temperature * softened
    return grad * weight[:, None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def chunk_sums(student_hidden, student_head, teacher_hidden, teacher_head, targets, mask, temperature):
    """`_chunk_sums` whose backward recomputes the chunk's logits from the hidden states (the only
    residuals) and forms the logits' gradient in closed form: one chunk's [C, V] blocks at a time
    and a handful of them, where autodiff would keep every intermediate softmax alive."""
    return _chunk_sums(student_hidden, student_head, teacher_hidden, teacher_head, targets, mask, temperature)


def _chunk_sums_fwd(student_hidden, student_head, teacher_hidden, teacher_head, targets, mask, temperature):
    sums = _chunk_sums(student_hidden, student_head, teacher_hidden, teacher_head, targets, mask, temperature)
    return sums, (student_hidden, student_head, teacher_hidden, teacher_head, targets, mask)


def _chunk_sums_bwd(temperature, residuals, cotangent):
    student_hidden, student_head, teacher_hidden, teacher_head, targets, mask = residuals
    student = chunk_logits(student_hidden, student_head)
    teacher = None if teacher_hidden is None else chunk_logits(teacher_hidden, teacher_head)
    grad = _chunk_logits_cotangent(student, teacher, targets, mask.astype(jnp.float32), cotangent, temperature)
    d_hidden = jnp.einsum("cv,dv->cd", grad, student_head.astype(jnp.float32)).astype(student_hidden.dtype)
    d_head = jnp.einsum("cd,cv->dv", student_hidden.astype(jnp.float32), grad).astype(student_head.dtype)
    return d_hidden, d_head, None, None, None, None  # the teacher is frozen; targets and mask are data


chunk_sums.defvjp(_chunk_sums_fwd, _chunk_sums_bwd)


def token_chunks(x: jax.Array, *, chunk_size: int) -> jax.Array:
    """[N, ...] -> [ceil(N / C), C, ...] (C = min(chunk_size, N)), the last chunk zero-padded."""
    n = x.shape[0]
    chunk_size = min(chunk_size, n)
    num_chunks = -(-n // chunk_size)
    x = jnp.pad(x, [(0, num_chunks * chunk_size - n)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape(num_chunks, chunk_size, *x.shape[1:])


def chunked_argmax(hidden: jax.Array, head: jax.Array, *, chunk_size: int) -> jax.Array:
    """argmax over the vocabulary of hidden [N, D] @ head [D, V] -> token ids [N], one [C, V] block
    of logits at a time (greedy tokens and MTP drafts without [N, V] logits); each batch shard of
    the context mesh its own rows."""

    def local_argmax(hidden, head):
        chunks = token_chunks(hidden, chunk_size=chunk_size)
        best = jax.lax.map(lambda h: jnp.argmax(chunk_logits(h, head), axis=-1), chunks)
        return best.reshape(-1)[: hidden.shape[0]]

    return on_batch_shards(local_argmax, (hidden,), (0,), (head,))


def chunked_token_sums(
    student_hidden: jax.Array,
    student_head: jax.Array,
    teacher_hidden: jax.Array | None,
    teacher_head: jax.Array | None,
    targets: jax.Array,
    mask: jax.Array,
    *,
    chunk_size: int,
    temperature: float = 1.0,
) -> dict[str, jax.Array]:
    """Sums over the masked tokens of `token_terms`, the LM heads applied chunk by chunk.

    student_hidden [N, D], teacher_hidden [N, D'] (or None), heads [D, V] / [D', V], targets and
    mask [N]. A scan over ceil(N / C) chunks (the last one padded and masked) of `chunk_sums`,
    whose backward recomputes the chunk's logits instead of storing them: the [C, V] blocks of one
    chunk live at a time, forward and backward. Returns scalars `ce`, and with a teacher `kd` and
    `agree`; `count` is the number of masked-in tokens. The teacher gets no gradient.

    Under a context mesh each batch shard scans its own tokens and the sums meet once at the end
    (`sharding.on_batch_shards`): scanning sharded rows would gather every token on every device,
    and the heads' gradients would be reduced over the devices once per chunk. Where the mesh shards
    parameters (`sharding.embed_group_axes`), the heads are split by vocabulary instead of gathered
    whole: `vocab_sharded_token_sums`.
    """
    if embed_group_axes(jax.sharding.get_abstract_mesh()):
        return vocab_sharded_token_sums(student_hidden, student_head, teacher_hidden, teacher_head, targets, mask,
                                        chunk_size=chunk_size, temperature=temperature)  # fmt: skip
    with_teacher = teacher_hidden is not None
    names = ("ce", "kd", "agree") if with_teacher else ("ce",)
    # The heads in the hidden states' dtype (as `chunk_logits` uses them) before they are gathered
    # whole onto every device: a bfloat16 run holds half the bytes, and reduces half for the gradient.
    student_head = student_head.astype(student_hidden.dtype)
    if with_teacher:
        teacher_head = teacher_head.astype(teacher_hidden.dtype)

    def local_sums(student_hidden, targets, mask, teacher_hidden, student_head, teacher_head):
        chunks = functools.partial(token_chunks, chunk_size=chunk_size)
        xs = {"student": chunks(student_hidden), "targets": chunks(targets), "mask": chunks(mask), "teacher": None}
        if teacher_hidden is not None:
            xs["teacher"] = chunks(teacher_hidden)

        def add_chunk(sums, chunk):
            terms = chunk_sums(chunk["student"], student_head, chunk["teacher"], teacher_head,
                               chunk["targets"], chunk["mask"], temperature)  # fmt: skip
            return jax.tree.map(jnp.add, sums, terms), None

        sums, _ = jax.lax.scan(add_chunk, {k: jnp.zeros((), jnp.float32) for k in names}, xs)
        return {**sums, "count": jnp.sum(mask.astype(jnp.float32))}

    if with_teacher:
        teacher = jax.lax.stop_gradient((teacher_hidden, teacher_head))
        rows, whole, fn = (student_hidden, targets, mask, teacher[0]), (student_head, teacher[1]), local_sums
    else:
        rows, whole = (student_hidden, targets, mask), (student_head,)
        fn = lambda hidden, targets, mask, head: local_sums(hidden, targets, mask, None, head, None)  # noqa: E731
    return on_batch_shards(fn, rows, (0,) * len(rows), whole, summed=True)


# ---------------------------------------------------------------------------- vocabulary-sharded
PADDED_LOGIT = -1e30  # the logit of a vocabulary column added to make the shards even: exp() is 0


def _sharded_logsumexp(logits: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    """logsumexp over the vocabulary [R, V/G] -> [R], the columns split over `axes`."""
    peak = jax.lax.pmax(jnp.max(jax.lax.stop_gradient(logits), axis=-1), axes)
    return peak + jnp.log(jax.lax.psum(jnp.sum(jnp.exp(logits - peak[:, None]), axis=-1), axes))


def _sharded_argmax(logits: jax.Array, columns: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    """The first column of the row maximum over the whole vocabulary [R, V/G] -> [R] (as jnp.argmax)."""
    logits = jax.lax.stop_gradient(logits)
    peak = jax.lax.pmax(jnp.max(logits, axis=-1), axes)
    first = jnp.min(jnp.where(logits == peak[:, None], columns, jnp.iinfo(jnp.int32).max), axis=-1)
    return jax.lax.pmin(first, axes)


def sharded_token_terms(student, teacher, targets, columns, axes, temperature) -> dict:
    """`token_terms` of logits whose vocabulary columns are split over `axes`: student and teacher
    [R, V/G] (this device's `columns` [V/G] of every row), targets [R] -> terms [R], equal on every
    device of the group."""
    target_logits = jax.lax.psum(jnp.sum(jnp.where(columns == targets[:, None], student, 0.0), axis=-1), axes)
    terms = {"ce": _sharded_logsumexp(student, axes) - target_logits}
    if teacher is not None:
        log_p_teacher = teacher / temperature - _sharded_logsumexp(teacher / temperature, axes)[:, None]
        log_p_student = student / temperature - _sharded_logsumexp(student / temperature, axes)[:, None]
        kl = jax.lax.psum(jnp.sum(jnp.exp(log_p_teacher) * (log_p_teacher - log_p_student), axis=-1), axes)
        terms["kd"] = temperature**2 * kl
        agree = _sharded_argmax(student, columns, axes) == _sharded_argmax(teacher, columns, axes)
        terms["agree"] = agree.astype(jnp.float32)
    return terms


def _pad_columns(head: jax.Array, columns: int, axes: tuple[str, ...], group: int) -> jax.Array:
    """head [D, V] -> [D, columns], zero columns appended, each device padding its own rows of a
    head sharded by width over `axes` (`group` devices; XLA's partitioner would gather the head to
    pad it)."""
    if head.shape[1] == columns:
        return head
    pad = functools.partial(jnp.pad, pad_width=((0, 0), (0, columns - head.shape[1])))
    if head.shape[0] % group:
        return pad(head)
    by_width = PartitionSpec(axes, None)
    return jax.shard_map(pad, in_specs=by_width, out_specs=by_width)(head)


def vocab_sharded_token_sums(student_hidden, student_head, teacher_hidden, teacher_head, targets, mask, *,
                             chunk_size: int, temperature: float = 1.0) -> dict[str, jax.Array]:  # fmt: skip
    """`chunked_token_sums` with the LM heads split by vocabulary over the G devices of
    `sharding.embed_group_axes` (the fsdp axis), never whole on a device: each device scans its own
    tokens C at a time; for a chunk the G devices of its group gather their chunks ([G C, D], small)
    and each computes the logits of all G C tokens in its V / G columns: one [C, V] block's worth of
    memory, as unsplit. The softmax sums,
    the target's logit, KL and argmax meet over the group (psum / pmax), and a device adds the
    terms of its own tokens. The backward recomputes a chunk's logits (`jax.checkpoint`); the
    heads' gradients are V / G columns per device. A vocabulary that G does not divide is padded
    with columns of logit `PADDED_LOGIT`.
    """
    mesh = jax.sharding.get_abstract_mesh()
    axes, (batch_axes, shards) = embed_group_axes(mesh), batch_shards(mesh)
    group = math.prod(mesh.shape[a] for a in axes)
    vocab = student_head.shape[1]
    padded = -(-vocab // group) * group
    rows = {"student": student_hidden, "targets": targets, "mask": mask}
    heads = {"student": student_head.astype(student_hidden.dtype)}
    if teacher_hidden is not None:
        rows["teacher"] = jax.lax.stop_gradient(teacher_hidden)
        heads["teacher"] = jax.lax.stop_gradient(teacher_head).astype(teacher_hidden.dtype)
    rows = dict(zip(rows, pad_rows(tuple(rows.values()), (0,) * len(rows), shards)))  # padded rows: mask False
    heads = {k: _pad_columns(h, padded, axes, group) for k, h in heads.items()}

    def local(rows, heads):  # rows [n, ...]: this device's tokens; heads [D, V / G]: its columns
        width = padded // group
        columns = jax.lax.axis_index(axes) * width + jnp.arange(width)  # [V / G]
        size = min(chunk_size, rows["mask"].shape[0])
        own = jax.lax.axis_index(axes) * size  # where this device's chunk lies among its group's

        def logits(hidden, head):  # [G C, V / G] of the group's chunks
            return jnp.where(columns < vocab, chunk_logits(hidden, head), PADDED_LOGIT)

        @jax.checkpoint
        def chunk_sums(chunk):
            group_rows = jax.tree.map(lambda a: jax.lax.all_gather(a, axes, axis=0, tiled=True), chunk)  # [G C, ...]
            student = logits(group_rows["student"], heads["student"])
            teacher = logits(group_rows["teacher"], heads["teacher"]) if "teacher" in chunk else None
            terms = sharded_token_terms(student, teacher, group_rows["targets"], columns, axes, temperature)
            weight = chunk["mask"].astype(jnp.float32)
            return {k: jnp.sum(jax.lax.dynamic_slice_in_dim(v, own, size) * weight) for k, v in terms.items()}

        def add_chunk(sums, chunk):
            return jax.tree.map(jnp.add, sums, chunk_sums(chunk)), None

        zero = jax.lax.pcast(jnp.zeros((), jnp.float32), batch_axes, to="varying")  # typed as the chunks' sums
        names = ("ce", "kd", "agree") if "teacher" in rows else ("ce",)
        chunks = jax.tree.map(functools.partial(token_chunks, chunk_size=size), rows)
        sums, _ = jax.lax.scan(add_chunk, dict.fromkeys(names, zero), chunks)
        return jax.lax.psum({**sums, "count": jnp.sum(rows["mask"].astype(jnp.float32))}, batch_axes)

    by_rows, by_columns = PartitionSpec(batch_axes), PartitionSpec(None, axes)
    return jax.shard_map(local, in_specs=(by_rows, by_columns), out_specs=PartitionSpec())(rows, heads)


# ---------------------------------------------------------------------------- targets
def mtp_targets(tokens: jax.Array, depth: int) -> tuple[jax.Array, jax.Array]:
    """Targets and mask [B, L] of MTP depth d: position i predicts tokens[:, i + 2 + d]; the last
    d + 1 positions have no target inside the window and are masked."""
    b, length = tokens.shape[0], tokens.shape[1] - 1
    shift = depth + 2
    targets = jnp.pad(tokens[:, shift:], ((0, 0), (0, shift - 1)))
    mask = jnp.broadcast_to(jnp.arange(length) < length + 1 - shift, (b, length))
    return targets, mask


def mtp_teacher_hidden(teacher: HeadInputs, depth: int, target: str) -> jax.Array:
    """The teacher hidden states [B, L, D'] whose logits are the KD target of MTP depth d.

    `teacher_mtp`: the teacher's own MTP module at depth d, same position. `teacher_backbone`: the
    teacher backbone's prediction of the same token, t_{i+2+d}, made at position i + 1 + d.
    """
    if target == "teacher_mtp":
        return teacher.mtp_hidden[depth]
    shift = depth + 1
    return jnp.pad(teacher.hidden[:, shift:], ((0, 0), (0, shift), (0, 0)))  # row i: teacher position i + 1 + d


# ---------------------------------------------------------------------------- objectives
class Objective(Protocol):
    def __call__(
        self, student: HeadInputs, teacher: HeadInputs | None, tokens: jax.Array, weights: dict[str, jax.Array]
    ) -> tuple[jax.Array, dict[str, jax.Array]]: ...


def _flat(x: jax.Array) -> jax.Array:  # [B, L, ...] -> [N, ...]
    return x.reshape(-1, *x.shape[2:])


def distillation_objective(
    *, aux_coef: float, chunk_size: int, temperature: float = 1.0, mtp_kd_target: str = "teacher_mtp",
    mtp_kd: bool = True,
) -> Objective:
    """The four-term objective of docs/method.md section 4 plus aux_coef x the student's MoE aux loss.

    `weights` holds this step's `lam`, `mtp_lam` and `beta`. Without a teacher only the LM terms
    exist (lam and mtp_lam must then be 0: `loss_problems`). Without `student.mtp_hidden` the MTP
    terms are skipped; `mtp_kd` (the run's `stage_functions.MtpUse.kd`) says whether the teacher
    gives MTP-KD targets.
    Metrics: every term (ce, kd, mtp_ce, mtp_kd, aux_loss), lam, mtp_lam, beta, loss and, with a teacher,
    `top1_agreement` of the backbones.
    """

    def means(student_hidden, student_head, teacher_hidden, teacher_head, targets, mask) -> dict[str, jax.Array]:
        sums = chunked_token_sums(
            _flat(student_hidden), student_head,
            None if teacher_hidden is None else _flat(teacher_hidden), teacher_head,
            _flat(targets), _flat(mask), chunk_size=chunk_size, temperature=temperature,
        )  # fmt: skip
        count = jnp.maximum(sums.pop("count"), 1.0)
        return {k: v / count for k, v in sums.items()}

    def objective(student, teacher, tokens, weights):
        lam, mtp_lam, beta = weights["lam"], weights["mtp_lam"], weights["beta"]
        targets = tokens[:, 1:]
        teacher_hidden, teacher_head = (None, None) if teacher is None else (teacher.hidden, teacher.head)
        main = means(student.hidden, student.head, teacher_hidden, teacher_head, targets, jnp.ones(targets.shape, bool))
        metrics = {"ce": main["ce"], "aux_loss": student.aux_loss, "lam": lam, "mtp_lam": mtp_lam, "beta": beta}
        if teacher is not None:
            metrics["kd"], metrics["top1_agreement"] = main["kd"], main["agree"]
        loss = (1.0 - lam) * main["ce"] + lam * metrics.get("kd", 0.0) + aux_coef * student.aux_loss
        if student.mtp_hidden is not None:
            mtp_teacher = mtp_kd and teacher is not None
            per_depth = []
            for depth in range(student.mtp_hidden.shape[0]):
                depth_targets, mask = mtp_targets(tokens, depth)
                target_hidden = mtp_teacher_hidden(teacher, depth, mtp_kd_target) if mtp_teacher else None
                per_depth.append(means(student.mtp_hidden[depth], student.head, target_hidden, teacher_head,
                                       depth_targets, mask))  # fmt: skip
            metrics["mtp_ce"] = jnp.mean(jnp.stack([m["ce"] for m in per_depth]))
            if mtp_teacher:
                metrics["mtp_kd"] = jnp.mean(jnp.stack([m["kd"] for m in per_depth]))
            loss = loss + beta * ((1.0 - mtp_lam) * metrics["mtp_ce"] + mtp_lam * metrics.get("mtp_kd", 0.0))
        metrics["loss"] = loss
        return loss, metrics

    return objective


# ---------------------------------------------------------------------------- lam and beta
def weight_schedule(spec: ml_collections.ConfigDict, total_steps: int) -> Callable[[jax.Array], jax.Array]:
    """A loss weight as a function of the 0-based global step: `constant` (start), `linear` or
    `cosine` from `start` to `end` over `total_steps`, then `end`."""
    start, end, kind = float(spec.start), float(spec.end), spec.schedule

    def value(step):
        progress = jnp.clip(jnp.asarray(step, jnp.float32) / max(total_steps, 1), 0.0, 1.0)
        if kind == "linear":
            return start + (end - start) * progress
        if kind == "cosine":
            return end + (start - end) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
        return jnp.full((), start, jnp.float32)

    return value


def is_always_zero(spec: ml_collections.ConfigDict) -> bool:
    """True when a weight schedule is 0 at every step (its term need not be computed at all)."""
    return float(spec.start) == 0.0 and (spec.schedule == "constant" or float(spec.end) == 0.0)


def mtp_lam_spec(loss: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The schedule of the MTP terms' KD share: `loss.mtp_lam`, or `loss.lam` when it follows lam."""
    return loss.lam if loss.mtp_lam.schedule == FOLLOW_LAM else loss.mtp_lam


def loss_problems(loss: ml_collections.ConfigDict, *, has_teacher: bool) -> list[str]:
    """Every problem of `config.loss` (fields and defaults: `run_config.loss_section`), one line each."""
    problems = []
    for name in ("lam", "mtp_lam", "beta"):
        spec = loss[name]
        schedules = (*WEIGHT_SCHEDULES, FOLLOW_LAM) if name == "mtp_lam" else WEIGHT_SCHEDULES
        if spec.schedule not in schedules:
            problems.append(f"loss.{name}.schedule must be one of {schedules}, got {spec.schedule!r}")
        for end in ("start", "end"):
            low, high = (0.0, math.inf) if name == "beta" else (0.0, 1.0)
            if not low <= float(spec[end]) <= high:
                problems.append(f"loss.{name}.{end} must be in [{low}, {high}], got {spec[end]}")
    for name, spec in (("lam", loss.lam), ("mtp_lam", loss.mtp_lam)):
        if not has_teacher and spec.schedule != FOLLOW_LAM and not is_always_zero(spec):
            problems.append(f"loss.{name} is not 0 but no teacher is set: set --config.teacher=<HF dir or checkpoint>")
    if loss.weight_span not in WEIGHT_SPANS:
        problems.append(f"loss.weight_span must be one of {WEIGHT_SPANS}, got {loss.weight_span!r}")
    if not loss.temperature > 0:
        problems.append(f"loss.temperature must be > 0, got {loss.temperature}")
    if loss.mtp_kd_target not in MTP_KD_TARGETS:
        problems.append(f"loss.mtp_kd_target must be one of {MTP_KD_TARGETS}, got {loss.mtp_kd_target!r}")
    if not loss.chunk_size > 0:
        problems.append(f"loss.chunk_size must be > 0, got {loss.chunk_size}")
    return problems
