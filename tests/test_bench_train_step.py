"""tools/bench_train_step.py's contenders run in processes of their own (tools/train_step_worker.py):
the worker protocol answers facts and per-step timings. Only the HF contender is started (a few
seconds, most of them torch's import); ours adds ~20 s of JAX start-up and compiling on 2 cores,
and `tools/bench_train_step.py --configs quickstart --rounds 1 --steps 1 --no-compile` runs it."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import bench_train_step  # noqa: E402

from slimqwen_jax.config import tiny  # noqa: E402


def test_hf_worker_times_its_own_steps_in_rounds():
    cfg = tiny(hidden_size=32, head_dim=8, linear_key_head_dim=8, linear_value_head_dim=8, num_experts=4,
               moe_intermediate_size=16, shared_expert_intermediate_size=16, vocab_size=64, num_mtp_layers=0)  # fmt: skip
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 17), dtype=np.int32)
    setup = bench_train_step.worker_setup(cfg, tokens, total_steps=8)
    (kind, measured), = bench_train_step.time_contenders(["hf"], setup, rounds=1, steps=1).items()
    assert kind == "hf" and measured["attention"] and measured["torch_threads"] >= 1
    assert measured["seconds"] > 0 and measured["cpu_seconds"] > 0
