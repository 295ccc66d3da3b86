"""Training curves from a run's metrics.jsonl: loss and accuracy against steps, and validation accuracy with
its 95% CI against steps and wall time."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """(training rows, validation rows) of a run folder."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; give a run folder written by `kshot train`")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if "loss" in r], [r for r in rows if "val_accuracy" in r]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the training curves of `run_dir` to a PNG (default: <run_dir>/curves.png)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("plots need matplotlib: pip install 'kshot[plots]'") from error
    train, val = read_metrics(run_dir)
    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    if train:
        steps = [r["step"] for r in train]
        axes[0].plot(steps, [r["loss"] for r in train], lw=0.8)
        axes[0].set(xlabel="step", ylabel="training loss", yscale="log")
        if "accuracy" in train[0]:
            accuracy = [r["accuracy"] for r in train]
            # Logs written before kshot 0.1.0's typed metrics held fractions; today's hold percents.
            scale = 100.0 if max(accuracy) <= 1.0 else 1.0
            axes[1].plot(steps, [scale * a for a in accuracy], lw=0.8, label="training episodes")
    if val:
        steps = [r["step"] for r in val]
        accuracy = [r["val_accuracy"] for r in val]
        ci = [r.get("val_ci95", 0.0) for r in val]
        axes[1].errorbar(steps, accuracy, yerr=ci, marker="o", ms=3, capsize=2, label="validation (95% CI)")
        axes[2].errorbar([r["seconds"] / 60 for r in val], accuracy, yerr=ci, marker="o", ms=3, capsize=2)
        axes[2].set(xlabel="training time (minutes)", ylabel="validation accuracy %")
    axes[1].set(xlabel="step", ylabel="accuracy %")
    axes[1].legend()
    figure.suptitle(str(run_dir))
    figure.tight_layout()
    target = Path(out) if out else Path(run_dir) / "curves.png"
    figure.savefig(target, dpi=110)
    plt.close(figure)
    return target
