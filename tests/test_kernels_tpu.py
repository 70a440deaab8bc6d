"""The Pallas kernels compiled (not only lowered) by the real TPU compiler, on compile-only devices.

libtpu provides v5e / v6e topologies without a chip; `tools/compile_kernels_tpu.py` compiles each
program in a subprocess (a compiler abort fails the test instead of killing pytest) and reads the
scoped VMEM the compiler allocated to every Mosaic call. Small shapes keep each compile a few
seconds. Skipped only where libtpu is not installed.
"""

from __future__ import annotations

import importlib.util

import pytest
from tool_runs import REPO

pytest.importorskip("libtpu")

_spec = importlib.util.spec_from_file_location("compile_kernels_tpu", REPO / "tools" / "compile_kernels_tpu.py")
compile_kernels_tpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compile_kernels_tpu)

DEFAULT_SCOPED_VMEM = 16 * 2**20  # the smallest default per-kernel scoped VMEM limit (v5e)


def compiled(kernel: str, chip: str, tokens: int) -> dict:
    row = compile_kernels_tpu.run_in_subprocess(kernel, chip, tokens, batch=1, timeout=300)
    print(kernel, chip, {k: v for k, v in row.items() if k != "pallas_calls"})
    assert row["ok"], row["reason"]
    return row


def assert_vmem_within_default_limit(row: dict, pallas_calls: int) -> None:
    """Every Pallas call present, each given some scoped VMEM, all under the default limit."""
    sizes = [call["scoped_vmem_bytes"] for call in row["pallas_calls"]]
    assert len(sizes) == pallas_calls, row["pallas_calls"]
    assert all(0 < size <= DEFAULT_SCOPED_VMEM for size in sizes), sizes


# forward, the backward's recomputing forward and the backward kernel
@pytest.mark.parametrize("chip", ["v5e", "v6e"])
def test_delta_rule_forward_backward_compiles(chip):
    row = compiled("gdr_forward_backward", chip, tokens=256)
    assert row["shapes"].startswith("B=1 T=256 Hk=16 Hv=32 Dk=128 Dv=128")
    assert_vmem_within_default_limit(row, pallas_calls=3)
    # The kernels' CostEstimate reaches the compiled program's cost analysis: 8.7 GFLOP of them.
    assert row["flops"] >= 8.6e9, row["flops"]


@pytest.mark.parametrize("chip", ["v5e", "v6e"])
def test_delta_rule_at_tiny_head_dims_compiles(chip):
    """Dk = 16, Dv = 32: Mosaic cannot tile them; the op zero-pads them to 128 lanes."""
    row = compiled("gdr_tiny_forward_backward", chip, tokens=256)
    assert "Dk=16 Dv=32" in row["shapes"]
    assert_vmem_within_default_limit(row, pallas_calls=3)


def test_gmm_forward_and_grad_compile_for_v6e():
    forward = compiled("gmm_forward_23a2b", "v6e", tokens=64)
    grad = compiled("gmm_grad_23a2b", "v6e", tokens=64)
    assert forward["shapes"] == "M=512 D=1536 F=512 E=256"
    assert_vmem_within_default_limit(forward, pallas_calls=3)  # gate, up, down
    # + dlhs of each (gmm, transposed rhs) and drhs of each (tgmm)
    assert_vmem_within_default_limit(grad, pallas_calls=9)
    assert grad["flops"] >= 2.9 * forward["flops"] > 0  # two products back per one forward


def test_a_failing_subprocess_is_a_row_with_its_reason():
    """A compile subprocess that fails (here: a model with no expert shapes) comes back as a failed row naming the
    error, so that the table goes on."""
    row = compile_kernels_tpu.run_in_subprocess("gmm_forward_90b", "v5e", tokens=256, batch=1, timeout=300)
    assert not row["ok"] and row["reason"] == "rc 1: KeyError: '90b'", row
