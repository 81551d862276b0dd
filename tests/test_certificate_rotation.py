"""Certificates renewed at two thirds of their life, picked up by running processes without a restart.

The renewal decision is pure and checked by properties. The TLS tests are real: the production aggregator
server (``start_server``) with its certificate files laid out as the kubelet mounts a Secret (links into a
``..data`` folder swapped in one rename), real handshakes from the ``ssl`` module and gRPC clients. The
operator renews against the real control plane (marked ``cluster``, with the harness of
``test_operator_cluster.py``), as the chart's ServiceAccount, with certificates living seconds.
"""

from __future__ import annotations

import base64
import datetime as dt
import logging
import os
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcrm.pki import (
    DEFAULT_LEAF_LIFETIME,
    MIN_LEAF_LIFETIME,
    CertificateAuthority,
    IssuedCertificate,
    Validity,
    read_validity,
)
from fedcrm.protocol import PROTOCOL_VERSION, TlsFiles, client_channel, pb, rpc
from fedcrm.runconfig import AggregatorConfig, TlsPaths
from fedcrm.secagg.client import ProtocolViolation
from fedcrm.secagg.member_lists import MemberAgreement
from fedcrm.secagg.params import SecAggParams
from fedcrm.secagg.signing import Signer
from fedcrm.spec.loading import load_federation, load_participant
from fedcrm_aggregator.coordinator import Coordinator
from fedcrm_aggregator.server import start_server
from fedcrm_node.participant import ParticipantNode, _wait_until_ready
from fedcrm_operator.settings import OperatorSettings, parse_duration
from operator_harness import (
    COORDINATOR_NAMESPACES,
    Kubectl,
    OperatorProcess,
    grant_tenant_access,
    install_chart,
    provide_claim,
    service_account_kubeconfig,
    wait_for,
)
from secagg_harness import FEDERATION, Round, federation_ca, identity_of, signer_for, verifier

IDENTITY = "tenant-01/acme"
UTC = dt.timezone.utc
HOSTS = ["localhost", "127.0.0.1"]

# ----------------------------------------------------------------------------- the renewal decision

instants = st.datetimes(min_value=dt.datetime(2000, 1, 1), max_value=dt.datetime(2100, 1, 1), timezones=st.just(UTC))
spans = st.timedeltas(min_value=dt.timedelta(seconds=1), max_value=dt.timedelta(days=3650))
offsets = st.timedeltas(min_value=-dt.timedelta(days=4000), max_value=dt.timedelta(days=4000))


@given(instants, spans, offsets)
def test_a_certificate_is_due_from_two_thirds_of_its_life(not_before: dt.datetime, span: dt.timedelta,
                                                          offset: dt.timedelta) -> None:
    validity = Validity(1, not_before, not_before + span)
    now = not_before + offset
    assert not_before < validity.renew_at < validity.not_after
    assert abs((validity.renew_at - not_before) * 3 - span * 2) <= dt.timedelta(microseconds=3)
    assert validity.due(now) == (now >= validity.renew_at or now < not_before)


@given(instants, spans, st.lists(offsets, min_size=2, max_size=2))
def test_once_due_a_valid_certificate_stays_due(not_before: dt.datetime, span: dt.timedelta,
                                                pair: list[dt.timedelta]) -> None:
    earlier, later = sorted(not_before + abs(o) for o in pair)
    validity = Validity(1, not_before, not_before + span)
    assert not validity.due(earlier) or validity.due(later)


_CA = CertificateAuthority.create("properties")


@settings(max_examples=25, deadline=None)
@given(st.timedeltas(min_value=MIN_LEAF_LIFETIME, max_value=dt.timedelta(days=400)),
       st.datetimes(min_value=dt.datetime(2030, 1, 1), max_value=dt.datetime(2031, 1, 1), timezones=st.just(UTC)),
       st.booleans())
def test_a_fresh_certificate_is_not_due_and_is_renewed_before_it_expires(lifetime: dt.timedelta, now: dt.datetime,
                                                                         server: bool) -> None:
    issued = (_CA.issue_server(HOSTS, lifetime=lifetime, now=now) if server
              else _CA.issue_client(IDENTITY, lifetime=lifetime, now=now))
    validity = read_validity(issued.cert_pem)
    assert validity.serial == x509.load_pem_x509_certificate(issued.cert_pem).serial_number
    assert not validity.due(now)  # whole-second certificate times and the clock-skew margin included
    assert validity.due(now + lifetime * 2 / 3 + dt.timedelta(seconds=1))
    assert validity.renew_at < validity.not_after <= now + lifetime
    assert validity.not_after > now + lifetime - dt.timedelta(seconds=1)
    assert validity.not_before <= now - min(dt.timedelta(minutes=5), lifetime / 10) + dt.timedelta(seconds=1)


def test_the_ca_lives_long_and_leaves_default_to_ninety_days_never_beyond_the_ca() -> None:
    ca = CertificateAuthority.create("lifetimes")
    ca_validity = read_validity(ca.cert_pem)
    assert ca_validity.not_after - ca_validity.not_before >= dt.timedelta(days=3650)
    leaf = read_validity(ca.issue_client(IDENTITY).cert_pem)
    assert dt.timedelta(days=90) <= leaf.not_after - leaf.not_before <= dt.timedelta(days=90, minutes=5)
    assert DEFAULT_LEAF_LIFETIME == dt.timedelta(days=90)
    near_end = ca_validity.not_after - dt.timedelta(days=10)
    capped = read_validity(ca.issue_server(HOSTS, now=near_end).cert_pem)
    assert capped.not_after == ca_validity.not_after
    with pytest.raises(ValueError, match="shorter than the minimum"):
        ca.issue_client(IDENTITY, lifetime=dt.timedelta(seconds=5))


def test_the_ca_recognises_only_what_it_signed() -> None:
    ca, other = CertificateAuthority.create("mine"), CertificateAuthority.create("mine")  # same name, other key
    cert = ca.issue_client(IDENTITY).cert_pem
    assert ca.signed(cert) and not other.signed(cert)
    assert not ca.signed(b"not a certificate")
    with pytest.raises(ValueError):
        read_validity(b"not a certificate")


def test_the_operator_replaces_a_certificate_due_foreign_or_unreadable() -> None:
    """Why the operator would rewrite a certificate Secret as it read it (the write itself is covered on the real
    control plane below)."""
    from fedcrm_operator.certificates import _why

    ca, now = CertificateAuthority.create("why"), dt.datetime.now(UTC)

    def secret(cert_pem: bytes) -> dict[str, Any]:
        return {"data": {"tls.crt": base64.b64encode(cert_pem).decode()}}

    assert _why(secret(ca.issue_client(IDENTITY).cert_pem), ca, now) is None
    assert "two thirds of its life" in str(_why(secret(ca.issue_client(IDENTITY).cert_pem), ca, now + dt.timedelta(days=61)))
    assert "not issued by the federation's current CA" in str(
        _why(secret(CertificateAuthority.create("why").issue_client(IDENTITY).cert_pem), ca, now))
    for broken in ({}, {"data": {}}, {"data": {"tls.crt": "not base64!"}}, secret(b"not a certificate")):
        assert "missing or unreadable" in str(_why(broken, ca, now))


def test_the_leaf_lifetime_is_an_operator_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert OperatorSettings.from_environment().certificate_lifetime == DEFAULT_LEAF_LIFETIME
    monkeypatch.setenv("FEDCRM_CERTIFICATE_LIFETIME", "1h30m")
    assert OperatorSettings.from_environment().certificate_lifetime == dt.timedelta(minutes=90)
    assert parse_duration("2160h") == dt.timedelta(days=90) and parse_duration("45s") == dt.timedelta(seconds=45)
    for bad in ("", "90d", "1.5h", "h"):
        with pytest.raises(ValueError, match="not a duration"):
            parse_duration(bad)
    monkeypatch.setenv("FEDCRM_CERTIFICATE_LIFETIME", "5s")
    with pytest.raises(ValueError, match="shorter than 10s"):
        OperatorSettings.from_environment()


def _helm() -> str:
    helm = shutil.which("helm") or str(Path.home() / ".cache" / "fedcrm" / "k8s" / "v1.36.3" / "bin" / "helm")
    if not Path(helm).exists():
        pytest.skip("helm is not built yet: e2e/build-control-plane builds it with the control plane")
    return helm


def test_the_chart_sets_the_lifetime_and_refuses_one_the_operator_cannot_read() -> None:
    chart = str(Path(__file__).resolve().parents[1] / "charts" / "fedcrm-operator")

    def template(*values: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([_helm(), "template", "rel", chart, "--kube-version", "1.36.3", *values],
                              capture_output=True, text=True, timeout=60)

    assert '{name: FEDCRM_CERTIFICATE_LIFETIME, value: "2160h"}' in template().stdout
    assert '{name: FEDCRM_CERTIFICATE_LIFETIME, value: "1h30m"}' in template("--set", "certificates.lifetime=1h30m").stdout
    refused = template("--set", "certificates.lifetime=90d")
    assert refused.returncode != 0 and "/certificates/lifetime" in refused.stderr


# ----------------------------------------------------------------------------- files as the kubelet mounts them

class MountedSecret:
    """A folder laid out as the kubelet mounts a Secret: ``ca.crt -> ..data/ca.crt`` and so on, ``..data`` a link
    to a timestamped folder; an update writes a new folder and renames a new ``..data`` link over the old one."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.versions = folder, 0
        folder.mkdir(parents=True)

    def write(self, ca_pem: bytes, issued: IssuedCertificate) -> None:
        self.versions += 1
        version = self.folder / f"..2026_11_30_00_00_{self.versions:02d}"
        version.mkdir()
        for name, data in (("ca.crt", ca_pem), ("tls.crt", issued.cert_pem), ("tls.key", issued.key_pem)):
            (version / name).write_bytes(data)
        tmp = self.folder / "..data_tmp"
        tmp.symlink_to(version.name)
        os.replace(tmp, self.folder / "..data")  # the atomic swap
        for name in ("ca.crt", "tls.crt", "tls.key"):
            if not (self.folder / name).is_symlink():
                (self.folder / name).symlink_to(f"..data/{name}")

    @property
    def tls(self) -> TlsFiles:
        return TlsFiles(self.folder / "ca.crt", self.folder / "tls.crt", self.folder / "tls.key")


def test_a_kubelet_swap_changes_the_fingerprint(tmp_path: Path) -> None:
    ca = CertificateAuthority.create("fingerprint")
    mounted = MountedSecret(tmp_path / "tls")
    mounted.write(ca.cert_pem, ca.issue_client(IDENTITY))
    before = mounted.tls.fingerprint()
    assert before == mounted.tls.fingerprint()
    mounted.write(ca.cert_pem, ca.issue_client(IDENTITY))
    assert mounted.tls.fingerprint() != before
    assert TlsFiles(tmp_path / "x", tmp_path / "y", tmp_path / "z").fingerprint() == ((0, 0, 0, 0),) * 3


def _server_serial(port: int, ca_pem: bytes, client: TlsFiles) -> int:
    """A new TLS handshake with the server, as a gRPC client makes one (ALPN h2, a client certificate): the serial
    of the certificate the server presents."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cadata=ca_pem.decode())
    context.load_cert_chain(client.cert, client.key)
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


@pytest.fixture()
def aggregator(tmp_path: Path, small_federation) -> Iterator[tuple[int, CertificateAuthority, MountedSecret]]:  # type: ignore[no-untyped-def]
    """The production aggregator server, its certificate in a kubelet-style mount."""
    ca = CertificateAuthority.create("rotation")
    mounted = MountedSecret(tmp_path / "server")
    mounted.write(ca.cert_pem, ca.issue_server(HOSTS))
    federation = load_federation(small_federation.federation_path)
    config = AggregatorConfig(
        federation=federation, participants=[IDENTITY], listen="127.0.0.1:0",
        tls=TlsPaths(ca=mounted.tls.ca, cert=mounted.tls.cert, key=mounted.tls.key), out_dir=tmp_path,
    )
    coordinator = Coordinator(federation, [IDENTITY], tmp_path)
    grpc_server, port = start_server(config, coordinator)
    yield port, ca, mounted
    grpc_server.stop(grace=0).wait()
    coordinator.close()


def _participant(tmp_path: Path, ca: CertificateAuthority, name: str, identity: str = IDENTITY) -> TlsFiles:
    mounted = MountedSecret(tmp_path / name)
    mounted.write(ca.cert_pem, ca.issue_client(identity))
    return mounted.tls


def _open_stream(channel: grpc.Channel) -> tuple[Any, pb.Task]:
    stream = rpc.FederatedTrainingStub(channel).Connect(
        pb.ConnectRequest(protocol_version=PROTOCOL_VERSION, federation="fedcrm-system/lead-conversion"), timeout=30)
    return stream, next(iter(stream))


def test_a_renewed_server_certificate_is_served_to_new_handshakes_while_open_connections_go_on(
        aggregator: tuple[int, CertificateAuthority, MountedSecret], tmp_path: Path) -> None:
    port, ca, mounted = aggregator
    client = _participant(tmp_path, ca, "client")
    first = read_validity(mounted.tls.cert.read_bytes()).serial
    assert _server_serial(port, ca.cert_pem, client) == first

    with client_channel(f"127.0.0.1:{port}", client) as connected:
        stream, welcome = _open_stream(connected)
        assert welcome.kind == pb.Task.WELCOME
        renewed = ca.issue_server(HOSTS)
        mounted.write(ca.cert_pem, renewed)  # the operator patched the Secret; the kubelet swapped the files

        assert _server_serial(port, ca.cert_pem, client) == read_validity(renewed.cert_pem).serial != first
        # A new gRPC connection completes its handshake with the renewed certificate: the call gets as far as the
        # aggregator reading the caller's identity from its certificate (one it does not expect).
        with client_channel(f"127.0.0.1:{port}", _participant(tmp_path, ca, "newcomer", "tenant-09/newcomer")) as fresh:
            with pytest.raises(grpc.RpcError) as refused:
                _open_stream(fresh)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # The participant connected before the renewal goes on over its open connection: its stream is alive,
        # and a new call on the same channel is served.
        assert stream.is_active()
        stream.cancel()
        _, again = _open_stream(connected)
        assert again.kind == pb.Task.WELCOME and again.identity == IDENTITY


def test_a_new_ca_in_the_files_is_trusted_for_new_handshakes_only(
        aggregator: tuple[int, CertificateAuthority, MountedSecret], tmp_path: Path) -> None:
    """The server reloads its trusted CA with its certificate: after a switch to another CA, a handshake made with
    the old one fails both ways, one made with the new one succeeds, and a connection opened before goes on."""
    port, old_ca, mounted = aggregator
    old_client = _participant(tmp_path, old_ca, "old")
    new_ca = CertificateAuthority.create("rotation")
    new_client = _participant(tmp_path, new_ca, "new")
    with client_channel(f"127.0.0.1:{port}", old_client) as connected:
        stream, _ = _open_stream(connected)
        mounted.write(new_ca.cert_pem, new_ca.issue_server(HOSTS))
        with pytest.raises(ssl.SSLError):
            _server_serial(port, old_ca.cert_pem, old_client)
        assert new_ca.signed(mounted.tls.cert.read_bytes())
        _server_serial(port, new_ca.cert_pem, new_client)
        stream.cancel()
        _, again = _open_stream(connected)  # the old connection, authenticated before the switch
        assert again.kind == pb.Task.WELCOME


def test_a_moment_without_files_keeps_the_loaded_certificate_served(
        aggregator: tuple[int, CertificateAuthority, MountedSecret], tmp_path: Path) -> None:
    """A moment without files (a Secret deleted and recreated) does not break the server: it keeps serving what it
    loaded, and takes the files up once they are back."""
    port, ca, mounted = aggregator
    client = _participant(tmp_path, ca, "client")
    first = _server_serial(port, ca.cert_pem, client)
    (mounted.folder / "..data").unlink()
    assert _server_serial(port, ca.cert_pem, client) == first
    renewed = ca.issue_server(HOSTS)
    mounted.write(ca.cert_pem, renewed)
    assert _server_serial(port, ca.cert_pem, client) == read_validity(renewed.cert_pem).serial


def test_a_node_waiting_to_connect_starts_over_when_its_certificate_is_renewed(tmp_path: Path) -> None:
    """A channel reconnects with the credentials it was made with: a node still waiting for its aggregator
    gives up on that channel as soon as its files changed (the session then makes a new one)."""
    ca = CertificateAuthority.create("waiting")
    mounted = MountedSecret(tmp_path / "node")
    mounted.write(ca.cert_pem, ca.issue_client(IDENTITY))
    seen = mounted.tls.fingerprint()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        target = f"127.0.0.1:{s.getsockname()[1]}"  # nothing listens
    with client_channel(target, mounted.tls) as channel:
        mounted.write(ca.cert_pem, ca.issue_client(IDENTITY))
        began = time.monotonic()
        assert _wait_until_ready(channel, target, timeout=60, every=0.2,
                                 stale=lambda: mounted.tls.fingerprint() != seen) is False
        assert time.monotonic() - began < 5


# ----------------------------------------------------------------------------- secure aggregation's signer


def _agreed(ids: list[int]) -> dict[int, MemberAgreement]:
    """Each member's settled agreement on the list of ``ids``, every step signed with its first certificate."""
    members = {cid: identity_of(cid) for cid in ids}
    agreements = {cid: MemberAgreement(federation=FEDERATION, terms="terms-v1", client_id=cid,
                                       signer=signer_for(members[cid]), verifier=verifier(), minimum=2)
                  for cid in ids}
    signatures = {cid: a.sign(members) for cid, a in agreements.items()}
    for a in agreements.values():
        a.accept(members, signatures)
    echoes = {cid: a.echo() for cid, a in agreements.items()}
    reveals = {cid: a.reveal(echoes) for cid, a in agreements.items()}
    for a in agreements.values():
        a.settle(reveals)
    return agreements


def test_a_secure_sum_after_a_renewal_is_signed_with_the_new_key_under_the_same_agreement() -> None:
    """The member list is agreed once per federation, signed with each member's certificate of that day; a later
    sum signed with a renewed certificate (a new key for the same identity, from the same CA) is accepted by its
    peers under that same agreement. A certificate kept from the start is refused once it expires, so a node that
    kept it would have its neighbours refuse the round."""
    agreements = _agreed([2, 5, 8])
    renewed = federation_ca().issue_client(identity_of(5))
    r = Round(3, 16, SecAggParams(threshold=1.0), agreements=agreements,
              signers={5: Signer.from_pem(renewed.cert_pem, renewed.key_pem)})
    assert np.array_equal(r.run(), r.expected(r.ids))

    yesterday = dt.datetime.now(UTC) - dt.timedelta(days=1)
    expired = federation_ca().issue_client(identity_of(5), lifetime=dt.timedelta(hours=1), now=yesterday)
    r = Round(3, 16, SecAggParams(threshold=1.0), agreements=agreements,
              signers={5: Signer.from_pem(expired.cert_pem, expired.key_pem)})
    r.advertise()
    with pytest.raises(ProtocolViolation, match="not valid now"):
        r.share_keys()


def test_a_node_signs_each_secure_sum_with_the_certificate_its_files_hold_now(
        tmp_path: Path, small_federation, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    """A kubelet swap of the node's files reaches its next secure sum; the member-list agreement keeps the signer it
    was made with, and a renewal the node cannot use (a certificate for another identity) leaves the last one."""
    participant = load_participant(small_federation.participant_paths[0])
    federation = load_federation(small_federation.federation_path)
    ca = CertificateAuthority.create("signing")
    mounted = MountedSecret(tmp_path / "node")
    first = ca.issue_client(participant.identity)
    mounted.write(ca.cert_pem, first)
    node = ParticipantNode(participant, manifest_dir=tmp_path, aggregator="127.0.0.1:1", tls=mounted.tls,
                           own_federation=federation)
    node.federation = federation
    signer, peers = node._secagg_credentials()
    assert read_validity(first.cert_pem).serial == x509.load_der_x509_certificate(signer.certificate).serial_number
    agreement = node._member_agreement()

    renewed = ca.issue_client(participant.identity)
    mounted.write(ca.cert_pem, renewed)
    now_signer, now_peers = node._secagg_credentials()
    assert read_validity(renewed.cert_pem).serial == x509.load_der_x509_certificate(now_signer.certificate).serial_number
    assert now_peers is peers  # its cache of checked peer certificates goes on
    assert node._member_agreement() is agreement and agreement._signer is signer  # the agreement's key stays

    mounted.write(ca.cert_pem, ca.issue_client("tenant-99/someone-else"))
    with caplog.at_level(logging.WARNING, logger="fedcrm.node"):
        assert node._secagg_credentials()[0] is now_signer
    assert "cannot be used yet" in caplog.text and "tenant-99/someone-else" in caplog.text


# ----------------------------------------------------------------------------- the operator renews

COORD, TENANT, FED = "rot-coord", "rot-tenant", "rot"
LIFETIME_S = 15  # due after 10 s: a few renewals within a test


@pytest.fixture()
def renewing_operator(control_plane: Any, tmp_path: Path) -> Iterator[Kubectl]:
    """The operator as the chart installs it (its ServiceAccount and RBAC; the tenant chart's grant in the tenant
    namespace), watching only this test's namespaces, with leaf certificates living seconds."""
    kubectl = Kubectl(control_plane.bin_dir / "kubectl", control_plane.kubeconfig)
    install_chart(control_plane.bin_dir / "helm", control_plane.kubeconfig, (*COORDINATOR_NAMESPACES, COORD))
    for ns in (COORD, TENANT):
        kubectl("create", "namespace", ns, check=False)
    provide_claim(kubectl, TENANT)
    grant_tenant_access(kubectl, TENANT, (COORD, FED), "crm")
    config = service_account_kubeconfig(kubectl, control_plane.kubeconfig, tmp_path / "operator.kubeconfig")
    proc = OperatorProcess(config, tmp_path, env={
        "FEDCRM_WATCH_NAMESPACES": f"{COORD},{TENANT}", "FEDCRM_CERTIFICATE_LIFETIME": f"{LIFETIME_S}s",
        "FEDCRM_AGGREGATOR_STATUS_URL": "http://127.0.0.1:9/status",
    }).start()
    try:
        yield kubectl
    finally:
        kubectl("delete", "federation", FED, "-n", COORD, "--wait=false", check=False)
        kubectl("delete", "participant", "crm", "-n", TENANT, "--wait=false", check=False)
        wait_for("the federation's cleanup", lambda: kubectl.get("federation", FED, COORD) is None, timeout=60)
        proc.stop()


def _certificate(kubectl: Kubectl, name: str, namespace: str) -> tuple[x509.Certificate, bytes] | None:
    secret = kubectl.get("secret", name, namespace)
    if secret is None:
        return None
    data = secret["data"]
    return x509.load_pem_x509_certificate(base64.b64decode(data["tls.crt"])), base64.b64decode(data["ca.crt"])


@pytest.mark.cluster
@pytest.mark.slow
def test_the_operator_renews_each_certificate_at_two_thirds_of_its_life(renewing_operator: Kubectl) -> None:
    kubectl = renewing_operator
    kubectl.apply(
        {"apiVersion": "fedcrm.io/v1alpha1", "kind": "Federation", "metadata": {"name": FED, "namespace": COORD},
         "spec": {"task": {"target": "converted", "features": [{"name": "revenue", "type": "numeric"}]},
                  "training": {"rounds": 2, "minParticipants": 1}, "participants": {"namespaces": [TENANT]}}},
        {"apiVersion": "fedcrm.io/v1alpha1", "kind": "Participant", "metadata": {"name": "crm", "namespace": TENANT},
         "spec": {"federationRef": {"name": FED, "namespace": COORD},
                  "data": {"pvc": {"claimName": "crm-data", "path": "leads.csv"}, "mapping": {"converted": "Converted"}}}},
    )
    secrets = {"aggregator": (f"{FED}-aggregator-tls", COORD), "participant": (f"{FED}-crm-tls", TENANT)}
    first = {who: wait_for(f"the {who}'s certificate", lambda s=s: _certificate(kubectl, *s), timeout=90)
             for who, s in secrets.items()}
    ca = CertificateAuthority.load(base64.b64decode(kubectl.get("secret", f"{FED}-ca", COORD)["data"]["ca.crt"]),
                                   base64.b64decode(kubectl.get("secret", f"{FED}-ca", COORD)["data"]["ca.key"]))
    for cert, _ in first.values():
        lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
        assert dt.timedelta(seconds=LIFETIME_S) <= lifetime <= dt.timedelta(seconds=LIFETIME_S + 2)

    for who, (name, namespace) in secrets.items():
        old, _ = first[who]
        renewed = wait_for(f"the {who}'s certificate to be renewed",
                           lambda: (c := _certificate(kubectl, name, namespace)) and c[0].serial_number != old.serial_number and c,
                           timeout=3 * LIFETIME_S)
        cert, ca_pem = renewed
        # Renewed from two thirds of the old one's life, before it expired (whole-second certificate times), from
        # the same CA, which the Secret still names.
        issued_at = cert.not_valid_before_utc + dt.timedelta(seconds=LIFETIME_S) / 10  # its clock-skew margin
        due = read_validity(old.public_bytes(serialization.Encoding.PEM)).renew_at
        assert due - dt.timedelta(seconds=1) <= issued_at < old.not_valid_after_utc + dt.timedelta(seconds=1)
        assert ca.signed(cert.public_bytes(serialization.Encoding.PEM)) and ca_pem == ca.cert_pem
        assert cert.subject == old.subject

    # One Normal Event per renewal, on the object each certificate serves.
    for kind, name, namespace in (("Federation", FED, COORD), ("Participant", "crm", TENANT)):
        event = wait_for(f"a CertificateRenewed Event on the {kind}", lambda: next(
            (e for e in kubectl.items("events", namespace=namespace)
             if e["reason"] == "CertificateRenewed" and e["involvedObject"].get("kind") == kind
             and e["involvedObject"].get("name") == name), None), timeout=30)
        assert event["type"] == "Normal" and "reached two thirds of its life" in event["message"]
