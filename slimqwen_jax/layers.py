"""Qwen3-Next building blocks as Flax NNX modules, numerically following HF transformers.

Shape letters: B batch, T tokens, D model width, V vocab, H query heads, G kv heads, A attention
head dim, R rotary dims, Hk / Hv linear-attention key / value heads, Dk / Dv their head dims,
C conv channels, K conv width, F MLP width.

Parameter names mirror the HF checkpoint (`q_proj`, `in_proj_qkvz`, `input_layernorm`, ...) and
every parameter carries `logical_axes` metadata (`embed` is the hidden dimension everywhere).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels.gated_delta_rule import gated_delta_rule
from slimqwen_jax.config import Qwen3NextConfig


class Calibration(nnx.Intermediate):
    """Intermediates sown for pruning statistics (`slimqwen_jax.pruning.calibration`).

    A type of its own so that only `nnx.capture(model, Calibration)` collects them: the training
    loss's `nnx.capture(model, nnx.Intermediate)` neither stores nor computes them.
    """


def capturing(module: nnx.Module, variable_type: type[nnx.Variable]) -> bool:
    """Whether `module` runs inside an `nnx.capture` of exactly `variable_type` (sow only then)."""
    return any(type(var) is variable_type for var in getattr(module, "__captures__", ()))


def normal_param(rngs: nnx.Rngs, shape, axes, cfg: Qwen3NextConfig) -> nnx.Param:
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
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

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


def chunked_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float, chunk_size: int) -> jax.Array:
    """`causal_attention(q, k, v, scale)` (queries and keys aligned at the start) computed
    `chunk_size` queries at a time: q [B,T,H,A], k/v [B,T,G,A] -> [B,T,H,A].

    Each block of queries attends to all T keys with the exact softmax of `causal_attention`, so
    the scores live as [B, H, chunk_size, T] float32 per block instead of [B, H, T, T]; blocks run
    in a `lax.map` under `jax.checkpoint`, so the backward rebuilds each block's scores rather than
    keeping them all. T at most chunk_size is one block: `causal_attention` itself.

    Why not `jax.nn.dot_product_attention`: its default (XLA) implementation builds the full
    [B, H, T, S] logits in float32 on every platform; only `implementation="cudnn"` (NVIDIA GPUs,
    16-bit inputs) is a fused flash kernel.
    """
    b, t, h, a = q.shape
    if t <= chunk_size:
        return causal_attention(q, k, v, scale)
    num_chunks = -(-t // chunk_size)
    padded = jnp.pad(q, ((0, 0), (0, num_chunks * chunk_size - t), (0, 0), (0, 0)))  # [B, T', H, A]
    q_chunks = padded.reshape(b, num_chunks, chunk_size, h, a).swapaxes(0, 1)  # [n, B, C, H, A]
    key_index = jnp.arange(t)  # [T]

    @jax.checkpoint
    def attend(q_chunk, start, k, v):
        query_index = start + jnp.arange(chunk_size)  # [C]; padding rows past T see every key
        mask = query_index[:, None] >= key_index[None, :]  # [C, T]
        return causal_attention(q_chunk, k, v, scale, mask[None])  # [B, C, H, A]

    starts = jnp.arange(num_chunks) * chunk_size  # [n]
    out = jax.lax.map(lambda xs: attend(*xs, k, v), (q_chunks, starts))  # [n, B, C, H, A]
    return out.swapaxes(0, 1).reshape(b, num_chunks * chunk_size, h, a)[:, :t]


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
        query_gate = self.q_proj(x).reshape(b, t, h, 2 * a)  # head h owns [query | gate]
        q, gate = query_gate[..., :a], query_gate[..., a:]  # [B, T, H, A] each
        q = self.q_norm(q)
        k = self.k_norm(self.k_proj(x).reshape(b, t, g, a))  # [B, T, G, A]
        v = self.v_proj(x).reshape(b, t, g, a)  # [B, T, G, A]
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
        qkvz = self.in_proj_qkvz(x).reshape(b, t, hk, 2 * dk + 2 * r * dv)  # group g: [q | k | v(r) | z(r)]
        q, k, v, z = jnp.split(qkvz, [dk, 2 * dk, 2 * dk + r * dv], axis=-1)
        ba = self.in_proj_ba(x).reshape(b, t, hk, 2 * r)  # group g: [b(r) | a(r)]
        beta_logit, a = ba[..., :r].reshape(b, t, hv), ba[..., r:].reshape(b, t, hv)  # [B, T, Hv]
        return q, k, v.reshape(b, t, hv, dv), z.reshape(b, t, hv, dv), beta_logit, a

    def __call__(self, x: jax.Array) -> jax.Array:
        mixed, z, beta, g = self.conv_inputs(x)
        q, k, v = self.split_conv_output(self.conv1d(mixed))
        out, _ = gated_delta_rule(q, k, v, g, beta, use_qk_l2norm=True, implementation=self.implementation)
        return self.output(out, z)

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
