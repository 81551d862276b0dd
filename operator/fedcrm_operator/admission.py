"""Two-sided consent, as a pure decision.

A Participant joins only when its Federation exists, allows its namespace, is
still enrolling (or already counts it in), and the Participant's own spec is
valid. Every refusal carries a reason and a message that says who must do what.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedcrm.spec.manifests import Federation, Participant, Phase

__all__ = ["Decision", "decide"]


@dataclass(frozen=True)
class Decision:
    admitted: bool
    reason: str
    message: str


def decide(participant: Participant, federation: Federation | None, *, phase: Phase, training: list[str]) -> Decision:
    """Whether ``participant`` takes part; ``training`` lists who the running training already counts."""
    ref = participant.spec.federation_ref
    where = f"{ref.namespace}/{ref.name}"
    if federation is None:
        return Decision(
            False,
            "FederationNotFound",
            f"Federation {where} does not exist; check spec.federationRef or ask the coordinator to create it",
        )
    namespace = participant.metadata.namespace
    if namespace not in federation.spec.participants.namespaces:
        return Decision(
            False,
            "NamespaceNotAllowed",
            f"Federation {where} does not allow namespace {namespace!r}; ask its owner to add it to "
            "spec.participants.namespaces",
        )
    if phase in (Phase.training, Phase.succeeded, Phase.failed) and participant.identity not in training:
        return Decision(
            False,
            "EnrollmentClosed",
            f"Federation {where} closed enrollment when it started training ({len(training)} participants); "
            "this Participant can join its next run",
        )
    data = participant.spec.data
    if data.sql is not None and not data.network_egress():
        return Decision(
            False,
            "EgressMissing",
            "spec.data.sql.egress is empty: the training pod's NetworkPolicy lets it reach only what the Participant "
            "declares; add the database's address (cidr, e.g. 10.20.0.15/32) or its pods in this namespace "
            "(podSelector), with its port (e.g. ports: [5432])",
        )
    return Decision(True, "Admitted", f"admitted to Federation {where} as {participant.identity}")
