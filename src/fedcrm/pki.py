"""A small certificate authority per federation.

Each federation gets its own CA, so a certificate from one federation opens
nothing in another. The aggregator's certificate names the hosts it is reached
by; each participant's certificate carries its identity ``<namespace>/<name>``
as the subject common name, which the aggregator checks on every call.
Keys are ECDSA P-256: small, fast to generate, and supported by gRPC's TLS.

Lifetimes: the CA lives :data:`CA_LIFETIME` (ten years); the leaves it issues live
a configurable, much shorter time (:data:`DEFAULT_LEAF_LIFETIME`, 90 days) and are
renewed at :data:`RENEW_AT` (two thirds) of their life, so a renewed certificate
reaches every pod long before the old one expires (:func:`read_validity`,
:meth:`Validity.due`). A leaf never outlives the CA that signed it.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CA_LIFETIME",
    "DEFAULT_LEAF_LIFETIME",
    "MIN_LEAF_LIFETIME",
    "RENEW_AT",
    "CertificateAuthority",
    "IssuedCertificate",
    "Validity",
    "read_validity",
    "write_pem_files",
]

#: How long a federation's CA is valid. It is not rotated (see docs/operator.md, "Certificate lifetimes").
CA_LIFETIME = dt.timedelta(days=3650)
#: How long an aggregator or participant certificate is valid unless the operator is told otherwise.
DEFAULT_LEAF_LIFETIME = dt.timedelta(days=90)
#: The shortest leaf lifetime accepted: below it, whole-second certificate times make the renewal point meaningless.
MIN_LEAF_LIFETIME = dt.timedelta(seconds=10)
#: The fraction of a certificate's life after which it is due for renewal (numerator, denominator).
RENEW_AT = (2, 3)
#: Certificates are valid from a little before their issue, for clocks running behind the issuer's: five minutes,
#: or a tenth of the lifetime when that is shorter (so a short-lived certificate is not due the moment it is made).
_BACKDATE = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class IssuedCertificate:
    cert_pem: bytes
    key_pem: bytes


@dataclass(frozen=True)
class Validity:
    """When a certificate is valid, and which one it is (its serial number)."""

    serial: int
    not_before: dt.datetime  # timezone-aware, UTC
    not_after: dt.datetime

    @property
    def renew_at(self) -> dt.datetime:
        """``notBefore + 2/3 (notAfter - notBefore)``: from then on a renewal is due."""
        numerator, denominator = RENEW_AT
        return self.not_before + (self.not_after - self.not_before) * numerator / denominator

    def due(self, now: dt.datetime) -> bool:
        """Whether the certificate should be replaced at ``now`` (timezone-aware): two thirds of its life have
        passed, or it is not valid yet, or no longer (a clock jump; either way it cannot be trusted to work)."""
        return now >= self.renew_at or now < self.not_before


def read_validity(cert_pem: bytes) -> Validity:
    """Serial number, notBefore and notAfter of the first certificate in ``cert_pem``. Raises ValueError when
    ``cert_pem`` holds no readable certificate."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    return Validity(cert.serial_number, cert.not_valid_before_utc, cert.not_valid_after_utc)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class CertificateAuthority:
    """Issues server and client certificates under one self-signed root."""

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.cert = cert
        self.key = key

    @classmethod
    def create(cls, name: str) -> CertificateAuthority:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"fedcrm CA {name}"[:64])])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + CA_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    @classmethod
    def load(cls, cert_pem: bytes, key_pem: bytes) -> CertificateAuthority:
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("the CA key must be an EC key")
        return cls(x509.load_pem_x509_certificate(cert_pem), key)

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return _key_pem(self.key)

    def signed(self, cert_pem: bytes) -> bool:
        """Whether ``cert_pem`` was issued by this CA (its signature verifies with this CA's key)."""
        try:
            x509.load_pem_x509_certificate(cert_pem).verify_directly_issued_by(self.cert)
        except (ValueError, TypeError, InvalidSignature):
            return False
        return True

    def _issue(self, common_name: str, sans: list[x509.GeneralName], usage: ExtendedKeyUsageOID, *,
               lifetime: dt.timedelta, now: dt.datetime | None) -> IssuedCertificate:
        if lifetime < MIN_LEAF_LIFETIME:
            raise ValueError(f"a certificate lifetime of {lifetime} is shorter than the minimum {MIN_LEAF_LIFETIME}")
        key = ec.generate_private_key(ec.SECP256R1())
        now = now or _now()
        # Never beyond the CA's own end: a leaf outliving its CA could not be verified anyway.
        not_after = min(now + lifetime, self.cert.not_valid_after_utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - min(_BACKDATE, lifetime / 10))
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return IssuedCertificate(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))

    def issue_server(self, hosts: list[str], *, lifetime: dt.timedelta = DEFAULT_LEAF_LIFETIME,
                     now: dt.datetime | None = None) -> IssuedCertificate:
        """The aggregator's certificate, valid for each DNS name or IP address in ``hosts``, for ``lifetime``
        from ``now`` (default: the current time)."""
        sans: list[x509.GeneralName] = []
        for h in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                sans.append(x509.DNSName(h))
        return self._issue(hosts[0], sans, ExtendedKeyUsageOID.SERVER_AUTH, lifetime=lifetime, now=now)

    def issue_client(self, identity: str, *, lifetime: dt.timedelta = DEFAULT_LEAF_LIFETIME,
                     now: dt.datetime | None = None) -> IssuedCertificate:
        """A participant's certificate; ``identity`` is ``<namespace>/<name>``."""
        return self._issue(identity, [], ExtendedKeyUsageOID.CLIENT_AUTH, lifetime=lifetime, now=now)


def write_pem_files(folder: Path, stem: str, issued: IssuedCertificate) -> tuple[Path, Path]:
    """Write ``<stem>.crt`` and ``<stem>.key`` (owner-only) and return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / f"{stem}.crt", folder / f"{stem}.key"
    cert_path.write_bytes(issued.cert_pem)
    key_path.touch(mode=0o600, exist_ok=True)
    key_path.chmod(0o600)
    key_path.write_bytes(issued.key_pem)
    return cert_path, key_path
