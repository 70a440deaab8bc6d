"""Progress of long runs: log lines with tokens/s and ETA, tensorboard scalars, a metrics history
(`metrics.jsonl`) and its loss-curve plot."""

from __future__ import annotations

import io
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from slimqwen_jax import storage

log = logging.getLogger("slimqwen_jax")

# The held-out terms of a run's objective: LM and MTP cross-entropy, and with a teacher the KD
# terms and the top-1 agreement of the backbones (the trainer adds teacher-forced MTP acceptance).
HELDOUT_METRICS = ("ce", "mtp_ce", "kd", "mtp_kd", "top1_agreement")
# The loss parts in a train log line, and the loss weights.
_LOGGED_TERMS = ("ce", "kd", "mtp_ce", "mtp_kd", "aux_loss", "top1_agreement")


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def routing_scalars(metrics: dict) -> dict[str, float]:
    """Per MoE layer i: routing/layer{i}_max_load (max over mean expert load, 1 = balanced),
    routing/layer{i}_layer_aux_loss and routing/layer{i}_dropped_fraction, from the [L_moe] metrics
    of `moe.stack_routing_metrics`."""
    return {
        f"routing/layer{i:02d}_{name}": float(value)
        for name in ("max_load", "layer_aux_loss", "dropped_fraction")
        for i, value in enumerate(np.asarray(metrics.get(name, ())))
    }


def tensorboard_writer_class():
    """tensorboardX's SummaryWriter, imported without torch: tensorboardX imports torch whenever it
    is installed, only to accept torch tensors (about a second of every command's start-up; we log
    Python floats). A process that has imported torch already keeps it."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # an import of torch now raises ImportError, which tensorboardX catches
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class ProgressLogger:
    """Logs every `log_every` steps; held-out losses whenever given. Only the main process writes
    (log lines, tensorboard, metrics.jsonl); every process keeps its summary."""

    def __init__(
        self,
        workdir: Path,
        *,
        total_steps: int,
        start_step: int,
        tokens_per_step: int,
        log_every: int,
        is_main: bool,
        end_step: int | None = None,
    ):
        """total_steps: the run's last step (for the ETA); end_step: the last step this logger sees
        (a stage's end; default total_steps), always logged."""
        self.total_steps, self.tokens_per_step, self.log_every, self.is_main = (
            total_steps,
            tokens_per_step,
            log_every,
            is_main,
        )
        self.end_step = total_steps if end_step is None else end_step
        self.history_file = workdir / "metrics.jsonl"
        self._writer = None
        if is_main:
            SummaryWriter = tensorboard_writer_class()
            workdir.mkdir(parents=True, exist_ok=True)
            drop_history_after(self.history_file, start_step)
            # A resumed run replays the steps after its checkpoint: drop their old events too.
            self._writer = SummaryWriter(
                str(workdir / "tensorboard"), purge_step=start_step + 1 if start_step else None
            )
        self._start_time = self._last_time = time.perf_counter()
        self._last_step = start_step
        self._first_interval = True
        self._steady = {"steps": 0, "seconds": 0.0}
        self._last = {}

    def _record(self, step: int, scalars: dict[str, float]) -> None:
        self._last.update(scalars)
        if not self.is_main:
            return
        for name, value in scalars.items():
            self._writer.add_scalar(name, value, step)
        storage.append_text(self.history_file, json.dumps({"step": step, **scalars}) + "\n")

    def train(self, step: int, metrics: dict, learning_rate: float) -> None:
        if step % self.log_every and step != self.end_step:
            return
        now = time.perf_counter()
        steps, seconds = step - self._last_step, now - self._last_time
        self._last_step, self._last_time = step, now
        if not self._first_interval:  # the first interval includes compilation
            self._steady["steps"] += steps
            self._steady["seconds"] += seconds
        self._first_interval = False
        tokens_per_sec = steps * self.tokens_per_step / seconds
        scalars = {f"train/{k}": float(v) for k, v in metrics.items() if np.ndim(v) == 0}
        scalars.update({"train/learning_rate": learning_rate, "perf/tokens_per_sec": tokens_per_sec})
        scalars.update(routing_scalars(metrics))
        self._record(step, scalars)
        if not self.is_main:
            return
        eta = (self.total_steps - step) * seconds / max(steps, 1)
        parts = " ".join(f"{k} {float(metrics[k]):.4f}" for k in _LOGGED_TERMS if k in metrics)
        if "kd" in metrics:
            parts += f" | lam {float(metrics['lam']):.3f} beta {float(metrics['beta']):.3f}"
            if float(metrics["mtp_lam"]) != float(metrics["lam"]):
                parts += f" mtp_lam {float(metrics['mtp_lam']):.3f}"
        if np.any(np.asarray(metrics.get("dropped_fraction", 0.0))):
            parts += f" dropped {float(np.mean(metrics['dropped_fraction'])):.2%}"
        log.info(
            "step %d/%d | loss %.4f (%s) | lr %.2e | grad %.3f | %s tok/s | ETA %s",
            step, self.total_steps, float(metrics["loss"]), parts, learning_rate, float(metrics["grad_norm"]),
            f"{tokens_per_sec:,.0f}", format_duration(eta),
        )  # fmt: skip

    def heldout(self, step: int, metrics: dict[str, float]) -> None:
        """Record held-out metrics as `heldout/<name>`."""
        self._record(step, {f"heldout/{k}": v for k, v in metrics.items()})
        if not self.is_main:
            return
        parts = " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "ce")
        log.info(
            "step %d/%d | held-out loss %.4f%s", step, self.total_steps, metrics["ce"], f" ({parts})" * bool(parts)
        )

    def summary(self) -> dict:
        """Last train/held-out values, steady-state tokens/s and wall time of this process's run."""
        if not self._last:
            return {}
        steady = self._steady
        tokens_per_sec = steady["steps"] * self.tokens_per_step / steady["seconds"] if steady["seconds"] else None
        return {
            "step": self._last_step,
            "train_loss": self._last.get("train/loss"),
            "train_ce": self._last.get("train/ce"),
            **{f"heldout_{k.removeprefix('heldout/')}": v for k, v in self._last.items() if k.startswith("heldout/")},
            "tokens_per_sec": tokens_per_sec,
            "wall_seconds": time.perf_counter() - self._start_time,
        }

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def plot_loss_curves(history_file: Path, output: Path, reference: dict[str, float] | None = None) -> None:
    """Train and held-out cross-entropy (and the KD term, when distilling) against step from
    `metrics.jsonl` (later entries win)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {name: read_history(history_file, name) for name in ("train/ce", "train/mtp_ce", "train/kd", "heldout/ce")}
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, points in series.items():
        if points:
            steps = sorted(points)
            ax.plot(
                steps, [points[s] for s in steps], marker="o" if name.startswith("heldout") else None, ms=3, label=name
            )
    for label, value in (reference or {}).items():
        ax.axhline(value, ls="--", color="gray", lw=1)
        ax.annotate(label, (0, value), xytext=(4, 3), textcoords="offset points", fontsize=8, color="gray")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, output)
    plt.close(fig)


def save_figure(fig, output: Path) -> None:
    """`fig` as a PNG at `output` (a local path or a URL, `storage.write_bytes`)."""
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    storage.write_bytes(output, png.getvalue())


def drop_history_after(history_file: Path, step: int) -> None:
    """Keep only the `metrics.jsonl` entries up to `step` (a resume from `step` logs the rest again)."""
    if not history_file.exists():
        return
    lines = history_file.read_text().splitlines()
    kept = [line for line in lines if json.loads(line)["step"] <= step]
    if len(kept) != len(lines):
        storage.write_text(history_file, "".join(line + "\n" for line in kept))


def read_history(history_file: Path, metric: str) -> dict[int, float]:
    """{step: value} of one metric in a `metrics.jsonl` (later entries win, as after a resume)."""
    points = {}
    for line in history_file.read_text().splitlines():
        entry = json.loads(line)
        if metric in entry:
            points[entry["step"]] = entry[metric]
    return points


def plot_runs(
    histories: dict[str, Path | Sequence[Path]],
    output: Path,
    metric: str = "heldout/ce",
    title: str = "",
    reference: dict[str, float] | None = None,
) -> None:
    """One metric of several runs against step, one line per run (`{label: metrics.jsonl}`, or the
    files of its stages in order), and dashed horizontal `reference` lines ({label: value})."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, files in histories.items():
        points = {}
        for history_file in [files] if isinstance(files, Path) else files:
            points.update(read_history(history_file, metric))
        steps = sorted(points)
        ax.plot(steps, [points[s] for s in steps], marker="o", ms=3, label=label)
    for label, value in (reference or {}).items():
        ax.axhline(value, ls="--", color="gray", lw=1, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, output)
    plt.close(fig)
