"""Running an experiment's grid: one folder per cell, resumable, a few cells at a time.

Layout of the output folder::

    DIR/data/seed-<s>/          fedcrm synth's output for seed s (shared by every setting)
    DIR/cells/<setting>/seed-<s>/
        federation.yaml         the cell's merged manifest
        run/                    the output folder of fedcrm run / baseline (audit.json too)
        log.txt                 the commands' stdout and stderr
        cell.json               written last: the cell's row of results.csv, and the digest of its inputs

A cell whose ``cell.json`` says it succeeded, for the same inputs (manifest,
command, audit options, data), is not run again; anything else (no
``cell.json``: interrupted; failed; inputs changed) is run from scratch. Each
cell runs ``fedcrm run`` / ``baseline`` / ``audit`` as subprocesses in their
own process group, so Ctrl-C (or SIGTERM) is passed to every running cell as
the SIGINT a terminal would send, and whatever is still alive after a grace
period is killed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import yaml

from fedcrm.errors import FedcrmError
from fedcrm.experiments.configs import Experiment, Setting, check_settings, digest, setting_manifest, slug

__all__ = ["Cell", "default_jobs", "plan_cells", "run_grid"]

FEDCRM = [sys.executable, "-m", "fedcrm.cli.main"]
#: Resident memory one participant (or the launcher, or the aggregator) takes, roughly: torch and a model.
_MIB_PER_PROCESS = 400
#: How long running cells get to stop on their own after Ctrl-C before they are killed.
_GRACE_S = 20.0


@dataclasses.dataclass
class Cell:
    """One (setting, seed) of the grid."""

    index: int
    setting_name: str
    setting: Setting
    seed: int
    folder: Path
    inputs: dict[str, Any]
    result: dict[str, Any] | None = None  # cell.json once finished (or loaded)

    @property
    def key(self) -> str:
        return digest(self.inputs)

    def finished(self) -> bool:
        """A successful ``cell.json`` for these inputs, with its report still there."""
        path = self.folder / "cell.json"
        if not path.is_file() or not (self.folder / "run" / "report.json").is_file():
            return False
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            return False
        if saved.get("status") != "succeeded" or saved.get("inputs_digest") != self.key:
            return False
        self.result = saved
        return True


def _data_dir(out: Path, seed: int) -> Path:
    return out / "data" / f"seed-{seed}"


def _data_inputs(experiment: Experiment, seed: int) -> dict[str, Any]:
    return {**experiment.synth_args(), "seed": seed}


def prepare_data(experiment: Experiment, out: Path, seed: int, say: Callable[[str], None]) -> Path:
    """``fedcrm synth`` for one seed, unless the same data is already there."""
    from fedcrm.data.synthetic import generate_federation

    folder = _data_dir(out, seed)
    marker = folder / ".synth.json"
    inputs = _data_inputs(experiment, seed)
    if marker.is_file() and json.loads(marker.read_text()) == inputs and (folder / "federation.yaml").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    started = time.monotonic()
    generate_federation(folder, **inputs)
    marker.write_text(json.dumps(inputs) + "\n")
    say(f"data for seed {seed}: {experiment.data.clients} clients x {experiment.data.rows:,} rows in "
        f"{time.monotonic() - started:.1f}s ({folder})")
    return folder


def plan_cells(experiment: Experiment, out: Path) -> list[Cell]:
    """The grid in run order (seed-major: every setting of seed 0 first, so a partial grid compares settings)."""
    cells = []
    for seed in experiment.seed_list:
        for name, setting in experiment.settings.items():
            folder = out / "cells" / slug(name) / f"seed-{seed}"
            inputs = {"command": setting.command, "spec": setting_manifest({}, experiment, setting, seed),
                      "audit": experiment.audit.model_dump() if setting.audit else None,
                      "data": _data_inputs(experiment, seed)}
            cells.append(Cell(len(cells) + 1, name, setting, seed, folder, inputs))
    return cells


def default_jobs(clients: int) -> int:
    """Cells at once: each `fedcrm run` already runs clients + 2 processes that train at the same time, so one
    cell per clients + 1 cores, and no more than memory holds (about 400 MiB a process); at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    by_cpu = cpus // (clients + 1)
    by_memory = _available_mib() // ((clients + 2) * _MIB_PER_PROCESS)
    return max(1, min(by_cpu, by_memory))


def _available_mib() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 4096


class _Children:
    """The subprocesses running now, each in its own process group, stoppable all at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._procs: set[subprocess.Popen[bytes]] = set()
        self.stopping = False

    def run(self, argv: list[str], log: Path) -> int:
        with self._lock:
            if self.stopping:
                return 130
            with open(log, "ab") as sink:
                proc = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True)
                # Written beside the child's first lines (both append): which group to look for if one outlives us.
                sink.write(f"$ fedcrm {' '.join(argv[3:])}  # process group {proc.pid}\n".encode())
            self._procs.add(proc)
        try:
            return proc.wait()
        finally:
            with self._lock:
                self._procs.discard(proc)

    def stop(self) -> None:
        """SIGINT to every group (what Ctrl-C in a terminal sends), then SIGKILL to what is left after a grace."""
        with self._lock:
            self.stopping = True
            procs = list(self._procs)
        for p in procs:
            _signal_group(p, signal.SIGINT)
        deadline = time.monotonic() + _GRACE_S
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in procs:
            _signal_group(p, signal.SIGKILL)  # the launcher's own children too, should any outlive it
        deadline = time.monotonic() + 5.0
        while any(_group_alive(p) for p in procs) and time.monotonic() < deadline:
            time.sleep(0.1)  # gone before we report "stopped"


def _group_alive(proc: subprocess.Popen[bytes]) -> bool:
    try:
        os.killpg(proc.pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _reason(log: Path, run: Path, code: int, what: str) -> str:
    """Why a command failed, in one line: its ``error:`` line, the report's message, or its exit status."""
    report = run / "report.json"
    if report.is_file():
        try:
            message = json.loads(report.read_text()).get("message")
        except ValueError:
            message = None
        if message and code == 1:
            return f"{what}: {message}"
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    errors = [ln for ln in lines if ln.startswith("error: ")]
    if errors:
        return f"{what}: {errors[-1].removeprefix('error: ')}"
    if code == 130:
        return f"{what}: interrupted"
    tail = next((ln.strip() for ln in reversed(lines) if ln.strip()), "")
    return f"{what}: exit status {code}" + (f" ({tail[:200]})" if tail else "")


def _row(report: dict[str, Any], audit: dict[str, Any] | None, *, federated: bool) -> dict[str, Any]:
    m = report.get("metrics") or {}
    history = report.get("history") or []
    # Central training moves no bytes: none, rather than a 0 that reads as a measurement.
    ups = [h["bytes_up_per_client"] for h in history if federated and h.get("bytes_up_per_client") is not None]
    privacy = report.get("privacy") or {}
    return {
        "accuracy": m.get("accuracy"), "precision": m.get("precision"), "recall": m.get("recall"),
        "f1": m.get("f1"), "auc": m.get("auc"),
        "bytes_up_per_client_per_round": sum(ups) / len(ups) if ups else None,
        "bytes_per_client_per_round": report.get("bytes_per_client_per_round") if federated else None,
        "epsilon_spent": privacy.get("epsilon_spent"),
        "attack_auc_loss": (audit or {}).get("loss_threshold", {}).get("auc"),
        "attack_auc": (audit or {}).get("shadow", {}).get("auc"),
        "rounds": report.get("rounds_completed"),
        "history": [{"round": h.get("round"), "accuracy": h.get("accuracy"),
                     "bytes_up_per_client": h.get("bytes_up_per_client"),
                     "bytes_down_per_client": h.get("bytes_down_per_client"),
                     "epsilon_spent": h.get("epsilon_spent")} for h in history],
    }


def run_cell(cell: Cell, experiment: Experiment, out: Path, children: _Children) -> dict[str, Any]:
    """Run one cell from scratch and write its ``cell.json``; returns it (status succeeded or failed)."""
    shutil.rmtree(cell.folder, ignore_errors=True)
    cell.folder.mkdir(parents=True)
    data = _data_dir(out, cell.seed)
    base = yaml.safe_load((data / "federation.yaml").read_text())
    fed = cell.folder / "federation.yaml"
    fed.write_text(yaml.safe_dump(setting_manifest(base, experiment, cell.setting, cell.seed), sort_keys=False))
    participants = [str(p) for p in sorted((data / "participants").glob("*.yaml"))]
    run, log = cell.folder / "run", cell.folder / "log.txt"
    common = ["--federation", str(fed), "--participant", *participants]
    started = time.monotonic()
    result: dict[str, Any] = {"setting": cell.setting_name, "seed": cell.seed, "command": cell.setting.command,
                              "inputs_digest": cell.key}
    code = children.run([*FEDCRM, cell.setting.command, *common, "--test-data", str(data / "test.csv"),
                         "--out", str(run)], log)
    if code != 0:
        result.update(status="failed", reason=_reason(log, run, code, cell.setting.command))
    audit = None
    if code == 0 and cell.setting.audit:
        a = experiment.audit
        argv = [*FEDCRM, "audit", *common, "--run", str(run), "--test-data", str(data / "test.csv"),
                "--shadows", str(a.shadows), "--max-records", str(a.max_records), "--seed", str(cell.seed)]
        if a.shadow_epochs:
            argv += ["--shadow-epochs", str(a.shadow_epochs)]
        code = children.run(argv, log)
        if code != 0:
            result.update(status="failed", reason=_reason(log, run, code, "audit"))
        else:
            audit = json.loads((run / "audit.json").read_text())
    if (run / "report.json").is_file():
        result.update(_row(json.loads((run / "report.json").read_text()), audit,
                           federated=cell.setting.command == "run"))
    result.setdefault("status", "succeeded")
    result["wall_s"] = round(time.monotonic() - started, 1)
    if children.stopping:
        return {**result, "status": "interrupted"}  # no cell.json: redone on the next run
    tmp = cell.folder / "cell.json.tmp"
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(cell.folder / "cell.json")
    return result


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _summary(result: dict[str, Any]) -> str:
    if result["status"] != "succeeded":
        return f"FAILED: {result.get('reason')}"
    parts = [f"accuracy {100 * result['accuracy']:.2f}%" if result.get("accuracy") is not None else "no accuracy"]
    if result.get("attack_auc") is not None:
        parts.append(f"attack AUC {result['attack_auc']:.3f}")
    if result.get("epsilon_spent") is not None:
        parts.append(f"epsilon {result['epsilon_spent']:.3g}")
    return ", ".join(parts)


def run_grid(experiment: Experiment, out: Path, *, jobs: int, say: Callable[[str], None],
             on_result: Callable[[list[Cell]], None]) -> list[Cell]:
    """Run every unfinished cell, ``jobs`` at a time; ``on_result`` gets all cells after each one finishes.

    Raises ``KeyboardInterrupt`` after stopping the running cells when interrupted (Ctrl-C or SIGTERM)."""
    cells = plan_cells(experiment, out)
    total = len(cells)
    todo = [c for c in cells if not c.finished()]
    if len(todo) < total:
        say(f"resuming: {total - len(todo)} of {total} cells finished earlier and are kept")
    for seed in sorted({c.seed for c in todo}):
        data = prepare_data(experiment, out, seed, say)
        # The real manifest this time (load_experiment checked synth's builder): still before any cell runs.
        check_settings(experiment, yaml.safe_load((data / "federation.yaml").read_text()), str(data))
    children = _Children()
    started = time.monotonic()
    durations: list[float] = []
    done = total - len(todo)

    def task(cell: Cell) -> dict[str, Any]:
        say(f"[{cell.index}/{total}] {cell.setting_name} seed {cell.seed}: started")
        began = time.monotonic()
        try:
            return run_cell(cell, experiment, out, children)
        except Exception as err:  # noqa: BLE001 - one broken cell (a full disk, a missing file) must not end the grid
            return {"setting": cell.setting_name, "seed": cell.seed, "command": cell.setting.command,
                    "status": "failed", "reason": f"{type(err).__name__}: {err}",
                    "wall_s": round(time.monotonic() - began, 1)}

    previous = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_interrupt)
    pool = ThreadPoolExecutor(max_workers=max(1, jobs))
    running: dict[Future[dict[str, Any]], Cell] = {}
    queue = list(todo)
    try:
        while queue or running:
            while queue and len(running) < jobs:
                cell = queue.pop(0)
                running[pool.submit(task, cell)] = cell
            finished, _ = wait(running, timeout=1.0, return_when=FIRST_COMPLETED)
            for future in finished:
                cell = running.pop(future)
                cell.result = future.result()
                done += 1
                durations.append(cell.result["wall_s"])
                elapsed = time.monotonic() - started
                left = total - done
                eta = sum(durations) / len(durations) * left / max(1, min(jobs, left)) if left else 0.0
                say(f"[{cell.index}/{total}] {cell.setting_name} seed {cell.seed}: {_summary(cell.result)} "
                    f"({cell.result['wall_s']:.0f}s) | {done}/{total} done, elapsed {_clock(elapsed)}, "
                    f"ETA {_clock(eta)}")
                on_result(cells)
    except KeyboardInterrupt:
        children.stop()  # first: nothing below may keep a cell running (a closed stdout fails `say`)
        pool.shutdown(wait=True, cancel_futures=True)
        say(f"interrupted: stopped {len(running)} running cell(s); they are redone on the next run")
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)
    return cells


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def check_outputs_folder(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise FedcrmError(f"{out}: exists and is not a folder")
