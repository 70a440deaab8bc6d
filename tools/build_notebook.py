"""Write notebooks/slimqwen_quickstart.ipynb from the cells below, and optionally execute it.

    python tools/build_notebook.py            # the cells, without outputs
    python tools/build_notebook.py --execute  # then run it top to bottom here (nbclient) and keep the outputs

The notebook's cells live here as plain text so that a change to them is an ordinary diff; the
committed notebook is this script's output with the outputs of one execution on the CPU.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nbformat

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "slimqwen_quickstart.ipynb"
REPOSITORY_URL = "https://github.com/slimqwen/slimqwen_jax"
COLAB_BADGE = (
    f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
    f"(https://colab.research.google.com/github/{REPOSITORY_URL.removeprefix('https://github.com/')}"
    "/blob/main/notebooks/slimqwen_quickstart.ipynb)"
)

CELLS = [
    ("markdown", f"""# SlimQwen in miniature

{COLAB_BADGE}

Prune a Qwen3-Next-style hybrid MoE language model and recover it by distillation, the way the
SlimQwen paper does, small enough for a laptop CPU or a free Colab runtime: pretrain a tiny
teacher, prune a copy of it in two prune -> distil stages, train the same final architecture from
scratch on the same tokens, compare them; then evaluate the student, decode from it, and export it
as a Hugging Face checkpoint. About three minutes on two CPU cores (2 min 46 s measured), faster on
a GPU or TPU runtime.
The method and every place this project departs from the paper: `docs/method.md`."""),
    ("markdown", """## 1. Install

On Colab this clones the repository (`REPOSITORY_URL`; point it at your fork) and installs its
requirements except `jax` and `jaxlib`, so that the runtime's own accelerator build of jax (TPU or
GPU) stays, then the package itself. Anywhere else it uses the checkout it runs in (install the
requirements first: `pip install -r requirements.txt`). Runs write under `WORKDIR`
(`runs/notebook` in the repository; the environment variable `SLIMQWEN_NOTEBOOK_WORKDIR` moves it)."""),
    ("code", f"""import os
import subprocess
import sys
from pathlib import Path

REPOSITORY_URL = "{REPOSITORY_URL}"
if "google.colab" in sys.modules:
    REPO = Path("/content/slimqwen_jax")
    if not REPO.exists():
        subprocess.run(["git", "clone", "--depth=1", REPOSITORY_URL, str(REPO)], check=True)
    requirements = [line for line in (REPO / "requirements.txt").read_text().splitlines()
                    if line.strip() and not line.startswith(("#", "jax"))]
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *requirements], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", str(REPO)], check=True)
else:  # the checkout this notebook sits in
    REPO = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()
    sys.path.insert(0, str(REPO))
os.chdir(REPO)
WORKDIR = Path(os.environ.get("SLIMQWEN_NOTEBOOK_WORKDIR", REPO / "runs" / "notebook"))

import jax

print(f"jax {{jax.__version__}}, backend {{jax.default_backend()}}, {{jax.device_count()}} device(s): {{jax.devices()}}")"""),
    ("markdown", """## 2. The config

`configs/slimqwen_colab.py` is an ordinary run config (`run_config.base_config()` plus changes):
the teacher's architecture and budget (`TEACHER`, `TEACHER_STEPS`; its train config is
`config.pipeline.teacher`), the student's two `depth_first` stages (`config.stages`: stage 1 removes
2 layers and merges 8 -> 4 experts, stage 2 removes 2 more layers and cuts the width 64 -> 48), the
distillation objective (`config.loss`: lam 1.0 -> 0.75, beta 0.3 -> 0.1) and the baselines run
beside the student (`config.pipeline.baselines`). Change any field here before running step 3,
for example `config.stages[1].steps = 300` or `config.loss.mtp_lam = ...`; `docs/training.md`
lists them all. The planned stages print from shapes alone, before any training."""),
    ("code", """from slimqwen_jax import cli, pipeline, stage_plan, train
from slimqwen_jax.testing import load_config_file

cli.setup_logging()  # progress lines from the runs below
config = load_config_file(REPO / "configs" / "slimqwen_colab.py").get_config()
config.workdir = str(WORKDIR)
student_plan = train.plan_run(pipeline.run_configs(config)["student"])
tokens_per_step = config.train.global_batch_size * config.data.seq_len
for row in stage_plan.describe(student_plan.stages, tokens_per_step):
    print(f"{row['stage']}: {row['architecture']}, {row['total']:,} parameters ({row['active']:,} active), "
          f"steps {row['start_step'] + 1}-{row['end_step']}, {row['tokens']:,} tokens")"""),
    ("markdown", """## 3. Run the pipeline

`pipeline.run` pretrains the teacher in `WORKDIR/teacher`, then runs the student in
`WORKDIR/student`: before each stage it calibrates the current student on a few sequences, prunes
its parameters and Adam moments with one decision, and distils from the teacher for the stage's
steps; then the from-scratch baseline in `WORKDIR/from_scratch`. Every run logs progress lines
(loss terms, tokens/s, ETA) and its held-out loss, writes checkpoints, tensorboard logs and
`metrics.jsonl`, and resumes where it stopped when the cell is run again (a finished run is
reused). The pruning tables and each stage's summary go to `WORKDIR/student/stage_k/pruning.txt`
and `summary.json` instead of this output; drop the two `setLevel` lines to see them here."""),
    ("code", """import logging

logging.getLogger("slimqwen_jax.train").setLevel(logging.WARNING)
logging.getLogger("slimqwen_jax.compression").setLevel(logging.WARNING)
table = pipeline.run(config)"""),
    ("markdown", """## 4. The report

One row per run: architecture, total / active parameters, training tokens, held-out cross-entropy
(nats per byte) and top-1 agreement with the teacher, then how far pruned + KD ends below the
baseline; the held-out loss curves of every run, and the student's own curve across its two
stages. The paper's headline is that pruning and distilling beats training the small
architecture from scratch at the same tokens."""),
    ("code", """import json

from IPython.display import Image, Markdown, display

display(Markdown((WORKDIR / "report.md").read_text()))
display(Image(str(WORKDIR / "report.png")))
display(Image(str(WORKDIR / "student" / "loss_curve.png")))
rows = {row["run"]: row for row in json.loads((WORKDIR / "report.json").read_text())}
print(f"pruned + KD {rows['pruned + KD']['heldout_ce']:.4f} vs from scratch {rows['from scratch']['heldout_ce']:.4f} "
      f"nats/byte: pruned + KD is {'ahead' if rows['pruned + KD']['heldout_ce'] < rows['from scratch']['heldout_ce'] else 'NOT ahead'}")"""),
    ("markdown", """## 5. Evaluate the student

`python -m slimqwen_jax.evaluate`'s own function on the student's last checkpoint, with the
teacher as the reference: held-out loss, bits per byte, top-1 agreement and KL with the teacher,
the MTP module's teacher-forced acceptance, then greedy decoding with and without MTP speculative
drafts (`decoding.num_drafts`). acc_k is the share whose first k + 1 drafts were all accepted
(`docs/method.md` section 7). Fields: `heldout.*`, `decoding.*` of the evaluate config."""),
    ("code", """from slimqwen_jax import evaluate, run_config

student_checkpoint = WORKDIR / "student" / student_plan.stages[-1].name / "checkpoints" / str(student_plan.stages[-1].end_step)
teacher_checkpoint = WORKDIR / "teacher" / "checkpoints" / str(config.pipeline.teacher.train.steps)
evaluation = run_config.evaluate_base_config()
evaluation.update(model=str(student_checkpoint), reference=str(teacher_checkpoint),
                  report=str(WORKDIR / "eval_report.json"), overwrite=True)
evaluation.data.seq_len = config.data.seq_len
evaluation.heldout.update(batch_size=8, num_batches=4, num_drafts=3)
evaluation.decoding.update(num_prompts=4, prompt_len=32, max_new_tokens=32, num_drafts=3, uncached=False)
report = evaluate.run(evaluation)"""),
    ("markdown", """## 6. Decode from a prompt

The student as a model object (`loading.load_model`) in a `decoding.Decoder`: greedy bytes after a
prompt, then the same with 3 MTP drafts per round, which gives the same text in fewer backbone
calls. Change `prompt`, `max_new_tokens` or `num_drafts`; `decoder.generate(..., temperature=0.8,
top_p=0.95)` samples instead."""),
    ("code", """from slimqwen_jax import data, decoding, loading
from slimqwen_jax.model_metrics import acceptance_rates

student = loading.load_model(student_checkpoint)
tokenizer = data.make_tokenizer("byte")
decoder = decoding.Decoder(student, max_len=256)
prompt = "def __init__(self"
for name, generation in (
    ("greedy", decoder.generate([tokenizer.encode(prompt)], 64)),
    ("speculative", decoder.speculative_generate([tokenizer.encode(prompt)], 64, num_drafts=3)),
):
    print(f"--- {name}: {len(generation.tokens[0])} bytes in {generation.steps} backbone calls after the prompt")
    print(prompt + tokenizer.decode(generation.tokens[0]))
rates = acceptance_rates(generation.accepted, 3)
print({k: round(v, 3) for k, v in rates.items() if k.startswith("acc_") or k == "tokens_per_step"})"""),
    ("markdown", """## 7. Export as a Hugging Face checkpoint

`hf.save_model` writes `config.json` and safetensors that `transformers`' `Qwen3NextForCausalLM`
loads (the MTP module's tensors included). If `transformers` (with Qwen3-Next) and `torch` are
installed, the cell loads the export back and compares its logits on the prompt with ours."""),
    ("code", """import warnings

import numpy as np

from slimqwen_jax import hf

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm's, without ipywidgets

export = hf.save_model(student, WORKDIR / "student_hf", overwrite=True)
print("wrote", export, sorted(p.name for p in export.iterdir()))
ids = tokenizer.encode(prompt)[None]
ours = np.asarray(student(ids).logits)
try:
    import torch
    from transformers import Qwen3NextForCausalLM
except ImportError as missing:
    print(f"transformers or torch is not installed ({missing}); the export is there to load elsewhere")
else:
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()  # no notes on its optional kernels
    transformers_logging.disable_progress_bar()
    theirs = Qwen3NextForCausalLM.from_pretrained(export, attn_implementation="eager").eval()
    with torch.no_grad():
        logits = theirs(torch.as_tensor(ids)).logits.numpy()
    print(f"transformers reloaded it: max |logit difference| = {np.max(np.abs(logits - ours)):.2e} "
          f"(logit scale {np.max(np.abs(ours)):.1f})")"""),
]


def build() -> nbformat.NotebookNode:
    """The notebook of CELLS, without outputs."""
    make = {"markdown": nbformat.v4.new_markdown_cell, "code": nbformat.v4.new_code_cell}
    notebook = nbformat.v4.new_notebook(cells=[make[kind](source) for kind, source in CELLS])
    notebook.metadata.update(
        kernelspec={"display_name": "Python 3", "language": "python", "name": "python3"},
        language_info={"name": "python"},
        colab={"provenance": []},
    )
    return notebook


def execute(notebook: nbformat.NotebookNode, timeout: int = 1200) -> nbformat.NotebookNode:
    """Run every cell in order in a fresh kernel started in notebooks/ (nbclient)."""
    from nbclient import NotebookClient

    NotebookClient(notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    return notebook


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--execute", action="store_true", help="run the notebook and keep its outputs")
    args = parser.parse_args()
    notebook = build()
    if args.execute:
        notebook = execute(notebook)
    NOTEBOOK.parent.mkdir(exist_ok=True)
    nbformat.write(notebook, NOTEBOOK)
    print(f"wrote {NOTEBOOK}")


if __name__ == "__main__":
    main()
