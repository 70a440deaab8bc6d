"""One sparse MoE layer (router, routed experts, shared expert) per backend, beside HF transformers' torch block.

    .venv/bin/python tools/bench_moe.py [--tokens 4096 --hidden 256 --experts 16 --top-k 2 --width 256]

Times `SparseMoeBlock` forward and forward+backward (gradients of all parameters and the input) in
float32: `dense`, `ragged`, `grouped` and `expert_parallel` on one device, then `expert_parallel` on a
mesh with every device on the expert axis (dropless and with a capacity factor; on a CPU the host is
split into 8 fake devices, set below before jax is imported, which share its cores), and HF's
`Qwen3NextSparseMoeBlock` holding the same weights (`torch.set_num_threads(--torch-threads)`) with
its `eager` experts loop and, where torch has it, `grouped_mm` (what a HF model picks by default).
`gmm` (TPU) is left out off TPU: there it would run in Pallas' interpreter. Median of `--repeats`
timed runs after a warm-up run; prints a markdown table with milliseconds and the achieved GFLOP/s
of the routed expert work (6 N K D F forward, three times that forward+backward; router and shared
expert not counted) and, with `--out`, writes the rows as JSON.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import argparse
import contextlib
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from slimqwen_jax import sharding
from slimqwen_jax.config import tiny
from slimqwen_jax.moe import SparseMoeBlock
from slimqwen_jax.testing import max_relative_error


def timed(fn, repeats: int) -> float:
    """Median seconds of `repeats` runs of `fn()` (which waits for its result) after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_backend(block, x, mesh, repeats: int) -> tuple[float, float, np.ndarray]:
    """(forward seconds, forward+backward seconds, output) of `block` on x [B, T, D]."""
    graphdef, state = nnx.split(block)
    if mesh is not None:
        state = jax.device_put(state, sharding.state_shardings(state, mesh))
        x = jax.device_put(x, sharding.batch_sharding(mesh, 3))

    def forward(state, x):
        return nnx.merge(graphdef, state)(x)[0]

    def loss(state, x):
        return jnp.sum(jnp.square(forward(state, x)))

    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        fwd, grad = jax.jit(forward), jax.jit(jax.grad(loss, argnums=(0, 1)))
        fwd_s = timed(lambda: jax.block_until_ready(fwd(state, x)), repeats)
        bwd_s = timed(lambda: jax.block_until_ready(grad(state, x)), repeats)
        return fwd_s, bwd_s, np.asarray(fwd(state, x))


def hf_block(block: SparseMoeBlock, cfg, experts_implementation: str):
    """transformers' Qwen3NextSparseMoeBlock holding `block`'s weights (kernels [in, out] -> torch [out, in])."""
    import torch
    from transformers import Qwen3NextConfig
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextSparseMoeBlock

    hf_cfg = Qwen3NextConfig(
        hidden_size=cfg.hidden_size, num_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok,
        moe_intermediate_size=cfg.moe_intermediate_size, norm_topk_prob=cfg.norm_topk_prob,
        shared_expert_intermediate_size=cfg.shared_expert_intermediate_size,
    )  # fmt: skip
    hf_cfg._experts_implementation = experts_implementation
    hf = Qwen3NextSparseMoeBlock(hf_cfg)
    t = lambda a: torch.tensor(np.asarray(a[...]))  # noqa: E731
    e = block.experts
    weights = {
        "gate.weight": t(block.gate.kernel).T,
        "experts.gate_up_proj": torch.cat([t(e.gate_proj), t(e.up_proj)], dim=2).transpose(1, 2),  # [E, 2F, D]
        "experts.down_proj": t(e.down_proj).transpose(1, 2),  # [E, D, F]
        "shared_expert_gate.weight": t(block.shared_expert_gate.kernel).T,
    }  # fmt: skip
    for proj in ("gate_proj", "up_proj", "down_proj"):
        weights[f"shared_expert.{proj}.weight"] = t(getattr(block.shared_expert, proj).kernel).T
    hf.load_state_dict({k: v.contiguous() for k, v in weights.items()}, strict=True)
    return hf


def bench_hf(hf, x: np.ndarray, repeats: int) -> tuple[float, float, np.ndarray]:
    """(forward seconds, forward+backward seconds, output) of the torch block on x [B, T, D]."""
    import torch

    xt = torch.from_numpy(x).requires_grad_(True)

    def forward():
        with torch.no_grad():
            return hf(xt)

    def forward_backward():
        hf.zero_grad(set_to_none=True)
        xt.grad = None
        torch.sum(torch.square(hf(xt))).backward()

    return timed(forward, repeats), timed(forward_backward, repeats), forward().numpy()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per step (8 sequences)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--width", type=int, default=256, help="expert and shared-expert width")
    parser.add_argument("--capacity-factor", type=float, default=1.25)
    parser.add_argument("--torch-threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip", default="", help="comma-separated row names to leave out, e.g. dense,ragged")
    parser.add_argument("--out", default="", help="write the results as JSON here")
    args = parser.parse_args()

    cfg = tiny(
        hidden_size=args.hidden, num_experts=args.experts, num_experts_per_tok=args.top_k,
        moe_intermediate_size=args.width, shared_expert_intermediate_size=args.width,
    )  # fmt: skip
    one_device = sharding.make_mesh({"data": 1, "fsdp": 1, "expert": 1}, devices=jax.devices()[:1])
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "expert": -1})
    batch = 8
    if args.tokens % batch:
        parser.error(f"--tokens must be a multiple of {batch} (sequences)")
    x = jax.random.normal(jax.random.key(0), (batch, args.tokens // batch, args.hidden), jnp.float32)  # [B, T, D]
    experts_on = f"expert={mesh.shape['expert']}"
    runs = [
        ("dense", "1 device", cfg.replace(moe_backend="dense"), None),
        ("ragged", "1 device", cfg.replace(moe_backend="ragged"), None),
        ("grouped", "1 device", cfg.replace(moe_backend="grouped"), None),
        ("expert_parallel", "expert=1", cfg.replace(moe_backend="expert_parallel"), one_device),
        ("expert_parallel, dropless", experts_on, cfg.replace(moe_backend="expert_parallel"), mesh),
        (f"expert_parallel, capacity {args.capacity_factor}", experts_on,
         cfg.replace(moe_backend="expert_parallel", moe_capacity_factor=args.capacity_factor), mesh),
    ]  # fmt: skip
    if jax.default_backend() == "tpu":
        runs.insert(3, ("gmm", "1 device", cfg.replace(moe_backend="gmm"), None))
    skip = set(filter(None, args.skip.split(",")))

    routed_flops = 6 * args.tokens * args.top_k * args.hidden * args.width  # forward; backward twice that
    device = jax.devices()[0]
    print(f"SparseMoeBlock: {args.tokens} tokens, D={args.hidden}, E={args.experts}, top-{args.top_k}, "
          f"expert and shared width {args.width}, float32; {len(jax.devices())} x {device.device_kind} "
          f"({os.cpu_count()} host cores); median of {args.repeats} runs; GFLOP/s of the routed expert work; "
          "error: max relative difference of the output from the first row's\n")  # fmt: skip
    print("| backend | devices | forward ms | forward GFLOP/s | fwd+bwd ms | fwd+bwd GFLOP/s | error |")
    print("|---|---|---:|---:|---:|---:|---:|")
    rows, reference = [], None

    def report(name, devices, fwd, bwd, out):
        nonlocal reference
        reference = out if reference is None else reference
        row = {"backend": name, "devices": devices, "forward_ms": 1e3 * fwd, "forward_backward_ms": 1e3 * bwd,
               "forward_gflops": routed_flops / fwd / 1e9, "forward_backward_gflops": 3 * routed_flops / bwd / 1e9,
               "max_relative_error": max_relative_error(out, reference)}  # fmt: skip
        rows.append(row)
        print(f"| {name} | {devices} | {row['forward_ms']:,.1f} | {row['forward_gflops']:.1f} | "
              f"{row['forward_backward_ms']:,.1f} | {row['forward_backward_gflops']:.1f} | "
              f"{row['max_relative_error']:.1e} |", flush=True)  # fmt: skip

    for name, devices, run_cfg, run_mesh in runs:
        if name.split(",")[0] not in skip:
            report(name, devices, *bench_backend(SparseMoeBlock(run_cfg, rngs=nnx.Rngs(0)), x, run_mesh, args.repeats))

    import torch
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    torch.set_num_threads(args.torch_threads)
    block = SparseMoeBlock(cfg, rngs=nnx.Rngs(0))
    for implementation in ("eager", "grouped_mm"):
        if implementation != "eager" and implementation not in ALL_EXPERTS_FUNCTIONS:
            continue
        with torch.no_grad():
            hf = hf_block(block, cfg, implementation)
        devices = f"torch, {args.torch_threads} threads"
        report(f"HF torch ({implementation})", devices, *bench_hf(hf, np.asarray(x), args.repeats))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "device": device.device_kind, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
