"""Turning a participant's local table into the federation's canonical schema.

The mapping is the participant's own: local column names, spellings and units
stay local; only canonical values ever reach the model. Problems are collected
and reported together, naming the participant, file, column and what to do, so
a tenant fixes its manifest in one pass instead of one error at a time.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from fedcrm.errors import DataError
from fedcrm.spec.manifests import DataSource, FeatureType, Task

__all__ = [
    "CanonicalData",
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


def _examples(values: pd.Series) -> str:
    counts = values.value_counts()
    shown = [f"{v!r} ({n} row{'s' if n != 1 else ''})" for v, n in counts.head(_EXAMPLES).items()]
    more = len(counts) - _EXAMPLES
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


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


def to_canonical(table: pd.DataFrame, source: DataSource, task: Task, *, who: str, file: str | Path) -> CanonicalData:
    """Map ``table`` (the participant's local columns) onto ``task``'s schema.

    Raises :class:`DataError` listing every problem: unknown canonical names in
    the mapping, mapped columns missing from the file, values with no mapping,
    cells of the wrong type, an unmapped or empty target.
    """
    where = f"{who} ({file})"
    problems: list[str] = []
    canonical_names = task.field_names
    columns = [str(c) for c in table.columns]

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
    if len(table) == 0:
        problems.append("the file has no rows")

    out: dict[str, pd.Series] = {}
    for name in canonical_names:
        local = source.mapping.get(name)
        is_target = name == task.target
        kind = FeatureType.boolean if is_target else task.feature(name).type
        if local is None:
            out[name] = pd.Series(None if kind is FeatureType.categorical else np.nan, index=table.index,
                                  dtype=object if kind is FeatureType.categorical else "float64")
            continue
        if local not in columns:
            hint = difflib.get_close_matches(local, columns, n=1)
            problems.append(
                f"column {local!r} (mapped to {name!r}) is not in the file"
                + (f"; did you mean {hint[0]!r}?" if hint else f"; its columns are: {', '.join(columns[:20])}")
            )
            continue
        col = table[table.columns[columns.index(local)]]
        values = source.values.get(name, {})
        if kind is FeatureType.numeric:
            t = source.transforms.get(name)
            converted, bad = _convert_numeric(col, values, t.scale if t else 1.0, t.offset if t else 0.0)
            if bad.any():
                problems.append(
                    f"column {local!r} (canonical {name!r}, numeric) has non-numeric values: {_examples(col[bad])}; "
                    f"fix the data or map them in spec.data.values.{name}"
                )
        elif kind is FeatureType.boolean:
            converted, bad = _convert_boolean(col, values)
            if bad.any():
                problems.append(
                    f"column {local!r} (canonical {name!r}, boolean) has values with no mapping: {_examples(col[bad])}; "
                    f"add them to spec.data.values.{name} (e.g. {{\"Won\": true}}); true/false, 1/0 and yes/no are understood"
                )
        else:
            allowed = task.feature(name).categories or []
            converted, bad = _convert_categorical(col, values, allowed)
            if bad.any():
                problems.append(
                    f"column {local!r} (canonical {name!r}) has values with no mapping: {_examples(_as_text(col)[bad])}; "
                    f"map each to one of {allowed} in spec.data.values.{name}"
                )
        out[name] = converted

    if problems:
        raise DataError(f"{where}: the data does not fit the federation's schema:\n" + "\n".join(f"  - {p}" for p in problems))

    frame = pd.DataFrame(out, index=table.index).reset_index(drop=True)
    labelled = frame[task.target].notna()
    dropped = int((~labelled).sum())
    frame = frame[labelled].reset_index(drop=True)
    if len(frame) == 0:
        raise DataError(f"{where}: no row has a value for the target {task.target!r} (column {source.mapping[task.target]!r})")
    frame[task.target] = frame[task.target].astype("int8")
    notes = ()
    if dropped:
        notes = (f"{where}: dropped {dropped} row(s) with an empty target {task.target!r}",)
    return CanonicalData(frame=frame, dropped_unlabelled=dropped, notes=notes)
