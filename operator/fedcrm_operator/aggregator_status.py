"""Reading a running aggregator's progress.

The aggregator needs no Kubernetes permissions at all: it serves its progress
as JSON on its metrics port (``/status``), and the operator, admitted to that
port by the aggregator's NetworkPolicy, polls it and writes the Federation's
status. A compromised aggregator therefore cannot touch any API object.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

__all__ = ["AggregatorStatus", "fetch_status"]


@dataclass(frozen=True)
class AggregatorStatus:
    state: str  # "enrolling", "training", "succeeded", "failed"
    round: int = 0
    rounds: int = 0
    active_participants: int = 0
    epsilon_spent: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    model_digest: str | None = None
    message: str = ""
    warnings: tuple[str, ...] = ()  # a model that learned nothing (fedcrm.training.health)

    @property
    def finished(self) -> bool:
        return self.state in ("succeeded", "failed")

    @property
    def succeeded(self) -> bool:
        return self.state == "succeeded"

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AggregatorStatus:
        return cls(
            state=str(data.get("state", "training")),
            round=int(data.get("round", 0)),
            rounds=int(data.get("rounds", 0)),
            active_participants=int(data.get("active_participants", 0)),
            epsilon_spent=data.get("epsilon_spent"),
            metrics={k: float(v) for k, v in (data.get("metrics") or {}).items() if isinstance(v, (int, float))},
            model_digest=data.get("model_digest"),
            message=str(data.get("message", "")),
            warnings=tuple(str(w) for w in (data.get("warnings") or [])[:5]),
        )


def fetch_status(url: str, federation: str, *, timeout: float = 1.0) -> AggregatorStatus | None:
    """The progress of ``federation``'s aggregator, or None while it cannot be reached (starting, restarting).

    An answer about another federation (a misrouted Service, a stale endpoint) is ignored.
    """
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - in-cluster http URL from settings
            data = json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("federation") != federation:
        return None
    try:
        return AggregatorStatus.from_json(data)
    except (TypeError, ValueError):
        return None
