"""PNG plots: the learning curves of a run folder (``rtrl-jax plot``) and a gradient comparison."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rtrl_jax._src.compare import Comparison
from rtrl_jax.experiment.run import read_metrics


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _smooth(values: np.ndarray, weights: np.ndarray, window: int) -> np.ndarray:
    """Weighted moving average over ``window`` steps (NaN where no step in the window has weight)."""
    kernel = np.ones(window)
    total = np.convolve(np.nan_to_num(values) * weights, kernel, mode="same")
    norm = np.convolve(weights, kernel, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norm > 0, total / np.maximum(norm, 1e-30), np.nan)


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Writes ``learning_curves.png`` (loss, accuracy, gradient norm against step) for a run folder.

    Steps with non-finite values are marked with red lines.

    Args:
      run_dir: a run folder with ``metrics.jsonl``.
      out: the PNG path (default ``RUN_DIR/learning_curves.png``).

    Returns:
      The PNG path.

    Raises:
      FileNotFoundError: the folder has no ``metrics.jsonl`` or it has no rows.
    """
    plt = _pyplot()
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    if not rows:
        raise FileNotFoundError(f"no metrics in {str(run_dir / 'metrics.jsonl')!r}; is it a run folder?")
    steps = np.array([r["step"] for r in rows])
    weight = np.array([r["weight"] for r in rows], float)

    def column(name):
        return np.array([np.nan if r[name] is None else r[name] for r in rows], float)

    window = max(1, len(rows) // 50)
    panels = [("loss", "loss (mean per weighted step)", weight)]
    if any(r["accuracy"] is not None for r in rows):
        panels.append(("accuracy", "accuracy", weight))
    panels.append(("grad_norm", "gradient norm", np.ones_like(weight)))
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.4 * len(panels)), sharex=True, squeeze=False)
    bad = steps[[bool(r["nonfinite"]) for r in rows]]
    for ax, (name, label, w) in zip(axes[:, 0], panels, strict=True):
        values = column(name)
        ax.plot(steps, values, color="0.8", lw=0.5, label="per step")
        ax.plot(steps, _smooth(values, w * np.isfinite(values), window), lw=1.5, label=f"mean of {window}")
        for step in bad[:200]:
            ax.axvline(step, color="red", lw=0.5, alpha=0.5)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(loc="upper right", fontsize=8)
    axes[-1, 0].set_xlabel("step")
    title = run_dir.name
    if len(bad):
        title += f" ({len(bad)} non-finite steps, red)"
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(out) if out else run_dir / "learning_curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_comparison(comparison: Comparison, windows: Sequence[int], path: str | Path) -> None:
    """Writes a PNG: per-window alignment along the run, and mean alignment against the window."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    w0 = windows[0]
    for name, curves in comparison.curves.items():
        curve = curves[w0]
        smooth = max(1, curve.shape[0] // 50)
        kernel = np.ones(smooth) / smooth
        smoothed = np.convolve(curve, kernel, mode="valid")
        ax1.plot((np.arange(smoothed.shape[0]) + (smooth - 1) / 2) * w0, smoothed, label=name)
    ax1.set_xlabel("step")
    ax1.set_ylabel(f"cos(estimate, exact), window {w0}")
    ax1.set_title("alignment along the trajectory")
    ax1.legend(fontsize=8)
    for name, entry in comparison.summary.items():
        ax2.plot(list(windows), [entry[f"cosine@{w}"] for w in windows], marker="o", label=name)
    ax2.set_xscale("log")
    ax2.set_xlabel("window (steps summed)")
    ax2.set_ylabel("mean cosine with exact RTRL")
    ax2.set_title("alignment against the window")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
