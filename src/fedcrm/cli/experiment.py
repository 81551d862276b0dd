"""``fedcrm experiment``: a grid of settings x seeds, resumable, with tables and plots.

Kept apart from main.py; the experiment machinery (and pandas, through synth) is imported only when the command
runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from fedcrm.errors import FedcrmError

__all__ = ["add_parser"]

_EPILOG = """\
outputs in DIR:
  results.csv              one row per cell (setting, seed): status and reason, accuracy, precision, recall, f1, auc,
                           bytes up / total per client per round, epsilon spent, attack AUC, rounds, wall s
  results.md               mean ± std over seeds per setting, the config's published numbers side by side,
                           and every failed cell with its reason
  accuracy_per_round.png   validation accuracy per round for each setting (mean over seeds, ±1 std band)
  privacy_accuracy.png     accuracy and attack AUC against epsilon (only when the settings vary epsilon)
  bytes_per_round.png      bytes a participant sends and receives per round, per federated setting
  data/seed-S/             fedcrm synth's output for each seed
  cells/SETTING/seed-S/    each cell's manifest, fedcrm output folder (run/), log.txt and cell.json

resuming: run the same command again; finished cells (same inputs) are kept, interrupted or failed ones rerun.
--quick: at most 3 clients x 400 rows, 3 rounds, the first 2 seeds, 1 shadow model of 3 epochs (unless the
config's quick block says otherwise), through the same code path.

exit codes: 0 every cell succeeded; 1 some cell failed (each is in results.md with its reason); 2 bad input;
130 interrupted
"""


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "experiment",
        help="run a grid of settings x seeds (baseline / run / audit) and write tables and plots",
        description="Run every (setting, seed) cell of an experiment file: fedcrm synth per seed, then fedcrm "
        "baseline or run with the setting's manifest changes, then fedcrm audit where asked. Cells run in "
        "parallel where the machine allows; a rerun resumes; Ctrl-C stops the running cells cleanly.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_EPILOG,
    )
    p.add_argument("--config", required=True, type=Path, metavar="EXP.yaml",
                   help="the experiment file (experiments/*.yaml; format in docs/experiments.md)")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder (created; reused to resume)")
    p.add_argument("--quick", action="store_true", help="the smoke-sized variant (see below)")
    p.add_argument("--jobs", type=int, metavar="N",
                   help="cells at once (default: CPU cores / (clients + 1), within memory; at least 1)")
    p.add_argument("--check", action="store_true", help="only validate the file (and its quick variant), run nothing")
    p.set_defaults(handler=_cmd_experiment)


def _cmd_experiment(args: argparse.Namespace) -> int:
    from fedcrm.experiments import load_experiment, run_experiment

    if args.jobs is not None and args.jobs < 1:
        raise FedcrmError("--jobs must be at least 1")
    experiment = load_experiment(args.config, quick=args.quick)
    if args.check:
        other = load_experiment(args.config, quick=not args.quick)
        for e in (experiment, other):
            print(f"{args.config}: {e.name}{' (quick variant)' if e.is_quick else ''}: {len(e.settings)} settings "
                  f"x {len(e.seed_list)} seeds, {e.data.clients} clients x {e.data.rows:,} rows, {e.rounds} rounds: ok")
        return 0
    started = time.monotonic()

    def say(line: str) -> None:
        print(f"{_clock(time.monotonic() - started)} {line}", flush=True)

    try:
        failed = run_experiment(experiment, args.out, jobs=args.jobs, say=say)
    except KeyboardInterrupt:
        print("interrupted: finished cells are kept; run the same command again to resume", file=sys.stderr)
        return 130
    return 1 if failed else 0


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"[{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}]"
