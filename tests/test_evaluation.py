"""Evaluation metrics against numpy and hand-computed values; `python -m slimqwen_jax.evaluate` end to end."""

import functools
import json
import math
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tool_runs import run_tool

from slimqwen_jax.checkpoint import save_checkpoint
from slimqwen_jax.config import tiny
from slimqwen_jax.data import ByteTokenizer
from slimqwen_jax.model import Qwen3NextForCausalLM
from slimqwen_jax.model_metrics import (
    acceptance_rates,
    accepted_drafts,
    accepted_prefix_counts,
    add_statistics,
    batch_statistics,
    summarize,
    token_byte_lengths,
)
from slimqwen_jax.testing import forward

REPO = Path(__file__).resolve().parents[1]

SMALL = dict(hidden_size=32, head_dim=8, linear_key_head_dim=8, linear_value_head_dim=8, moe_intermediate_size=16,
             shared_expert_intermediate_size=16, initializer_range=0.1)  # fmt: skip


def test_acceptance_rates_by_hand():
    """acc_k (k = 0..J-1) = share of positions whose first k + 1 drafts are all accepted, on a built case."""
    greedy = jnp.array([[10, 11, 12, 13, 14, 15, 16], [20, 21, 22, 23, 24, 25, 26]])  # greedy[i] guesses token i + 1
    # Draft j at i guesses token i + j + 1 and is checked against greedy[i + j]. With L = 7 and J = 3,
    # positions 0..3 keep all their drafts in the window; the 5s at positions 4..6 are never read.
    drafts = jnp.array([
        [[11, 12, 99, 14, 5, 5, 5], [21, 22, 0, 24, 5, 5, 5]],  # draft 1, against greedy[i + 1]
        [[12, 99, 14, 15, 5, 5, 5], [22, 23, 0, 0, 5, 5, 5]],  # draft 2, against greedy[i + 2]
        [[13, 14, 15, 99, 5, 5, 5], [23, 24, 0, 26, 5, 5, 5]],  # draft 3, against greedy[i + 3]
    ])  # fmt: skip
    # Row 0: i = 0: 11, 12, 13 all agree -> 3. i = 1: 12 agrees, 99 != 13 stops it (the 14 that
    # follows agrees but does not count) -> 1. i = 2: 99 != 13 -> 0 (drafts 2 and 3 would agree).
    # i = 3: 14, 15 agree, 99 != 16 -> 2.
    # Row 1: i = 0: 21, 22, 23 -> 3. i = 1: 22, 23, 24 -> 3. i = 2: 0 != 23 -> 0. i = 3: 24, then 0 != 25 -> 1.
    accepted = accepted_drafts(drafts, greedy)
    np.testing.assert_array_equal(accepted, [[3, 1, 0, 2], [3, 3, 0, 1]])
    # acc_0: 6 of the 8 positions accept draft 1; acc_1: 4 (the counts 3, 2, 3, 3) accept drafts 1-2;
    # acc_2: 3 (the three 3s) accept all three. cond_0 = acc_0, cond_k = acc_k / acc_{k-1}.
    # mean_accepted = 6/8 + 4/8 + 3/8 = 13/8, the mean count (3+1+0+2+3+3+0+1)/8; tokens_per_step = 1 + that.
    expected = {"acc_0": 6 / 8, "acc_1": 4 / 8, "acc_2": 3 / 8, "cond_0": 6 / 8, "cond_1": 4 / 6, "cond_2": 3 / 4,
                "mean_accepted": 13 / 8, "tokens_per_step": 21 / 8}  # fmt: skip
    counts = accepted_prefix_counts(accepted, 3)
    np.testing.assert_array_equal(counts, [6, 4, 3])
    # The teacher-forced path of the trainer and the evaluate command (`batch_statistics` sums, `summarize`):
    report = summarize({"nll": 8.0, "tokens": 8.0, "draft_positions": 8.0, "accepted_at_least": counts})
    assert {k: report[f"teacher_forced_{k}"] for k in expected} == pytest.approx(expected)
    # The same counts as speculative decoding's rounds (`Generation.accepted`) give the same rates.
    assert acceptance_rates(np.asarray(accepted).ravel(), 3) == pytest.approx(expected)
    with pytest.raises(ValueError, match="no verification steps"):
        acceptance_rates(np.zeros(0, int), 3)


def test_batch_statistics_match_numpy():
    cfg = tiny(**SMALL)
    model = Qwen3NextForCausalLM(cfg, rngs=nnx.Rngs(0))
    # Final and MTP norms kept to two channels: greedy and draft tokens then often agree.
    two_channels = jnp.full((cfg.hidden_size,), -1.0).at[:2].set(1.0)
    model.model.norm.weight[...], model.mtp.norm.weight[...] = two_channels, two_channels
    reference = Qwen3NextForCausalLM(cfg, rngs=nnx.Rngs(1))
    tokens = np.random.default_rng(0).integers(0, 257, (2, 17))
    tokens[0, 5] = 256  # one EOS target: no bytes
    lengths = token_byte_lengths(ByteTokenizer())
    batches = [tokens[:1], tokens[1:]]
    statistics = nnx.jit(functools.partial(batch_statistics, num_drafts=2))
    total = None
    for batch in batches:
        stats = statistics(model, jnp.asarray(batch), byte_lengths=jnp.asarray(lengths), reference=reference)
        total = add_statistics(total, stats)
    report = summarize(total)

    def log_softmax(m):
        logits = np.asarray(forward(m, jnp.asarray(tokens[:, :-1])).logits, np.float64)
        return (
            logits
            - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
            - logits.max(-1, keepdims=True)
        )

    ours, ref = log_softmax(model), log_softmax(reference)
    nll = -np.take_along_axis(ours, tokens[:, 1:, None], -1)[..., 0]
    assert report["tokens"] == 32
    assert report["loss"] == pytest.approx(nll.mean(), rel=1e-5)
    assert report["perplexity"] == pytest.approx(math.exp(nll.mean()), rel=1e-5)
    assert report["bits_per_byte"] == pytest.approx(nll.sum() / math.log(2) / 31, rel=1e-5)
    assert report["top1_agreement"] == pytest.approx(np.mean(ours.argmax(-1) == ref.argmax(-1)))
    assert report["mean_kl"] == pytest.approx(np.mean(np.sum(np.exp(ref) * (ref - ours), -1)), rel=1e-4)
    # Draft 1 is the model's own MTP head (depth 0); it is accepted where it equals the next greedy token.
    out = forward(model, jnp.asarray(tokens[:, :-1]))
    draft, greedy = np.asarray(out.mtp_logits[0]).argmax(-1), np.asarray(out.logits).argmax(-1)  # [B, L]
    assert report["teacher_forced_acc_0"] == pytest.approx(np.mean(draft[:, :-2] == greedy[:, 1:-1]))
    assert 0 < report["teacher_forced_acc_0"] < 1
    assert report["teacher_forced_acc_1"] <= report["teacher_forced_acc_0"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = Qwen3NextForCausalLM(tiny(**SMALL), rngs=nnx.Rngs(0))
    return save_checkpoint(model, tmp_path_factory.mktemp("evaluate") / "model")


EVAL_OVERRIDES = (
    "--config.data.seq_len=32", "--config.heldout.batch_size=2", "--config.heldout.num_batches=2",
    "--config.decoding.num_prompts=2", "--config.decoding.prompt_len=12", "--config.decoding.max_new_tokens=6",
    "--config.decoding.num_drafts=2",
)  # fmt: skip


@pytest.mark.slow
def test_evaluate_command_end_to_end(checkpoint, tmp_path):
    report_file = tmp_path / "report.json"
    code, output = run_tool(
        "evaluate", "evaluate_quickstart.py", f"--config.model={checkpoint}", f"--config.reference={checkpoint}",
        f"--config.report={report_file}", *EVAL_OVERRIDES,
    )  # fmt: skip
    assert code == 0, output
    report = json.loads(report_file.read_text())
    heldout, decoding = report["heldout"], report["decoding"]
    assert heldout["tokens"] == 2 * 2 * 32
    assert heldout["top1_agreement"] == 1.0 and heldout["mean_kl"] == pytest.approx(0.0, abs=1e-6)  # itself
    assert heldout["perplexity"] == pytest.approx(math.exp(heldout["loss"]))
    assert decoding["uncached"]["identical_to_cached"] and decoding["speculative"]["identical_to_cached"]
    assert {"acc_0", "acc_1", "cond_1", "mean_accepted", "speedup"} <= set(decoding["speculative"])
    assert "acc_2" not in decoding["speculative"]  # num_drafts=2: acc_0 and acc_1
    assert "held-out batch 2/2" in output and "tok/s" in output and "ETA" in output
    assert re.search(r"speculative output == greedy +True", output)
    assert re.search(r"speculative acc_0 acc_1 +[\d.]+ [\d.]+\n", output), output
    assert re.search(r"acc_k +share of positions / rounds whose first k\+1 drafts were all accepted", output)

    # The report is never overwritten unless asked.
    before = report_file.read_text()
    code, output = run_tool(
        "evaluate", "evaluate_quickstart.py", f"--config.model={checkpoint}", f"--config.report={report_file}"
    )
    assert code == 1 and "exists; pass --config.overwrite=true" in output
    assert report_file.read_text() == before


def test_evaluate_measures_only_what_is_asked(checkpoint, tmp_path):
    """heldout.num_batches=0: decoding only (the reproduction's speculative points); decoding.num_prompts=0:
    the held-out measures only (its extra sources)."""
    from slimqwen_jax import evaluate, reproduce, sweep
    from slimqwen_jax.testing import load_config_file

    config = load_config_file(REPO / "configs" / "evaluate_quickstart.py").get_config()
    config.update_from_flattened_dict({"model": str(checkpoint), "data.seq_len": 32, "heldout.batch_size": 2,
                                       "heldout.num_batches": 0, "decoding.num_prompts": 1, "decoding.prompt_len": 8,
                                       "decoding.max_new_tokens": 4, "decoding.num_drafts": 2, "decoding.uncached": False,
                                       "report": str(tmp_path / "decoding.json")})  # fmt: skip
    report = evaluate.run(config)
    assert "heldout" not in report and {"cached", "speculative"} <= set(report["decoding"])
    measures = reproduce.evaluation_measures(reproduce.SPECULATIVE, sweep._numbers(report))
    assert measures == {
        "spec_acc_0": report["decoding"]["speculative"]["acc_0"],
        "spec_acc_1": report["decoding"]["speculative"]["acc_1"],
        "spec_speedup": report["decoding"]["speculative"]["speedup"],
    }
    config.update_from_flattened_dict({"heldout.num_batches": 1, "decoding.num_prompts": 0,
                                       "report": str(tmp_path / "heldout.json")})  # fmt: skip
    report = evaluate.run(config)
    assert "decoding" not in report and report["heldout"]["tokens"] == 2 * 32
    assert reproduce.evaluation_measures("prose", sweep._numbers(report)) == {"prose_ce": report["heldout"]["loss"]}


def test_evaluate_refuses_bad_input(tmp_path):
    code, output = run_tool(
        "evaluate", "evaluate_quickstart.py", f"--config.model={tmp_path / 'missing'}",
        f"--config.report={tmp_path / 'r.json'}",
    )  # fmt: skip
    assert code == 1 and "does not exist" in output and "Traceback" not in output
    assert not (tmp_path / "r.json").exists()
    # Sizes are checked before the model is loaded (it does not even exist here), all at once.
    code, output = run_tool(
        "evaluate", "evaluate_quickstart.py", f"--config.model={tmp_path / 'missing'}",
        "--config.decoding.num_prompts=0", "--config.heldout.num_batches=0", "--config.decoding.num_drafts=-1",
        "--config.heldout.batch_size=0",
    )  # fmt: skip
    assert code == 1 and "Traceback" not in output and "does not exist" not in output, output
    for message in ("nothing to evaluate: heldout.num_batches and decoding.num_prompts are both 0",
                    "heldout.batch_size must be >= 1, got 0", "decoding.num_drafts must be >= 0, got -1"):  # fmt: skip
        assert message in output, output
    code, output = run_tool("evaluate", "evaluate_quickstart.py", "--config.decoding.no_such_key=1")
    assert code == 2 and "bad command line" in output
