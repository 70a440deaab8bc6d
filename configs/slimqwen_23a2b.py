"""python -m slimqwen_jax.train --config configs/slimqwen_23a2b.py --config.dry_run=True

The paper's recipe (docs/method.md sections 2-5): Qwen3-Next-80B-A3B (teacher, and the student's
start) -> SlimQwen-23A2B in two depth_first stages on 400B tokens, 40B + 360B: stage 1 removes 6 of
the 12 layers to remove (the last ones) and compresses 512 -> 256 experts, top-10 -> top-8 (REAP
importance, partial preservation of half, expert-vector similarity); stage 2 removes the other 6
layers and cuts the width 2048 -> 1536. Loss: the four terms with lam linear 1.0 -> 0.75 and beta
cosine 0.3 -> 0.1 over the run, MTP-KD from the teacher's MTP head. Global batch 1,024 sequences of
4,096 tokens (the sequence length is our assumption), AdamW peak 4e-4, 2,000 warmup steps, cosine
to 3e-5, no re-warmup in stage 2. Mesh: 256 chips (v5e-256, v6e-256; --config.mesh.fsdp=-1 takes
any other slice: 16 on v5p-256), fsdp 32 x expert 8, experts exchanged with expert parallelism;
calibration on 1,024 sequences before each stage. To fit at this batch (docs/tpu.md): the layers
scanned and fully rematerialised, 4 micro-batches per step; on v5e (16 GiB a chip) also
--config.model.moe_capacity_factor=2.0 --config.loss.chunk_size=256. Compile each stage for a slice
before booking it:
  --config.dry_run=True --config.compile_topology=v5p-256 --config.mesh.fsdp=-1

The stages come from `config.schedule` (a preset) and the whole cut in `config.schedule_options`, so
another schedule is one flag away: `--config.schedule=joint` (or one_stage, width_first, n_stage
with --config.schedule_options.num_stages=3), `--config.schedule_options.split="(0.2,0.8)"`.

The dry run prints each stage's architecture, parameter counts, steps, tokens and per-device
memory without weights (docs/stages.md). The real run needs the checkpoint:
  --config.init_from=/path/to/Qwen3-Next-80B-A3B --config.teacher=/path/to/Qwen3-Next-80B-A3B
"""

import ml_collections

from slimqwen_jax.config import qwen3_next_80b_a3b, slimqwen_23a2b
from slimqwen_jax.run_config import base_config, loss_section, model_section, optimizer_section

GLOBAL_BATCH, SEQ_LEN = 1024, 4096
TOKENS = 400 * 10**9


def get_config() -> ml_collections.ConfigDict:
    source = qwen3_next_80b_a3b(dtype="bfloat16", param_dtype="float32", moe_backend="expert_parallel",
                                scan_layers=True, remat_policy="full")  # fmt: skip
    steps = -(-TOKENS // (GLOBAL_BATCH * SEQ_LEN))
    config = base_config()
    config.workdir = "runs/slimqwen_23a2b"
    config.init_from = "checkpoints/Qwen3-Next-80B-A3B"  # an HF directory: the student starts as the teacher
    config.teacher = "checkpoints/Qwen3-Next-80B-A3B"
    config.model = model_section(source)
    config.data.seq_len = SEQ_LEN  # point the data at the pretraining corpus: --config.data.source=tokens ...
    config.mesh.update(data=1, fsdp=32, expert=8)
    config.train.update(steps=0, global_batch_size=GLOBAL_BATCH, grad_accum_steps=4, log_every=10, eval_every=1000, eval_batches=16,
                        eval_batch_size=64, checkpoint_every=1000)  # fmt: skip
    config.loss = loss_section(distillation=True)
    config.optimizer = optimizer_section(peak_lr=4e-4, end_lr=3e-5, warmup_steps=2000, weight_decay=0.1)
    target = slimqwen_23a2b()
    config.schedule = "depth_first"
    options = config.schedule_options
    options.update(steps=steps, split=(0.1, 0.9), expert_stage=1)
    options.depth.num_layers_to_remove = source.num_hidden_layers - target.num_hidden_layers
    options.width.update(hidden_size=target.hidden_size, multiple_of=128)
    options.experts.update(num_experts=target.num_experts, num_experts_per_tok=target.num_experts_per_tok)
    config.calibration.update(num_samples=1024, seq_len=SEQ_LEN, batch_size=8, log_every=8)
    return config
