"""When enrolment closes: every allowed namespace joined, or the timeout after the minimum was reached.

The timer is its own status field, ``status.enrollment.minReachedAt`` (RFC 3339), written once when
``spec.training.minParticipants`` are first admitted and removed if the admitted fall below the minimum again
(the timeout then counts from the next time the minimum is reached). The ``Enrolled`` condition only reports
the outcome; nothing is read back from its transition time.

Pure: the caller passes the time, so the decision is testable without a clock or a cluster.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from dataclasses import dataclass
from typing import Any

from fedcrm.spec.manifests import Federation, Participant
from fedcrm_operator.conditions import condition

__all__ = ["CLOCK_SKEW_SECONDS", "Closing", "closes", "format_time", "parse_time"]

log = logging.getLogger("fedcrm.operator")

#: A recorded time at most this far in the future is taken as it is (operator replicas' clocks differ a little);
#: one further ahead would hold enrolment open until then, so it is treated like an unreadable one.
CLOCK_SKEW_SECONDS = 60.0

# RFC 3339 (``T`` or ``t`` or a space between date and time, any number of fractional digits, ``Z``/``z`` or
# an offset) and the ISO 8601 forms Kubernetes' date-time format also accepts: minutes only, an offset
# without its colon, no offset at all (taken as UTC).
_TIMESTAMP = re.compile(
    r"(?P<year>\d{4})-(?P<month>\d{2})-(?P<day>\d{2})[Tt ]"
    r"(?P<hour>\d{2}):(?P<minute>\d{2})(?::(?P<second>\d{2})(?:[.,](?P<fraction>\d+))?)?"
    r"(?P<zone>[Zz]|[+-]\d{2}(?::?\d{2})?)?"
)


def parse_time(text: object) -> dt.datetime | None:
    """An aware UTC datetime from any RFC 3339 timestamp, or None when ``text`` is not one.

    Fractions beyond microseconds are truncated, a leap second (``:60``) is read as ``:59``, a missing offset
    and ``-00:00`` mean UTC. Never raises.
    """
    if not isinstance(text, str):
        return None
    match = _TIMESTAMP.fullmatch(text.strip())
    if match is None:
        return None
    fraction = (match["fraction"] or "")[:6].ljust(6, "0")
    zone = match["zone"] or "Z"
    if zone in ("Z", "z"):
        offset = dt.timedelta(0)
    else:
        digits = zone[1:].replace(":", "")
        hours, minutes = int(digits[:2]), int(digits[2:] or 0)
        if hours > 23 or minutes > 59:
            return None
        offset = dt.timedelta(hours=hours, minutes=minutes) * (-1 if zone[0] == "-" else 1)
    try:
        local = dt.datetime(
            int(match["year"]), int(match["month"]), int(match["day"]), int(match["hour"]), int(match["minute"]),
            min(int(match["second"] or 0), 59), int(fraction), tzinfo=dt.timezone(offset),
        )
        return local.astimezone(dt.timezone.utc)
    except (ValueError, OverflowError):  # 2024-02-30, hour 24, a year 1 with a positive offset
        return None


def format_time(moment: dt.datetime) -> str:
    """RFC 3339 in UTC to the second, as Kubernetes writes its own timestamps."""
    return moment.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Closing:
    """The decision of one pass: whether training starts, the ``Enrolled`` condition, its message, and the
    ``status.enrollment`` the Federation should hold afterwards (None: none)."""

    start: bool
    condition: dict[str, Any]
    message: str
    enrollment: dict[str, Any] | None


def closes(federation: Federation, admitted: list[Participant], recorded: dict[str, Any] | None,
           *, now: dt.datetime) -> Closing:
    """Whether training starts at ``now``.

    ``recorded``: the Federation's ``status.enrollment`` as read (None when absent). A recorded time that
    cannot be read, or lies in the future beyond :data:`CLOCK_SKEW_SECONDS`, is replaced by ``now`` (and
    logged): the timeout restarts rather than the pass failing or enrolment staying open for ever.
    """
    spec = federation.spec
    need = spec.training.min_participants
    timeout = spec.participants.enrollment_timeout_seconds
    recorded = dict(recorded) if isinstance(recorded, dict) else {}
    namespaces = {p.metadata.namespace for p in admitted}
    if len(admitted) < need:
        msg = f"{len(admitted)} of at least {need} participants admitted; waiting for more"
        recorded.pop("minReachedAt", None)  # below the minimum again: the next time it is reached counts
        return Closing(False, condition("Enrolled", False, "WaitingForParticipants", msg), msg, recorded or None)
    if namespaces >= set(spec.participants.namespaces):
        msg = f"every allowed namespace joined ({len(admitted)} participants)"
        return Closing(True, condition("Enrolled", True, "AllJoined", msg), msg, recorded or None)

    raw = recorded.get("minReachedAt")
    since = parse_time(raw)
    if since is None and raw is not None:
        log.warning("federation %s: status.enrollment.minReachedAt %r is not an RFC 3339 time; the enrollment "
                    "timeout restarts now", federation.key, raw)
    elif since is not None and (since - now).total_seconds() > CLOCK_SKEW_SECONDS:
        log.warning("federation %s: status.enrollment.minReachedAt %r is in the future; the enrollment timeout "
                    "restarts now", federation.key, raw)
        since = None
    if since is None:
        recorded["minReachedAt"] = format_time(now)
        since = parse_time(recorded["minReachedAt"])  # to the second, as the next pass will read it
        assert since is not None
    if (now - since).total_seconds() >= timeout:
        msg = f"enrollment timeout reached with {len(admitted)} participants"
        return Closing(True, condition("Enrolled", True, "TimeoutReached", msg), msg, recorded)
    deadline = since + dt.timedelta(seconds=timeout)
    msg = (f"{len(admitted)} participants admitted; training starts when every allowed namespace joins, "
           f"or at {format_time(deadline)} ({timeout:.0f}s after the minimum was reached)")
    return Closing(False, condition("Enrolled", False, "MinimumReached", msg), msg, recorded)
