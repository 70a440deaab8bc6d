"""Compiling the trainer's step for TPU topologies from this CPU host (slimqwen_jax.compile_plan):
topology names, the HLO accounting of collectives, and, with libtpu's compiler, the staged step with
KD, MTP-KD, the Pallas delta rule and `gmm` on v5e, expert parallelism, and v6e (its compiler abort
on the interpreted kernel, and the step that compiles there)."""

import subprocess
import sys
import textwrap

import jax
import pytest
from flax import nnx
from tool_runs import REPO

from slimqwen_jax import (
    compile_plan, hlo_stats, moe, pipeline, platforms, run_config, sharding, stage_functions, train
)
from slimqwen_jax.compile_plan import GiB, StageRequest
from slimqwen_jax.compression import DepthSpec, ExpertSpec, PruneSpec, WidthSpec
from slimqwen_jax.config import ConfigError, tiny
from slimqwen_jax.model import abstract_model
from slimqwen_jax.testing import hand_count_parameters, load_config_file


# ---------------------------------------------------------------------------- no compiler needed
@pytest.mark.parametrize(
    "name, chip, shape",
    [("v5e-256", "v5e", (16, 16)), ("v5litepod-16", "v5e", (4, 4)), ("v6e-8", "v6e", (2, 4)),
     ("v5p-256", "v5p", (4, 4, 8)), ("v5p-8", "v5p", (2, 2, 1)), ("v5p:4x8x8", "v5p", (4, 8, 8)),
     ("v4-32", "v4", (2, 2, 4))],
)  # fmt: skip
def test_topology_names(name, chip, shape):
    topology = compile_plan.parse_topology(name)
    assert (topology.chip.name, topology.shape) == (chip, shape)


@pytest.mark.parametrize("name", ["v7-8", "v5p-6", "v5e-12", "v5e:4x4x4", "tpu", "v6e-0"])
def test_bad_topology_names_are_refused(name):
    with pytest.raises(ConfigError, match="compile_topology"):
        compile_plan.parse_topology(name)


def test_compile_settings_are_checked_with_the_config():
    config = run_config.base_config()
    config.compile_topology, config.compile_mfu = "v9-4", 1.5
    with pytest.raises(ConfigError) as error:
        train.plan_run(config)
    message = str(error.value)
    assert "dry runs only" in message and "v9-4" in message and "compile_mfu must be in (0, 1]" in message


# A loop of 12 iterations (bound in its condition) all-gathering 8 x 128 bf16 inside a fusion's caller,
# an all-reduce of 4 f32 outside, an async all-gather pair, a loop XLA gives a known trip count, and a
# ragged all-to-all from a 6-row send buffer into a 24-row receive buffer.
HLO = textwrap.dedent("""\
    %add (x: f32[], y: f32[]) -> f32[] {
      %x = f32[] parameter(0)
      %y = f32[] parameter(1)
      ROOT %add.1 = f32[] add(%x, %y)
    }
    %body (p: (s32[], bf16[8,128])) -> (s32[], bf16[8,128]) {
      %p = (s32[], bf16[8,128]{1,0}) parameter(0)
      %i = s32[] get-tuple-element(%p), index=0
      %one = s32[] constant(1)
      %next = s32[] add(%i, %one)
      %v = bf16[2,128]{1,0} get-tuple-element(%p), index=1
      %all-gather.3 = bf16[8,128]{1,0:T(8,128)(2,1)} all-gather(%v), channel_id=1, dimensions={0}
      ROOT %t = (s32[], bf16[8,128]{1,0}) tuple(%next, %all-gather.3)
    }
    %condition (p.1: (s32[], bf16[8,128])) -> pred[] {
      %p.1 = (s32[], bf16[8,128]{1,0}) parameter(0)
      %i.1 = s32[] get-tuple-element(%p.1), index=0
      %n = s32[] constant(12)
      ROOT %lt = pred[] compare(%i.1, %n), direction=LT
    }
    %body.2 (q: f32[4]) -> f32[4] {
      %q = f32[4]{0} parameter(0)
      ROOT %cp = f32[4]{0} collective-permute(%q), channel_id=4, source_target_pairs={{0,1},{1,0}}
    }
    %condition.2 (q.1: f32[4]) -> pred[] {
      %q.1 = f32[4]{0} parameter(0)
      ROOT %c = pred[] constant(true)
    }
    ENTRY %main (a: (s32[], bf16[8,128]), b: f32[4]) -> f32[4] {
      %a = (s32[], bf16[8,128]{1,0}) parameter(0)
      %while.1 = (s32[], bf16[8,128]{1,0}) while(%a), condition=%condition, body=%body
      %b = f32[4]{0} parameter(1)
      %ags = (f32[4]{0}, f32[16]{0}) all-gather-start(%b), channel_id=2, dimensions={0}
      %agd = f32[16]{0} all-gather-done(%ags)
      %while.2 = f32[4]{0} while(%b), condition=%condition.2, body=%body.2, backend_config={"known_trip_count":{"n":"5"}}
      %send = bf16[6,128]{1,0} parameter(2)
      %receive = bf16[24,128]{1,0} parameter(3)
      %sizes = s64[4]{0} parameter(4)
      %ragged = bf16[24,128]{1,0} ragged-all-to-all(%send, %receive, %sizes, %sizes, %sizes, %sizes), channel_id=5
      ROOT %all-reduce.1 = f32[4]{0} all-reduce(%while.2), channel_id=3, to_apply=%add
    }
""")


def test_collective_bytes_count_each_loop_body_as_often_as_it_runs():
    moved, unknown = hlo_stats.collective_bytes(HLO)
    assert unknown == 0
    assert moved == {"all-gather": 12 * 8 * 128 * 2 + 16 * 4, "all-reduce": 4 * 4, "collective-permute": 5 * 4 * 4,
                     "ragged-all-to-all": 6 * 128 * 2}  # fmt: skip


def test_out_of_memory_is_a_row_and_other_failures_are_one_line():
    message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (26.84G) "
               "exceeds available HBM (15.75G).\nmore detail")  # fmt: skip
    row = compile_plan.out_of_memory(message)
    assert row["fits"] is False and row["required_gib"] == pytest.approx(26.84) and row["available_gib"] == 15.75
    assert compile_plan.out_of_memory("INTERNAL: something else") is None
    abort = ("W noise\nF1207 statusor.cc:99] Attempting to fetch value instead of handling error INTERNAL: Attempted "
             "to compile iota as an elementwise vector operation.\nError encountered while compiling %iota.76 = "
             's32[64,64]{1,0} iota(), metadata={op_name="jit(train_step)/jvp()/while/body/iota"}\n*** stack ***')  # fmt: skip
    line = compile_plan.failure_line(abort)
    assert "Attempted to compile iota" in line and line.endswith("(at jit(train_step)/jvp()/while/body/iota)")


COMPILER_LOG = """I1207 15:35:15.649477 28161 deepsea_compiler_backend.cc:2127] XLA::TPU program HBM usage: 1.00M / 15.75G
I1207 15:35:15.649480 28161 deepsea_compiler_backend.cc:2171] Total hbm usage >= 258.13M:
    reserved        258.12M
    program           4.0K
    arguments            0B
I1207 15:35:15.649480 28161 deepsea_compiler_backend.cc:2171] Total hbm usage >= 15.12G:
    reserved        258.12M
    program          11.88G
    arguments         2.99G

Output size 2.28G; shares 2.28G with arguments.
"""


def test_the_compilers_hbm_account_is_read_from_its_log():
    """libtpu's own account (a log from compiling the 23A2B stage 1 for v5e-256; a small helper
    compiled before it): the train step's, the largest."""
    account = compile_plan.compiler_account(COMPILER_LOG)
    assert account == pytest.approx({"compiler_total_gib": 15.12, "compiler_reserved_gib": 258.12 / 1024,
                                     "compiler_program_gib": 11.88, "compiler_arguments_gib": 2.99})  # fmt: skip
    assert compile_plan.compiler_account("no account here") == {}


def test_training_flops_count_the_active_parameters():
    cfg = tiny()
    _, active = hand_count_parameters(cfg)  # the backbone's, counted by hand
    seq_len, full = 64, sum(t == "full_attention" for t in cfg.layer_types)
    expected = 2 * (active - cfg.vocab_size * cfg.hidden_size + full * cfg.num_attention_heads * cfg.head_dim * seq_len
                    + (cfg.num_hidden_layers - full) * 3 * cfg.linear_num_value_heads * 16 * 16)  # fmt: skip
    flops = compile_plan.forward_flops_per_token(cfg, seq_len)
    assert flops == pytest.approx(expected, rel=1e-12)
    with_mtp = compile_plan.forward_flops_per_token(cfg, seq_len, with_mtp=True)
    assert with_mtp > flops
    kd = compile_plan.MtpUse(student=True, teacher=False, kd=True)
    assert compile_plan.training_flops(cfg, cfg, kd, 10, seq_len) == pytest.approx(10 * (3 * with_mtp + flops))
    assert compile_plan.training_flops(cfg, None, compile_plan.MtpUse(), 10, seq_len) == pytest.approx(30 * flops)


# ---------------------------------------------------------------------------- the TPU compiler
def _has_libtpu() -> bool:
    try:
        import libtpu  # noqa: F401
    except ImportError:
        return False
    return True


needs_libtpu = pytest.mark.skipif(not _has_libtpu(), reason="libtpu (pip install '.[tpu]') is not installed")

# A 2-stage tiny run (depth + experts, then depth + width) with KD and MTP-KD from a teacher, its
# delta rule in Pallas (heads of 128: the Mosaic kernel's lane width) and its experts in `gmm`.
MODEL = dict(hidden_size=32, head_dim=8, num_hidden_layers=6, num_experts=4, num_experts_per_tok=2,
             moe_intermediate_size=16, shared_expert_intermediate_size=16, linear_num_key_heads=1,
             linear_num_value_heads=2, linear_key_head_dim=128, linear_value_head_dim=128,
             gated_delta_rule_impl="pallas", moe_backend="gmm", scan_layers=False)  # fmt: skip


def test_the_abstract_model_is_built_for_the_target_platform():
    """Modules pick their kernels when built: the abstract model a CPU run cached (the dry run's
    parameter count) must not stand in for the one a TPU compile builds."""

    def expert_ffns(cfg):
        model = nnx.merge(*abstract_model(cfg))
        return {module.ffn for _, module in nnx.iter_graph(model) if isinstance(module, moe.Experts)}

    cfg = tiny(**MODEL)
    assert expert_ffns(cfg) == {moe.expert_ffn_for("gmm", "cpu")}  # the interpreter
    with platforms.compiling_for("tpu"):
        assert expert_ffns(cfg) == {moe.EXPERT_FFNS["gmm"]}


def staged_config(topology: str, **model):
    config = run_config.base_config()
    config.model = run_config.model_section(tiny(**{**MODEL, **model}))
    config.teacher = "teacher-not-on-disk"  # the dry run takes the source as the teacher
    config.loss = run_config.loss_section(distillation=True)
    config.data.seq_len = 64
    config.train.update(global_batch_size=8, grad_accum_steps=2)
    config.mesh.update(data=-1, fsdp=1, expert=1)
    config.stages = [
        run_config.stage_section(3, spec=PruneSpec(DepthSpec(num_layers_to_remove=1),
                                                   experts=ExpertSpec(num_experts=2, num_experts_per_tok=2))),
        run_config.stage_section(5, spec=PruneSpec(DepthSpec(num_layers_to_remove=1),
                                                   WidthSpec(hidden_size=16, multiple_of=16))),
    ]  # fmt: skip
    config.train.steps = 0
    config.dry_run, config.compile_topology = True, topology
    return config


@needs_libtpu
def test_staged_kd_step_compiles_for_v5e_and_reports_xlas_memory():
    config = staged_config("v5e-4")
    rows = train.run(config)["stages"]
    compiled = [row["compiled"] for row in rows]
    assert [row["stage"] for row in compiled] == ["stage_1", "stage_2"]
    for row in compiled:
        assert row["fits"] and row["mesh"] == {"data": 4, "fsdp": 1, "expert": 1}
        parts = row["arguments_gib"] + row["temporaries_gib"] + row["outputs_gib"] + row["code_gib"]
        assert row["total_gib"] == pytest.approx(parts) and row["arguments_gib"] > 0
        # The compiler's own account: the same arguments, and its total within the chip's HBM.
        assert row["compiler_arguments_gib"] == pytest.approx(row["arguments_gib"], abs=0.01)
        assert row["compiler_arguments_gib"] < row["compiler_total_gib"] <= row["hbm_gib"]
        assert row["micro_batch_tokens_per_chip"] == 8 * 64 // 2 // 4
        assert row["collective_gib"].get("all-reduce", 0) > 0  # data parallel: the gradients are summed
    # The same stage compiled here: the reported memory is XLA's own, byte for byte.
    plan = train.plan_run(config)
    resolved = compile_plan.on_topology(plan.config, compile_plan.parse_topology("v5e-4"))
    teacher = train.planned_teacher(resolved, plan.model_cfg)
    mtp = stage_functions.decide_mtp_use(resolved.loss, plan.model_cfg, teacher)
    assert mtp.kd and mtp.teacher
    request = StageRequest(resolved, tuple(plan.stages), 1, teacher, mtp, compile_plan.parse_topology("v5e-4"))
    mesh = sharding.make_mesh(resolved.mesh, compile_plan.topology_devices(request.topology))
    with jax.default_matmul_precision("default"):  # as the compiling process runs (conftest asks for "highest")
        executable = compile_plan.lower_train_step(request, mesh).compile()
    memory = executable.memory_analysis()
    assert compiled[1]["arguments_gib"] * GiB == memory.argument_size_in_bytes
    assert compiled[1]["temporaries_gib"] * GiB == memory.temp_size_in_bytes
    assert compiled[1]["outputs_gib"] * GiB == memory.output_size_in_bytes - memory.alias_size_in_bytes
    hlo = executable.as_text()
    assert hlo.count('custom_call_target="tpu_custom_call"') >= 2  # Mosaic kernels: the delta rule and gmm


@needs_libtpu
def test_expert_parallel_step_compiles_for_v6e_and_exchanges_tokens_with_ragged_all_to_all():
    """v6e (whose compiler aborted on the interpreted kernel, below): the step built for the TPU, its
    Mosaic delta rule on each batch shard and its experts exchanged over the expert axis."""
    config = staged_config("v6e-4", moe_backend="expert_parallel")
    config.stages, config.train.steps, config.teacher = [], 4, ""
    config.loss = run_config.loss_section()
    config.mesh.update(data=1, fsdp=1, expert=4)
    (row,) = [r["compiled"] for r in train.run(config)["stages"]]
    assert row["fits"] and row["topology"] == "v6e:2x2" and row["hbm_gib"] == 32 and row["mesh"]["expert"] == 4
    assert row["collective_gib"].get("ragged-all-to-all", 0) > 0


V6E_ABORT = """
import jax, jax.numpy as jnp
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from pallas_kernels.gated_delta_rule import gated_delta_rule

device = topologies.get_topology_desc("v6e:2x2", "tpu").devices[0]
x = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=NamedSharding(Mesh([device], ("x",)),
                                                                                  PartitionSpec()))
forward = lambda q, k, v, g, beta: gated_delta_rule(q, k, v, g, beta, implementation="pallas", platform="cpu")[0]
jax.jit(forward).lower(x(1, 64, 1, 16), x(1, 64, 1, 16), x(1, 64, 1, 16), x(1, 64, 1), x(1, 64, 1)).compile()
"""


@needs_libtpu
def test_v6e_aborts_on_the_interpreted_kernel():
    """The minimal reproduction: the delta rule's Pallas *interpreter* (what a CPU host traced the
    kernel as before `platforms.compiling_for`) over one 64-token chunk of one head aborts v6e's
    compiler. If this starts to compile, a libtpu has fixed it. The step built for the TPU compiles
    there (the expert-parallel test above)."""
    env = compile_plan.compiling_environment(compile_plan.parse_topology("v6e-4"))
    done = subprocess.run([sys.executable, "-c", V6E_ABORT], cwd=REPO, env={**env, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode != 0
    line = compile_plan.failure_line(done.stderr)
    assert "Attempted to compile iota as an elementwise vector operation" in line and " (at jit(" in line


def test_a_pipeline_dry_run_plans_every_run_and_writes_nothing(tmp_path, capsys):
    config = load_config_file(REPO / "configs" / "slimqwen_tiny.py").get_config()
    config.workdir = str(tmp_path / "pipeline")
    config.dry_run, config.mesh.data, config.pipeline.teacher.mesh.data = True, 1, 1
    assert pipeline.run(config) == ""
    printed = capsys.readouterr().out
    for name in pipeline.run_configs(config):
        assert f"{pipeline.LABELS[name]} ({tmp_path / 'pipeline' / name}):" in printed
    assert printed.count("dry run: ") == len(pipeline.run_configs(config)) and not (tmp_path / "pipeline").exists()
    config.compile_topology = "v5p-8"  # the teacher's run is compiled for the same slice
    assert {c.compile_topology for c in pipeline.run_configs(config).values()} == {"v5p-8"}
