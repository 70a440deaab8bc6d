"""Calibration: stream sequences through the model and accumulate the statistics pruning needs.

The forward is the model's own, run under `nnx.capture(model, Calibration)`: RMSNorms sow their
output, decoder layers their residual input and output, MoE blocks their routing (router logits,
top-k weights and experts, and the L2 norm of each token copy's expert output). One jitted step
reduces a batch's sown tensors to sums over its tokens; the host adds them up in float64. Nothing
per token outlives its batch.

Statistics (sums over the N calibration tokens, keyed `"<module path>:<name>"`):
  <decoder layer>:residual_cos   cos(residual in, residual out) (block influence = 1 - mean)
  <decoder layer>:residual_in    [D] the residual stream entering the layer (depth block_similarity:
                                 the mean activation at a block's start)
  <decoder layer>:residual_out   [D] the residual stream leaving the layer (... at a block's end)
  <residual-stream norm>:abs_output  [D] |RMSNorm output| per channel
  <MoE block>:selected    [E] tokens whose top-k holds expert i
  <MoE block>:weight      [E] sum of the routing weight z_i over those tokens
  <MoE block>:reap        [E] sum of z_i * ||E_i(x)||_2 over those tokens
  <MoE block>:logit_gram  [E, E] sum of router-logit outer products (router_logits similarity)
The MTP module is calibrated too (its own forward inside the model's), under `mtp.*` paths.
Files written before `residual_in` / `residual_out` existed still serve every other method;
`CalibrationStats.require` names what is missing and how to recompute it.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import re
import time
import zipfile
from collections.abc import Iterable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from slimqwen_jax import data, storage
from slimqwen_jax.compression.spec import PruningError
from slimqwen_jax.compression.state import EMBED_AXIS, flat_params, logical_axes
from slimqwen_jax.config import ConfigError, Qwen3NextConfig
from slimqwen_jax.layers import Calibration
from slimqwen_jax.model import Qwen3NextForCausalLM
from slimqwen_jax.progress import format_duration

log = logging.getLogger("slimqwen_jax.compression")

RESIDUAL_COS, RESIDUAL_IN, RESIDUAL_OUT = "residual_cos", "residual_in", "residual_out"
ABS_OUTPUT = "abs_output"
SELECTED, WEIGHT, REAP, LOGIT_GRAM = "selected", "weight", "reap", "logit_gram"
LAYER_KEY = re.compile(r"model\.layers\.(?P<index>\d+)(?P<rest>[.:].*)")


def residual_norms(params: nnx.State) -> list[str]:
    """Module paths of the RMSNorms that read the residual stream: every norm whose weight spans
    the hidden dimension (input/post-attention norms, final norm, MTP norms)."""
    return sorted(
        path.removesuffix(".weight")
        for path, v in flat_params(params).items()
        if path.endswith(".weight") and logical_axes(v) == (EMBED_AXIS,)
    )


# ---------------------------------------------------------------------------- per-batch sums
def token_sum(x: jax.Array) -> jax.Array:
    """Sum over tokens, float32. x [..., D] -> [D]."""
    return jnp.sum(x.astype(jnp.float32).reshape(-1, x.shape[-1]), 0)


def cosine_sum(x_in: jax.Array, x_out: jax.Array) -> jax.Array:
    """Sum over tokens of cos(x_in, x_out), float32. x_in, x_out [..., D] -> scalar."""
    a, b = x_in.astype(jnp.float32), x_out.astype(jnp.float32)
    dot = jnp.sum(a * b, axis=-1)
    return jnp.sum(dot * jax.lax.rsqrt(jnp.sum(a * a, axis=-1) * jnp.sum(b * b, axis=-1) + 1e-30))


def routing_sums(
    logits: jax.Array, weights: jax.Array, experts: jax.Array, copy_norms: jax.Array
) -> dict[str, jax.Array]:
    """One MoE call's expert statistics. logits [N, E]; weights, experts, copy_norms [N, K]."""
    chosen = experts.reshape(-1)  # [N*K]
    per_expert = lambda v: jnp.zeros(logits.shape[-1], jnp.float32).at[chosen].add(v.reshape(-1))
    z = weights.astype(jnp.float32)  # [N, K]
    logits = logits.astype(jnp.float32)
    return {
        SELECTED: per_expert(jnp.ones_like(z)),
        WEIGHT: per_expert(z),
        REAP: per_expert(z * copy_norms.astype(jnp.float32)),
        LOGIT_GRAM: jnp.einsum("ne,nf->ef", logits, logits, precision=jax.lax.Precision.HIGHEST),
    }


def batch_sums(model: Qwen3NextForCausalLM, input_ids: jax.Array, norms: Iterable[str]) -> dict[str, jax.Array]:
    """The statistics' sums over the tokens of one batch input_ids [B, T] (see module docstring)."""
    norms = set(norms)
    _, sown = nnx.capture(model, Calibration)(input_ids)
    sums: dict[str, jax.Array] = {}

    def add(key, value):
        sums[key] = sums[key] + value if key in sums else value

    for path, variable in nnx.to_flat_state(sown):
        module, name = ".".join(str(p) for p in path[:-1]), path[-1]
        for value in variable.get_value():  # one entry per call
            if name == "output" and module in norms:
                add(f"{module}:{ABS_OUTPUT}", token_sum(jnp.abs(value)))
            elif name == "residual":
                x_in, x_out = value
                add(f"{module}:{RESIDUAL_COS}", cosine_sum(x_in, x_out))
                add(f"{module}:{RESIDUAL_IN}", token_sum(x_in))
                add(f"{module}:{RESIDUAL_OUT}", token_sum(x_out))
            elif name == "routing":
                for stat, total in routing_sums(**value).items():
                    add(f"{module}:{stat}", total)
    return sums


@functools.partial(jax.jit, static_argnums=(0, 2))  # one compilation per architecture and batch shape
def _calibration_step(graphdef: nnx.GraphDef, params: nnx.State, norms: tuple[str, ...], input_ids: jax.Array):
    return batch_sums(nnx.merge(graphdef, params), input_ids, norms)


# ---------------------------------------------------------------------------- the statistics
class CalibrationStats:
    """Sums of the calibration statistics over `num_tokens` tokens, plus provenance (`meta`, and
    `path`: the file they were loaded from, if any)."""

    def __init__(self, sums: dict[str, np.ndarray], num_tokens: int, meta: dict, path: Path | None = None):
        self.sums, self.num_tokens, self.meta, self.path = sums, int(num_tokens), meta, path

    def mean(self, module: str, name: str) -> np.ndarray:
        """Mean over calibration tokens of statistic `name` of `module`."""
        key = f"{module}:{name}"
        if key not in self.sums:
            raise PruningError(f"the calibration statistics have no {key!r} (computed on another architecture?)")
        return self.sums[key] / self.num_tokens

    def has(self, module: str, name: str) -> bool:
        return f"{module}:{name}" in self.sums

    def require(self, modules: Iterable[str], name: str, what: str) -> None:
        """Raise PruningError, saying how to recompute them, if statistic `name` is missing for any of
        `modules`: a file written before `what` (the method that reads it) existed."""
        missing = [f"{module}:{name}" for module in modules if not self.has(module, name)]
        if not missing:
            return
        where = f"calibration statistics {self.path}" if self.path else "the calibration statistics"
        fix = f"{_recalibrate(self.path)} (prune: or set `stats` to a new file)" if self.path else "calibrate again"
        raise PruningError(
            f"{where} have no {missing[0]!r}, which {what} needs (written before that statistic existed); "
            f"recompute them: {fix}"
        )

    def select_layers(self, kept: list[int]) -> CalibrationStats:
        """The statistics of the model whose decoder layers are `kept` (old indices, in order)."""
        new_index = {old: new for new, old in enumerate(kept)}
        sums = {}
        for key, value in self.sums.items():
            match = LAYER_KEY.fullmatch(key)
            if match is None:
                sums[key] = value
            elif int(match["index"]) in new_index:
                sums[f"model.layers.{new_index[int(match['index'])]}{match['rest']}"] = value
        return CalibrationStats(sums, self.num_tokens, {**self.meta, "kept_layers": list(kept)}, self.path)

    def save(self, path: str | Path) -> Path:
        """Write `<path>` (.npz, the sums) and `<path>` with suffix .json (num_tokens, meta), each
        whole or not at all; the .npz, whose presence `load_statistics` looks for, comes last."""
        path = storage.path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        storage.write_text(path.with_suffix(".json"), json.dumps({"num_tokens": self.num_tokens, "meta": self.meta},
                                                                 indent=2) + "\n")  # fmt: skip
        arrays = io.BytesIO()
        np.savez(arrays, **self.sums)
        storage.write_bytes(path, arrays.getvalue())
        return path

    @classmethod
    def load(cls, path: str | Path) -> CalibrationStats:
        """The statistics `save` wrote to `path`. Raises PruningError naming the file when it (or its
        .json) is missing, truncated or corrupt, or holds NaN, infinity or no tokens."""
        path = storage.path(path)
        if path.is_dir():
            raise PruningError(f"calibration statistics {path} is a directory; name a .npz file")
        try:
            info = json.loads(path.with_suffix(".json").read_text())
            num_tokens, meta = int(info["num_tokens"]), dict(info["meta"])
            with path.open("rb") as f, np.load(f) as arrays:
                sums = {key: np.asarray(arrays[key]) for key in arrays.files}
        except (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as reason:
            raise PruningError(
                f"calibration statistics {path} cannot be read ({type(reason).__name__}: {reason}); "
                f"{_recalibrate(path)}"
            ) from None
        non_finite = sorted(key for key, value in sums.items() if not np.isfinite(value).all())
        if num_tokens <= 0 or non_finite:
            found = f"num_tokens {num_tokens}" if num_tokens <= 0 else f"NaN or infinity in {', '.join(non_finite[:3])}"
            raise PruningError(f"calibration statistics {path} hold {found}; {_recalibrate(path)}")
        return cls(sums, num_tokens, meta, path)


def _recalibrate(path: Path) -> str:
    return f"delete {path.name} and {path.with_suffix('.json').name} to calibrate again"


def calibrate(
    model: Qwen3NextForCausalLM, samples: np.ndarray, *, batch_size: int = 8, log_every: int = 10
) -> CalibrationStats:
    """Calibration statistics of `model` over `samples` int32 [N, L], `batch_size` sequences a step.

    Logs progress (sequences done, tokens/s, ETA) every `log_every` batches; `meta` records the
    model config, the sample count and length, and the steady-state tokens/s (first batch, which
    compiles, excluded).
    """
    cfg: Qwen3NextConfig = model.config
    graphdef, params = nnx.split(model)
    norms = tuple(residual_norms(params))
    num_samples, seq_len = samples.shape
    num_batches = -(-num_samples // batch_size)
    totals: dict[str, np.ndarray] = {}
    start = time.perf_counter()
    steady_start, steady_tokens = None, 0
    for b in range(num_batches):
        batch = samples[b * batch_size : (b + 1) * batch_size]
        sums = jax.device_get(_calibration_step(graphdef, params, norms, jnp.asarray(batch, jnp.int32)))
        for key, value in sums.items():
            totals[key] = totals.get(key, 0.0) + np.asarray(value, np.float64)
        now = time.perf_counter()
        if steady_start is None:
            steady_start = now
        else:
            steady_tokens += batch.size
        done = min((b + 1) * batch_size, num_samples)
        if (b + 1) % log_every == 0 or b + 1 == num_batches:
            rate = steady_tokens / (now - steady_start) if steady_tokens else done * seq_len / (now - start)
            eta = (num_samples - done) * seq_len / rate
            log.info(
                "calibration %d/%d sequences | %s tok/s | ETA %s",
                done,
                num_samples,
                f"{rate:,.0f}",
                format_duration(eta),
            )
    elapsed = time.perf_counter() - start
    steady_rate = (
        steady_tokens / (time.perf_counter() - steady_start) if steady_tokens else num_samples * seq_len / elapsed
    )
    meta = {
        "config": cfg.to_dict(),
        "num_samples": int(num_samples),
        "seq_len": int(seq_len),
        "tokens_per_second": steady_rate,
        "seconds": elapsed,
    }
    return CalibrationStats(totals, num_samples * seq_len, meta)


def load_statistics(path: str | Path, cfg: Qwen3NextConfig, *, name: str = "calibration") -> CalibrationStats | None:
    """The statistics file `path` if it exists, else None. Reads no model, so callers check an
    existing file before loading one; raises PruningError for a damaged file (`CalibrationStats.load`)
    or one computed on another architecture than `cfg`'s. `name` prefixes the log line."""
    path = storage.path(path)
    if not path.exists():
        return None
    stats = CalibrationStats.load(path)
    try:
        architecture = Qwen3NextConfig.from_dict(stats.meta["config"]).architecture()
    except (KeyError, TypeError, ConfigError) as reason:
        raise PruningError(
            f"calibration statistics {path} name no readable model config ({type(reason).__name__}: {reason}); "
            f"{_recalibrate(path)}"
        ) from None
    if architecture != cfg.architecture():
        raise PruningError(f"calibration statistics {path} were computed on another architecture; move it away")
    log.info("%s: reusing calibration statistics %s (%d tokens)", name, path, stats.num_tokens)
    return stats


def load_or_calibrate(
    path: str | Path, model: Qwen3NextForCausalLM, data_cfg, calibration_cfg, *, name: str = "calibration"
) -> CalibrationStats:
    """The statistics file `path` if it exists (`load_statistics`), else `model` calibrated on
    `calibration_cfg.num_samples` windows of the data pipeline, saved there (on the main process).
    `name` prefixes the log lines (the tool or stage asking)."""
    path = storage.path(path)
    stats = load_statistics(path, model.config, name=name)
    if stats is not None:
        return stats
    tokenizer = data.make_tokenizer(data_cfg.tokenizer)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise PruningError(
            f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {model.config.vocab_size}"
        )
    cal = calibration_cfg
    samples = data.calibration_samples(
        data_cfg, tokenizer, num_samples=cal.num_samples, seq_len=cal.seq_len, seed=cal.seed
    )
    log.info("%s: calibrating on %d sequences of %d tokens", name, *samples.shape)
    stats = calibrate(model, samples, batch_size=cal.batch_size, log_every=cal.log_every)
    log.info(
        "%s: %s tok/s (steady state), %.1f s", name, f"{stats.meta['tokens_per_second']:,.0f}", stats.meta["seconds"]
    )
    if jax.process_index() == 0:
        stats.save(path)
        log.info("%s: wrote calibration statistics %s", name, path)
    return stats
