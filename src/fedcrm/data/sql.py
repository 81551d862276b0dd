"""Reading rows from a SQL database through SQLAlchemy, in chunks.

The URL comes from the Participant's Secret (key ``url``), never from the
manifest, so a password never sits in a manifest or a log: messages name the
database as ``driver://host:port/db`` only. The query runs with
``stream_results`` (a server-side cursor with psycopg), so rows arrive
``chunkRows`` at a time and each chunk goes straight into the canonical
mapping. Connecting is retried with backoff (a database restarting, a replica
failing over); a query the database rejects is not.
"""

from __future__ import annotations

from collections.abc import Iterator

import pandas as pd
import sqlalchemy
from sqlalchemy import exc as sa_errors

from fedcrm.data.credentials import Credentials
from fedcrm.data.retries import Backoff, with_backoff
from fedcrm.errors import DataError
from fedcrm.spec.manifests import SqlSource

__all__ = ["URL_KEY", "database_label", "describe_url", "read_chunks"]

URL_KEY = "url"


def _url(creds: Credentials) -> sqlalchemy.URL:
    if URL_KEY not in creds:
        raise DataError(
            f"{creds.origin} has no key {URL_KEY!r}; put the SQLAlchemy URL of the database there, "
            "e.g. postgresql+psycopg://user:password@host:5432/crm"
        )
    try:
        return sqlalchemy.make_url(creds[URL_KEY].strip())
    except sa_errors.ArgumentError:
        raise DataError(f"{creds.origin}: key {URL_KEY!r} is not a SQLAlchemy URL (driver://user:password@host:port/database)") from None


def describe_url(url: sqlalchemy.URL) -> str:
    """``driver://host:port/database``: enough to find the database, nothing secret."""
    if url.host is None:  # a file database (sqlite) or a local socket
        return f"{url.drivername}:///{url.database or ''}"
    port = f":{url.port}" if url.port else ""
    return f"{url.drivername}://{url.host}{port}/{url.database or ''}"


def database_label(creds: Credentials) -> str:
    """Which database the Secret points at, for messages and reports."""
    return describe_url(_url(creds))


def _first_line(err: BaseException, url: sqlalchemy.URL) -> str:
    """The driver's own message, first line only, with the password blanked should a driver echo it."""
    orig = getattr(err, "orig", None) or err
    text = (str(orig).strip().splitlines() or [type(orig).__name__])[0]
    if url.password:
        text = text.replace(str(url.password), "***")
    return text


def read_chunks(source: SqlSource, creds: Credentials, *, backoff: Backoff) -> Iterator[pd.DataFrame]:
    """Yield the query's rows ``source.chunk_rows`` at a time; connects on first iteration."""
    url = _url(creds)
    where = describe_url(url)
    try:
        engine = sqlalchemy.create_engine(url, pool_pre_ping=False)
    except (sa_errors.ArgumentError, sa_errors.NoSuchModuleError, ImportError) as err:
        raise DataError(f"cannot use database URL {where} from {creds.origin}: {_first_line(err, url)}") from None
    try:
        try:
            connection = with_backoff(engine.connect, retryable=lambda e: isinstance(e, sa_errors.OperationalError),
                                      backoff=backoff, what=f"connecting to {where}", describe=lambda e: _first_line(e, url))
        except sa_errors.DBAPIError as err:
            raise DataError(
                f"cannot connect to the SQL database at {where} after {backoff.attempts} attempts: {_first_line(err, url)}"
            ) from None
        with connection:
            streaming = connection.execution_options(stream_results=True, yield_per=source.chunk_rows)
            try:
                yield from pd.read_sql_query(sqlalchemy.text(source.query), streaming, chunksize=source.chunk_rows)
            except (sa_errors.DBAPIError, pd.errors.DatabaseError) as err:
                # pandas wraps the driver's error in its own DatabaseError; the cause says what happened.
                cause = err.__cause__ if isinstance(err, pd.errors.DatabaseError) and err.__cause__ else err
                kind = "lost the connection to" if isinstance(cause, sa_errors.OperationalError) else "the query failed on"
                raise DataError(f"{kind} {where}: {_first_line(cause, url)}; check spec.data.sql.query") from None
    finally:
        engine.dispose()
