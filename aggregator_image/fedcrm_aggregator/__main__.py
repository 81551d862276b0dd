"""``fedcrm-aggregator --config aggregator.json``: serve one federation until it ends.

Exit codes: 0 the federation succeeded; 1 it failed (too few participants,
timeouts: the report says why); 2 the configuration or TLS files are wrong.
"""

from __future__ import annotations

import argparse
import logging
import sys
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

        coordinator = Coordinator(config.federation, config.participants, config.out_dir)
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
    sys.exit(0 if report["status"] == "succeeded" else 1)


if __name__ == "__main__":
    main()
