"""Multi-host training without a pod: the trainer as 2 processes of 4 CPU devices each
(`--distributed` with a localhost coordinator; CPU collectives across processes through gloo, jax's
default `jax_cpu_collectives_implementation`) against one process on 8 devices."""

import json
import re
import signal
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from tool_runs import TINY_RUN, history, run_tool, start_tool

from slimqwen_jax import storage, train
from slimqwen_jax.testing import checkpoint_params

STEPS, CHECKPOINT_EVERY, BATCH = 4, 2, 8
# TINY_RUN at 2 layers, its parameters sharded over all 8 devices (fsdp): each process holds and
# saves half of every parameter, so checkpoints are written and read collectively.
RUN = [
    *TINY_RUN, "--config.model.num_hidden_layers=2", "--config.mesh.data=1", "--config.mesh.fsdp=-1",
    f"--config.train.steps={STEPS}", f"--config.train.eval_every={STEPS}",
    f"--config.train.checkpoint_every={CHECKPOINT_EVERY}", f"--config.train.global_batch_size={BATCH}",
    f"--config.train.eval_batch_size={BATCH}", "--config.train.eval_batches=1", "--config.train.eval_mtp_drafts=0",
]  # fmt: skip
SHARD_LINE = re.compile(r"process (\d)/(\d) reads its own shard of the train windows: first batch \[(\d+), \d+\], rows ([0-9a-f ]+)")  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start_processes(workdir: Path, count: int = 2):
    """`count` trainer processes of 8 / count devices each, one job on a fresh localhost coordinator."""
    address = f"localhost:{free_port()}"
    return [
        start_tool(
            "train",
            "quickstart.py",
            f"--config.workdir={workdir}",
            *RUN,
            "--distributed",
            f"--coordinator_address={address}",
            f"--num_processes={count}",
            f"--process_id={i}",
            devices=8 // count,
        )  # fmt: skip
        for i in range(count)
    ]


def finish(processes) -> list[tuple[int, str]]:
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    return [(p.returncode, output) for p, output in zip(processes, outputs)]


def shard_rows(output: str) -> tuple[int, int, list[str]]:
    """(process index, process count, row digests) of the first train batch a process read."""
    (index, count, rows, digests), = SHARD_LINE.findall(output)  # fmt: skip
    assert len(digests.split()) == int(rows)
    return int(index), int(count), digests.split()


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> tuple[Path, str]:
    workdir = tmp_path_factory.mktemp("single") / "run"
    code, output = run_tool("train", "quickstart.py", f"--config.workdir={workdir}", *RUN, devices=8)
    assert code == 0, output
    return workdir, output


@pytest.fixture(scope="module")
def multi(tmp_path_factory) -> tuple[Path, list[str]]:
    workdir = tmp_path_factory.mktemp("multi") / "run"
    results = finish(start_processes(workdir))
    assert all(code == 0 for code, _ in results), results
    return workdir, [output for _, output in results]


def test_two_processes_train_as_one_process_on_eight_devices(single, multi):
    (one, _), (two, outputs) = single, multi
    # Not bitwise: the gradient all-reduce (gloo across processes vs XLA's in-process one) and the
    # batch rows (interleaved by process) sum in other orders. Measured: metrics differ by <= 1.7e-7
    # relative (float32 rounding), parameters after 4 steps by <= 3.3e-6 (Adam's m / sqrt(v)
    # magnifies rounding where a gradient is near zero). Tolerances: 2e-6 and 2e-5. A wrong shard or
    # a missing all-reduce moves the loss by ~1e-2 and a parameter by up to the learning rate (1.5e-3).
    a, b = history(one), history(two)
    assert [sorted(e) for e in a] == [sorted(e) for e in b]  # the same steps and metrics, each once
    worst = max(abs(x[k] - y[k]) / max(abs(x[k]), 1e-30) for x, y in zip(a, b) for k in x)
    print(f"largest relative difference of a logged metric: {worst:.1e}")
    for x, y in zip(a, b):
        assert y == pytest.approx(x, rel=2e-6, abs=1e-7), (x, y)
    pairs = list(zip(checkpoint_params(one, STEPS), checkpoint_params(two, STEPS), strict=True))
    print(f"largest parameter difference after {STEPS} steps: {max(np.abs(x - y).max() for x, y in pairs):.1e}")
    for x, y in pairs:
        np.testing.assert_allclose(y, x, rtol=0, atol=2e-5)
    # Only process 0 writes the shared files and the progress lines.
    assert len(list((two / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert json.loads((two / "summary.json").read_text())["step"] == STEPS
    assert f"step {STEPS}/{STEPS} | loss" in outputs[0] and f"step {STEPS}/{STEPS}" not in outputs[1]


def test_each_process_reads_its_own_shard_of_every_batch(single, multi):
    _, _, rows = shard_rows(single[1])
    shards = [shard_rows(output) for output in multi[1]]
    # The single process's global batch, row i from process i % 2 (grain: every 2nd window from i).
    assert [(index, count) for index, count, _ in shards] == [(0, 2), (1, 2)]
    assert shards[0][2] == rows[0::2] and shards[1][2] == rows[1::2]
    assert not set(shards[0][2]) & set(shards[1][2])


def saved(workdir, step: int) -> bool:
    """Whether checkpoint `step` is complete: at a gs:// URL, where there is no rename, once orbax
    wrote its commit_success.txt."""
    return (workdir / "checkpoints" / str(step) / "commit_success.txt").exists()


def test_a_killed_process_and_a_rerun_of_both_resume_exactly(multi, gcs):
    # The workdir in the emulator's bucket (tests/gcs_emulator.py), shared by both processes, as on a
    # pod; the local disk's renamed checkpoints are the single-process SIGKILL test's (test_train.py).
    workdir = storage.path(f"{gcs.new_bucket()}/run")
    processes = start_processes(workdir)
    deadline = time.time() + 300
    while not saved(workdir, CHECKPOINT_EVERY) and time.time() < deadline:
        assert all(p.poll() is None for p in processes), finish(processes)
        time.sleep(0.02)
    processes[1].send_signal(signal.SIGKILL)
    # Process 0's next collective fails ("Gloo all-reduce failed ... Connection reset by peer") and
    # the process aborts, at once or after the coordinator's heartbeat timeout. On a pod the
    # scheduler ends the rest of the job: here, kill it too; it may have aborted (SIGABRT) first.
    processes[1].wait()
    processes[0].send_signal(signal.SIGKILL)
    (survivor, _), (killed, _) = finish(processes)
    assert killed == -signal.SIGKILL and survivor in (-signal.SIGKILL, -signal.SIGABRT), (survivor, killed)
    assert not saved(workdir, STEPS)

    results = finish(start_processes(workdir))
    assert all(code == 0 for code, _ in results), results
    assert all(f"at step {CHECKPOINT_EVERY}" in output for _, output in results), results
    for x, y in zip(checkpoint_params(multi[0], STEPS), checkpoint_params(workdir, STEPS), strict=True):
        np.testing.assert_array_equal(x, y)
    assert history(workdir) == history(multi[0])


@pytest.mark.parametrize(
    "flags, message",
    [
        ((False, "localhost:1234", None, None), r"--coordinator_address: only with --distributed"),
        ((True, "localhost:1234", 2, 2), r"--process_id must be in \[0, --num_processes=2\), got 2"),
    ],
    ids=["without-distributed", "index-out-of-range"],
)
def test_bad_process_flags_are_refused_before_connecting(flags, message):
    with pytest.raises(train.TrainError, match=message):
        train.initialize_distributed(*flags)
