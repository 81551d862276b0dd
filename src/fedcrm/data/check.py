"""``fedcrm data check``: connect, read a sample, map it, and say what to fix before joining a federation.

The same function runs on a tenant's laptop and, at enrolment, in a check pod
inside the tenant's namespace (where the credentials are); its report is
plain data (:meth:`CheckReport.to_dict`) so the operator can put the problems
into the Participant's status and the CLI can print or emit JSON.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedcrm.data.canonical import CanonicalMapper, FieldStats
from fedcrm.data.retries import Backoff
from fedcrm.data.sources import open_source
from fedcrm.errors import DataError
from fedcrm.spec.manifests import Participant, Task

__all__ = ["CheckReport", "FieldRow", "check_participant"]

SAMPLE_ROWS = 1000
_UNMAPPED_SHOWN = 5


@dataclass(frozen=True)
class FieldRow:
    """One canonical field as this participant's sample delivers it."""

    field: str
    type: str  # canonical: numeric, categorical, boolean
    column: str | None  # the local column mapped to it, None when unmapped (missing at this participant)
    present: bool  # the column exists in the source
    local_type: str | None  # what the source delivered, e.g. "string", "integer", "boolean", "date"
    missing_pct: float | None  # share of sampled rows with no usable value, in percent
    unmapped: list[str] = field(default_factory=list)  # "'Tech' (12 rows)" for values with no mapping


@dataclass(frozen=True)
class CheckReport:
    participant: str
    source: str  # "file", "salesforce", "sql"
    origin: str  # the file path, the SOQL, the database host:port
    ok: bool
    rows_sampled: int
    fields: list[FieldRow]
    positive_pct: float | None  # label balance: share of labelled sampled rows whose target is true
    problems: list[str]  # each a sentence saying what to change
    warnings: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _row(stats: FieldStats, columns: dict[str, None]) -> FieldRow:
    missing = stats.missing_fraction
    return FieldRow(
        field=stats.name,
        type=stats.type,
        column=stats.local,
        present=stats.local is not None and stats.local in columns,
        local_type=stats.local_type,
        missing_pct=None if missing is None else round(100 * missing, 2),
        unmapped=[f"{v!r} ({n} row{'s' if n != 1 else ''})" for v, n in stats.unmapped.most_common(_UNMAPPED_SHOWN)],
    )


def check_participant(participant: Participant, task: Task, *, base_dir: Path | None,
                      credentials: Mapping[str, str] | None, sample_rows: int = SAMPLE_ROWS,
                      backoff: Backoff | None = None, pvc_root: Path | None = None) -> CheckReport:
    """Read at most ``sample_rows`` rows of the participant's source and map them; never raises DataError."""
    data = participant.spec.data
    origin = data.kind
    problems: list[str] = []
    warnings: list[str] = []
    mapper: CanonicalMapper | None = None
    try:
        stream = open_source(data, base_dir=base_dir, credentials=credentials, backoff=backoff, pvc_root=pvc_root)
        origin = stream.origin
        mapper = CanonicalMapper(data, task, who=f"participant {participant.identity}", origin=origin,
                                 container=stream.container, empty=stream.empty)
        try:
            for chunk in stream.chunks:
                mapper.feed(chunk.head(sample_rows - mapper.rows))
                if mapper.rows >= sample_rows:
                    break
        finally:
            close = getattr(stream.chunks, "close", None)
            if close is not None:
                close()  # ends a query early: its cursor and connection are released
        problems.extend(mapper.problems())
    except DataError as err:
        problems.append(str(err))
    rows = mapper.rows if mapper else 0
    # Nothing read (no connection, no file): a table of absent columns would only mislead.
    fields = [_row(s, mapper.columns) for s in mapper.stats.values()] if mapper and mapper.columns else []
    positive_pct = None
    if mapper:
        target = mapper.stats[task.target]
        if target.present:
            positive_pct = round(100 * target.positives / target.present, 2)
            if target.positives in (0, target.present):
                warnings.append(
                    f"every labelled sampled row has {task.target}={'true' if target.positives else 'false'}; "
                    f"check spec.data.values.{task.target} maps both outcomes"
                )
        for row in fields:
            if row.present and row.missing_pct is not None and row.missing_pct >= 50 and row.field != task.target:
                warnings.append(f"{row.field} (column {row.column!r}) is missing in {row.missing_pct:g}% of sampled rows")
    return CheckReport(
        participant=participant.identity, source=data.kind, origin=origin, ok=not problems, rows_sampled=rows,
        fields=fields, positive_pct=positive_pct, problems=problems, warnings=warnings,
    )
