"""Evaluate a model: held-out loss, agreement with a reference model, decoding speed, MTP acceptance.

    python -m slimqwen_jax.evaluate --config configs/evaluate_quickstart.py --config.model=<path>

`model` (and the optional `reference`, e.g. the teacher) is an HF directory or one of our
checkpoints (a training run's `checkpoints/<step>` directory included). Held-out windows of any
`slimqwen_jax.data` source give loss / bits per byte / perplexity, top-1 agreement and KL against
the reference, and teacher-forced MTP acceptance (a proxy: drafts from the data's tokens); held-out
prompts are then decoded greedily with caches, without them, and with MTP speculative decoding
(acceptance rates acc_0..acc_{J-1}, speed-up). acc_k, the paper's convention: the share of positions
(teacher-forced) or verification rounds (speculative) whose first k + 1 drafts were all accepted.
Writes a JSON report (never over an existing one unless `overwrite`) and prints a short table.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from slimqwen_jax import cli, data, run_config, storage
from slimqwen_jax.config import ConfigError
from slimqwen_jax.decoding import Decoder, DecodingError, uncached_generate
from slimqwen_jax.hf import CheckpointMismatchError
from slimqwen_jax.loading import load_model
from slimqwen_jax.model import Qwen3NextForCausalLM
from slimqwen_jax.model_metrics import acceptance_rates, add_statistics, batch_statistics, summarize, token_byte_lengths
from slimqwen_jax.progress import format_duration

log = logging.getLogger("slimqwen_jax.evaluate")


class EvaluateError(RuntimeError):
    """An evaluation that cannot run; the message says why."""


def report_path(config: ml_collections.ConfigDict) -> Path:
    """The JSON report's path (not empty: `run_config.check`), refused if it exists (unless
    `overwrite`) before anything runs."""
    path = storage.path(config.report)
    if path.exists() and not config.overwrite:
        raise EvaluateError(f"{path} exists; pass --config.overwrite=true or another --config.report")
    return path


# ---------------------------------------------------------------------------- held-out metrics
def heldout_metrics(model, reference, batches: list[np.ndarray], byte_lengths: np.ndarray, num_drafts: int) -> dict:
    """`evaluation.summarize` over the held-out batches, with a progress line per batch."""
    graphdef, params = nnx.split(model)
    ref_graphdef, ref_params = nnx.split(reference) if reference is not None else (None, None)

    @jax.jit
    def statistics(params, ref_params, tokens):
        ref = nnx.merge(ref_graphdef, ref_params) if ref_graphdef is not None else None
        return batch_statistics(
            nnx.merge(graphdef, params), tokens, byte_lengths=jnp.asarray(byte_lengths), reference=ref,
            num_drafts=num_drafts,
        )  # fmt: skip

    total, start = None, time.perf_counter()
    for i, batch in enumerate(batches, 1):
        total = add_statistics(total, statistics(params, ref_params, jnp.asarray(batch)))
        elapsed = time.perf_counter() - start
        log.info(
            "held-out batch %d/%d | %s tok/s | ETA %s", i, len(batches),
            f"{total['tokens'] / elapsed:,.0f}", format_duration(elapsed / i * (len(batches) - i)),
        )  # fmt: skip
    return summarize(total)


# ---------------------------------------------------------------------------- decoding
def _timed(label: str, generate, prompts: list[list[int]], batch_size: int) -> dict:
    """`generate(rows)` over the prompts `batch_size` rows at a time; tokens/s over the decode loops."""
    tokens, seconds, prefill_seconds, steps, accepted = [], 0.0, 0.0, 0, []
    for start in range(0, len(prompts), batch_size):
        result = generate(prompts[start : start + batch_size])
        tokens += result.tokens
        seconds += result.seconds
        prefill_seconds += result.prefill_seconds
        steps += result.steps
        if result.accepted is not None:
            accepted.append(result.accepted)
        log.info(
            "%s: %d/%d prompts | %s tok/s | ETA %s", label, len(tokens), len(prompts),
            f"{sum(map(len, tokens)) / seconds:,.0f}",
            format_duration(seconds / len(tokens) * (len(prompts) - len(tokens))),
        )  # fmt: skip
    out = {"tokens": tokens, "seconds": seconds, "prefill_seconds": prefill_seconds, "steps": steps,
           "tokens_per_s": sum(map(len, tokens)) / seconds}  # fmt: skip
    if accepted:
        out["accepted"] = np.concatenate(accepted)
    return out


def decoding_metrics(model: Qwen3NextForCausalLM, prompts: list[list[int]], dc: ml_collections.ConfigDict) -> dict:
    """Greedy decoding of the prompts: cached, uncached (optional) and speculative (num_drafts > 0).
    Each is run once on two tokens first, so that the timings leave compilation out (`uncached_generate`
    compiles outside its timing)."""
    decoder = Decoder(model, max_len=dc.prompt_len + dc.max_new_tokens + dc.num_drafts + 1)
    methods = {"cached": functools.partial(decoder.generate, max_new_tokens=dc.max_new_tokens)}
    if dc.uncached:
        methods["uncached"] = functools.partial(uncached_generate, model, max_new_tokens=dc.max_new_tokens)
    if dc.num_drafts > 0:
        methods["speculative"] = functools.partial(
            decoder.speculative_generate, max_new_tokens=dc.max_new_tokens, num_drafts=dc.num_drafts
        )
    runs = {}
    for name, generate in methods.items():
        if name != "uncached":
            generate.func(*generate.args, prompts[: dc.batch_size], **{**generate.keywords, "max_new_tokens": 2})
        runs[name] = _timed(name, generate, prompts, dc.batch_size)
    report = {name: {k: run[k] for k in ("seconds", "prefill_seconds", "tokens_per_s")} for name, run in runs.items()}
    for name in report.keys() - {"cached"}:
        report[name]["identical_to_cached"] = runs[name]["tokens"] == runs["cached"]["tokens"]
    if "speculative" in runs:
        spec = runs["speculative"]
        report["speculative"].update(
            num_drafts=dc.num_drafts,
            rounds=spec["steps"],
            speedup=runs["cached"]["seconds"] / spec["seconds"],
            **acceptance_rates(spec["accepted"], dc.num_drafts),
        )
    return report


def heldout_prompts(data_cfg, tokenizer, num_prompts: int, prompt_len: int) -> list[list[int]]:
    """The first `num_prompts` non-overlapping held-out windows of `prompt_len` tokens."""
    stream = data.token_stream(data_cfg, "heldout", tokenizer)
    if len(stream) < num_prompts * prompt_len:
        raise data.DataError(
            f"the held-out split has {len(stream)} tokens, fewer than {num_prompts} prompts of {prompt_len}"
        )
    return [np.asarray(stream[i * prompt_len : (i + 1) * prompt_len]).tolist() for i in range(num_prompts)]


# ---------------------------------------------------------------------------- the run
def run(config: ml_collections.ConfigDict) -> dict:
    """Evaluate as configured; returns the report. Raises EvaluateError, DataError, ConfigError, ..."""
    run_config.check(config, "evaluate")
    path = report_path(config)
    tokenizer = data.make_tokenizer(config.data.tokenizer)
    model = load_model(config.model, dtype=config.dtype)
    reference = load_model(config.reference, role="reference", dtype=config.dtype) if config.reference else None
    vocab = model.config.vocab_size
    if tokenizer.vocab_size > vocab:
        raise ConfigError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary has {vocab}")
    if reference is not None and reference.config.vocab_size != vocab:
        raise ConfigError(f"reference vocabulary ({reference.config.vocab_size}) differs from the model's ({vocab})")
    if config.decoding.num_prompts and config.decoding.num_drafts > 0 and model.mtp is None:
        raise DecodingError("decoding.num_drafts > 0 needs an MTP module; this model has none (set it to 0)")
    hc, dc = config.heldout, config.decoding
    report = {
        "model": str(config.model),
        "reference": str(config.reference) or None,
        "data": {"source": config.data.source, "tokenizer": config.data.tokenizer, "seq_len": config.data.seq_len},
    }
    if hc.num_batches:
        batches = data.heldout_batches(config.data, tokenizer, batch_size=hc.batch_size, num_batches=hc.num_batches)
        num_drafts = hc.num_drafts if model.mtp is not None else 0
        report["heldout"] = heldout_metrics(model, reference, batches, token_byte_lengths(tokenizer), num_drafts)
    if dc.num_prompts:
        prompts = heldout_prompts(config.data, tokenizer, dc.num_prompts, dc.prompt_len)
        report["decoding"] = {
            "prompts": dc.num_prompts, "prompt_len": dc.prompt_len, "max_new_tokens": dc.max_new_tokens,
            "batch_size": dc.batch_size, "backend": jax.default_backend(),
            **decoding_metrics(model, prompts, dc),
        }  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(format_table(report))
    log.info("report written to %s", path)
    return report


def format_table(report: dict) -> str:
    """The report's headline numbers as a two-column table."""
    h, d = report.get("heldout", {}), report.get("decoding", {})
    rows = []
    if h:
        rows += [("held-out loss (nats/token)", f"{h['loss']:.4f}"), ("perplexity", f"{h['perplexity']:.3f}")]
        rows += [("bits per byte", f"{h['bits_per_byte']:.4f}")] if "bits_per_byte" in h else []
    if "top1_agreement" in h:
        rows += [("top-1 agreement with reference", f"{h['top1_agreement']:.4f}"), ("mean KL", f"{h['mean_kl']:.4f}")]
    tf = _acceptance_keys(h, "teacher_forced_")
    if tf:
        rows += [("teacher-forced MTP " + " ".join(k[15:] for k in tf), " ".join(f"{h[k]:.3f}" for k in tf))]
    if d:
        rows += [("cached decode tok/s", f"{d['cached']['tokens_per_s']:.1f}")]
    if "uncached" in d:
        rows += [("uncached decode tok/s", f"{d['uncached']['tokens_per_s']:.1f}")]
    if "speculative" in d:
        s = d["speculative"]
        accs = _acceptance_keys(s)
        rows += [
            ("speculative " + " ".join(accs), " ".join(f"{s[k]:.3f}" for k in accs)),
            ("speculative tokens / round", f"{s['tokens_per_step']:.3f}"),
            ("speculative tok/s (speed-up)", f"{s['tokens_per_s']:.1f} ({s['speedup']:.2f}x)"),
            ("speculative output == greedy", str(s["identical_to_cached"])),
        ]
    if tf or "speculative" in d:
        rows += [("acc_k", "share of positions / rounds whose first k+1 drafts were all accepted")]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _acceptance_keys(rates: dict, prefix: str = "") -> list[str]:
    """The keys prefix + acc_0, acc_1, ... present in `rates`, in draft order."""
    keys = []
    while f"{prefix}acc_{len(keys)}" in rates:
        keys.append(f"{prefix}acc_{len(keys)}")
    return keys


def main(argv: list[str]) -> None:
    del argv
    cli.start_tool()
    try:
        run(flags.FLAGS.config)
    except (
        EvaluateError,
        ConfigError,
        DecodingError,
        data.DataError,
        CheckpointMismatchError,
        FileNotFoundError,
    ) as error:
        log.error("error: %s", error)
        sys.exit(1)


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "Evaluation config file (configs/evaluate_*.py).", lock_config=True)
    app.run(main, flags_parser=cli.parse_flags)
