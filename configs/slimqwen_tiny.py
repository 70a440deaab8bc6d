"""python -m slimqwen_jax.pipeline --config configs/slimqwen_tiny.py --config.workdir=runs/slimqwen_tiny

The SlimQwen pipeline in miniature, on the embedded corpus (the Python standard library, bytes):
a teacher pretrained from scratch (8 layers, 3 linear + 1 full attention twice, hidden 96, 8
experts top-2, MTP; reused when its checkpoint is there), then a student that starts as the teacher
and is pruned and distilled in two depth_first stages (10% / 90% of the steps): stage 1 removes 2
layers and compresses 8 -> 4 experts, stage 2 removes 2 more layers (4 left, one 3:1 block) and
cuts the hidden width 96 -> 64; then the baselines at the same tokens: pruned + LM only (the same
stages without the KD terms) and from scratch (the student's final architecture from a random init,
same objective). The report (workdir/report.md, report.json, report.png) compares teacher,
pruned + KD, pruned + LM only and from scratch; docs/stages.md shows a measured run.

The pipeline points every run at its own root: `<workdir>/teacher`, `<workdir>/student` (teacher and
init_from set to the teacher's last checkpoint), `<workdir>/pruned_lm_only`, `<workdir>/from_scratch`. As a plain train config
(`python -m slimqwen_jax.train --config configs/slimqwen_tiny.py`) it runs the student's stages alone
in workdir, against the teacher checkpoint `teacher` names.
"""

import ml_collections

from slimqwen_jax.compression import PruneSpec, WidthSpec
from slimqwen_jax.config import tiny
from slimqwen_jax.run_config import base_config, depth_first, loss_section, model_section

TEACHER = tiny(
    vocab_size=260, hidden_size=96, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32, linear_value_head_dim=32,
    num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=64,
    num_mtp_layers=1,
)  # fmt: skip
TARGET = TEACHER.replace(num_hidden_layers=4, layer_types=None, hidden_size=64, num_experts=4)
TEACHER_STEPS, STUDENT_STEPS = 400, 300


def teacher_config(workdir: str) -> ml_collections.ConfigDict:
    """Pretraining of the teacher: LM + MTP loss, no teacher of its own."""
    config = base_config()
    config.workdir = f"{workdir}/teacher"
    config.model = model_section(TEACHER)
    config.train.update(steps=TEACHER_STEPS, eval_every=50)
    return config


def get_config() -> ml_collections.ConfigDict:
    workdir = "runs/slimqwen_tiny"  # the pipeline's root: teacher/, student/, from_scratch/, report.*
    config = teacher_config(workdir)
    teacher = f"{workdir}/teacher/checkpoints/{TEACHER_STEPS}"
    config.workdir = workdir
    config.init_from = teacher  # the student starts as the teacher
    config.teacher = teacher
    config.train.steps = 0  # the sum of the stages
    config.loss = loss_section(distillation=True)
    config.loss.teacher_dtype = "float32"  # the tiny teacher runs in float32 on the CPU
    config.stages = depth_first(TEACHER, TARGET, STUDENT_STEPS, split=(0.1, 0.9),
                                methods=PruneSpec(width=WidthSpec(multiple_of=16)))
    config.calibration.num_samples = 32
    config.pipeline.teacher = teacher_config(workdir)
    return config
