"""One federation, three sources: a Salesforce org, a PostgreSQL database and a Parquet file, over real processes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import psycopg
import pytest
import yaml

from fedcrm.data.synthetic import SynthResult
from postgres_server import PASSWORD, PostgresServer
from salesforce_server import FakeSalesforce

pytestmark = pytest.mark.slow

SF_LOGIN = {"username": "etl@initech.example", "password": "sf-pass-9", "securityToken": "SECTOKEN7"}


def api_name(column: str) -> str:
    """A CSV header as a Salesforce custom field / SQL column would spell it: 'Lead Source' -> 'Lead_Source__c'."""
    return re.sub(r"\W+", "_", column).strip("_") + "__c"


def typed(cell: str | None) -> Any:
    """A CSV cell as JSON or SQL would type it: numbers as numbers, blanks as null."""
    if cell is None or cell == "":
        return None
    try:
        return float(cell)
    except ValueError:
        return cell


def _secret(name: str, namespace: str, values: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": namespace}, "stringData": values}


def _renamed(doc: dict[str, Any]) -> dict[str, Any]:
    data = doc["spec"]["data"]
    data.pop("file")
    data["mapping"] = {k: api_name(v) for k, v in data["mapping"].items()}
    return data


@pytest.fixture(scope="module")
def salesforce(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeSalesforce]:
    sf = FakeSalesforce(tmp_path_factory.mktemp("sf"))
    yield sf
    sf.close()


def _as_salesforce(path: Path, frame: pd.DataFrame, sf: FakeSalesforce) -> list[dict[str, Any]]:
    doc = yaml.safe_load(path.read_text())
    columns = [api_name(c) for c in frame.columns]
    sf.org.objects["Lead"] = [
        {"Id": f"00Q{i:012d}", **{api_name(c): typed(v) for c, v in row.items()}, "Owner.Name": f"Rep {i % 5}"}
        for i, row in enumerate(frame.to_dict("records"))
    ]
    sf.org.users[SF_LOGIN["username"]] = SF_LOGIN["password"] + SF_LOGIN["securityToken"]
    data = _renamed(doc)
    data["salesforce"] = {"object": "Lead", "fields": ["Id", *columns, "Owner.Name"], "secretRef": {"name": "sf-login"},
                          "batchSize": 200}
    return [doc, _secret("sf-login", doc["metadata"]["namespace"], SF_LOGIN)]


def _as_postgres(path: Path, frame: pd.DataFrame, pg: PostgresServer) -> list[dict[str, Any]]:
    doc = yaml.safe_load(path.read_text())
    url = pg.create_database("federation_crm")
    target = api_name(doc["spec"]["data"]["mapping"]["converted"]).lower()
    columns = [api_name(c).lower() for c in frame.columns]
    numeric = {c for c, col in zip(columns, frame.columns) if frame[col].map(lambda v: typed(v) is None or isinstance(typed(v), float)).all()}
    lead_columns = [c for c in columns if c != target]
    with psycopg.connect(url.replace("+psycopg", "")) as conn:
        conn.execute("CREATE TABLE leads (id integer PRIMARY KEY, "
                     + ", ".join(f"{c} {'double precision' if c in numeric else 'text'}" for c in lead_columns) + ")")
        conn.execute(f"CREATE TABLE opportunities (id serial PRIMARY KEY, lead_id integer REFERENCES leads(id), {target} text)")
        with conn.cursor() as cur:
            rows = [[typed(v) if c in numeric else (v or None) for c, v in zip(columns, r)] for r in frame.itertuples(index=False)]
            cur.executemany(f"INSERT INTO leads VALUES (%s, {', '.join(['%s'] * len(lead_columns))})",
                            [[i, *(v for c, v in zip(columns, r) if c != target)] for i, r in enumerate(rows)])
            cur.executemany(f"INSERT INTO opportunities (lead_id, {target}) VALUES (%s, %s)",
                            [(i, r[columns.index(target)]) for i, r in enumerate(rows)])
    data = _renamed(doc)
    data["mapping"] = {k: v.lower() for k, v in data["mapping"].items()}
    data["sql"] = {"query": f"SELECT l.*, o.{target} FROM leads l JOIN opportunities o ON o.lead_id = l.id ORDER BY l.id",
                   "secretRef": {"name": "crm-db"}, "chunkRows": 150}
    return [doc, _secret("crm-db", doc["metadata"]["namespace"], {"url": url})]


def _as_parquet(path: Path, frame: pd.DataFrame, out: Path) -> list[dict[str, Any]]:
    doc = yaml.safe_load(path.read_text())
    frame.to_parquet(out / "leads.parquet")
    doc["spec"]["data"]["file"] = {"path": "leads.parquet"}
    return [doc]


def test_salesforce_postgres_and_parquet_participants_train_together(
    small_federation: SynthResult, salesforce: FakeSalesforce, postgres: PostgresServer, tmp_path: Path
) -> None:
    frames = []
    for path in small_federation.participant_paths:
        doc = yaml.safe_load(path.read_text())
        frames.append(pd.read_csv(path.parent / doc["spec"]["data"]["file"]["path"], dtype=str, keep_default_na=False))
    docs = [
        _as_salesforce(small_federation.participant_paths[0], frames[0], salesforce),
        _as_postgres(small_federation.participant_paths[1], frames[1], postgres),
        _as_parquet(small_federation.participant_paths[2], frames[2], tmp_path),
    ]
    manifests = []
    for i, documents in enumerate(docs):
        manifests.append(tmp_path / f"participant-{i}.yaml")
        manifests[-1].write_text(yaml.safe_dump_all(documents, sort_keys=False))
    out = tmp_path / "out"
    env = {**os.environ, **salesforce.env}
    proc = subprocess.run([sys.executable, "-m", "fedcrm.cli.main", "run", "--federation", str(small_federation.federation_path),
                           "--participant", *map(str, manifests), "--test-data", str(small_federation.test_path),
                           "--out", str(out)], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "succeeded" and report["rounds_completed"] == 3
    assert [p["status"] for p in report["participants"]] == ["completed"] * 3
    assert report["metrics"]["accuracy"] > 0.75
    # The Salesforce participant paged through its org, once: its own process checks and keeps what it read.
    assert salesforce.org.queries == 2 and salesforce.org.logins == 1
    # Credentials reached each node as files and left no trace in the outputs.
    assert not (out / "credentials").exists()
    written = "".join(p.read_text(errors="replace") for p in out.rglob("*") if p.is_file() and p.suffix in {".json", ".jsonl", ".md", ".log"})
    for secret in (SF_LOGIN["password"], SF_LOGIN["securityToken"], PASSWORD):
        assert secret not in written and secret not in proc.stdout + proc.stderr
