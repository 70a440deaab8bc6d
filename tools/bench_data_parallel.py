"""The trainer's step on a data-parallel mesh: does each device do its share of the work, and no more?

    .venv/bin/python tools/bench_data_parallel.py [--devices 8 --configs quickstart moe16 --out results.json]

For each of `bench_train_step`'s configs, the trainer's jitted step (LM cross-entropy plus the MoE
load-balancing loss, AdamW, the platform's MoE backend) is compiled for one device and for a mesh
of P devices on the data axis (P fake CPU devices when the host has no accelerators), batch split
over them. Reported:
- the FLOPs each device runs per step (XLA's cost analysis of the compiled program, per device)
  against 1/P of the one-device step's: 1.0 means the work is split evenly, P means every device
  does all of it;
- the array elements that collectives move per step (the results of every all-reduce, all-gather,
  all-to-all, collective-permute), against the parameter count (the gradients' all-reduce);
- the wall time per step of both (median of `--repeats`; P fake devices share the host's cores, so
  this compares code versions on one machine, not a speedup of the mesh).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root


def _fake_devices(argv: list[str]) -> None:
    """Ask XLA:CPU for --devices host devices before jax starts."""
    count = argv[argv.index("--devices") + 1] if "--devices" in argv else "8"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}"


_fake_devices(sys.argv)

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from bench_train_step import CONFIGS, trainer_step  # noqa: E402
from flax import nnx  # noqa: E402

from slimqwen_jax import cli, model, sharding  # noqa: E402
from slimqwen_jax.hlo_stats import collective_arrays  # noqa: E402


def compiled_step(cfg, mesh: jax.sharding.Mesh, tokens: np.ndarray):
    """(compiled step, params, opt_state, tokens): the trainer's step with its arguments placed on `mesh`."""
    graphdef, params = nnx.split(model.Qwen3NextForCausalLM(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    params = jax.device_put(params, sharding.state_shardings(params, mesh))
    train_step, tx = trainer_step(cfg, graphdef, total_steps=100, mesh=mesh)
    opt_state = jax.jit(tx.init)(params)
    tokens = jax.device_put(jnp.asarray(tokens), sharding.batch_sharding(mesh, 2))
    with jax.set_mesh(mesh):
        compiled = train_step.lower(params, opt_state, None, tokens, 0).compile()
    return compiled, params, opt_state, tokens


def measure(cfg, mesh: jax.sharding.Mesh, tokens: np.ndarray, repeats: int) -> dict:
    """Per-device FLOPs, collective elements and median seconds per step of the trainer's step on `mesh`."""
    compiled, params, opt_state, tokens = compiled_step(cfg, mesh, tokens)
    collectives = collective_arrays(compiled.as_text())
    seconds = []
    for i in range(repeats + 1):  # the first run is a warm-up
        start = time.perf_counter()
        params, opt_state, metrics = compiled(params, opt_state, None, tokens, i)
        jax.block_until_ready(metrics)
        seconds.append(time.perf_counter() - start)
    return {
        "devices": mesh.size,
        "flops_per_device": compiled.cost_analysis()["flops"],
        "collective_elements": sum(math.prod(shape) for _, shape in collectives),
        "collective_ops": sorted({op for op, _ in collectives}),
        "seconds": float(np.median(seconds[1:])),
        "loss": float(metrics["loss"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=8, help="devices on the data axis (fake CPU devices)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per measurement")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    cli.keep_freed_host_memory()
    if jax.device_count() < args.devices:
        raise SystemExit(f"--devices {args.devices}: only {jax.device_count()} devices ({jax.default_backend()})")
    one = sharding.make_mesh(dict(data=1, fsdp=1, expert=1), jax.devices()[:1])
    data = sharding.make_mesh(dict(data=args.devices, fsdp=1, expert=1), jax.devices()[: args.devices])
    print(f"jax {jax.__version__}, {args.devices} x {jax.devices()[0].device_kind}, {os.cpu_count()} cores", flush=True)
    results = {}
    for name in args.configs:
        cfg, batch, seq_len = CONFIGS[name]
        tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq_len + 1), dtype=np.int32)
        row = {
            "one_device": measure(cfg, one, tokens, args.repeats),
            "data_parallel": measure(cfg, data, tokens, args.repeats),
        }
        row["parameters"] = sum(math.prod(p.shape) for p in jax.tree.leaves(model.abstract_model(cfg)[1]))
        row["work_per_device"] = (
            row["data_parallel"]["flops_per_device"] * args.devices / row["one_device"]["flops_per_device"]
        )
        results[name] = row
        print(f"{name}: {json.dumps(row)}", flush=True)

    print(f"\n| config | FLOPs per device / (one device's / {args.devices}) | collective elements per step "
          f"/ parameters | collectives | s per step, 1 device | s per step, {args.devices} devices |")  # fmt: skip
    print("|---|---:|---:|---|---:|---:|")
    for name, r in results.items():
        dp = r["data_parallel"]
        print(f"| {name} | {r['work_per_device']:.2f} | {dp['collective_elements'] / r['parameters']:.2f} | "
              f"{', '.join(dp['collective_ops'])} | {r['one_device']['seconds']:.3f} | {dp['seconds']:.3f} |")  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
