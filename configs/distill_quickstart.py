"""python -m slimqwen_jax.train --config configs/distill_quickstart.py --config.workdir=runs/distill_quickstart

Distil the quickstart model (the teacher: run configs/quickstart.py first, it writes
runs/quickstart/checkpoints/500) into a smaller student on the same embedded corpus, with
SlimQwen's four-term objective: (1 - lam) CE + lam KD + beta ((1 - lam) MTP-CE + lam MTP-KD),
lam linear 1.0 -> 0.75, beta cosine 0.3 -> 0.1 (docs/method.md section 4). The student here starts
from random init; the prune -> distill pipeline starts it from the pruned teacher instead.
Override the teacher with --config.teacher=<HF directory or checkpoint directory>;
docs/distillation.md shows a measured run.
"""

import ml_collections

from configs.quickstart import get_config as quickstart_config
from slimqwen_jax.run_config import loss_section


def get_config() -> ml_collections.ConfigDict:
    config = quickstart_config()  # same data, batch, optimizer and layout as the teacher's run
    config.workdir = "runs/distill_quickstart"
    config.teacher = "runs/quickstart/checkpoints/500"
    # Two thirds of the teacher's width, half its experts; same layout (3 linear + 1 full attention).
    config.model.update(hidden_size=64, num_experts=4, moe_intermediate_size=64, shared_expert_intermediate_size=64)
    config.train.update(steps=300, eval_every=50)
    config.loss = loss_section(distillation=True)
    config.loss.teacher_dtype = "float32"  # the tiny teacher is float32 end to end on the CPU
    return config
