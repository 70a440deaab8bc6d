"""What the `python -m slimqwen_jax.<tool>` entry points share: flag parsing, logging set-up and
the host allocator's settings for computing on the CPU."""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import logging
import os
import platform
import sys

from absl import flags
from absl import logging as absl_logging


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing that turns an unknown config key or a bad value into one clear line (exit 2)."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as error:
        sys.stderr.write(f"error: bad command line: {error}\n")
        sys.exit(2)


def setup_logging() -> None:
    """Our progress lines at INFO; library chatter (orbax, jax) only from WARNING up."""
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("slimqwen_jax").setLevel(logging.INFO)


# glibc's mallopt parameters (<malloc.h>).
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8


def jax_computes_on_cpu_only() -> bool:
    """Whether JAX will run on the CPU alone, decided without starting its backends: JAX_PLATFORMS
    names only `cpu`, or it is unset and no accelerator runtime (a `jax_plugins` plugin, libtpu) is
    installed."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return {p.strip() for p in platforms.split(",")} == {"cpu"}
    plugins = importlib.metadata.entry_points(group="jax_plugins")
    return not plugins and not any(importlib.util.find_spec(name) for name in ("jax_plugins", "libtpu"))


def keep_freed_host_memory() -> bool:
    """On a CPU-only JAX with glibc, keep freed memory in the process for reuse; True if applied.

    XLA:CPU allocates all of an execution's temporaries as one buffer (over a gigabyte for the
    moe16 train step of tools/bench_train_step.py) and frees it when the execution ends. glibc
    serves a block that large with a fresh `mmap` (the threads' own arenas always do) and unmaps it
    on `free`, so every step faults in and zeroes every page of it again, in the kernel's time
    (measured in docs/performance.md). With one arena, no `mmap` and no trimming of the heap's top
    below 2 GiB, the freed buffer stays mapped and the next step reuses it. Call before JAX's
    first computation: threads that have allocated already keep their arenas. A no-op elsewhere
    (accelerators allocate their own device memory; other C libraries) and with the environment
    variable SLIMQWEN_JAX_KEEP_HOST_MEMORY=0 (one arena slows the compile of a deep train step a
    little, docs/performance.md; a cost that compile-bound runs of tiny models notice).
    """
    if os.environ.get("SLIMQWEN_JAX_KEEP_HOST_MEMORY", "1") == "0":
        return False
    if platform.libc_ver()[0] != "glibc" or not jax_computes_on_cpu_only():
        return False
    libc = ctypes.CDLL(None)  # the process's own C library
    settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1))
    return all(libc.mallopt(parameter, value) == 1 for parameter, value in settings)


def use_the_cpu_only() -> None:
    """Keep JAX on the CPU (before its backends start): for work that computes nothing on a device,
    such as a dry run. On a host with libtpu installed JAX would otherwise try to start a TPU (and
    warn where there is none); on a TPU VM it would hold the chips."""
    import jax  # here: the other tools' start-up does not need it

    os.environ["JAX_PLATFORMS"] = "cpu"
    jax.config.update("jax_platforms", "cpu")


def start_tool(*, cpu_only: bool = False) -> None:
    """What every `python -m slimqwen_jax.<tool>` does first, before JAX's first computation: logging
    set-up, then `keep_freed_host_memory`; with `cpu_only` (a dry run) `use_the_cpu_only` first."""
    if cpu_only:
        use_the_cpu_only()
    setup_logging()
    keep_freed_host_memory()
