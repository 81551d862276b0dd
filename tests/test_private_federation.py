"""Whole federations with differential privacy: spend reported per round, budget enforced, audit written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedcrm.data.synthetic import SynthResult
from fedcrm.privacy.accounting import calibrate_noise_multiplier, epsilon_for

pytestmark = pytest.mark.slow

FEDCRM = [sys.executable, "-m", "fedcrm.cli.main"]


def _federation(small: SynthResult, tmp_path: Path, dp: dict[str, Any], *, secure: bool) -> Path:
    if dp.get("mode") == "client":  # three participants cannot carry client-level noise: these test the mechanics
        dp = {"acceptNoisyPlan": True, **dp}
    doc = yaml.safe_load(small.federation_path.read_text())
    doc["spec"]["privacy"] = {"differentialPrivacy": dp, "secureAggregation": {"enabled": secure}}
    path = tmp_path / "federation.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _run(fed: Path, small: SynthResult, out: Path) -> subprocess.CompletedProcess[str]:
    args = [*FEDCRM, "run", "--federation", str(fed), "--participant", *map(str, small.participant_paths),
            "--test-data", str(small.test_path), "--out", str(out)]
    return subprocess.run(args, capture_output=True, text=True, timeout=600)


def test_client_level_dp_with_secure_aggregation_reports_spend_and_is_audited(small_federation: SynthResult,
                                                                              tmp_path: Path) -> None:
    fed = _federation(small_federation, tmp_path, {"mode": "client", "epsilon": 2.0, "delta": 1e-5,
                                                   "clippingNorm": 0.5}, secure=True)
    out = tmp_path / "out"
    proc = _run(fed, small_federation, out)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    report = json.loads((out / "report.json").read_text())
    p = report["privacy"]
    assert (p["mode"], p["delta"], p["clipping_norm"]) == ("client", 1e-5, 0.5)
    assert 1.9 < p["epsilon_spent"] <= 2.0 and p["noise_multiplier"] > 1
    spent = [h["epsilon_spent"] for h in report["history"]]
    assert spent == sorted(spent) and spent[-1] == p["epsilon_spent"]
    assert "epsilon" in proc.stdout  # the live column
    state = json.loads((out / "checkpoint" / "privacy.json").read_text())
    assert len(state["accountants"]["*"]["releases"]) == 3

    audit = subprocess.run(
        [*FEDCRM, "audit", "--federation", str(fed), "--participant", *map(str, small_federation.participant_paths),
         "--run", str(out), "--test-data", str(small_federation.test_path), "--shadows", "2"],
        capture_output=True, text=True, timeout=300)
    assert audit.returncode == 0, audit.stderr
    result = json.loads((out / "audit.json").read_text())
    for attack in ("loss_threshold", "shadow"):
        assert set(result[attack]) == {"auc", "advantage", "tpr_at_1pct_fpr"}
        assert 0 <= result[attack]["auc"] <= 1
    assert json.loads((out / "report.json").read_text())["privacy_audit"] == result
    assert (out / "audit_roc.png").read_bytes()[:4] == b"\x89PNG"


def test_client_level_dp_samples_participants_by_secret_coin_and_accounts_the_amplification(
        small_federation: SynthResult, tmp_path: Path) -> None:
    """samplingRate in client mode: each participant decides each round by its own coin (its log says which way it
    fell; the aggregator is never told), still trains and sends a masked vector, and the accountant is the sampled
    Gaussian at that rate: the noise multiplier for the same budget is far smaller than without sampling."""
    dp = {"mode": "client", "epsilon": 2.0, "delta": 1e-5, "samplingRate": 0.5}
    fed = _federation(small_federation, tmp_path, dp, secure=True)
    out = tmp_path / "out"
    proc = _run(fed, small_federation, out)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "probability 0.5 (its own secret coin" in proc.stdout  # the plan, before training
    p = json.loads((out / "report.json").read_text())["privacy"]
    assert p["sample_rate"] == 0.5 and 1.9 < p["epsilon_spent"] <= 2.0
    assert p["epsilon_spent"] == pytest.approx(epsilon_for(q=0.5, noise_multiplier=p["noise_multiplier"], steps=3,
                                                           delta=1e-5), rel=1e-9)
    unsampled = calibrate_noise_multiplier(epsilon=2.0, delta=1e-5, q=1.0, steps=3)
    assert p["noise_multiplier"] < 0.75 * unsampled
    history = json.loads((out / "report.json").read_text())["history"]
    assert all(0 <= h["loss"] <= 120 for h in history)  # a wild noisy model's loss is capped, never wraps negative
    assert "sampled" not in (out / "logs" / "aggregator.log").read_text()
    for log_path in (out / "logs").glob("tenant-*.log"):
        decisions = [line for line in log_path.read_text().splitlines() if "participant sampling rate 0.5" in line]
        assert len(decisions) == 3, log_path.read_text()[-2000:]  # one coin per round, every round


def test_a_plan_whose_noise_drowns_the_updates_is_refused_before_training(small_federation: SynthResult,
                                                                          tmp_path: Path) -> None:
    """Client-level DP over three participants: the noise is tens of times what their averaged updates can carry,
    so the run is refused before its first round, saying why and what to change, not trained into a useless
    model that looks like a result."""
    fed = _federation(small_federation, tmp_path, {"mode": "client", "epsilon": 1.0, "delta": 1e-5,
                                                   "acceptNoisyPlan": False}, secure=True)
    out = tmp_path / "out"
    proc = _run(fed, small_federation, out)
    assert proc.returncode != 0
    said = " ".join((proc.stdout + proc.stderr).split())  # unwrapped
    assert "refused before training" in said and "larger than the averaged updates can be" in said, said[-3000:]
    assert "add participants" in said and "acceptNoisyPlan: true" in said
    assert "Traceback" not in said
    report = json.loads((out / "report.json").read_text())
    assert report["rounds_completed"] == 0 and report["history"] == []


def test_dp_sgd_without_secure_aggregation_accounts_each_participant(small_federation: SynthResult,
                                                                      tmp_path: Path) -> None:
    fed = _federation(small_federation, tmp_path, {"mode": "sample", "epsilon": 4.0, "delta": 1e-4}, secure=False)
    out = tmp_path / "out"
    proc = _run(fed, small_federation, out)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    p = json.loads((out / "report.json").read_text())["privacy"]
    assert p["mode"] == "sample" and p["epsilon_spent"] <= 4.0
    assert len(p["participants"]) == 3
    for who in p["participants"].values():
        assert who["epsilon_spent"] == pytest.approx(4.0, rel=0.01)
    logs = "".join(f.read_text() for f in (out / "logs").glob("*.log"))
    assert "Opacus RDP accountant" in logs


def test_training_stops_before_the_round_that_would_overspend(small_federation: SynthResult, tmp_path: Path) -> None:
    sigma = calibrate_noise_multiplier(epsilon=1.0, delta=1e-5, q=1.0, steps=2)  # funds 2 of the 3 rounds
    fed = _federation(small_federation, tmp_path, {"mode": "client", "epsilon": 1.0, "delta": 1e-5,
                                                   "noiseMultiplier": sigma}, secure=False)
    out = tmp_path / "out"
    proc = _run(fed, small_federation, out)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["rounds_completed"] == 2 and report["partial"] is True
    assert "stopped before round 3 to stay within the privacy budget" in report["message"]
    assert report["privacy"]["epsilon_spent"] <= 1.0
    assert "stopped before round 3" in proc.stdout


def _run_killing_the_aggregator(small: SynthResult, tmp_path: Path, training: dict[str, Any],
                                privacy: dict[str, Any], when: Callable[[Path], bool]) -> tuple[Path, dict[str, Any]]:
    """``fedcrm run`` whose aggregator is SIGKILLed once ``when(out)`` holds (fedcrm run restarts it); the report."""
    doc = yaml.safe_load(small.federation_path.read_text())
    doc["spec"]["training"].update(training)
    doc["spec"]["privacy"] = privacy
    fed = tmp_path / "federation.yaml"
    fed.write_text(yaml.safe_dump(doc))
    out = tmp_path / "out"
    args = [*FEDCRM, "run", "--federation", str(fed), "--participant", *map(str, small.participant_paths),
            "--out", str(out)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, killed = time.monotonic() + 300, False
    while not killed and time.monotonic() < deadline:
        time.sleep(0.02)
        if when(out):
            os.kill(json.loads((out / "processes.json").read_text())["aggregator"], signal.SIGKILL)
            killed = True
        assert proc.poll() is None, "the run ended before the aggregator could be killed"
    assert killed, "the moment to kill the aggregator never came"
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr + stdout
    report = json.loads((out / "report.json").read_text())
    assert report["aggregator_restarts"] == 1
    return out, report


def test_a_restarted_aggregator_continues_the_spend(small_federation: SynthResult, tmp_path: Path) -> None:
    def after_round_3(out: Path) -> bool:
        events = out / "events.jsonl"
        return events.exists() and events.read_text().count('"event": "round"') >= 3

    out, report = _run_killing_the_aggregator(
        small_federation, tmp_path, {"rounds": 12, "localEpochs": 4, "minParticipants": 3, "roundTimeoutSeconds": 60},
        {"differentialPrivacy": {"mode": "client", "epsilon": 1.0, "delta": 1e-5, "acceptNoisyPlan": True},
         "secureAggregation": {"enabled": False}},
        after_round_3)
    releases = json.loads((out / "checkpoint" / "privacy.json").read_text())["accountants"]["*"]["releases"]
    assert len(set(releases)) == len(releases)
    assert any(r.endswith("@1") for r in releases) and any(r.endswith("@2") for r in releases)
    done = report["rounds_completed"]
    assert [h["round"] for h in report["history"]] == list(range(1, done + 1))
    spent = [h["epsilon_spent"] for h in report["history"]]
    assert spent == sorted(spent)
    # The budget funds exactly 12 releases. A round whose noised sum was released just before the crash is
    # re-run and counted again, so the run then stops before its last round instead of overspending.
    if len(releases) == done:
        assert done == 12
    else:
        assert (len(releases), done) == (12, 11) and "stopped before round 12" in report["message"]
    sigma = report["privacy"]["noise_multiplier"]
    assert report["privacy"]["epsilon_spent"] == pytest.approx(
        epsilon_for(q=1.0, noise_multiplier=sigma, steps=len(releases), delta=1e-5)) and spent[-1] <= 1.0


def test_a_release_shown_mid_round_stops_the_round_before_any_update_is_used(small_federation: SynthResult,
                                                                             tmp_path: Path) -> None:
    """The race the restart test can hit: two participants had sent an update to an aggregator that crashed, the
    third had not. In the last funded round the two report that their own ledgers are full (counting that update),
    while the third, whose ledger has room, sends its noised update. Counting that one too would spend past the
    budget; it must be refused without being used and the run stop at the budget."""
    from inprocess_aggregator import aggregators, finish, identities, start_nodes

    from fedcrm.protocol import pb
    from fedcrm.spec.loading import load_federation

    fed = _federation(small_federation, tmp_path, {"mode": "client", "epsilon": 1.0, "delta": 1e-5}, secure=False)
    federation = load_federation(fed)
    people = identities(small_federation)
    acks: list[Any] = []
    with aggregators(tmp_path) as start:
        coordinator, port, ca = start(federation, federation, people)
        submit = coordinator.submit

        def full_ledger_first(kind: int, identity: str, message: Any) -> Any:
            if kind == pb.Task.FIT and message.round == 3:
                if not acks:  # before the first update of round 3 is read, the others' counts come in
                    for other in people:
                        if other != identity:
                            coordinator.report_budget_spent(other, "own ledger full", releases=3)
                acks.append(submit(kind, identity, message))
                return acks[-1]
            return submit(kind, identity, message)

        coordinator.submit = full_ledger_first
        finish(start_nodes(small_federation, fed, port, ca, tmp_path))

    assert acks and not acks[0].accepted and "privacy budget has no release left" in acks[0].message
    assert [r.round for r in coordinator.history] == [1, 2]
    assert coordinator.privacy.accountants["*"].releases == ["1@1", "2@1", "unseen-3@1"]
    assert coordinator.privacy.spent() <= 1.0
    events = (tmp_path / "aggregator" / "events.jsonl").read_text()
    assert '"event": "privacy_budget_exhausted"' in events and "stopped before round 3" in events


def test_a_crash_before_the_first_checkpoint_is_counted_like_the_participants_count_it(
        small_federation: SynthResult, tmp_path: Path) -> None:
    """DP-SGD, the aggregator killed during round 1 (before any checkpoint exists) and restarted.

    Every participant trained round 1 twice. Once, round keys repeated after such a crash (the incarnation
    lived only in the checkpoint), so the report claimed less than the participants' own Opacus accountants
    had spent. Now the aggregator's spend and each participant's own accountant agree, and neither exceeds
    the budget.
    """
    def round_1_trained(out: Path) -> bool:
        logs = "".join(p.read_text(errors="replace") for p in (out / "logs").glob("tenant-*.log")) \
            if (out / "logs").is_dir() else ""
        if "round 1: trained on" not in logs:
            return False
        assert not (out / "checkpoint" / "state.json").exists(), "too late: round 1 was already checkpointed"
        return True

    out, report = _run_killing_the_aggregator(
        small_federation, tmp_path, {"rounds": 3, "minParticipants": 3, "roundTimeoutSeconds": 60},
        {"differentialPrivacy": {"mode": "sample", "epsilon": 1.0, "delta": 1e-5},
         "secureAggregation": {"enabled": True, "threshold": 0.6}},
        round_1_trained)
    ledger = json.loads((out / "checkpoint" / "privacy.json").read_text())["accountants"]
    for identity, accountant in ledger.items():
        assert len(set(accountant["releases"])) == len(accountant["releases"]), identity
        assert any(r.startswith("1@1") for r in accountant["releases"]), f"{identity}: the crashed round 1 is not counted"
    own = {}
    for log in (out / "logs").glob("tenant-*.log"):
        spends = [float(line.split("epsilon ")[1].split()[0]) for line in log.read_text().splitlines()
                  if "Opacus RDP accountant" in line]
        own[log.stem] = spends[-1]
    assert own and report["privacy"]["epsilon_spent"] >= max(own.values()) * 0.99, (report["privacy"], own)
    assert report["privacy"]["epsilon_spent"] <= 1.0 + 1e-9 and max(own.values()) <= 1.0 * 1.01


def test_an_aggregator_without_its_privacy_ledger_refuses_to_resume(small_federation: SynthResult, tmp_path: Path) -> None:
    """The checkpoint volume lost privacy.json (say, a claim restored without it): resuming would restart the spend
    at zero, so the aggregator refuses and says why, as the Federation's status would show it."""
    fed = _federation(small_federation, tmp_path, {"mode": "client", "epsilon": 4.0, "delta": 1e-5}, secure=False)
    out = tmp_path / "out"
    assert _run(fed, small_federation, out).returncode == 0
    (out / "checkpoint" / "privacy.json").unlink()
    proc = subprocess.run([sys.executable, "-m", "fedcrm_aggregator", "--config", str(out / "aggregator.json")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "failed"
    assert "the privacy ledger checkpoint/privacy.json is missing" in report["message"]
    assert not (out / "checkpoint" / "privacy.json").exists()  # nothing pretended to start from zero


def test_an_aggregator_killed_twice_while_unmasking_one_round_counts_what_participants_count(
        small_federation: SynthResult, tmp_path: Path) -> None:
    """Client-level DP under secure aggregation; the aggregator dies twice in round 2 right after collecting the
    unmasking shares (the instant the noised sum can be seen), at a crash point, not by a lucky SIGKILL.

    Each death re-runs round 2, and each re-run is a release: the participants sent their unmasking shares each
    time. The aggregator's ledger must count exactly what every participant counted itself, and stop at the
    budget instead of overspending it."""
    doc = yaml.safe_load(small_federation.federation_path.read_text())
    doc["spec"]["training"].update(rounds=3, minParticipants=3, roundTimeoutSeconds=60)
    doc["spec"]["privacy"] = {"differentialPrivacy": {"mode": "client", "epsilon": 2.0, "delta": 1e-5,
                                                      "acceptNoisyPlan": True},
                              "secureAggregation": {"enabled": True, "threshold": 0.6}}
    fed = tmp_path / "federation.yaml"
    fed.write_text(yaml.safe_dump(doc))
    out = tmp_path / "out"
    proc = subprocess.run([*FEDCRM, "run", "--federation", str(fed), "--participant",
                           *map(str, small_federation.participant_paths), "--out", str(out)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "FEDCRM_AGGREGATOR_CRASH_AT": "unmasked:2*2"})
    assert proc.returncode == 0, proc.stderr + proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["aggregator_restarts"] == 2
    releases = json.loads((out / "checkpoint" / "privacy.json").read_text())["accountants"]["*"]["releases"]
    assert len(set(releases)) == len(releases)
    assert sorted(r for r in releases if r.startswith("2@")) == ["2@1", "2@2"]  # both killed re-runs counted
    own = {}
    for log in (out / "logs").glob("tenant-*.log"):
        counts = [int(line.split("privacy release ")[1].split()[0]) for line in log.read_text().splitlines()
                  if "privacy release " in line]
        own[log.stem] = max(counts)
    assert own and set(own.values()) == {len(releases)}, (own, releases)  # the same count on both sides
    # Three releases were planned; round 1 and two killed tries of round 2 spent them: the third try is refused.
    assert len(releases) == 3 and report["rounds_completed"] == 1
    assert "stopped before round 2 to stay within the privacy budget" in report["message"]
    assert report["privacy"]["epsilon_spent"] <= 2.0 + 1e-9
