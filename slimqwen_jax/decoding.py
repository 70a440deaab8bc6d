"""Cached decoding: prefill, one-token decode, sampling and MTP speculative decoding.

Shape letters: B batch, T new tokens, S cache slots, D model width, V vocab, G kv heads, A attention
head dim, C conv channels, K conv width, Hv / Dk / Dv linear-attention value heads, key and value
head dims, J drafts per speculative step.

A `Cache` holds one cache per layer of a stack (the backbone's decoder layers, or the MTP module's
layer) and the bookkeeping they share: which slots hold a token (`valid` [B, S]), the next free slot
(`length` [B]) and the next RoPE position (`position` [B]) of every row. Full-attention layers keep
keys and values per slot; Gated DeltaNet layers keep the last K-1 conv inputs and the [Hv, Dk, Dv]
recurrent state. `extend` runs T new tokens through a stack on top of its cache, the one function
behind prefill (T = prompt length), decode (T = 1) and speculative verification (T = J + 1).

Padding: a row's valid tokens in one `extend` call must be contiguous and either start at column 0
(right padding, allowed always) or end at column T - 1 (left padding, only on an empty cache, i.e.
the prompt). Padding tokens take no key slot that valid tokens see, enter the conv as the zeros of
an empty history and leave the recurrent state unchanged (g = 0, beta = 0), so every row computes
exactly what it would alone.

The MTP module is the draft model (docs/method.md section 7): its first layer is applied recursively,
each draft step fed the previous step's output hidden state and drafted token. The verifier (the
backbone) runs once over [pending token, drafts], keeping the linear-attention states of every
position, and the longest agreeing prefix is accepted: caches are then exactly those of decoding
the accepted tokens one by one, and greedy speculative output equals greedy plain output.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from pallas_kernels.gated_delta_rule import gated_delta_rule, gated_delta_rule_step
from slimqwen_jax.config import FULL_ATTENTION, LINEAR_ATTENTION, Qwen3NextConfig
from slimqwen_jax.layers import Attention, GatedDeltaNet, causal_attention
from slimqwen_jax.model import DecoderLayer, Qwen3NextForCausalLM
from slimqwen_jax.moe import SparseMoeBlock
from slimqwen_jax.platforms import target_platform


class DecodingError(ValueError):
    """A generation request that cannot run (empty prompt, no room in the cache, no MTP module)."""


# ---------------------------------------------------------------------------- caches
@struct.dataclass
class AttentionCache:
    k: jax.Array  # [B, S, G, A]
    v: jax.Array  # [B, S, G, A]


@struct.dataclass
class LinearAttentionCache:
    """conv [B, K-1, C] (the last K-1 conv inputs) and state [B, Hv, Dk, Dv] float32; a per-position
    cache (`extend(..., per_position=True)`) has a T axis after B in both."""

    conv: jax.Array
    state: jax.Array


@struct.dataclass
class Cache:
    """The caches of one stack of layers and their shared bookkeeping (see the module docstring)."""

    layers: tuple[AttentionCache | LinearAttentionCache, ...]
    valid: jax.Array  # [B, S] bool: slot holds a token that later tokens attend to
    length: jax.Array  # [B] int32: the next slot to write
    position: jax.Array  # [B] int32: the RoPE position of the next token


def init_cache(cfg: Qwen3NextConfig, layer_types: Sequence[str], batch: int, max_len: int) -> Cache:
    """Empty caches of `max_len` slots for a stack of layers of the given types."""
    dtype = cfg.compute_dtype
    conv_channels = 2 * cfg.linear_num_key_heads * cfg.linear_key_head_dim + (
        cfg.linear_num_value_heads * cfg.linear_value_head_dim
    )
    layers = []
    for layer_type in layer_types:
        if layer_type == FULL_ATTENTION:
            kv = jnp.zeros((batch, max_len, cfg.num_key_value_heads, cfg.head_dim), dtype)  # [B, S, G, A]
            layers.append(AttentionCache(kv, kv))
        else:
            conv = jnp.zeros((batch, cfg.linear_conv_kernel_dim - 1, conv_channels), dtype)  # [B, K-1, C]
            shape = (batch, cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim)
            layers.append(LinearAttentionCache(conv, jnp.zeros(shape, jnp.float32)))  # state [B, Hv, Dk, Dv]
    zeros = jnp.zeros((batch,), jnp.int32)
    return Cache(tuple(layers), jnp.zeros((batch, max_len), bool), zeros, zeros)


def backbone_cache(cfg: Qwen3NextConfig, batch: int, max_len: int) -> Cache:
    return init_cache(cfg, cfg.layer_types, batch, max_len)


def mtp_cache(cfg: Qwen3NextConfig, batch: int, max_len: int) -> Cache:
    """The cache of the MTP module's first layer, the one that drafts."""
    return init_cache(cfg, (FULL_ATTENTION,), batch, max_len)


# ---------------------------------------------------------------------------- one stack, T new tokens
@struct.dataclass
class _WritePlan:
    slots: jax.Array  # [B, T] the slot each new token is written to
    positions: jax.Array  # [B, T] RoPE positions
    token_valid: jax.Array  # [B, T]
    mask: jax.Array  # [B, T, S] attention mask of the new tokens over all slots
    end: jax.Array  # [B] one past the last valid new token (0 if none)


def _write_plan(cache: Cache, token_valid: jax.Array) -> tuple[_WritePlan, Cache]:
    """Where T new tokens go, and the bookkeeping after them (length += end, position += count)."""
    t = token_valid.shape[1]
    s = cache.valid.shape[1]
    slots = cache.length[:, None] + jnp.arange(t, dtype=jnp.int32)  # [B, T]
    positions = cache.position[:, None] + jnp.maximum(jnp.cumsum(token_valid, axis=1, dtype=jnp.int32) - 1, 0)
    written = jnp.arange(s) == slots[..., None]  # [B, T, S]
    valid = cache.valid | jnp.any(written & token_valid[..., None], axis=1)  # [B, S]
    # Causal over valid slots; every token also sees its own slot, so padding queries stay finite.
    mask = (valid[:, None, :] & (jnp.arange(s) <= slots[..., None])) | written  # [B, T, S]
    end = _end(token_valid)  # [B]
    count = jnp.sum(token_valid, axis=1, dtype=jnp.int32)
    after = cache.replace(valid=valid, length=cache.length + end, position=cache.position + count)
    return _WritePlan(slots, positions, token_valid, mask, end), after


def _attention_extend(attn: Attention, x: jax.Array, cache: AttentionCache, plan: _WritePlan):
    q, k, v, gate = attn.project(x, plan.positions)  # q [B, T, H, A], k, v [B, T, G, A]
    rows = jnp.arange(x.shape[0])[:, None]
    cache = AttentionCache(cache.k.at[rows, plan.slots].set(k), cache.v.at[rows, plan.slots].set(v))
    attended = causal_attention(q, cache.k, cache.v, attn.head_dim**-0.5, plan.mask)  # [B, T, H, A]
    return attn.output(attended, gate), cache


def _delta_rule_per_position(q, k, v, g, beta, state, implementation: str):
    """The recurrence token by token: (o [B, T, Hv, Dv], the state after each token [B, T, Hv, Dk, Dv])."""
    step_implementation = "pallas" if implementation == "pallas" else "recurrent"

    def step(state, inputs):
        o, state = gated_delta_rule_step(*inputs, state, implementation=step_implementation, platform=target_platform())
        return state, (o, state)

    _, (o, states) = jax.lax.scan(step, state, [jnp.moveaxis(x, 1, 0) for x in (q, k, v, g, beta)])
    return jnp.moveaxis(o, 0, 1), jnp.moveaxis(states, 0, 1)


def _linear_extend(lin: GatedDeltaNet, x: jax.Array, cache: LinearAttentionCache, plan: _WritePlan, per_position: bool):
    mixed, z, beta, g = lin.conv_inputs(x)  # mixed [B, T, C]
    keep = plan.token_valid[..., None]
    mixed = jnp.where(keep, mixed, 0).astype(cache.conv.dtype)  # padding = the zeros of an empty history
    beta, g = jnp.where(keep, beta, 0), jnp.where(keep, g, 0)  # padding leaves the state unchanged
    q, k, v = lin.split_conv_output(lin.conv1d(mixed, cache.conv))
    window = jnp.concatenate([cache.conv, mixed], axis=1)  # [B, K-1+T, C]
    width, t = cache.conv.shape[1], x.shape[1]
    if per_position:
        conv = jnp.stack([window[:, i + 1 : i + 1 + width] for i in range(t)], axis=1)  # [B, T, K-1, C]
        o, state = _delta_rule_per_position(q, k, v, g, beta, cache.state, lin.implementation)
    else:
        conv = jax.vmap(lambda w, e: jax.lax.dynamic_slice_in_dim(w, e, width))(window, plan.end)  # [B, K-1, C]
        o, state = gated_delta_rule(
            q, k, v, g, beta, initial_state=cache.state, output_final_state=True, implementation=lin.implementation
        )
    return lin.output(o, z), LinearAttentionCache(conv, state)


def layer_with_mixer(layer: DecoderLayer, x: jax.Array, mixer: Callable):
    """`DecoderLayer.__call__` with its token mixer replaced by `mixer(normed [B, T, D]) -> (mixed
    [B, T, D], extra)`, e.g. attention over a cache: (x [B, T, D], extra)."""
    mixed, extra = mixer(layer.input_layernorm(x))
    x = x + mixed
    mlp_out = layer.mlp(layer.post_attention_layernorm(x))
    if isinstance(layer.mlp, SparseMoeBlock):
        mlp_out = mlp_out[0]  # drop the router logits
    return x + mlp_out, extra


def _layer_extend(layer: DecoderLayer, x: jax.Array, cache, plan: _WritePlan, per_position: bool):
    """`DecoderLayer.__call__` on T new tokens with the layer's cache: (x [B, T, D], new cache)."""
    if layer.layer_type == LINEAR_ATTENTION:
        return layer_with_mixer(layer, x, lambda n: _linear_extend(layer.linear_attn, n, cache, plan, per_position))
    return layer_with_mixer(layer, x, lambda n: _attention_extend(layer.self_attn, n, cache, plan))


def _stack_extend(layers: Sequence[DecoderLayer], x: jax.Array, cache: Cache, token_valid, per_position: bool):
    plan, after = _write_plan(cache, token_valid)
    layer_caches = []
    for layer, layer_cache in zip(layers, cache.layers):
        x, layer_cache = _layer_extend(layer, x, layer_cache, plan, per_position)
        layer_caches.append(layer_cache)
    return x, after.replace(layers=tuple(layer_caches))


def extend(
    model: Qwen3NextForCausalLM, tokens: jax.Array, token_valid: jax.Array, cache: Cache, *, per_position: bool = False
) -> tuple[jax.Array, Cache]:
    """Run the backbone on T new tokens on top of `cache`.

    Args:
      tokens: [B, T] int; token_valid: [B, T] bool (padding layout: module docstring).
      cache: the backbone's cache (`backbone_cache`).
      per_position: keep the linear-attention caches after every new token (a T axis after B),
        for `accept`; otherwise keep the final ones (prefill: chunked delta rule).

    Returns:
      (hidden states after the final norm [B, T, D], the cache with all T tokens appended).
    """
    x = model.model.embed_tokens(tokens)  # [B, T, D]
    x, cache = _stack_extend(model.model.layers, x, cache, token_valid, per_position)
    return model.model.norm(x), cache


def mtp_extend(
    model: Qwen3NextForCausalLM, hidden: jax.Array, next_tokens: jax.Array, token_valid: jax.Array, cache: Cache
) -> tuple[jax.Array, Cache]:
    """One MTP draft step (first MTP layer) on T positions: hidden [B, T, D] (backbone or previous
    draft step) and the tokens after them [B, T] -> (draft hidden after mtp.norm [B, T, D], cache)."""
    mtp = model.mtp
    x = mtp.fuse(hidden, model.model.embed_tokens(next_tokens))  # [B, T, D]
    x, cache = _stack_extend(mtp.layers[:1], x, cache, token_valid, per_position=False)
    return mtp.norm(x), cache


def accept(cache: Cache, num_accepted: jax.Array, num_new: int) -> Cache:
    """The cache of a per-position `extend` over `num_new` tokens as if only the first
    `num_accepted` [B] (>= 1) of them had been decoded: later slots freed, linear-attention caches
    of the last accepted token selected."""
    length = cache.length - num_new + num_accepted  # [B]
    layers = []
    for layer in cache.layers:
        if isinstance(layer, LinearAttentionCache):
            layer = LinearAttentionCache(_take(layer.conv, num_accepted - 1), _take(layer.state, num_accepted - 1))
        layers.append(layer)
    return Cache(
        tuple(layers),
        cache.valid & (jnp.arange(cache.valid.shape[1]) < length[:, None]),
        length,
        cache.position - num_new + num_accepted,
    )


def _end(token_valid: jax.Array) -> jax.Array:
    """token_valid [B, T] -> one past each row's last valid column [B] int32 (0 if none)."""
    return jnp.max(jnp.where(token_valid, jnp.arange(1, token_valid.shape[1] + 1), 0), axis=1).astype(jnp.int32)


def _take(x: jax.Array, index: jax.Array) -> jax.Array:
    """x [B, T, ...] at column index[b] of each row -> [B, ...]."""
    return jnp.take_along_axis(x, index.reshape(-1, *[1] * (x.ndim - 1)), axis=1)[:, 0]


def last_valid(x: jax.Array, token_valid: jax.Array) -> jax.Array:
    """x [B, T, ...] at each row's last valid column -> [B, ...]."""
    return _take(x, _end(token_valid) - 1)


# ---------------------------------------------------------------------------- sampling
def sample_tokens(logits: jax.Array, key: jax.Array, temperature: float, top_p: float) -> jax.Array:
    """Next tokens [B] int32 from logits [B, V]: greedy for temperature 0, else softmax(logits /
    temperature) restricted to the smallest set of tokens whose probability reaches top_p."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_p < 1:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]  # [B, V] descending
        before = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1) - jax.nn.softmax(sorted_logits, axis=-1)
        kept = jnp.sum(before < top_p, axis=-1)  # [B] >= 1: the top token is always kept
        threshold = jnp.take_along_axis(sorted_logits, (kept - 1)[:, None], axis=-1)  # [B, 1]
        logits = jnp.where(logits >= threshold, logits, -jnp.inf)
    return jax.random.categorical(key, logits).astype(jnp.int32)


# ---------------------------------------------------------------------------- the jitted steps
def _prefill(graphdef, params, cache, tokens, token_valid):
    """Backbone prefill: (hidden [B, T, D], logits at each row's last prompt token [B, V], cache)."""
    model = nnx.merge(graphdef, params)
    hidden, cache = extend(model, tokens, token_valid, cache)
    return hidden, model.logits(last_valid(hidden, token_valid)), cache


def _decode_step(graphdef, temperature, top_p, params, cache, logits, key):
    """Sample the next tokens [B] from logits [B, V] and feed them: (tokens, next logits [B, V], cache)."""
    model = nnx.merge(graphdef, params)
    token = sample_tokens(logits, key, temperature, top_p)
    hidden, cache = extend(model, token[:, None], jnp.ones((token.shape[0], 1), bool), cache, per_position=True)
    return token, model.logits(hidden[:, 0]), accept(cache, jnp.ones_like(token), 1)


def _mtp_prefill(graphdef, params, cache, hidden, tokens, token_valid, first_token):
    """MTP over the prompt: pairs (h_i, t_{i+1}), the last valid one with the first generated token.
    Returns the draft hidden at the last prompt position [B, D] and the MTP cache."""
    model = nnx.merge(graphdef, params)
    end = _end(token_valid)  # [B]
    shifted = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))  # [B, T]: t_{i+1}
    next_tokens = jnp.where(jnp.arange(tokens.shape[1]) == end[:, None] - 1, first_token[:, None], shifted)
    z, cache = mtp_extend(model, hidden, next_tokens, token_valid, cache)
    return last_valid(z, token_valid), cache


def _speculative_step(graphdef, num_drafts, params, cache, mtp, pending, draft_hidden):
    """One draft-verify-accept round (greedy).

    pending [B]: the last generated token, not yet fed to the backbone; draft_hidden [B, D]: the MTP
    output at the position before it. Returns (new tokens [B, J+1] of which the first
    accepted + 1 count, accepted drafts [B], the next pending token, draft hidden, caches).
    """
    model = nnx.merge(graphdef, params)
    b, j = pending.shape[0], num_drafts
    ones = jnp.ones((b, 1), bool)
    committed_mtp = mtp
    drafts, z = [], draft_hidden  # z [B, D]
    for step in range(j):
        drafts.append(jnp.argmax(model.logits(z), axis=-1).astype(jnp.int32))  # [B]
        if step + 1 < j:  # provisional MTP entries, dropped below
            z, mtp = mtp_extend(model, z[:, None], drafts[-1][:, None], ones, mtp)
            z = z[:, 0]
    drafts = jnp.stack(drafts, axis=1)  # [B, J]
    verify = jnp.concatenate([pending[:, None], drafts], axis=1)  # [B, J+1]
    hidden, cache = extend(model, verify, jnp.ones((b, j + 1), bool), cache, per_position=True)  # [B, J+1, D]
    greedy = jnp.argmax(model.logits(hidden), axis=-1).astype(jnp.int32)  # [B, J+1]
    accepted = jnp.sum(jnp.cumprod(drafts == greedy[:, :j], axis=1), axis=1).astype(jnp.int32)  # [B]
    cache = accept(cache, accepted + 1, j + 1)
    bonus = _take(greedy, accepted)  # [B]
    # New tokens: the accepted drafts, then the verifier's own token after them.
    new_tokens = jnp.where(jnp.arange(j + 1) == accepted[:, None], bonus[:, None], jnp.pad(drafts, ((0, 0), (0, 1))))
    # The MTP cache as if decoded one by one: the committed pairs (h_i, t_{i+1}) of the accepted positions.
    mtp = mtp.replace(valid=committed_mtp.valid, length=committed_mtp.length, position=committed_mtp.position)
    catch_up = jnp.arange(j + 1) <= accepted[:, None]  # [B, J+1]
    z, mtp = mtp_extend(model, hidden, new_tokens, catch_up, mtp)
    return new_tokens, accepted, bonus, last_valid(z, catch_up), cache, mtp


# ---------------------------------------------------------------------------- the decoder
@dataclasses.dataclass
class Generation:
    """Generated tokens (stop token included, nothing after it) per row, and timing."""

    tokens: list[list[int]]
    seconds: float  # wall time of the decoding loop (after prefill)
    prefill_seconds: float  # backbone (and MTP) prefill; 0 for `uncached_generate`
    steps: int  # model calls after prefill (decode steps or speculative rounds)
    accepted: np.ndarray | None = None  # speculative: accepted drafts of each active (round, row) [N]

    @property
    def num_generated(self) -> int:
        return sum(len(t) for t in self.tokens)


def pad_prompts(prompts: Sequence[Sequence[int]], padding: str, length: int | None = None):
    """Prompts -> (tokens [B, T] int32, valid [B, T] bool), padded on the `padding` side to `length`
    (default: the longest prompt)."""
    if padding not in ("left", "right"):
        raise DecodingError(f"padding must be 'left' or 'right', got {padding!r}")
    lengths = [len(p) for p in prompts]
    if not prompts or min(lengths) == 0:
        raise DecodingError("empty prompt: generation needs at least one prompt token per row")
    length = max(lengths) if length is None else length
    if max(lengths) > length:
        raise DecodingError(f"a prompt of {max(lengths)} tokens is longer than the prompt length {length}")
    tokens = np.zeros((len(prompts), length), np.int32)
    valid = np.zeros((len(prompts), length), bool)
    for row, prompt in enumerate(prompts):
        cols = slice(length - len(prompt), length) if padding == "left" else slice(0, len(prompt))
        tokens[row, cols], valid[row, cols] = prompt, True
    return tokens, valid


class Decoder:
    """Jitted prefill / decode / speculative steps of one model with caches of `max_len` slots.

    Shapes are fixed per (batch, prompt length): decoding compiles once, not per token.
    """

    def __init__(self, model: Qwen3NextForCausalLM, max_len: int):
        self.config = model.config
        self.max_len = max_len
        self.graphdef, self.params = nnx.split(model)
        self._prefill = jax.jit(functools.partial(_prefill, self.graphdef))
        self._mtp_prefill = jax.jit(functools.partial(_mtp_prefill, self.graphdef))
        self._steps = {}
        # Caches are updated in place where the backend can (the CPU cannot: it would only warn).
        self._donate = jax.default_backend() != "cpu"

    def _step_fn(self, fn, *static, donate: tuple[int, ...]):
        """The jitted `fn` for these static arguments, compiled once per Decoder."""
        if (fn, static) not in self._steps:
            donate_argnums = donate if self._donate else ()
            self._steps[fn, static] = jax.jit(
                functools.partial(fn, self.graphdef, *static), donate_argnums=donate_argnums
            )
        return self._steps[fn, static]

    def _check_room(self, prompt_len: int, max_new_tokens: int, extra: int = 0) -> None:
        needed = prompt_len + max_new_tokens + extra
        if needed > self.max_len:
            raise DecodingError(
                f"prompt of {prompt_len} tokens + {max_new_tokens} new tokens"
                + (f" + {extra} verification slots" if extra else "")
                + f" need {needed} cache slots; the cache has {self.max_len} (raise max_len)"
            )

    def prefill(self, tokens: np.ndarray, token_valid: np.ndarray):
        """(hidden [B, T, D], last logits [B, V], backbone cache) of padded prompts."""
        cache = backbone_cache(self.config, tokens.shape[0], self.max_len)
        return self._prefill(self.params, cache, jnp.asarray(tokens), jnp.asarray(token_valid))

    def decode_step(self, cache: Cache, logits: jax.Array, key: jax.Array, temperature=0.0, top_p=1.0):
        """(tokens [B], next logits [B, V], cache); `cache` is donated."""
        step = self._step_fn(_decode_step, float(temperature), float(top_p), donate=(1,))
        return step(self.params, cache, logits, key)

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        stop_tokens: Sequence[int] = (),
        padding: str = "left",
        prompt_len: int | None = None,
    ) -> Generation:
        """Generate up to `max_new_tokens` per prompt (greedy, or sampled with `seed`); a row stops
        after emitting one of `stop_tokens`. `prompt_len` pads prompts to a fixed length (one compile)."""
        tokens, valid = pad_prompts(prompts, padding, prompt_len)
        self._check_room(tokens.shape[1], max_new_tokens)
        start = time.perf_counter()
        _, logits, cache = self.prefill(tokens, valid)
        logits.block_until_ready()
        prefill_seconds = time.perf_counter() - start
        start = time.perf_counter()
        key = jax.random.key(seed)
        out = _Output(len(prompts), stop_tokens)
        steps = 0
        while steps < max_new_tokens and not out.all_done:
            key, step_key = jax.random.split(key)
            token, logits, cache = self.decode_step(cache, logits, step_key, temperature, top_p)
            out.add(np.asarray(token)[:, None], np.ones(len(prompts), int), max_new_tokens)
            steps += 1
        return Generation(out.tokens, time.perf_counter() - start, prefill_seconds, steps)

    def speculative_generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        *,
        num_drafts: int,
        stop_tokens: Sequence[int] = (),
        padding: str = "left",
        prompt_len: int | None = None,
    ) -> Generation:
        """Greedy generation with MTP drafts of `num_drafts` tokens per round, verified by the
        backbone; the output equals `generate` (greedy) token for token. `Generation.accepted` holds
        the accepted drafts of every round of every row still generating."""
        if self.config.num_mtp_layers == 0:
            raise DecodingError("speculative decoding needs an MTP module; this model has none (num_mtp_layers=0)")
        if num_drafts < 1:
            raise DecodingError(f"num_drafts must be >= 1, got {num_drafts}")
        tokens, valid = pad_prompts(prompts, padding, prompt_len)
        self._check_room(tokens.shape[1], max_new_tokens, extra=num_drafts + 1)
        start = time.perf_counter()
        hidden, logits, cache = self.prefill(tokens, valid)
        pending = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B]
        mtp = mtp_cache(self.config, tokens.shape[0], self.max_len)
        draft_hidden, mtp = self._mtp_prefill(
            self.params, mtp, hidden, jnp.asarray(tokens), jnp.asarray(valid), pending
        )
        draft_hidden.block_until_ready()
        prefill_seconds = time.perf_counter() - start
        start = time.perf_counter()
        out = _Output(len(prompts), stop_tokens)
        out.add(np.asarray(pending)[:, None], np.ones(len(prompts), int), max_new_tokens)
        step_fn = self._step_fn(_speculative_step, num_drafts, donate=(1, 2))
        accepted_log, steps = [], 0
        while not out.all_done:
            active = ~out.done
            new_tokens, accepted, pending, draft_hidden, cache, mtp = step_fn(
                self.params, cache, mtp, pending, draft_hidden
            )
            accepted = np.asarray(accepted)
            accepted_log.append(accepted[active])
            out.add(np.asarray(new_tokens), accepted + 1, max_new_tokens)
            steps += 1
        accepted = np.concatenate(accepted_log) if accepted_log else np.zeros(0, int)
        return Generation(out.tokens, time.perf_counter() - start, prefill_seconds, steps, accepted)


def uncached_generate(model: Qwen3NextForCausalLM, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> Generation:
    """Greedy generation without caches, the baseline of the cached decoder: one full forward over
    the whole right-padded sequence [B, prompt + max_new_tokens] per new token (one compile, not
    counted in `Generation.seconds`)."""
    tokens, valid = pad_prompts(prompts, "right")
    buffer = np.pad(tokens, ((0, 0), (0, max_new_tokens)))  # [B, T + N]
    lengths = valid.sum(axis=1)  # [B]
    graphdef, params = nnx.split(model)

    def next_tokens(params, buffer, lengths):
        logits = nnx.merge(graphdef, params)(buffer, with_mtp=False).logits  # [B, T + N, V]
        return jnp.argmax(_take(logits, lengths - 1), axis=-1)  # causal: the padding after it is not seen

    next_tokens = jax.jit(next_tokens).lower(params, buffer, lengths).compile()  # not timed
    start = time.perf_counter()
    rows = np.arange(len(prompts))
    for _ in range(max_new_tokens):
        buffer[rows, lengths] = np.asarray(next_tokens(params, buffer, lengths))
        lengths = lengths + 1
    generated = [buffer[b, len(p) : len(p) + max_new_tokens].tolist() for b, p in enumerate(prompts)]
    return Generation(generated, time.perf_counter() - start, 0.0, max_new_tokens)


class _Output:
    """Per-row generated tokens, each row closed by a stop token or at max_new_tokens."""

    def __init__(self, batch: int, stop_tokens: Sequence[int]):
        self.tokens = [[] for _ in range(batch)]
        self.done = np.zeros(batch, bool)
        self.stop_tokens = {int(t) for t in stop_tokens}

    @property
    def all_done(self) -> bool:
        return bool(self.done.all())

    def add(self, new_tokens: np.ndarray, counts: np.ndarray, max_new_tokens: int) -> None:
        """new_tokens [B, n], of which the first counts[b] are row b's."""
        for row in np.flatnonzero(~self.done):
            for token in new_tokens[row, : counts[row]].tolist():
                self.tokens[row].append(token)
                if token in self.stop_tokens or len(self.tokens[row]) >= max_new_tokens:
                    self.done[row] = True
                    break
