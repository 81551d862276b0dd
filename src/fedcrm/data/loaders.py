"""Reading a participant's records from where they live.

CSV cells are read as text (never guessed by pandas) so that the schema
mapping, not the file reader, decides what a cell means.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from fedcrm.data.canonical import CanonicalData, identity_source, to_canonical
from fedcrm.errors import DataError
from fedcrm.spec.manifests import DataSource, Participant, Task

__all__ = ["load_canonical_file", "load_participant_data", "read_table", "resolve_data_path"]


def resolve_data_path(path: str, base_dir: Path | None) -> Path:
    """Relative paths resolve against the manifest's folder, so a folder of manifests and data can move as one."""
    p = Path(path).expanduser()
    if not p.is_absolute() and base_dir is not None:
        p = base_dir / p
    return p


def read_table(path: Path, fmt: str | None, *, who: str, field: str = "spec.data.file.path") -> pd.DataFrame:
    fmt = fmt or ("parquet" if path.suffix.lower() in {".parquet", ".pq"} else "csv")
    where = who
    if not path.exists():
        raise DataError(f"{where}: data file {path} does not exist; check {field}")
    if path.is_dir():
        raise DataError(f"{where}: {path} is a folder; {field} must name a CSV or Parquet file")
    try:
        if fmt == "parquet":
            return pd.read_parquet(path)
        return pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""], skipinitialspace=True)
    except pd.errors.EmptyDataError:
        raise DataError(f"{where}: data file {path} is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"{where}: cannot read {path} as {fmt.upper()}: {first}") from None
    except Exception as err:  # pyarrow raises its own hierarchy for corrupt files
        raise DataError(f"{where}: cannot read {path} as {fmt.upper()}: {err}") from None


def _load(
    source: DataSource, task: Task, *, who: str, base_dir: Path | None, pvc_root: Path | None
) -> CanonicalData:
    if source.pvc is not None:
        if pvc_root is None:
            raise DataError(
                f"{who}: spec.data.pvc is read inside a cluster, where the claim is mounted; "
                "to run locally, point spec.data.file at a copy of the file"
            )
        path = pvc_root / source.pvc.path
        table = read_table(path, source.pvc.format, who=who, field="spec.data.pvc.path")
        return to_canonical(table, source, task, who=who, file=path)
    assert source.file is not None  # DataSource guarantees exactly one source
    path = resolve_data_path(source.file.path, base_dir)
    table = read_table(path, source.file.format, who=who)
    return to_canonical(table, source, task, who=who, file=path)


def load_participant_data(
    participant: Participant, task: Task, *, base_dir: Path | None, pvc_root: Path | None = None
) -> CanonicalData:
    """The participant's records in the canonical schema; :class:`DataError` says what to fix.

    ``pvc_root`` is where a ``spec.data.pvc`` claim is mounted (only in a training pod).
    """
    return _load(
        participant.spec.data, task, who=f"participant {participant.identity}", base_dir=base_dir, pvc_root=pvc_root
    )


def load_canonical_file(path: str | Path, task: Task) -> CanonicalData:
    """A file that already uses canonical column names (e.g. a held-out test set)."""
    return _load(identity_source(task, str(path)), task, who="test data", base_dir=None, pvc_root=None)
