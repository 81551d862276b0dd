"""One entry point for every kind of ``spec.data`` source: a stream of local chunks plus how to word it.

Adding a source kind means one reader module yielding DataFrames and one
branch in :func:`open_source`; the mapping, the loaders and ``fedcrm data
check`` work unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from fedcrm.data.credentials import Credentials
from fedcrm.data.retries import Backoff
from fedcrm.errors import DataError
from fedcrm.spec.manifests import DataSource, FileSource, PvcSource, SalesforceSource, SqlSource

__all__ = ["SourceStream", "open_source", "resolve_data_path"]


@dataclass
class SourceStream:
    """Chunks of local rows, and the words messages use about their source."""

    origin: str  # "leads.csv", "Salesforce: SELECT ... FROM Lead", "SQL postgresql+psycopg://db:5432/crm"
    container: str  # "the file", "the query result"
    empty: str  # the message when no row arrives
    chunks: Iterator[pd.DataFrame]


def resolve_data_path(path: str, base_dir: Path | None) -> Path:
    """Relative paths resolve against the manifest's folder, so a folder of manifests and data can move as one."""
    p = Path(path).expanduser()
    if not p.is_absolute() and base_dir is not None:
        p = base_dir / p
    return p


def _credentials(data: DataSource, credentials: Mapping[str, str] | None) -> Credentials:
    ref = data.secret_ref()
    assert ref is not None
    if credentials is None:
        raise DataError(
            f"spec.data.{data.kind}.secretRef names Secret {ref.name!r} but no credentials were given: in a cluster "
            "the operator mounts them; locally pass the Secret's manifest with the Participant's files"
        )
    if isinstance(credentials, Credentials):
        return credentials
    return Credentials(credentials, origin=f"Secret {ref.name!r}")


def open_source(data: DataSource, *, base_dir: Path | None, credentials: Mapping[str, str] | None,
                backoff: Backoff | None = None, pvc_root: Path | None = None) -> SourceStream:
    """The source's rows as a lazy stream; nothing is read or connected until iteration.

    ``pvc_root`` is where a ``spec.data.pvc`` claim is mounted (only in a training pod).
    """
    backoff = backoff or Backoff()
    source = data.source
    if isinstance(source, PvcSource):
        from fedcrm.data.files import read_file_chunks

        if pvc_root is None:
            raise DataError(
                "spec.data.pvc is read inside a cluster, where the claim is mounted; "
                "to run locally, point spec.data.file at a copy of the file"
            )
        path = pvc_root / source.path
        return SourceStream(f"{source.claim_name}:{source.path}", "the file", "the file has no rows",
                            read_file_chunks(path, source.format, field="spec.data.pvc.path (and the claim's contents)"))
    if isinstance(source, FileSource):
        from fedcrm.data.files import read_file_chunks

        path = resolve_data_path(source.path, base_dir)
        return SourceStream(str(path), "the file", "the file has no rows", read_file_chunks(path, source.format))
    if isinstance(source, SalesforceSource):
        from fedcrm.data.salesforce import read_pages

        return SourceStream(
            f"Salesforce {source.soql()}", "the query result",
            "the Salesforce query returned no rows; check spec.data.salesforce (its object, WHERE clause and the "
            "user's access to the records)",
            read_pages(source, _credentials(data, credentials), backoff=backoff),
        )
    if isinstance(source, SqlSource):
        from fedcrm.data.sql import database_label, read_chunks

        creds = _credentials(data, credentials)
        return SourceStream(
            f"SQL {database_label(creds)}", "the query result",
            "the SQL query returned no rows; check spec.data.sql.query (its WHERE clause, joins) and the database",
            read_chunks(source, creds, backoff=backoff),
        )
    raise DataError(f"spec.data.{data.kind}: this participant image cannot read that kind of source")
