"""Numpy references of the documented pruning rules (docs/pruning.md, docs/method.md section 3), written
from the text and from parameter names, not from the pruning code or its logical-axis metadata:
what a pruned checkpoint must hold, given the source weights and the saved calibration statistics.

Parameters are {dotted path: float64 array} in our layout (kernels [in, out], experts [E, in, out]).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

# Where a parameter holds the hidden (residual-stream) channels, by its name.
RESIDUAL_NORM = re.compile(
    r".*(input_layernorm|post_attention_layernorm|pre_fc_norm_\w+)\.weight|(model|mtp)\.norm\.weight"
)
HIDDEN_FIRST = re.compile(  # [D, ...]: projections that read the residual stream, router, lm_head
    r".*(q_proj|k_proj|v_proj|in_proj_qkvz|in_proj_ba|gate_proj|up_proj|mlp\.gate|shared_expert_gate)\.kernel"
    r"|lm_head\.kernel"
)
HIDDEN_LAST = re.compile(r".*(o_proj|out_proj|down_proj)\.kernel|.*experts\.down_proj|.*embed_tokens\.embedding")
EXPERTS_IN = re.compile(r".*experts\.(gate_proj|up_proj)")  # [E, D, F]
MTP_FC = "mtp.fc.kernel"  # [2D, D]: input [embedding half | hidden half]


def load_stats(path: Path) -> tuple[dict[str, np.ndarray], int]:
    """(sums, token count) of a saved statistics file, read with numpy and json only."""
    with np.load(path) as arrays:
        sums = {key: np.asarray(arrays[key], np.float64) for key in arrays.files}
    return sums, json.loads(path.with_suffix(".json").read_text())["num_tokens"]


def residual_norm_modules(kept_layers, num_mtp_layers: int) -> list[str]:
    """The residual-stream norms of a model with decoder layers `kept_layers` (source indices)."""
    layer_norms = ("input_layernorm", "post_attention_layernorm")
    modules = [f"model.layers.{i}.{n}" for i in kept_layers for n in layer_norms] + ["model.norm"]
    if num_mtp_layers:
        modules += ["mtp.pre_fc_norm_embedding", "mtp.pre_fc_norm_hidden", "mtp.norm"]
        modules += [f"mtp.layers.{d}.{n}" for d in range(num_mtp_layers) for n in layer_norms]
    return modules


def kept_channels(sums, num_tokens, norm_modules, width: int) -> np.ndarray:
    """The `width` channels of highest mean over `norm_modules` of mean |norm output|, in order."""
    importance = np.mean([sums[f"{m}:abs_output"] / num_tokens for m in norm_modules], axis=0)
    order = sorted(range(len(importance)), key=lambda k: (-importance[k], k))  # ties: lower index
    return np.array(sorted(order[:width]))


def gather_channels(
    path: str, value: np.ndarray, keep: np.ndarray, hidden_size: int, rescale_norms: bool = True
) -> np.ndarray:
    """`value` restricted to hidden channels `keep`; with `rescale_norms`, a residual-stream norm's
    scale (1 + w) times sqrt(D / d') (else the norm weight is only sliced, like everything else)."""
    if RESIDUAL_NORM.fullmatch(path):
        return np.sqrt(hidden_size / len(keep)) * (1.0 + value[keep]) - 1.0 if rescale_norms else value[keep]
    if path == MTP_FC:
        return value[np.concatenate([keep, hidden_size + keep])][:, keep]
    if EXPERTS_IN.fullmatch(path):
        return value[:, keep]
    if HIDDEN_LAST.fullmatch(path):
        return value[..., keep]
    if HIDDEN_FIRST.fullmatch(path):
        return value[keep]
    return value


def most_similar_block(sums, layer_types, n: int) -> int:
    """The first layer l of the block of n adjacent layers that depth `block_similarity` removes:
    the highest cosine between layer l's `residual_in` and layer l + n - 1's `residual_out` (sums
    stand in for means: the token count cancels), ties to the lower l, among the blocks that leave a
    full-attention layer (when the model has any)."""
    full = {i for i, kind in enumerate(layer_types) if kind == "full_attention"}
    candidates = []
    for start in range(len(layer_types) - n + 1):
        a, b = sums[f"model.layers.{start}:residual_in"], sums[f"model.layers.{start + n - 1}:residual_out"]
        if not full or full - set(range(start, start + n)):
            candidates.append((-float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)), start))
    return min(candidates)[1]


def expert_importance(sums, moe: str, kind: str) -> np.ndarray:
    """[E] frequency, soft_logits or reap importance of MoE block `moe` (token count cancels in the
    ranking and the merge weights, so sums stand in for means)."""
    selected = sums[f"{moe}:selected"]
    if kind == "frequency":
        return selected
    if kind == "soft_logits":
        return sums[f"{moe}:weight"]
    return np.array([r / s if s > 0 else 0.0 for r, s in zip(sums[f"{moe}:reap"], selected)])


def cosine_matrix(vectors: np.ndarray) -> np.ndarray:
    """[E, X] -> [E, E] cosine similarities in float64."""
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return unit @ unit.T


def expert_vectors(params, moe: str) -> np.ndarray:
    """[E, 3 D F]: each expert's gate, up and down weights flattened (expert_vector similarity)."""
    weights = [params[f"{moe}.experts.{name}"] for name in ("gate_proj", "up_proj", "down_proj")]
    return np.concatenate([w.reshape(w.shape[0], -1) for w in weights], axis=1)


def expert_groups(importance, similarity, num_experts: int, num_preserved: int) -> list[list[int]]:
    """The old experts that make up each new expert (new experts ordered by their survivor's old
    index): the top `num_preserved` by importance alone, the next ones bases, every other expert
    added to the base it is most similar to."""
    ranked = sorted(range(len(importance)), key=lambda i: (-importance[i], i))
    bases = ranked[num_preserved:num_experts]
    groups = {i: [i] for i in ranked[:num_experts]}
    for joiner in ranked[num_experts:]:
        if bases:
            groups[max(bases, key=lambda base: similarity[joiner, base])].append(joiner)
    return [groups[survivor] for survivor in sorted(groups)]


def merged_experts(weight: np.ndarray, groups, importance) -> np.ndarray:
    """[E, ...] -> [E', ...]: each new expert sum_j I_j W_j / sum_j I_j over its group (the plain
    mean when every I_j is 0)."""
    merged = []
    for group in groups:
        weights = np.array([importance[j] for j in group], np.float64)
        weights = weights / weights.sum() if weights.sum() > 0 else np.full(len(group), 1.0 / len(group))
        merged.append(sum(w * weight[j] for w, j in zip(weights, group)))
    return np.stack(merged)
