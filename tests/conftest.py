"""Test set-up: 8 fake CPU devices for mesh tests, float32 matmuls at full precision, quick XLA
compiles, JAX on the CPU even where libtpu is installed (the TPU tests compile for compile-only
topologies, which need no TPU backend), and one persistent compilation cache for the session, shared with the `python -m`
subprocesses the tests start (their identical tiny runs then compile once). Under pytest-xdist
(pytest.ini) every worker inherits the cache; torch runs on one thread per worker.

The tests' tiny models spend far longer in XLA's compiler than in running, so LLVM's optimisation
level is turned down (compiles ~30% faster). No test depends on it: tolerances are met at either
level, and bitwise comparisons compare runs made under the same flags."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # with libtpu installed (.[tpu]) JAX would probe for a TPU
os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=8"
    " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
)
if os.environ.get("PYTEST_XDIST_WORKER"):  # workers share the cores: torch (OpenMP) must not spin-wait on them
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache_dir = tempfile.mkdtemp(prefix="slimqwen-jax-test-cache-")
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


# The slowest files first (measured, docs/testing.md), the rest in their usual order: pytest.ini
# turns xdist's reordering by test count off, so the workers take the long files while the short
# ones fill in around them and finish together (longest-processing-time-first scheduling).
SLOWEST_FIRST = ("test_stages.py", "test_train.py", "test_compile_plan.py", "test_sweep.py", "test_multihost.py",
                 "test_losses.py", "test_reproduce.py", "test_bad_inputs.py", "test_lm_eval_model.py", "test_sharding.py", "test_moe.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def gcs():
    """A GCS emulator for this test process (tests/gcs_emulator.py), its environment set."""
    from gcs_emulator import Emulator

    emulator = Emulator()
    emulator.start()
    yield emulator
    emulator.stop()
