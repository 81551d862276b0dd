"""PNG plots for privacy results: attack ROC curves and the privacy-accuracy trade-off.

matplotlib runs with its non-interactive Agg backend, so plots work on
servers without a display.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plot_roc", "plot_tradeoff"]


def plot_roc(curves: Mapping[str, Any], path: Path, *, title: str) -> None:
    """ROC of each attack (objects with ``fpr``, ``tpr``, ``auc``), linear and log-log side by side."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for ax, log in zip(axes, (False, True)):
        for name, r in curves.items():
            ax.plot(r.fpr, r.tpr, label=f"{name} (AUC {r.auc:.3f})")
        ax.plot([1e-4, 1], [1e-4, 1], "k:", label="chance")
        if log:
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlim(1e-3, 1)
            ax.set_ylim(1e-3, 1)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_tradeoff(series: Mapping[str, Sequence[tuple[float, float, float]]], reference: Mapping[str, float],
                  path: Path) -> None:
    """Accuracy and attack AUC against epsilon per mode; ``series[mode] = [(epsilon, accuracy, auc)]``."""
    fig, (acc_ax, auc_ax) = plt.subplots(1, 2, figsize=(10, 4.5))
    for mode, points in series.items():
        pts = sorted(points)
        eps = [p[0] for p in pts]
        acc_ax.plot(eps, [100 * p[1] for p in pts], "o-", label=f"DP {mode}")
        auc_ax.plot(eps, [p[2] for p in pts], "o-", label=f"DP {mode}")
    for name, value in reference.items():
        if name.startswith("accuracy"):
            acc_ax.axhline(100 * value, linestyle="--", color="grey" if "baseline" in name else "black",
                           label=name.removeprefix("accuracy ").strip())
        else:
            auc_ax.axhline(value, linestyle="--", color="black", label=name.removeprefix("auc ").strip())
    auc_ax.axhline(0.5, linestyle=":", color="grey", label="chance")
    for ax in (acc_ax, auc_ax):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("privacy budget epsilon (delta = 1e-5)")
        ax.grid(alpha=0.3)
        ax.legend()
    acc_ax.set_ylabel("test accuracy (%)")
    auc_ax.set_ylabel("membership-inference AUC (shadow attack)")
    fig.suptitle("Privacy-accuracy trade-off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
