"""Greedy decoding speed of one model: cached, uncached and MTP-speculative, over batch sizes and draft counts.

    .venv/bin/python tools/bench_decoding.py --model runs/quickstart/checkpoints/500 [--prompts 8 --new 64]

Prompts are the first held-out windows of the default data (the standard library, byte tokens).
For each batch size, `evaluate.decoding_metrics` times the decode loops after a compile run; the
uncached baseline (a full forward per new token) runs at the first batch size only. Prints a
markdown table and the first prompt's greedy continuation; `--out` writes the rows as JSON.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import argparse
import json

import ml_collections

from slimqwen_jax import data, run_config
from slimqwen_jax.decoding import Decoder
from slimqwen_jax.evaluate import decoding_metrics, heldout_prompts
from slimqwen_jax.loading import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="HF directory or one of our checkpoints")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--drafts", default="1,2,3,4")
    parser.add_argument("--cache-dir", default=None, help="tokenized-data cache directory")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    model = load_model(args.model)
    data_cfg = run_config.data_section()
    data_cfg.cache_dir = args.cache_dir
    tokenizer = data.make_tokenizer(data_cfg.tokenizer)
    prompts = heldout_prompts(data_cfg, tokenizer, args.prompts, args.prompt_len)
    rows = []
    for i, batch_size in enumerate(int(b) for b in args.batch_sizes.split(",")):
        for num_drafts in (int(j) for j in args.drafts.split(",")):
            dc = ml_collections.ConfigDict(
                dict(prompt_len=args.prompt_len, max_new_tokens=args.new, batch_size=batch_size,
                     num_drafts=num_drafts, uncached=i == 0)
            )  # fmt: skip
            report = decoding_metrics(model, prompts, dc)
            spec = report["speculative"]
            rows.append({
                "batch_size": batch_size, "num_drafts": num_drafts,
                "cached_tokens_per_s": report["cached"]["tokens_per_s"],
                "uncached_tokens_per_s": report.get("uncached", {}).get("tokens_per_s"),
                **{k: spec[k] for k in spec if k.startswith("acc_")},
                "tokens_per_step": spec["tokens_per_step"], "speculative_tokens_per_s": spec["tokens_per_s"],
                "speedup": spec["speedup"], "identical": spec["identical_to_cached"],
            })  # fmt: skip
    # acc_k: share of rounds whose first k+1 drafts were all accepted
    print(
        "| batch | J | cached tok/s | uncached tok/s | acc_0..acc_{J-1} | tokens/round | speculative tok/s | speed-up |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        accs = " ".join(f"{r[f'acc_{k}']:.3f}" for k in range(r["num_drafts"]))  # first k+1 drafts accepted
        uncached = f"{r['uncached_tokens_per_s']:.0f}" if r["uncached_tokens_per_s"] else "-"
        print(
            f"| {r['batch_size']} | {r['num_drafts']} | {r['cached_tokens_per_s']:.0f} | {uncached} | {accs} | "
            f"{r['tokens_per_step']:.2f} | {r['speculative_tokens_per_s']:.0f} | {r['speedup']:.2f}x |"
        )
    assert all(r["identical"] for r in rows), "speculative output differs from greedy"
    continuation = Decoder(model, max_len=args.prompt_len + args.new).generate(prompts[:1], args.new).tokens[0]
    print("\nprompt:", repr(tokenizer.decode(prompts[0])))
    print("greedy:", repr(tokenizer.decode(continuation)))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
