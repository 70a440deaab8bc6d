"""python -m slimqwen_jax.prune --config configs/prune_tiny.py --config.output=runs/prune_tiny/model

Prune a tiny Qwen3-Next (the `tiny` preset with 6 layers, randomly initialised; pass
`--config.source=` an HF directory or one of our checkpoints to prune a trained one) along all
three axes: 6 -> 4 layers (last; layer 3 is the full-attention one), hidden 64 -> 48, 8 -> 6
experts (REAP importance, partial preservation, expert-vector similarity), top-2 kept.
Calibration: 64 stdlib sequences of 128 bytes. Prints the architecture and parameter counts before
and after and writes the checkpoint, its calibration statistics (`<output>.calibration.npz`) and,
with `--config.export_hf=DIR`, an HF directory; docs/pruning.md shows a measured run.
"""

import ml_collections

from slimqwen_jax.config import tiny
from slimqwen_jax.run_config import model_section, prune_base_config


def get_config() -> ml_collections.ConfigDict:
    config = prune_base_config()
    config.model = model_section(tiny(num_hidden_layers=6))  # only read when source is ""
    config.output = "runs/prune_tiny/model"
    config.calibration.update(seq_len=128, log_every=2)
    config.depth.num_layers_to_remove = 2
    config.width.update(hidden_size=48, multiple_of=16)
    config.experts.num_experts = 6
    return config
