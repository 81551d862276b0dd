"""Scoring the final model on held-out rows, in a child process forked warm at the start of a run.

The launcher itself never imports torch or pandas (it stays small while ten
participants train). The scorer child loads and checks the held-out file while
the participants load theirs, so a bad test file is reported with their data
problems, before any round; at the end it scores the model in well under a
second instead of paying torch's import then.
"""

from __future__ import annotations

from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from fedcrm.errors import FedcrmError
from fedcrm.spec.manifests import Task

__all__ = ["serve"]


def serve(conn: Connection, test_path: str, task: Task) -> None:
    """Send ``{"rows": n}`` or ``{"problem": msg}``; then score each model folder received until ``None``."""
    from fedcrm.data.loaders import load_canonical_file
    from fedcrm.models.artifacts import load_model
    from fedcrm.models.scoring import score_frame

    try:
        test = load_canonical_file(test_path, task)
    except FedcrmError as err:
        conn.send({"problem": str(err)})
        return
    conn.send({"rows": len(test)})
    while (model_dir := conn.recv()) is not None:
        reply: dict[str, Any]
        try:
            reply = {"metrics": score_frame(load_model(Path(model_dir)), test.frame)}
        except FedcrmError as err:
            reply = {"problem": str(err)}
        conn.send(reply)
