"""Writing files that other processes read while we write them.

Readers of a run folder (the CLI's tests, ``fedcrm status``, a resumed
aggregator) poll files such as ``processes.json`` and ``state.json`` while the
writer is still running; a plain ``write_text`` lets them see an empty or half
written file. Writing a sibling temporary file and renaming it over the target
is atomic on POSIX, so a reader sees the old content or the new, never a torn
one. This module imports nothing heavy, so the launcher can use it.
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["atomic_write"]


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
