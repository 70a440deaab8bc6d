"""python -m slimqwen_jax.prune --config configs/prune_tiny.py --config.output=runs/prune_tiny/model

Prune a tiny Qwen3-Next (the `tiny` preset with 6 layers, randomly initialised; pass
`--config.source=` an HF directory or one of our checkpoints to prune a trained one) along all
three axes: 6 -> 4 layers (last; layer 3 is the full-attention one), hidden 64 -> 48, 8 -> 6
experts (REAP importance, partial preservation, expert-vector similarity), top-2 kept.
Calibration: 64 stdlib sequences of 128 bytes. Expected on a 2-core CPU: about 20 s (calibration
~11k tok/s); prints the architecture and parameter counts before and after (473K -> 208K total,
252K -> 134K active) and writes the checkpoint, its calibration statistics
(`<output>.calibration.npz`) and, with `--config.export_hf=DIR`, an HF directory.
"""

import ml_collections

from slimqwen_jax.config import tiny
from slimqwen_jax.data import default_data_config


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.source = ""  # an HF directory or our checkpoint; "" = `model` below, randomly initialised with `seed`
    config.model = tiny(num_hidden_layers=6).to_flag_dict()  # only read when source is ""
    config.seed = 0
    config.dtype = "float32"
    config.output = "runs/prune_tiny/model"  # our checkpoint; must not exist
    config.export_hf = ""  # optional HF directory
    config.stats = ""  # calibration statistics (.npz): reused if it exists, else written; "" = <output>.calibration.npz
    config.dry_run = False  # plan on abstract parameters only; nothing is read or written
    config.data = default_data_config()
    config.calibration = ml_collections.ConfigDict(
        {"num_samples": 64, "seq_len": 128, "batch_size": 8, "seed": 0, "log_every": 2}
    )
    config.depth = ml_collections.ConfigDict({"method": "last", "num_layers_to_remove": 2})  # last | similarity
    config.width = ml_collections.ConfigDict({"hidden_size": 48, "multiple_of": 16})  # hidden_size 0 keeps the width
    config.experts = ml_collections.ConfigDict(
        {
            "num_experts": 6,  # 0 keeps the expert count
            "num_experts_per_tok": 0,  # 0 keeps top-k
            "importance": "reap",  # frequency | soft_logits | reap
            "method": "partial_preservation",  # prune | merge | partial_preservation
            "similarity": "expert_vector",  # router_logits | router_weights | expert_vector
            "preserve_fraction": 0.5,
        }
    )
    return config
