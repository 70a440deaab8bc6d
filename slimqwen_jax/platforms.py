"""The platform the model's programs are built for, which picks their kernels: the Pallas delta
rule's Mosaic (TPU) / Triton (GPU) / interpreter (CPU) lowering, the MoE's grouped matmul and its
expert-parallel exchange.

It is `jax.default_backend()`, except inside `compiling_for(platform)`: compiling a train step for a
TPU topology from a CPU host (`slimqwen_jax.compile_plan`) builds and traces the model there, where
the default backend is still the CPU. Without the override the kernels would be the CPU's (the
Pallas interpreter's loops, the fixed-buffer exchange), which is neither what the pod runs nor
something every TPU compiler accepts (v6e rejects the interpreter's iota loops).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import jax

PLATFORMS = ("cpu", "gpu", "tpu")
_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("target_platform", default=None)


def target_platform() -> str:
    """The platform programs are being built for: `compiling_for`'s, else `jax.default_backend()`."""
    return _TARGET.get() or jax.default_backend()


@contextlib.contextmanager
def compiling_for(platform: str) -> Iterator[None]:
    """Build (construct modules, trace, lower) for `platform` ("cpu", "gpu" or "tpu") inside the block."""
    if platform not in PLATFORMS:
        raise ValueError(f"platform must be one of {PLATFORMS}, got {platform!r}")
    token = _TARGET.set(platform)
    try:
        yield
    finally:
        _TARGET.reset(token)
