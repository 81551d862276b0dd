"""Named places where a crash test can kill the aggregator, deterministically.

Some crashes matter only at one instant (between collecting the unmasking shares and finishing the sum; twice
within one round); a test that polls from outside and sends SIGKILL would hit that instant only by luck. With
``FEDCRM_AGGREGATOR_CRASH_AT=<point>:<round>[*<times>]`` set (tests only; never in a deployment), the aggregator
exits at once, as if killed (code 137, no cleanup, nothing flushed beyond what is already durable), the first
``times`` times it reaches ``point`` in that round; a count kept beside its outputs survives the restarts.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

__all__ = ["ENV", "crash_point"]

ENV = "FEDCRM_AGGREGATOR_CRASH_AT"
log = logging.getLogger("fedcrm.aggregator")


def crash_point(name: str, round_: int, out_dir: Path) -> None:
    """Exit like a SIGKILLed process here when the environment asks for it (see the module docstring)."""
    wanted = os.environ.get(ENV, "")
    if not wanted:
        return
    point, _, rest = wanted.partition(":")
    at, _, times = rest.partition("*")
    if point != name or not at.isdigit() or int(at) != round_:
        return
    counter = out_dir / f".crash-{name}-{round_}"
    done = int(counter.read_text()) if counter.exists() else 0
    if done >= (int(times) if times.isdigit() else 1):
        return
    counter.write_text(str(done + 1))
    log.error("%s=%s: crashing at %s of round %d (%d of %s)", ENV, wanted, name, round_, done + 1, times or "1")
    logging.shutdown()
    os._exit(137)
