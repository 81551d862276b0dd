"""Start-up and tail of `fedcrm run`: the time outside the rounds, and the launcher's memory.

A federation's rounds can be fast while the user still waits: interpreters
start, torch is imported, data is read and mapped, the first training step
warms up, and at the end the model is scored on the held-out rows. This
benchmark runs `fedcrm run` as a user does (a subprocess, on synthetic data
made by `fedcrm synth`) and splits its wall time with the aggregator's own
events:

    start-up   process start -> the first round begins (statistics stage included)
    rounds     the sum of the rounds' durations as the aggregator records them
    tail       the aggregator's "finished" event -> the command exits
    outside    wall - rounds

and samples the launcher's peak resident memory (VmHWM; children excluded).
With ``--compare REF`` the same job also runs from a git worktree of REF with
the same interpreter, interleaved with this tree's runs, so the two are
measured side by side under the same load and reported as ratios.

    python bench/startup.py [--quick] [--compare REF] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("src", "node_image", "aggregator_image")


@dataclass
class Row:
    impl: str
    repeat: int
    wall_s: float
    startup_s: float
    rounds_s: float
    tail_s: float
    outside_s: float
    launcher_peak_rss_mib: float
    accuracy: float


def _env_for(tree: Path) -> dict[str, str]:
    """Run ``tree``'s code with this interpreter: its source folders first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(str(tree / d) for d in SOURCE_DIRS)
    return env


def _peak_rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_once(impl: str, tree: Path, data: Path, out: Path, repeat: int) -> Row:
    argv = [sys.executable, "-m", "fedcrm.cli.main", "run", "--federation", str(data / "federation.yaml"),
            "--participant", *map(str, sorted((data / "participants").glob("*.yaml"))),
            "--test-data", str(data / "test.csv"), "--out", str(out)]
    started = time.time()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=_env_for(tree), cwd=tree)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _peak_rss_kib(proc.pid))
        time.sleep(0.02)
    ended = time.time()
    output = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    if proc.returncode != 0:
        raise SystemExit(f"{impl}: fedcrm run exited {proc.returncode}:\n{output[-3000:]}")
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines() if line.strip()]
    rounds = [e for e in events if e["event"] == "round"]
    finished = next(e["time"] for e in events if e["event"] == "finished")
    first_round_start = rounds[0]["time"] - rounds[0]["duration_s"]
    rounds_s = sum(e["duration_s"] for e in rounds)
    report = json.loads((out / "report.json").read_text())
    wall = ended - started
    return Row(impl, repeat, round(wall, 3), round(first_round_start - started, 3), round(rounds_s, 3),
               round(ended - finished, 3), round(wall - rounds_s, 3), round(peak / 1024, 1),
               report["metrics"]["accuracy"])


def _worktree(ref: str, where: Path) -> Path:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--force", str(where), ref],
                   check=True, capture_output=True)
    return where


def _median(rows: list[Row], impl: str, field: str) -> float:
    return statistics.median(getattr(r, field) for r in rows if r.impl == impl)


def print_table(rows: list[Row], impls: list[str]) -> None:
    fields = ["wall_s", "startup_s", "rounds_s", "tail_s", "outside_s", "launcher_peak_rss_mib", "accuracy"]
    print(f"\n{'median of ' + str(len(rows) // len(impls)) + ' runs':<22}" + "".join(f"{f:>22}" for f in fields))
    for impl in impls:
        print(f"{impl:<22}" + "".join(f"{_median(rows, impl, f):>22.3f}" for f in fields))
    if len(impls) == 2:
        new, old = impls
        print(f"{'ratio ' + new + '/' + old:<22}" + "".join(
            f"{_median(rows, new, f) / max(_median(rows, old, f), 1e-9):>22.3f}" for f in fields))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="runs per implementation, interleaved (default 3)")
    parser.add_argument("--compare", metavar="REF", help="also run the git revision REF, side by side")
    parser.add_argument("--quick", action="store_true", help="3 clients x 400 rows, 2 rounds, 1 repeat")
    parser.add_argument("--json", type=Path, help="write the rows and medians here")
    args = parser.parse_args()
    if args.quick:
        args.clients, args.rows, args.rounds, args.repeats = 3, 400, 2, 1

    with tempfile.TemporaryDirectory(prefix="fedcrm-bench-startup-") as tmp:
        work = Path(tmp)
        data = work / "data"
        subprocess.run([sys.executable, "-m", "fedcrm.cli.main", "synth", "--clients", str(args.clients),
                        "--rows", str(args.rows), "--rounds", str(args.rounds), "--out", str(data)],
                       check=True, capture_output=True, env=_env_for(ROOT))
        trees = {"this tree": ROOT}
        if args.compare:
            trees[args.compare] = _worktree(args.compare, work / "compare")
        rows: list[Row] = []
        try:
            for repeat in range(args.repeats):
                for impl, tree in trees.items():
                    row = run_once(impl, tree, data, work / "out" / f"{len(rows)}", repeat)
                    rows.append(row)
                    print(f"{impl:<12} run {repeat + 1}: wall {row.wall_s:6.2f}s  start-up {row.startup_s:6.2f}s  "
                          f"rounds {row.rounds_s:6.2f}s  tail {row.tail_s:5.2f}s  outside {row.outside_s:6.2f}s  "
                          f"launcher RSS {row.launcher_peak_rss_mib:6.1f} MiB", flush=True)
        finally:
            if args.compare:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(work / "compare")],
                               capture_output=True)
    impls = list(trees)
    print_table(rows, impls)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        medians = {impl: {f: _median(rows, impl, f) for f in ("wall_s", "startup_s", "rounds_s", "tail_s", "outside_s",
                                                              "launcher_peak_rss_mib", "accuracy")} for impl in impls}
        args.json.write_text(json.dumps({"job": {"clients": args.clients, "rows": args.rows, "rounds": args.rounds},
                                         "rows": [asdict(r) for r in rows], "medians": medians}, indent=2) + "\n")


if __name__ == "__main__":
    main()
