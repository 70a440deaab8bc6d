"""python -m slimqwen_jax.reproduce --config configs/reproduce.py [--quick] [--scale 2] [--list]

The paper's findings at small scale: Tables 1, 2, 3, 4, 5 and 8 of SlimQwen (docs/method.md) as
one reproduction on the embedded corpus (the Python standard library, bytes).

The regime: a teacher pretrained once (8 layers, 3 linear + 1 full attention twice, hidden 128,
16 experts top-4, MTP) on 6.25x the tokens of any student (500 against 80 steps). The target cut is the paper's ratios:
depth -25% (8 -> 6 layers), width -25% (hidden 128 -> 96), experts -50% (16 -> 8), top-k 4 -> 3.
Every student trains on the same tokens (the same budget, and for one seed the same data order).
Table 2 compresses only the experts, 4x (16 -> 4, top-k 4 -> 2); Table 8 cuts only the depth.
`scale` multiplies the widths (hidden, expert and shared-expert sizes) and every budget.
"""

import ml_collections

from slimqwen_jax.config import tiny
from slimqwen_jax.reproduce import Reproduction, Row, Table, chain
from slimqwen_jax.run_config import base_config, evaluate_base_config, loss_section, model_section

DESCRIPTION = """The paper's regime in miniature, on the Python standard library's own source files
(byte-tokenised): a teacher pretrained once (8 layers, 3 linear + 1 full attention twice, hidden 128,
16 experts top-4, MTP), then students that start as the teacher, are cut to the paper's ratios
(depth -25%: 8 -> 6 layers; width -25%: hidden 128 -> 96; experts -50%: 16 -> 8; top-k 4 -> 3) and
distil from it. The base student (`full`) cuts in two `depth_first` stages (10% / 90% of its
budget) with the four-term loss; every other run changes one thing (the table "The runs" below).
Table 2 compresses only the experts, 4x (16 -> 4, top-k 4 -> 2), Table 8 only the depth, each in
one stage. The paper's numbers are benchmark scores (higher is better) of 80A3B -> 23A2B after
120B-400B tokens; ours are held-out cross-entropies (lower is better), so only orderings compare."""
TEACHER_STEPS, STUDENT_STEPS = 500, 80  # each student's budget is under a fifth of the teacher's tokens
DRAFTS = 5  # acc_0 .. acc_4, as the paper's Table 4


def teacher_model(scale: int):
    return tiny(
        vocab_size=260, hidden_size=128 * scale, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32,
        linear_value_head_dim=32, num_experts=16, num_experts_per_tok=4, moe_intermediate_size=64 * scale,
        shared_expert_intermediate_size=64 * scale, num_mtp_layers=1,
    )  # fmt: skip


def common(config: ml_collections.ConfigDict, scale: int) -> ml_collections.ConfigDict:
    config.model = model_section(teacher_model(scale))
    config.train.update(eval_every=20 * scale, eval_batches=8, eval_mtp_drafts=DRAFTS, checkpoint_every=100 * scale,
                        log_every=25)  # fmt: skip
    return config


def teacher_config(scale: int = 1) -> ml_collections.ConfigDict:
    """The teacher's pretraining: LM + MTP loss from a random init."""
    config = common(base_config(), scale)
    config.train.update(steps=TEACHER_STEPS * scale, eval_every=100 * scale, checkpoint_every=100 * scale)
    return config


def student_config(scale: int = 1) -> ml_collections.ConfigDict:
    """Every student's base: the teacher pruned to the target in two depth_first stages (10% / 90%
    of the budget) and distilled with the full four-term loss; evaluated at each stage's start too
    (the one-shot loss). The command sets init_from and teacher to the teacher's checkpoint."""
    config = common(base_config(), scale)
    config.train.steps = 0
    config.train.eval_at_start = True
    config.loss = loss_section(distillation=True)
    config.loss.teacher_dtype = "float32"  # the small teacher runs in float32 on the CPU
    config.schedule = "depth_first"
    config.schedule_options.steps = STUDENT_STEPS * scale
    config.schedule_options.depth.num_layers_to_remove = 2
    config.schedule_options.width.update(hidden_size=96 * scale, multiple_of=16)
    config.schedule_options.experts.update(num_experts=8, num_experts_per_tok=3)
    return config


def evaluation_config(scale: int = 1) -> ml_collections.ConfigDict:
    """The evaluation of a finished student (speculative acceptance): greedy decoding of held-out
    prompts with MTP drafts verified by the backbone."""
    config = evaluate_base_config()
    config.heldout.update(num_batches=2, num_drafts=DRAFTS)
    config.decoding.update(num_prompts=8, prompt_len=64, max_new_tokens=64, num_drafts=DRAFTS, uncached=False)
    return config


def constant(name: str, value: float) -> dict:
    """Overrides that hold the loss weight `name` (lam, mtp_lam, beta) at `value`."""
    return {f"loss.{name}.schedule": "constant", f"loss.{name}.start": value, f"loss.{name}.end": value}


def alone(**cut) -> dict:
    """Overrides for one one-stage cut of a single kind: `depth`, `width` and `experts` sub-keys."""
    overrides = {"schedule": "one_stage", "schedule_options.depth.num_layers_to_remove": 0,
                 "schedule_options.width.hidden_size": 0, "schedule_options.experts.num_experts": 0,
                 "schedule_options.experts.num_experts_per_tok": 0}  # fmt: skip
    overrides.update({f"schedule_options.{key.replace('__', '.')}": value for key, value in cut.items()})
    return overrides


EXPERTS_4X = dict(experts__num_experts=4, experts__num_experts_per_tok=2)
IMPORTANCES = ("frequency", "soft_logits", "reap")
SIMILARITIES = ("router_logits", "router_weights", "expert_vector")
MERGES = (
    ("merge", "merge", "merge"),
    ("pp", "partial_preservation", "merge + partial preservation"),
)  # run, method, row


def expert_run(prefix: str, choice: str) -> str:
    return f"{prefix}-{choice.replace('_', '-')}"


EXPERT_RUNS = {
    **{expert_run("prune", imp): alone(**EXPERTS_4X, experts__method="prune", experts__importance=imp)
       for imp in IMPORTANCES},
    **{expert_run(prefix, sim): alone(**EXPERTS_4X, experts__method=method, experts__importance="reap",
                                      experts__similarity=sim)
       for prefix, method, _ in MERGES for sim in SIMILARITIES},
}  # fmt: skip
EXPERT_ROWS = (
    *(Row(f"prune, {imp}", expert_run("prune", imp)) for imp in IMPORTANCES),
    *(Row(f"{label}, reap + {sim}", expert_run(prefix, sim)) for prefix, _, label in MERGES for sim in SIMILARITIES),
)
# The paper: partial preservation beats plain merging, and REAP + expert_vector + preservation (the
# last row) is best of all.
EXPERT_CLAIMS = tuple(dict.fromkeys((
    *((EXPERT_ROWS[3 + i].label, EXPERT_ROWS[6 + i].label) for i in range(len(SIMILARITIES))),
    *((row.label, EXPERT_ROWS[-1].label) for row in EXPERT_ROWS[:-1]),
)))  # fmt: skip
RUNS = {
    "full": {},  # depth_first, the four-term loss: Tables 1, 3, 4 and 5 share it
    "lm-only": {"baseline": "pruned_lm_only"},
    "scratch-kd": {"baseline": "from_scratch"},
    "kd": {**constant("lam", 1.0), **constant("beta", 0.0)},
    "kd-lm": constant("beta", 0.0),
    "kd-mtpkd": constant("lam", 1.0),  # the MTP terms' KD share follows lam: MTP-KD only
    "kd-lm-mtplm": constant("mtp_lam", 0.0),
    "one-stage": {"schedule": "one_stage"},
    "joint": {"schedule": "joint"},
    "width-first": {"schedule": "width_first"},
    **EXPERT_RUNS,
    "depth-last": alone(depth__num_layers_to_remove=2, depth__method="last"),
    "depth-block": alone(depth__num_layers_to_remove=2, depth__method="block_similarity"),
    "depth-influence": alone(depth__num_layers_to_remove=2, depth__method="similarity"),
}

LOSS_METRICS = ("heldout_ce", "kl", "top1_agreement", "tf_acc_0")
TABLES = (
    Table(
        "table1",
        "Table 1: pruned + KD against its baselines (the paper's Fig. 2: the loss curves)",
        (
            Row("random init + KD", "scratch-kd", 61.66),
            Row("pruned + LM only", "lm-only", 69.96),
            Row("pruned + KD (full loss)", "full", 73.45),
        ),
        LOSS_METRICS,
        paper_metric="average of 8 benchmarks, 80A3B -> 23A2B, 120B tokens",
        curves=True,
    ),
    Table(
        "table3",
        "Table 3: the training objective",
        (
            Row("KD", "kd"),
            Row("KD + LM", "kd-lm"),
            Row("KD + MTP-KD", "kd-mtpkd"),
            Row("KD + LM + MTP-LM", "kd-lm-mtplm"),
            Row("KD + LM + MTP-KD (full)", "full"),
        ),
        LOSS_METRICS,
        paper_metric="8-benchmark average, 120B tokens (the ordering only: no numbers here)",
        claims=chain("KD", "KD + LM", "KD + LM + MTP-LM", "KD + LM + MTP-KD (full)"),
    ),
    Table(
        "table4",
        "Table 4: the MTP head trained with MTP-LM or MTP-KD: speculative acceptance",
        (Row("MTP-LM head", "kd-lm-mtplm", 2.37), Row("MTP-KD head", "full", 10.37)),
        tuple(f"tf_acc_{k}" for k in range(DRAFTS)) + tuple(f"spec_acc_{k}" for k in range(DRAFTS)),
        paper_metric="acc_4 on GSM8K (%)",
        rank_by="spec_acc_4",
        bars=("tf_acc_0", "tf_acc_4", "spec_acc_0", "spec_acc_4"),
    ),  # fmt: skip
    Table(
        "table5",
        "Table 5: progressive schedules at equal tokens",
        (
            Row("one-stage", "one-stage", 75.86),
            Row("joint", "joint", 76.30),
            Row("width-first", "width-first", 77.14),
            Row("depth-first", "full", 77.39),
        ),
        LOSS_METRICS,
        paper_metric="MMLU, 400B tokens",
    ),
    Table(
        "table2",
        "Table 2: expert compression alone (16 -> 4 experts, top-k 4 -> 2), one-shot and after KD",
        EXPERT_ROWS,
        ("oneshot_ce", "heldout_ce", "kl", "top1_agreement"),
        paper_metric="benchmark average after long continual training (the ordering only)",
        claims=EXPERT_CLAIMS,
        paper_claim="after long continual training every one-shot method lands within about 1.3 points; merging "
        "with partial preservation is slightly best, REAP + expert_vector + preservation best of all",
        bars=("oneshot_ce", "heldout_ce"),
    ),  # fmt: skip
    Table(
        "table8",
        "Table 8: which layers the depth cut removes (8 -> 6 layers), one-shot and after KD",
        (
            Row("last", "depth-last", 73.0),
            Row("block similarity", "depth-block"),
            Row("ShortGPT influence", "depth-influence", 69.6),
        ),
        ("oneshot_ce", "heldout_ce", "kl", "top1_agreement"),
        paper_metric="MMLU after training (the similarity-based cut's number is the paper's one similarity row)",
        bars=("oneshot_ce", "heldout_ce"),
    ),
)


def get_reproduction(scale: int = 1) -> Reproduction:
    return Reproduction(
        teacher=teacher_config(scale), student=student_config(scale), evaluation=evaluation_config(scale),
        runs=RUNS, tables=TABLES, speculative_runs=("kd-lm-mtplm", "full"), description=DESCRIPTION,
    )  # fmt: skip
