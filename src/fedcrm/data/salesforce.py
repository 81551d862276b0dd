"""Reading records from a Salesforce org: SOQL through the REST query API, page by page.

Login and paging use ``simple-salesforce``. Each page (``query`` then
``queryMore`` through ``nextRecordsUrl``) becomes one DataFrame chunk for the
canonical mapping, so an org's export is never held as one list. Records are
flattened as Salesforce returns them: ``attributes`` dropped, relationship
fields (``Owner: {Name: ...}``) become dotted columns (``Owner.Name``), JSON
null stays missing, booleans stay booleans, dates stay ISO text.

Failures a tenant can fix name Salesforce's ``errorCode``, its message, and the
manifest field or Secret to change. Rate limits (``REQUEST_LIMIT_EXCEEDED``,
HTTP 429/503) are retried with bounded backoff. An expired session is renewed
by logging in again when the Secret holds a password or JWT key; an access
token cannot be renewed here, so that fails with a request to refresh it.
An optional ``caBundle`` key in the Secret replaces the public CAs for the
org's certificate (a private endpoint or a TLS-inspecting proxy).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

import jwt
import pandas as pd
import requests
import simple_salesforce
from cryptography import x509
from simple_salesforce import exceptions as sf_errors

from fedcrm.data.credentials import Credentials
from fedcrm.data.retries import Backoff, with_backoff
from fedcrm.errors import DataError
from fedcrm.spec.manifests import SalesforceSource

__all__ = ["CA_BUNDLE_KEY", "LOGIN_KINDS", "flatten_record", "login", "read_pages"]

# Login kind -> the Secret keys it needs, in the order a person fills them in.
LOGIN_KINDS: dict[str, tuple[str, ...]] = {
    "access token": ("instanceUrl", "accessToken"),
    "password": ("username", "password", "securityToken"),
    "JWT bearer": ("username", "consumerKey", "privateKey"),
}
# Optional Secret key: PEM CA certificate(s) to trust instead of the public ones.
CA_BUNDLE_KEY = "caBundle"
_RATE_LIMIT_CODES = {"REQUEST_LIMIT_EXCEEDED", "TOO_MANY_REQUESTS", "SERVER_UNAVAILABLE"}


def _login_kind(creds: Mapping[str, str], origin: str) -> str:
    complete = [kind for kind, keys in LOGIN_KINDS.items() if all(k in creds for k in keys)]
    # JWT and password share 'username'; a full password set wins only without a private key.
    if "JWT bearer" in complete and "privateKey" in creds:
        return "JWT bearer"
    if complete:
        return complete[0]
    expected = "; ".join(f"{kind}: {' + '.join(keys)}" for kind, keys in LOGIN_KINDS.items())
    raise DataError(
        f"{origin} has keys {', '.join(sorted(creds)) or '(none)'}, which is no complete Salesforce login; "
        f"it needs one of: {expected}"
    )


def _session(creds: Credentials) -> requests.Session:
    """An HTTPS session that trusts the public CAs, or only ``caBundle`` when the Secret has one.

    A TLS-inspecting egress proxy, a private endpoint or a test org presents a
    certificate of the company's own CA; without this the connector could only
    fail certificate verification."""
    if CA_BUNDLE_KEY not in creds:
        return requests.Session()
    session = _PinnedCaSession()
    session.verify = _ca_bundle_file(creds[CA_BUNDLE_KEY], creds.origin)
    return session


class _PinnedCaSession(requests.Session):
    """requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE override a session's own CA bundle; the Secret's wins here
    (proxy variables still apply)."""

    def merge_environment_settings(self, url: Any, proxies: Any, stream: Any, verify: Any, cert: Any) -> dict[str, Any]:
        settings: dict[str, Any] = super().merge_environment_settings(url, proxies, stream, verify, cert)
        settings["verify"] = self.verify
        return settings


def _ca_bundle_file(pem: str, origin: str) -> str:
    """``caBundle`` checked (PEM certificates) and written where requests can read it (the pod's /tmp)."""
    try:
        certificates = x509.load_pem_x509_certificates(pem.encode())
    except ValueError:
        certificates = []
    if not certificates:
        raise DataError(f"{origin}: key {CA_BUNDLE_KEY!r} holds no PEM certificate; put the CA certificate(s) that "
                        "sign your Salesforce endpoint there, or remove the key to trust the public CAs")
    handle, path = tempfile.mkstemp(prefix="fedcrm-salesforce-ca-", suffix=".pem")
    with os.fdopen(handle, "w") as out:
        out.write(pem)
    return path


def login(source: SalesforceSource, creds: Credentials) -> tuple[simple_salesforce.Salesforce, str]:
    """A logged-in client and the login kind used (for messages)."""
    kind = _login_kind(creds, creds.origin)
    common: dict[str, Any] = {"version": source.api_version, "domain": source.domain, "session": _session(creds)}
    try:
        if kind == "access token":
            client = simple_salesforce.Salesforce(instance_url=creds["instanceUrl"], session_id=creds["accessToken"], **common)
        elif kind == "password":
            client = simple_salesforce.Salesforce(username=creds["username"], password=creds["password"],
                                                  security_token=creds["securityToken"], **common)
        else:
            client = simple_salesforce.Salesforce(username=creds["username"], consumer_key=creds["consumerKey"],
                                                  privatekey=creds["privateKey"], **common)
    except sf_errors.SalesforceAuthenticationFailed as err:
        raise DataError(
            f"Salesforce refused the {kind} login from {creds.origin} ({err.code}: {err.auth_message}); "
            f"check the Secret's keys and spec.data.salesforce.domain ({source.domain!r})"
        ) from None
    except requests.RequestException as err:
        raise DataError(f"cannot reach Salesforce to log in ({type(err).__name__}: {err})") from None
    except (ValueError, TypeError, jwt.PyJWTError) as err:  # an unreadable private key, before any request
        if kind != "JWT bearer":
            raise
        raise DataError(
            f"{creds.origin}: privateKey is not a usable RSA private key in PEM form ({type(err).__name__}); "
            "put the connected app's private key there"
        ) from None
    return client, kind


def _one_line(message: str) -> str:
    """Salesforce's SOQL errors echo the query and a caret over several lines; keep the reason and its position."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    for i, line in enumerate(lines):
        if line.startswith("ERROR at Row:"):
            reason = " ".join(lines[i + 1:])
            position = line.removeprefix("ERROR at ").replace(":", " ", 1).lower()
            return f"{reason} ({position})" if reason else line
    return " ".join(lines)


def _error_body(err: sf_errors.SalesforceError) -> tuple[str, str]:
    """(errorCode, message) from Salesforce's ``[{"errorCode": ..., "message": ...}]`` body."""
    content = err.content
    if isinstance(content, list) and content and isinstance(content[0], dict):
        return str(content[0].get("errorCode", "")), _one_line(str(content[0].get("message", "")))
    if isinstance(content, dict):
        code = content.get("errorCode", content.get("error", ""))
        return str(code), _one_line(str(content.get("message", content.get("error_description", ""))))
    return "", _one_line(str(content)[:300])


def _describe(err: BaseException) -> str:
    if isinstance(err, sf_errors.SalesforceError):
        code, message = _error_body(err)
        return f"HTTP {err.status} {code}: {message}"
    return f"{type(err).__name__}: {err}"


def _is_rate_limited(err: BaseException) -> bool:
    if isinstance(err, sf_errors.SalesforceError):
        code, _ = _error_body(err)
        return code in _RATE_LIMIT_CODES or err.status in (429, 503)
    return isinstance(err, (requests.ConnectionError, requests.Timeout))


def flatten_record(record: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """One REST record as flat columns: ``attributes`` dropped, relationships as ``Parent.Field``.

    A null relationship stays one column (``Owner: None``); the mapping treats
    its dotted subfields as missing in that record.
    """
    out: dict[str, Any] = {}
    for key, value in record.items():
        if key == "attributes":
            continue
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            if "records" in value and "totalSize" in value:  # a child subquery: keep its size, not its rows
                out[name] = value.get("totalSize")
            else:
                out.update(flatten_record(value, prefix=f"{name}."))
        else:
            out[name] = value
    return out


def _page_frame(records: list[Mapping[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame.from_records([flatten_record(r) for r in records])


def _query_error(err: sf_errors.SalesforceError, source: SalesforceSource, kind: str, creds: Credentials) -> DataError:
    code, message = _error_body(err)
    field = "query" if source.query is not None else "object/fields/where"
    if isinstance(err, sf_errors.SalesforceExpiredSession):
        if kind == "access token":
            return DataError(
                f"Salesforce rejected the access token from {creds.origin} ({code or 'INVALID_SESSION_ID'}: {message}); "
                "it has expired or was revoked: put a fresh accessToken in the Secret, or give username + password + "
                "securityToken or a JWT key (username + consumerKey + privateKey) so fedcrm can log in again by itself"
            )
        return DataError(f"Salesforce rejected the session even after logging in again ({code}: {message}); check the user's access")
    if _is_rate_limited(err):
        return DataError(
            f"Salesforce kept refusing requests for the API rate limit ({code or err.status}: {message}); "
            "retry later or raise the org's API limits"
        )
    if isinstance(err, sf_errors.SalesforceMalformedRequest):
        return DataError(
            f"Salesforce rejected the SOQL in spec.data.salesforce.{field} ({code}: {message}); fix the query: {source.soql()}"
        )
    return DataError(f"Salesforce answered HTTP {err.status} to the query ({code}: {message}) for spec.data.salesforce.{field}")


def read_pages(source: SalesforceSource, creds: Credentials, *, backoff: Backoff) -> Iterator[pd.DataFrame]:
    """Yield one DataFrame per page of the SOQL result; login happens on first iteration."""
    client, kind = login(source, creds)
    headers = {"Sforce-Query-Options": f"batchSize={source.batch_size}"} if source.batch_size else {}
    next_url: str | None = None  # None: the first page, from the query itself

    def fetch() -> Any:
        if next_url is None:
            return client.query(source.soql(), headers=headers)
        return client.query_more(next_url, identifier_is_url=True, headers=headers)

    page_number = 1
    while True:
        try:
            page = with_backoff(fetch, retryable=_is_rate_limited, backoff=backoff, what=f"Salesforce query page {page_number}",
                                describe=_describe)
        except sf_errors.SalesforceError as err:
            raise _query_error(err, source, kind, creds) from None
        except requests.RequestException as err:
            raise DataError(f"lost the connection to Salesforce on page {page_number} ({type(err).__name__}: {err})") from None
        records = page.get("records", [])
        if records:
            yield _page_frame(records)
        if page.get("done", True) or not page.get("nextRecordsUrl"):
            return
        next_url = page["nextRecordsUrl"]
        page_number += 1
