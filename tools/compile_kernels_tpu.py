"""Compile the Pallas kernels for TPU v5e, v5p and v6e on a CPU host and tabulate VMEM, FLOPs and bytes.

libtpu gives compile-only TPU devices (`jax.experimental.topologies`): `jit(...).lower(...).compile()`
runs the real TPU compiler, Mosaic included, without a chip. Each (kernel, chip) compiles in its own
subprocess, since a compiler crash aborts the process; the parent prints a markdown table.

Kernels (production shapes: Qwen3-Next linear attention, Hk = 16 / Hv = 32 heads of 128, chunk 64,
bfloat16; SlimQwen-23A2B and Qwen3-Next-80B experts, `--tokens` tokens per device times top-k rows):
  gdr_forward, gdr_forward_backward  `gated_delta_rule(..., implementation="pallas", platform="tpu")`,
      q / k L2-normalised as the model does; value_and_grad runs forward, the recomputing forward
      and the backward kernel
  gdr_decode                         `gated_delta_rule_step`, one token, batch 8
  gdr_tiny_forward_backward          tiny test-model heads (Hk 2, Hv 4, Dk 16, Dv 32, T 256),
      zero-padded to the 128 lanes inside the op
  gmm_{forward,grad}_{23a2b,80b}     `moe.expert_ffn_gmm` (megablox gmm; its grad adds the
      transposed-RHS gmm and tgmm)

Columns: compile seconds (the subprocess's `.compile()` call); VMEM: bytes of the
`used_scoped_memory_configs` (memory space 1, VMEM) that the compiler writes into each Mosaic
custom call's backend config, per TensorCore, the largest over the program's Pallas calls (each
listed in --json); FLOPs and bytes accessed: the compiled program's `cost_analysis()` (Pallas
calls count through their `CostEstimate`); estimated time: max(FLOPs / peak bf16, bytes / HBM
bandwidth), the chip's numbers from `pltpu.get_tpu_info_for_chip` (per device: both TensorCores
of a v5p megacore).

Usage:
    .venv/bin/python tools/compile_kernels_tpu.py [--chips v5e v5p v6e] [--kernels gdr_forward ...]
        [--tokens 4096] [--batch 1] [--json results.json]
    .venv/bin/python tools/compile_kernels_tpu.py --one KERNEL CHIP [--tokens ...]  # one JSON line
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import argparse
import json
import math
import re
import subprocess
import time

import jax
import jax.numpy as jnp

from slimqwen_jax import compile_plan, hlo_stats

TOPOLOGIES = {"v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2"}
CHIP_VERSIONS = {"v5e": "TPU_V5E", "v5p": "TPU_V5P", "v6e": "TPU_V6E"}
VMEM_SPACE = "1"  # memory space of VMEM in the TPU backend config
_SCOPED = re.compile(r'"used_scoped_memory_configs":\[([^\]]*)\]')
_SIZE = re.compile(r'"memory_space":"(\d+)","offset":"\d+","size":"(\d+)"')
_ARRAY = re.compile(r"\b(pred|[a-z]+\d+)\[([\d,]*)\]\{([^}]*)\}")


# ---------------------------------------------------------------- the kernels' programs


def _gdr_args(spec, b: int, t: int, hk: int, hv: int, dk: int, dv: int, *, decode: bool = False):
    """q, k [B, T, Hk, Dk], v [B, T, Hv, Dv] bfloat16, g [B, T, Hv] float32, beta bfloat16 (T dropped
    for decode, which also takes the state [B, Hv, Dk, Dv] float32)."""
    lead = (b,) if decode else (b, t)
    args = [
        spec((*lead, hk, dk), jnp.bfloat16),
        spec((*lead, hk, dk), jnp.bfloat16),
        spec((*lead, hv, dv), jnp.bfloat16),
        spec((*lead, hv), jnp.float32),
        spec((*lead, hv), jnp.bfloat16),
    ]
    return args + [spec((b, hv, dk, dv), jnp.float32)] if decode else args


def _gdr_forward(q, k, v, g, beta):
    from pallas_kernels.gated_delta_rule import gated_delta_rule

    o, _ = gated_delta_rule(q, k, v, g, beta, use_qk_l2norm=True, implementation="pallas", platform="tpu")
    return o


def _gdr_loss(*args):
    return jnp.sum(_gdr_forward(*args).astype(jnp.float32))


def _gdr_decode(*args):
    from pallas_kernels.gated_delta_rule import gated_delta_rule_step

    return gated_delta_rule_step(*args, use_qk_l2norm=True, platform="tpu")


def _gmm_args(spec, rows: int, d: int, f: int, e: int):
    """rows [M, D] bfloat16, their experts [M] int32, gate / up [E, D, F], down [E, F, D] bfloat16."""
    return [
        spec((rows, d), jnp.bfloat16),
        spec((rows,), jnp.int32),
        spec((e, d, f), jnp.bfloat16),
        spec((e, d, f), jnp.bfloat16),
        spec((e, f, d), jnp.bfloat16),
    ]


def _gmm_forward(*args):
    from slimqwen_jax.moe import expert_ffn_gmm

    return expert_ffn_gmm(*args)


def _gmm_loss(rows, experts, gate, up, down):
    return jnp.sum(_gmm_forward(rows, experts, gate, up, down).astype(jnp.float32))


_GMM_SHAPES = {"23a2b": (1536, 512, 256, 8), "80b": (2048, 512, 512, 10)}  # D, F, experts, top-k


def program(kernel: str, spec, tokens: int, batch: int):
    """(function, argument specs, shape summary) of a kernel name; `spec(shape, dtype)` makes an argument."""
    if kernel.startswith("gmm_"):
        _, mode, model = kernel.split("_")
        d, f, e, top_k = _GMM_SHAPES[model]
        rows = tokens * top_k
        fn = _gmm_forward if mode == "forward" else jax.value_and_grad(_gmm_loss, argnums=(0, 2, 3, 4))
        return fn, _gmm_args(spec, rows, d, f, e), f"M={rows} D={d} F={f} E={e}"
    if kernel == "gdr_decode":
        return _gdr_decode, _gdr_args(spec, 8, 1, 16, 32, 128, 128, decode=True), "B=8 Hk=16 Hv=32 Dk=Dv=128"
    t, hk, hv, dk, dv = (256, 2, 4, 16, 32) if kernel == "gdr_tiny_forward_backward" else (tokens, 16, 32, 128, 128)
    fn = _gdr_forward if kernel == "gdr_forward" else jax.value_and_grad(_gdr_loss, argnums=range(5))
    return fn, _gdr_args(spec, batch, t, hk, hv, dk, dv), f"B={batch} T={t} Hk={hk} Hv={hv} Dk={dk} Dv={dv} C=64"


KERNELS = (
    "gdr_forward",
    "gdr_forward_backward",
    "gdr_decode",
    "gdr_tiny_forward_backward",
    "gmm_forward_23a2b",
    "gmm_grad_23a2b",
    "gmm_forward_80b",
    "gmm_grad_80b",
)


# ---------------------------------------------------------------- one compile (in the subprocess)


def _vmem_resident_bytes(types: str) -> int:
    """Bytes of the arrays in an HLO type string whose layout puts them in VMEM (memory space S(1))."""
    total = 0
    for dtype, dims, layout in _ARRAY.findall(types):
        if "S(1)" in layout:
            total += math.prod(int(n) for n in dims.split(",") if n) * hlo_stats.DTYPE_BYTES[dtype]
    return total


def pallas_vmem(hlo_text: str) -> list[dict]:
    """Each Mosaic custom call of a compiled program's HLO text: its instruction name, the scoped VMEM
    the compiler allocated for it (`used_scoped_memory_configs`, memory space 1: pipeline buffers,
    scratch, Mosaic's internal scratch) and the bytes of its operands and results that XLA's
    memory-space assignment placed in VMEM (layout S(1); unpadded sizes)."""
    computations, _ = hlo_stats.parse(hlo_text)
    instructions = [i for body in computations.values() for i in body]
    types = {name: shape for name, shape, _, _ in instructions}  # instruction name -> its HLO type
    calls = []
    for name, result_type, opcode, rest in instructions:
        if opcode != "custom-call" or 'custom_call_target="tpu_custom_call"' not in rest:
            continue
        operands = re.findall(r"%([\w.\-]+)", rest[: rest.index("custom_call_target")])
        scoped = sum(int(size) for space, size in _SIZE.findall(_SCOPED.search(rest).group(1)) if space == VMEM_SPACE)
        resident = _vmem_resident_bytes(result_type) + sum(_vmem_resident_bytes(types.get(o, "")) for o in operands)
        calls.append({"name": name, "scoped_vmem_bytes": scoped, "resident_vmem_bytes": resident})
    return calls


def chip_info(chip: str, device):
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.get_tpu_info_for_chip(getattr(pltpu.ChipVersion, CHIP_VERSIONS[chip]), device.num_cores)


def compile_one(kernel: str, chip: str, tokens: int, batch: int) -> dict:
    """Compile `kernel` for one device of `chip`; the row of the table as a dict."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    device = compile_plan.topology_devices(compile_plan.parse_topology(TOPOLOGIES[chip]))[0]
    sharding = NamedSharding(Mesh([device], ("x",)), PartitionSpec())
    fn, args, shapes = program(
        kernel, lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding), tokens, batch
    )
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    seconds = time.perf_counter() - start
    cost = compiled.cost_analysis()
    info = chip_info(chip, device)
    peak_flops, bandwidth = info.bf16_ops_per_second * info.num_cores, info.mem_bw_bytes_per_second * info.num_cores
    flops, bytes_accessed = cost.get("flops", 0.0), cost.get("bytes accessed", 0.0)
    calls = pallas_vmem(compiled.as_text())
    return {
        "kernel": kernel,
        "chip": chip,
        "shapes": shapes,
        "ok": True,
        "reason": "",
        "compile_s": seconds,
        "pallas_calls": calls,
        "vmem_bytes": max((c["scoped_vmem_bytes"] for c in calls), default=0),
        "resident_vmem_bytes": max((c["resident_vmem_bytes"] for c in calls), default=0),
        "vmem_capacity_bytes": info.vmem_capacity_bytes,
        "flops": flops,
        "bytes_accessed": bytes_accessed,
        "estimated_s": max(flops / peak_flops, bytes_accessed / bandwidth),
    }


# ---------------------------------------------------------------- the table (in the parent)


def run_in_subprocess(kernel: str, chip: str, tokens: int, batch: int, timeout: float = 600) -> dict:
    """`compile_one` in a fresh interpreter (libtpu loaded for its compiler only,
    `compile_plan.compiling_environment`), so that a compiler abort fails only its own row."""
    command = [sys.executable, os.path.abspath(__file__), "--one", kernel, chip, "--tokens", str(tokens)]
    command += ["--batch", str(batch)]
    env = compile_plan.compiling_environment(compile_plan.parse_topology(TOPOLOGIES[chip]))
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    if result.returncode == 0:
        return json.loads(result.stdout.strip().splitlines()[-1])
    return {"kernel": kernel, "chip": chip, "ok": False, "reason": f"rc {result.returncode}: {compile_plan.failure_line(result.stderr)}"}


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def markdown_table(rows: list[dict]) -> str:
    """The rows as a markdown table; VMEM is the largest Pallas call's, as a share of the chip's."""
    header = (
        "| kernel | chip | shapes | compile s | result | scoped VMEM (of the chip's) | operands in VMEM "
        "| Pallas calls | GFLOP | GB accessed | est. time at peak |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        if not r["ok"]:
            lines.append(f"| {r['kernel']} | {r['chip']} | | | failed: {r['reason']} | | | | | | |")
            continue
        share = 100 * r["vmem_bytes"] / r["vmem_capacity_bytes"]
        lines.append(
            f"| {r['kernel']} | {r['chip']} | {r['shapes']} | {r['compile_s']:.1f} | ok "
            f"| {_mib(r['vmem_bytes'])} ({share:.1f}% of {_mib(r['vmem_capacity_bytes'])}) "
            f"| {_mib(r['resident_vmem_bytes'])} | {len(r['pallas_calls'])} | {r['flops'] / 1e9:.1f} "
            f"| {r['bytes_accessed'] / 1e9:.3f} | {r['estimated_s'] * 1e3:.3f} ms |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--one", nargs=2, metavar=("KERNEL", "CHIP"), help="compile one, print its JSON row")
    parser.add_argument("--chips", nargs="+", default=list(TOPOLOGIES), choices=list(TOPOLOGIES))
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=list(KERNELS))
    parser.add_argument("--tokens", type=int, default=4096, help="T of the delta rule; tokens per device of gmm")
    parser.add_argument("--batch", type=int, default=1, help="B of the delta rule")
    parser.add_argument("--json", help="also write the rows (with every Pallas call's VMEM) here")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(compile_one(*args.one, args.tokens, args.batch)))
        return
    rows = []
    for kernel in args.kernels:
        for chip in args.chips:
            rows.append(run_in_subprocess(kernel, chip, args.tokens, args.batch))
            print(f"{kernel} {chip}: {'ok' if rows[-1]['ok'] else rows[-1]['reason']}", file=sys.stderr, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
