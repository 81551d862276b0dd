"""A real Prometheus server (Debian's package) scrapes a running aggregator's round metrics."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from controlplane import die_with_parent
from operator_harness import free_port, wait_for

from fedcrm.data.synthetic import generate_federation

pytestmark = pytest.mark.slow


def _query(port: int, promql: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_prometheus_scrapes_rounds_participants_and_accuracy_from_a_running_federation(tmp_path: Path) -> None:
    prometheus = shutil.which("prometheus") or "/usr/bin/prometheus"
    assert Path(prometheus).exists(), "Prometheus is missing: tools/install-system-packages installs it (make test does)"
    # Long enough (a few seconds of rounds) for a 250 ms scrape interval to see several rounds.
    synth = generate_federation(tmp_path / "fed", clients=3, rows=8000, seed=3, rounds=15)
    metrics_port, prom_port = free_port(), free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 250ms, scrape_timeout: 200ms}\n"
        "scrape_configs:\n"
        f"  - job_name: fedcrm-aggregator\n    static_configs: [{{targets: ['127.0.0.1:{metrics_port}']}}]\n"
    )
    server = subprocess.Popen(
        [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=open(tmp_path / "prometheus.log", "wb"), stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
    )
    try:
        def ready() -> bool:
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{prom_port}/-/ready", timeout=1).status == 200
            except OSError:
                assert server.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
                return False

        wait_for("Prometheus ready", ready)
        run = subprocess.run(
            [sys.executable, "-m", "fedcrm.cli.main", "run", "--federation", str(synth.federation_path),
             "--participant", *map(str, synth.participant_paths), "--out", str(tmp_path / "run"),
             "--metrics-port", str(metrics_port)],
            capture_output=True, text=True, timeout=600,
        )
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        rounds = _query(prom_port, "max_over_time(fedcrm_round[10m])")
        assert rounds and float(rounds[0]["value"][1]) >= 1, "no round was scraped"
        assert rounds[0]["metric"]["federation"] == "fedcrm-system/lead-conversion"
        planned = _query(prom_port, "max_over_time(fedcrm_rounds_planned[10m])")
        assert float(planned[0]["value"][1]) == 15
        accuracy = _query(prom_port, 'max_over_time(fedcrm_validation_metric{metric="accuracy"}[10m])')
        assert accuracy and 0.5 < float(accuracy[0]["value"][1]) <= 1.0
        active = _query(prom_port, "max_over_time(fedcrm_participants_active[10m])")
        assert float(active[0]["value"][1]) == 3
        training = _query(prom_port, 'max_over_time(fedcrm_federation_state{state="training"}[10m])')
        assert float(training[0]["value"][1]) == 1
    finally:
        server.terminate()
        server.wait(timeout=30)
