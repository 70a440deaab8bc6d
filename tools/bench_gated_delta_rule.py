"""Throughput of the gated delta rule per implementation at equal shapes: tokens/s and FLOP/s.

    .venv/bin/python tools/bench_gated_delta_rule.py [--batch 1 --tokens 2048 --key-heads 2
        --value-heads 4 --head-dim 128 --dtype float32 --repeats 7 --torch-threads 2 --interpret
        --out results.json]

Rows, forward and forward+backward (gradients of q, k, v, g, beta) side by side:
  chunked    our jnp chunked (WY) form, jitted
  recurrent  our jnp token-by-token `lax.scan`, jitted
  pallas     our Pallas kernel, compiled; only on a GPU or TPU backend (or with --interpret on CPU)
  hf_torch   transformers' `torch_chunk_gated_delta_rule` fallback, on torch's CUDA device if any
  fla        flash-linear-attention's Triton `chunk_gated_delta_rule`, where importable with CUDA torch
All take the same un-normalised q, k with fused q/k L2 norm (q/k repeated to Hv first for fla, as
HF does). One warm-up (compilation) call each, then --repeats rounds that call every row's forward
and forward+backward once in turn; the median per entry is reported (interleaved, so that load
changes on a shared machine hit all rows alike), wall time and process CPU time, then each row's
times over chunked's. Each row also gives the max relative error of its forward output against the
float32 `recurrent` output.

FLOPs per (batch, value head) and token, multiply-add = 2, exp and elementwise ops not counted:
  chunked form, chunk C:  6 C Dk + 4 C Dv + 6 Dk Dv + (2/3) C^2
    (L = (beta k) k^T and q k^T: 2 C^2 Dk each; w: 2 C^2 Dk; u and attn v_new: 2 C^2 Dv each;
     w S, q S, k^T v_new: 2 C Dk Dv each; (I + L)^-1 by forward substitution: C^3 / 3 madds)
  recurrence:             6 Dk Dv (S^T k, k delta^T, S^T q)
A backward pass is counted as twice its forward; forward+backward = 3 x forward. FLOP/s is that
count over the measured time: the same formula for every chunked row, so rows compare directly.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
# torch's OpenMP threads spin at their barriers by default; in one process with XLA's CPU worker
# threads on 2 cores they then starve each other (HF's forward measured 1.3 to 5.4 s instead of
# 0.02 to 0.2 s). Set before torch is imported; an explicit OMP_WAIT_POLICY wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import platform
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from timing import interleaved_medians

from pallas_kernels.gated_delta_rule import gated_delta_rule

jax.config.update("jax_default_matmul_precision", "highest")


def chunked_flops_per_token(c: int, dk: int, dv: int) -> float:
    return 6 * c * dk + 4 * c * dv + 6 * dk * dv + 2 * c * c / 3


def recurrent_flops_per_token(dk: int, dv: int) -> float:
    return 6 * dk * dv


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def make_inputs(args) -> dict[str, np.ndarray]:
    """Seeded float32 inputs with Qwen3-Next gates: g = -exp(A_log) softplus(a + dt_bias), beta = sigmoid(b)."""
    rng = np.random.default_rng(0)
    b, t, hk, hv, d = args.batch, args.tokens, args.key_heads, args.value_heads, args.head_dim
    a_log = np.log(rng.uniform(1.0, 16.0, hv))  # [Hv]
    dt_bias = np.log(np.expm1(np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), hv))))  # [Hv]
    inputs = {
        "q": rng.normal(size=(b, t, hk, d)),  # [B, T, Hk, D]
        "k": rng.normal(size=(b, t, hk, d)),  # [B, T, Hk, D]
        "v": rng.normal(size=(b, t, hv, d)),  # [B, T, Hv, D]
        "g": -np.exp(a_log) * np.logaddexp(0.0, rng.normal(size=(b, t, hv)) + dt_bias),  # [B, T, Hv]
        "beta": 1.0 / (1.0 + np.exp(-rng.normal(size=(b, t, hv)))),  # [B, T, Hv]
    }
    return {name: x.astype(np.float32) for name, x in inputs.items()}


def jax_thunks(inputs: dict, dtype, **options) -> tuple[Callable, Callable, np.ndarray]:
    """(forward, forward+backward, forward output) of `gated_delta_rule` with these options; each
    thunk runs once, synchronised, and the first call of each compiles."""
    args = {
        name: jnp.asarray(x, dtype if name in ("q", "k", "v", "beta") else jnp.float32) for name, x in inputs.items()
    }
    weight = jnp.asarray(np.random.default_rng(1).normal(size=inputs["v"].shape), jnp.float32)  # [B, T, Hv, D]

    def forward(args):
        return gated_delta_rule(**args, use_qk_l2norm=True, **options)[0]

    def loss(args):
        return jnp.sum(forward(args).astype(jnp.float32) * weight)

    fwd, grad = jax.jit(forward), jax.jit(jax.grad(loss))
    return (
        lambda: jax.block_until_ready(fwd(args)),
        lambda: jax.block_until_ready(grad(args)),
        np.asarray(fwd(args), np.float32),
    )


def torch_thunks(fn, inputs: dict, dtype: str, repeat_qk: bool) -> tuple[Callable, Callable, np.ndarray]:
    """(forward, forward+backward, forward output) of a torch gated-delta-rule function."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    group = inputs["v"].shape[2] // inputs["q"].shape[2]

    def tensor(name, x):
        x = torch.from_numpy(x).to(device)
        if name in ("q", "k", "v", "beta"):
            x = x.to(getattr(torch, dtype))
        if repeat_qk and name in ("q", "k"):
            x = x.repeat_interleave(group, dim=2)
        return x.requires_grad_()

    args = {name: tensor(name, x) for name, x in inputs.items()}
    weight = torch.from_numpy(np.random.default_rng(1).normal(size=inputs["v"].shape).astype(np.float32)).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def forward():
        q, k, v, g, beta = (args[name] for name in ("q", "k", "v", "g", "beta"))
        return fn(q, k, v, g=g, beta=beta, use_qk_l2norm_in_kernel=True)[0]

    def forward_no_grad():
        with torch.no_grad():
            output = forward()
        sync()
        return output

    def forward_backward():
        (forward().float() * weight).sum().backward()
        sync()

    return forward_no_grad, forward_backward, forward_no_grad().float().cpu().numpy()


def implementations(args):
    """(name, device, FLOPs per token per head, timing thunk) of every implementation available here."""
    d, c = args.head_dim, 64  # every chunked implementation here uses chunks of 64
    chunked, recurrent = chunked_flops_per_token(c, d, d), recurrent_flops_per_token(d, d)
    dtype = getattr(jnp, args.dtype)
    backend = jax.default_backend()
    jax_device = jax.devices()[0].device_kind
    rows = [
        ("chunked", jax_device, chunked, lambda x: jax_thunks(x, dtype, implementation="chunked")),
        ("recurrent", jax_device, recurrent, lambda x: jax_thunks(x, dtype, implementation="recurrent")),
    ]
    if backend != "cpu" or args.interpret:
        name = "pallas" if backend != "cpu" else "pallas (interpret)"
        rows.append((name, jax_device, chunked, lambda x: jax_thunks(x, dtype, implementation="pallas")))
    try:
        import torch
        from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule
    except ImportError:
        print("hf_torch: transformers / torch not importable, row skipped")
    else:
        torch_device = (
            torch.cuda.get_device_name()
            if torch.cuda.is_available()
            else f"torch CPU, {torch.get_num_threads()} threads"
        )
        rows.append(
            ("hf_torch", torch_device, chunked,
             lambda x: torch_thunks(torch_chunk_gated_delta_rule, x, args.dtype, repeat_qk=False))
        )  # fmt: skip
        try:
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        except ImportError:
            print("fla: flash-linear-attention not importable, row skipped")
        else:
            if torch.cuda.is_available():
                rows.append(
                    ("fla", torch_device, chunked,
                     lambda x: torch_thunks(chunk_gated_delta_rule, x, args.dtype, repeat_qk=True))
                )  # fmt: skip
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--key-heads", type=int, default=2)
    parser.add_argument("--value-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=128, help="Dk = Dv")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--torch-threads", type=int, default=2, help="torch CPU threads (this machine has 2 cores)")
    parser.add_argument("--interpret", action="store_true", help="add the pallas row in interpret mode on CPU")
    parser.add_argument("--out", default="", help="write the results as JSON here")
    args = parser.parse_args()
    try:
        import torch

        torch.set_num_threads(args.torch_threads)
    except ImportError:
        pass

    inputs = make_inputs(args)
    tokens = args.batch * args.tokens
    heads = args.batch * args.value_heads
    reference = np.asarray(jax.jit(gated_delta_rule, static_argnames="implementation")(
        **inputs, implementation="recurrent")[0])  # fmt: skip
    rows, thunks = [], {}
    for name, device, flops_per_token, build in implementations(args):
        forward, forward_backward, output = build(inputs)
        thunks[(name, "forward")], thunks[(name, "fwd_bwd")] = forward, forward_backward
        rows.append((name, device, flops_per_token, output))
    seconds = interleaved_medians(thunks, args.repeats)
    results = []
    for name, device, flops_per_token, output in rows:
        (forward_s, forward_cpu_s), (backward_s, backward_cpu_s) = (
            seconds[(name, "forward")],
            seconds[(name, "fwd_bwd")],
        )
        forward_flops = flops_per_token * args.tokens * heads
        results.append({
            "implementation": name, "device": device,
            "forward_ms": 1e3 * forward_s, "forward_tokens_per_s": tokens / forward_s,
            "forward_gflop_per_s": forward_flops / forward_s / 1e9,
            "fwd_bwd_ms": 1e3 * backward_s, "fwd_bwd_tokens_per_s": tokens / backward_s,
            "fwd_bwd_gflop_per_s": 3 * forward_flops / backward_s / 1e9,
            "forward_cpu_ms": 1e3 * forward_cpu_s, "fwd_bwd_cpu_ms": 1e3 * backward_cpu_s,
            "max_rel_err_vs_recurrent_f32": float(np.max(np.abs(output - reference)) / np.max(np.abs(reference))),
        })  # fmt: skip

    shape = f"B={args.batch} T={args.tokens} Hk={args.key_heads} Hv={args.value_heads} D={args.head_dim} {args.dtype}"
    machine = f"jax {jax.__version__} on {jax.devices()[0].device_kind}; host {cpu_name()}, {os.cpu_count()} CPUs"
    print(f"\n{shape}; {machine}; median of {args.repeats} interleaved rounds; load average {os.getloadavg()[0]:.1f}\n")
    print("| implementation | device | fwd ms | fwd tokens/s | fwd GFLOP/s | fwd+bwd ms | fwd+bwd tokens/s "
          "| fwd+bwd GFLOP/s | fwd CPU ms | fwd+bwd CPU ms | max rel err |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['implementation']} | {r['device']} | {r['forward_ms']:.1f} | {r['forward_tokens_per_s']:,.0f} "
            f"| {r['forward_gflop_per_s']:.2f} | {r['fwd_bwd_ms']:.1f} | {r['fwd_bwd_tokens_per_s']:,.0f} "
            f"| {r['fwd_bwd_gflop_per_s']:.2f} | {r['forward_cpu_ms']:.1f} | {r['fwd_bwd_cpu_ms']:.1f} "
            f"| {r['max_rel_err_vs_recurrent_f32']:.1e} |"
        )
    ours = results[0]  # chunked
    print()
    for r in results[1:]:
        print(
            f"{r['implementation']} / chunked: wall time forward {r['forward_ms'] / ours['forward_ms']:.2f}x, "
            f"fwd+bwd {r['fwd_bwd_ms'] / ours['fwd_bwd_ms']:.2f}x; CPU time forward "
            f"{r['forward_cpu_ms'] / ours['forward_cpu_ms']:.2f}x, fwd+bwd {r['fwd_bwd_cpu_ms'] / ours['fwd_bwd_cpu_ms']:.2f}x"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"shape": shape, "machine": machine, "args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
