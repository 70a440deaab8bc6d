"""Where our train step's time goes, op by op: the step of tools/bench_train_step.py under the JAX profiler.

    .venv/bin/python tools/profile_train_step.py [--config moe16 --steps 2 --top 30]

Runs the trainer's jitted step (same config, batch and optimizer as the bench) under
`jax.profiler.trace`, reads the XLA ops' trace events and the compiled HLO (each op's `op_name`:
the JAX primitive, inside `jvp(...)` for the forward and `transpose(jvp(...))` for the backward,
with the einsum spec of a dot), and prints milliseconds per step by primitive, forward and
backward apart. XLA:CPU runs independent ops concurrently, so an op's own duration overstates
its cost when others run beside it: each interval of wall time is shared equally among the ops
running in it, and the shares add up to the step's time inside XLA ops. A fused kernel counts
under its root op (a softmax fusion ending in its division is a `div`).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_train_step, beside this file

import argparse
import collections
import gzip
import json
import re
import tempfile
from pathlib import Path

import jax
import numpy as np
from bench_train_step import CONFIGS, our_step

from slimqwen_jax import cli


def op_names(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> its op_name metadata, the jit(...)/while/body/... prefix removed."""
    names = {}
    for match in re.finditer(r"^\s*(?:ROOT )?%([\w.\-]+) = [^\n]*?op_name=\"([^\"]*)\"", hlo_text, re.M):
        names[match.group(1)] = re.sub(r"^jit\([^)]*\)/(while/body/closed_call/)?", "", match.group(2))
    return names


def category(op_name: str) -> str:
    """'transpose(jvp(gbd,gdf->gbf))/dot_general' -> 'backward dot_general gbd,gdf->gbf'."""
    direction = "backward" if "transpose(" in op_name else "forward" if "jvp(" in op_name else "other"
    primitive = op_name.rsplit("/", 1)[-1]
    spec = re.findall(r"\(([\w.,]*->[\w.]*)\)", op_name)
    return " ".join([direction, primitive, *spec[-1:]])


def shared_wall_time(events: list[tuple[float, float, str]]) -> collections.Counter:
    """(start, end, key) intervals -> key: wall time, each instant split among the intervals open then."""
    boundaries = sorted({t for start, end, _ in events for t in (start, end)})
    index = {t: i for i, t in enumerate(boundaries)}
    opening = collections.defaultdict(list)
    closing = collections.defaultdict(list)
    for start, end, key in events:
        opening[index[start]].append(key)
        closing[index[end]].append(key)
    active, shares = collections.Counter(), collections.Counter()
    for i in range(len(boundaries) - 1):
        for key in closing[i]:
            active[key] -= 1
        for key in opening[i]:
            active[key] += 1
        running = +active  # drop the zero counts
        total = sum(running.values())
        for key, count in running.items():
            shares[key] += (boundaries[i + 1] - boundaries[i]) * count / total
    return shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="moe16", choices=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=2, help="profiled steps (after two warm-up steps)")
    parser.add_argument("--top", type=int, default=30, help="rows of the table")
    args = parser.parse_args()
    cli.keep_freed_host_memory()  # as the trainer's entry points do
    cfg, batch, seq_len = CONFIGS[args.config]
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq_len + 1), dtype=np.int32)
    step, params, opt_state, batch_tokens = our_step(cfg, tokens, total_steps=args.steps + 2)
    names = op_names(step.lower(params, opt_state, None, batch_tokens, 0).compile().as_text())
    for i in range(2):
        params, opt_state, metrics = step(params, opt_state, None, batch_tokens, i)
        jax.block_until_ready(metrics)
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(args.steps):
                params, opt_state, metrics = step(params, opt_state, None, batch_tokens, 1)
                jax.block_until_ready(metrics)
        (trace_file,) = Path(trace_dir).rglob("*.trace.json.gz")
        trace = json.load(gzip.open(trace_file))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    ops = [(e["ts"], e["ts"] + e["dur"], category(names[e["name"]])) for e in events
           if e.get("ph") == "X" and e["name"] in names and e.get("dur", 0) > 0]  # fmt: skip
    shares = shared_wall_time(ops)
    own = collections.Counter()
    for start, end, key in ops:
        own[key] += end - start
    total = sum(shares.values())
    print(f"{args.config}, batch {batch} x {seq_len}: {total / 1e3 / args.steps:.0f} ms per step inside XLA ops "
          f"({sum(own.values()) / total:.2f}x that in the ops' own durations: they overlap)\n")  # fmt: skip
    print("| ms / step | share | own ms / step | op (direction, primitive, einsum) |")
    print("|---:|---:|---:|---|")
    for key, value in shares.most_common(args.top):
        print(f"| {value / 1e3 / args.steps:.1f} | {value / total:.1%} | {own[key] / 1e3 / args.steps:.1f} | {key} |")


if __name__ == "__main__":
    main()
