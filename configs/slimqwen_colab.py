"""python -m slimqwen_jax.pipeline --config configs/slimqwen_colab.py --config.workdir=runs/slimqwen_colab

The SlimQwen pipeline of notebooks/slimqwen_quickstart.ipynb: smaller than the main job
(configs/slimqwen_tiny.py) so that it runs in about three minutes on two CPU cores. A teacher
(8 layers, 3 linear + 1 full attention twice, hidden 64, 8 experts top-2, MTP) pretrained from
scratch for 150 steps of 8 x 128 bytes of the embedded corpus; a student that starts as the teacher
and is pruned and distilled in two depth_first stages (10% / 90% of 120 steps): stage 1 removes 2
layers and merges 8 -> 4 experts, stage 2 removes 2 more layers and cuts the width 64 -> 48; the
from-scratch baseline (the student's final architecture, random init, same objective and tokens).
"""

import ml_collections

from slimqwen_jax.compression import PruneSpec, WidthSpec
from slimqwen_jax.config import tiny
from slimqwen_jax.run_config import base_config, depth_first, loss_section, model_section

TEACHER = tiny(num_hidden_layers=8)  # hidden 64, 4 heads of 16, 8 experts top-2, MTP
TARGET = TEACHER.replace(num_hidden_layers=4, layer_types=None, hidden_size=48, num_experts=4)
TEACHER_STEPS, STUDENT_STEPS = 150, 120


def teacher_config(workdir: str) -> ml_collections.ConfigDict:
    """Pretraining of the teacher: LM + MTP loss."""
    config = base_config()
    config.workdir = f"{workdir}/teacher"
    config.model = model_section(TEACHER)
    config.data.seq_len = 128
    # Held-out loss every 30 steps; MTP acceptance is measured once, by the notebook's evaluation.
    config.train.update(steps=TEACHER_STEPS, log_every=30, eval_every=30, checkpoint_every=1000, eval_batches=4,
                        eval_mtp_drafts=0)  # fmt: skip
    return config


def get_config() -> ml_collections.ConfigDict:
    workdir = "runs/slimqwen_colab"
    config = teacher_config(workdir)
    teacher = f"{workdir}/teacher/checkpoints/{TEACHER_STEPS}"
    config.update(workdir=workdir, init_from=teacher, teacher=teacher)
    config.train.steps = 0  # the sum of the stages
    config.loss = loss_section(distillation=True)
    config.loss.teacher_dtype = "float32"  # the tiny teacher runs in float32 on the CPU
    config.stages = depth_first(TEACHER, TARGET, STUDENT_STEPS, split=(0.1, 0.9),
                                methods=PruneSpec(width=WidthSpec(multiple_of=16)))  # fmt: skip
    config.calibration.update(num_samples=16, seq_len=128)
    config.pipeline.teacher = teacher_config(workdir)
    config.pipeline.baselines = ("from_scratch",)
    return config
