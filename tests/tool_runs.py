"""How the tests start `python -m slimqwen_jax.<tool>`: a subprocess on one CPU device with the
session's XLA flags and compilation cache (conftest.py), all runs sharing one tokenized-data cache."""

import atexit
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


def one_device_env() -> dict[str, str]:
    """This process's environment with XLA on one CPU device and the repository importable."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_COUNT_FLAG)]
    return {**os.environ, "XLA_FLAGS": " ".join([*flags, f"{_DEVICE_COUNT_FLAG}=1"]), "PYTHONPATH": str(REPO)}


def start_tool(tool: str, config: str, *overrides: str) -> subprocess.Popen:
    """Start `python -m slimqwen_jax.<tool> --config configs/<config>` with the shared data cache;
    stdout and stderr together in `.stdout`."""
    command = [
        sys.executable, "-m", f"slimqwen_jax.{tool}", "--config", str(REPO / "configs" / config),
        f"--config.data.cache_dir={DATA_CACHE_DIR}", *overrides,
    ]  # fmt: skip
    return subprocess.Popen(
        command, cwd=REPO, env=one_device_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def run_tool(tool: str, config: str, *overrides: str) -> tuple[int, str]:
    """Run `start_tool` to the end: (exit code, output)."""
    process = start_tool(tool, config, *overrides)
    output, _ = process.communicate(timeout=600)
    return process.returncode, output
