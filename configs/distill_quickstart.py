"""python -m slimqwen_jax.train --config configs/distill_quickstart.py --config.workdir=runs/distill_quickstart

Distil the quickstart model (the teacher: run configs/quickstart.py first, it writes
runs/quickstart/checkpoints/500) into a smaller student on the same embedded corpus, with
SlimQwen's four-term objective: (1 - lam) CE + lam KD + beta ((1 - lam) MTP-CE + lam MTP-KD),
lam linear 1.0 -> 0.75, beta cosine 0.3 -> 0.1 (method.md section 4). The student here starts from
random init; the prune -> distill pipeline starts it from the pruned teacher instead.
Override the teacher with --config.teacher=<HF directory or checkpoint directory>.
"""

import ml_collections

from slimqwen_jax.config import tiny
from slimqwen_jax.data import default_data_config
from slimqwen_jax.losses import loss_config
from slimqwen_jax.train import optimizer_config


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.workdir = "runs/distill_quickstart"
    config.init_from = ""
    config.teacher = "runs/quickstart/checkpoints/500"
    config.seed = 0
    # Two thirds of the teacher's width, half its experts; same layout (3 linear + 1 full attention).
    config.model = tiny(
        vocab_size=260, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32, linear_value_head_dim=32,
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=64,
        num_mtp_layers=1,
    ).to_flag_dict()  # fmt: skip
    config.data = default_data_config()
    config.data.seq_len = 256
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=1))
    config.train = ml_collections.ConfigDict(
        dict(
            steps=300,
            global_batch_size=8,
            grad_accum_steps=1,
            log_every=20,
            eval_every=50,
            eval_batches=8,
            eval_batch_size=8,
            eval_mtp_drafts=3,  # teacher-forced MTP acceptance acc_1..acc_3 at each evaluation
            checkpoint_every=100,
            keep_checkpoints=2,
        )
    )
    config.loss = loss_config(distillation=True)
    config.loss.teacher_dtype = "float32"  # the tiny teacher is float32 end to end on the CPU
    config.optimizer = optimizer_config()
    return config
