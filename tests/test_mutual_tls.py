"""Real mutual TLS between a participant and the aggregator's gRPC server.

The server here is the production one (``start_server``) on a loopback port;
only the round loop is not started, so each test speaks to it directly.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from fedcrm.pki import CertificateAuthority, write_pem_files
from fedcrm.protocol import PROTOCOL_VERSION, TlsFiles, client_channel, pb, rpc
from fedcrm.runconfig import AggregatorConfig, TlsPaths
from fedcrm.spec.loading import load_federation
from fedcrm_aggregator.coordinator import Coordinator
from fedcrm_aggregator.server import start_server

IDENTITY = "tenant-01/acme"


@pytest.fixture()
def server(tmp_path: Path, small_federation) -> Iterator[tuple[int, CertificateAuthority, Path, Coordinator]]:  # type: ignore[no-untyped-def]
    ca = CertificateAuthority.create("test")
    (tmp_path / "ca.crt").write_bytes(ca.cert_pem)
    cert, key = write_pem_files(tmp_path, "server", ca.issue_server(["localhost", "127.0.0.1"]))
    federation = load_federation(small_federation.federation_path)
    config = AggregatorConfig(
        federation=federation, participants=[IDENTITY], listen="127.0.0.1:0",
        tls=TlsPaths(ca=tmp_path / "ca.crt", cert=cert, key=key), out_dir=tmp_path,
    )
    coordinator = Coordinator(federation, [IDENTITY], tmp_path)
    grpc_server, port = start_server(config, coordinator)
    yield port, ca, tmp_path, coordinator
    grpc_server.stop(grace=0).wait()
    coordinator.close()


def _client(tmp_path: Path, ca: CertificateAuthority, identity: str, name: str) -> TlsFiles:
    cert, key = write_pem_files(tmp_path / name, "client", ca.issue_client(identity))
    return TlsFiles(tmp_path / "ca.crt", cert, key)


def _connect(port: int, tls: TlsFiles, federation: str = "fedcrm-system/lead-conversion") -> pb.Task:
    with client_channel(f"127.0.0.1:{port}", tls) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        stream = rpc.FederatedTrainingStub(channel).Connect(
            pb.ConnectRequest(protocol_version=PROTOCOL_VERSION, federation=federation), timeout=10
        )
        task = next(iter(stream))
        stream.cancel()
        return task


def test_a_participant_with_the_federation_certificate_is_welcomed(server) -> None:  # type: ignore[no-untyped-def]
    port, ca, tmp, coordinator = server
    task = _connect(port, _client(tmp, ca, IDENTITY, "good"))
    assert task.kind == pb.Task.WELCOME
    assert task.identity == IDENTITY  # read from the certificate, not from any message
    assert '"lead-conversion"' in task.federation_json


def test_a_certificate_from_another_ca_cannot_even_handshake(server) -> None:  # type: ignore[no-untyped-def]
    port, _, tmp, _ = server
    other_ca = CertificateAuthority.create("someone else")
    cert, key = write_pem_files(tmp / "rogue", "client", other_ca.issue_client(IDENTITY))
    tls = TlsFiles(tmp / "ca.crt", cert, key)  # trusts the right server, presents the wrong client cert
    with client_channel(f"127.0.0.1:{port}", tls) as channel:
        stub = rpc.FederatedTrainingStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            next(iter(stub.Connect(pb.ConnectRequest(protocol_version=PROTOCOL_VERSION), timeout=5)))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_valid_certificate_for_someone_not_in_the_federation_is_refused(server) -> None:  # type: ignore[no-untyped-def]
    port, ca, tmp, _ = server
    with pytest.raises(grpc.RpcError) as info:
        _connect(port, _client(tmp, ca, "tenant-09/intruder", "intruder"))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "'tenant-09/intruder' is not a participant" in info.value.details()


def test_a_participant_of_another_federation_is_refused(server) -> None:  # type: ignore[no-untyped-def]
    port, ca, tmp, _ = server
    with pytest.raises(grpc.RpcError) as info:
        _connect(port, _client(tmp, ca, IDENTITY, "good"), federation="fedcrm-system/churn")
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "serves federation fedcrm-system/lead-conversion" in info.value.details()


def test_the_node_process_explains_a_refused_certificate(server, small_federation) -> None:  # type: ignore[no-untyped-def]
    port, _, tmp, _ = server
    other_ca = CertificateAuthority.create("someone else")
    cert, key = write_pem_files(tmp / "rogue", "client", other_ca.issue_client(IDENTITY))
    proc = subprocess.run(
        [sys.executable, "-m", "fedcrm_node", "--participant", str(small_federation.participant_paths[0]),
         "--federation", str(small_federation.federation_path), "--aggregator", f"127.0.0.1:{port}", "--ca", str(tmp / "ca.crt"), "--cert", str(cert), "--key", str(key),
         "--connect-timeout", "3"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 4
    assert "certificate was issued by the federation's CA" in proc.stderr
    assert "Traceback" not in proc.stderr
