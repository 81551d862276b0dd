"""Which status change is worth an Event, as a pure decision.

``kubectl describe`` and ``kubectl get events`` are where people look first;
the status says where an object is, Events say how it got there. One Event per
phase transition, and one per new reason of refusal or failure (a Participant
refused for its requirements, then for changed terms, is told twice), never one
per reconcile pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Event", "transition_event"]

# Phases an object should not be in: their Events are warnings.
_WARNING_PHASES = {"Refused", "Failed"}
# The condition whose reason and message explain each phase, by kind.
_EXPLAINED_BY = {"Federation": "Ready", "Participant": "Admitted"}


@dataclass(frozen=True)
class Event:
    type: str  # Normal or Warning
    reason: str  # CamelCase, for machines
    message: str  # for people


def _condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c.get("type") == type_), {})


def _explanation(kind: str, status: dict[str, Any]) -> tuple[str, str]:
    phase = str(status.get("phase") or "Pending")
    if kind == "Participant" and phase not in ("Refused", "Pending"):
        explained = _condition(status, "Ready")  # admitted: Ready says how its training goes
    else:
        explained = _condition(status, _EXPLAINED_BY[kind])
    return str(explained.get("reason") or phase), str(explained.get("message") or "")


def transition_event(kind: str, old: dict[str, Any], new: dict[str, Any]) -> Event | None:
    """The Event for going from status ``old`` to ``new`` of a ``kind`` object, or None when nothing happened."""
    old_phase, new_phase = str(old.get("phase") or "Pending"), str(new.get("phase") or "Pending")
    old_reason, _ = _explanation(kind, old)
    new_reason, message = _explanation(kind, new)
    if old_phase == new_phase and (new_phase not in _WARNING_PHASES or old_reason == new_reason):
        return None
    severity = "Warning" if new_phase in _WARNING_PHASES else "Normal"
    reason = new_reason if new_phase in _WARNING_PHASES else new_phase
    text = f"{old_phase} -> {new_phase}" if old_phase != new_phase else new_phase
    return Event(severity, reason, f"{text}: {message}" if message else text)
