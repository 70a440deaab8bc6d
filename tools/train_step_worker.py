"""One contender of tools/bench_train_step.py in a process of its own: its train step built and
warmed up once, then timed on the parent's command, so that the parent can alternate rounds of
the contenders without starting them again.

    python tools/train_step_worker.py {ours,bound,hf}    (started by bench_train_step.py)

Protocol, one JSON document per line: the parent writes the set-up, {"cfg": Qwen3NextConfig.to_dict(),
"hf_config": its to_hf_dict(), "tokens": [B][L+1] ints, "optimizer": bench_train_step.OPTIMIZER,
"total_steps": n}; the worker builds and warms up its step and answers with facts about it. Then
every line holding a number N has it run N steps and answer {"seconds", "cpu_seconds"}: the wall
and process CPU seconds per step over those N, on its own clocks (the pipe is outside them). End
of input ends it. Replies go to the worker's original stdout; anything the libraries print goes to
stderr.

`hf` imports torch and transformers only (neither jax nor anything of ours) and leaves torch at
its defaults: threads, OpenMP settings and allocator as a user's script gets them. `ours` and
`bound` (see bench_train_step's `--bound`) import bench_train_step, which imports jax, and keep
freed host memory as the trainer's entry points do.
"""

import argparse
import json
import os
import sys

from timing import timed


def prepare_ours(setup: dict, bound: bool):
    """(one blocking train step of ours, facts), warmed up; `bound`: the routed experts as plain
    matmuls (`bench_train_step.routed_as_plain_matmuls`)."""
    import bench_train_step as bench
    import numpy as np

    from slimqwen_jax import cli
    from slimqwen_jax.config import Qwen3NextConfig

    host_memory_kept = cli.keep_freed_host_memory()  # before JAX's first computation
    cfg = Qwen3NextConfig.from_dict(setup["cfg"])
    tokens = np.asarray(setup["tokens"], np.int32)
    expert_ffn = bench.routed_as_plain_matmuls if bound else None
    one_step, facts = bench.prepare_ours(cfg, tokens, setup["total_steps"], expert_ffn)
    return one_step, {**facts, "host_memory_kept": host_memory_kept}


def prepare_hf(setup: dict):
    """(one train step of transformers' Qwen3NextForCausalLM with torch.optim.AdamW, facts), warmed up."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.Qwen3NextConfig(**setup["hf_config"])
    hf_model = transformers.Qwen3NextForCausalLM(config).float().train()
    opt = setup["optimizer"]
    optimizer = torch.optim.AdamW(
        hf_model.parameters(), lr=opt["peak_lr"], betas=(0.9, 0.95), eps=1e-8, weight_decay=opt["weight_decay"]
    )
    input_ids = torch.as_tensor(setup["tokens"], dtype=torch.long)[:, :-1]

    def one_step():
        optimizer.zero_grad(set_to_none=True)
        loss = hf_model(input_ids=input_ids, labels=input_ids, output_router_logits=True).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf_model.parameters(), opt["clip_norm"])
        optimizer.step()

    for _ in range(2):
        one_step()
    facts = {"attention": hf_model.config._attn_implementation, "torch_threads": torch.get_num_threads(),
             "torch": torch.__version__, "transformers": transformers.__version__}  # fmt: skip
    return one_step, facts


def serve(one_step, facts: dict, commands, replies) -> None:
    """Answer `facts`, then time `one_step` N times for every line N of `commands` (per-step wall
    and CPU seconds, one JSON line each on `replies`) until they end."""

    def reply(message: dict) -> None:
        replies.write(json.dumps(message) + "\n")
        replies.flush()

    reply(facts)
    for line in commands:
        steps = int(line)
        wall, cpu = timed(lambda: [one_step() for _ in range(steps)])
        reply({"seconds": wall / steps, "cpu_seconds": cpu / steps})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["ours", "bound", "hf"])
    kind = parser.parse_args().kind
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # library prints must not enter the protocol
    setup = json.loads(sys.stdin.readline())
    one_step, facts = prepare_hf(setup) if kind == "hf" else prepare_ours(setup, bound=kind == "bound")
    serve(one_step, facts, sys.stdin, replies)


if __name__ == "__main__":
    main()
