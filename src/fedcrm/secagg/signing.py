"""Who said it: signatures that bind a participant's round keys and survivor view to its certificate.

Mutual TLS authenticates each participant to the aggregator, never to the
other participants: everything a participant learns about its peers is relayed
by the aggregator. Against an aggregator that deviates from the protocol
(Bonawitz et al., CCS 2017, the active model), each participant therefore signs
what its peers must be able to trust, with the private key of the client
certificate the federation's CA issued it:

* its two advertised public keys for one round (:func:`keys_message`), so the
  aggregator cannot substitute keys of its own and read the shares meant for a
  neighbour or recompute the pairwise masks;
* the survivor set it was told in the consistency check
  (:func:`survivors_message`), so the aggregator cannot tell one part of a
  neighbourhood that a participant survived and another that it dropped out.

Each message binds the round id and the round's public graph seed (which
itself hashes the federation, round, phase and member list, see
:func:`fedcrm.secagg.graph.public_seed`), so a signature is never valid in
another round or for another roster.

A peer's certificate is checked against the federation CA the participant
already trusts for TLS: issued directly by it (the aggregator holds no CA
key), currently valid, not a CA, issued for client authentication and not for
server authentication (so the aggregator's own certificate can never sign as a
participant), and its common name must be the identity the member list gives
that participant's id. ECDSA P-256 with SHA-256, the key type of
:mod:`fedcrm.pki`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "PeerVerifier",
    "Signer",
    "UntrustedPeer",
    "keys_message",
    "survivors_message",
]

_KEYS_LABEL = b"fedcrm-secagg/advertised-keys/v2"
_SURVIVORS_LABEL = b"fedcrm-secagg/survivors/v2"
_ALGORITHM = ec.ECDSA(hashes.SHA256())
#: An ECDSA P-256 signature in DER is at most 72 bytes; anything longer is refused unparsed.
MAX_SIGNATURE_BYTES = 72
#: A certificate larger than this is refused before it is parsed (ours are about 500 bytes).
MAX_CERTIFICATE_BYTES = 4096


class UntrustedPeer(ValueError):
    """A certificate or signature that does not prove what it claims (wrong CA, identity, usage or signature)."""


def keys_message(round_id: int, public_seed: bytes, client_id: int, c_pk: bytes, s_pk: bytes) -> bytes:
    """What a participant signs when it advertises its keys: round, graph seed, its id and both keys."""
    return _KEYS_LABEL + struct.pack(">QQ", round_id, client_id) + public_seed + c_pk + s_pk


def survivors_message(round_id: int, public_seed: bytes, survivors: Sequence[int]) -> bytes:
    """What a participant signs in the consistency check: round, graph seed and the sorted survivor ids."""
    ids = sorted(survivors)
    digest = hashlib.sha256(struct.pack(f">{len(ids)}Q", *ids)).digest()
    return _SURVIVORS_LABEL + struct.pack(">QQ", round_id, len(ids)) + public_seed + digest


@dataclass(frozen=True)
class Signer:
    """This participant's certificate (DER) and its private key; signs with ECDSA P-256 / SHA-256."""

    identity: str
    certificate: bytes
    private_key: ec.EllipticCurvePrivateKey

    @classmethod
    def from_pem(cls, cert_pem: bytes, key_pem: bytes) -> Signer:
        """From the PEM files of the participant's mutual-TLS client certificate and key."""
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("the participant's key must be an EC key (fedcrm's PKI issues ECDSA P-256)")
        if key.public_key().public_numbers() != cert.public_key().public_numbers():  # type: ignore[union-attr]
            raise ValueError("the participant's key does not belong to its certificate")
        return cls(identity=_common_name(cert), certificate=cert.public_bytes(serialization.Encoding.DER),
                   private_key=key)

    def sign(self, message: bytes) -> bytes:
        return self.private_key.sign(message, _ALGORITHM)


def _common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise UntrustedPeer("the certificate must carry exactly one common name (the participant's identity)")
    value = names[0].value
    return value if isinstance(value, str) else value.decode("utf-8")


class PeerVerifier:
    """Checks peers' certificates against the federation CA, and their signatures.

    A certificate's check (chain, validity, usage) is cached by its DER bytes
    for ``cache_seconds``: a participant sees the same peers every round, and
    re-verifying the chain each time would double the signature work per peer.
    """

    def __init__(self, ca_cert_pem: bytes, *, cache_seconds: float = 3600.0) -> None:
        self.ca = x509.load_pem_x509_certificate(ca_cert_pem)
        self.cache_seconds = cache_seconds
        self._checked: dict[bytes, tuple[str, ec.EllipticCurvePublicKey, dt.datetime]] = {}

    def public_key(self, certificate: bytes, identity: str) -> ec.EllipticCurvePublicKey:
        """The P-256 key of ``certificate`` if the federation CA issued it to participant ``identity``."""
        now = dt.datetime.now(dt.timezone.utc)
        cached = self._checked.get(certificate)
        if cached is None or now >= cached[2]:
            cached = self._check(certificate, now)
            self._checked[certificate] = cached
        name, key, _ = cached
        if name != identity:
            raise UntrustedPeer(f"the certificate is {name!r}'s, not {identity!r}'s")
        return key

    def _check(self, certificate: bytes, now: dt.datetime) -> tuple[str, ec.EllipticCurvePublicKey, dt.datetime]:
        if not isinstance(certificate, bytes) or not 0 < len(certificate) <= MAX_CERTIFICATE_BYTES:
            raise UntrustedPeer("no certificate, or one too large to be a participant's")
        try:
            cert = x509.load_der_x509_certificate(certificate)
        except ValueError:
            raise UntrustedPeer("the certificate does not parse") from None
        try:
            cert.verify_directly_issued_by(self.ca)
        except (ValueError, TypeError, InvalidSignature):
            raise UntrustedPeer("the certificate was not issued by this federation's CA") from None
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise UntrustedPeer("the certificate is not valid now")
        try:
            if cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
                raise UntrustedPeer("a CA certificate cannot sign as a participant")
            usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            raise UntrustedPeer("the certificate lacks basic constraints or extended key usage") from None
        if ExtendedKeyUsageOID.CLIENT_AUTH not in usage or ExtendedKeyUsageOID.SERVER_AUTH in usage:
            # The aggregator's certificate is a server certificate: it can never stand in for a participant.
            raise UntrustedPeer("the certificate is not a participant's (client authentication only)")
        key = cert.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
            raise UntrustedPeer("the certificate's key is not ECDSA P-256")
        expires = min(cert.not_valid_after_utc, now + dt.timedelta(seconds=self.cache_seconds))
        return _common_name(cert), key, expires

    @staticmethod
    def verify(key: ec.EllipticCurvePublicKey, signature: bytes, message: bytes) -> None:
        """Raise :class:`UntrustedPeer` unless ``signature`` is ``key``'s over ``message``."""
        if not isinstance(signature, bytes) or not 0 < len(signature) <= MAX_SIGNATURE_BYTES:
            raise UntrustedPeer("a missing or malformed signature")
        try:
            key.verify(signature, message, _ALGORITHM)
        except InvalidSignature:
            raise UntrustedPeer("a signature that does not verify") from None
