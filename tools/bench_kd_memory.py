"""Peak temporary memory of the compiled distillation train step at the production vocabulary.

    .venv/bin/python tools/bench_kd_memory.py [--vocab 151936 --seq-lens 512 2048 --chunks 256 1024]

Compiles (never runs) the trainer's train step, student + frozen bfloat16 teacher, AdamW, the
four-term objective, for each sequence length and chunk size, and reads XLA's buffer assignment
(`compiled.memory_analysis()`): `arguments` (student params, AdamW moments, teacher params, tokens;
the outputs alias the donated params and moments) and `temp`, the peak of everything else the step
allocates. The same step with the unchunked objective (full [N, V] logits of both models, autodiff
through their softmaxes) is the baseline. Each row carries the estimate of docs/performance.md:

    peak ~ arguments (params + 2 AdamW moments + teacher, from the shapes)
         + gradients (one f32 copy of the student's parameters)
         + activations(T): what the step keeps for its backward pass apart from the LM head,
           measured as the temp of the same step compiled at a 1,024-token vocabulary, minus its
           gradients (the [C, V] blocks are negligible there)
         + CHUNK_BLOCKS x C x V x 4 bytes: the float32 [C, V] blocks of one chunk, student logits,
           teacher logits, the logits' gradient and one softmax intermediate

Prints a markdown table; `--out` writes the rows as JSON. CPU is fine: nothing is executed.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import argparse
import json
import time

import jax
import jax.numpy as jnp
import optax

from slimqwen_jax import losses, run_config, sharding, stage_functions, train_state
from slimqwen_jax.config import tiny
from slimqwen_jax.model import abstract_model
from slimqwen_jax.stage_functions import MtpUse

CHUNK_BLOCKS = 4  # float32 [C, V] blocks of one chunk alive at once (see the module docstring)
SMALL_VOCAB = 1024  # where the LM head's blocks are negligible: the step's other temporaries alone
MiB = 2**20


def models(vocab: int):
    """A small student and a deeper, wider teacher with more experts, both with MTP."""
    student = tiny(
        vocab_size=vocab, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=64, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=64,
        linear_value_head_dim=64, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=256,
        shared_expert_intermediate_size=256, num_mtp_layers=1,
    )  # fmt: skip
    teacher = student.replace(
        hidden_size=384, num_hidden_layers=8, layer_types=None, num_experts=16, dtype="bfloat16", param_dtype="bfloat16"
    )
    return student, teacher


def full_logits_objective(aux_coef: float, temperature: float = 1.0) -> losses.Objective:
    """The baseline: the same four terms from full [N, V] logits of both models (no chunking)."""

    def terms(student_hidden, teacher_hidden, student_head, teacher_head, targets, mask):
        s = losses.chunk_logits(student_hidden.reshape(-1, student_hidden.shape[-1]), student_head)
        t = losses.chunk_logits(teacher_hidden.reshape(-1, teacher_hidden.shape[-1]), teacher_head)
        per_token = losses.token_terms(s, t, targets.reshape(-1), temperature)
        weight = mask.reshape(-1).astype(jnp.float32)
        return {k: jnp.sum(v * weight) / jnp.sum(weight) for k, v in per_token.items()}

    def objective(student, teacher, tokens, weights):
        lam, beta = weights["lam"], weights["beta"]
        targets = tokens[:, 1:]
        main = terms(student.hidden, teacher.hidden, student.head, teacher.head, targets, jnp.ones(targets.shape, bool))
        mtp_targets, mask = losses.mtp_targets(tokens, 0)
        mtp = terms(student.mtp_hidden[0], teacher.mtp_hidden[0], student.head, teacher.head, mtp_targets, mask)
        loss = (1 - lam) * main["ce"] + lam * main["kd"] + beta * ((1 - lam) * mtp["ce"] + lam * mtp["kd"])
        return loss + aux_coef * student.aux_loss, {"loss": loss}

    return objective


def compiled_step(student, teacher, objective, batch: int, seq_len: int):
    """The trainer's train step (`stage_functions.build`), compiled for abstract (shape-only)
    arguments on one device."""
    config = run_config.base_config()
    config.loss = run_config.loss_section(distillation=True)
    mesh = sharding.make_mesh(dict(data=1, fsdp=1, expert=1), jax.devices()[:1])
    tx = optax.adamw(1e-4)
    shapes = train_state.abstract_state(student, tx, mesh)
    teacher_graphdef, teacher_params = abstract_model(teacher)
    fns = stage_functions.build(
        config, student, shapes.graphdef, tx, mesh, shapes.shardings, mtp=MtpUse(student=True, teacher=True, kd=True),
        weight_steps=(1000, 0), teacher_graphdef=teacher_graphdef, teacher_shardings=sharding.state_shardings(teacher_params, mesh),
        objective=objective,
    )  # fmt: skip
    tokens = jax.ShapeDtypeStruct((batch, seq_len + 1), jnp.int32)
    return fns.train_step.lower(shapes.params, shapes.opt_state, teacher_params, tokens, 0).compile()


def nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def activations(student, teacher, batch: int, seq_len: int) -> int:
    """Temporaries of the step apart from the LM head: its temp at a small vocabulary minus gradients."""
    student, teacher = student.replace(vocab_size=SMALL_VOCAB), teacher.replace(vocab_size=SMALL_VOCAB)
    objective = losses.distillation_objective(aux_coef=student.router_aux_loss_coef, chunk_size=SMALL_VOCAB)
    temp = compiled_step(student, teacher, objective, batch, seq_len).memory_analysis().temp_size_in_bytes
    return temp - nbytes(abstract_model(student)[1])


def estimate(student, teacher, chunk: int, activation_bytes: int) -> int:
    params = nbytes(abstract_model(student)[1])
    arguments = 3 * params + nbytes(abstract_model(teacher)[1])  # params, two AdamW moments, teacher
    return arguments + params + activation_bytes + CHUNK_BLOCKS * chunk * student.vocab_size * 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--chunks", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()

    student, teacher = models(args.vocab)
    print(f"student {nbytes(abstract_model(student)[1]) / MiB:,.0f} MiB f32, teacher "
          f"{nbytes(abstract_model(teacher)[1]) / MiB:,.0f} MiB bf16, V = {args.vocab:,}, batch {args.batch}")  # fmt: skip
    rows = []
    for seq_len in args.seq_lens:
        activation_bytes = activations(student, teacher, args.batch, seq_len)
        tokens = args.batch * seq_len
        variants = [(f"chunked C={c}", min(c, tokens), None) for c in args.chunks]
        variants.append(("unchunked", tokens, full_logits_objective(student.router_aux_loss_coef)))
        for name, chunk, objective in variants:
            objective = objective or losses.distillation_objective(
                aux_coef=student.router_aux_loss_coef, chunk_size=chunk
            )
            start = time.perf_counter()
            memory = compiled_step(student, teacher, objective, args.batch, seq_len).memory_analysis()
            peak = memory.argument_size_in_bytes + memory.temp_size_in_bytes
            row = dict(
                seq_len=seq_len, variant=name, arguments_mib=memory.argument_size_in_bytes / MiB,
                temp_mib=memory.temp_size_in_bytes / MiB, peak_mib=peak / MiB,
                activations_mib=activation_bytes / MiB, block_mib=chunk * student.vocab_size * 4 / MiB,
                estimate_mib=estimate(student, teacher, chunk, activation_bytes) / MiB,
                compile_s=time.perf_counter() - start,
            )  # fmt: skip
            row["ratio"] = row["peak_mib"] / row["estimate_mib"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| T | step | arguments | temp | peak | activations | one [C, V] block | estimate | peak / estimate |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['seq_len']} | {r['variant']} | {r['arguments_mib']:,.0f} | {r['temp_mib']:,.0f} | "
              f"{r['peak_mib']:,.0f} | {r['activations_mib']:,.0f} | {r['block_mib']:,.0f} | "
              f"{r['estimate_mib']:,.0f} | {r['ratio']:.2f} |")  # fmt: skip
    print("(MiB)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
