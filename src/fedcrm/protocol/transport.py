"""Mutual-TLS channels and servers, and reading a peer's identity from its certificate.

There is no insecure mode: a participant without a certificate from the
federation's CA cannot complete the handshake, and one whose certificate names
an identity the aggregator does not expect is refused with PERMISSION_DENIED.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

__all__ = [
    "GRPC_OPTIONS",
    "max_result_bytes",
    "server_options",
    "PROTOCOL_VERSION",
    "TlsFiles",
    "client_channel",
    "peer_identity",
    "server_credentials",
]

PROTOCOL_VERSION = 5  # 2: signed keys, member list, consistency check (secure aggregation); 3: statistics masked too;
# 4: the member-list agreement (SECAGG_MEMBERS), signed by every member on the list, and its graph salt;
# 5: masked vectors packed at the sum's modulus (Vector.PACKED), quantized training sums (quantizationBits)

_MAX_MESSAGE = 256 * 1024 * 1024
GRPC_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", _MAX_MESSAGE),
    ("grpc.max_receive_message_length", _MAX_MESSAGE),
    # Keep the long-lived task stream alive through idle NAT/load-balancer timeouts.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
]


def max_result_bytes(parameters: int, participants: int) -> int:
    """The largest result a participant can honestly send, for a model of ``parameters`` values.

    A plain update or a masked vector is at most 8 bytes per value (float64 or uint64) plus a few counters;
    secure-aggregation key and share messages grow with the neighbourhood, a few hundred bytes a peer.
    Everything beyond is refused by gRPC before it is read into memory.
    """
    return 8 * (parameters + 1024) + 512 * participants + 1024 * 1024


def server_options(max_receive: int) -> list[tuple[str, int]]:
    """The aggregator's server options: :data:`GRPC_OPTIONS` with a receive limit of ``max_receive`` bytes."""
    return [(k, max_receive if k == "grpc.max_receive_message_length" else v) for k, v in GRPC_OPTIONS]


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: the federation CA, and this party's certificate and private key."""

    ca: Path
    cert: Path
    key: Path

    def read(self) -> tuple[bytes, bytes, bytes]:
        missing = [str(p) for p in (self.ca, self.cert, self.key) if not Path(p).is_file()]
        if missing:
            raise FileNotFoundError(f"TLS file(s) not found: {', '.join(missing)}")
        return Path(self.ca).read_bytes(), Path(self.cert).read_bytes(), Path(self.key).read_bytes()


def server_credentials(tls: TlsFiles) -> grpc.ServerCredentials:
    ca, cert, key = tls.read()
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)


def client_channel(target: str, tls: TlsFiles, *, server_name: str | None = None) -> grpc.Channel:
    """A channel that presents this party's certificate and trusts only the federation CA."""
    ca, cert, key = tls.read()
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    options: list[tuple[str, object]] = list(GRPC_OPTIONS)
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.secure_channel(target, creds, options=options)


def peer_identity(context: grpc.ServicerContext) -> str | None:
    """The identity (certificate common name) of an authenticated TLS peer, or None."""
    auth = context.auth_context()
    if auth.get("transport_security_type") != [b"ssl"]:
        return None
    names = auth.get("x509_common_name") or []
    return names[0].decode() if len(names) == 1 else None
