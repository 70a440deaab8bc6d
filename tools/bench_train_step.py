"""Our train step against HF transformers' at equal architecture, batch and optimizer, side by side.

    .venv/bin/python tools/bench_train_step.py [--configs quickstart moe16 --rounds 7 --steps 2 --out results.json]

In one run on the machine at hand:
1. the matmul peak: float32 [n, n] x [n, n] products, jitted, best GFLOP/s over a few sizes (the
   denominator of model FLOP utilisation, MFU);
2. for each config, one AdamW step (global-norm clipping, weight decay) of LM cross-entropy plus the
   MoE load-balancing loss, without MTP (transformers' model has none): ours is the trainer's own
   jitted step (`stage_functions.build`, float32, parameters donated), theirs
   `Qwen3NextForCausalLM(labels=..., output_router_logits=True)` + `loss.backward()` +
   `torch.optim.AdamW` with its pure-torch fallbacks. Each runs as a user runs it, in a process of
   its own (tools/train_step_worker.py): ours without torch, theirs without jax and with torch's
   default threads and OpenMP settings. Both are built and warmed up once, then timed in
   alternating rounds (ours, theirs, ours, ...: `timing.interleaved_medians`, one warm-up round
   first), each round `--steps` steps of one contender while the others wait on their pipes; the
   median over `--rounds` rounds of the seconds per step (wall, and the worker's process CPU),
   tokens/s, and MFU;
3. the trace + compile time of the train step of a 48-layer model (Qwen3-Next's depth, tiny widths),
   with the decoder layers scanned over the repeating block and unrolled (in this process, the
   workers gone).

Model FLOPs per token: forward + backward = 3 x `compile_plan.forward_flops_per_token` (2 x the
active matmul parameters, the embedding lookup excluded, plus causal attention's scores and values
and the gated delta rule's state updates). Prints markdown tables; `--out` writes every number as JSON.

`--bound` adds a third contender to the rounds: our step with the routed experts' grouped matmul
replaced by plain 2-D matmuls of the same FLOPs (`routed_as_plain_matmuls`: not the model). What it
reaches bounds what any grouped-matmul kernel could give the step on this machine.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import argparse
import contextlib
import json
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from timing import interleaved_medians

from slimqwen_jax import cli, compile_plan, model, moe, optimizer, run_config, sharding, stacking, stage_functions, train_state
from slimqwen_jax.config import Qwen3NextConfig, tiny
from slimqwen_jax.testing import hand_count_parameters

# The architectures of issue 14's table: the quickstart model and a wider one with 16 experts.
CONFIGS = {
    "quickstart": (
        tiny(
            vocab_size=260, hidden_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32, linear_value_head_dim=32,
            num_experts=8, num_experts_per_tok=2, moe_intermediate_size=96, shared_expert_intermediate_size=96,
            num_mtp_layers=0,
        ),
        8, 256,
    ),
    "moe16": (
        tiny(
            hidden_size=256, num_hidden_layers=8, num_experts=16, num_experts_per_tok=2, moe_intermediate_size=96,
            shared_expert_intermediate_size=192, num_mtp_layers=0,
        ),
        8, 512,
    ),
}  # fmt: skip
DEEP = tiny(hidden_size=32, num_hidden_layers=48, num_experts=4, moe_intermediate_size=16,
            shared_expert_intermediate_size=16, vocab_size=256, num_mtp_layers=0)  # fmt: skip
OPTIMIZER = dict(peak_lr=1e-3, init_lr=1e-3, warmup_steps=0, schedule="constant", weight_decay=0.1, clip_norm=1.0)


def matmul_peak(sizes=(512, 1024, 2048), repeats: int = 5) -> float:
    """Best float32 GFLOP/s of a jitted [n, n] @ [n, n] on the default device."""
    best = 0.0
    for n in sizes:
        a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
        matmul = jax.jit(lambda x, y: x @ y)
        seconds = interleaved_medians({n: lambda: jax.block_until_ready(matmul(a, a))}, repeats)[n][0]
        best = max(best, 2 * n**3 / seconds / 1e9)
    return best


def trainer_step(cfg: Qwen3NextConfig, graphdef: nnx.GraphDef, total_steps: int, mesh=None):
    """(train_step, tx): the trainer's own jitted and donated step (`stage_functions.build`) for LM
    CE + aux loss (the models here have no MTP module), its arguments sharded over `mesh` (default:
    one device) in the stage layout of `cfg`."""
    config = run_config.base_config()
    config.optimizer = run_config.optimizer_section(**OPTIMIZER)
    config.train.eval_mtp_drafts = 0
    mesh = mesh or sharding.make_mesh(dict(data=1, fsdp=1, expert=1), jax.devices()[:1])
    tx, _ = optimizer.make_optimizer(config.optimizer, total_steps)
    shapes = train_state.abstract_state(cfg, tx, mesh)
    fns = stage_functions.build(
        config, cfg, graphdef, tx, mesh, stacking.layout_for(shapes.params, cfg.scan_layers).stack_shardings(
            shapes.shardings), mtp=stage_functions.decide_mtp_use(config.loss, cfg, None), weight_steps=(total_steps, 0),
    )  # fmt: skip
    return fns.train_step, tx


def routed_as_plain_matmuls(rows, row_experts, gate_proj, up_proj, down_proj):
    """Not an MoE: every token copy through expert 0's SwiGLU, three 2-D matmuls of exactly the routed
    FLOPs (no sort, no padding, no per-block weights). Timed in place of the grouped matmul (`--bound`),
    it bounds what any grouped-matmul kernel could give this step on the machine."""
    del row_experts
    return (jax.nn.silu(rows @ gate_proj[0]) * (rows @ up_proj[0])) @ down_proj[0]


def our_step(cfg: Qwen3NextConfig, tokens: np.ndarray, total_steps: int, expert_ffn=None):
    """The trainer's jitted step and its initial arguments: (step, params, opt_state, tokens), the
    parameters in the trainer's layout (scanned layers stacked); `expert_ffn` replaces the routed
    experts' grouped matmul."""
    net = model.Qwen3NextForCausalLM(cfg, rngs=nnx.Rngs(0))
    for _, module in nnx.iter_modules(net) if expert_ffn else ():
        if isinstance(module, moe.Experts):
            module.ffn = expert_ffn
    graphdef, params = nnx.split(net, nnx.Param)
    params = stacking.layout_for(params, cfg.scan_layers).stack(params)
    train_step, tx = trainer_step(cfg, graphdef, total_steps)
    return train_step, params, tx.init(params), jnp.asarray(tokens)


def prepare_ours(cfg: Qwen3NextConfig, tokens: np.ndarray, total_steps: int, expert_ffn=None):
    """(one blocking train step of ours, {"first_step_s": compile + first step}), warmed up."""
    step, params, opt_state, batch = our_step(cfg, tokens, total_steps=total_steps, expert_ffn=expert_ffn)
    start = time.perf_counter()
    params, opt_state, metrics = step(params, opt_state, None, batch, 0)
    jax.block_until_ready(metrics)
    compile_and_first = time.perf_counter() - start
    state = {"params": params, "opt_state": opt_state}

    def one_step():
        state["params"], state["opt_state"], metrics = step(state["params"], state["opt_state"], None, batch, 1)
        jax.block_until_ready(metrics)

    one_step()  # a second warm-up: first runs of donated buffers
    return one_step, {"first_step_s": compile_and_first}


WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_step_worker.py")


def worker_setup(cfg: Qwen3NextConfig, tokens: np.ndarray, total_steps: int) -> dict:
    """What every contender's worker builds its step from (tools/train_step_worker.py's set-up line)."""
    return {"cfg": cfg.to_dict(), "hf_config": cfg.to_hf_dict(), "tokens": tokens.tolist(), "optimizer": OPTIMIZER,
            "total_steps": total_steps}  # fmt: skip


class Worker:
    """One contender in its own process (tools/train_step_worker.py `kind`), its step built and
    warmed up on entry (`facts`: the worker's answer); left, the process ends."""

    def __init__(self, kind: str, setup: dict):
        self.kind, self.setup = kind, setup

    def __enter__(self):
        self.process = subprocess.Popen([sys.executable, WORKER, self.kind], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)  # fmt: skip
        self.facts = self._ask(json.dumps(self.setup))
        return self

    def __exit__(self, *exc_info):
        self.process.stdin.close()
        self.process.wait()

    def _ask(self, line: str) -> dict:
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline()
        if not answer:
            raise RuntimeError(f"train_step_worker.py {self.kind} exited with {self.process.wait()} (its stderr above)")
        return json.loads(answer)

    def measure(self, steps: int):
        """A thunk for `interleaved_medians(..., timer=lambda thunk: thunk())`: the worker runs
        `steps` steps and the thunk returns their (wall, CPU) seconds per step."""

        def thunk():
            answer = self._ask(str(steps))
            return answer["seconds"], answer["cpu_seconds"]

        return thunk


def time_contenders(kinds: list[str], setup: dict, rounds: int, steps: int) -> dict:
    """{kind: facts + {"seconds", "cpu_seconds"}}: the contenders started one after another (each
    builds and warms up alone), then timed in alternating rounds of `steps` steps each."""
    with contextlib.ExitStack() as stack:
        workers = {kind: stack.enter_context(Worker(kind, setup)) for kind in kinds}
        medians = interleaved_medians({kind: w.measure(steps) for kind, w in workers.items()}, rounds,
                                      timer=lambda thunk: thunk())  # fmt: skip
    return {kind: {**workers[kind].facts, "seconds": wall, "cpu_seconds": cpu} for kind, (wall, cpu) in medians.items()}


def compile_seconds(cfg: Qwen3NextConfig, batch: int = 2, seq_len: int = 32) -> dict[str, float]:
    """Seconds to trace, lower and compile the trainer's step for `cfg` (shapes only: nothing is
    allocated or run). Run without a persistent compilation cache, or a repeat reads it."""
    graphdef, params = model.abstract_model(cfg)
    step, tx = trainer_step(cfg, graphdef, total_steps=10)
    shapes = jax.eval_shape(stacking.layout_for(params, cfg.scan_layers).stack, params)
    tokens = jax.ShapeDtypeStruct((batch, seq_len + 1), jnp.int32)
    weights = step.loss_weights(0)  # evaluated outside the program, as `AtStep` does
    start = time.perf_counter()
    traced = step.jitted.trace(shapes, jax.eval_shape(tx.init, shapes), None, tokens, weights)
    traced_at = time.perf_counter()
    lowered = traced.lower()
    lowered_at = time.perf_counter()
    lowered.compile()
    done = time.perf_counter()
    return {"trace": traced_at - start, "lower": lowered_at - traced_at, "compile": done - lowered_at,
            "total": done - start}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds timed (after one warm-up round)")
    parser.add_argument("--steps", type=int, default=2, help="steps each contender runs per round")
    parser.add_argument("--no-compile", action="store_true", help="skip the 48-layer compile-time measurement")
    parser.add_argument("--bound", action="store_true",
                        help="also time our step with the routed experts as plain matmuls (`routed_as_plain_matmuls`)")  # fmt: skip
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    host_memory_kept = cli.keep_freed_host_memory()  # as the trainer's entry points do (the peak, the compiles)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({os.cpu_count()} cores), "
          f"freed host memory kept: {host_memory_kept}", flush=True)  # fmt: skip

    results = {"matmul_peak_gflops": matmul_peak(), "host_memory_kept": host_memory_kept, "configs": {}}
    print(f"float32 matmul peak: {results['matmul_peak_gflops']:.1f} GFLOP/s", flush=True)
    kinds = ["ours", "bound", "hf"] if args.bound else ["ours", "hf"]
    for name in args.configs:
        cfg, batch, seq_len = CONFIGS[name]
        tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq_len + 1), dtype=np.int32)
        flops = 3 * compile_plan.forward_flops_per_token(cfg, seq_len) * batch * seq_len  # forward + backward
        row = {
            "batch": batch,
            "seq_len": seq_len,
            "params": hand_count_parameters(cfg)[0],
            "moe_backend": cfg.moe_backend,
        }
        setup = worker_setup(cfg, tokens, total_steps=(args.rounds + 1) * args.steps + 2)
        for who, measured in time_contenders(kinds, setup, args.rounds, args.steps).items():
            row[who] = {**measured, "tokens_per_s": batch * seq_len / measured["seconds"],
                        "mfu": flops / measured["seconds"] / 1e9 / results["matmul_peak_gflops"]}  # fmt: skip
            print(f"{name} {who}: {json.dumps(row[who])}", flush=True)
        row["speedup"] = row["hf"]["seconds"] / row["ours"]["seconds"]
        if args.bound:
            row["bound"]["speedup"] = row["hf"]["seconds"] / row["bound"]["seconds"]
        results["configs"][name] = row
    if not args.no_compile:
        results["compile_48_layers"] = {
            "scanned": compile_seconds(DEEP.replace(scan_layers=True)),
            "unrolled": compile_seconds(DEEP.replace(scan_layers=False)),
        }
        print(f"48-layer compile: {json.dumps(results['compile_48_layers'])}", flush=True)

    print(f"\nmatmul peak {results['matmul_peak_gflops']:.1f} GFLOP/s (float32)\n")
    print("| config | params | batch | ours tok/s | ours MFU | HF torch tok/s | HF MFU | ours / HF |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for name, r in results["configs"].items():
        print(f"| {name} | {r['params'] / 1e6:.2f}M | {r['batch']} x {r['seq_len']} | "
              f"{r['ours']['tokens_per_s']:,.0f} | {r['ours']['mfu']:.0%} | {r['hf']['tokens_per_s']:,.0f} | "
              f"{r['hf']['mfu']:.0%} | {r['speedup']:.2f}x |")  # fmt: skip
    if args.bound:
        print("\nBound: the routed experts as plain matmuls of the same FLOPs (not the model; see --bound)\n")
        print("| config | bound tok/s | bound MFU | bound / HF |")
        print("|---|---:|---:|---:|")
        for name, r in results["configs"].items():
            b = r["bound"]
            print(f"| {name} | {b['tokens_per_s']:,.0f} | {b['mfu']:.0%} | {b['speedup']:.2f}x |")
    if "compile_48_layers" in results:
        c = results["compile_48_layers"]
        scanned, unrolled = c["scanned"]["total"], c["unrolled"]["total"]
        print(
            f"\n48-layer train step trace + compile: scanned {scanned:.1f} s (trace {c['scanned']['trace']:.1f}), "
            f"unrolled {unrolled:.1f} s (trace {c['unrolled']['trace']:.1f}): {scanned / unrolled:.2f} of unrolled"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
