"""``fedcrm-operator``: run the operator against $KUBECONFIG (or in-cluster credentials).

Settings come from FEDCRM_* environment variables (see settings.py and the
chart's values.yaml). Watches the namespaces in FEDCRM_WATCH_NAMESPACES, or
the whole cluster when it is empty.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import os
import signal
import socket
import tracemalloc

import kopf

from fedcrm.logs import add_log_level_argument, configure
from fedcrm_operator.settings import OperatorSettings


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedcrm-operator",
        description="Turn Federation and Participant resources into certificates, aggregators, training pods "
        "and network policies. Settings: FEDCRM_* environment variables (see the operator chart's values).",
    )
    p.add_argument("--liveness", default=os.environ.get("FEDCRM_OPERATOR_LIVENESS", "http://0.0.0.0:8081/healthz"),
                   help="liveness endpoint URL to serve ('' for none)")
    add_log_level_argument(p)
    return p


def log_heap_on_signal() -> None:
    """With PYTHONTRACEMALLOC set (a memory investigation): SIGUSR1 logs where the Python heap's memory was
    allocated, by file and by line, the largest first."""
    if not tracemalloc.is_tracing():
        return

    def dump(*_: object) -> None:
        snapshot = tracemalloc.take_snapshot()
        stats = snapshot.statistics("lineno")
        total = sum(s.size for s in stats)
        lines = [f"traced Python heap: {total / 2**20:.1f} MiB in {sum(s.count for s in stats)} blocks"]
        lines += [f"{s.size / 2**20:8.2f} MiB {s.count:8d} {s.traceback}" for s in snapshot.statistics("filename")[:30]]
        lines += [f"{s.size / 2**20:8.2f} MiB {s.count:8d} {s.traceback}" for s in stats[:30]]
        logging.getLogger("fedcrm.operator").warning("\n".join(lines))

    signal.signal(signal.SIGUSR1, dump)


def main(argv: list[str] | None = None) -> None:
    log_heap_on_signal()
    args = _parser().parse_args(argv)
    configure(args.log_level)
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    if args.log_level != "DEBUG":
        # kopf logs every handler and timer run at INFO ("Timer ... succeeded" every few seconds per object);
        # refusals, retries and failures are warnings and errors, and stay visible.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    import fedcrm_operator.handlers  # noqa: F401 - registers the handlers

    settings = OperatorSettings.from_environment()
    namespaces = list(settings.namespaces)
    identity = operator_identity()
    peering = os.environ.get("FEDCRM_OPERATOR_PEERING", "")
    asyncio.run(
        kopf.operator(
            clusterwide=not namespaces,
            namespaces=namespaces,
            # With a peering name, replicas elect one active operator; without, this process works alone.
            standalone=not peering,
            peering_name=peering or None,
            priority=peering_priority(identity) if peering else None,
            liveness_endpoint=args.liveness or None,
            identity=identity,
        )
    )


def peering_priority(identity: str) -> int:
    """This replica's rank among its peers: the highest works, the others wait for its record to expire.

    kopf freezes *every* replica when two share a priority, so each gets its own, from its identity (the pod
    name); FEDCRM_OPERATOR_PRIORITY overrides it."""
    given = os.environ.get("FEDCRM_OPERATOR_PRIORITY")
    if given:
        return int(given)
    return 1 + int.from_bytes(hashlib.sha256(identity.encode()).digest()[:4], "big") % (2**31 - 2)


def operator_identity() -> str:
    """Who this operator is in kopf's records: the pod's name in a cluster.

    kopf's own default asks the password database for the user's name, and the
    image's non-root user 65532 has no entry there: the operator would crash at
    start in every pod (seen on a real node)."""
    return os.environ.get("FEDCRM_OPERATOR_IDENTITY") or socket.gethostname() or f"uid-{os.getuid()}"


if __name__ == "__main__":
    main()
