"""The lm-eval-harness model: scores against our own forward, generation against the decoder, a local
task end to end from the command line (nothing downloaded), and refused arguments."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from lm_eval.api.instance import Instance
from tool_runs import one_device_env

from slimqwen_jax import lm_eval_model
from slimqwen_jax.checkpoint import save_checkpoint
from slimqwen_jax.config import tiny
from slimqwen_jax.data import ByteTokenizer
from slimqwen_jax.decoding import Decoder
from slimqwen_jax.lm_eval_model import RequestError, SlimQwenLM
from slimqwen_jax.model import Qwen3NextForCausalLM
from slimqwen_jax.testing import forward

SMALL = dict(hidden_size=32, head_dim=8, linear_key_head_dim=8, linear_value_head_dim=8, moe_intermediate_size=16,
             shared_expert_intermediate_size=16, initializer_range=0.1)  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = Qwen3NextForCausalLM(tiny(**SMALL), rngs=nnx.Rngs(0))
    return model, save_checkpoint(model, tmp_path_factory.mktemp("lm_eval") / "model")


@pytest.fixture(scope="module")
def lm(checkpoint):
    return SlimQwenLM.create_from_arg_string(f"path={checkpoint[1]},batch_size=2,max_length=48,max_gen_toks=6")


def request(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def forward_log_probs(model, tokens) -> np.ndarray:
    """log p(tokens[i + 1] | tokens[: i + 1]) [len - 1] from one full forward, in float64 numpy."""
    logits = np.asarray(forward(model, jnp.asarray([tokens[:-1]])).logits[0], np.float64)
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    return logits[np.arange(len(tokens) - 1), tokens[1:]] - log_z


def test_loglikelihoods_equal_our_forward_sums(checkpoint, lm):
    model, _ = checkpoint
    pairs = [("def f(x):", " return x"), ("import", " os"), ("", "abc"), ("a" * 60, "bc")]
    results = lm.loglikelihood([request("loglikelihood", *pair) for pair in pairs])
    encode = ByteTokenizer().encode
    for (context, continuation), (log_prob, _) in zip(pairs, results):
        tokens = [256, *encode(continuation)] if not context else [*encode(context), *encode(continuation)]
        tokens = tokens[-49:]  # max_length 48 inputs
        expected = forward_log_probs(model, tokens)[-len(encode(continuation)) :].sum()
        assert log_prob == pytest.approx(expected, rel=1e-5)
    text = "x = [i * i for i in range(10)]\n" * 3  # 93 bytes: two windows of max_length 48
    (rolling,) = lm.loglikelihood_rolling([request("loglikelihood_rolling", text)])
    tokens = encode(text).tolist()
    # Window 1 scores bytes 0..47 after EOS; window 2 scores bytes 48..92 with the 4 bytes before as context.
    expected = forward_log_probs(model, [256, *tokens[:48]]).sum() + forward_log_probs(model, tokens[44:])[-45:].sum()
    assert rolling == pytest.approx(expected, rel=1e-5)


def test_generate_until_follows_the_decoder_and_stops(checkpoint, lm):
    model, _ = checkpoint
    encode = ByteTokenizer().encode
    contexts = ["def f(x):", "class A:", "import os"]
    outputs = lm.generate_until(
        [request("generate_until", c, {"until": ["\n\n"], "max_gen_toks": 6}) for c in contexts]
    )
    greedy = Decoder(model, max_len=48).generate([encode(c).tolist() for c in contexts], 6).tokens
    for output, tokens in zip(outputs, greedy):
        assert output == ByteTokenizer().decode([t for t in tokens if t < 256]).split("\n\n")[0]
    stop = outputs[0][2]
    (cut,) = lm.generate_until([request("generate_until", contexts[0], {"until": [stop], "max_gen_toks": 6})])
    assert cut == outputs[0].split(stop)[0]


def test_bad_arguments_are_refused(checkpoint, lm, tmp_path):
    with pytest.raises(RequestError, match=r"unknown model_args \['pretrained'\]"):
        SlimQwenLM.create_from_arg_string(f"path={checkpoint[1]},pretrained=gpt2")
    with pytest.raises(RequestError, match=f"{tmp_path / 'nothing'} does not exist"):
        SlimQwenLM.create_from_arg_string(f"path={tmp_path / 'nothing'}")
    with pytest.raises(RequestError, match="unknown tokenizer 'bpe'"):
        SlimQwenLM.create_from_arg_string(f"path={checkpoint[1]},tokenizer=bpe")
    with pytest.raises(RequestError, match=r"unknown generation arguments \['num_beams'\]"):
        lm.generate_until([request("generate_until", "x", {"until": ["\n"], "num_beams": 4})])


TASKS = {
    "local_choice": """
task: local_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""",
    "local_generate": """
task: local_generate
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{choices[answer]}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 4
metric_list:
  - metric: exact_match
""",
    "local_rolling": """
task: local_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{question}}}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
""",
}


@pytest.mark.slow
def test_local_tasks_run_end_to_end_from_the_command_line(checkpoint, tmp_path, monkeypatch, capsys):
    data = tmp_path / "data.jsonl"
    docs = [{"question": f"{a} + {b} =", "choices": [f" {a + b}", f" {a + b + 1}"], "answer": 0} for a, b in
            [(1, 2), (3, 4), (10, 5), (7, 7)]]  # fmt: skip
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    for name, yaml in TASKS.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.format(data=data))
    # The plain `lm_eval` command, run outside the repository: it knows `slimqwen_jax` through the
    # start-up hook that `pip install .` installs (requirements-test.txt); PYTHONPATH puts this
    # checkout's package ahead of the installed copy.
    lm_eval = Path(sys.executable).with_name("lm_eval")
    assert lm_eval.exists(), f"{lm_eval} missing: install the test requirements (pip install -r requirements-test.txt)"
    env = {**one_device_env(), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    command = [
        str(lm_eval), "--model", "slimqwen_jax", "--model_args", f"path={checkpoint[1]},max_length=64",
        "--batch_size", "2", "--include_path", str(tmp_path), "--tasks", ",".join(TASKS),
        "--output_path", str(tmp_path / "out"),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    (results_file,) = (tmp_path / "out").rglob("results_*.json")
    results = json.loads(results_file.read_text())["results"]
    assert 0 <= results["local_choice"]["acc,none"] <= 1
    assert 0 <= results["local_generate"]["exact_match,none"] <= 1
    assert results["local_rolling"]["word_perplexity,none"] > 1
    bad_args = [*command[1:4], f"path={checkpoint[1]},no_such_arg=1", *command[5:]]
    result = subprocess.run(
        [str(lm_eval), *bad_args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode != 0 and "error: slimqwen_jax: unknown model_args ['no_such_arg']" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    # `python -m slimqwen_jax.lm_eval_model`: the same command line, its error one line and exit 2.
    monkeypatch.setattr(sys, "argv", ["slimqwen_jax.lm_eval_model", *bad_args])
    with pytest.raises(SystemExit) as exited:
        lm_eval_model.main()
    assert exited.value.code == 2 and "unknown model_args ['no_such_arg']" in capsys.readouterr().err
    assert os.path.exists(results_file)
