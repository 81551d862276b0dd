"""`fedcrm experiment`: the file is checked before anything runs, finished cells are kept, Ctrl-C stops cleanly,
and the quick variant writes every output."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fedcrm.errors import FedcrmError
from fedcrm.experiments import configs, deep_merge, grids, load_experiment

ROOT = Path(__file__).resolve().parents[1]
FEDCRM = [sys.executable, "-m", "fedcrm.cli.main"]

TINY = {
    "name": "tiny",
    "data": {"clients": 3, "rows": 400},
    "seeds": 2,
    "rounds": 3,
    "settings": {
        "centralized": {"command": "baseline"},
        "federated": {"command": "run", "audit": True},
        "federated+DP": {"command": "run", "spec": {"privacy": {"differentialPrivacy": {
            "mode": "sample", "epsilon": 1.0, "delta": 1e-5, "clippingNorm": 1.0}}}},
        # Valid as a manifest, refused by the run (client-level noise over 2 participants drowns the updates).
        "refused": {"command": "run", "spec": {"privacy": {"differentialPrivacy": {
            "mode": "client", "epsilon": 1.0, "delta": 1e-5, "clippingNorm": 1.0}}}},
    },
    "quick": {"data": {"clients": 2, "rows": 200, "testRows": 400}, "rounds": 2, "seeds": 1,
              "audit": {"shadows": 1, "shadowEpochs": 2, "maxRecords": 100}},
    "reference": {"source": "A made-up paper.", "values": {"federated": {"accuracy": 0.9}}},
}


def _write(tmp_path: Path, doc: dict, name: str = "exp.yaml") -> Path:  # type: ignore[type-arg]
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.mark.parametrize("name", ["salesforce-10", "fgcif-50"])
def test_the_shipped_configs_validate_full_and_quick(name: str) -> None:
    full = load_experiment(ROOT / "experiments" / f"{name}.yaml")
    quick = load_experiment(ROOT / "experiments" / f"{name}.yaml", quick=True)
    assert not full.is_quick and quick.is_quick
    assert quick.data.clients < full.data.clients and quick.rounds < full.rounds
    assert len(quick.seed_list) < len(full.seed_list)
    assert full.reference is not None and set(full.reference.values) <= set(full.settings)


def test_the_configs_carry_the_issues_sizes() -> None:
    sf = load_experiment(ROOT / "experiments" / "salesforce-10.yaml")
    assert (sf.data.clients, sf.data.rows, sf.rounds, len(sf.seed_list)) == (10, 10_000, 50, 5)
    assert set(sf.settings) == {"centralized", "federated", "federated+DP"}
    fg = load_experiment(ROOT / "experiments" / "fgcif-50.yaml")
    assert (fg.data.clients, fg.rounds, fg.spec["training"]) == (50, 100, {"batchSize": 32, "learningRate": 0.001})
    assert {"centralized", "federated", "federated+GAN", "federated+GAN+DP", "FedProx"} <= set(fg.settings)
    assert fg.settings["federated+GAN"].spec["augmentation"] == {"gan": {"enabled": True}}
    # The GAN trains during the first round: its settings give that round time for 50 GANs on a small machine.
    for name in ("federated+GAN", "federated+GAN+DP"):
        assert fg.settings[name].spec["training"]["roundTimeoutSeconds"] >= 1800


def test_an_unknown_key_is_named_with_a_suggestion(tmp_path: Path) -> None:
    doc = {**TINY, "data": {"clients": 3, "rowz": 400}}
    with pytest.raises(FedcrmError, match=r"data\.rowz: unknown field \(did you mean 'rows'\?\)"):
        load_experiment(_write(tmp_path, doc))


def test_a_bad_override_names_its_setting_before_anything_runs(tmp_path: Path) -> None:
    doc = json.loads(json.dumps(TINY))
    doc["settings"]["prox"] = {"command": "run", "spec": {"training": {"algorithm": "fedprox"}}}
    doc["settings"]["typo"] = {"command": "run", "spec": {"privacy": {"differentialPrivacyy": {"mode": "sample"}}}}
    with pytest.raises(FedcrmError) as err:
        load_experiment(_write(tmp_path, doc))
    message = str(err.value)
    assert "setting 'prox'" in message and "proximalMu" in message
    assert "setting 'typo'" in message and "did you mean 'differentialPrivacy'" in message
    assert "federated" not in message.replace("federation", "")  # the good settings are not blamed


def test_the_command_refuses_a_bad_file_without_creating_anything(tmp_path: Path) -> None:
    doc = json.loads(json.dumps(TINY))
    doc["settings"]["federated"]["spec"] = {"training": {"rounds": 0}}
    out = tmp_path / "out"
    proc = subprocess.run([*FEDCRM, "experiment", "--config", str(_write(tmp_path, doc)), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert "setting 'federated'" in proc.stderr and "spec.training.rounds" in proc.stderr
    assert not out.exists()


def test_reference_values_must_name_settings_and_known_metrics(tmp_path: Path) -> None:
    doc = {**TINY, "reference": {"source": "x", "values": {"federatd": {"accuracy": 0.9}}}}
    with pytest.raises(FedcrmError, match="unknown setting.*federatd"):
        load_experiment(_write(tmp_path, doc))
    doc = {**TINY, "reference": {"source": "x", "values": {"federated": {"acuracy": 0.9}}}}
    with pytest.raises(FedcrmError, match="acuracy"):
        load_experiment(_write(tmp_path, doc))


def test_quick_takes_the_files_sizes_and_never_grows_the_grid(tmp_path: Path) -> None:
    quick = load_experiment(_write(tmp_path, TINY), quick=True)
    assert (quick.data.clients, quick.data.rows, quick.rounds, quick.seed_list) == (2, 200, 2, [0])
    assert (quick.audit.shadows, quick.audit.shadow_epochs) == (1, 2)
    defaults = load_experiment(_write(tmp_path, {k: v for k, v in TINY.items() if k != "quick"}), quick=True)
    assert (defaults.data.clients, defaults.data.rows, defaults.rounds, defaults.seed_list) == (3, 400, 3, [0, 1])


def test_a_minimal_file_takes_the_defaults(tmp_path: Path) -> None:
    experiment = load_experiment(_write(tmp_path, {"name": "min", "settings": {"f": {"command": "run"}}}))
    assert (experiment.seed_list, experiment.rounds, experiment.data.clients) == ([0, 1, 2], 20, 10)


def test_deep_merge_merges_mappings_replaces_the_rest_and_null_removes() -> None:
    base = {"a": {"b": 1, "c": [1, 2]}, "d": 1}
    assert deep_merge(base, {"a": {"c": [3], "e": 2}, "d": None}) == {"a": {"b": 1, "c": [3], "e": 2}}
    assert base == {"a": {"b": 1, "c": [1, 2]}, "d": 1}


def _finish(cell: grids.Cell, status: str = "succeeded") -> None:
    (cell.folder / "run").mkdir(parents=True)
    (cell.folder / "run" / "report.json").write_text("{}")
    (cell.folder / "cell.json").write_text(json.dumps({"status": status, "inputs_digest": cell.key}))


def test_a_finished_cell_is_kept_and_anything_else_is_redone(tmp_path: Path) -> None:
    experiment = load_experiment(_write(tmp_path, TINY), quick=True)
    out = tmp_path / "out"
    ok, failed, interrupted, untouched = grids.plan_cells(experiment, out)
    _finish(ok)
    _finish(failed, status="failed")
    (interrupted.folder / "run").mkdir(parents=True)  # a report but no cell.json: stopped mid-way
    (interrupted.folder / "run" / "report.json").write_text("{}")
    assert [c.finished() for c in grids.plan_cells(experiment, out)] == [True, False, False, False]
    assert not untouched.folder.exists()
    # The same folder with other inputs (more rounds) is stale, not finished.
    longer = experiment.model_copy(update={"rounds": 5})
    assert [c.finished() for c in grids.plan_cells(longer, out)] == [False, False, False, False]


def _sessions(leader: int) -> list[int]:
    """Processes whose session is ``leader``'s (each cell command starts a session of its own)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[3]) == leader and fields[0] != "Z":  # after the name: state ppid pgrp session ...
                found.append(int(entry.name))
    return found


def _outlived(leader: int, grace: float = 15.0) -> list[int]:
    """The session's processes still alive after ``grace`` seconds (a SIGKILLed process takes a moment to go)."""
    deadline = time.monotonic() + grace
    while (left := _sessions(leader)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


@pytest.mark.slow
def test_quick_grid_is_interruptible_resumable_and_writes_every_output(tmp_path: Path) -> None:
    config, out = _write(tmp_path, TINY), tmp_path / "out"
    argv = [*FEDCRM, "experiment", "--config", str(config), "--out", str(out), "--quick", "--jobs", "1"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    federated = out / "cells" / "federated" / "seed-0"
    try:
        lines = []
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "[2/4] federated seed 0: started" in line:
                break
        deadline = time.monotonic() + 60
        log = federated / "log.txt"
        while not (log.is_file() and "process group" in log.read_text()) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(2)  # into the run: its aggregator and participants are up
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:  # the test failed above: stop the grid as a user would, then for good
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    assert proc.returncode == 130, "".join(lines) + err
    assert "run the same command again to resume" in err
    group = int((federated / "log.txt").read_text().split("process group ")[1].split()[0])
    assert _outlived(group) == [], "a cell's processes outlived Ctrl-C"
    central = out / "cells" / "centralized" / "seed-0"
    assert json.loads((central / "cell.json").read_text())["status"] == "succeeded"
    assert not (federated / "cell.json").exists()
    kept = (central / "run" / "report.json").stat().st_mtime_ns

    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]  # the refused cell
    assert "resuming: 1 of 4 cells finished earlier and are kept" in done.stdout
    assert "centralized seed 0: started" not in done.stdout
    assert (central / "run" / "report.json").stat().st_mtime_ns == kept
    for name in ("results.csv", "results.md", "accuracy_per_round.png", "privacy_accuracy.png", "bytes_per_round.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["setting"], r["status"]) for r in rows] == [
        ("centralized", "succeeded"), ("federated", "succeeded"), ("federated+DP", "succeeded"), ("refused", "failed")]
    assert "refused before training" in rows[3]["reason"], rows[3]
    assert rows[1]["attack_auc"] and not rows[0]["attack_auc"] and rows[2]["epsilon_spent"]
    assert float(rows[1]["bytes_up_per_client_per_round"]) > 0 and not rows[0]["bytes_up_per_client_per_round"]
    md = (out / "results.md").read_text()
    assert "# Experiment tiny (quick variant)" in md and "| federated | accuracy |" in md
    assert "| refused | 0/1 | failed: run: " in md and "- refused, seed 0: run: " in md

    # Again: the finished cells are kept, the failed one is tried again.
    again = subprocess.run(argv, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert again.returncode == 1
    assert [ln.split("] ", 2)[-1] for ln in again.stdout.splitlines() if "started" in ln] == ["refused seed 0: started"]


def test_a_failed_cell_is_in_the_table_with_its_reason(tmp_path: Path) -> None:
    from fedcrm.experiments import tables

    experiment = load_experiment(_write(tmp_path, TINY), quick=True)
    results = [{"setting": "centralized", "seed": 0, "status": "succeeded", "accuracy": 0.8},
               {"setting": "federated", "seed": 0, "status": "failed", "reason": "run: too few participants"}]
    md = tables.render_markdown(experiment, results, planned=3)
    assert "| federated | 0/1 | failed: run: too few participants |" in md
    assert "- federated, seed 0: run: too few participants" in md
    assert "failed,run: too few participants" in tables.render_csv(results)


def test_default_jobs_leave_a_core_per_participant() -> None:
    assert grids.default_jobs(clients=10_000) == 1
    assert grids.default_jobs(clients=1) >= 1
    assert configs.slug("federated+GAN+DP") == "federated-gan-dp"
    assert os.cpu_count()


def test_the_command_explains_itself() -> None:
    proc = subprocess.run([*FEDCRM, "experiment", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for words in ("--config", "--quick", "--jobs", "results.csv", "privacy_accuracy.png", "resuming", "exit codes"):
        assert words in proc.stdout, words
    top = subprocess.run([*FEDCRM, "--help"], capture_output=True, text=True, timeout=60)
    assert "experiment" in top.stdout
