"""python -m slimqwen_jax.evaluate --config configs/evaluate_quickstart.py [--config.model=<path>]

Evaluate the quickstart model (configs/quickstart.py; its step 500 by default) on the held-out
split of the standard library: loss, bits per byte and perplexity over 8 x 8 windows of 256 bytes,
teacher-forced MTP acceptance, then greedy decoding of 64 bytes after 8 held-out prompts of 64
bytes, plain (with and without caches) and MTP-speculative with 3 drafts. `model` is an HF
directory or one of our checkpoints (a training step directory); `reference` (optional, e.g. the
teacher) adds top-1 agreement and KL. docs/evaluation.md shows a measured run.
"""

import ml_collections

from slimqwen_jax.run_config import evaluate_base_config


def get_config() -> ml_collections.ConfigDict:
    config = evaluate_base_config()
    config.model = "runs/quickstart/checkpoints/500"
    config.report = "runs/quickstart/eval_report.json"
    return config
