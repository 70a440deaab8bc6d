"""Rematerialisation of the decoder layers (config `remat_policy`, slimqwen_jax.remat): every policy
gives the gradients of no rematerialisation, scanned and unrolled, and keeps what it says it keeps
(the residuals `jax.ad_checkpoint.print_saved_residuals` reports)."""

import contextlib
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals

from slimqwen_jax import remat
from slimqwen_jax.config import ConfigError, tiny
from slimqwen_jax.layers import InitKeys
from slimqwen_jax.model import Qwen3NextForCausalLM

IDS = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 16)))


def loss_of(policy: str, scan: bool):
    """The mean squared logits of a 4-layer model (one scanned block of the 3:1 pattern) as a
    function of its parameters, and those parameters."""
    cfg = tiny(num_hidden_layers=4, remat_policy=policy, scan_layers=scan)
    graphdef, params = nnx.split(Qwen3NextForCausalLM(cfg, rngs=InitKeys(0)), nnx.Param)
    return (lambda p: jnp.mean(nnx.merge(graphdef, p)(IDS).logits ** 2)), params


def saved_residuals(policy: str) -> list[str]:
    loss, params = loss_of(policy, scan=False)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(loss, params)
    return out.getvalue().splitlines()


@pytest.fixture(scope="module")
def reference_grads():
    loss, params = loss_of("none", scan=False)
    return jax.jit(jax.grad(loss))(params)


@pytest.mark.parametrize(
    "policy, scan", [("full", True), ("dots", False), ("save:qkv_proj,mixer_out", True)]
)
def test_gradients_equal_those_without_remat(policy, scan, reference_grads):
    loss, params = loss_of(policy, scan)
    grads = jax.jit(jax.grad(loss))(params)
    errors = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), grads, reference_grads))
    assert max(errors) < 1e-6


def test_policies_keep_what_they_name():
    kept = {policy: saved_residuals(policy) for policy in ("none", "full", "save_qkv_proj", "minimal")}
    named = {policy: {n for n in remat.CHECKPOINT_NAMES if any(f"named '{n}'" in r for r in lines)}
             for policy, lines in kept.items() if policy != "none"}  # fmt: skip
    assert named == {"full": set(), "save_qkv_proj": {"qkv_proj"}, "minimal": {"qkv_proj", "mixer_out"}}
    # "full" keeps the least: each layer's input, not its internals.
    assert len(kept["full"]) < len(kept["save_qkv_proj"]) < len(kept["none"])


@pytest.mark.parametrize("policy", ["everything", "save:", "save:qkv_proj,o_proj"])
def test_bad_policies_are_named(policy):
    with pytest.raises(ConfigError, match="remat_policy"):
        tiny(remat_policy=policy)
