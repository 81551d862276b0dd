"""A real Prometheus server (Debian's package) scrapes a running aggregator's round metrics."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from operator_harness import free_port
from prometheus_server import prometheus

from fedcrm.data.synthetic import generate_federation

pytestmark = pytest.mark.slow


def test_prometheus_scrapes_rounds_participants_and_accuracy_from_a_running_federation(tmp_path: Path) -> None:
    # Long enough (a few seconds of rounds) for a 250 ms scrape interval to see several rounds.
    synth = generate_federation(tmp_path / "fed", clients=3, rows=8000, seed=3, rounds=15)
    metrics_port = free_port()
    with prometheus(tmp_path, {"fedcrm-aggregator": metrics_port}) as prom:
        run = subprocess.run(
            [sys.executable, "-m", "fedcrm.cli.main", "run", "--federation", str(synth.federation_path),
             "--participant", *map(str, synth.participant_paths), "--out", str(tmp_path / "run"),
             "--metrics-port", str(metrics_port)],
            capture_output=True, text=True, timeout=600,
        )
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        rounds = prom.query("max_over_time(fedcrm_round[10m])")
        assert rounds and float(rounds[0]["value"][1]) >= 1, "no round was scraped"
        assert rounds[0]["metric"]["federation"] == "fedcrm-system/lead-conversion"
        planned = prom.query("max_over_time(fedcrm_rounds_planned[10m])")
        assert float(planned[0]["value"][1]) == 15
        accuracy = prom.query('max_over_time(fedcrm_validation_metric{metric="accuracy"}[10m])')
        assert accuracy and 0.5 < float(accuracy[0]["value"][1]) <= 1.0
        active = prom.query("max_over_time(fedcrm_participants_active[10m])")
        assert float(active[0]["value"][1]) == 3
        training = prom.query('max_over_time(fedcrm_federation_state{state="training"}[10m])')
        assert float(training[0]["value"][1]) == 1
