"""One experiment from start to outputs: the grid, then results.csv, results.md and the PNGs."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from fedcrm.experiments import grids, plots, tables
from fedcrm.experiments.configs import Experiment, setting_manifest

__all__ = ["OUTPUTS", "run_experiment"]

OUTPUTS = ("results.csv", "results.md", "accuracy_per_round.png", "privacy_accuracy.png", "bytes_per_round.png")


def run_experiment(experiment: Experiment, out: Path, *, jobs: int | None = None,
                   say: Callable[[str], None] = print) -> int:
    """Run the unfinished cells and write the outputs (also after Ctrl-C, from what finished); the number of
    failed cells."""
    grids.check_outputs_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = jobs or grids.default_jobs(experiment.data.clients)
    planned = len(experiment.settings) * len(experiment.seed_list)
    variant = " (quick variant)" if experiment.is_quick else ""
    say(f"experiment {experiment.name}{variant}: {len(experiment.settings)} settings x {len(experiment.seed_list)} "
        f"seeds = {planned} cells, {jobs} at a time; {experiment.data.clients} clients x {experiment.data.rows:,} "
        f"rows, {experiment.rounds} rounds; outputs in {out}")

    def write(cells: list[grids.Cell]) -> None:
        tables.write_tables(experiment, [c.result for c in cells if c.result], out, planned=planned)

    try:
        cells = grids.run_grid(experiment, out, jobs=jobs, say=say, on_result=write)
    except KeyboardInterrupt:
        cells = grids.plan_cells(experiment, out)
        write([c for c in cells if c.finished()])
        raise
    write(cells)
    _plot(experiment, cells, out)
    failed = sum(1 for c in cells if c.result and c.result["status"] != "succeeded")
    made = [name for name in OUTPUTS if (out / name).is_file()]
    say(f"wrote {', '.join(made)} in {out}" + (f"; {failed} cell(s) failed (see results.md)" if failed else ""))
    return failed


def _plot(experiment: Experiment, cells: list[grids.Cell], out: Path) -> None:
    ok: dict[str, list[dict]] = {name: [] for name in experiment.settings}  # type: ignore[type-arg]
    for c in cells:
        if c.result and c.result["status"] == "succeeded":
            ok[c.setting_name].append(c.result)
    variant = " (quick)" if experiment.is_quick else ""
    title = f"{experiment.name}{variant}: mean over {len(experiment.seed_list)} seed(s)"
    plots.plot_accuracy_per_round(ok, out / "accuracy_per_round.png", title=title)
    federated = {n: r for n, r in ok.items() if experiment.settings[n].command == "run"}
    plots.plot_bytes_per_round(federated, out / "bytes_per_round.png", title=title)
    specs = {n: setting_manifest({}, experiment, s, 0)["spec"] for n, s in experiment.settings.items()}
    epsilons = plots.setting_epsilons(specs)
    # Only when the settings vary epsilon: two or more values, no DP counting as infinity (central training aside).
    varied = {epsilons[n] for n in federated}
    stale = out / "privacy_accuracy.png"
    if len(varied) > 1 and any(math.isfinite(e) for e in varied):
        plots.plot_privacy_accuracy(ok, epsilons, stale, title=title)
    elif stale.exists():
        stale.unlink()
