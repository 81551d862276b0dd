"""results.csv (one row per cell) and results.md (mean ± std over seeds, the papers' numbers beside ours)."""

from __future__ import annotations

import csv
import io
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedcrm.experiments.configs import Experiment

__all__ = ["CSV_COLUMNS", "render_csv", "render_markdown", "summarise", "write_tables"]

CSV_COLUMNS = ["setting", "seed", "command", "status", "reason", "accuracy", "precision", "recall", "f1", "auc",
               "bytes_up_per_client_per_round", "bytes_per_client_per_round", "epsilon_spent", "attack_auc",
               "attack_auc_loss", "rounds", "wall_s"]

_PERCENT = ("accuracy", "precision", "recall", "f1")


def render_csv(results: Sequence[dict[str, Any]]) -> str:
    """``results``: cell.json contents (cells not run yet are left out by the caller)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in results:
        writer.writerow({k: _csv_value(r.get(k)) for k in CSV_COLUMNS})
    return buffer.getvalue()


def _csv_value(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else v


def summarise(results: Sequence[dict[str, Any]], metric: str) -> tuple[float, float, int] | None:
    """(mean, sample std, n) of ``metric`` over the succeeded cells that have it; None when none does."""
    values = [r[metric] for r in results if r.get("status") == "succeeded" and r.get(metric) is not None]
    if not values:
        return None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


def spread(runs: Sequence[dict[str, Any]], keys: Sequence[str]) -> dict[str, Any]:
    """``{"runs": runs, key: mean, key_sd: sample std}`` for each of ``keys``: how the benchmarks report repeated
    runs of one setting (DP noise, stochastic rounding and GAN training differ run to run)."""
    out: dict[str, Any] = {"runs": list(runs)}
    for key in keys:
        values = [r[key] for r in runs]
        out[key] = statistics.fmean(values)
        out[f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return out


def _bytes(v: float) -> str:
    """Decimal units, as the papers quote them (12.3 MB)."""
    for unit in ("B", "kB", "MB"):
        if abs(v) < 1000:
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1000
    return f"{v:.1f} GB"


def _fmt(metric: str, s: tuple[float, float, int] | None) -> str:
    if s is None:
        return "–"
    mean, sd, n = s
    if metric in _PERCENT:
        return f"{100 * mean:.2f} ± {100 * sd:.2f}" if n > 1 else f"{100 * mean:.2f}"
    if metric.startswith("bytes"):
        return _bytes(mean) if sd < 0.005 * max(mean, 1) or n == 1 else f"{_bytes(mean)} ± {_bytes(sd)}"
    if metric == "wall_s":
        return f"{mean:.0f}"
    return f"{mean:.3f} ± {sd:.3f}" if n > 1 else f"{mean:.3f}"


def _one(metric: str, v: float) -> str:
    if metric in _PERCENT:
        return f"{100 * v:.2f}"
    if metric.startswith("bytes"):
        return _bytes(v)
    return f"{v:.3f}"


def _difference(metric: str, ours: float, theirs: float) -> str:
    if metric in _PERCENT:
        return f"{100 * (ours - theirs):+.2f} points"
    if metric.startswith("bytes"):
        if not theirs or not ours:
            return "–"
        return f"{ours / theirs:.3g} times" if ours >= theirs else f"1/{theirs / ours:.3g}"
    return f"{ours - theirs:+.3f}"


def _sizes(experiment: Experiment) -> str:
    d = experiment.data
    sizes = f"--rows {d.rows}" + (f" --min-rows {d.min_rows}" if d.min_rows else "")
    test = f" --test-rows {d.test_rows}" if d.test_rows else ""
    return f"`fedcrm synth --clients {d.clients} {sizes} --alpha {d.alpha:g}{test}`"


def render_markdown(experiment: Experiment, results: Sequence[dict[str, Any]], *, planned: int) -> str:
    """The summary table, the comparison with the reference numbers, and every failed cell with its reason."""
    variant = " (quick variant)" if experiment.is_quick else ""
    seeds = ", ".join(map(str, experiment.seed_list))
    lines = [f"# Experiment {experiment.name}{variant}", ""]
    if experiment.description:
        lines += [experiment.description.strip(), ""]
    lines += [
        f"Data: {_sizes(experiment)} per seed; seeds {seeds} (each seeds the data and the training); "
        f"{experiment.rounds} rounds. {len(results)} of {planned} cells ran. Metrics on the held-out test set, "
        "mean ± sample standard deviation over the seeds that succeeded (n); accuracy, precision, recall and F1 in %. "
        "Bytes: sent (up) and sent + received (total) by one participant per round. Attack AUC: membership "
        "inference by `fedcrm audit`, shadow-model attack (loss-threshold in results.csv); 0.5 is chance.",
        "",
        "| setting | n | accuracy | precision | recall | F1 | ROC AUC | bytes up / client / round "
        "| bytes total / client / round | epsilon spent | attack AUC | wall s / cell |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by_setting = {name: [r for r in results if r.get("setting") == name] for name in experiment.settings}
    for name, rows in by_setting.items():
        ok = [r for r in rows if r.get("status") == "succeeded"]
        n = f"{len(ok)}/{len(rows)}" if rows else "0/0"
        if rows and not ok:
            lines.append(f"| {name} | {n} | failed: {_escape(rows[-1].get('reason') or '?')} |" + " |" * 9)
            continue
        cells = []
        for m in ("accuracy", "precision", "recall", "f1", "auc", "bytes_up_per_client_per_round",
                  "bytes_per_client_per_round", "epsilon_spent", "attack_auc", "wall_s"):
            s = summarise(rows, m)
            # A metric some cells lack (precision of a model that predicts no positive) says over how many it is.
            cells.append(_fmt(m, s) + (f" (n={s[2]})" if s is not None and s[2] < len(ok) else ""))
        lines.append(f"| {name} | {n} | " + " | ".join(cells) + " |")
    ref = experiment.reference
    if ref is not None:
        lines += ["", "## Side by side with the published numbers", "", ref.source.strip(), ""]
        if experiment.is_quick:
            lines += ["This is the quick variant: far less data and fewer rounds than the published setting, so the "
                      "comparison shows the pipeline working, not a replication.", ""]
        if ref.note:
            lines += [ref.note.strip(), ""]
        lines += ["| setting | metric | ours | published | ours − published |", "|---|---|---:|---:|---:|"]
        for name, metrics in ref.values.items():
            for metric, theirs in metrics.items():
                s = summarise(by_setting.get(name, []), metric)
                ours = _fmt(metric, s)
                diff = "–" if s is None else _difference(metric, s[0], theirs)
                lines.append(f"| {name} | {metric} | {ours} | {_one(metric, theirs)} | {diff} |")
    failed = [r for r in results if r.get("status") != "succeeded"]
    if failed:
        lines += ["", "## Failed cells", ""]
        lines += [f"- {r['setting']}, seed {r['seed']}: {r.get('reason')}" for r in failed]
    return "\n".join(lines) + "\n"


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def write_tables(experiment: Experiment, results: Sequence[dict[str, Any]], out: Path, *, planned: int) -> None:
    _atomic(out / "results.csv", render_csv(results))
    _atomic(out / "results.md", render_markdown(experiment, results, planned=planned))


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
