"""Cached decoding and MTP speculative decoding against independent references: the full forward
over the same prefix, HF transformers' `generate`, and plain greedy decoding."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_reference import add_mtp_tensors, make_hf_model

from slimqwen_jax import hf
from slimqwen_jax.config import tiny
from slimqwen_jax.decoding import Decoder, DecodingError, _decode_step, pad_prompts, sample_tokens
from slimqwen_jax.model import Qwen3NextForCausalLM
from slimqwen_jax.model_metrics import acceptance_rates, teacher_forced_accepted
from slimqwen_jax.testing import assert_relative_error, forward

MAX_LEN = 96


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(random HF model, its directory with random `mtp.*` tensors added)."""
    model = make_hf_model("gqa2_ratio2")
    directory = tmp_path_factory.mktemp("decoding")
    model.save_pretrained(directory)
    add_mtp_tensors(directory)
    return model, directory


@pytest.fixture(scope="module")
def model(checkpoint):
    return hf.load_model(checkpoint[1])


@pytest.fixture(scope="module")
def decoder(model):
    return Decoder(model, max_len=MAX_LEN)


def prompts(lengths, seed=0, vocab=97):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in lengths]


@pytest.mark.parametrize("padding", ["left", "right"])
def test_cached_logits_equal_full_forward_at_every_step(model, decoder, padding):
    # Row 0 crosses the delta rule's 64-token chunk boundary in the prefill; row 1 is padded.
    rows = prompts([70, 23])
    tokens, valid = pad_prompts(rows, padding)
    _, logits, cache = decoder.prefill(tokens, valid)
    steps = []
    for _ in range(5):
        steps.append(np.asarray(logits))
        token, logits, cache = decoder.decode_step(cache, logits, jax.random.key(0))
        for row, t in zip(rows, np.asarray(token)):
            row.append(int(t))
    steps = np.stack(steps, axis=1)  # [B, steps, V]
    for b, row in enumerate(rows):
        full = np.asarray(forward(model, jnp.asarray([row])).logits[0])  # [T, V]: logits of every prefix at once
        assert_relative_error(steps[b], full[-6:-1], 1e-5, f"row {b} ({padding} padding)")


def test_greedy_generation_equals_transformers_generate(checkpoint, decoder):
    hf_model, _ = checkpoint
    ids = np.random.default_rng(3).integers(0, 97, (2, 12))
    with torch.no_grad():
        expected = hf_model.generate(torch.tensor(ids), max_new_tokens=10, do_sample=False, min_new_tokens=10)
    ours = decoder.generate(ids.tolist(), 10)
    assert ours.tokens == expected[:, 12:].tolist()


def test_stop_tokens_end_each_row_and_decoding_compiles_once(decoder):
    rows = prompts([9, 14], seed=1)
    full = decoder.generate(rows, 12).tokens
    stop = full[0][4]
    stopped = decoder.generate(rows, 12, stop_tokens=[stop]).tokens
    for free, cut in zip(full, stopped):
        end = free.index(stop) + 1 if stop in free else len(free)
        assert cut == free[:end]
    decoder.generate(prompts([3, 5], seed=2), 7, padding="right", prompt_len=14)
    assert decoder._step_fn(_decode_step, 0.0, 1.0, donate=(1,))._cache_size() == 1  # not once per token


def test_sampling_is_seeded_and_top_p_keeps_the_nucleus():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 4000))
    keys = jax.random.key(0)
    tokens = np.asarray(sample_tokens(logits, keys, temperature=1.0, top_p=0.7))
    assert set(tokens.tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.7; 0.15 and 0.05 are cut
    assert abs(np.mean(tokens == 0) - 0.5 / 0.8) < 0.03
    again = np.asarray(sample_tokens(logits, keys, temperature=1.0, top_p=0.7))
    np.testing.assert_array_equal(tokens, again)
    full = np.asarray(sample_tokens(logits, keys, temperature=1.0, top_p=1.0))
    assert abs(np.mean(full == 3) - 0.05) < 0.015
    np.testing.assert_array_equal(sample_tokens(logits[:2], keys, temperature=0.0, top_p=0.5), [0, 0])


def test_sampled_generation_is_seeded(decoder):
    rows = prompts([6, 10], seed=3)
    first, again, other = (decoder.generate(rows, 8, temperature=1.0, top_p=0.9, seed=s).tokens for s in (0, 0, 1))
    assert first == again and first != other


def few_channel_model(model, channels: int = 2):
    """The model with its final and MTP norms reduced to the first `channels` channels: the backbone's
    and the drafts' greedy tokens then come from the same few tokens, so drafts are accepted at some
    positions and rejected at others (with one channel, runs of up to 3 accepted drafts occur)."""
    graphdef, state = nnx.split(model)
    model = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))
    d = model.config.hidden_size
    weight = jnp.full((d,), -1.0).at[:channels].set(1.0)  # (1 + w) keeps channels 0 .. channels - 1 only
    model.model.norm.weight[...] = weight
    model.mtp.norm.weight[...] = weight
    return model


def rejecting_model(model):
    """The model with its MTP output zeroed ((1 + w) = 0): every draft is token 0."""
    graphdef, state = nnx.split(model)
    model = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))
    model.mtp.norm.weight[...] = jnp.full_like(model.mtp.norm.weight[...], -1.0)
    return model


@pytest.mark.parametrize(("num_drafts", "padding"), [(1, "left"), (2, "right"), (3, "left")])
def test_speculative_greedy_equals_plain_greedy(model, num_drafts, padding):
    decoder = Decoder(few_channel_model(model), max_len=MAX_LEN)
    rows = prompts([11, 6, 17], seed=2)
    plain = decoder.generate(rows, 20, padding=padding)
    speculative = decoder.speculative_generate(rows, 20, num_drafts=num_drafts, padding=padding)
    assert speculative.tokens == plain.tokens
    accepted = speculative.accepted
    assert accepted.min() == 0 and accepted.max() >= 1  # both paths of the acceptance are taken
    assert speculative.steps < plain.steps
    assert sum(accepted + 1) >= speculative.num_generated - len(rows)


def round_starts(prompt_len: int, accepted: np.ndarray) -> np.ndarray:
    """The pending token's position [N] of each round of one row: the first follows the prompt, each
    next one the previous round's accepted drafts and the verifier's own token."""
    return prompt_len + np.concatenate([[0], np.cumsum(accepted + 1)[:-1]])


def test_teacher_forced_acceptance_equals_decoding_round_by_round(model):
    """On the model's own greedy text, the teacher-forced accepted count (`teacher_forced_accepted`) at
    the position before each round's pending token equals the round's accepted drafts, at every
    draft level: `mtp_drafts` attends as decoding's MTP cache does (the committed backbone-level
    entries, then the chain's own provisional ones). The first draft of every round is also the MTP
    head of a full forward over the final sequence, so the MTP cache holds exactly the entries of
    one-by-one decoding after provisional draft steps and rejected drafts."""
    narrow, num_drafts = few_channel_model(model, channels=1), 3
    prompt = prompts([9], seed=7)[0]
    speculative = Decoder(narrow, max_len=MAX_LEN).speculative_generate([prompt], 40, num_drafts=num_drafts)
    sequence = np.asarray([prompt + speculative.tokens[0]])  # [1, T]
    out = forward(narrow, jnp.asarray(sequence))
    accepted_fn = nnx.jit(functools.partial(teacher_forced_accepted, num_drafts=num_drafts))
    teacher_forced = np.asarray(accepted_fn(narrow, jnp.asarray(sequence), out.hidden_states))[0]  # [T - J]
    starts = round_starts(len(prompt), speculative.accepted)  # [N]
    inside = starts - 1 < len(teacher_forced)  # the round's J drafts guess tokens of the sequence
    starts, accepted = starts[inside], speculative.accepted[inside]
    np.testing.assert_array_equal(teacher_forced[starts - 1], accepted)
    first_drafts = np.asarray(out.mtp_logits[0, 0]).argmax(-1)  # [T]: guess of token i + 2 at position i
    np.testing.assert_array_equal(first_drafts[starts - 1] == sequence[0, starts + 1], accepted >= 1)
    assert set(accepted.tolist()) == set(range(num_drafts + 1))  # every accepted-prefix length occurs


def test_speculative_with_every_draft_rejected(model):
    decoder = Decoder(rejecting_model(model), max_len=MAX_LEN)
    rows = prompts([8, 13], seed=5)
    plain = decoder.generate(rows, 12)
    assert all(0 not in row for row in plain.tokens)  # so that the all-zero drafts are always wrong
    speculative = decoder.speculative_generate(rows, 12, num_drafts=2)
    assert speculative.tokens == plain.tokens
    assert not speculative.accepted.any()
    assert acceptance_rates(speculative.accepted, 2)["acc_0"] == 0.0


def test_bad_requests_are_refused(decoder):
    with pytest.raises(DecodingError, match="need 101 cache slots; the cache has 96"):
        decoder.generate(prompts([90]), 11)
    with pytest.raises(DecodingError, match="need 97 cache slots"):
        decoder.speculative_generate(prompts([80]), 14, num_drafts=2)
    with pytest.raises(DecodingError, match="empty prompt"):
        decoder.generate([[1, 2], []], 4)
    no_mtp = Qwen3NextForCausalLM(tiny(num_mtp_layers=0), rngs=nnx.Rngs(0))
    with pytest.raises(DecodingError, match="needs an MTP module"):
        Decoder(no_mtp, max_len=16).speculative_generate([[1, 2]], 4, num_drafts=2)
