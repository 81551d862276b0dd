"""Reading leads from a Salesforce org: real simple-salesforce requests against a local org over HTTPS."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from fedcrm.data.credentials import Credentials
from fedcrm.data.loaders import load_participant_data
from fedcrm.data.retries import Backoff
from fedcrm.data.salesforce import flatten_record
from fedcrm.errors import DataError
from fedcrm.spec.manifests import Feature, Participant, Task
from salesforce_server import INSTANCE_HOST, FakeSalesforce

TASK = Task(
    target="converted",
    features=[
        Feature(name="lead_source", type="categorical", categories=["web", "phone", "partner", "other"]),
        Feature(name="industry", type="categorical", categories=["technology", "retail", "finance"]),
        Feature(name="company_size", type="numeric"),
        Feature(name="annual_revenue", type="numeric"),
        Feature(name="region", type="categorical", categories=["emea", "amer"]),
        Feature(name="budget_confirmed", type="boolean"),
    ],
)
MAPPING = {
    "lead_source": "LeadSource", "industry": "Industry", "company_size": "NumberOfEmployees",
    "annual_revenue": "AnnualRevenue", "region": "Owner.UserRole.Name", "budget_confirmed": "Budget_Confirmed__c",
    "converted": "IsConverted",
}
VALUES = {
    "lead_source": {"Web": "web", "Phone Inquiry": "phone", "Partner Referral": "partner", "Other": "other"},
    "industry": {"Technology": "technology", "Retail": "retail", "Finance": "finance"},
    "region": {"EMEA Sales": "emea", "Americas Sales": "amer"},
}
FIELDS = ["Id", "Company", *MAPPING.values(), "CreatedDate"]
FAST = Backoff(attempts=3, first=0.01)
PASSWORD_LOGIN = {"username": "etl@acme.example", "password": "hunter2", "securityToken": "TOKEN123"}


def leads(n: int, seed: int = 3) -> list[dict[str, Any]]:
    """Lead records as Salesforce stores them: picklists, nulls, booleans, dates, an owner with an optional role."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        role = rng.choice(["EMEA Sales", "Americas Sales", None])
        out.append({
            "Id": f"00Q5g00000{i:08d}", "Company": f"Company {i}",
            "LeadSource": rng.choice(["Web", "Phone Inquiry", "Partner Referral", "Other", None]),
            "Industry": rng.choice(["Technology", "Retail", "Finance"]),
            "NumberOfEmployees": rng.choice([None, rng.randint(5, 5000)]),
            "AnnualRevenue": rng.choice([None, round(rng.uniform(1e5, 5e7), 2)]),
            "Budget_Confirmed__c": rng.random() < 0.5,
            "IsConverted": rng.random() < 0.35,
            "CreatedDate": f"2024-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}T10:15:00.000+0000",
            "Owner.Name": f"Rep {i % 7}",
            # Some owners have no role: the relationship itself is null.
            "Owner.UserRole": None if role is None else {}, "Owner.UserRole.Name": role,
        })
    return out


@pytest.fixture(scope="module")
def salesforce(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeSalesforce]:
    sf = FakeSalesforce(tmp_path_factory.mktemp("salesforce"))
    sf.org.objects["Lead"] = leads(450)
    sf.org.objects["Case"] = []
    sf.org.users[PASSWORD_LOGIN["username"]] = PASSWORD_LOGIN["password"] + PASSWORD_LOGIN["securityToken"]
    yield sf
    sf.close()


@pytest.fixture
def org(salesforce: FakeSalesforce, monkeypatch: pytest.MonkeyPatch) -> FakeSalesforce:
    for key, value in salesforce.env.items():
        monkeypatch.setenv(key, value)
    o = salesforce.org
    o.rate_limited_requests, o.expire_sessions_after, o.logins, o.queries = 0, None, 0, 0
    o.connect_hosts.clear()
    return salesforce


def participant(**salesforce: Any) -> Participant:
    source = {"object": "Lead", "fields": FIELDS, "secretRef": {"name": "sf-login"}, "batchSize": 200, **salesforce}
    return Participant.model_validate({
        "metadata": {"name": "acme", "namespace": "tenant-a"},
        "spec": {"federationRef": {"name": "f"}, "data": {"salesforce": source, "mapping": MAPPING, "values": VALUES}},
    })


def load(p: Participant, creds: dict[str, str]) -> Any:
    return load_participant_data(p, TASK, base_dir=None, credentials=Credentials(creds, origin="Secret tenant-a/sf-login"),
                                 backoff=FAST)


def test_pages_relationships_nulls_and_booleans_arrive_mapped(org: FakeSalesforce) -> None:
    data = load(participant(), PASSWORD_LOGIN)
    source = org.org.objects["Lead"]
    f = data.frame
    assert len(f) == 450  # three pages of 200, 200 and 50 records
    assert org.org.queries == 3 and org.org.logins == 1
    assert set(org.org.connect_hosts) == {"login.salesforce.com", INSTANCE_HOST}  # the client's real hosts
    assert f["converted"].tolist() == [int(r["IsConverted"]) for r in source]
    assert f["budget_confirmed"].tolist() == [float(r["Budget_Confirmed__c"]) for r in source]
    regions = {"EMEA Sales": "emea", "Americas Sales": "amer", None: None}
    assert f["region"].tolist() == [regions[r["Owner.UserRole.Name"]] for r in source]  # null relationship -> missing
    sizes = [r["NumberOfEmployees"] for r in source]
    assert [None if v != v else v for v in f["company_size"].tolist()] == sizes
    assert f["lead_source"].isna().sum() == sum(r["LeadSource"] is None for r in source)


def test_soql_query_and_relationship_flattening() -> None:
    record = {"attributes": {"type": "Lead"}, "Id": "1", "Owner": {"attributes": {"type": "User"}, "Name": "Ana",
                                                                  "UserRole": None}}
    assert flatten_record(record) == {"Id": "1", "Owner.Name": "Ana", "Owner.UserRole": None}
    p = participant(object=None, fields=None, query="SELECT Id, LeadSource FROM Lead WHERE IsConverted = true")
    assert p.spec.data.salesforce.soql().endswith("IsConverted = true")


def test_jwt_bearer_login(org: FakeSalesforce) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    org.org.jwt_apps["3MVG9-consumer"] = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    creds = {"username": PASSWORD_LOGIN["username"], "consumerKey": "3MVG9-consumer", "privateKey": pem}
    data = load(participant(), creds)
    assert len(data) == 450 and org.org.logins == 1
    with pytest.raises(DataError, match="privateKey is not a usable RSA private key in PEM form"):
        load(participant(), {**creds, "privateKey": "-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----"})


def test_an_expired_session_logs_in_again_when_the_secret_allows(org: FakeSalesforce) -> None:
    org.org.expire_sessions_after = 2  # the session dies after the second page
    assert len(load(participant(), PASSWORD_LOGIN)) == 450
    assert org.org.logins == 2


def test_an_expired_access_token_asks_for_a_fresh_one(org: FakeSalesforce) -> None:
    creds = {"instanceUrl": f"https://{INSTANCE_HOST}", "accessToken": "00D5g000004Xyz!expired"}
    with pytest.raises(DataError) as info:
        load(participant(), creds)
    message = str(info.value)
    assert message.startswith("participant tenant-a/acme")
    assert "INVALID_SESSION_ID: Session expired or invalid" in message
    assert "put a fresh accessToken in the Secret" in message and "expired" not in creds.get("password", "")
    # A valid token reads the org directly, no login.
    creds["accessToken"] = org.org.new_token()
    assert len(load(participant(), creds)) == 450 and org.org.logins == 0


def test_a_ca_bundle_in_the_secret_replaces_the_public_cas(org: FakeSalesforce, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REQUESTS_CA_BUNDLE")  # the org's certificate is then signed by a CA nobody trusts
    creds = {"instanceUrl": f"https://{INSTANCE_HOST}", "accessToken": org.org.new_token()}
    with pytest.raises(DataError, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
        load(participant(), creds)
    assert len(load(participant(), {**creds, "caBundle": org.ca_path.read_text()})) == 450
    with pytest.raises(DataError, match="key 'caBundle' holds no PEM certificate; put the CA certificate"):
        load(participant(), {**creds, "caBundle": "not a certificate"})


def test_a_wrong_password_names_the_secret_and_salesforce_code(org: FakeSalesforce) -> None:
    with pytest.raises(DataError, match=r"refused the password login from Secret tenant-a/sf-login \(INVALID_LOGIN: "):
        load(participant(), {**PASSWORD_LOGIN, "password": "wrong"})
    with pytest.raises(DataError, match="no complete Salesforce login; it needs one of: access token: instanceUrl"):
        load(participant(), {"username": "x"})


def test_a_soql_error_shows_salesforce_error_code_and_the_field_to_fix(org: FakeSalesforce) -> None:
    with pytest.raises(DataError) as info:
        load(participant(fields=[*FIELDS, "Budget__c"]), PASSWORD_LOGIN)
    message = str(info.value)
    assert "participant tenant-a/acme" in message and "spec.data.salesforce.object/fields/where" in message
    assert "(INVALID_FIELD: " in message and "No such column 'Budget__c' on entity 'Lead'" in message
    with pytest.raises(DataError, match=r"spec.data.salesforce.query \(INVALID_TYPE: .*sObject type 'Leads' is not supported"):
        load(participant(object=None, fields=None, query="SELECT Id FROM Leads"), PASSWORD_LOGIN)


def test_a_query_returning_zero_rows_is_a_clear_failure(org: FakeSalesforce) -> None:
    with pytest.raises(DataError, match="the Salesforce query returned no rows; check spec.data.salesforce"):
        load(participant(where="LeadSource = 'Trade Show'"), PASSWORD_LOGIN)


def test_rate_limits_are_retried_with_backoff_then_reported(org: FakeSalesforce, caplog: pytest.LogCaptureFixture) -> None:
    org.org.rate_limited_requests = 2
    with caplog.at_level(logging.WARNING, logger="fedcrm.data"):
        assert len(load(participant(), PASSWORD_LOGIN)) == 450
    assert sum("REQUEST_LIMIT_EXCEEDED" in r.getMessage() or "Limit exceeded" in r.getMessage() for r in caplog.records) >= 2
    org.org.rate_limited_requests = 10
    with pytest.raises(DataError, match=r"rate limit \(REQUEST_LIMIT_EXCEEDED: TotalRequests Limit exceeded.\)"):
        load(participant(), PASSWORD_LOGIN)
    assert org.org.rate_limited_requests == 10 - FAST.attempts  # bounded: exactly `attempts` tries


def test_unmapped_picklist_values_are_counted_across_pages(org: FakeSalesforce) -> None:
    p = participant()
    data = p.spec.data.model_copy(update={"values": {**VALUES, "lead_source": {"Web": "web"}}})
    p = p.model_copy(update={"spec": p.spec.model_copy(update={"data": data})})
    with pytest.raises(DataError) as info:
        load(p, PASSWORD_LOGIN)
    total = sum(r["LeadSource"] == "Phone Inquiry" for r in org.org.objects["Lead"])
    assert f"'Phone Inquiry' ({total} rows)" in str(info.value)  # counted over all three pages
    assert "is not in the query result" not in str(info.value)


def test_a_source_with_a_secret_needs_credentials() -> None:
    with pytest.raises(DataError, match="secretRef names Secret 'sf-login' but no credentials were given"):
        load_participant_data(participant(), TASK, base_dir=None, credentials=None)


def test_secret_values_never_reach_messages(org: FakeSalesforce, tmp_path: Path) -> None:
    creds = Credentials({**PASSWORD_LOGIN, "password": "wrong-pass"}, origin="Secret tenant-a/sf-login")
    assert "wrong-pass" not in repr(creds) and "TOKEN123" not in str(creds)
    with pytest.raises(DataError) as info:
        load(participant(), dict(creds))
    assert "wrong-pass" not in str(info.value)
