"""Bounded retries with exponential backoff, for sources that fail for a while (rate limits, restarts)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

__all__ = ["Backoff", "with_backoff"]

T = TypeVar("T")
log = logging.getLogger("fedcrm.data")


@dataclass(frozen=True)
class Backoff:
    """``attempts`` tries in all, waiting ``first``, ``first * factor``, ... seconds (at most ``cap``) between them.

    The defaults wait 1 + 2 + 4 + 8 = 15 s in all: enough for a database
    restart or a per-minute rate-limit window to pass, short enough that a
    tenant with a wrong host hears about it quickly.
    """

    attempts: int = 5
    first: float = 1.0
    factor: float = 2.0
    cap: float = 30.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        return min(self.cap, self.first * self.factor ** (attempt - 1))


def _first_line(err: BaseException) -> str:
    return str(err).splitlines()[0][:200] if str(err).strip() else type(err).__name__


def with_backoff(call: Callable[[], T], *, retryable: Callable[[BaseException], bool], backoff: Backoff, what: str,
                 describe: Callable[[BaseException], str] = _first_line) -> T:
    """``call()``, retried while it raises a ``retryable`` error; the last error propagates.

    ``describe`` words an error for the warning logged before each retry; it
    must not include secrets.
    """
    attempt = 1
    while True:
        try:
            return call()
        except Exception as err:
            if not retryable(err) or attempt >= backoff.attempts:
                raise
            delay = backoff.delay(attempt)
            log.warning("%s failed (attempt %d of %d): %s; retrying in %.1fs", what, attempt, backoff.attempts,
                        describe(err), delay)
            time.sleep(delay)
            attempt += 1
