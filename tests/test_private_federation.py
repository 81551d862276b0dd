"""Whole federations with differential privacy: spend reported per round, budget enforced, audit written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedcrm.data.synthetic import SynthResult
from fedcrm.privacy.accounting import calibrate_noise_multiplier

pytestmark = pytest.mark.slow

FEDCRM = [sys.executable, "-m", "fedcrm.cli.main"]


def _federation(small: SynthResult, tmp_path: Path, dp: dict[str, Any], *, secure: bool) -> Path:
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
