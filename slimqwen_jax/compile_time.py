"""Trace and compile time of a training-style step: `compile_seconds(cfg)`, for benchmark scripts.

from slimqwen_jax.compile_time import compile_seconds
compile_seconds(tiny(num_hidden_layers=48, scan_layers=False))  # {"trace": ..., "lower": ..., "compile": ...}
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from flax import nnx

from slimqwen_jax.config import Qwen3NextConfig
from slimqwen_jax.model import abstract_model


def next_token_loss(graphdef: nnx.GraphDef, params: nnx.State, input_ids: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy of the backbone's logits plus its load-balancing loss."""
    out = nnx.merge(graphdef, params)(input_ids, with_mtp=False)
    log_probs = jax.nn.log_softmax(out.logits[:, :-1].astype(jnp.float32), axis=-1)  # [B, T-1, V]
    targets = input_ids[:, 1:, None]  # [B, T-1, 1]
    return -jnp.mean(jnp.take_along_axis(log_probs, targets, axis=-1)) + out.aux_loss


def compile_seconds(
    cfg: Qwen3NextConfig, batch: int = 2, length: int = 32, *, sgd_update: bool = False
) -> dict[str, float]:
    """Seconds to trace, lower and compile `jax.jit(jax.value_and_grad(next_token_loss))` for `cfg` at
    input_ids [batch, length]; with `sgd_update` the step also returns params - 0.01 * grads, as a
    train step consumes its gradients. Nothing is allocated or run (shapes only). Set no persistent
    compilation cache (JAX_COMPILATION_CACHE_DIR) around it, or a repeated measurement reads it."""
    graphdef, params = abstract_model(cfg)
    input_ids = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    loss_and_grads = jax.value_and_grad(lambda p, ids: next_token_loss(graphdef, p, ids))

    def sgd_step(p, ids):
        loss, grads = loss_and_grads(p, ids)
        return loss, jax.tree.map(lambda w, g: w - 0.01 * g, p, grads)

    step = jax.jit(sgd_step if sgd_update else loss_and_grads)
    start = time.perf_counter()
    traced = step.trace(params, input_ids)
    traced_at = time.perf_counter()
    lowered = traced.lower()
    lowered_at = time.perf_counter()
    lowered.compile()
    done = time.perf_counter()
    return {"trace": traced_at - start, "lower": lowered_at - traced_at, "compile": done - lowered_at}
