"""Mapping a participant's own columns, spellings and units onto the canonical schema."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedcrm.data.loaders import load_canonical_file, load_participant_data, read_table
from fedcrm.errors import DataError
from fedcrm.spec.manifests import DataSource, Feature, FileSource, Participant, Task, ValueTransform

TASK = Task(
    target="converted",
    features=[
        Feature(name="industry", type="categorical", categories=["technology", "retail"]),
        Feature(name="revenue", type="numeric"),
        Feature(name="budget_confirmed", type="boolean"),
        Feature(name="web_visits", type="numeric"),
    ],
)

CSV = """Company,Industry,Revenue (k$),Budget,Won
Acme,Tech,1.5,Y,Closed Won
Globex,RETAIL,,n,Open
Initech,Tech,2,,Closed Won
Hooli,retail,0.25,TRUE,
"""


def _participant(tmp_path: Path, csv: str = CSV, **data: object) -> Participant:
    (tmp_path / "leads.csv").write_text(csv)
    source = {
        "file": {"path": "leads.csv"},
        "mapping": {"industry": "Industry", "revenue": "Revenue (k$)", "budget_confirmed": "Budget", "converted": "Won"},
        "values": {"industry": {"Tech": "technology", "RETAIL": "retail"}, "converted": {"Closed Won": True, "Open": False}},
        "transforms": {"revenue": {"scale": 1000}},
    }
    source.update(data)
    return Participant.model_validate({
        "metadata": {"name": "acme", "namespace": "tenant-a"},
        "spec": {"federationRef": {"name": "f"}, "data": source},
    })


def _load(tmp_path: Path, **kw: object) -> pd.DataFrame:
    return load_participant_data(_participant(tmp_path, **kw), TASK, base_dir=tmp_path).frame


def test_mapping_values_units_and_missing_cells(tmp_path: Path) -> None:
    data = load_participant_data(_participant(tmp_path), TASK, base_dir=tmp_path)
    f = data.frame
    assert list(f.columns) == ["industry", "revenue", "budget_confirmed", "web_visits", "converted"]
    assert f["industry"].tolist() == ["technology", "retail", "technology"]
    assert f["revenue"].tolist()[0] == 1500.0 and np.isnan(f["revenue"][1]) and f["revenue"][2] == 2000.0
    assert f["budget_confirmed"].tolist()[:2] == [1.0, 0.0] and np.isnan(f["budget_confirmed"][2])
    assert f["web_visits"].isna().all()  # not mapped: missing at this participant
    assert f["converted"].tolist() == [1, 0, 1]
    assert data.dropped_unlabelled == 1  # Hooli had no label
    assert "dropped 1 row(s) with an empty target" in data.notes[0]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"mapping": {"industry": "Industy", "converted": "Won"}}, "column 'Industy' (mapped to 'industry') is not in the file; did you mean 'Industry'?"),
        ({"mapping": {"industri": "Industry", "converted": "Won"}}, "spec.data.mapping.industri: 'industri' is not a canonical field of this federation (did you mean 'industry'?)"),
        ({"mapping": {"industry": "Industry"}}, "the target 'converted' is not mapped"),
        ({"values": {"converted": {"Closed Won": True, "Open": False}}}, "column 'Industry' (canonical 'industry') has values with no mapping: 'Tech' (2 rows), 'RETAIL' (1 row)"),
        ({"values": {"industry": {"Tech": "technology", "RETAIL": "retail"}}}, "column 'Won' (canonical 'converted', boolean) has values with no mapping: 'Closed Won' (2 rows), 'Open' (1 row)"),
        ({"transforms": {"industry": {"scale": 2}}}, "spec.data.transforms.industry: transforms apply to numeric fields only"),
    ],
)
def test_each_mistake_is_named_with_what_to_do(tmp_path: Path, change: dict, expected: str) -> None:
    with pytest.raises(DataError) as info:
        _load(tmp_path, **change)
    message = str(info.value)
    assert message.startswith("participant tenant-a/acme (")
    assert expected in message


def test_wrong_types_are_reported_with_examples(tmp_path: Path) -> None:
    csv = CSV.replace("1.5,Y", "lots,Y").replace("0.25,TRUE", "n/a,maybe")
    with pytest.raises(DataError) as info:
        _load(tmp_path, csv=csv)
    msg = str(info.value)
    assert "column 'Revenue (k$)' (canonical 'revenue', numeric) has non-numeric values: 'lots' (1 row), 'n/a' (1 row)" in msg
    assert "column 'Budget' (canonical 'budget_confirmed', boolean) has values with no mapping: 'maybe' (1 row)" in msg


def test_all_problems_come_in_one_message(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        _load(tmp_path, mapping={"industry": "Sector", "revenue": "Revenue", "converted": "Won"})
    assert str(info.value).count("is not in the file") == 2


@pytest.mark.parametrize(("content", "expected"), [("", "is empty"), ("a,b\n", "the file has no rows")])
def test_empty_files(tmp_path: Path, content: str, expected: str) -> None:
    with pytest.raises(DataError, match=expected):
        _load(tmp_path, csv=content)


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist; check spec.data.file.path"):
        read_table(tmp_path / "nope.csv", None, who="participant x")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="cannot read .*bad.parquet as PARQUET"):
        read_table(tmp_path / "bad.parquet", None, who="participant x")
    with pytest.raises(DataError, match="is a folder"):
        read_table(tmp_path, "csv", who="participant x")


def test_no_labelled_rows_is_an_error(tmp_path: Path) -> None:
    csv = "Industry,Won\nTech,\nRETAIL,\n"
    with pytest.raises(DataError, match="no row has a value for the target 'converted'"):
        _load(tmp_path, csv=csv, mapping={"industry": "Industry", "converted": "Won"}, transforms={})


def test_parquet_with_native_types(tmp_path: Path) -> None:
    frame = pd.DataFrame({
        "sector": ["technology", None, "retail"],
        "rev": [1.0, 2.0, None],
        "budget": [True, False, True],
        "label": ["yes", "NO", "Yes"],
    })
    frame.to_parquet(tmp_path / "leads.parquet")
    participant = Participant.model_validate({
        "metadata": {"name": "p", "namespace": "t"},
        "spec": {"federationRef": {"name": "f"}, "data": {
            "file": {"path": "leads.parquet"},
            "mapping": {"industry": "sector", "revenue": "rev", "budget_confirmed": "budget", "converted": "label"},
        }},
    })
    f = load_participant_data(participant, TASK, base_dir=tmp_path).frame
    assert f["industry"].tolist() == ["technology", None, "retail"]
    assert f["budget_confirmed"].tolist() == [1.0, 0.0, 1.0]
    assert f["converted"].tolist() == [1, 0, 1]  # yes/no in any case


def test_canonical_booleans_accept_common_spellings(tmp_path: Path) -> None:
    path = tmp_path / "test.csv"
    path.write_text("industry,revenue,budget_confirmed,web_visits,converted\n"
                    "technology,1,TRUE,3,1\nretail,2,no,,False\ntechnology,3,1,4,yes\nretail,4,Yes,5,0\n")
    f = load_canonical_file(path, TASK).frame
    assert f["budget_confirmed"].tolist() == [1.0, 0.0, 1.0, 1.0]
    assert f["converted"].tolist() == [1, 0, 1, 0]
    assert np.isnan(f["web_visits"][1])


def test_relative_paths_resolve_against_the_manifest_folder(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    participant = _participant(tmp_path / "data")
    moved = participant.model_copy(update={"spec": participant.spec.model_copy(update={
        "data": DataSource(file=FileSource(path="data/leads.csv"), mapping=participant.spec.data.mapping,
                           values=participant.spec.data.values, transforms={"revenue": ValueTransform(scale=1000)})})})
    assert len(load_participant_data(moved, TASK, base_dir=tmp_path)) == 3
