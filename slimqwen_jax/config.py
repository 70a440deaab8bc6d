"""Model configuration: Qwen3-Next architecture fields (HF names) plus run-time options.

`Qwen3NextConfig` is a frozen dataclass. Architecture fields use the names of HF's
`Qwen3NextConfig` so that `from_hf_dict` / `to_hf_dict` are a plain table; `num_mtp_layers`
(HF checkpoints carry it only as `mtp.*` tensors or `num_nextn_predict_layers`) and the run-time
options (dtypes, kernel choices) are ours.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from slimqwen_jax import remat

LINEAR_ATTENTION = "linear_attention"
FULL_ATTENTION = "full_attention"
LAYER_TYPES = (LINEAR_ATTENTION, FULL_ATTENTION)
GATED_DELTA_RULE_IMPLEMENTATIONS = ("chunked", "recurrent", "pallas")
MOE_BACKENDS = ("auto", "dense", "ragged", "grouped", "gmm", "expert_parallel")
ATTENTION_IMPLEMENTATIONS = ("reference", "chunked")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Fields that choose how the model runs, not what it computes: free to differ between checkpoints.
RUNTIME_FIELDS = (
    "dtype", "param_dtype", "gated_delta_rule_impl", "moe_backend", "moe_capacity_factor",
    "scan_layers", "attention_impl", "attention_chunk_size", "remat_policy",
)  # fmt: skip


class ConfigError(ValueError):
    """A model configuration that cannot describe a working Qwen3-Next model."""


def dtype_name(dtype: Any) -> str:
    """The name in DTYPES of a dtype given as a name ("bfloat16"), a scalar type (jnp.bfloat16) or
    a numpy / jax dtype; names that are no dtype at all come back unchanged (`validate` names them)."""
    try:
        return jnp.dtype(dtype).name
    except TypeError:
        return dtype


@dataclasses.dataclass(frozen=True)
class Qwen3NextConfig:
    """Architecture (HF field names) and run-time options of a Qwen3-Next model."""

    vocab_size: int = 151936
    hidden_size: int = 2048
    num_hidden_layers: int = 48
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.25
    max_position_embeddings: int = 32768
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    num_experts: int = 512
    num_experts_per_tok: int = 10
    moe_intermediate_size: int = 512
    shared_expert_intermediate_size: int = 512
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    intermediate_size: int = 5632
    router_aux_loss_coef: float = 0.001
    initializer_range: float = 0.02
    # None means HF's default pattern: full attention where (i + 1) % 4 == 0.
    layer_types: tuple[str, ...] | None = None
    # Ours: depth of the multi-token-prediction module (0 = none).
    num_mtp_layers: int = 1
    # Run-time options, not part of the architecture.
    dtype: str = "float32"
    param_dtype: str = "float32"
    gated_delta_rule_impl: str = "chunked"
    # auto: the platform's grouped matmul (grouped on CPU, gmm on TPU, ragged on GPU; moe.resolve_backend).
    moe_backend: str = "auto"
    # expert_parallel only: capacity = ceil(factor * local copies / expert-axis size); 0 = dropless.
    moe_capacity_factor: float = 0.0
    # Run the decoder stack as a lax.scan over its repeating block of layers (`model.decoder_stack`):
    # a deep model compiles much faster (trained in the stacked layout of `stacking`); a shallow one
    # runs slower a step (both measured in docs/performance.md), hence off by default.
    scan_layers: bool = False
    # Full attention: "reference" builds all [T, T] scores (HF parity); "chunked" attends a block of
    # at most `attention_chunk_size` queries at a time, skipping the keys above the causal diagonal
    # (`layers.chunked_causal_attention`; its blocks are unrolled: T / block of them).
    attention_impl: str = "chunked"
    attention_chunk_size: int = 512
    # What the backward pass keeps of each decoder layer's forward (`remat.REMAT_POLICIES`): "none"
    # keeps everything; "full" keeps only the layer's input and recomputes the rest; "dots", a named
    # "save_*" / "minimal" preset or "save:<names>" keep some tensors (`remat.CHECKPOINT_NAMES`).
    remat_policy: str = "none"

    def __post_init__(self):
        object.__setattr__(self, "dtype", dtype_name(self.dtype))
        object.__setattr__(self, "param_dtype", dtype_name(self.param_dtype))
        object.__setattr__(self, "mlp_only_layers", tuple(int(i) for i in self.mlp_only_layers))
        if self.layer_types is None:
            types = tuple(
                FULL_ATTENTION if (i + 1) % 4 == 0 else LINEAR_ATTENTION for i in range(self.num_hidden_layers)
            )
        else:
            types = tuple(self.layer_types)
        object.__setattr__(self, "layer_types", types)
        self.validate()

    # ------------------------------------------------------------------ derived sizes
    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def params_dtype(self):
        return DTYPES[self.param_dtype]

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def is_moe_layer(self, layer_idx: int) -> bool:
        """HF's rule: MoE unless listed in mlp_only_layers or off the sparse step."""
        return (
            layer_idx not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )

    def replace(self, **changes) -> Qwen3NextConfig:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise one ConfigError naming every inconsistency."""
        problems = []
        positive = (
            "vocab_size hidden_size num_attention_heads num_key_value_heads head_dim linear_conv_kernel_dim "
            "linear_key_head_dim linear_value_head_dim linear_num_key_heads linear_num_value_heads "
            "decoder_sparse_step"
        ).split()
        problems += [
            f"{name} must be positive, got {getattr(self, name)}" for name in positive if getattr(self, name) <= 0
        ]
        non_negative = "num_hidden_layers num_experts num_mtp_layers".split()
        problems += [
            f"{name} must be >= 0, got {getattr(self, name)}" for name in non_negative if getattr(self, name) < 0
        ]
        if problems:  # later checks divide by these sizes
            raise ConfigError("invalid Qwen3-Next config:\n  " + "\n  ".join(problems))
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.linear_num_value_heads % self.linear_num_key_heads:
            problems.append(
                f"linear_num_value_heads ({self.linear_num_value_heads}) must be a multiple of "
                f"linear_num_key_heads ({self.linear_num_key_heads})"
            )
        if self.rotary_dim % 2 or not 0 < self.partial_rotary_factor <= 1:
            problems.append(
                f"partial_rotary_factor ({self.partial_rotary_factor}) x head_dim ({self.head_dim}) must give an even "
                "rotary dimension in (0, head_dim]"
            )
        if len(self.layer_types) != self.num_hidden_layers:
            problems.append(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if unknown:
            problems.append(f"unknown layer types {unknown}; expected {LAYER_TYPES}")
        bad_mlp_only = [i for i in self.mlp_only_layers if not 0 <= i < self.num_hidden_layers]
        if bad_mlp_only:
            problems.append(
                f"mlp_only_layers {bad_mlp_only} are not layer indices of a {self.num_hidden_layers}-layer model"
            )
        if self.num_experts > 0 and not 0 < self.num_experts_per_tok <= self.num_experts:
            problems.append(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be in [1, num_experts={self.num_experts}]"
            )
        if self.dtype not in DTYPES or self.param_dtype not in DTYPES:
            problems.append(
                f"dtype and param_dtype must be in {sorted(DTYPES)}, got {self.dtype!r}, {self.param_dtype!r}"
            )
        if self.gated_delta_rule_impl not in GATED_DELTA_RULE_IMPLEMENTATIONS:
            problems.append(
                f"gated_delta_rule_impl {self.gated_delta_rule_impl!r} not in {GATED_DELTA_RULE_IMPLEMENTATIONS}"
            )
        if self.moe_backend not in MOE_BACKENDS:
            problems.append(f"moe_backend {self.moe_backend!r} not in {MOE_BACKENDS}")
        if not self.moe_capacity_factor >= 0:
            problems.append(f"moe_capacity_factor must be >= 0 (0 = dropless), got {self.moe_capacity_factor}")
        problems += remat.policy_problems(self.remat_policy)
        if self.attention_impl not in ATTENTION_IMPLEMENTATIONS:
            problems.append(f"attention_impl {self.attention_impl!r} not in {ATTENTION_IMPLEMENTATIONS}")
        if self.attention_chunk_size <= 0:
            problems.append(f"attention_chunk_size must be positive, got {self.attention_chunk_size}")
        if problems:
            raise ConfigError("invalid Qwen3-Next config:\n  " + "\n  ".join(problems))

    # ------------------------------------------------------------------ serialisation
    def architecture(self) -> dict[str, Any]:
        """The fields that define the parameter shapes and the function (no run-time options)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in RUNTIME_FIELDS}

    def to_dict(self) -> dict[str, Any]:
        """All fields as JSON-serialisable values (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def to_flag_dict(self) -> dict[str, Any]:
        """Fields for an ml-collections config: tuples (overridable from the command line), and an
        empty `layer_types` when it is HF's default pattern, so that overriding the depth alone works."""
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in self.to_dict().items()}
        if self.layer_types == Qwen3NextConfig(**{**values, "layer_types": None}).layer_types:
            values["layer_types"] = ()
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Qwen3NextConfig:
        """From `to_dict` or `to_flag_dict` output; an empty `layer_types` means the default pattern."""
        values = {**values, "layer_types": values.get("layer_types") or None}
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"unknown Qwen3NextConfig fields: {unknown}")
        return cls(**values)

    def to_hf_dict(self) -> dict[str, Any]:
        """A transformers `config.json` dict (v5 layout, `rope_parameters`)."""
        hf = {
            k: v
            for k, v in self.architecture().items()
            if k not in ("rope_theta", "partial_rotary_factor", "num_mtp_layers")
        }
        hf = {k: list(v) if isinstance(v, tuple) else v for k, v in hf.items()}
        hf.update(
            architectures=["Qwen3NextForCausalLM"],
            model_type="qwen3_next",
            hidden_act="silu",
            attention_bias=False,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": self.rope_theta,
                "partial_rotary_factor": self.partial_rotary_factor,
            },
            num_nextn_predict_layers=self.num_mtp_layers,
            dtype=self.param_dtype,
        )
        return hf

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], **runtime) -> Qwen3NextConfig:
        """Build from a transformers `config.json` dict (v4 or v5 rope layout)."""
        model_type = hf.get("model_type")
        if model_type != "qwen3_next":
            raise ConfigError(f"unsupported model_type {model_type!r}: this loader reads 'qwen3_next' checkpoints only")
        if hf.get("hidden_act", "silu") != "silu" or hf.get("attention_bias", False):
            raise ConfigError("only hidden_act='silu' without attention bias is supported")
        rope = dict(hf.get("rope_parameters") or {})
        if rope.get("rope_type", "default") != "default":
            raise ConfigError(f"unsupported rope_type {rope['rope_type']!r}; only 'default' is implemented")
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in hf.items() if k in fields and k not in ("dtype",) and v is not None}
        values["rope_theta"] = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        values["partial_rotary_factor"] = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.25))
        values["num_mtp_layers"] = hf.get("num_nextn_predict_layers", 0)
        values.update(runtime)
        return cls(**values)


# ---------------------------------------------------------------------------- presets
def qwen3_next_80b_a3b(**overrides) -> Qwen3NextConfig:
    """Qwen3-Next-80B-A3B (the SlimQwen teacher): 48 layers, 512 experts, top-10."""
    base = dict(
        vocab_size=151936, hidden_size=2048, num_hidden_layers=48, num_attention_heads=16, num_key_value_heads=2,
        head_dim=256, rope_theta=10_000_000.0, partial_rotary_factor=0.25, max_position_embeddings=262144,
        linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128,
        num_experts=512, num_experts_per_tok=10, moe_intermediate_size=512, shared_expert_intermediate_size=512,
        intermediate_size=5120, num_mtp_layers=1,
    )  # fmt: skip
    return Qwen3NextConfig(**{**base, **overrides})


def slimqwen_23a2b(**overrides) -> Qwen3NextConfig:
    """SlimQwen-23A2B (docs/method.md section 2): 36 layers, width 1536, 256 experts, top-8."""
    return qwen3_next_80b_a3b(**{"num_hidden_layers": 36, "hidden_size": 1536, "num_experts": 256,
                                 "num_experts_per_tok": 8, **overrides})  # fmt: skip


def tiny(**overrides) -> Qwen3NextConfig:
    """A few-hundred-kilobyte Qwen3-Next with every layer kind, for tests and demos."""
    base = dict(
        vocab_size=260, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
        linear_value_head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=32, intermediate_size=96, num_mtp_layers=1, max_position_embeddings=4096,
    )  # fmt: skip
    return Qwen3NextConfig(**{**base, **overrides})


MODEL_PRESETS = {"qwen3_next_80b_a3b": qwen3_next_80b_a3b, "slimqwen_23a2b": slimqwen_23a2b, "tiny": tiny}


def preset(name: str, **overrides) -> Qwen3NextConfig:
    """A named preset with field overrides."""
    if name not in MODEL_PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {sorted(MODEL_PRESETS)}")
    return MODEL_PRESETS[name](**overrides)
