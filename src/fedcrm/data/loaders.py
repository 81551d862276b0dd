"""Reading a participant's records from where they live, mapped onto the canonical schema.

Every source (file, Salesforce, SQL) arrives as a stream of chunks that the
:class:`~fedcrm.data.canonical.CanonicalMapper` converts one at a time; only
the canonical frame is kept.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from fedcrm.data.canonical import CanonicalData, CanonicalMapper, identity_source
from fedcrm.data.files import read_file_chunks
from fedcrm.data.retries import Backoff
from fedcrm.data.sources import open_source, resolve_data_path
from fedcrm.errors import DataError
from fedcrm.spec.manifests import DataSource, Participant, Task

__all__ = ["load_canonical_file", "load_participant_data", "load_source", "read_table", "resolve_data_path"]


def read_table(path: Path, fmt: str | None, *, who: str) -> pd.DataFrame:
    """A whole CSV or Parquet file as one frame (for small files and tools; loaders stream instead)."""
    try:
        chunks = list(read_file_chunks(path, fmt))
    except DataError as err:
        raise DataError(f"{who}: {err}") from None
    return pd.concat(chunks, ignore_index=True) if len(chunks) > 1 else chunks[0]


def load_source(data: DataSource, task: Task, *, who: str, base_dir: Path | None,
                credentials: Mapping[str, str] | None = None, backoff: Backoff | None = None,
                pvc_root: Path | None = None) -> CanonicalData:
    """Stream ``data``'s rows through the mapping; :class:`DataError` names the participant and what to fix."""
    try:
        stream = open_source(data, base_dir=base_dir, credentials=credentials, backoff=backoff, pvc_root=pvc_root)
        mapper = CanonicalMapper(data, task, who=who, origin=stream.origin, container=stream.container, empty=stream.empty)
        for chunk in stream.chunks:
            mapper.feed(chunk)
    except DataError as err:
        if str(err).startswith(f"{who} "):
            raise
        raise DataError(f"{who}: {err}") from None
    return mapper.finish()


def load_participant_data(participant: Participant, task: Task, *, base_dir: Path | None,
                          credentials: Mapping[str, str] | None = None, backoff: Backoff | None = None,
                          pvc_root: Path | None = None) -> CanonicalData:
    """The participant's records in the canonical schema; ``credentials`` are its Secret's keys, if it has one.

    ``pvc_root`` is where a ``spec.data.pvc`` claim is mounted (only in a training pod).
    """
    return load_source(participant.spec.data, task, who=f"participant {participant.identity}", base_dir=base_dir,
                       credentials=credentials, backoff=backoff, pvc_root=pvc_root)


def load_canonical_file(path: str | Path, task: Task, *, option: str = "--test-data") -> CanonicalData:
    """A file that already uses canonical column names (e.g. a held-out test set), named by the CLI's ``option``."""
    if not Path(path).is_file():
        what = "is a folder" if Path(path).is_dir() else "does not exist"
        raise DataError(f"test data: {path} {what}; {option} must name a CSV or Parquet file in the canonical schema")
    return load_source(identity_source(task, str(path)), task, who="test data", base_dir=None)
