"""Names and labels of everything the operator creates, in one place.

Children in tenant namespaces cannot carry owner references to a Federation in
another namespace, so every child carries labels naming its Federation (and,
in a tenant namespace, its Participant): deletion and idempotency both find
children by these labels.
"""

from __future__ import annotations

import hashlib

__all__ = [
    "FEDERATION_LABEL",
    "FEDERATION_NAMESPACE_LABEL",
    "MANAGED_BY",
    "PARTICIPANT_LABEL",
    "ROLE_LABEL",
    "Names",
    "federation_key",
]

MANAGED_BY = {"app.kubernetes.io/managed-by": "fedcrm-operator"}
FEDERATION_LABEL = "fedcrm.io/federation"
FEDERATION_NAMESPACE_LABEL = "fedcrm.io/federation-namespace"
PARTICIPANT_LABEL = "fedcrm.io/participant"
ROLE_LABEL = "fedcrm.io/role"


def federation_key(namespace: str, name: str) -> str:
    return f"{namespace}/{name}"


def _bounded(name: str, limit: int = 63) -> str:
    """Kubernetes names have limits; long ones keep a readable prefix and a hash for uniqueness."""
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[: limit - 9].rstrip('-')}-{digest}"


class Names:
    """The names of one federation's children."""

    def __init__(self, namespace: str, federation: str) -> None:
        self.namespace = namespace
        self.federation = federation

    # coordinator side
    @property
    def aggregator(self) -> str:  # StatefulSet and headless Service
        return _bounded(f"{self.federation}-aggregator", 52)  # pod names add "-0"; StatefulSet names add a hash

    @property
    def aggregator_client_service(self) -> str:
        return _bounded(f"{self.federation}-aggregator-grpc")

    @property
    def ca_secret(self) -> str:
        return _bounded(f"{self.federation}-ca")

    @property
    def server_secret(self) -> str:
        return _bounded(f"{self.federation}-aggregator-tls")

    @property
    def aggregator_config(self) -> str:
        return _bounded(f"{self.federation}-aggregator-config")

    @property
    def aggregator_policy(self) -> str:
        return _bounded(f"{self.federation}-aggregator")

    # tenant side
    def participant_prefix(self, participant: str) -> str:
        return _bounded(f"{self.federation}-{participant}", 50)

    def client_secret(self, participant: str) -> str:
        return _bounded(f"{self.participant_prefix(participant)}-tls")

    def training_job(self, participant: str) -> str:
        return self.participant_prefix(participant)

    def participant_config(self, participant: str) -> str:
        return _bounded(f"{self.participant_prefix(participant)}-config")

    def participant_policy(self, participant: str) -> str:
        return _bounded(f"{self.participant_prefix(participant)}-training")

    # labels
    def labels(self, role: str, participant: str | None = None) -> dict[str, str]:
        labels = {
            **MANAGED_BY,
            "app.kubernetes.io/part-of": "fedcrm",
            FEDERATION_LABEL: _bounded(self.federation),
            FEDERATION_NAMESPACE_LABEL: self.namespace,
            ROLE_LABEL: role,
        }
        if participant is not None:
            labels[PARTICIPANT_LABEL] = participant
        return labels

    def selector(self) -> str:
        """Label selector matching every child of this federation, in any namespace."""
        return f"{FEDERATION_LABEL}={_bounded(self.federation)},{FEDERATION_NAMESPACE_LABEL}={self.namespace}"

    def aggregator_host(self, cluster_domain: str) -> str:
        return f"{self.aggregator_client_service}.{self.namespace}.svc.{cluster_domain}"
