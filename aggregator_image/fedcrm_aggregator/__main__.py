"""``fedcrm-aggregator --config aggregator.json``: serve one federation until it ends.

Exit codes: 0 the federation succeeded; 1 it failed (too few participants,
timeouts: the report says why); 2 the configuration or TLS files are wrong.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import logging
import os
import re
import sys
import threading
from pathlib import Path

from fedcrm.errors import FedcrmError
from fedcrm.logs import add_log_level_argument, configure
from fedcrm.runconfig import AggregatorConfig

log = logging.getLogger("fedcrm.aggregator")

#: The environment variable that sets ``--payload-budget`` where the command line is not the deployer's to change.
PAYLOAD_BUDGET_ENV = "FEDCRM_AGGREGATOR_PAYLOAD_BUDGET"

_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30}


def byte_size(text: str) -> int:
    """Bytes from ``536870912``, ``512Mi`` or ``1G`` (Kubernetes quantity suffixes)."""
    match = re.fullmatch(r"\s*(\d+)\s*([kmg]i?)?\s*", text, flags=re.IGNORECASE)
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size in bytes (such as 268435456, 256Mi or 1Gi)")
    return int(match[1]) * _UNITS[(match[2] or "").lower()]


# mallopt(3) parameters.
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def return_freed_results_to_the_system() -> bool:
    """Have glibc give each result's memory back to the system when it is freed, not keep it per thread.

    By default glibc raises its mmap threshold to the size of the largest block freed (up to 32 MiB) and gives every
    thread an arena of its own: after the first results, each worker thread kept megabytes of freed results, and the
    aggregator's peak grew with its threads, that is with the participants (measured under a flood: +35 MiB for three
    peers, +64 MiB for twelve; with these settings +19 and +29). A fixed 128 KiB threshold maps every result on its
    own and unmaps it when freed; two arenas bound what the rest keeps. Does nothing without glibc.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 128 * 1024)) and bool(mallopt(_M_ARENA_MAX, 2))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedcrm-aggregator",
        description="Serve one federation: enrol participants, run the rounds, write the model and report.",
    )
    p.add_argument("--config", required=True, type=Path, help="aggregator config (JSON) written by fedcrm run or the operator")
    p.add_argument("--serve-after-finish", action="store_true",
                   help="keep serving /status and /metrics after the federation ends instead of exiting "
                   "(how the operator runs it, so a StatefulSet does not restart a finished aggregator)")
    p.add_argument("--payload-budget", type=byte_size, default=os.environ.get(PAYLOAD_BUDGET_ENV),
                   help="memory for results being read at once, all participants together, such as 256Mi (default: "
                   f"${PAYLOAD_BUDGET_ENV}, else 8 results of the largest size this Federation allows, at most a "
                   "quarter of the pod's memory limit). Requests beyond it are refused unread and sent again by honest "
                   "nodes; the budget does not grow with the number of participants")
    add_log_level_argument(p)
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    configure(args.log_level)
    return_freed_results_to_the_system()
    try:
        config = AggregatorConfig.read(args.config)
        config.out_dir.mkdir(parents=True, exist_ok=True)
        from fedcrm_aggregator.coordinator import Coordinator
        from fedcrm_aggregator.server import start_server
        from fedcrm_aggregator.status_http import StatusServer

        coordinator = Coordinator(config.federation, config.participants, config.out_dir)
        status = StatusServer(config.status_listen, coordinator.progress).start() if config.status_listen else None
        server, _ = start_server(config, coordinator, payload_budget=args.payload_budget)
    except (FedcrmError, OSError) as err:
        log.error("%s", err)
        sys.exit(2)
    try:
        report = coordinator.run()
    finally:
        # Give participants a moment to read FINISH before the streams close.
        server.stop(grace=3).wait()
        coordinator.close()
    if status is not None and args.serve_after_finish:
        # In a StatefulSet the process must not exit (it would be restarted and train again): keep the final
        # status readable for the operator and Prometheus until the Federation is deleted.
        log.info("federation %s; serving its final status until stopped", report["status"])
        threading.Event().wait()
    sys.exit(0 if report["status"] == "succeeded" else 1)


if __name__ == "__main__":
    main()
