"""Compile each stage's real train step for a TPU topology from any host, before a pod is booked.

    python -m slimqwen_jax.train --config configs/slimqwen_23a2b.py --config.dry_run=True \\
        --config.compile_topology=v5p-256 [--config.compile_mfu=0.4]

With libtpu installed (`pip install .[tpu]`), `jax.experimental.topologies` gives compile-only
devices of any TPU slice, and the TPU compiler runs on this host. For each stage of the plan the
step the trainer runs (`stage_functions.build`: student and frozen teacher, the objective with
MTP-KD, the config's MoE backend and kernels, the stacked layout, the mesh, gradient accumulation)
is built for the TPU (`platforms.compiling_for`) from abstract inputs and compiled. Reported per
chip:
- memory: the TPU compiler's own account of the program's HBM use (its log's "Total hbm usage":
  reserved + program + arguments, outputs sharing the donated arguments' buffers) against the
  chip's HBM: fits, or short by how much (a program that cannot fit fails to compile with
  RESOURCE_EXHAUSTED: the row says so); beside it XLA's buffer assignment (`memory_analysis()`):
  arguments, temporaries, outputs not aliased to arguments, generated code, and their sum, which
  counts the temporaries before the TPU backend places them again (an upper bound: docs/tpu.md);
- model FLOPs per step (`training_flops`: student forward + backward, teacher forward);
- bytes moved by collectives per step (`hlo_stats.collective_bytes`, loop bodies counted as often
  as they run);
- the step time at the chip's peak and at the stated MFU (`compile_mfu`), and the stage's duration
  at that MFU.

Each stage compiles in its own process: a compiler abort (a crash, not an exception) becomes one
line naming the stage and the op, and the run exits 1.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import pickle
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections

from slimqwen_jax import hlo_stats, optimizer, platforms, sharding, stacking, stage_functions, stage_plan, storage
from slimqwen_jax.compression import count_parameters
from slimqwen_jax.config import FULL_ATTENTION, ConfigError, Qwen3NextConfig
from slimqwen_jax.model import abstract_model
from slimqwen_jax.stage_functions import MtpUse
from slimqwen_jax.train_state import abstract_state

GiB = 2**30


# ---------------------------------------------------------------------------- chips and topologies
@dataclasses.dataclass(frozen=True)
class Chip:
    """A TPU generation: HBM per chip, peak dense bfloat16 FLOP/s, HBM bandwidth, the rank of its
    torus, and the TensorCores one name counts per chip (v4 and v5p slices are named by cores)."""

    name: str
    cloud_name: str  # in Cloud TPU's accelerator types: v5litepod-256
    hbm_bytes: int
    peak_flops: float
    hbm_bytes_per_second: float
    torus_rank: int
    cores_per_chip: int


# Google Cloud's published per-chip figures (cloud.google.com/tpu/docs: v4, v5e, v5p, v6e).
CHIPS = {
    "v4": Chip("v4", "v4", 32 * GiB, 275e12, 1.2e12, 3, 2),
    "v5e": Chip("v5e", "v5litepod", 16 * GiB, 197e12, 0.819e12, 2, 1),
    "v5p": Chip("v5p", "v5p", 95 * GiB, 459e12, 2.765e12, 3, 2),
    "v6e": Chip("v6e", "v6e", 32 * GiB, 918e12, 1.64e12, 2, 1),
}
_BY_CLOUD_NAME = {chip.cloud_name: chip for chip in CHIPS.values()}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice: its chip and the shape of its torus in chips."""

    chip: Chip
    shape: tuple[int, ...]

    @property
    def name(self) -> str:
        """As `jax.experimental.topologies.get_topology_desc` takes it: 'v5p:4x4x8'."""
        return f"{self.chip.name}:{'x'.join(map(str, self.shape))}"

    @property
    def num_chips(self) -> int:
        return math.prod(self.shape)

    @property
    def accelerator_type(self) -> str:
        """Cloud TPU's name of the slice: 'v5litepod-256', 'v5p-256' (TensorCores), 'v6e-256'."""
        return f"{self.chip.cloud_name}-{self.num_chips * self.chip.cores_per_chip}"


def slice_shape(num_chips: int, rank: int) -> tuple[int, ...]:
    """The torus of a `num_chips` (a power of two) slice as Cloud TPU builds it: the doublings spread
    over the axes, smallest axes first (v5e-256 -> 16x16, v5p-256 -> 4x4x8, v5p-8 -> 2x2x1)."""
    shape = [1] * rank
    for i in range(num_chips.bit_length() - 1):
        shape[i % rank] *= 2
    return tuple(sorted(shape)) if shape[-1] > 1 else tuple(shape)


def parse_topology(text: str) -> Topology:
    """'v5e-256' or 'v5litepod-256' (Cloud TPU's accelerator type: chips, or TensorCores on v4 /
    v5p) or 'v5p:4x8x8' (the torus in chips). Raises ConfigError for anything else."""
    match = re.fullmatch(r"(v\w+?)(?:-(\d+)|:(\d+(?:x\d+)*))", text.strip())
    chip = (CHIPS.get(match.group(1)) or _BY_CLOUD_NAME.get(match.group(1))) if match else None
    if chip is None:
        raise ConfigError(
            f"compile_topology {text!r}: expected <chip>-<size> or <chip>:<AxB[xC]> with a chip of {sorted(CHIPS)}, "
            "e.g. v5e-256, v5p-256, v6e-256, v5p:4x8x8"
        )
    if match.group(3):
        shape = tuple(int(n) for n in match.group(3).split("x"))
        if len(shape) != chip.torus_rank or min(shape) < 1:
            raise ConfigError(f"compile_topology {text!r}: a {chip.name} torus has {chip.torus_rank} positive axes")
        return Topology(chip, shape)
    size = int(match.group(2))
    num_chips, remainder = divmod(size, chip.cores_per_chip)
    if remainder or num_chips < 1 or num_chips & (num_chips - 1):
        raise ConfigError(
            f"compile_topology {text!r}: {chip.name}-N needs N = {chip.cores_per_chip} x a power of two "
            f"({'TensorCores' if chip.cores_per_chip > 1 else 'chips'})"
        )
    return Topology(chip, slice_shape(num_chips, chip.torus_rank))


def topology_devices(topology: Topology) -> list:
    """Compile-only devices of `topology` (libtpu's topology description; no TPU needed). Call it
    in a process of its own (`compiling_environment`), never beside a TPU backend in use."""
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(topology.name, "tpu").devices)
    except Exception as error:  # noqa: BLE001 - libtpu missing, or a slice it does not know
        raise ConfigError(
            f"compile_topology {topology.name}: no TPU compiler ({type(error).__name__}: {str(error).splitlines()[0]}); "
            "install it with `pip install .[tpu]` (libtpu, pinned to the jax version)"
        ) from error


def on_topology(config: ml_collections.ConfigDict, topology: Topology) -> ml_collections.ConfigDict:
    """`config` with its mesh sized for `topology`'s chips (a -1 resolved), checked: the mesh fits the
    slice, and each micro-batch splits evenly over the mesh's batch shards. Raises MeshError /
    ConfigError."""
    sizes = dict(zip(sharding.MESH_AXES, sharding.mesh_sizes(config.mesh, topology.num_chips)))
    batch_shards = math.prod(sizes[a] for a in sharding.LOGICAL_RULES["batch"])
    micro_batch = config.train.global_batch_size // config.train.grad_accum_steps
    if micro_batch % batch_shards:
        raise ConfigError(
            f"{topology.name}: a micro-batch of {micro_batch} sequences (train.global_batch_size / grad_accum_steps) "
            f"does not split over the mesh's {batch_shards} batch shards {sizes}"
        )
    config = copy.deepcopy(config)
    with config.unlocked():
        config.mesh.update(sizes)
    return config


# ---------------------------------------------------------------------------- FLOPs
def forward_flops_per_token(cfg: Qwen3NextConfig, seq_len: int, *, with_mtp: bool = False) -> float:
    """Forward FLOPs per token: 2 x the active matmul parameters (attention and linear-attention
    projections, the routed top-k experts, shared expert and router, the LM head; not the embedding
    lookup; the MTP module's with `with_mtp`), plus full attention's scores and values (2 x 2 x H x Dh
    x T / 2 per layer, causal), plus the gated delta rule's state reads and writes (2 x 3 x Hv x Dk x
    Dv per layer)."""
    count = count_parameters(cfg)
    matmul_params = count.active - cfg.vocab_size * cfg.hidden_size + (count.mtp_active if with_mtp else 0)
    full_layers = sum(kind == FULL_ATTENTION for kind in cfg.layer_types)
    linear_layers = cfg.num_hidden_layers - full_layers
    attention = full_layers * 2 * cfg.num_attention_heads * cfg.head_dim * seq_len / 2
    delta_rule = linear_layers * 3 * cfg.linear_num_value_heads * cfg.linear_key_head_dim * cfg.linear_value_head_dim
    return 2 * (matmul_params + attention + delta_rule)


def training_flops(student: Qwen3NextConfig, teacher: Qwen3NextConfig | None, mtp: MtpUse, tokens: int,
                   seq_len: int) -> float:  # fmt: skip
    """Model FLOPs of one train step over `tokens`: 3 x the student's forward (forward + backward;
    a recomputed forward under `remat_policy` is not model FLOPs), 1 x the teacher's."""
    flops = 3 * forward_flops_per_token(student, seq_len, with_mtp=mtp.student)
    if teacher is not None:
        flops += forward_flops_per_token(teacher, seq_len, with_mtp=mtp.teacher)
    return flops * tokens


# ---------------------------------------------------------------------------- one stage
@dataclasses.dataclass(frozen=True)
class StageRequest:
    """What a stage's compile needs (picklable: it crosses into the compiling process)."""

    config: ml_collections.ConfigDict
    stages: tuple[stage_plan.Stage, ...]
    index: int
    teacher: Qwen3NextConfig | None
    mtp: MtpUse
    topology: Topology


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _stacked(layout: stacking.Layout, params, shardings):
    """Abstract `layout.stack(params)` placed as `layout.stack_shardings(shardings)`."""
    return _abstract(jax.eval_shape(layout.stack, params), layout.stack_shardings(shardings))


def lower_train_step(request: StageRequest, mesh: jax.sharding.Mesh) -> jax.stages.Lowered:
    """The stage's train step (`stage_functions.build`, as the trainer builds it) lowered for the
    TPU from abstract inputs: parameters, Adam moments and teacher in the stacked layout, sharded
    over `mesh` (of the topology's devices), and a global token batch [B, L + 1]."""
    config, stage, stages = request.config, request.stages[request.index], request.stages
    rewarmups = [(s.start_step, s.warmup_steps) for s in stages if s.warmup_steps]
    tx, _ = optimizer.make_optimizer(config.optimizer, stages[-1].end_step, rewarmups)
    with platforms.compiling_for("tpu"):
        shapes = abstract_state(stage.architecture, tx, mesh)
        layout = stacking.layout_for(shapes.params, stage.architecture.scan_layers)
        params = _stacked(layout, shapes.params, shapes.param_shardings)
        opt_state = _stacked(layout, shapes.opt_state, shapes.opt_shardings)
        teacher_graphdef = teacher_params = teacher_shardings = None
        if request.teacher is not None:
            teacher_graphdef, teacher_state = abstract_model(request.teacher)
            state_shardings = sharding.state_shardings(teacher_state, mesh)
            teacher_layout = stacking.layout_for(teacher_state, request.teacher.scan_layers)
            teacher_params = _stacked(teacher_layout, teacher_state, state_shardings)
            teacher_shardings = teacher_layout.stack_shardings(state_shardings)
        weight_steps = stage_functions.weight_span(config.loss, stages[-1].end_step, stage.start_step, stage.steps)
        fns = stage_functions.build(
            config, stage.architecture, shapes.graphdef, tx, mesh, layout.stack_shardings(shapes.shardings),
            mtp=request.mtp, weight_steps=weight_steps, teacher_graphdef=teacher_graphdef,
            teacher_shardings=teacher_shardings,
        )  # fmt: skip
        tokens = jax.ShapeDtypeStruct(
            (config.train.global_batch_size, config.data.seq_len + 1), jnp.int32, sharding=sharding.batch_sharding(mesh, 2)
        )
        # The loss weights of the stage's first step, as the trainer passes them (`AtStep`), but abstract:
        # nothing may run on the compile-only devices of the context mesh below.
        weights = jax.eval_shape(fns.train_step.loss_weights, stage.start_step)
        with jax.set_mesh(mesh):  # the context mesh of the kernels' shard_maps, as in training
            return fns.train_step.jitted.lower(params, opt_state, teacher_params, tokens, weights)


_RESOURCE_EXHAUSTED = re.compile(r"RESOURCE_EXHAUSTED: (.*)")
_SIZE = re.compile(r"([\d.]+)([KMGT])\b")


def _gib(size: str) -> float:
    value, unit = _SIZE.fullmatch(size).groups()
    return float(value) * 1024.0 ** ("KMGT".index(unit) + 1) / GiB


def out_of_memory(message: str) -> dict | None:
    """The row fields of a compile refused for memory (RESOURCE_EXHAUSTED): its one-line reason and,
    when the compiler states them, the GiB it needed and had; None for any other failure."""
    match = _RESOURCE_EXHAUSTED.search(message)
    if not match:
        return None
    reason = match.group(1).splitlines()[0]
    sizes = [_gib("".join(m)) for m in _SIZE.findall(reason)]
    row = {"fits": False, "reason": reason}
    if len(sizes) >= 2:
        row.update(required_gib=max(sizes[:2]), available_gib=min(sizes[:2]))
    return row


_HBM_USAGE = re.compile(r"Total hbm usage >= ([\d.]+[KMGT]):\s+reserved\s+([\d.]+[KMGT])\s+program\s+([\d.]+[KMGT])"
                        r"\s+arguments\s+([\d.]+[KMGT])")


def compiler_account(log: str) -> dict:
    """The row fields of the TPU compiler's own HBM account, from its log (`compiling_environment`
    turns it on): its total (reserved + program + arguments), program (temporaries after the
    backend's placement, scoped memory, code) and arguments in GiB, of the largest program the log
    accounts for (the train step; a process may compile small helpers too); {} when it has none."""
    accounts = [tuple(_gib(size) for size in match) for match in _HBM_USAGE.findall(log)]
    if not accounts:
        return {}
    total, reserved, program, arguments = max(accounts)
    return {"compiler_total_gib": total, "compiler_reserved_gib": reserved, "compiler_program_gib": program,
            "compiler_arguments_gib": arguments}  # fmt: skip


def compile_stage(request: StageRequest) -> dict:
    """The stage's row of the compile plan (see the module docstring); raises what the compiler
    raises, except that running out of HBM is a row (`fits` False)."""
    config, stage, topology = request.config, request.stages[request.index], request.topology
    mesh = sharding.make_mesh(config.mesh, topology_devices(topology))
    chip, chips = topology.chip, topology.num_chips
    tokens = config.train.global_batch_size * config.data.seq_len
    flops = training_flops(stage.architecture, request.teacher, request.mtp, tokens, config.data.seq_len) / chips
    row = dict(
        stage=stage.name, topology=topology.name, chips=chips, mesh=dict(mesh.shape),
        micro_batch_tokens_per_chip=tokens // config.train.grad_accum_steps // chips,
        remat_policy=stage.architecture.remat_policy, hbm_gib=chip.hbm_bytes / GiB, model_tflops=flops / 1e12,
        step_seconds_at_peak=flops / chip.peak_flops,
        step_seconds_at_mfu=flops / (chip.peak_flops * config.compile_mfu), mfu=config.compile_mfu,
    )  # fmt: skip
    row["stage_days_at_mfu"] = row["step_seconds_at_mfu"] * stage.steps / 86400
    start = time.perf_counter()
    lowered = lower_train_step(request, mesh)
    try:
        compiled = lowered.compile()
    except Exception as error:  # noqa: BLE001 - only running out of memory is a result
        oom = out_of_memory(str(error))
        if oom is None:
            raise
        return {**row, **oom, "compile_seconds": time.perf_counter() - start}
    row["compile_seconds"] = time.perf_counter() - start
    memory = compiled.memory_analysis()
    parts = dict(
        arguments_gib=memory.argument_size_in_bytes, temporaries_gib=memory.temp_size_in_bytes,
        outputs_gib=memory.output_size_in_bytes - memory.alias_size_in_bytes,
        code_gib=memory.generated_code_size_in_bytes,
    )  # fmt: skip
    row.update({name: size / GiB for name, size in parts.items()})
    row["total_gib"] = sum(parts.values()) / GiB
    # By the buffer assignment, an upper bound; compile_stages puts the compiler's own verdict in its
    # place when the compiling process's log has the compiler's account (`compiler_account`).
    row["fits"] = row["total_gib"] <= row["hbm_gib"]
    collectives, unknown_loops = hlo_stats.collective_bytes(compiled.as_text())
    row["collective_gib"] = {kind: size / GiB for kind, size in sorted(collectives.items())}
    row["loops_of_unknown_trip_count"] = unknown_loops
    return row


# ---------------------------------------------------------------------------- every stage, each in its own process
class CompileError(ConfigError):
    """A stage's step does not compile for the topology; the message names the stage and the op."""


COMPILER_LOG = {"TPU_MIN_LOG_LEVEL": "0", "TPU_STDERR_LOG_LEVEL": "0"}  # libtpu's log, with its HBM account, on stderr


def compiling_environment(topology: Topology) -> dict[str, str]:
    """The environment of a compiling process: JAX on the CPU, libtpu loaded for its compiler only.
    libtpu's start-up asks a TPU VM's metadata server for the slice and its hosts; told instead
    (any valid values do: the topology is passed explicitly), it starts quietly anywhere, and beside
    another process holding it. Its log goes to stderr (`COMPILER_LOG`): `compiler_account` reads it."""
    return {**os.environ, "JAX_PLATFORMS": "cpu", "TPU_SKIP_MDS_QUERY": "1", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
            "TPU_ACCELERATOR_TYPE": topology.accelerator_type, "TPU_WORKER_HOSTNAMES": "localhost",
            **COMPILER_LOG}  # fmt: skip


_ERROR_LINE = re.compile(r"\b(INTERNAL|INVALID_ARGUMENT|UNIMPLEMENTED|UNKNOWN|FAILED_PRECONDITION|Check failed)\b|Error:")
_INFO_OR_WARNING = re.compile(r"[IW]\d{4} \d\d:\d\d:\d\d")  # libtpu's log lines that report, not fail
_OP_NAME = re.compile(r"\b(jit\([\w.]+\)/[^\s,\"'}]+)")


def failure_line(output: str) -> str:
    """One line of a failed compile's output: its first error line and the op that line, or the
    output after it, names (`jit(train_step)/jvp()/while/body/iota`)."""
    lines = [line.strip() for line in output.splitlines() if line.strip() and not _INFO_OR_WARNING.match(line)]
    first = next((i for i, line in enumerate(lines) if _ERROR_LINE.search(line)), max(len(lines) - 1, 0))
    reason = lines[first] if lines else "no output"
    op = _OP_NAME.search("\n".join(lines[first:]))
    return reason[:400] + (f" (at {op.group(1)})" if op and op.group(1) not in reason else "")


def compile_stages(config: ml_collections.ConfigDict, stages: Sequence[stage_plan.Stage],
                   teacher: Qwen3NextConfig | None, mtp: MtpUse) -> list[dict]:  # fmt: skip
    """Every stage's row, each compiled by `python -m slimqwen_jax.compile_plan` in its own process
    (its output kept out of sight unless it fails); prints the table. Raises CompileError naming
    the first stage that does not compile, and why."""
    topology = parse_topology(config.compile_topology)
    rows = []
    with tempfile.TemporaryDirectory(prefix="slimqwen-compile-") as scratch:
        request_file, row_file = os.path.join(scratch, "request.pkl"), os.path.join(scratch, "row.pkl")
        for index, stage in enumerate(stages):
            print(f"{stage.name}: compiling the train step for {topology.name} ({topology.num_chips} chips) ...",
                  flush=True)  # fmt: skip
            with open(request_file, "wb") as f:
                pickle.dump(StageRequest(config, tuple(stages), index, teacher, mtp, topology), f)
            done = subprocess.run([sys.executable, "-m", "slimqwen_jax.compile_plan", request_file, row_file],
                                  env=compiling_environment(topology), capture_output=True, text=True)  # fmt: skip
            row = None
            if os.path.exists(row_file):
                with open(row_file, "rb") as f:
                    row = pickle.load(f)
                os.remove(row_file)
            if row is None or "error" in row:
                how = "failed" if row is not None else f"aborted (exit code {done.returncode})"
                reason = row["error"] if row is not None else failure_line(done.stderr + done.stdout)
                raise CompileError(f"{stage.name}: the train step {how} to compile for {topology.name}: {reason}")
            account = compiler_account(done.stderr)
            if account:  # the compiler's verdict, not the upper bound of the buffer assignment's sum
                row.update(account, fits=account["compiler_total_gib"] <= row["hbm_gib"])
            rows.append(row)
    print_table(rows)
    return rows


def print_table(rows: Sequence[dict]) -> None:
    """The compile plan as a markdown table, a row per stage."""
    header = ("stage", "topology", "mesh", "tokens/chip/micro", "remat", "args", "temps", "outputs", "XLA sum GiB",
              "compiler HBM / HBM GiB", "fits", "TFLOP/chip", "collectives GiB",
              f"step s (peak / {rows[0]['mfu']:.0%} MFU)", "stage days", "compile s")  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        mesh = "x".join(str(n) for n in r["mesh"].values())
        if "total_gib" in r:
            used = r.get("compiler_total_gib", r["total_gib"])
            compiler = f"{r['compiler_total_gib']:.2f}" if "compiler_total_gib" in r else "?"
            memory = [f"{r['arguments_gib']:.2f}", f"{r['temporaries_gib']:.2f}", f"{r['outputs_gib']:.2f}",
                      f"{r['total_gib']:.2f}", f"{compiler} / {r['hbm_gib']:.0f}"]  # fmt: skip
            fits = "yes" if r["fits"] else f"no: short {used - r['hbm_gib']:.2f}"
            collectives = f"{sum(r['collective_gib'].values()):.2f}"
        else:  # refused for memory: the compiler's own account
            needed = f"{r['required_gib']:.2f} / {r['available_gib']:.2f}" if "required_gib" in r else "?"
            memory, fits, collectives = ["-", "-", "-", "-", needed], f"no: {r['reason'][:80]}", "-"
        print("| " + " | ".join([
            r["stage"], r["topology"], mesh, f"{r['micro_batch_tokens_per_chip']:,}", r["remat_policy"], *memory,
            fits, f"{r['model_tflops']:,.1f}", collectives,
            f"{r['step_seconds_at_peak']:.2f} / {r['step_seconds_at_mfu']:.2f}", f"{r['stage_days_at_mfu']:.1f}",
            f"{r['compile_seconds']:.0f}",
        ]) + " |")  # fmt: skip


def main(argv: Sequence[str]) -> None:
    """The compiling process: `python -m slimqwen_jax.compile_plan <request.pkl> <row.pkl>` writes
    the stage's row, or {"error": one line} when it does not compile."""
    request_file, row_file = argv
    with open(request_file, "rb") as f:
        request = pickle.load(f)
    try:
        row = compile_stage(request)
    except Exception as error:  # noqa: BLE001 - reported by the parent as one line
        row = {"error": failure_line(f"{type(error).__name__}: {error}")}
    storage.write_bytes(row_file, pickle.dumps(row))


if __name__ == "__main__":
    main(sys.argv[1:])
