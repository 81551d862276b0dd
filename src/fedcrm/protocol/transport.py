"""Mutual-TLS channels and servers, and reading a peer's identity from its certificate.

There is no insecure mode: a participant without a certificate from the
federation's CA cannot complete the handshake, and one whose certificate names
an identity the aggregator does not expect is refused with PERMISSION_DENIED.

Certificates are renewed while a federation runs (the operator rewrites the
Secret; the kubelet swaps the mounted files atomically). The server re-reads
its files on the first handshake after they changed (:func:`server_credentials`);
a connection already open keeps its session. A client channel holds the
credentials it was built with, for every reconnection it makes: a party that
outlives a renewal builds a new channel (:meth:`TlsFiles.fingerprint` says when).
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

__all__ = [
    "GRPC_OPTIONS",
    "KEEPALIVE_MS",
    "keepalive_options",
    "max_result_bytes",
    "server_options",
    "PROTOCOL_VERSION",
    "TlsFiles",
    "client_channel",
    "peer_identity",
    "server_credentials",
]

log = logging.getLogger("fedcrm.protocol")

PROTOCOL_VERSION = 5  # 2: signed keys, member list, consistency check (secure aggregation); 3: statistics masked too;
# 4: the member-list agreement (SECAGG_MEMBERS), signed by every member on the list, and its graph salt;
# 5: masked vectors packed at the sum's modulus (Vector.PACKED), quantized training sums (quantizationBits)

_MAX_MESSAGE = 256 * 1024 * 1024
#: How often each side pings a connection on which nothing else moves.
KEEPALIVE_MS = 30_000


def keepalive_options(every_ms: int = KEEPALIVE_MS) -> list[tuple[str, int]]:
    """Ping every ``every_ms`` so the long-lived task stream survives idle NAT and load-balancer timeouts, and
    accept the other side's pings at that pace.

    The accepting half matters as much: gRPC's receiving side by default tolerates pings on a connection without
    data only every 5 minutes, and after two early ones closes it (GOAWAY ``too_many_pings``). A participant
    that computes for minutes between messages -- training its GAN in the first round, a large tenant's local
    epoch -- then lost its connection and was dropped from the round as disconnected.
    """
    return [
        ("grpc.keepalive_time_ms", every_ms),
        ("grpc.keepalive_timeout_ms", min(10_000, every_ms)),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", every_ms // 2),
    ]


GRPC_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", _MAX_MESSAGE),
    ("grpc.max_receive_message_length", _MAX_MESSAGE),
    *keepalive_options(),
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

    def fingerprint(self) -> tuple[tuple[int, int, int, int], ...]:
        """Which version of the files is in place: (device, inode, size, mtime) of each, following symlinks.

        A mounted Secret's files are links into a ``..data`` folder the kubelet replaces at once, so any update
        changes the inodes; the same bytes written anew change the mtime. Missing files read as zeros.
        """
        out = []
        for path in (self.ca, self.cert, self.key):
            try:
                st = os.stat(path)
                out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
            except OSError:
                out.append((0, 0, 0, 0))
        return tuple(out)


class _ReloadingServerCertificate:
    """gRPC's certificate-configuration fetcher: called before each new handshake, it returns a new
    configuration when the files changed since the last one it loaded, else None (keep the current one)."""

    def __init__(self, tls: TlsFiles) -> None:
        self.tls = tls
        self._lock = threading.Lock()
        self.loaded, self.initial = self._load()

    def _load(self) -> tuple[tuple[tuple[int, int, int, int], ...], grpc.ServerCertificateConfiguration]:
        # Read between two looks at the fingerprint, so the three files are one version (not a key of the old
        # Secret with the certificate of the new one, were the kubelet to swap them in between).
        for _ in range(5):
            before = self.tls.fingerprint()
            ca, cert, key = self.tls.read()
            if self.tls.fingerprint() == before:
                return before, grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)
        raise OSError(f"the TLS files under {Path(self.tls.cert).parent} kept changing while being read")

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:
            if self.tls.fingerprint() == self.loaded:
                return None
            try:
                self.loaded, config = self._load()
            except OSError as err:  # mid-swap or gone: keep serving what was loaded, try again on the next handshake
                log.warning("cannot reload the TLS files, serving the previous certificate: %s", err)
                return None
        log.info("TLS files changed: new handshakes get the certificate in %s", self.tls.cert)
        return config


def server_credentials(tls: TlsFiles) -> grpc.ServerCredentials:
    """Mutual-TLS server credentials that follow the files: a new handshake after they changed (a renewed
    certificate, written by the operator and swapped in by the kubelet) gets the new certificate and CA, without
    restarting the server; open connections keep theirs."""
    fetcher = _ReloadingServerCertificate(tls)
    return grpc.dynamic_ssl_server_credentials(fetcher.initial, fetcher, require_client_authentication=True)


def client_channel(target: str, tls: TlsFiles, *, server_name: str | None = None) -> grpc.Channel:
    """A channel that presents this party's certificate and trusts only the federation CA.

    The files are read now: the channel reconnects with these credentials however long it lives, so a caller
    that may outlive a renewal makes a new channel when :meth:`TlsFiles.fingerprint` changed."""
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
