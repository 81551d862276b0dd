"""One log format for every fedcrm process, so a run's logs/ folder reads as one story."""

from __future__ import annotations

import argparse
import logging
import sys

__all__ = ["add_log_level_argument", "configure"]

_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]


def add_log_level_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default="INFO", choices=_LEVELS, help="log verbosity (default INFO)")


def configure(level: str) -> None:
    # force: a library imported earlier (opacus, in a process forked warm) may have configured the root logger.
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr,
                        force=True)
