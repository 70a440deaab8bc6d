"""notebooks/slimqwen_quickstart.ipynb: its cells are tools/build_notebook.py's, the committed copy
carries the outputs of a run, and it runs top to bottom in a fresh kernel on the CPU against the
checkout, its report showing pruned + KD ahead of from scratch and its HF export reloading in
transformers."""

import re

import nbformat
import pytest
from tool_runs import REPO, one_device_env

from slimqwen_jax.testing import load_config_file

builder = load_config_file(REPO / "tools" / "build_notebook.py")


def outputs_text(cell) -> str:
    """Everything a code cell showed: streams, results and displays (text and markdown)."""
    parts = []
    for output in cell.get("outputs", []):
        parts.append(output.get("text", ""))
        data = output.get("data", {})
        parts += [data.get("text/markdown", ""), data.get("text/plain", "")]
    return "\n".join(parts)


def cell_with(notebook, source_fragment: str):
    return next(cell for cell in notebook.cells if cell.cell_type == "code" and source_fragment in cell.source)


def check_outputs(notebook) -> None:
    """The report shows pruned + KD ahead of from scratch; the evaluation, the decoding and the HF
    reload printed what they compute."""
    report = outputs_text(cell_with(notebook, "report.md"))
    assert re.search(r"pruned \+ KD ends \d+\.\d+ nats below from scratch", report), report
    assert "pruned + KD is ahead" in report and "image/png" in str(cell_with(notebook, "report.md").outputs)
    assert "speculative acc_0 acc_1 acc_2" in outputs_text(cell_with(notebook, "evaluate.run("))
    decoded = outputs_text(cell_with(notebook, "speculative_generate"))
    assert decoded.count("def __init__(self") == 2 and "acc_0" in decoded
    reload = outputs_text(cell_with(notebook, "hf.save_model"))
    difference = float(re.search(r"max \|logit difference\| = (\S+)", reload).group(1))
    assert difference < 1e-3, reload


def test_the_committed_notebook_is_the_builders_with_the_outputs_of_a_run():
    committed = nbformat.read(builder.NOTEBOOK, as_version=4)
    assert [(c.cell_type, c.source) for c in committed.cells] == [(c.cell_type, c.source) for c in builder.build().cells]
    code = [cell for cell in committed.cells if cell.cell_type == "code"]
    assert all(cell.get("execution_count") for cell in code) and all(cell.outputs for cell in code)
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1))  # one run, top to bottom
    check_outputs(committed)


@pytest.mark.notebook
def test_the_notebook_runs_top_to_bottom_in_a_fresh_kernel(tmp_path, monkeypatch):
    """Restart and run all, as a reader would, with the runs under tmp_path (about three and a half
    minutes; `python -m pytest -m notebook`). Outside the default run: the test above checks the
    committed cells and their outputs, and the code they call (the pipeline, evaluation, speculative
    decoding, the HF export) has its own tests."""
    monkeypatch.setenv("SLIMQWEN_NOTEBOOK_WORKDIR", str(tmp_path / "runs"))
    monkeypatch.setenv("XLA_FLAGS", one_device_env()["XLA_FLAGS"])
    notebook = builder.execute(builder.build())  # raises on the first cell that fails
    check_outputs(notebook)
    assert (tmp_path / "runs" / "report.md").exists() and (tmp_path / "runs" / "student_hf" / "config.json").exists()
