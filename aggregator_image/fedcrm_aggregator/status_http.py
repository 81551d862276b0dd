"""The aggregator's HTTP endpoint: /healthz for probes, /status for the operator, /metrics for Prometheus.

Progress leaves the aggregator only this way, as aggregates the aggregator
already knows (round, counts of participants, global metrics); no per-
participant value is exported. The aggregator needs no Kubernetes
permissions: the operator polls /status.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["StatusServer"]

log = logging.getLogger("fedcrm.aggregator")

_STATES = ("enrolling", "training", "succeeded", "failed")


class _RoundCollector(Collector):
    """Builds the metrics from one progress snapshot per scrape, so nothing is kept twice."""

    def __init__(self, progress: Callable[[], dict[str, Any]]) -> None:
        self._progress = progress

    def collect(self) -> Iterator[GaugeMetricFamily]:
        p = self._progress()
        fed = p["federation"]

        def gauge(name: str, doc: str, value: float | None) -> GaugeMetricFamily | None:
            if value is None:
                return None
            g = GaugeMetricFamily(name, doc, labels=["federation"])
            g.add_metric([fed], float(value))
            return g

        families = [
            gauge("fedcrm_round", "Rounds completed.", p["round"]),
            gauge("fedcrm_rounds_planned", "Rounds planned.", p["rounds"]),
            gauge("fedcrm_participants_expected", "Participants the training started with.", p["expected_participants"]),
            gauge("fedcrm_participants_active", "Participants in the last round.", p["active_participants"]),
            gauge("fedcrm_round_duration_seconds", "Wall time of the last round.", p["round_duration_s"]),
            gauge("fedcrm_bytes_up_per_participant", "Bytes each participant sent in the last round.", p["bytes_up_per_client"]),
            gauge("fedcrm_epsilon_spent", "Differential-privacy budget spent so far.", p["epsilon_spent"]),
            # .get: a snapshot from before the budget was reported has no such key.
            gauge("fedcrm_epsilon_budget", "Differential-privacy budget (epsilon) of the whole run.", p.get("epsilon_budget")),
        ]
        yield from (f for f in families if f is not None)
        metric = GaugeMetricFamily("fedcrm_validation_metric", "Global validation metrics of the last round.",
                                   labels=["federation", "metric"])
        for name, value in sorted(p["metrics"].items()):
            metric.add_metric([fed, name], float(value))
        yield metric
        state = GaugeMetricFamily("fedcrm_federation_state", "1 for the federation's current state.",
                                  labels=["federation", "state"])
        for s in _STATES:
            state.add_metric([fed, s], 1.0 if p["state"] == s else 0.0)
        yield state


class StatusServer:
    def __init__(self, listen: str, progress: Callable[[], dict[str, Any]]) -> None:
        host, _, port = listen.rpartition(":")
        registry = CollectorRegistry()
        registry.register(_RoundCollector(progress))

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                path = self.path.split("?", 1)[0]
                if path == "/healthz":
                    self._send(200, b"ok\n", "text/plain")
                elif path == "/status":
                    self._send(200, json.dumps(progress()).encode(), "application/json")
                elif path == "/metrics":
                    self._send(200, generate_latest(registry), "text/plain; version=0.0.4")
                else:
                    self._send(404, b"not found: try /healthz, /status or /metrics\n", "text/plain")

            def _send(self, code: int, body: bytes, content_type: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: Any) -> None:  # scrapes every few seconds would drown the log
                pass

        self._server = ThreadingHTTPServer((host or "0.0.0.0", int(port)), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="status-http", daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> StatusServer:
        self._thread.start()
        log.info("status on :%d (/healthz, /status, /metrics)", self.port)
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
