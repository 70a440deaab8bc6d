"""python -m slimqwen_jax.train --config configs/quickstart.py --config.workdir=runs/quickstart

Quickstart: pretrain a tiny Qwen3-Next (3 linear + 1 full attention layers, MoE with 8 experts
top-2, MTP) on the Python standard library's own .py files, byte-tokenised; nothing is downloaded.
500 steps of 8 x 256 tokens. It prints a progress line every 20 steps (loss, tokens/s, ETA) and the
held-out loss every 100, and writes checkpoints, tensorboard logs, summary.json and loss_curve.png
to the workdir; docs/quickstart.md shows a measured run (time and held-out loss). Rerunning the same
command resumes from the latest checkpoint in the workdir.
"""

import ml_collections

from slimqwen_jax.config import tiny
from slimqwen_jax.run_config import base_config, model_section

# The quickstart model (the teacher of configs/distill_quickstart.py).
MODEL = tiny(
    vocab_size=260, hidden_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32, linear_value_head_dim=32,
    num_experts=8, num_experts_per_tok=2, moe_intermediate_size=96, shared_expert_intermediate_size=96,
    num_mtp_layers=1,
)  # fmt: skip


def get_config() -> ml_collections.ConfigDict:
    config = base_config()  # LM + 0.3 x MTP loss (+ MoE aux loss), 500 steps of 8 x 256 tokens
    config.workdir = "runs/quickstart"
    config.model = model_section(MODEL)
    return config
