"""Rematerialisation of the decoder layers: what the backward pass keeps of each layer's forward
and what it recomputes (config `remat_policy`), the lever that trades FLOPs for activation memory.

A policy names what to keep. "none" keeps every residual the backward needs (no recomputation);
"full" keeps only each layer's input (one [B, T, D] per layer) and recomputes the layer in the
backward; the others keep chosen tensors and recompute the rest:
- "dots": every matmul output; "dots_no_batch": matmul outputs without batch dimensions;
- named tensors, tagged in the layers with `jax.ad_checkpoint.checkpoint_name` (`CHECKPOINT_NAMES`):
  "save_qkv_proj" (the attention's q/k/v and the linear attention's input projections: the
  backward recomputes no input projection), "save_mixer_out" (the residual stream between the
  token mixer and the MLP: the MLP's backward needs no rerun of the mixer), "minimal" (both), or
  any list as "save:<name>,<name>".

Only a tensor the backward reads is kept: a name on a value that only feeds an addition saves
nothing, which is why the layer output (the next layer's input, kept by every policy) has none.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

# The tensors the layers tag for the named policies.
CHECKPOINT_NAMES = ("qkv_proj", "mixer_out")
_PRESETS = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_qkv_proj": ("qkv_proj",),
    "save_mixer_out": ("mixer_out",),
    "minimal": ("qkv_proj", "mixer_out"),
}
REMAT_POLICIES = ("none", *_PRESETS, "save:<names>")


def saved_names(policy: str) -> tuple[str, ...] | None:
    """The tensor names a named policy keeps; None for "none" and the unnamed presets."""
    if policy.startswith("save:"):
        return tuple(name.strip() for name in policy[len("save:") :].split(",") if name.strip())
    preset = _PRESETS.get(policy)
    return preset if isinstance(preset, tuple) else None


def policy_problems(policy: str) -> list[str]:
    """What is wrong with a `remat_policy` value (empty when it is valid)."""
    if policy == "none" or policy in _PRESETS:
        return []
    if not policy.startswith("save:"):
        return [f"remat_policy {policy!r} not in {REMAT_POLICIES}"]
    names = saved_names(policy)
    if not names or any(name not in CHECKPOINT_NAMES for name in names):
        return [f"remat_policy {policy!r}: names must be a non-empty list of {CHECKPOINT_NAMES}, got {list(names)}"]
    return []


def rematerialize(fn: Callable, policy: str) -> Callable:
    """`fn` under `jax.checkpoint` with `policy`'s saving rule; `fn` itself for "none"."""
    if policy == "none":
        return fn
    names = saved_names(policy)
    rule = jax.checkpoint_policies.save_only_these_names(*names) if names is not None else _PRESETS[policy]
    return jax.checkpoint(fn, policy=rule, prevent_cse=False)
