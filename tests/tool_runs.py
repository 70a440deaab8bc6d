"""How the tests start `python -m slimqwen_jax.<tool>`: a subprocess on one CPU device (or as many
as asked) with the session's XLA flags and compilation cache (conftest.py), all runs sharing one
tokenized-data cache; optionally with a fault injected into a checkpoint save (inject_fault.py)."""

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA_CACHE_DIR = tempfile.mkdtemp(prefix="slimqwen-jax-test-data-")
atexit.register(shutil.rmtree, DATA_CACHE_DIR, ignore_errors=True)
_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"

# A tiny run on top of the quickstart config: every layer kind, MoE and MTP, a few seconds a step.
TINY_RUN = [
    "--config.model.hidden_size=32", "--config.model.head_dim=8", "--config.model.linear_key_head_dim=8",
    "--config.model.linear_value_head_dim=8", "--config.model.moe_intermediate_size=16",
    "--config.model.shared_expert_intermediate_size=16", "--config.model.num_experts=4",
    "--config.data.seq_len=32", "--config.train.global_batch_size=4", "--config.train.eval_batches=2",
    "--config.train.eval_batch_size=4", "--config.train.log_every=2", "--config.optimizer.warmup_steps=2",
]  # fmt: skip


def one_device_env(devices: int = 1) -> dict[str, str]:
    """This process's environment with XLA on `devices` CPU devices and the repository importable."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_COUNT_FLAG)]
    return {**os.environ, "XLA_FLAGS": " ".join([*flags, f"{_DEVICE_COUNT_FLAG}={devices}"]), "PYTHONPATH": str(REPO)}


def start_tool(tool: str, config: str, *overrides: str, devices: int = 1, fault: tuple[str, int] | None = None
               ) -> subprocess.Popen:  # fmt: skip
    """Start `python -m slimqwen_jax.<tool> --config configs/<config>` on `devices` CPU devices with
    the shared data cache; stdout and stderr together in `.stdout`. `fault`: (kind, step) injected
    while that checkpoint step is written (inject_fault.py)."""
    injection = [str(REPO / "tests" / "inject_fault.py"), fault[0], str(fault[1])] if fault else []
    command = [
        sys.executable, *injection, "-m", f"slimqwen_jax.{tool}", "--config", str(REPO / "configs" / config),
        f"--config.data.cache_dir={DATA_CACHE_DIR}", *overrides,
    ]  # fmt: skip
    return subprocess.Popen(
        command, cwd=REPO, env=one_device_env(devices), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def run_tool(tool: str, config: str, *overrides: str, devices: int = 1, fault: tuple[str, int] | None = None
             ) -> tuple[int, str]:  # fmt: skip
    """Run `start_tool` to the end: (exit code, output)."""
    process = start_tool(tool, config, *overrides, devices=devices, fault=fault)
    output, _ = process.communicate(timeout=600)
    return process.returncode, output


def history(workdir: Path) -> list[dict]:
    """A run's metrics.jsonl (workdir a local path or an epath URL) without the timing entries
    (tokens/s), which no two runs share."""
    entries = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in entry.items() if not k.startswith("perf/")} for entry in entries]
