"""Qwen3-Next building blocks as Flax NNX modules, numerically following HF transformers.

Shape letters: B batch, T tokens, D model width, V vocab, H query heads, G kv heads, A attention
head dim, R rotary dims, Hk / Hv linear-attention key / value heads, Dk / Dv their head dims,
C conv channels, K conv width, F MLP width.

Parameter names mirror the HF checkpoint (`q_proj`, `in_proj_qkvz`, `input_layernorm`, ...) and
every parameter carries `logical_axes` metadata (`embed` is the hidden dimension everywhere).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from pallas_kernels.gated_delta_rule import gated_delta_rule
from slimqwen_jax.config import Qwen3NextConfig
from slimqwen_jax.platforms import target_platform
from slimqwen_jax.sharding import embedding_lookup, on_batch_shards


class Calibration(nnx.Intermediate):
    """Intermediates sown for pruning statistics (`slimqwen_jax.compression.calibration`).

    A type of its own so that only `nnx.capture(model, Calibration)` collects them: the training
    loss's `nnx.capture(model, nnx.Intermediate)` neither stores nor computes them.
    """


def capturing(module: nnx.Module, variable_type: type[nnx.Variable]) -> bool:
    """Whether `module` runs inside an `nnx.capture` of exactly `variable_type` (sow only then)."""
    return any(type(var) is variable_type for var in getattr(module, "__captures__", ()))


class InitKeys:
    """The keys `nnx.Rngs(seed).params()` draws (fold_in(key(seed), 0), then 1, 2, ...), counted in
    Python: for inits traced under `jit` or `eval_shape`. There `nnx.Rngs` updates a traced counter
    at every draw, and flax's check of that update makes jax describe the tracer's origin, a walk
    over the whole trace so far: quadratic in the parameters (seconds for the 80B model's init)."""

    def __init__(self, seed: int):
        self._key = jax.random.key(seed)
        self._count = 0

    def params(self) -> jax.Array:
        key = jax.random.fold_in(self._key, self._count)
        self._count += 1
        return key


def normal_param(rngs: nnx.Rngs | InitKeys, shape, axes, cfg: Qwen3NextConfig) -> nnx.Param:
    """A normal(0, initializer_range) parameter, HF's init for projections and embeddings."""
    value = cfg.initializer_range * jax.random.normal(rngs.params(), shape, jnp.float32)
    return nnx.Param(value.astype(cfg.params_dtype), logical_axes=axes)


def constant_param(value, shape, axes, cfg: Qwen3NextConfig) -> nnx.Param:
    return nnx.Param(jnp.full(shape, value, cfg.params_dtype), logical_axes=axes)


class Linear(nnx.Module):
    """A bias-free projection with kernel [in, out] (the transpose of torch's weight)."""

    def __init__(self, in_features: int, out_features: int, axes: tuple[str, str], cfg: Qwen3NextConfig, *, rngs):
        self.kernel = normal_param(rngs, (in_features, out_features), axes, cfg)
        self.dtype = cfg.compute_dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.einsum("...i,io->...o", x.astype(self.dtype), self.kernel[...].astype(self.dtype))


class Embedding(nnx.Module):
    """Token embedding table [V, D]; `attend` gives tied-embedding logits."""

    def __init__(self, cfg: Qwen3NextConfig, *, rngs):
        self.embedding = normal_param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), cfg)
        self.dtype = cfg.compute_dtype

    def __call__(self, ids: jax.Array) -> jax.Array:
        return embedding_lookup(self.embedding[...], ids, self.dtype)  # [..., D]

    def attend(self, x: jax.Array) -> jax.Array:
        return jnp.einsum("...d,vd->...v", x.astype(self.dtype), self.embedding[...].astype(self.dtype))


class RMSNorm(nnx.Module):
    """Zero-centred RMSNorm: y = x * rsqrt(mean(x^2) + eps) * (1 + w), in float32, cast back."""

    def __init__(self, dim: int, axis_name: str, cfg: Qwen3NextConfig):
        self.weight = constant_param(0.0, (dim,), (axis_name,), cfg)
        self.eps = cfg.rms_norm_eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        # HF multiplies by (1 + w) in float32 before the cast (unlike Llama).
        out = (y * (1.0 + self.weight[...].astype(jnp.float32))).astype(x.dtype)
        if capturing(self, Calibration):
            self.sow(Calibration, "output", out)  # [..., dim]: channel importance for width pruning
        return out


class GatedRMSNorm(nnx.Module):
    """Plain RMSNorm (weight w, not 1 + w) followed by a SiLU gate: w * norm(x) * silu(z)."""

    def __init__(self, dim: int, cfg: Qwen3NextConfig):
        self.weight = constant_param(1.0, (dim,), ("linear_head_dim",), cfg)
        self.eps = cfg.rms_norm_eps

    def __call__(self, x: jax.Array, gate: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        normed = (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)).astype(x.dtype)
        # HF: weight times the normed input in the input dtype, then the gate in float32.
        y = self.weight[...].astype(x.dtype) * normed
        return (y.astype(jnp.float32) * jax.nn.silu(gate.astype(jnp.float32))).astype(x.dtype)


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, width: int, cfg: Qwen3NextConfig, *, rngs):
        d = cfg.hidden_size
        self.gate_proj = Linear(d, width, ("embed", "mlp"), cfg, rngs=rngs)
        self.up_proj = Linear(d, width, ("embed", "mlp"), cfg, rngs=rngs)
        self.down_proj = Linear(width, d, ("mlp", "embed"), cfg, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


# ---------------------------------------------------------------------------- full attention
def rotary_cos_sin(positions: jax.Array, rotary_dim: int, theta: float, dtype) -> tuple[jax.Array, jax.Array]:
    """NeoX RoPE tables [B, T, R] for integer positions [B, T], computed in float32."""
    inv_freq = 1.0 / theta ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim)  # [R/2]
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, R/2]
    angles = jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, R]
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_partial_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate the first R dims of x [B, T, N, A] 'rotate-half' style; the rest pass through."""
    r = cos.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    x1, x2 = rot[..., : r // 2], rot[..., r // 2 :]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([rot * cos + rotated * sin, rest], axis=-1)


def causal_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, scale: float, mask: jax.Array | None = None
) -> jax.Array:
    """Grouped-query attention, softmax in float32. q [B,T,H,A], k/v [B,S,G,A] -> [B,T,H,A].

    mask [B, T, S] (True = may attend) defaults to causal with queries and keys aligned at the start.
    """
    b, t, h, a = q.shape
    g = k.shape[2]
    q = q.reshape(b, t, g, h // g, a)  # query head h uses kv head h // (H / G)
    scores = jnp.einsum("btgra,bsga->bgrts", q, k) * jnp.asarray(scale, q.dtype)  # [B, G, H/G, T, S]
    mask = jnp.tril(jnp.ones((1, t, k.shape[1]), bool)) if mask is None else mask  # [B|1, T, S]
    scores = jnp.where(mask[:, None, None], scores.astype(jnp.float32), -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    out = jnp.einsum("bgrts,bsga->btgra", probs, v)
    return out.reshape(b, t, h, a)


def attention_block_size(t: int, chunk_size: int) -> int:
    """Queries per block of `chunked_causal_attention` over T tokens: ceil(T / 8), so that the skipped
    blocks above the diagonal save 7/16 of the [T, T] scores, but at least 128 (smaller blocks
    gain little and shrink the matmuls: docs/performance.md) and at most `chunk_size` (the memory
    bound: [B, H, C, T] float32 scores per block)."""
    return min(chunk_size, max(128, -(-t // 8)))


def _query_blocks(t: int, block: int) -> list[tuple[int, int]]:
    """[start, end) of each block of `block` queries over T tokens (the last one may be shorter)."""
    return [(start, min(start + block, t)) for start in range(0, t, block)]


def _block_scores(q_block, k, scale, start):
    """Masked float32 scores of queries [start, start + C) against keys [0, start + C), the keys
    they may see at most: q_block [B, G, R, C, A], k [B, G, start + C, A] -> [B, G, R, C, start + C]."""
    c, s = q_block.shape[3], k.shape[2]
    scores = jnp.einsum("bgrca,bgsa->bgrcs", q_block, k, preferred_element_type=jnp.float32) * scale
    causal = (start + jnp.arange(c))[:, None] >= jnp.arange(s)[None, :]  # [C, S]
    return jnp.where(causal, scores, -jnp.inf)


def _blockwise_forward(q, k, v, scale, block):
    """q [B, G, R, T, A], k/v [B, G, T, A] -> (out [B, G, R, T, A], logsumexp [B, G, R, T] float32)."""
    outs, lses = [], []
    for start, end in _query_blocks(q.shape[3], block):
        scores = _block_scores(q[:, :, :, start:end], k[:, :, :end], scale, start)  # [B, G, R, C, end]
        peak = jnp.max(scores, axis=-1, keepdims=True)  # finite: every query sees key 0
        probs = jnp.exp(scores - peak)  # unnormalised
        total = jnp.sum(probs, axis=-1, keepdims=True)
        out = jnp.einsum("bgrcs,bgsa->bgrca", probs.astype(v.dtype), v[:, :, :end], preferred_element_type=jnp.float32)
        outs.append((out / total).astype(q.dtype))  # normalise the [C, A] output, not the [C, S] probabilities
        lses.append((peak + jnp.log(total))[..., 0])
    return jnp.concatenate(outs, axis=3), jnp.concatenate(lses, axis=3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _blockwise_causal_attention(q, k, v, scale, block):
    return _blockwise_forward(q, k, v, scale, block)[0]


def _blockwise_fwd(q, k, v, scale, block):
    out, lse = _blockwise_forward(q, k, v, scale, block)
    return out, (q, k, v, out, lse)


def _blockwise_bwd(scale, block, residuals, d_out):
    """Flash-attention backward per query block, the probabilities rebuilt from the logsumexp:
    dS = P (dP - rowsum(dO O)), dq = scale dS k, dk = scale dS^T q, dv = P^T dO."""
    q, k, v, out, lse = residuals
    t = q.shape[3]
    dq_blocks = []
    dk = jnp.zeros(k.shape, jnp.float32)
    dv = jnp.zeros(v.shape, jnp.float32)
    for start, end in _query_blocks(t, block):
        q_block, d_block = q[:, :, :, start:end], d_out[:, :, :, start:end]  # [B, G, R, C, A]
        k_seen, v_seen = k[:, :, :end], v[:, :, :end]  # [B, G, end, A]
        probs = jnp.exp(_block_scores(q_block, k_seen, scale, start) - lse[:, :, :, start:end, None])
        d_probs = jnp.einsum("bgrca,bgsa->bgrcs", d_block, v_seen, preferred_element_type=jnp.float32)
        delta = jnp.sum(d_block.astype(jnp.float32) * out[:, :, :, start:end].astype(jnp.float32), axis=-1)
        d_scores = (probs * (d_probs - delta[..., None]) * scale).astype(q.dtype)  # [B, G, R, C, end]
        dq_blocks.append(jnp.einsum("bgrcs,bgsa->bgrca", d_scores, k_seen, preferred_element_type=jnp.float32))
        unseen = ((0, 0), (0, 0), (0, t - end), (0, 0))
        dk += jnp.pad(jnp.einsum("bgrcs,bgrca->bgsa", d_scores, q_block, preferred_element_type=jnp.float32), unseen)
        dv += jnp.pad(
            jnp.einsum("bgrcs,bgrca->bgsa", probs.astype(d_block.dtype), d_block, preferred_element_type=jnp.float32),
            unseen,
        )
    dq = jnp.concatenate(dq_blocks, axis=3)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_blockwise_causal_attention.defvjp(_blockwise_fwd, _blockwise_bwd)


def chunked_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float, chunk_size: int) -> jax.Array:
    """`causal_attention(q, k, v, scale)` (queries and keys aligned at the start) computed a block of
    queries at a time, flash-attention style: q [B,T,H,A], k/v [B,T,G,A] -> [B,T,H,A].

    A block of queries scores only the keys up to its last query (the blocks above the causal
    diagonal are skipped), normalises its [C, A] output by the softmax's row sums instead of its
    [C, S] probabilities, and keeps its logsumexp [B, H, T] for the backward, a `jax.custom_vjp`
    that rebuilds each block's probabilities from it. So the float32 scores exist one block at a
    time, [B, H, C, <= T], in the forward and the backward alike, and the backward reads them in
    three passes (probabilities, their gradient, the three products) instead of autodiff's softmax
    transpose. Blocks of `attention_block_size(T, chunk_size)` queries, unrolled (static shapes).

    Why not `jax.nn.dot_product_attention`: its default (XLA) implementation builds the full
    [B, H, T, S] logits in float32 on every platform; only `implementation="cudnn"` (NVIDIA GPUs,
    16-bit inputs) is a fused flash kernel.
    """
    b, t, h, a = q.shape
    g = k.shape[2]
    heads_first = q.reshape(b, t, g, h // g, a).transpose(0, 2, 3, 1, 4)  # [B, G, H/G, T, A]
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, G, T, A]
    block = attention_block_size(t, chunk_size)
    out = _blockwise_causal_attention(heads_first, k, v, float(scale), block)  # [B, G, H/G, T, A]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, a)


class Attention(nnx.Module):
    """Gated full attention: per-head [query | gate] q_proj, q/k norm, partial RoPE, GQA."""

    def __init__(self, cfg: Qwen3NextConfig, *, rngs):
        d, h, g, a = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = Linear(d, h * 2 * a, ("embed", "q_heads"), cfg, rngs=rngs)
        self.k_proj = Linear(d, g * a, ("embed", "kv_heads"), cfg, rngs=rngs)
        self.v_proj = Linear(d, g * a, ("embed", "kv_heads"), cfg, rngs=rngs)
        self.o_proj = Linear(h * a, d, ("heads", "embed"), cfg, rngs=rngs)
        self.q_norm = RMSNorm(a, "head_dim", cfg)
        self.k_norm = RMSNorm(a, "head_dim", cfg)
        self.num_heads, self.num_kv_heads, self.head_dim = h, g, a
        self.rotary_dim, self.rope_theta = cfg.rotary_dim, cfg.rope_theta
        self.implementation, self.chunk_size = cfg.attention_impl, cfg.attention_chunk_size

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """x [B, T, D] -> [B, T, D], causal over the T tokens (`attention_impl`: "reference" or "chunked")."""
        q, k, v, gate = self.project(x, positions)
        scale = self.head_dim**-0.5
        if self.implementation == "chunked":
            attended = chunked_causal_attention(q, k, v, scale, self.chunk_size)
        else:
            attended = causal_attention(q, k, v, scale)
        return self.output(attended, gate)

    def project(self, x: jax.Array, positions: jax.Array):
        """x [B, T, D] -> q [B, T, H, A], k, v [B, T, G, A] (q, k normed and rotated), gate [B, T, H, A]."""
        b, t, _ = x.shape
        h, g, a = self.num_heads, self.num_kv_heads, self.head_dim
        query_gate = checkpoint_name(self.q_proj(x), "qkv_proj").reshape(b, t, h, 2 * a)  # head h: [query | gate]
        q, gate = query_gate[..., :a], query_gate[..., a:]  # [B, T, H, A] each
        q = self.q_norm(q)
        k = self.k_norm(checkpoint_name(self.k_proj(x), "qkv_proj").reshape(b, t, g, a))  # [B, T, G, A]
        v = checkpoint_name(self.v_proj(x), "qkv_proj").reshape(b, t, g, a)  # [B, T, G, A]
        cos, sin = rotary_cos_sin(positions, self.rotary_dim, self.rope_theta, q.dtype)  # [B, T, R]
        return apply_partial_rope(q, cos, sin), apply_partial_rope(k, cos, sin), v, gate

    def output(self, attended: jax.Array, gate: jax.Array) -> jax.Array:
        """attended, gate [B, T, H, A] -> o_proj(attended * sigmoid(gate)) [B, T, D]."""
        b, t, h, a = attended.shape
        return self.o_proj(attended.reshape(b, t, h * a) * jax.nn.sigmoid(gate.reshape(b, t, h * a)))


# ---------------------------------------------------------------------------- Gated DeltaNet
class DepthwiseCausalConv(nnx.Module):
    """Depthwise causal conv without bias, kernel [K, C]; kernel[K-1] multiplies the current token."""

    def __init__(self, channels: int, width: int, cfg: Qwen3NextConfig, *, rngs):
        self.kernel = normal_param(rngs, (width, channels), ("conv_width", "conv_channels"), cfg)

    def __call__(self, x: jax.Array, state: jax.Array | None = None) -> jax.Array:
        """x [B, T, C] -> [B, T, C]; `state` [B, K-1, C], the inputs before x, replaces the zero padding."""
        width = self.kernel.shape[0]
        t = x.shape[1]
        kernel = self.kernel[...].astype(jnp.float32)
        if state is None:
            padded = jnp.pad(x.astype(jnp.float32), ((0, 0), (width - 1, 0), (0, 0)))  # [B, T+K-1, C]
        else:
            padded = jnp.concatenate([state, x], axis=1).astype(jnp.float32)  # [B, K-1+T, C]
        out = sum(padded[:, j : j + t, :] * kernel[j] for j in range(width))  # [B, T, C]
        return out.astype(x.dtype)


class GatedDeltaNet(nnx.Module):
    """Qwen3-Next linear attention: interleaved qkvz/ba projections, causal conv, gated delta rule."""

    def __init__(self, cfg: Qwen3NextConfig, *, rngs):
        d = cfg.hidden_size
        hk, hv, dk, dv = (
            cfg.linear_num_key_heads,
            cfg.linear_num_value_heads,
            cfg.linear_key_head_dim,
            cfg.linear_value_head_dim,
        )
        self.in_proj_qkvz = Linear(d, 2 * hk * dk + 2 * hv * dv, ("embed", "linear_heads"), cfg, rngs=rngs)
        self.in_proj_ba = Linear(d, 2 * hv, ("embed", "linear_heads"), cfg, rngs=rngs)
        self.conv1d = DepthwiseCausalConv(2 * hk * dk + hv * dv, cfg.linear_conv_kernel_dim, cfg, rngs=rngs)
        self.dt_bias = constant_param(1.0, (hv,), ("linear_v_heads",), cfg)
        # HF: A ~ U(0.01, 16), stored as log A.
        a_init = jax.random.uniform(rngs.params(), (hv,), jnp.float32, 0.01, 16.0)
        self.A_log = nnx.Param(jnp.log(a_init).astype(cfg.params_dtype), logical_axes=("linear_v_heads",))
        self.norm = GatedRMSNorm(dv, cfg)
        self.out_proj = Linear(hv * dv, d, ("linear_heads", "embed"), cfg, rngs=rngs)
        self.num_k_heads, self.num_v_heads, self.head_k_dim, self.head_v_dim = hk, hv, dk, dv
        self.implementation = cfg.gated_delta_rule_impl

    def _split_projections(self, x: jax.Array):
        """Undo the per-key-head-group interleaving of in_proj_qkvz and in_proj_ba."""
        b, t, _ = x.shape
        hk, hv, dk, dv = self.num_k_heads, self.num_v_heads, self.head_k_dim, self.head_v_dim
        r = hv // hk
        qkvz = checkpoint_name(self.in_proj_qkvz(x), "qkv_proj").reshape(b, t, hk, 2 * dk + 2 * r * dv)  # group g: [q | k | v(r) | z(r)]
        q, k, v, z = jnp.split(qkvz, [dk, 2 * dk, 2 * dk + r * dv], axis=-1)
        ba = self.in_proj_ba(x).reshape(b, t, hk, 2 * r)  # group g: [b(r) | a(r)]
        beta_logit, a = ba[..., :r].reshape(b, t, hv), ba[..., r:].reshape(b, t, hv)  # [B, T, Hv]
        return q, k, v.reshape(b, t, hv, dv), z.reshape(b, t, hv, dv), beta_logit, a

    def __call__(self, x: jax.Array) -> jax.Array:
        mixed, z, beta, g = self.conv_inputs(x)
        q, k, v = self.split_conv_output(self.conv1d(mixed))
        return self.output(self.delta_rule(q, k, v, g, beta), z)

    def delta_rule(self, q, k, v, g, beta) -> jax.Array:
        """The gated delta rule over the whole sequence: o [B, T, Hv, Dv]. The Pallas kernel runs on
        each batch shard of the context mesh (`on_batch_shards`): XLA cannot partition a Mosaic or
        Triton kernel itself."""

        def run(q, k, v, g, beta):
            platform = target_platform()
            return gated_delta_rule(q, k, v, g, beta, use_qk_l2norm=True, implementation=self.implementation,
                                    platform=platform)[0]  # fmt: skip

        if self.implementation != "pallas":
            return run(q, k, v, g, beta)
        return on_batch_shards(run, (q, k, v, g, beta), (0, 0, 0, 0, 0))

    def conv_inputs(self, x: jax.Array):
        """x [B, T, D] -> (conv input [B, T, C], z [B, T, Hv, Dv], beta [B, T, Hv], log decay g [B, T, Hv] f32).

        The conv runs on [q all heads | k all heads | v all heads]; z skips it.
        """
        b, t, _ = x.shape
        q, k, v, z, beta_logit, a = self._split_projections(x)
        mixed = jnp.concatenate([q.reshape(b, t, -1), k.reshape(b, t, -1), v.reshape(b, t, -1)], -1)  # [B, T, C]
        beta = jax.nn.sigmoid(beta_logit)  # [B, T, Hv]
        # Log-decay in float32: g = -exp(A_log) * softplus(a + dt_bias) <= 0.
        g = -jnp.exp(self.A_log[...].astype(jnp.float32)) * jax.nn.softplus(
            a.astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32)
        )
        return mixed, z, beta, g

    def split_conv_output(self, conv_out: jax.Array):
        """conv output [B, T, C] -> SiLU, then q, k [B, T, Hk, Dk] and v [B, T, Hv, Dv]."""
        b, t, _ = conv_out.shape
        hk, hv, dk, dv = self.num_k_heads, self.num_v_heads, self.head_k_dim, self.head_v_dim
        q, k, v = jnp.split(jax.nn.silu(conv_out), [hk * dk, 2 * hk * dk], axis=-1)
        return q.reshape(b, t, hk, dk), k.reshape(b, t, hk, dk), v.reshape(b, t, hv, dv)

    def output(self, out: jax.Array, z: jax.Array) -> jax.Array:
        """Delta-rule output, z [B, T, Hv, Dv] -> out_proj(gated norm) [B, T, D]."""
        b, t, hv, dv = out.shape
        return self.out_proj(self.norm(out, z).reshape(b, t, hv * dv))
