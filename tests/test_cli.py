"""The ``fedcrm`` command as a user meets it: help that explains, errors that say what to fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedcrm.cli.launcher import RUN_OUTPUTS
from fedcrm.data.synthetic import SynthResult

FEDCRM = [sys.executable, "-m", "fedcrm.cli.main"]


def _fedcrm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FEDCRM, *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    ("command", "words"),
    [
        ([], ["run", "baseline", "synth", "demo", "data", "audit"]),
        (["data", "check"], ["--federation", "--participant", "--json", "--rows", "instanceUrl + accessToken", "exit codes"]),
        (["audit"], ["--run", "--test-data", "shadow", "audit.json", "privacy_audit"]),
        (["run"], ["--federation", "--participant", "--test-data", "mutual TLS", "exit codes"]),
        (["baseline"], ["Pool every participant", "--participant"]),
        (["synth"], ["--clients", "--alpha", "Dirichlet"]),
        (["demo"], ["--out", "10 enterprises"]),
    ],
)
def test_every_command_explains_itself(command: list[str], words: list[str]) -> None:
    proc = _fedcrm(*command, "--help")
    assert proc.returncode == 0
    for w in words:
        assert w in proc.stdout


def test_run_help_names_everything_a_run_writes(tmp_path: Path) -> None:
    """Every top-level entry of a real run's output folder, personalization included, is in `fedcrm run --help`."""
    synth = tmp_path / "synth"
    assert _fedcrm("synth", "--clients", "2", "--rows", "120", "--rounds", "1", "--out", synth).returncode == 0
    fed = synth / "federation.yaml"
    _edit(fed, lambda d: d["spec"]["training"].update(personalizationEpochs=1))
    out = tmp_path / "out"
    proc = _fedcrm("run", "--federation", fed, "--participant", *sorted((synth / "participants").glob("*.yaml")),
                   "--out", out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    help_text = _fedcrm("run", "--help").stdout
    written = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir())
    assert "participants/" in written and "checkpoint/" in written
    assert [name for name in written if name not in help_text] == []
    # What a run writes and removes again (credentials/) or writes only sometimes (audit.json) is listed too.
    assert [name for name in RUN_OUTPUTS if name not in help_text] == []
    assert "secagg-members.json" in help_text and (out / "checkpoint" / "secagg-members.json").exists()


def _copy(small: SynthResult, tmp_path: Path) -> tuple[Path, list[Path]]:
    """A private copy of the synthetic federation's manifests (data paths made absolute)."""
    fed = tmp_path / "federation.yaml"
    fed.write_text(small.federation_path.read_text())
    parts = []
    for p in small.participant_paths:
        doc = yaml.safe_load(p.read_text())
        doc["spec"]["data"]["file"]["path"] = str((p.parent / doc["spec"]["data"]["file"]["path"]).resolve())
        out = tmp_path / p.name
        out.write_text(yaml.safe_dump(doc))
        parts.append(out)
    return fed, parts


def _edit(path: Path, change) -> None:  # type: ignore[no-untyped-def]
    doc = yaml.safe_load(path.read_text())
    change(doc)
    path.write_text(yaml.safe_dump(doc))


def _assert_clean_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: ")
    assert "Traceback" not in proc.stderr
    for f in fragments:
        assert f in proc.stderr, proc.stderr


def test_a_misspelled_column_is_named_with_a_suggestion(small_federation: SynthResult, tmp_path: Path) -> None:
    fed, parts = _copy(small_federation, tmp_path)
    doc = yaml.safe_load(parts[0].read_text())
    column = doc["spec"]["data"]["mapping"]["converted"]
    _edit(parts[0], lambda d: d["spec"]["data"]["mapping"].update(converted=column + "x"))
    who = f"{doc['metadata']['namespace']}/{doc['metadata']['name']}"
    proc = _fedcrm("run", "--federation", fed, "--participant", *parts, "--out", tmp_path / "out")
    _assert_clean_error(proc, f"participant {who}", f"column '{column}x' (mapped to 'converted') is not in the file; did you mean '{column}'?")
    _assert_nothing_trained(tmp_path / "out")


def _assert_nothing_trained(out: Path) -> None:
    """The run stopped at the participants' data check: no statistics, no round, no report."""
    assert not (out / "report.json").exists()
    events = (out / "events.jsonl").read_text() if (out / "events.jsonl").exists() else ""
    assert '"statistics"' not in events and '"round"' not in events, events


def test_every_participants_data_problem_is_reported_at_once(small_federation: SynthResult, tmp_path: Path) -> None:
    """Each participant checks its own data in its own process; the launcher gathers every verdict first."""
    fed, parts = _copy(small_federation, tmp_path)
    who = []
    for part in parts[:2]:
        doc = yaml.safe_load(part.read_text())
        who.append(f"participant {doc['metadata']['namespace']}/{doc['metadata']['name']}")
        _edit(part, lambda d: d["spec"]["data"].update(values={}))
    proc = _fedcrm("run", "--federation", fed, "--participant", *parts, "--out", tmp_path / "out")
    _assert_clean_error(proc, *who, "has values with no mapping")
    _assert_nothing_trained(tmp_path / "out")


def test_a_bad_held_out_file_stops_the_run_before_training(small_federation: SynthResult, tmp_path: Path) -> None:
    fed, parts = _copy(small_federation, tmp_path)
    test = tmp_path / "test.csv"
    test.write_text("lead_source,converted\nweb,1\n")
    proc = _fedcrm("run", "--federation", fed, "--participant", *parts, "--test-data", test, "--out", tmp_path / "out")
    _assert_clean_error(proc, "test data")
    _assert_nothing_trained(tmp_path / "out")
    proc = _fedcrm("run", "--federation", fed, "--participant", *parts, "--test-data", tmp_path / "gone.csv",
                   "--out", tmp_path / "out")
    _assert_clean_error(proc, f"test data: {tmp_path / 'gone.csv'} does not exist; --test-data must name")


def test_an_unmapped_value_says_where_to_map_it(small_federation: SynthResult, tmp_path: Path) -> None:
    fed, parts = _copy(small_federation, tmp_path)
    for part in parts:
        _edit(part, lambda d: d["spec"]["data"].update(values={}))
    proc = _fedcrm("baseline", "--federation", fed, "--participant", *parts, "--out", tmp_path / "out")
    _assert_clean_error(proc, "has values with no mapping", "spec.data.values.")


def test_a_participant_naming_another_federation_is_refused(small_federation: SynthResult, tmp_path: Path) -> None:
    fed, parts = _copy(small_federation, tmp_path)
    _edit(parts[2], lambda d: d["spec"]["federationRef"].update(name="churn"))
    proc = _fedcrm("run", "--federation", fed, "--participant", *parts, "--out", tmp_path / "out")
    _assert_clean_error(proc, "names federation fedcrm-system/churn", "fix spec.federationRef")


def test_an_unreadable_data_file_and_a_missing_manifest(small_federation: SynthResult, tmp_path: Path) -> None:
    fed, parts = _copy(small_federation, tmp_path)
    _edit(parts[0], lambda d: d["spec"]["data"]["file"].update(path=str(tmp_path / "gone.csv")))
    proc = _fedcrm("run", "--federation", fed, "--participant", *parts, "--out", tmp_path / "out")
    _assert_clean_error(proc, "gone.csv does not exist; check spec.data.file.path")
    proc = _fedcrm("run", "--federation", tmp_path / "nope.yaml", "--participant", *parts, "--out", tmp_path / "out")
    _assert_clean_error(proc, "nope.yaml: no such file")


def test_a_tenant_takes_part_once(small_federation: SynthResult, tmp_path: Path) -> None:
    fed, parts = _copy(small_federation, tmp_path)
    doc = yaml.safe_load(parts[0].read_text())
    doc["metadata"]["name"] = "second-account"
    twin = tmp_path / "twin.yaml"
    twin.write_text(yaml.safe_dump(doc))
    proc = _fedcrm("run", "--federation", fed, "--participant", *parts, twin, "--out", tmp_path / "out")
    _assert_clean_error(proc, f"is in namespace {doc['metadata']['namespace']!r} like", "a tenant takes part once")


def test_too_few_participants_for_min_participants(small_federation: SynthResult, tmp_path: Path) -> None:
    fed, parts = _copy(small_federation, tmp_path)
    proc = _fedcrm("run", "--federation", fed, "--participant", parts[0], "--out", tmp_path / "out")
    _assert_clean_error(proc, "1 participant(s) given but spec.training.minParticipants is 2")


def test_synth_rejects_impossible_arguments(tmp_path: Path) -> None:
    proc = _fedcrm("synth", "--clients", "0", "--out", tmp_path)
    _assert_clean_error(proc, "clients")
