"""The operator's own Prometheus metrics (the aggregator exports the round metrics)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import kopf
from prometheus_client import Counter, Gauge, Histogram

__all__ = ["FEDERATIONS", "PARTICIPANTS", "count_phases", "reconciling"]

RECONCILES = Counter(
    "fedcrm_operator_reconciles_total",
    "Reconciliations by resource and outcome (ok, retry, refused, error).",
    ["resource", "outcome"],
)
LATENCY = Histogram(
    "fedcrm_operator_reconcile_seconds",
    "Time one reconciliation took.",
    ["resource"],
    # Fine enough for a p50/p99 within a few per cent (bench/operator_scale.py reads them).
    buckets=(0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.35, 0.5, 0.75,
             1, 1.5, 2.5, 5, 10, 30),
)
FEDERATIONS = Gauge("fedcrm_operator_federations", "Federations by phase.", ["phase"])
PARTICIPANTS = Gauge("fedcrm_operator_participants", "Participants by phase.", ["phase"])


@contextmanager
def reconciling(resource: str) -> Iterator[None]:
    started = time.perf_counter()
    outcome = "ok"
    try:
        yield
    except kopf.TemporaryError:
        outcome = "retry"
        raise
    except kopf.PermanentError:
        outcome = "refused"
        raise
    except Exception:
        outcome = "error"
        raise
    finally:
        RECONCILES.labels(resource, outcome).inc()
        LATENCY.labels(resource).observe(time.perf_counter() - started)


def count_phases(gauge: Gauge, phases: dict[str, str], known: list[str]) -> None:
    """Set ``gauge`` from a map object -> phase, zeroing phases that have no object left."""
    for phase in known:
        gauge.labels(phase).set(sum(1 for p in phases.values() if p == phase))
