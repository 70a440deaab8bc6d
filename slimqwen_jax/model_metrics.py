"""Evaluation metrics as pure functions, shared by `python -m slimqwen_jax.evaluate` and the trainer.

Shape letters: B batch, L sequence length, V vocab, D model width, J MTP drafts; in the MTP layer's
attention H / G query / kv heads, R = H / G, A head dim, C queries per block, N a chain's own entries.

`batch_statistics` maps (model, tokens [B, L+1]) to SUMS over the batch (jit it, add the sums of
several batches with `add_statistics`); `summarize` turns the totals into the reported floats:
- loss (mean next-token cross-entropy, nats/token), perplexity = exp(loss), bits_per_byte =
  total nats / ln 2 / total bytes of the target tokens (`token_byte_lengths`);
- with a reference model (the teacher): top1_agreement (argmax equal) and mean_kl =
  mean over tokens of KL(reference || model);
- with num_drafts J > 0: teacher-forced MTP acceptance acc_0 .. acc_{J-1} (docs/method.md section 7;
  acc_k = share of positions whose first k + 1 drafts are all accepted, `rates_from_counts`). Each
  position's drafts are made as speculative decoding makes them (`mtp_drafts`), but from the data's
  tokens: on the model's own greedy text they are decoding's per round, exactly; on held-out data a
  proxy (no decoding needed; `decoding` measures the real thing).
`acceptance_rates` turns the accepted draft counts of speculative decoding's rounds into the same rates.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from slimqwen_jax.data.tokenizers import ByteTokenizer, Tokenizer
from slimqwen_jax.decoding import layer_with_mixer
from slimqwen_jax.layers import Attention, attention_block_size
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


def chain_attention(q, shared_k, shared_v, own_k, own_v, scale: float, block: int) -> jax.Array:
    """Attention of L draft chains at once, softmax in float32, `block` queries at a time.

    q [B, L, H, A]: the query of chain i; shared_k, shared_v [B, L, G, A]: entries that chain i sees
    at positions m <= i; own_k, own_v [B, L, N, G, A]: chain i's own N entries, which no other chain
    sees. -> [B, L, H, A]. Scores per block: [B, H, C, <= L + N], never [B, H, L, L] at once.
    """
    b, t, h, a = q.shape
    g = shared_k.shape[2]
    q = q.reshape(b, t, g, h // g, a)  # query head h uses kv head h // (H / G)
    out = []
    for start in range(0, t, block):
        end = min(start + block, t)
        q_block = q[:, start:end]  # [B, C, G, R, A]
        shared = jnp.einsum("bcgra,bsga->bgrcs", q_block, shared_k[:, :end], preferred_element_type=jnp.float32)
        causal = (start + jnp.arange(end - start))[:, None] >= jnp.arange(end)  # [C, end]
        shared = jnp.where(causal, shared * scale, -jnp.inf)  # [B, G, R, C, end]
        own = jnp.einsum("bcgra,bcnga->bgrcn", q_block, own_k[:, start:end], preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(jnp.concatenate([shared, own * scale], axis=-1), axis=-1).astype(q.dtype)
        out.append(
            jnp.einsum("bgrcs,bsga->bcgra", probs[..., :end], shared_v[:, :end])
            + jnp.einsum("bgrcn,bcnga->bcgra", probs[..., end:], own_v[:, start:end])
        )  # [B, C, G, R, A]
    return jnp.concatenate(out, axis=1).reshape(b, t, h, a)


def mtp_drafts(
    model: Qwen3NextForCausalLM, input_ids: jax.Array, hidden: jax.Array, num_drafts: int, chunk_size: int = 1024
) -> jax.Array:
    """Teacher-forced MTP drafts [J, B, L] of every position's chain, structured as speculative decoding
    drafts them: draft j at position i guesses token i + j + 1.

    The chain at i is the decoding round whose pending token is t_{i+1} (`decoding._speculative_step`).
    Draft 1 is the first MTP layer on the pair (h_i, t_{i+1}) at RoPE position i, attending to the
    pairs (h_m, t_{m+1}) of m <= i, the entries that decoding's MTP cache has committed. Draft j >= 2
    is the layer applied again to (draft j-1's hidden, t_{i+j}) at RoPE position i + j - 1, attending
    to those committed entries and to the chain's own levels 2..j (decoding's provisional entries),
    never to another chain's. The data token t_{i+j} stands in for the drafted one; on the model's
    own greedy text the two agree wherever the earlier drafts were accepted, so `accepted_drafts`
    gives decoding's accepted counts exactly. O(L^2) attention per draft level, like the forward.
    """
    layer = model.mtp.layers[0]
    block = attention_block_size(input_ids.shape[1], model.config.attention_chunk_size)
    keys, values, drafts = [], [], []  # keys, values: [B, L, G, A] per level so far
    for level in range(1, num_drafts + 1):
        positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]) + level - 1, input_ids.shape)  # [B, L]
        mixer = functools.partial(_chain_mixer, layer.self_attn, positions, keys, values, block)
        x = model.mtp.fuse(hidden, model.model.embed_tokens(shift_left(input_ids, level)))  # [B, L, D]
        hidden, (k, v) = layer_with_mixer(layer, x, mixer)
        hidden = model.mtp.norm(hidden)
        keys.append(k)
        values.append(v)
        drafts.append(greedy_tokens(model, hidden, chunk_size))  # [B, L]
    return jnp.stack(drafts)


def _chain_mixer(attn: Attention, positions, keys, values, block: int, normed: jax.Array):
    """The MTP layer's attention at one draft level of every chain: normed [B, L, D] -> (mixed [B, L, D],
    this level's (k, v) [B, L, G, A]). Level 1 (no earlier `keys`) is the shared level; later levels
    are the chain's own."""
    q, k, v, gate = attn.project(normed, positions)
    chain_k, chain_v = jnp.stack([*keys, k], axis=2), jnp.stack([*values, v], axis=2)  # [B, L, level, G, A]
    attended = chain_attention(
        q, chain_k[:, :, 0], chain_v[:, :, 0], chain_k[:, :, 1:], chain_v[:, :, 1:], attn.head_dim**-0.5, block
    )  # fmt: skip
    return attn.output(attended, gate), (k, v)


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


def teacher_forced_accepted(
    model: Qwen3NextForCausalLM, input_ids: jax.Array, hidden: jax.Array, num_drafts: int, chunk_size: int = 1024
) -> jax.Array:
    """Accepted draft count [B, L - J] of the chain at each position (`mtp_drafts` checked against the
    backbone's greedy tokens, `accepted_drafts`); hidden [B, L, D]: the backbone's on input_ids [B, L]."""
    drafts = mtp_drafts(model, input_ids, hidden, num_drafts, chunk_size)
    return accepted_drafts(drafts, greedy_tokens(model, hidden, chunk_size))


def accepted_prefix_counts(accepted, num_drafts: int) -> jax.Array:
    """[J] counts: entry k = how many accepted draft counts (`accepted`, any shape) exceed k, i.e.
    how many positions or rounds had their first k + 1 drafts all accepted."""
    return jnp.stack([jnp.sum(accepted > k) for k in range(num_drafts)]).astype(jnp.float32)


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
    draft_positions and accepted_at_least [J] (entry k: positions whose first k + 1 drafts were all
    accepted, `teacher_forced_accepted`).
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
        accepted = teacher_forced_accepted(model, inputs, hidden, num_drafts, chunk_size)  # [B, L - J]
        stats["draft_positions"] = jnp.asarray(accepted.size, jnp.float32)
        stats["accepted_at_least"] = accepted_prefix_counts(accepted, num_drafts)
    return stats


def add_statistics(total: dict | None, stats: dict) -> dict:
    """Running sums of `batch_statistics` outputs (as float64 numpy)."""
    stats = {k: np.asarray(v, np.float64) for k, v in stats.items()}
    return stats if total is None else {k: total[k] + stats[k] for k in total}


def rates_from_counts(accepted_at_least, positions: float) -> dict[str, float]:
    """The paper's acceptance rates (Table 4) from `accepted_prefix_counts` [J] over `positions`
    positions or verification rounds.

    acc_k, k = 0..J-1: the share whose first k + 1 drafts were all accepted (acc_0: the first draft;
    not the trivial 1). cond_0 = acc_0, cond_k = acc_k / acc_{k-1} (0 where acc_{k-1} = 0): the
    share of draft k + 1 accepted given the k before it were. mean_accepted = sum_k acc_k, the
    expected accepted drafts per round; tokens_per_step = 1 + that (the verifier adds one token).
    """
    acc = [float(c) / positions for c in np.asarray(accepted_at_least)]
    rates = {f"acc_{k}": a for k, a in enumerate(acc)}
    previous = [1.0, *acc[:-1]]
    rates.update({f"cond_{k}": a / p if p else 0.0 for k, (a, p) in enumerate(zip(acc, previous))})
    rates["mean_accepted"] = sum(acc)
    rates["tokens_per_step"] = 1.0 + sum(acc)
    return rates


def acceptance_rates(accepted: np.ndarray, num_drafts: int) -> dict[str, float]:
    """Rates of `rates_from_counts` (acc_0..acc_{J-1}, ...) from the accepted draft count of each
    verification round [N] (speculative decoding's `Generation.accepted`)."""
    accepted = np.asarray(accepted)
    if accepted.size == 0:
        raise ValueError("no verification steps to compute acceptance rates from")
    return rates_from_counts(accepted_prefix_counts(accepted, num_drafts), accepted.size)


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
