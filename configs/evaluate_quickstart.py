"""python -m slimqwen_jax.evaluate --config configs/evaluate_quickstart.py [--config.model=<path>]

Evaluate the quickstart model (configs/quickstart.py; its step 500 by default) on the held-out
split of the standard library: loss, bits per byte and perplexity over 8 x 8 windows of 256 bytes,
teacher-forced MTP acceptance, then greedy decoding of 64 bytes after 8 held-out prompts of 64
bytes, plain (with and without caches) and MTP-speculative with 3 drafts. `model` is an HF
directory or one of our checkpoints (a training step directory); `reference` (optional, e.g. the
teacher) adds top-1 agreement and KL. Expected on a 2-core CPU: about 40 s; docs/evaluation.md
shows a measured run.
"""

import ml_collections

from slimqwen_jax.data import default_data_config


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = "runs/quickstart/checkpoints/500"  # an HF directory or one of our checkpoints
    config.reference = ""  # optional reference model (the teacher), same kinds of path
    config.dtype = "float32"
    config.report = "runs/quickstart/eval_report.json"  # refused if it exists, unless overwrite
    config.overwrite = False  # replace an existing report
    config.data = default_data_config()
    config.data.seq_len = 256
    config.heldout = ml_collections.ConfigDict(dict(batch_size=8, num_batches=8, num_drafts=3))
    config.decoding = ml_collections.ConfigDict(
        dict(
            num_prompts=8,  # held-out windows of prompt_len tokens
            prompt_len=64,
            max_new_tokens=64,
            batch_size=1,  # rows decoded together
            num_drafts=3,  # speculative decoding; 0 skips it
            uncached=True,  # also time generation without caches (a full forward per token)
        )
    )
    return config
