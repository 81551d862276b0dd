"""Reading a running aggregator's progress.

The aggregator needs no Kubernetes permissions at all: it serves its progress
as JSON on its metrics port (``/status``), and the operator, admitted to that
port by the aggregator's NetworkPolicy, polls it and writes the Federation's
status. A compromised aggregator therefore cannot touch any API object.
"""

from __future__ import annotations

import json
import logging
import math
import re
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MAX_STATUS_BYTES", "AggregatorStatus", "fetch_status"]

log = logging.getLogger("fedcrm.operator")


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
        """Parse, trusting nothing: what is written into the Federation's status is bounded in size and kind,
        whatever a faulty or compromised aggregator serves."""
        state = str(data.get("state", "training"))
        epsilon = data.get("epsilon_spent")
        digest = data.get("model_digest")
        return cls(
            state=state if state in _STATES else "training",
            round=_count(data.get("round", 0)),
            rounds=_count(data.get("rounds", 0)),
            active_participants=_count(data.get("active_participants", 0)),
            epsilon_spent=float(epsilon) if _finite(epsilon) and epsilon >= 0 else None,
            metrics={str(k)[:32]: float(v) for k, v in list((data.get("metrics") or {}).items())[:_MAX_METRICS]
                     if _finite(v)},
            model_digest=digest if isinstance(digest, str) and re.fullmatch(r"sha256:[0-9a-f]{64}", digest) else None,
            message=str(data.get("message", ""))[:_MAX_TEXT],
            warnings=tuple(str(w)[:_MAX_TEXT] for w in (data.get("warnings") or [])[:5]),
        )


_STATES = ("enrolling", "training", "succeeded", "failed")
_MAX_TEXT = 1024  # characters of a message that reach the Federation's status
_MAX_METRICS = 16
#: The most of an aggregator's /status answer the operator reads; an honest one is under 2 KiB.
MAX_STATUS_BYTES = 64 * 1024


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1_000_000_000:
        raise ValueError(f"not a count: {value!r}")
    return value


def fetch_status(url: str, federation: str, *, timeout: float = 1.0) -> AggregatorStatus | None:
    """The progress of ``federation``'s aggregator, or None while it cannot be reached (starting, restarting).

    An answer about another federation (a misrouted Service, a stale endpoint) is ignored.
    """
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - in-cluster http URL from settings
            body = response.read(MAX_STATUS_BYTES + 1)
        if len(body) > MAX_STATUS_BYTES:
            log.warning("federation %s: the aggregator's /status answer is over %d bytes; ignored", federation,
                        MAX_STATUS_BYTES)
            return None
        data = json.loads(body)
    except (urllib.error.URLError, OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("federation") != federation:
        return None
    try:
        return AggregatorStatus.from_json(data)
    except (TypeError, ValueError):
        return None
