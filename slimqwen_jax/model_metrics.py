"""Evaluation metrics as pure functions, shared by `python -m slimqwen_jax.evaluate` and the trainer.

Shape letters: B batch, L sequence length, V vocab, D model width, J MTP drafts.

`batch_statistics` maps (model, tokens [B, L+1]) to SUMS over the batch (jit it, add the sums of
several batches with `add_statistics`); `summarize` turns the totals into the reported floats:
- loss (mean next-token cross-entropy, nats/token), perplexity = exp(loss), bits_per_byte =
  total nats / ln 2 / total bytes of the target tokens (`token_byte_lengths`);
- with a reference model (the teacher): top1_agreement (argmax equal) and mean_kl =
  mean over tokens of KL(reference || model);
- with num_drafts J > 0: teacher-forced MTP acceptance acc_1 .. acc_J (docs/method.md section 7), drafts
  made from the data's tokens instead of the model's own (no decoding needed; `decoding` measures
  the real thing).
`acceptance_rates` turns accepted draft counts (speculative decoding) into the same rates.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from slimqwen_jax.data.tokenizers import ByteTokenizer, Tokenizer
from slimqwen_jax.losses import chunked_argmax, chunked_token_sums, head_weight
from slimqwen_jax.model import Qwen3NextForCausalLM, shift_left


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """UTF-8 bytes of each token id [vocab_size] (EOS counts 0), for bits per byte. For an HF
    tokenizer, each token decoded alone: exact for whole-character tokens, approximate for byte-level
    pieces of a multi-byte character."""
    if isinstance(tokenizer, ByteTokenizer):
        lengths = np.ones(tokenizer.vocab_size, np.int32)
    else:
        lengths = np.array([len(tokenizer.decode([i]).encode()) for i in range(tokenizer.vocab_size)], np.int32)
    lengths[tokenizer.eos_id] = 0
    return lengths


def greedy_tokens(model: Qwen3NextForCausalLM, hidden: jax.Array, chunk_size: int) -> jax.Array:
    """The LM head's argmax [B, L] of hidden [B, L, D], chunk by chunk over the tokens."""
    ids = chunked_argmax(hidden.reshape(-1, hidden.shape[-1]), head_weight(model), chunk_size=chunk_size)
    return ids.reshape(hidden.shape[:-1])


def mtp_drafts(
    model: Qwen3NextForCausalLM, input_ids: jax.Array, hidden: jax.Array, num_drafts: int, chunk_size: int = 1024
) -> jax.Array:
    """Teacher-forced recursive MTP drafts [J, B, L]: draft j at position i (first MTP layer applied j
    times, fed its own output hidden and the data tokens t_{i+1} .. t_{i+j}) guesses token i + j + 1."""
    positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
    drafts = []
    for j in range(1, num_drafts + 1):
        next_embeds = model.model.embed_tokens(shift_left(input_ids, j))  # [B, L, D]
        hidden, _ = model.mtp.step(0, hidden, next_embeds, positions)
        drafts.append(greedy_tokens(model, hidden, chunk_size))  # [B, L]
    return jnp.stack(drafts)


def accepted_drafts(drafts: jax.Array, greedy: jax.Array) -> jax.Array:
    """Accepted draft count [B, L - J] at each position whose drafts all stay in the window.

    drafts [J, B, L] (draft j at i guesses token i + j + 1); greedy [B, L] (the backbone's argmax at
    i guesses token i + 1). Draft j at i is checked against greedy at i + j; the count is the
    length of the agreeing prefix.
    """
    num_drafts, _, length = drafts.shape
    n = length - num_drafts
    agree = jnp.stack([drafts[j - 1, :, :n] == greedy[:, j : j + n] for j in range(1, num_drafts + 1)])  # [J, B, n]
    return jnp.sum(jnp.cumprod(agree, axis=0), axis=0)


def batch_statistics(
    model: Qwen3NextForCausalLM,
    tokens: jax.Array,
    *,
    byte_lengths: jax.Array | None = None,
    reference: Qwen3NextForCausalLM | None = None,
    num_drafts: int = 0,
    chunk_size: int = 1024,
) -> dict[str, jax.Array]:
    """Sums over one batch tokens [B, L+1] (inputs [:, :-1], targets [:, 1:]).

    Keys: nll (total nats), tokens, and with byte_lengths [V] bytes; with `reference`: agree (top-1
    matches) and kl (total KL(reference || model) nats); with num_drafts J > 0 and an MTP module:
    draft_positions and accepted_at_least [J] (positions whose first j drafts were all accepted).
    The LM heads run `chunk_size` tokens at a time (`losses.chunked_token_sums`, the training
    objective's own sums): no [B, L, V] logits.
    """
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    flat = lambda x: x.reshape(-1, x.shape[-1])  # noqa: E731  [B, L, D] -> [N, D]
    hidden = model(inputs, with_mtp=False, with_logits=False).hidden_states
    ref_hidden = None if reference is None else flat(reference(inputs, with_mtp=False, with_logits=False).hidden_states)
    sums = chunked_token_sums(
        flat(hidden), head_weight(model), ref_hidden, None if reference is None else head_weight(reference),
        targets.reshape(-1), jnp.ones(targets.size, bool), chunk_size=chunk_size,
    )  # fmt: skip
    stats = {"nll": sums["ce"], "tokens": sums["count"]}
    if byte_lengths is not None:
        stats["bytes"] = jnp.sum(byte_lengths[targets]).astype(jnp.float32)
    if reference is not None:
        stats["agree"], stats["kl"] = sums["agree"], sums["kd"]
    if num_drafts > 0 and model.mtp is not None:
        drafts = mtp_drafts(model, inputs, hidden, num_drafts, chunk_size)
        accepted = accepted_drafts(drafts, greedy_tokens(model, hidden, chunk_size))  # [B, L - J]
        stats["draft_positions"] = jnp.asarray(accepted.size, jnp.float32)
        stats["accepted_at_least"] = jnp.stack([jnp.sum(accepted >= j) for j in range(1, num_drafts + 1)]).astype(
            jnp.float32
        )
    return stats


def add_statistics(total: dict | None, stats: dict) -> dict:
    """Running sums of `batch_statistics` outputs (as float64 numpy)."""
    stats = {k: np.asarray(v, np.float64) for k, v in stats.items()}
    return stats if total is None else {k: total[k] + stats[k] for k in total}


def rates_from_counts(accepted_at_least, positions: float) -> dict[str, float]:
    """acc_j = P(first j drafts accepted), cond_j = acc_j / acc_{j-1} (acc_0 = 1), mean accepted
    drafts (sum of acc_j) and tokens per verification step (1 + that)."""
    acc = [float(c) / positions for c in np.asarray(accepted_at_least)]
    rates = {f"acc_{j}": a for j, a in enumerate(acc, 1)}
    previous = [1.0, *acc[:-1]]
    rates.update({f"cond_{j}": a / p if p else 0.0 for j, (a, p) in enumerate(zip(acc, previous), 1)})
    rates["mean_accepted"] = sum(acc)
    rates["tokens_per_step"] = 1.0 + sum(acc)
    return rates


def acceptance_rates(accepted: np.ndarray, num_drafts: int) -> dict[str, float]:
    """Rates of `rates_from_counts` from the accepted draft count of each verification step [N]."""
    accepted = np.asarray(accepted)
    if accepted.size == 0:
        raise ValueError("no verification steps to compute acceptance rates from")
    return rates_from_counts([np.sum(accepted >= j) for j in range(1, num_drafts + 1)], accepted.size)


def summarize(total: dict) -> dict[str, float]:
    """Totals of `batch_statistics` -> loss, perplexity, bits_per_byte, top1_agreement, mean_kl,
    teacher-forced acceptance rates (each where its inputs were measured)."""
    loss = float(total["nll"] / total["tokens"])
    report = {"loss": loss, "perplexity": math.exp(loss), "tokens": int(total["tokens"])}
    if "bytes" in total and total["bytes"] > 0:
        report["bits_per_byte"] = float(total["nll"] / math.log(2) / total["bytes"])
    if "agree" in total:
        report["top1_agreement"] = float(total["agree"] / total["tokens"])
        report["mean_kl"] = float(total["kl"] / total["tokens"])
    if "accepted_at_least" in total:
        rates = rates_from_counts(total["accepted_at_least"], float(total["draft_positions"]))
        report.update({f"teacher_forced_{k}": v for k, v in rates.items()})
    return report
