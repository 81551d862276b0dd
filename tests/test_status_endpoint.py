"""The aggregator's /healthz, /status and /metrics, and the operator's reading of /status."""

from __future__ import annotations

import urllib.request
from typing import Any

from fedcrm_aggregator.status_http import StatusServer
from fedcrm_operator.aggregator_status import fetch_status
from fedcrm_operator.federations import progress_fields
from operator_harness import free_port

PROGRESS: dict[str, Any] = {
    "federation": "coord/churn", "state": "training", "round": 3, "rounds": 10, "expected_participants": 3,
    "active_participants": 2, "connected_participants": 3, "metrics": {"accuracy": 0.875, "auc": 0.9},
    "round_duration_s": 1.5, "bytes_up_per_client": 4096.0, "epsilon_spent": None, "model_digest": None, "message": "",
}


def test_status_reaches_the_operator_and_metrics_reach_prometheus() -> None:
    progress = dict(PROGRESS)
    server = StatusServer("127.0.0.1:0", lambda: progress).start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        assert urllib.request.urlopen(f"{base}/healthz").read() == b"ok\n"
        status = fetch_status(f"{base}/status", "coord/churn")
        assert status is not None and (status.round, status.active_participants) == (3, 2)
        fields = progress_fields(status)
        assert fields["progress"] == "3/10" and fields["accuracy"] == "87.50%" and "phase" not in fields
        assert fetch_status(f"{base}/status", "coord/other") is None  # an answer about another federation
        text = urllib.request.urlopen(f"{base}/metrics").read().decode()
        assert 'fedcrm_round{federation="coord/churn"} 3.0' in text
        assert 'fedcrm_validation_metric{federation="coord/churn",metric="accuracy"} 0.875' in text
        assert 'fedcrm_federation_state{federation="coord/churn",state="training"} 1.0' in text
        assert "fedcrm_epsilon_spent" not in text  # no differential privacy, no made-up number
        progress.update(state="failed", message="too few participants")
        failed = fetch_status(f"{base}/status", "coord/churn")
        assert failed is not None and progress_fields(failed)["phase"] == "Failed"
    finally:
        server.stop()
    assert fetch_status(f"http://127.0.0.1:{free_port()}/status", "coord/churn") is None  # nobody listening


def test_a_compromised_aggregators_status_is_bounded_before_it_reaches_the_federation() -> None:
    """The aggregator is not trusted with the API: what it serves is read up to 64 KiB, and every field that
    reaches the Federation's status is bounded in size and kind."""
    from fedcrm_operator.aggregator_status import MAX_STATUS_BYTES

    progress = {**PROGRESS, "message": "x" * 5000, "epsilon_spent": float("nan"), "state": "owned",
                "warnings": ["w" * 3000] * 10, "model_digest": "../../etc/passwd",
                "metrics": {f"m{i}": 1.0 for i in range(100)}}
    server = StatusServer("127.0.0.1:0", lambda: progress).start()
    try:
        url = f"http://127.0.0.1:{server.port}/status"
        status = fetch_status(url, "coord/churn")
        assert status is not None
        assert len(status.message) == 1024 and status.epsilon_spent is None and status.state == "training"
        assert len(status.warnings) == 5 and all(len(w) == 1024 for w in status.warnings)
        assert status.model_digest is None and len(status.metrics) <= 16
        progress["model_digest"] = "sha256:" + "ab" * 32  # what the aggregator writes (weights_digest)
        assert fetch_status(url, "coord/churn").model_digest == progress["model_digest"]  # type: ignore[union-attr]
        progress["round"] = -1  # not a count: the whole answer is ignored
        assert fetch_status(url, "coord/churn") is None
        progress.update(round=3, message="y" * (2 * MAX_STATUS_BYTES))  # too big to read at all
        assert fetch_status(url, "coord/churn") is None
    finally:
        server.stop()
