"""`cli.keep_freed_host_memory`: XLA:CPU's per-execution temporary buffer is reused from one call to
the next instead of being mapped, faulted in and zeroed afresh each time."""

import json
import platform
import subprocess
import sys

import pytest
from tool_runs import REPO, one_device_env

from slimqwen_jax import cli

# A jitted function whose one temporary, sin(x) [4096, 4096] float32 (64 MiB), is kept apart by an
# optimization barrier; above glibc's largest mmap threshold (32 MiB), so without the setting every
# call maps it afresh. With it, the heap grows for the first few calls (a call's temporary may still
# be allocated when the next call allocates its own) and then serves every call from memory freed
# before. Prints the minor page faults per call over the last 15 of 30 calls and the temporary's size.
CALLS = """
import json, resource, sys
from slimqwen_jax import cli
kept = cli.keep_freed_host_memory() if sys.argv[1] == "keep" else False
import jax, jax.numpy as jnp
step = jax.jit(lambda x: jnp.sum(jax.lax.optimization_barrier(jnp.sin(x))))
x = jnp.ones((4096, 4096), jnp.float32)
for _ in range(15):
    jax.block_until_ready(step(x))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(15):
    jax.block_until_ready(step(x))
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 15
temp = step.lower(x).compile().memory_analysis().temp_size_in_bytes
print(json.dumps({"kept": kept, "faults_per_call": faults, "temp_pages": temp / resource.getpagesize()}))
"""


def faults_per_call(mode: str) -> dict:
    env = one_device_env() | {"JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", CALLS, mode], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc setting")
def test_the_temporary_buffer_is_reused_between_calls():
    fresh, kept = faults_per_call("fresh"), faults_per_call("keep")
    print(f"page faults per call: {fresh['faults_per_call']:.0f} fresh, {kept['faults_per_call']:.0f} kept "
          f"({fresh['temp_pages']:.0f} pages of temporaries)")  # fmt: skip
    assert fresh["temp_pages"] >= 16384  # 64 MiB of 4 KiB pages: the premise of the test
    assert fresh["faults_per_call"] > 0.5 * fresh["temp_pages"]  # without: faulted in again on every call
    assert kept["kept"] and kept["faults_per_call"] < 0.5 * kept["temp_pages"]


@pytest.mark.parametrize("platforms, cpu_only", [("cpu", True), (" cpu ", True), ("cuda,cpu", False), ("tpu", False)])
def test_only_a_cpu_only_jax_gets_the_setting(monkeypatch, platforms, cpu_only):
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    assert cli.jax_computes_on_cpu_only() is cpu_only


def test_the_setting_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("SLIMQWEN_JAX_KEEP_HOST_MEMORY", "0")
    assert cli.keep_freed_host_memory() is False
