"""Status conditions: set one, keep its transition time unless its status changed."""

from __future__ import annotations

import datetime as dt
from typing import Any

__all__ = ["condition", "now", "set_condition", "stamped", "strip_times"]


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(type_: str, status: bool | None, reason: str, message: str) -> dict[str, Any]:
    text = "Unknown" if status is None else ("True" if status else "False")
    return {"type": type_, "status": text, "reason": reason, "message": message}


def set_condition(conditions: list[dict[str, Any]], new: dict[str, Any], *, at: str | None = None
                  ) -> list[dict[str, Any]]:
    """``conditions`` with ``new`` replacing the one of its type; the transition time moves only on a change.

    ``at``: the transition time to write (RFC 3339), so a pure caller (:mod:`fedcrm_operator.desired`) passes the
    time its pass observed instead of reading the clock; default: now."""
    out, placed = [], False
    for old in conditions or []:
        if old.get("type") == new["type"]:
            changed = old.get("status") != new["status"]
            stamp = (at or now()) if changed or not old.get("lastTransitionTime") else old["lastTransitionTime"]
            out.append({**new, "lastTransitionTime": stamp})
            placed = True
        else:
            out.append(dict(old))
    if not placed:
        out.append({**new, "lastTransitionTime": at or now()})
    return out


def strip_times(status: dict[str, Any]) -> dict[str, Any]:
    """A status without transition times, to tell whether a write would change anything."""
    conditions = [{k: v for k, v in c.items() if k != "lastTransitionTime"} for c in status.get("conditions", [])]
    return {**status, "conditions": conditions}


def find(conditions: list[dict[str, Any]], type_: str) -> dict[str, Any] | None:
    return next((c for c in conditions or [] if c.get("type") == type_), None)


def stamped(conditions: list[dict[str, Any]], generation: int) -> list[dict[str, Any]]:
    """Every condition marked with the spec generation it was computed from.

    Each pass recomputes every condition from the current spec, so all of them describe that generation; a
    client comparing a condition's observedGeneration with metadata.generation knows whether it is current.
    """
    return [{**c, "observedGeneration": generation} for c in conditions]
