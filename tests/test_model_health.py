"""A model that learned nothing never looks like a success: warnings in the CLI, report.json, report.md and the
Federation's ModelHealthy condition."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from fedcrm.reporting import RoundRecord, build_report, render_markdown
from fedcrm.training.health import RISING_ROUNDS, model_warnings
from fedcrm.training.metrics import evaluation_counts, metrics_from_counts


def test_one_class_predictions_are_named_with_the_class_share() -> None:
    labels = np.array([1, 0, 0, 0, 1, 0, 0, 0, 0, 0])
    all_negative = metrics_from_counts(evaluation_counts(np.full(10, 0.1), labels, 0.0))
    assert (all_negative["predicted_positive_rate"], all_negative["positive_rate"]) == (0.0, 0.2)
    (warning,) = model_warnings(all_negative, [])
    assert warning.startswith("the model predicts 100.0% of validation records negative, where 80.0% are")
    all_positive = metrics_from_counts(evaluation_counts(np.full(10, 0.9), labels, 0.0))
    assert "predicts 100.0% of validation records positive, where 20.0% are" in model_warnings(all_positive, [])[0]
    mixed = metrics_from_counts(evaluation_counts(np.linspace(0.05, 0.95, 10), labels, 0.0))
    assert model_warnings(mixed, []) == []
    one_class_data = metrics_from_counts(evaluation_counts(np.full(4, 0.1), np.zeros(4), 0.0))
    assert model_warnings(one_class_data, []) == []  # nothing to tell apart: not the model's fault
    # Nearly one class (0.5% predicted positive where 39% are): the small-tenant DP failure.
    assert model_warnings({"predicted_positive_rate": 0.005, "positive_rate": 0.39}, [])
    assert model_warnings({"predicted_positive_rate": 0.03, "positive_rate": 0.39}, []) == []


def test_a_loss_rising_at_the_end_is_a_warning_a_dip_is_not() -> None:
    rising = [0.5, 0.4, *[0.41 + 0.01 * i for i in range(RISING_ROUNDS)]]
    (warning,) = model_warnings({}, rising)
    assert f"validation loss rose in each of the last {RISING_ROUNDS} rounds (0.4000 -> 0.4500)" in warning
    assert model_warnings({}, [0.5, 0.4, 0.41, 0.42, 0.39, 0.43, 0.44]) == []
    assert model_warnings({}, [0.4, 0.5, None, 0.6]) == []


def test_reports_carry_the_warnings_in_json_and_markdown() -> None:
    history = [RoundRecord(round=i, loss=0.6 + 0.01 * i, accuracy=0.7, f1=0.0, auc=0.5, precision=None, recall=0.0,
                           participants=3, duration_s=0.1, bytes_up_per_client=1.0, bytes_down_per_client=1.0)
               for i in range(1, RISING_ROUNDS + 3)]
    report = build_report(kind="federated", federation="f/x", status="succeeded", message="trained", rounds_planned=7,
                          history=history, participants=[], metrics={"predicted_positive_rate": 0.0,
                                                                    "positive_rate": 0.3, "accuracy": 0.7},
                          metrics_source="validation", model_digest=None)
    assert len(report["warnings"]) == 2
    assert render_markdown(report).count("**Warning:**") == 2


def test_the_operator_turns_warnings_into_a_condition() -> None:
    from fedcrm_operator.aggregator_status import AggregatorStatus
    from fedcrm_operator.federations import model_condition

    status = AggregatorStatus.from_json({"state": "succeeded", "round": 3, "warnings": ["predicts one class"]})
    assert model_condition(status.warnings)["status"] == "False"
    assert model_condition(status.warnings)["reason"] == "NoSignal"
    assert model_condition(AggregatorStatus.from_json({"state": "training"}).warnings)["status"] == "True"


@pytest.mark.slow
def test_a_collapsed_federation_says_so(small_federation, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A learning rate of 5 drives this federation to predict every lead as not converting (seeded, so always)."""
    doc = yaml.safe_load(small_federation.federation_path.read_text())
    doc["spec"]["training"].update(learningRate=5.0, rounds=8)
    fed = tmp_path / "federation.yaml"
    fed.write_text(yaml.safe_dump(doc))
    proc = subprocess.run([sys.executable, "-m", "fedcrm.cli.main", "run", "--federation", str(fed), "--participant",
                           *map(str, small_federation.participant_paths), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "warning: the model predicts 100.0% of validation records negative" in proc.stdout
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["warnings"] and "**Warning:** the model predicts" in (tmp_path / "out" / "report.md").read_text()
