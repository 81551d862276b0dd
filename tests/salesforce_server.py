"""A Salesforce org on 127.0.0.1 that speaks the documented REST and login endpoints, for tests.

simple-salesforce always talks ``https://<host>.salesforce.com``; tests reach
this server the way a corporate network reaches the real one, through an HTTPS
proxy (``HTTPS_PROXY``, a CONNECT tunnel) and with the server's CA trusted
(``REQUESTS_CA_BUNDLE``). So the client library's real requests, login flows
and response parsing all run unchanged.

Implemented: SOAP login (``/services/Soap/u/<v>``, username + password +
security token), OAuth JWT bearer (``/services/oauth2/token``, the assertion's
RS256 signature checked), ``/services/data/v<v>/query?q=`` with
``Sforce-Query-Options: batchSize`` and ``nextRecordsUrl`` paging, and
Salesforce's error bodies (``INVALID_SESSION_ID``, ``INVALID_FIELD``,
``INVALID_TYPE``, ``MALFORMED_QUERY``, ``REQUEST_LIMIT_EXCEEDED``). SOQL is
understood as far as ``SELECT fields FROM Object [WHERE Field = value] [LIMIT n]``.
"""

from __future__ import annotations

import json
import re
import secrets
import select
import socket
import ssl
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import jwt

from fedcrm.pki import CertificateAuthority, write_pem_files

INSTANCE_HOST = "acme.my.salesforce.com"
HOSTS = ["login.salesforce.com", "test.salesforce.com", INSTANCE_HOST]
_DEFAULT_BATCH = 2000
_SOQL = re.compile(
    r"^\s*SELECT\s+(?P<fields>.+?)\s+FROM\s+(?P<object>\w+)"
    r"(?:\s+WHERE\s+(?P<field>[\w.]+)\s*=\s*(?P<value>'[^']*'|true|false|\d+(?:\.\d+)?))?"
    r"(?:\s+LIMIT\s+(?P<limit>\d+))?\s*$",
    re.IGNORECASE | re.DOTALL,
)


@dataclass
class Org:
    """The org's data and who may log in; tests change it between calls."""

    objects: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # flat records, relationships dotted
    users: dict[str, str] = field(default_factory=dict)  # username -> password + security token
    jwt_apps: dict[str, bytes] = field(default_factory=dict)  # consumer key -> public key PEM
    tokens: set[str] = field(default_factory=set)
    rate_limited_requests: int = 0  # answer this many next queries with REQUEST_LIMIT_EXCEEDED
    expire_sessions_after: int | None = None  # invalidate every session after this many served queries
    logins: int = 0
    queries: int = 0
    connect_hosts: list[str] = field(default_factory=list)
    cursors: dict[str, tuple[list[dict[str, Any]], int, str]] = field(default_factory=dict)

    def new_token(self) -> str:
        token = "00D5g000004Xyz!" + secrets.token_urlsafe(24)
        self.tokens.add(token)
        return token


def _nest(flat: dict[str, Any], fields: list[str], sobject: str, version: str) -> dict[str, Any]:
    """A REST record: ``attributes`` plus the selected fields, relationship paths as nested objects."""
    record: dict[str, Any] = {"attributes": {"type": sobject, "url": f"/services/data/v{version}/sobjects/{sobject}/{flat.get('Id', '')}"}}
    for name in fields:
        parts = name.split(".")
        node = record
        for i, part in enumerate(parts[:-1]):
            prefix = ".".join(parts[: i + 1])
            if flat.get(prefix, "present") is None:  # a null relationship is null, not an empty object
                node[part] = None
                break
            child = node.get(part)
            if child is None:
                child = node[part] = {"attributes": {"type": part if part != "Owner" else "User"}}
            node = child
        else:
            node[parts[-1]] = flat.get(name)
    return record


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _send(self, status: int, body: Any, content_type: str = "application/json") -> None:
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type + ";charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, code: str, message: str) -> None:
        self._send(status, [{"message": message, "errorCode": code}])

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", "0")))

    # ------------------------------------------------------------------ login
    def do_POST(self) -> None:
        org = self.server.org
        path = urllib.parse.urlparse(self.path).path
        if path.startswith("/services/Soap/u/"):
            body = ElementTree.fromstring(self._body())
            text = {el.tag.split("}")[-1]: el.text or "" for el in body.iter()}
            if org.users.get(text.get("username", "")) != text.get("password"):
                fault = ('<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" '
                         'xmlns:sf="urn:fault.partner.soap.sforce.com"><soapenv:Body><soapenv:Fault><faultcode>sf:INVALID_LOGIN</faultcode>'
                         '<faultstring>INVALID_LOGIN: Invalid username, password, security token; or user locked out.</faultstring>'
                         '<detail><sf:LoginFault><sf:exceptionCode>INVALID_LOGIN</sf:exceptionCode><sf:exceptionMessage>Invalid username, '
                         'password, security token; or user locked out.</sf:exceptionMessage></sf:LoginFault></detail></soapenv:Fault>'
                         '</soapenv:Body></soapenv:Envelope>')
                return self._send(500, fault, "text/xml")
            org.logins += 1
            version = path.rsplit("/", 1)[-1]
            ok = ('<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" '
                  'xmlns="urn:partner.soap.sforce.com"><soapenv:Body><loginResponse><result>'
                  f'<metadataServerUrl>https://{INSTANCE_HOST}/services/Soap/m/{version}/00D5g000004Xyz</metadataServerUrl>'
                  '<passwordExpired>false</passwordExpired><sandbox>false</sandbox>'
                  f'<serverUrl>https://{INSTANCE_HOST}/services/Soap/u/{version}/00D5g000004Xyz</serverUrl>'
                  f'<sessionId>{org.new_token()}</sessionId><userId>0055g00000AbCdE</userId>'
                  '</result></loginResponse></soapenv:Body></soapenv:Envelope>')
            return self._send(200, ok, "text/xml")
        if path == "/services/oauth2/token":
            form = urllib.parse.parse_qs(self._body().decode())
            if form.get("grant_type") != ["urn:ietf:params:oauth:grant-type:jwt-bearer"]:
                return self._send(400, {"error": "unsupported_grant_type", "error_description": "grant type not supported"})
            assertion = form.get("assertion", [""])[0]
            try:
                claims = jwt.decode(assertion, options={"verify_signature": False})
                key = org.jwt_apps[claims["iss"]]
                jwt.decode(assertion, key, algorithms=["RS256"], audience="https://login.salesforce.com")
                assert claims["sub"] in org.users
            except Exception:
                return self._send(400, {"error": "invalid_grant", "error_description": "invalid assertion"})
            org.logins += 1
            return self._send(200, {"access_token": org.new_token(), "instance_url": f"https://{INSTANCE_HOST}",
                                    "id": "https://login.salesforce.com/id/00D5g000004Xyz/0055g00000AbCdE",
                                    "token_type": "Bearer", "scope": "api", "issued_at": "1700000000000"})
        self._error(404, "NOT_FOUND", "The requested resource does not exist")

    # ------------------------------------------------------------------ REST query
    def do_GET(self) -> None:
        org = self.server.org
        url = urllib.parse.urlparse(self.path)
        match = re.fullmatch(r"/services/data/v(\d+\.\d)/query/?(?P<locator>[\w-]+)?", url.path)
        if not match:
            return self._error(404, "NOT_FOUND", "The requested resource does not exist")
        token = self.headers.get("Authorization", "").removeprefix("Bearer ")
        if token not in org.tokens:
            return self._error(401, "INVALID_SESSION_ID", "Session expired or invalid")
        if org.rate_limited_requests > 0:
            org.rate_limited_requests -= 1
            return self._error(403, "REQUEST_LIMIT_EXCEEDED", "TotalRequests Limit exceeded.")
        org.queries += 1
        if org.expire_sessions_after is not None and org.queries % org.expire_sessions_after == 0:
            org.tokens.clear()  # the next request finds its session expired
        version = match.group(1)
        locator = match.group("locator")
        if locator:
            cursor_id, _, offset = locator.rpartition("-")
            if cursor_id not in org.cursors:
                return self._error(400, "INVALID_QUERY_LOCATOR", "invalid query locator")
            records, batch, _ = org.cursors[cursor_id]
            return self._page(cursor_id, records, int(offset), batch, version)
        soql = urllib.parse.parse_qs(url.query).get("q", [""])[0]
        parsed = _SOQL.match(soql)
        if not parsed:
            return self._error(400, "MALFORMED_QUERY", f"unexpected token in: {soql[:60]}")
        sobject = parsed.group("object")
        if sobject not in org.objects:
            return self._error(400, "INVALID_TYPE", f"\n{soql}\n^\nERROR at Row:1:Column:1\nsObject type '{sobject}' is not supported.")
        rows = org.objects[sobject]
        known = {k.lower(): k for r in rows[:1] for k in r} | {k.lower(): k for r in rows for k in r if "." in k}
        fields = []
        for raw in (f.strip() for f in parsed.group("fields").split(",")):
            name = known.get(raw.lower())
            if name is None:
                column = soql.find(raw) + 1
                return self._error(400, "INVALID_FIELD", f"\n{soql}\n^\nERROR at Row:1:Column:{column}\n"
                                   f"No such column '{raw}' on entity '{sobject}'. If you are attempting to use a custom "
                                   "field, be sure to append the '__c' after the custom field name.")
            fields.append(name)
        if parsed.group("field"):
            name = known.get(parsed.group("field").lower(), parsed.group("field"))
            value: Any = parsed.group("value")
            value = value.strip("'") if value.startswith("'") else {"true": True, "false": False}.get(value.lower(), value)
            rows = [r for r in rows if r.get(name) == value]
        if parsed.group("limit"):
            rows = rows[: int(parsed.group("limit"))]
        options = self.headers.get("Sforce-Query-Options", "")
        batch = int(re.search(r"batchSize=(\d+)", options).group(1)) if "batchSize" in options else _DEFAULT_BATCH
        records = [_nest(r, fields, sobject, version) for r in rows]
        cursor_id = "01g5g00000" + secrets.token_hex(4)
        org.cursors[cursor_id] = (records, batch, sobject)
        self._page(cursor_id, records, 0, batch, version)

    def _page(self, cursor_id: str, records: list[dict[str, Any]], offset: int, batch: int, version: str) -> None:
        end = offset + batch
        body: dict[str, Any] = {"totalSize": len(records), "done": end >= len(records), "records": records[offset:end]}
        if end < len(records):
            body["nextRecordsUrl"] = f"/services/data/v{version}/query/{cursor_id}-{end}"
        self._send(200, body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    org: Org


class _Tunnel(BaseHTTPRequestHandler):
    """An HTTPS proxy's CONNECT: whatever *.salesforce.com host is asked for, the tunnel ends at the fake org."""

    server: _ProxyServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_CONNECT(self) -> None:
        self.server.org.connect_hosts.append(self.path.split(":")[0])
        upstream = socket.create_connection(("127.0.0.1", self.server.target_port))
        self.send_response(200, "Connection established")
        self.end_headers()
        sockets = [self.connection, upstream]
        try:
            while True:
                readable, _, _ = select.select(sockets, [], [], 30)
                if not readable:
                    return
                for s in readable:
                    data = s.recv(65536)
                    if not data:
                        return
                    (upstream if s is self.connection else self.connection).sendall(data)
        finally:
            upstream.close()


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    org: Org
    target_port: int


class FakeSalesforce:
    """The org, its HTTPS server and the proxy in front of it; ``env`` points a process at them."""

    def __init__(self, folder: Path) -> None:
        self.org = Org()
        ca = CertificateAuthority.create("fake salesforce")
        folder.mkdir(parents=True, exist_ok=True)
        self.ca_path = folder / "ca.crt"
        self.ca_path.write_bytes(ca.cert_pem)
        cert, key = write_pem_files(folder, "salesforce", ca.issue_server(HOSTS))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self._https = _Server(("127.0.0.1", 0), _Handler)
        self._https.org = self.org
        self._https.socket = context.wrap_socket(self._https.socket, server_side=True)
        self._proxy = _ProxyServer(("127.0.0.1", 0), _Tunnel)
        self._proxy.org = self.org
        self._proxy.target_port = self._https.server_address[1]
        self._threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in (self._https, self._proxy)]
        for t in self._threads:
            t.start()

    @property
    def env(self) -> dict[str, str]:
        proxy = f"http://127.0.0.1:{self._proxy.server_address[1]}"
        return {"HTTPS_PROXY": proxy, "https_proxy": proxy, "REQUESTS_CA_BUNDLE": str(self.ca_path),
                "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}

    def close(self) -> None:
        for s in (self._proxy, self._https):
            s.shutdown()
            s.server_close()


def serve(org: Org, cert: Path, key: Path, host: str = "0.0.0.0", port: int = 443) -> ThreadingHTTPServer:
    """The org's HTTPS endpoint alone (no proxy): for a stand-in reached by its own name, e.g. a cluster Service."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = _Server((host, port), _Handler)
    server.org = org
    server.socket = context.wrap_socket(server.socket, server_side=True)
    return server


def main(argv: list[str] | None = None) -> None:
    """``python salesforce_server.py --records R.json --cert C --key K [--port 443]``: serve an org whose records
    are R.json ({"Lead": [...]}) and whose valid access tokens are in $SALESFORCE_TOKENS (comma-separated)."""
    import argparse
    import os

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--records", type=Path, required=True)
    parser.add_argument("--cert", type=Path, required=True)
    parser.add_argument("--key", type=Path, required=True)
    parser.add_argument("--port", type=int, default=443)
    args = parser.parse_args(argv)
    org = Org(objects=json.loads(args.records.read_text()),
              tokens={t for t in os.environ.get("SALESFORCE_TOKENS", "").split(",") if t})
    server = serve(org, args.cert, args.key, port=args.port)
    print(f"Salesforce stand-in on :{args.port} with {', '.join(f'{len(v)} {k}' for k, v in org.objects.items())}",
          flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
