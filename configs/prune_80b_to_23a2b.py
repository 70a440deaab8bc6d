"""python -m slimqwen_jax.prune --config configs/prune_80b_to_23a2b.py --config.dry_run=True

The SlimQwen plan (docs/method.md sections 2-3): Qwen3-Next-80B-A3B -> SlimQwen-23A2B in one shot.
Depth: the last 12 of 48 layers (36 left: 27 linear + 9 full attention); width: hidden 2048 -> 1536;
experts: 512 -> 256 per MoE layer (REAP importance, partial preservation of half, expert-vector
similarity), top-k 10 -> 8; the MTP module is pruned like the backbone. The dry run above plans it
on abstract parameters and prints the total / active parameter counts before and after
(docs/pruning.md). The real run needs the checkpoint and an accelerator host:
  --config.source=/path/to/Qwen3-Next-80B-A3B --config.output=... [--config.export_hf=...]
"""

import ml_collections

from slimqwen_jax.config import qwen3_next_80b_a3b
from slimqwen_jax.run_config import model_section, prune_base_config


def get_config() -> ml_collections.ConfigDict:
    config = prune_base_config()
    config.model = model_section(qwen3_next_80b_a3b())  # the dry run's source; the real run reads --config.source
    config.dtype = "bfloat16"
    config.output = ""
    config.data.seq_len = 4096
    config.calibration.update(num_samples=1024, seq_len=4096, batch_size=8, log_every=8)
    config.depth.num_layers_to_remove = 12
    config.width.update(hidden_size=1536, multiple_of=128)
    config.experts.update(num_experts=256, num_experts_per_tok=8)
    return config
