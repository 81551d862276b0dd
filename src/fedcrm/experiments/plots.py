"""The experiment's PNGs: accuracy per round, the privacy-accuracy trade-off over epsilon, bytes per round.

matplotlib is imported when a plot is drawn (the CLI's start-up stays light), with the non-interactive Agg
backend.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot_accuracy_per_round", "plot_bytes_per_round", "plot_privacy_accuracy", "setting_epsilons"]

Results = Mapping[str, Sequence[dict[str, Any]]]  # setting -> its succeeded cells' cell.json


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _per_round(cells: Sequence[dict[str, Any]], value: Any) -> tuple[list[int], list[float], list[float]]:
    """Rounds, mean and std over seeds of ``value(history entry)``, for rounds every seed has a value for."""
    by_round: dict[int, list[float]] = {}
    for c in cells:
        for h in c.get("history") or []:
            v = value(h)
            if v is not None and h.get("round") is not None:
                by_round.setdefault(h["round"], []).append(v)
    rounds = sorted(by_round)
    means = [statistics.fmean(by_round[r]) for r in rounds]
    sds = [statistics.stdev(by_round[r]) if len(by_round[r]) > 1 else 0.0 for r in rounds]
    return rounds, means, sds


def plot_accuracy_per_round(results: Results, path: Path, *, title: str) -> None:
    """Validation accuracy per round (epoch for the central baseline), mean over seeds with a ±1 std band."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for name, cells in results.items():
        rounds, means, sds = _per_round(cells, lambda h: h.get("accuracy"))
        if not rounds:
            continue
        line, = ax.plot(rounds, [100 * m for m in means], marker="o" if len(rounds) <= 20 else None, label=name)
        ax.fill_between(rounds, [100 * (m - s) for m, s in zip(means, sds)],
                        [100 * (m + s) for m, s in zip(means, sds)], color=line.get_color(), alpha=0.2)
    ax.xaxis.set_major_locator(_integer_ticks())
    ax.set_xlabel("round (epoch for central training)")
    ax.set_ylabel("accuracy on validation records (%)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bytes_per_round(results: Results, path: Path, *, title: str) -> None:
    """Bytes one participant sends (solid) and receives (dashed) per round, mean over seeds; federated settings."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for name, cells in results.items():
        rounds, up, _ = _per_round(cells, lambda h: h.get("bytes_up_per_client") or None)
        if not rounds:
            continue  # central training sends nothing
        line, = ax.plot(rounds, [u / 1000 for u in up], label=f"{name}: sent")
        rounds_down, down, _ = _per_round(cells, lambda h: h.get("bytes_down_per_client") or None)
        ax.plot(rounds_down, [d / 1000 for d in down], linestyle="--", color=line.get_color(),
                label=f"{name}: received")
    ax.xaxis.set_major_locator(_integer_ticks())
    ax.set_xlabel("round")
    ax.set_ylabel("kB per participant per round")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _integer_ticks() -> Any:
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def setting_epsilons(specs: Mapping[str, dict[str, Any]]) -> dict[str, float]:
    """Each setting's epsilon (``math.inf`` without differential privacy), from its merged Federation spec."""
    out = {}
    for name, spec in specs.items():
        dp = ((spec.get("privacy") or {}).get("differentialPrivacy") or {})
        out[name] = float(dp["epsilon"]) if dp.get("mode", "none") != "none" and dp.get("epsilon") else math.inf
    return out


def plot_privacy_accuracy(results: Results, epsilons: Mapping[str, float], path: Path, *, title: str) -> None:
    """Accuracy and attack AUC against each setting's epsilon (no DP drawn at the right, as infinity)."""
    plt = _pyplot()
    finite = sorted({e for e in epsilons.values() if math.isfinite(e)})
    infinity = (max(finite) * 4) if finite else 1.0
    fig, (acc_ax, auc_ax) = plt.subplots(1, 2, figsize=(11, 4.5))
    for i, (name, cells) in enumerate(results.items()):
        eps = epsilons.get(name, math.inf)
        # settings at the same epsilon side by side, not on top of each other
        x = (eps if math.isfinite(eps) else infinity) * 1.06 ** (i - (len(results) - 1) / 2)
        for ax, key, scale in ((acc_ax, "accuracy", 100.0), (auc_ax, "attack_auc", 1.0)):
            values = [c[key] for c in cells if c.get(key) is not None]
            if not values:
                continue
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            ax.errorbar([x], [scale * statistics.fmean(values)], yerr=[scale * sd], fmt="o", capsize=4, label=name)
    auc_ax.axhline(0.5, linestyle=":", color="grey", label="chance")
    ticks = [*finite, infinity]
    for ax in (acc_ax, auc_ax):
        ax.set_xscale("log")
        ax.set_xticks(ticks, [f"{e:g}" for e in finite] + ["no DP"])
        ax.minorticks_off()
        ax.set_xlabel("epsilon (privacy budget)")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    acc_ax.set_ylabel("test accuracy (%)")
    auc_ax.set_ylabel("membership-inference AUC (shadow attack)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
