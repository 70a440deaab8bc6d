"""Qwen3-Next causal LM with its multi-token-prediction (MTP) module, in Flax NNX.

Shape letters: B batch, T tokens, D model width, V vocab, M MTP depth, N = B*T routed tokens,
E experts. The module tree mirrors HF's checkpoint: `model.embed_tokens`, `model.layers.{i}`,
`model.norm`, `lm_head`, `mtp.{fc, pre_fc_norm_embedding, pre_fc_norm_hidden, layers.{d}, norm}`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax.ad_checkpoint import checkpoint_name

from slimqwen_jax.config import FULL_ATTENTION, LINEAR_ATTENTION, Qwen3NextConfig
from slimqwen_jax.layers import (
    MLP,
    Attention,
    Calibration,
    Embedding,
    GatedDeltaNet,
    InitKeys,
    Linear,
    RMSNorm,
    capturing,
)
from slimqwen_jax.moe import SparseMoeBlock, load_balancing_loss
from slimqwen_jax.platforms import target_platform
from slimqwen_jax.remat import rematerialize


class DecoderLayer(nnx.Module):
    """x + mixer(input_layernorm(x)), then x + mlp(post_attention_layernorm(x))."""

    def __init__(self, cfg: Qwen3NextConfig, layer_type: str, is_moe: bool, *, rngs):
        self.layer_type = layer_type
        if layer_type == LINEAR_ATTENTION:
            self.linear_attn = GatedDeltaNet(cfg, rngs=rngs)
        else:
            self.self_attn = Attention(cfg, rngs=rngs)
        self.mlp = SparseMoeBlock(cfg, rngs=rngs) if is_moe else MLP(cfg.intermediate_size, cfg, rngs=rngs)
        self.input_layernorm = RMSNorm(cfg.hidden_size, "embed", cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, "embed", cfg)

    def __call__(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """x [B, T, D], positions [B, T] -> (x [B, T, D], router logits [N, E] or None).

        Under `nnx.capture(..., Calibration)` it sows (input, output) of the residual stream as
        `residual`, for the block-influence score of depth pruning.
        """
        residual_in = x
        normed = self.input_layernorm(x)
        if self.layer_type == LINEAR_ATTENTION:
            mixed = self.linear_attn(normed)
        else:
            mixed = self.self_attn(normed, positions)
        x = checkpoint_name(x + mixed, "mixer_out")  # the residual stream between the mixer and the MLP
        mlp_out = self.mlp(self.post_attention_layernorm(x))
        router_logits = None
        if isinstance(self.mlp, SparseMoeBlock):
            mlp_out, router_logits = mlp_out
        x = x + mlp_out
        if capturing(self, Calibration):
            self.sow(Calibration, "residual", (residual_in, x))  # [B, T, D] each
        return x, router_logits


class Qwen3NextModel(nnx.Module):
    """Embedding, decoder stack and final norm (HF's `model.*`)."""

    def __init__(self, cfg: Qwen3NextConfig, *, rngs):
        self.embed_tokens = Embedding(cfg, rngs=rngs)
        self.layers = nnx.List(
            [
                DecoderLayer(cfg, cfg.layer_types[i], cfg.is_moe_layer(i), rngs=rngs)
                for i in range(cfg.num_hidden_layers)
            ]
        )
        self.norm = RMSNorm(cfg.hidden_size, "embed", cfg)
        self.scan_layers = cfg.scan_layers
        self.remat_policy = cfg.remat_policy

    def __call__(self, input_ids: jax.Array, positions: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        """input_ids [B, T] -> (final-normed hidden states [B, T, D], router logits of each MoE layer)."""
        x = self.embed_tokens(input_ids)  # [B, T, D]
        x, router_logits = decoder_stack(list(self.layers), x, positions, scan=self.scan_layers, remat=self.remat_policy)
        return self.norm(x), router_logits


def repeat_period(signatures: Sequence) -> int:
    """The smallest p such that signatures[i] == signatures[i + p] for every i (their number when none)."""
    n = len(signatures)
    return next((p for p in range(1, n) if all(signatures[i] == signatures[i + p] for i in range(n - p))), n)


def block_plan(signatures: Sequence) -> tuple[int, int]:
    """(period, whole blocks) of layers with these signatures, when there are at least two blocks
    to scan; (0, 0) otherwise."""
    period = repeat_period(signatures)
    num_blocks = len(signatures) // period if period else 0
    return (period, num_blocks) if num_blocks >= 2 else (0, 0)


def decoder_stack(
    layers: Sequence[DecoderLayer], x: jax.Array, positions: jax.Array, *, scan: bool, remat: str = "none"
) -> tuple[jax.Array, list[jax.Array]]:
    """Run `layers` in order: x [B, T, D] -> (x [B, T, D], router logits [N, E] of each MoE layer, in order).

    With `scan`, the layers are grouped into blocks of the pattern's period p (the smallest p such
    that layer i and layer i + p have the same module structure, parameter shapes and dtypes:
    Qwen3-Next's 3 linear-attention + 1 full-attention layers give p = 4) and the blocks run as one
    `jax.lax.scan`, so one block is traced and compiled instead of every layer; the layers after
    the last full block run unrolled. Fewer than two blocks (a non-periodic pattern), or layers with
    state other than parameters (e.g. `nnx.capture(..., init=...)` values), run unrolled.

    The parameters stay per layer (`model.layers.{i}`, as HF import/export, checkpoints and pruning
    see them): each call stacks the parameters of the layers at the same position in their blocks
    ([blocks, ...] arrays) and the scan body merges one slice back into a layer. Gradients flow
    through the stack back to each layer. Cost: one transient copy of the scanned layers' parameters
    per forward (kept as a residual until the backward, which also builds their stacked gradients
    before slicing them per layer). The trainer avoids that copy: it holds the parameters stacked
    (`stacking`) and unstacks them for the merge, and XLA folds the unstack and this stack away.
    `scan=False` (config `scan_layers`) runs every layer unrolled. `remat` (config `remat_policy`,
    `remat.rematerialize`) checkpoints each scanned block, or each unrolled layer.

    Sown intermediates (`nnx.capture` of `nnx.Intermediate` routing metrics or `Calibration` taps)
    are captured inside the body and sown again, block by block, into the layers they belong to, so
    the captured state is the one the unrolled loop gives.
    """
    if scan and layers:
        splits = [nnx.split(layer, nnx.Param, ...) for layer in layers]
        period, num_blocks = block_plan([(graphdef, _shapes(params)) for graphdef, params, _ in splits])
        only_params = not any(jax.tree.leaves(rest) for *_, rest in splits)
        if num_blocks and only_params:
            scanned = num_blocks * period
            x, block_logits = _scan_blocks(layers[:scanned], splits[:scanned], period, x, positions, remat)
            x, tail_logits = _run_unrolled(layers[scanned:], x, positions, remat)
            return x, block_logits + tail_logits
    return _run_unrolled(layers, x, positions, remat)


def _shapes(state: nnx.State) -> tuple:
    return tuple((leaf.shape, leaf.dtype) for leaf in jax.tree.leaves(state))


def _run_unrolled(layers: Sequence[DecoderLayer], x: jax.Array, positions: jax.Array, remat: str):
    router_logits = []
    for layer in layers:
        if remat == "none":
            x, logits = layer(x, positions)
        else:  # the layer as a pure function of its parameters, rematerialized
            graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
            run = rematerialize(_block_fn([graphdef], [rest], _capture_types(layer), positions), remat)
            x, [(logits, sown)] = run(x, [params])
            _sow_again(layer, sown)
        if logits is not None:
            router_logits.append(logits)
    return x, router_logits


def _capture_types(layer: DecoderLayer) -> tuple[type, ...]:
    return tuple(type(variable) for variable in getattr(layer, "__captures__", ()))


def _block_fn(graphdefs, rests, capture_types: tuple[type, ...], positions: jax.Array):
    """(x [B, T, D], per-layer parameters) -> (x, per layer (router logits or None, captured states)):
    consecutive layers (graphdef, rest) as a pure function, capturing `capture_types` inside."""

    def block(x, block_params):
        outputs = []
        for graphdef, params, rest in zip(graphdefs, block_params, rests):
            layer = nnx.merge(graphdef, params, rest)
            if capture_types:
                (x, logits), *sown = nnx.capture(layer, *capture_types)(x, positions)
            else:
                (x, logits), sown = layer(x, positions), []
            outputs.append((logits, sown))
        return x, outputs

    return block


def _scan_blocks(layers, splits, period: int, x: jax.Array, positions: jax.Array, remat: str):
    """`decoder_stack`'s scan over len(layers) // period blocks; splits: (graphdef, params, rest) of each layer."""
    num_blocks = len(layers) // period
    graphdefs = [graphdef for graphdef, _, _ in splits[:period]]
    rests = [rest for _, _, rest in splits[:period]]  # no arrays (checked): the structure only
    stacked = [  # per block position: parameters [blocks, ...]
        jax.tree.map(lambda *xs: jnp.stack(xs), *[splits[j * period + r][1] for j in range(num_blocks)])
        for r in range(period)
    ]
    block = rematerialize(_block_fn(graphdefs, rests, _capture_types(layers[0]), positions), remat)
    x, outputs = jax.lax.scan(block, x, stacked)  # outputs stacked over blocks
    router_logits = []
    for j in range(num_blocks):
        for r, (logits, sown) in enumerate(outputs):
            if logits is not None:
                router_logits.append(logits[j])
            _sow_again(layers[j * period + r], [jax.tree.map(lambda a: a[j], state) for state in sown])
    return x, router_logits


def _sow_again(layer: DecoderLayer, sown: list[nnx.State]) -> None:
    """Sow into `layer`'s submodules what a copy of it sowed under `nnx.capture` (one entry per call)."""
    for state in sown:
        for path, variable in nnx.to_flat_state(state):
            module = functools.reduce(getattr, path[:-1], layer)
            for value in variable.get_value():
                module.sow(type(variable), path[-1], value)


class MultiTokenPredictor(nnx.Module):
    """DeepSeek-V3-style MTP (HF's `mtp.*`): step d predicts token i + 2 + d at position i.

    h_d = norm(layers[d](fc([pre_fc_norm_embedding(emb(t_{i+1+d})) | pre_fc_norm_hidden(h_{d-1})])))
    with h_{-1} the backbone output after its final norm; embedding and lm_head are the backbone's.
    """

    def __init__(self, cfg: Qwen3NextConfig, *, rngs):
        d = cfg.hidden_size
        self.fc = Linear(2 * d, d, ("embed_pair", "embed"), cfg, rngs=rngs)
        self.pre_fc_norm_embedding = RMSNorm(d, "embed", cfg)
        self.pre_fc_norm_hidden = RMSNorm(d, "embed", cfg)
        self.layers = nnx.List(
            [DecoderLayer(cfg, FULL_ATTENTION, cfg.num_experts > 0, rngs=rngs) for _ in range(cfg.num_mtp_layers)]
        )
        self.norm = RMSNorm(d, "embed", cfg)

    def step(self, depth: int, hidden: jax.Array, next_embeds: jax.Array, positions: jax.Array):
        """One draft step with layer `depth`: hidden, next_embeds [B, T, D] -> (hidden [B, T, D], router logits)."""
        z, router_logits = self.layers[depth](self.fuse(hidden, next_embeds), positions)
        return self.norm(z), router_logits

    def fuse(self, hidden: jax.Array, next_embeds: jax.Array) -> jax.Array:
        """The MTP layer's input fc([pre_fc_norm_embedding(next_embeds) | pre_fc_norm_hidden(hidden)]) [..., D]."""
        fused = jnp.concatenate([self.pre_fc_norm_embedding(next_embeds), self.pre_fc_norm_hidden(hidden)], axis=-1)
        return self.fc(fused)


@struct.dataclass
class CausalLMOutput:
    """Outputs of `Qwen3NextForCausalLM`.

    logits [B, T, V]; hidden_states [B, T, D] (after the final norm); mtp_logits [M, B, T, V] or None,
    where mtp_logits[d, :, i] predicts token i + 2 + d (positions whose inputs run past T are padding);
    mtp_hidden_states [M, B, T, D] or None: what the LM head turns into mtp_logits;
    aux_loss: HF's load-balancing loss over the backbone's MoE layers (unscaled; 0 without MoE);
    router_logits: one [N, E] array per backbone MoE layer. Called with `with_logits=False`, logits
    and mtp_logits are None: the losses apply the head chunk by chunk (`losses.head_weight`).
    """

    logits: jax.Array | None
    hidden_states: jax.Array
    mtp_logits: jax.Array | None
    aux_loss: jax.Array
    router_logits: tuple[jax.Array, ...]
    mtp_hidden_states: jax.Array | None = None


def shift_left(ids: jax.Array, n: int) -> jax.Array:
    """ids [B, T] moved n steps left, zero-padded at the end: out[:, i] = ids[:, i + n]."""
    return jnp.pad(ids[:, n:], ((0, 0), (0, min(n, ids.shape[1]))))


class Qwen3NextForCausalLM(nnx.Module):
    """The full model: backbone, LM head (or tied embedding) and optional MTP module."""

    def __init__(self, cfg: Qwen3NextConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.model = Qwen3NextModel(cfg, rngs=rngs)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else Linear(cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), cfg, rngs=rngs)
        )
        self.mtp = MultiTokenPredictor(cfg, rngs=rngs) if cfg.num_mtp_layers > 0 else None

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [..., D] -> logits [..., V] through the LM head or the tied embedding."""
        if self.lm_head is None:
            return self.model.embed_tokens.attend(hidden)
        return self.lm_head(hidden)

    def __call__(
        self,
        input_ids: jax.Array,
        positions: jax.Array | None = None,
        *,
        with_mtp: bool = True,
        with_logits: bool = True,
    ) -> CausalLMOutput:
        """input_ids [B, T] (positions [B, T], default arange) -> CausalLMOutput.

        with_mtp: run the MTP module (when the model has one); with_logits: apply the LM head
        (False leaves the [B, T, V] logits to the caller, e.g. a loss that works chunk by chunk).
        """
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
        hidden, router_logits = self.model(input_ids, positions)
        mtp_hidden = None
        if with_mtp and self.mtp is not None:
            mtp_hidden = jnp.stack(self._mtp_hidden_states(input_ids, hidden, positions))  # [M, B, T, D]
        aux_loss = (
            load_balancing_loss(router_logits, self.config.num_experts_per_tok)
            if router_logits
            else jnp.zeros((), jnp.float32)
        )
        logits = self.logits(hidden) if with_logits else None
        mtp_logits = self.logits(mtp_hidden) if with_logits and mtp_hidden is not None else None
        return CausalLMOutput(logits, hidden, mtp_logits, aux_loss, tuple(router_logits), mtp_hidden)

    def _mtp_hidden_states(self, input_ids, hidden, positions) -> list[jax.Array]:
        """The MTP module's output hidden state [B, T, D] at each depth (before the LM head)."""
        states = []
        for depth in range(len(self.mtp.layers)):
            next_embeds = self.model.embed_tokens(shift_left(input_ids, depth + 1))  # [B, T, D]
            hidden, _ = self.mtp.step(depth, hidden, next_embeds, positions)
            states.append(hidden)
        return states


@functools.lru_cache(maxsize=8)
def _abstract_split(cfg: Qwen3NextConfig, platform: str) -> tuple[nnx.GraphDef, nnx.State]:
    del platform  # a key only: the modules pick their kernels for `target_platform()` when built
    return nnx.split(nnx.eval_shape(lambda: Qwen3NextForCausalLM(cfg, rngs=InitKeys(0))), nnx.Param)


def abstract_model(cfg: Qwen3NextConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """The graph definition and shapes-only parameters (`jax.ShapeDtypeStruct` values, logical-axes
    metadata kept) of the model `cfg` describes, allocating nothing. The state is a fresh copy that
    the caller may fill (`variable.set_value`) and `nnx.merge` with the graph definition."""
    graphdef, params = _abstract_split(cfg, target_platform())
    return graphdef, nnx.from_flat_state([(path, v.replace(v.get_value())) for path, v in nnx.to_flat_state(params)])
