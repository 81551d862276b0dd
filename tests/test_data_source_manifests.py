"""spec.data sources, Secret references and credentials as files: what the operator and the node rely on."""

from __future__ import annotations

import base64
import stat
from pathlib import Path

import pandas as pd
import pytest
import yaml

from fedcrm.data.canonical import CanonicalMapper
from fedcrm.data.credentials import MOUNT_PATH, read_credentials_dir, write_credentials_dir
from fedcrm.data.files import read_file_chunks
from fedcrm.errors import DataError, ManifestError
from fedcrm.spec import Participant, load_participant, load_participant_manifests, parse_manifest, secret_values
from fedcrm.spec.manifests import DataSource, Feature, Task

BASE = {
    "apiVersion": "fedcrm.io/v1alpha1", "kind": "Participant",
    "metadata": {"name": "acme", "namespace": "tenant-a"},
    "spec": {"federationRef": {"name": "leads", "namespace": "fedcrm-system"}, "data": {"mapping": {"converted": "IsConverted"}}},
}


def _participant(**data: object) -> dict:
    import copy

    doc = copy.deepcopy(BASE)
    doc["spec"]["data"].update(data)
    return doc


def _error(doc: dict) -> str:
    with pytest.raises(ManifestError) as info:
        parse_manifest(doc, Participant, "p.yaml")
    return str(info.value)


def test_exactly_one_source_and_the_secret_name_for_the_operator() -> None:
    sf = {"object": "Lead", "fields": ["Id", "IsConverted"], "secretRef": {"name": "sf-login"}}
    p = parse_manifest(_participant(salesforce=sf), Participant, "p.yaml")
    assert p.spec.credentials_secret_name() == "sf-login" and p.spec.data.kind == "salesforce"
    sql = parse_manifest(_participant(sql={"query": "SELECT 1", "secretRef": {"name": "crm-db"}}), Participant, "p.yaml")
    assert sql.spec.credentials_secret_name() == "crm-db"
    assert parse_manifest(_participant(file={"path": "a.csv"}), Participant, "p.yaml").spec.credentials_secret_name() is None
    assert DataSource.source_kinds() == ["file", "pvc", "salesforce", "sql"]
    assert "spec.data: exactly one data source is needed, one of file, pvc, salesforce, sql; got file and salesforce" in _error(
        _participant(file={"path": "a.csv"}, salesforce=sf))
    assert "none is given" in _error(_participant())


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ({"sql": {"query": "SELECT 1", "secretRef": {"name": "db", "namespace": "tenant-b"}}},
         "spec.data.sql.secretRef: a Participant can only reference a Secret in its own namespace; remove 'namespace'"),
        ({"sql": {"query": "SELECT 1", "secretRef": {"name": "Bad_Name"}}}, "must be a DNS subdomain"),
        ({"sql": {"query": "SELECT 1"}}, "spec.data.sql.secretRef: required field is missing"),
        ({"salesforce": {"object": "Lead", "secretRef": {"name": "s"}}}, "object 'Lead' needs 'fields'"),
        ({"salesforce": {"query": "SELECT Id FROM Lead", "object": "Lead", "secretRef": {"name": "s"}}},
         "give either 'query' (SOQL) or 'object' with 'fields'"),
        ({"salesforce": {"object": "Lead", "fields": ["Owner Name"], "secretRef": {"name": "s"}}}, "is not a Salesforce field name"),
        ({"salesforce": {"query": "SELECT Id FROM Lead", "secretRef": {"name": "s"}, "apiVersion": "v62"}}, "must look like '62.0'"),
        ({"salesforce": {"query": "SELECT Id FROM Lead", "secretRef": {"name": "s"}, "batchsize": 500}},
         "spec.data.salesforce.batchsize: unknown field (did you mean 'batchSize'?)"),
    ],
)
def test_source_mistakes_name_their_path(source: dict, expected: str) -> None:
    assert expected in _error(_participant(**source))


def test_a_participant_file_may_carry_its_secret(tmp_path: Path) -> None:
    doc = _participant(sql={"query": "SELECT 1", "secretRef": {"name": "crm-db"}})
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "crm-db", "namespace": "tenant-a"},
              "data": {"url": base64.b64encode(b"postgresql://u:p@db/crm").decode()}, "stringData": {"extra": "x"}}
    path = tmp_path / "acme.yaml"
    path.write_text(yaml.safe_dump_all([doc, secret]))
    assert load_participant(path).identity == "tenant-a/acme"  # the node reads the Participant and skips the Secret
    manifests = load_participant_manifests([path])
    participant = manifests.participants[0][0]
    assert secret_values(participant, manifests.secrets) == {"url": "postgresql://u:p@db/crm", "extra": "x"}
    assert "postgresql://u:p" not in repr(manifests.secrets)
    secret["data"]["url"] = "not base64!"
    path.write_text(yaml.safe_dump_all([doc, secret]))
    with pytest.raises(ManifestError, match="data.url: not valid base64"):
        load_participant_manifests([path])


def test_credentials_are_private_files_in_the_mounted_secret_layout(tmp_path: Path) -> None:
    assert MOUNT_PATH == "/var/run/secrets/fedcrm/credentials"
    folder = write_credentials_dir(tmp_path / "creds", {"username": "etl", "password": "pw\n"})
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in folder.iterdir())
    # Kubernetes' atomic writer keeps the real files under ..data and links the keys to them.
    (folder / "..data").mkdir()
    (folder / "..data" / "junk").write_text("x")
    creds = read_credentials_dir(folder, origin="Secret tenant-a/sf")
    assert dict(creds) == {"password": "pw", "username": "etl"}
    assert "pw" not in repr(creds).replace("password", "")
    with pytest.raises(DataError, match="does not exist; mount the Participant's Secret there"):
        read_credentials_dir(tmp_path / "nope")


def test_files_stream_in_chunks_and_problems_count_over_all_of_them(tmp_path: Path) -> None:
    path = tmp_path / "leads.csv"
    path.write_text("Industry,Won\n" + "Tech,yes\nRetail,no\nMining,yes\n" * 5)
    chunks = list(read_file_chunks(path, None, chunk_rows=4))
    assert [len(c) for c in chunks] == [4, 4, 4, 3]
    task = Task(target="converted", features=[Feature(name="industry", type="categorical", categories=["tech", "retail"])])
    source = DataSource.model_validate({"file": {"path": "leads.csv"}, "mapping": {"industry": "Industry", "converted": "Won"},
                                        "values": {"industry": {"Tech": "tech", "Retail": "retail"}}})
    mapper = CanonicalMapper(source, task, who="participant t/p", origin=path)
    for chunk in chunks:
        mapper.feed(chunk)
    assert mapper.problems() == [
        "column 'Industry' (canonical 'industry') has values with no mapping: 'Mining' (5 rows); "
        "map each to one of ['tech', 'retail'] in spec.data.values.industry"
    ]
    pd.DataFrame({"Industry": ["Tech"], "Won": [True]}).to_parquet(tmp_path / "one.parquet")
    assert len(list(read_file_chunks(tmp_path / "one.parquet", None))[0]) == 1
