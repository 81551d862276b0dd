"""``fedcrm-aggregator --config aggregator.json``: serve one federation until it ends.

Exit codes: 0 the federation succeeded; 1 it failed (too few participants,
timeouts: the report says why); 2 the configuration or TLS files are wrong.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from pathlib import Path

from fedcrm.errors import FedcrmError
from fedcrm.logs import add_log_level_argument, configure
from fedcrm.runconfig import AggregatorConfig

log = logging.getLogger("fedcrm.aggregator")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedcrm-aggregator",
        description="Serve one federation: enrol participants, run the rounds, write the model and report.",
    )
    p.add_argument("--config", required=True, type=Path, help="aggregator config (JSON) written by fedcrm run or the operator")
    p.add_argument("--serve-after-finish", action="store_true",
                   help="keep serving /status and /metrics after the federation ends instead of exiting "
                   "(how the operator runs it, so a StatefulSet does not restart a finished aggregator)")
    add_log_level_argument(p)
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    configure(args.log_level)
    try:
        config = AggregatorConfig.read(args.config)
        config.out_dir.mkdir(parents=True, exist_ok=True)
        from fedcrm_aggregator.coordinator import Coordinator
        from fedcrm_aggregator.server import start_server
        from fedcrm_aggregator.status_http import StatusServer

        coordinator = Coordinator(config.federation, config.participants, config.out_dir)
        status = StatusServer(config.status_listen, coordinator.progress).start() if config.status_listen else None
        server, _ = start_server(config, coordinator)
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
