"""Reading CSV and Parquet files in blocks of rows.

CSV cells are read as text (never guessed by pandas) so that the schema
mapping, not the file reader, decides what a cell means. Parquet keeps its
native types (booleans, numbers, nulls).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from fedcrm.errors import DataError

__all__ = ["CHUNK_ROWS", "file_format", "read_file_chunks"]

CHUNK_ROWS = 50_000


def file_format(path: Path, fmt: str | None) -> str:
    return fmt or ("parquet" if path.suffix.lower() in {".parquet", ".pq"} else "csv")


def _cannot_read(path: Path, fmt: str, err: BaseException) -> DataError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return DataError(f"cannot read {path} as {fmt.upper()}: {first}")


def _csv_chunks(path: Path, chunk_rows: int) -> Iterator[pd.DataFrame]:
    with pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""], skipinitialspace=True,
                     chunksize=chunk_rows) as reader:
        header_only = True
        for chunk in reader:
            header_only = False
            yield chunk
        if header_only:  # a header and no rows: still report the columns
            yield pd.read_csv(path, dtype=str, nrows=0)


def _parquet_chunks(path: Path, chunk_rows: int) -> Iterator[pd.DataFrame]:
    table = pq.ParquetFile(path)
    empty = True
    for batch in table.iter_batches(batch_size=chunk_rows):
        empty = False
        yield batch.to_pandas()
    if empty:
        yield table.schema_arrow.empty_table().to_pandas()


def read_file_chunks(path: Path, fmt: str | None, *, chunk_rows: int = CHUNK_ROWS,
                     field: str = "spec.data.file.path") -> Iterator[pd.DataFrame]:
    """Yield the file's rows ``chunk_rows`` at a time; :class:`DataError` says what is wrong with the file."""
    fmt = file_format(path, fmt)
    if not path.exists():
        raise DataError(f"data file {path} does not exist; check {field}")
    if path.is_dir():
        raise DataError(f"{path} is a folder; {field} must name a CSV or Parquet file")
    chunks = _parquet_chunks(path, chunk_rows) if fmt == "parquet" else _csv_chunks(path, chunk_rows)
    try:
        yield from chunks
    except pd.errors.EmptyDataError:
        raise DataError(f"data file {path} is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError, ValueError) as err:
        raise _cannot_read(path, fmt, err) from None
    except Exception as err:  # pyarrow raises its own hierarchy for corrupt files
        raise _cannot_read(path, fmt, err) from None
