"""Keeping certificate Secrets current: each is reissued from its federation's CA at two thirds of its life.

The aggregator's and every participant's certificate Secret is checked on each
pass of its Federation (every few seconds, so a renewal is late by at most one
pass) and rewritten in place when it is due (:meth:`fedcrm.pki.Validity.due`),
no longer issued by the federation's CA (the CA Secret was recreated), or
unreadable. The rewrite is a patch conditional on the version read: of two
operator replicas working at once (a failover's overlap) one renews, the other
finds the Secret changed, leaves it, and reads it again on its next pass. The
kubelet swaps the mounted files in place and the processes pick them up
without restarting (``fedcrm.protocol.transport``).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import logging
from collections.abc import Callable
from typing import Any

from fedcrm.pki import CertificateAuthority, IssuedCertificate, read_validity
from fedcrm_operator.events import Event
from fedcrm_operator.kube import Kube

__all__ = ["RENEWED", "renew_if_due"]

log = logging.getLogger("fedcrm.operator")

#: The reason of the Normal Event posted on the owner of a renewed certificate.
RENEWED = "CertificateRenewed"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _why(held: dict[str, Any], ca: CertificateAuthority, now: dt.datetime) -> str | None:
    """Why the Secret's certificate must be replaced at ``now``, or None when it stays."""
    try:
        cert_pem = base64.b64decode((held.get("data") or {})["tls.crt"], validate=True)
        validity = read_validity(cert_pem)
    except (KeyError, ValueError, binascii.Error):
        return "its certificate was missing or unreadable"
    if not ca.signed(cert_pem):
        return f"certificate {validity.serial:x} was not issued by the federation's current CA"
    if validity.due(now):
        return (f"certificate {validity.serial:x} reached two thirds of its life (valid "
                f"{validity.not_before:%Y-%m-%dT%H:%M:%SZ} to {validity.not_after:%Y-%m-%dT%H:%M:%SZ})")
    return None


def renew_if_due(kube: Kube, held: dict[str, Any], ca: CertificateAuthority, issue: Callable[[], IssuedCertificate],
                 *, now: dt.datetime) -> Event | None:
    """Reissue the certificate of the TLS Secret ``held`` (as read, with its resourceVersion) with ``issue`` when
    it is due; the Event to post on its owner when this call renewed it, else None."""
    why = _why(held, ca, now)
    if why is None:
        return None
    issued = issue()
    data = {"ca.crt": _b64(ca.cert_pem), "tls.crt": _b64(issued.cert_pem), "tls.key": _b64(issued.key_pem)}
    if kube.replace_data(held, data) is None:
        return None  # changed since it was read: renewed by another replica, or deleted; the next pass looks again
    fresh = read_validity(issued.cert_pem)
    name = held["metadata"]["name"]
    log.info("renewed the certificate in Secret %s/%s: %s", held["metadata"]["namespace"], name, why)
    return Event("Normal", RENEWED,
                 f"Secret {name}: {why}; replaced by certificate {fresh.serial:x}, valid until "
                 f"{fresh.not_after:%Y-%m-%dT%H:%M:%SZ}, renewed from {fresh.renew_at:%Y-%m-%dT%H:%M:%SZ}")
