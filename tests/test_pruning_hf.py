"""A model pruned along every axis, exported to HF, loads in transformers with identical logits."""

import numpy as np
import torch
from flax import nnx
from hf_reference import add_mtp_tensors, make_hf_model
from transformers import Qwen3NextForCausalLM as HFModel

from slimqwen_jax import hf
from slimqwen_jax.compression import (
    DepthSpec,
    ExpertSpec,
    PruneSpec,
    WidthSpec,
    build_model,
    calibrate,
    layers_to_keep,
    prune,
)
from slimqwen_jax.testing import max_relative_error


def test_pruned_export_loads_in_transformers_with_identical_logits(tmp_path):
    source = tmp_path / "source"
    # Layers [full, linear, full, linear], MoE every 2nd, D 48, 6 experts top-3 unnormalised, tied.
    make_hf_model("mha_ratio1_tied").save_pretrained(source)
    add_mtp_tensors(source)
    model = hf.load_model(source)
    rng = np.random.default_rng(0)
    stats = calibrate(model, rng.integers(0, 97, (4, 32)), batch_size=4)
    spec = PruneSpec(
        DepthSpec("similarity", 1),
        WidthSpec(32, multiple_of=16),
        ExpertSpec(4, 2, importance="soft_logits", method="merge", similarity="router_logits"),
    )
    cfg, params, _ = prune(model.config, nnx.state(model), spec, stats)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_experts) == (3, 32, 4)
    kept, _ = layers_to_keep(model.config, spec.depth, stats)
    assert [cfg.is_moe_layer(j) for j in range(3)] == [model.config.is_moe_layer(i) for i in kept]
    pruned = build_model(cfg, params)
    exported = hf.save_model(pruned, tmp_path / "pruned")
    reloaded = HFModel.from_pretrained(exported, attn_implementation="eager").eval()
    ids = rng.integers(0, 97, (2, 40))
    with torch.no_grad():
        theirs = reloaded(torch.tensor(ids)).logits.float().numpy()
    error = max_relative_error(nnx.jit(lambda m, x: m(x, with_mtp=False).logits)(pruned, ids), theirs)
    print(f"pruned model exported to HF: max relative logit error {error:.1e}")
    assert error <= 1e-5
    mtp_ours = pruned.mtp.layers[0].mlp.experts.down_proj[...]
    mtp_back = hf.load_model(exported).mtp.layers[0].mlp.experts.down_proj[...]
    np.testing.assert_array_equal(np.asarray(mtp_back), np.asarray(mtp_ours))
