"""What a user sees of a run: progress lines with ETA, metrics as JSON lines + TensorBoard, a loss PNG.

Only rank 0 tracks.  Files go to a local directory; the recipe copies it to remote storage.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from raydino.progress import format_duration


class RunTracker:
    """Append-only metrics log plus progress printing.

    `log(step, metrics)` writes one JSON line and TensorBoard scalars, and prints
    `epoch e/E step s/S loss … img/s … wait …% entropy … ETA …`.
    """

    def __init__(self, log_dir: str | Path | None, total_steps: int, total_epochs: int, printer=print) -> None:
        self.total_steps = total_steps
        self.total_epochs = total_epochs
        self.printer = printer
        self.log_dir = Path(log_dir) if log_dir else None
        self._t0 = time.perf_counter()
        self._step0: int | None = None
        self._tb = None
        if self.log_dir:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._jsonl = self.log_dir / "metrics.jsonl"
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.log_dir / "tensorboard"))
            except Exception as e:  # TensorBoard is optional at run time; the JSON log is not
                printer(f"[raydino] TensorBoard events disabled: {e}")

    def eta(self, step: int) -> float:
        if self._step0 is None:
            self._step0 = step
            self._t0 = time.perf_counter()
            return float("nan")
        done = step - self._step0
        if done <= 0:
            return float("nan")
        per_step = (time.perf_counter() - self._t0) / done
        return per_step * (self.total_steps - step)

    def log(self, step: int, epoch: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, "epoch": epoch, "time": time.time(), **metrics}
        if self.log_dir:
            with self._jsonl.open("a") as f:
                f.write(json.dumps(record) + "\n")
            if self._tb is not None:
                for k, v in metrics.items():
                    if isinstance(v, (int, float)) and math.isfinite(v):
                        self._tb.add_scalar(k, v, step)
                self._tb.flush()
        eta = self.eta(step)
        collapse = metrics.get("collapse") or "no"
        self.printer(
            f"[raydino] epoch {epoch + 1}/{self.total_epochs} step {step}/{self.total_steps} "
            f"loss {metrics.get('loss', float('nan')):.4f} "
            f"{metrics.get('images_per_s', float('nan')):.1f} img/s "
            f"data-wait {100 * metrics.get('data_wait_fraction', float('nan')):.0f}% "
            f"entropy {metrics.get('teacher_entropy', float('nan')):.2f}/{metrics.get('max_entropy', float('nan')):.2f} "
            f"collapse {collapse} ETA {format_duration(eta)}",
        )

    def log_probe(self, step: int, epoch: int, metrics: dict[str, Any]) -> None:
        """An epoch end's probe of the teacher (`probe_val_auroc`, `probe_kind`, `probe_seconds`): a JSON line and a progress line."""
        record = {"step": step, "epoch": epoch, "time": time.time(), **metrics}
        if self.log_dir:
            with self._jsonl.open("a") as f:
                f.write(json.dumps(record) + "\n")
            if self._tb is not None and metrics.get("probe_val_auroc") is not None:
                self._tb.add_scalar("probe_val_auroc", metrics["probe_val_auroc"], step)
                self._tb.flush()
        value = metrics.get("probe_val_auroc")
        when = "before training" if step == 0 else "done"
        self.printer(
            f"[raydino] epoch {epoch}/{self.total_epochs} {when}: teacher's val AUROC "
            f"{'undefined' if value is None else f'{value:.3f}'} ({metrics.get('probe_kind')} probe, "
            f"{metrics.get('probe_n_val')} val images, {metrics.get('probe_seconds', 0):.0f}s{_parts(metrics)})"
        )

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss(metrics_jsonl: str | Path, out_png: str | Path, title: str = "DINO pretraining") -> Path | None:
    """Loss (and teacher entropy) against step, and below it the epoch-end probe's val AUROC when the run
    logged one; returns the PNG path, or None without data."""
    everything = read_metrics(metrics_jsonl)
    rows = [r for r in everything if "loss" in r]
    probes = [r for r in everything if r.get("probe_val_auroc") is not None]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    if probes:
        fig, (ax, ax_probe) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=(3, 2))
        ax_probe.plot([r["step"] for r in probes], [r["probe_val_auroc"] for r in probes], "o-", color="tab:green")
        ax_probe.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax_probe.set_ylabel(f"val AUROC ({probes[-1].get('probe_kind', 'probe')})")
        ax_probe.set_xlabel("step")
    else:
        fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["loss"] for r in rows], color="tab:blue", label="loss")
    if not probes:
        ax.set_xlabel("step")
    ax.set_ylabel("DINO loss", color="tab:blue")
    if any("teacher_entropy" in r for r in rows):
        ax2 = ax.twinx()
        ax2.plot(steps, [r.get("teacher_entropy", float("nan")) for r in rows], color="tab:orange", alpha=0.7)
        ax2.set_ylabel("teacher entropy (nats)", color="tab:orange")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)


def _parts(metrics: dict[str, Any]) -> str:
    """The progress line's suffix ": features 40s, fit 2s" when the probe's time came by part."""
    parts = [(k, metrics[f"probe_{k}_seconds"]) for k in ("features", "fit") if metrics.get(f"probe_{k}_seconds") is not None]
    return (": " + ", ".join(f"{k} {v:.0f}s" for k, v in parts)) if parts else ""
