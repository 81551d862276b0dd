"""Turning a participant's local table into the federation's canonical schema.

The mapping is the participant's own: local column names, spellings and units
stay local; only canonical values ever reach the model. Problems are collected
and reported together, naming the participant, file, column and what to do, so
a tenant fixes its manifest in one pass instead of one error at a time.
"""

from __future__ import annotations

import difflib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from fedcrm.errors import DataError
from fedcrm.spec.manifests import DataSource, FeatureType, Task

__all__ = [
    "CanonicalData",
    "CanonicalMapper",
    "FieldStats",
    "TRUE_WORDS",
    "FALSE_WORDS",
    "identity_source",
    "to_canonical",
]

TRUE_WORDS = frozenset({"true", "1", "yes", "y", "t", "1.0"})
FALSE_WORDS = frozenset({"false", "0", "no", "n", "f", "0.0"})
_EXAMPLES = 5


@dataclass(frozen=True)
class CanonicalData:
    """Rows in the canonical schema.

    ``frame`` holds numeric and boolean features as float64 (booleans as 1.0 / 0.0,
    missing as NaN), categorical features as object (str or None), and the target
    as int8 0/1. ``dropped_unlabelled`` counts rows dropped because the target was
    empty; callers log it, it is never silent.
    """

    frame: pd.DataFrame
    dropped_unlabelled: int = 0
    notes: tuple[str, ...] = field(default_factory=tuple)

    def __len__(self) -> int:
        return len(self.frame)


def identity_source(task: Task, path: str) -> DataSource:
    """A data source already in the canonical schema (held-out test sets, exports)."""
    from fedcrm.spec.manifests import FileSource

    return DataSource(file=FileSource(path=path), mapping={name: name for name in task.field_names})


def _as_text(col: pd.Series) -> pd.Series:
    """Cells as stripped strings, missing as None, whatever the file's dtype was."""
    # Built as an object Series on purpose: pandas 3's Series.map infers the "str" dtype,
    # which turns None back into NaN (and NaN into the text "nan" downstream).
    cells = [None if pd.isna(v) else (str(v).strip() or None) for v in col.astype(object)]
    return pd.Series(cells, index=col.index, dtype=object)


def _lookup(col: pd.Series, table: dict[str, object]) -> tuple[pd.Series, pd.Series]:
    """Apply a local -> canonical table; returns (converted, was-in-table mask)."""
    text = _as_text(col)
    hit = pd.Series([v is not None and v in table for v in text], index=text.index, dtype=bool)
    mapped = [table.get(v, v) if v is not None else None for v in text]
    return pd.Series(mapped, index=text.index, dtype=object), hit


def _convert_numeric(col: pd.Series, values: dict[str, object], scale: float, offset: float) -> tuple[pd.Series, pd.Series]:
    if values:
        col, _ = _lookup(col, values)
    if pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col):
        num = col.astype("float64")
        bad = pd.Series(False, index=col.index)
    else:
        text = _as_text(col)
        num = pd.to_numeric(text, errors="coerce").astype("float64")
        bad = text.notna() & num.isna()
    return num * scale + offset, bad


def _convert_boolean(col: pd.Series, values: dict[str, object]) -> tuple[pd.Series, pd.Series]:
    if pd.api.types.is_bool_dtype(col):
        return col.astype("float64"), pd.Series(False, index=col.index)
    mapped, _ = _lookup(col, values)

    def parse(v: object) -> float:
        if v is None:
            return np.nan
        if isinstance(v, bool):
            return float(v)
        word = str(v).strip().lower()
        if word in TRUE_WORDS:
            return 1.0
        if word in FALSE_WORDS:
            return 0.0
        return -1.0

    out = mapped.map(parse).astype("float64")
    bad = out == -1.0
    return out.where(~bad, np.nan), bad


def _convert_categorical(col: pd.Series, values: dict[str, object], allowed: list[str]) -> tuple[pd.Series, pd.Series]:
    mapped, _ = _lookup(col, values)
    mapped = pd.Series([None if v is None else str(v) for v in mapped], index=mapped.index, dtype=object)
    allowed_set = set(allowed)
    bad = mapped.map(lambda v: v is not None and v not in allowed_set).astype(bool)
    return mapped.where(~bad, None), bad


@dataclass
class FieldStats:
    """What mapping saw of one canonical field: the numbers behind ``fedcrm data check``'s report."""

    name: str
    type: str
    local: str | None
    local_type: str | None = None  # what the source delivered: "string", "integer", "boolean", "date" ...
    rows: int = 0
    present: int = 0
    positives: int = 0
    unmapped: Counter[str] = field(default_factory=Counter)

    @property
    def missing_fraction(self) -> float | None:
        return None if self.rows == 0 else 1.0 - self.present / self.rows


class CanonicalMapper:
    """Maps a stream of local chunks (file blocks, query pages) onto the canonical schema.

    Chunks are converted as they arrive, so no raw export is held in memory;
    problems (bad values with their counts, missing columns) are collected over
    the whole stream and reported together by :meth:`problems` / :meth:`finish`.
    ``container`` words messages for the source: "the file", "the query result".
    """

    def __init__(self, source: DataSource, task: Task, *, who: str, origin: str | Path,
                 container: str = "the file", empty: str = "the file has no rows") -> None:
        self.source, self.task = source, task
        self.where = f"{who} ({origin})"
        self.container, self.empty = container, empty
        self.rows = 0
        self.columns: dict[str, None] = {}  # every local column seen, in order
        self._parts: list[pd.DataFrame] = []
        self.stats: dict[str, FieldStats] = {}
        for name in task.field_names:
            kind = FeatureType.boolean if name == task.target else task.feature(name).type
            self.stats[name] = FieldStats(name=name, type=kind.value, local=source.mapping.get(name))
        self._static = self._check_manifest()

    def _check_manifest(self) -> list[str]:
        problems = []
        task, source, canonical_names = self.task, self.source, self.task.field_names
        for key in source.mapping:
            if key not in canonical_names:
                hint = difflib.get_close_matches(key, canonical_names, n=1)
                problems.append(
                    f"spec.data.mapping.{key}: {key!r} is not a canonical field of this federation"
                    + (f" (did you mean {hint[0]!r}?)" if hint else f"; canonical fields: {', '.join(canonical_names)}")
                )
        for key in list(source.values) + list(source.transforms):
            if key not in canonical_names:
                problems.append(f"spec.data.values/transforms: {key!r} is not a canonical field of this federation")
        for key in source.transforms:
            if key in canonical_names and key != task.target and task.feature(key).type is not FeatureType.numeric:
                problems.append(f"spec.data.transforms.{key}: transforms apply to numeric fields only")
        if task.target not in source.mapping:
            problems.append(
                f"spec.data.mapping: the target {task.target!r} is not mapped; map it to the local column that holds the label"
            )
        return problems

    def feed(self, table: pd.DataFrame) -> None:
        """Convert one chunk of local rows; a mapped column absent from this chunk counts as empty here."""
        columns = [str(c) for c in table.columns]
        self.columns.update(dict.fromkeys(columns))
        self.rows += len(table)
        out: dict[str, pd.Series] = {}
        for name, stats in self.stats.items():
            kind = FeatureType(stats.type)
            local = stats.local
            if local is None or local not in columns:
                out[name] = pd.Series(None if kind is FeatureType.categorical else np.nan, index=table.index,
                                      dtype=object if kind is FeatureType.categorical else "float64")
                stats.rows += len(table)
                continue
            col = table[table.columns[columns.index(local)]]
            if stats.local_type is None and col.notna().any():
                stats.local_type = pd.api.types.infer_dtype(col, skipna=True)
            values = self.source.values.get(name, {})
            if kind is FeatureType.numeric:
                t = self.source.transforms.get(name)
                converted, bad = _convert_numeric(col, values, t.scale if t else 1.0, t.offset if t else 0.0)
            elif kind is FeatureType.boolean:
                converted, bad = _convert_boolean(col, values)
            else:
                converted, bad = _convert_categorical(col, values, self.task.feature(name).categories or [])
            if bad.any():
                stats.unmapped.update(v for v in _as_text(col)[bad] if v is not None)
            stats.rows += len(table)
            stats.present += int(converted.notna().sum())
            if name == self.task.target:
                stats.positives += int((converted == 1.0).sum())
            out[name] = converted
        self._parts.append(pd.DataFrame(out, index=table.index).reset_index(drop=True))

    def _column_present(self, local: str) -> bool:
        # A relationship that is null in every record arrives as its parent ("Owner") without subfields.
        return local in self.columns or ("." in local and local.rsplit(".", 1)[0] in self.columns)

    def problems(self) -> list[str]:
        """Every problem found so far, each naming what to change."""
        problems = list(self._static)
        columns = list(self.columns)
        for name, stats in self.stats.items():
            local = stats.local
            if local is None or name not in self.task.field_names:
                continue
            if self.columns and not self._column_present(local):
                hint = difflib.get_close_matches(local, columns, n=1)
                problems.append(
                    f"column {local!r} (mapped to {name!r}) is not in {self.container}"
                    + (f"; did you mean {hint[0]!r}?" if hint else f"; its columns are: {', '.join(columns[:20])}")
                )
            elif stats.unmapped:
                examples = _count_examples(stats.unmapped)
                if stats.type == FeatureType.numeric.value:
                    problems.append(
                        f"column {local!r} (canonical {name!r}, numeric) has non-numeric values: {examples}; "
                        f"fix the data or map them in spec.data.values.{name}"
                    )
                elif stats.type == FeatureType.boolean.value:
                    problems.append(
                        f"column {local!r} (canonical {name!r}, boolean) has values with no mapping: {examples}; "
                        f"add them to spec.data.values.{name} (e.g. {{\"Won\": true}}); true/false, 1/0 and yes/no are understood"
                    )
                else:
                    allowed = self.task.feature(name).categories or []
                    problems.append(
                        f"column {local!r} (canonical {name!r}) has values with no mapping: {examples}; "
                        f"map each to one of {allowed} in spec.data.values.{name}"
                    )
        if self.rows == 0:
            problems.append(self.empty)
        return problems

    def finish(self) -> CanonicalData:
        """The mapped rows; raises :class:`DataError` listing every problem of the whole stream."""
        problems = self.problems()
        if problems:
            raise DataError(f"{self.where}: the data does not fit the federation's schema:\n" + "\n".join(f"  - {p}" for p in problems))
        task = self.task
        frame = pd.concat(self._parts, ignore_index=True) if len(self._parts) > 1 else self._parts[0]
        self._parts = []
        labelled = frame[task.target].notna()
        dropped = int((~labelled).sum())
        frame = frame[labelled].reset_index(drop=True)
        if len(frame) == 0:
            raise DataError(f"{self.where}: no row has a value for the target {task.target!r} (column {self.source.mapping[task.target]!r})")
        frame[task.target] = frame[task.target].astype("int8")
        notes: tuple[str, ...] = ()
        if dropped:
            notes = (f"{self.where}: dropped {dropped} row(s) with an empty target {task.target!r}",)
        return CanonicalData(frame=frame, dropped_unlabelled=dropped, notes=notes)


def _count_examples(counts: Counter[str]) -> str:
    shown = [f"{v!r} ({n} row{'s' if n != 1 else ''})" for v, n in counts.most_common(_EXAMPLES)]
    more = len(counts) - _EXAMPLES
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def to_canonical(table: pd.DataFrame, source: DataSource, task: Task, *, who: str, file: str | Path) -> CanonicalData:
    """Map ``table`` (the participant's local columns) onto ``task``'s schema in one piece.

    Raises :class:`DataError` listing every problem: unknown canonical names in
    the mapping, mapped columns missing from the file, values with no mapping,
    cells of the wrong type, an unmapped or empty target.
    """
    mapper = CanonicalMapper(source, task, who=who, origin=file)
    mapper.feed(table)
    return mapper.finish()
