"""Reading CRM rows from a real PostgreSQL server: leads joined with opportunities and cases, in chunks."""

from __future__ import annotations

import json
import logging
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from fedcrm.data.credentials import Credentials
from fedcrm.data.loaders import load_participant_data
from fedcrm.data.retries import Backoff
from fedcrm.errors import DataError
from fedcrm.spec.manifests import Feature, Participant, Task
from postgres_server import PASSWORD, PostgresServer, free_port

TASK = Task(
    target="converted",
    features=[
        Feature(name="lead_source", type="categorical", categories=["web", "phone", "partner"]),
        Feature(name="company_size", type="numeric"),
        Feature(name="annual_revenue", type="numeric"),
        Feature(name="budget_confirmed", type="boolean"),
        Feature(name="open_cases", type="numeric"),
        Feature(name="escalated_case", type="boolean"),
    ],
)
QUERY = """
SELECT l.lead_source, l.employees, l.annual_revenue, l.budget_confirmed,
       count(c.id) FILTER (WHERE c.status <> 'Closed') AS open_cases,
       coalesce(bool_or(c.escalated), false) AS escalated,
       o.stage
FROM leads l
JOIN opportunities o ON o.lead_id = l.id
LEFT JOIN cases c ON c.lead_id = l.id
GROUP BY l.id, o.id
ORDER BY l.id
"""
MAPPING = {"lead_source": "lead_source", "company_size": "employees", "annual_revenue": "annual_revenue",
           "budget_confirmed": "budget_confirmed", "open_cases": "open_cases", "escalated_case": "escalated",
           "converted": "stage"}
VALUES = {"lead_source": {"Web": "web", "Phone Inquiry": "phone", "Partner Referral": "partner"},
          "converted": {"Closed Won": True, "Closed Lost": False}}
FAST = Backoff(attempts=3, first=0.01)
ROWS = 240

SCHEMA = """
CREATE TABLE leads (id serial PRIMARY KEY, company text NOT NULL, lead_source text, employees integer,
                    annual_revenue numeric(14, 2), budget_confirmed boolean, created_at timestamptz NOT NULL);
CREATE TABLE opportunities (id serial PRIMARY KEY, lead_id integer NOT NULL REFERENCES leads(id),
                            amount numeric(14, 2), stage text NOT NULL, close_date date);
CREATE TABLE cases (id serial PRIMARY KEY, lead_id integer NOT NULL REFERENCES leads(id), status text NOT NULL,
                    escalated boolean NOT NULL);
"""


def fill_crm(url: str, rows: int, seed: int = 5) -> list[dict[str, Any]]:
    """A CRM-like schema with ``rows`` leads, one opportunity each and zero to three cases; returns the leads."""
    rng = random.Random(seed)
    leads = []
    with psycopg.connect(url.replace("+psycopg", "")) as conn:
        conn.execute("DROP TABLE IF EXISTS cases, opportunities, leads")
        conn.execute(SCHEMA)
        for i in range(1, rows + 1):
            lead = {"source": rng.choice(["Web", "Phone Inquiry", "Partner Referral", None]),
                    "employees": rng.choice([None, rng.randint(3, 9000)]),
                    "revenue": rng.choice([None, round(rng.uniform(1e4, 1e7), 2)]), "budget": rng.choice([True, False, None]),
                    "won": rng.random() < 0.4, "cases": [(rng.choice(["New", "Working", "Closed"]), rng.random() < 0.2)
                                                        for _ in range(rng.randint(0, 3))]}
            conn.execute("INSERT INTO leads (company, lead_source, employees, annual_revenue, budget_confirmed, created_at) "
                         "VALUES (%s, %s, %s, %s, %s, now())", (f"Company {i}", lead["source"], lead["employees"],
                                                                  lead["revenue"], lead["budget"]))
            conn.execute("INSERT INTO opportunities (lead_id, amount, stage, close_date) VALUES (%s, %s, %s, current_date)",
                         (i, rng.randint(1000, 90000), "Closed Won" if lead["won"] else "Closed Lost"))
            for status, escalated in lead["cases"]:
                conn.execute("INSERT INTO cases (lead_id, status, escalated) VALUES (%s, %s, %s)", (i, status, escalated))
            leads.append(lead)
    return leads


@pytest.fixture(scope="module")
def crm(postgres: PostgresServer) -> list[dict[str, Any]]:
    return fill_crm(postgres.url, ROWS)


def participant(query: str = QUERY, **data: Any) -> Participant:
    return Participant.model_validate({
        "metadata": {"name": "globex", "namespace": "tenant-b"},
        "spec": {"federationRef": {"name": "f"}, "data": {
            "sql": {"query": query, "secretRef": {"name": "crm-db"}, "chunkRows": 50},
            "mapping": MAPPING, "values": VALUES, **data}},
    })


def load(p: Participant, url: str) -> Any:
    return load_participant_data(p, TASK, base_dir=None, credentials=Credentials({"url": url}, origin="Secret tenant-b/crm-db"),
                                 backoff=FAST)


def test_a_joined_query_is_read_in_chunks_and_mapped(postgres: PostgresServer, crm: list[dict[str, Any]]) -> None:
    f = load(participant(), postgres.url).frame
    assert len(f) == ROWS  # 5 chunks of 50 rows
    assert f["converted"].tolist() == [int(lead["won"]) for lead in crm]
    assert f["open_cases"].tolist() == [float(sum(s != "Closed" for s, _ in lead["cases"])) for lead in crm]
    assert f["escalated_case"].tolist() == [float(any(e for _, e in lead["cases"])) for lead in crm]
    revenue = [None if v != v else v for v in f["annual_revenue"].tolist()]  # numeric(14,2) arrives as float
    assert revenue == [lead["revenue"] for lead in crm]
    budget = [None if v != v else bool(v) for v in f["budget_confirmed"].tolist()]
    assert budget == [lead["budget"] for lead in crm]
    assert f["lead_source"].isna().sum() == sum(lead["source"] is None for lead in crm)


def test_a_query_returning_zero_rows_is_a_clear_failure(postgres: PostgresServer, crm: list[dict[str, Any]]) -> None:
    empty = QUERY.replace("GROUP BY", "WHERE l.company = 'nobody' GROUP BY")
    with pytest.raises(DataError, match=r"(?s)^participant tenant-b/globex.*the SQL query returned no rows; check spec.data.sql.query"):
        load(participant(empty), postgres.url)


def test_a_query_the_database_rejects_names_the_field_to_fix(postgres: PostgresServer, crm: list[dict[str, Any]]) -> None:
    with pytest.raises(DataError) as info:
        load(participant(QUERY.replace("l.employees", "l.headcount")), postgres.url)
    message = str(info.value)
    assert 'column l.headcount does not exist' in message and "check spec.data.sql.query" in message
    assert PASSWORD not in message


def test_a_database_that_is_down_is_retried_then_named_without_the_password(
    postgres: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()  # nothing listens here
    with caplog.at_level(logging.WARNING, logger="fedcrm.data"), pytest.raises(DataError) as info:
        load(participant(), postgres.url_for(port=port))
    message = str(info.value)
    assert f"cannot connect to the SQL database at postgresql+psycopg://127.0.0.1:{port}/crm after 3 attempts" in message
    assert "\n" not in message and PASSWORD not in message
    retries = [r.getMessage() for r in caplog.records if "connecting to" in r.getMessage()]
    assert len(retries) == 2 and all(PASSWORD not in r for r in retries)


def test_a_wrong_password_and_a_bad_url(postgres: PostgresServer, crm: list[dict[str, Any]]) -> None:
    with pytest.raises(DataError, match="password authentication failed") as info:
        load(participant(), postgres.url.replace(PASSWORD, "wrong-pw"))
    assert "wrong-pw" not in str(info.value)
    with pytest.raises(DataError, match="key 'url' is not a SQLAlchemy URL"):
        load(participant(), "not a url")
    with pytest.raises(DataError, match="has no key 'url'"):
        load_participant_data(participant(), TASK, base_dir=None, credentials={"uri": postgres.url})


def _secret(name: str, namespace: str, **values: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": namespace}, "stringData": values}


def test_data_check_reports_per_field_and_exits_non_zero_on_problems(
    postgres: PostgresServer, crm: list[dict[str, Any]], small_federation: Any, tmp_path: Path
) -> None:
    fed = yaml.safe_load(small_federation.federation_path.read_text())
    fed["spec"]["task"] = TASK.model_dump(mode="json", exclude_defaults=True)
    fed["spec"]["participants"]["namespaces"].append("tenant-b")
    (tmp_path / "fed.yaml").write_text(yaml.safe_dump(fed))
    p = participant().model_dump(mode="json", by_alias=True, exclude_none=True)
    p["spec"]["federationRef"] = {"name": fed["metadata"]["name"], "namespace": fed["metadata"]["namespace"]}
    manifest = tmp_path / "globex.yaml"
    manifest.write_text(yaml.safe_dump_all([p, _secret("crm-db", "tenant-b", url=postgres.url)]))
    check = [sys.executable, "-m", "fedcrm.cli.main", "data", "check", "--federation", str(tmp_path / "fed.yaml"),
             "--participant", str(manifest)]
    proc = subprocess.run([*check, "--json", "--rows", "100"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    report = json.loads(proc.stdout)["participants"][0]
    assert report["ok"] and report["rows_sampled"] == 100 and report["problems"] == []
    assert report["origin"] == f"SQL postgresql+psycopg://127.0.0.1:{postgres.port}/crm"
    rows = {r["field"]: r for r in report["fields"]}
    assert rows["open_cases"]["present"] and rows["open_cases"]["local_type"] == "integer"
    assert rows["annual_revenue"]["local_type"] == "floating" and 0 < rows["annual_revenue"]["missing_pct"] < 100
    assert 0 < report["positive_pct"] < 100
    assert PASSWORD not in proc.stdout + proc.stderr

    p["spec"]["data"]["values"]["lead_source"] = {"Web": "web"}
    manifest.write_text(yaml.safe_dump_all([p, _secret("crm-db", "tenant-b", url=postgres.url)]))
    proc = subprocess.run(check, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr + proc.stdout
    assert "problem: column 'lead_source' (canonical 'lead_source') has values with no mapping: 'Phone Inquiry'" in proc.stdout
    assert "unmapped values" in proc.stdout and "label balance:" in proc.stdout

    manifest.write_text(yaml.safe_dump_all([p, _secret("crm-db", "tenant-c", url=postgres.url)]))
    proc = subprocess.run(check, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "no Secret of that name in namespace 'tenant-b' was given" in proc.stderr
    assert "found tenant-c/crm-db: a Participant only sees Secrets of its own namespace" in proc.stderr
