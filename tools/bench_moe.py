"""Tokens/s of one sparse MoE layer (router, routed experts, shared expert), per backend.

    .venv/bin/python tools/bench_moe.py [--tokens 2048 --hidden 512 --experts 64 --top-k 8 --width 256]

Times `SparseMoeBlock` forward and forward+backward (gradients of all parameters and the input) in
float32: `dense` and `ragged` on one device; `expert_parallel` on a mesh with every device on the
expert axis, dropless and with a capacity factor. On a CPU the host is split into 8 fake devices
(set below, before jax is imported), which share its cores. Median of `--repeats` timed runs after
a warm-up run; prints a markdown table and, with `--out`, writes the rows as JSON.
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
from flax import nnx

from slimqwen_jax import sharding
from slimqwen_jax.config import tiny
from slimqwen_jax.moe import SparseMoeBlock


def timed(fn, args, repeats: int) -> float:
    """Median seconds of `repeats` runs after one warm-up (compilation) run."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_backend(cfg, x, mesh, repeats: int) -> tuple[float, float]:
    """(forward seconds, forward+backward seconds) of one SparseMoeBlock built from `cfg`."""
    graphdef, state = nnx.split(SparseMoeBlock(cfg, rngs=nnx.Rngs(0)))
    if mesh is not None:
        state = jax.device_put(state, sharding.state_shardings(state, mesh))
        x = jax.device_put(x, sharding.batch_sharding(mesh, 3))

    def forward(state, x):
        return nnx.merge(graphdef, state)(x)[0]

    def loss(state, x):
        return jnp.sum(jnp.square(forward(state, x)))

    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        fwd = timed(jax.jit(forward), (state, x), repeats)
        bwd = timed(jax.jit(jax.grad(loss, argnums=(0, 1))), (state, x), repeats)
    return fwd, bwd


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per step, one sequence per device")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--width", type=int, default=256, help="expert and shared-expert width")
    parser.add_argument("--capacity-factor", type=float, default=1.25)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="", help="write the results as JSON here")
    args = parser.parse_args()

    cfg = tiny(
        hidden_size=args.hidden, num_experts=args.experts, num_experts_per_tok=args.top_k,
        moe_intermediate_size=args.width, shared_expert_intermediate_size=args.width,
    )  # fmt: skip
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "expert": -1})
    batch = mesh.size  # one sequence per device
    if args.tokens % batch:
        parser.error(f"--tokens must be a multiple of the device count ({batch})")
    x = jax.random.normal(jax.random.key(0), (batch, args.tokens // batch, args.hidden), jnp.float32)  # [B, T, D]
    experts_on = f"expert={mesh.shape['expert']}"
    runs = [
        ("dense", "1 device", cfg.replace(moe_backend="dense"), None),
        ("ragged", "1 device", cfg.replace(moe_backend="ragged"), None),
        ("expert_parallel, dropless", experts_on, cfg.replace(moe_backend="expert_parallel"), mesh),
        (f"expert_parallel, capacity {args.capacity_factor}", experts_on,
         cfg.replace(moe_backend="expert_parallel", moe_capacity_factor=args.capacity_factor), mesh),
    ]  # fmt: skip

    device = jax.devices()[0]
    print(f"SparseMoeBlock: {args.tokens} tokens, D={args.hidden}, E={args.experts}, top-{args.top_k}, "
          f"expert and shared width {args.width}, float32; {len(jax.devices())} x {device.device_kind} "
          f"({os.cpu_count()} host cores); median of {args.repeats} runs\n")  # fmt: skip
    print("| backend | devices | forward tokens/s | forward+backward tokens/s |")
    print("|---|---|---:|---:|")
    rows = []
    for name, devices, run_cfg, run_mesh in runs:
        fwd, bwd = bench_backend(run_cfg, x, run_mesh, args.repeats)
        rows.append({"backend": name, "devices": devices, "forward_tokens_per_s": args.tokens / fwd,
                     "forward_backward_tokens_per_s": args.tokens / bwd})  # fmt: skip
        print(f"| {name} | {devices} | {args.tokens / fwd:,.0f} | {args.tokens / bwd:,.0f} |", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "device": device.device_kind, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
