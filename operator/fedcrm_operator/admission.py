"""Two-sided consent, as a pure decision.

A Participant joins only when its Federation exists, allows its namespace, is
still enrolling (or already counts it in), meets the tenant's own minimum terms
(``spec.requires``), still has the terms the tenant consented to, and the
Participant's own spec is valid. Every refusal carries a reason and a message
that says who must do what.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from fedcrm.spec.manifests import Federation, Participant, Phase
from fedcrm.spec.terms import privacy_summary, terms_digest, unmet_requirements

__all__ = ["ACCESS_NOT_GRANTED", "Decision", "Sibling", "accepted_terms", "access_not_granted", "decide",
           "siblings_by_namespace"]

#: The reason on a Participant (or Federation) whose namespace has not granted the operator access.
ACCESS_NOT_GRANTED = "AccessNotGranted"


@dataclass(frozen=True)
class Sibling:
    """A Participant of the same namespace naming the same Federation (the one being decided included)."""

    identity: str
    created: str  # metadata.creationTimestamp (RFC 3339 sorts as text)


@dataclass(frozen=True)
class Decision:
    admitted: bool
    reason: str
    message: str


def siblings_by_namespace(bodies: Iterable[dict[str, Any]]) -> dict[str, list[Sibling]]:
    """Per namespace, the Participant objects (all naming one Federation) it holds."""
    out: dict[str, list[Sibling]] = {}
    for body in bodies:
        meta = body["metadata"]
        out.setdefault(meta["namespace"], []).append(
            Sibling(f"{meta['namespace']}/{meta['name']}", meta.get("creationTimestamp") or ""))
    return out


def _namespace_representative(siblings: Sequence[Sibling], training: list[str]) -> str | None:
    """The one Participant a namespace joins with: the one already training, else the oldest (then by name)."""
    if not siblings:
        return None
    in_training = [s.identity for s in siblings if s.identity in training]
    if in_training:
        return min(in_training)
    return min(siblings, key=lambda s: (s.created, s.identity)).identity


def accepted_terms(body: dict[str, Any]) -> str | None:
    """The terms digest a Participant object consented to: its spec's pin, else what its admission recorded."""
    return (body.get("spec") or {}).get("acceptedTerms") or (body.get("status") or {}).get("acceptedTerms") or None


def decide(participant: Participant, federation: Federation | None, *, phase: Phase, training: list[str],
           siblings: Sequence[Sibling] = (), accepted: str | None = None) -> Decision:
    """Whether ``participant`` takes part; ``training`` lists who the running training already counts.

    ``accepted``: the terms digest the tenant consented to (:func:`accepted_terms`), None before its first
    admission — consent is then to the terms as they are. A participant already training is not asked again:
    the running rounds keep the terms they started with, whatever the spec says now.

    ``siblings``: the Participants of its namespace that name the same Federation. A namespace is one tenant
    and joins once: minParticipants and the secure-aggregation threshold count tenants, and a tenant with
    several Participants could otherwise meet them alone, then subtract its own updates from the sum.
    """
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
    representative = _namespace_representative(siblings, training)
    if representative is not None and representative != participant.identity:
        return Decision(
            False,
            "OneParticipantPerNamespace",
            f"namespace {namespace!r} already joins Federation {where} through Participant {representative}; a "
            "tenant takes part once (minParticipants and secure aggregation count tenants). Delete one of them",
        )
    if phase in (Phase.training, Phase.succeeded, Phase.failed) and participant.identity not in training:
        return Decision(
            False,
            "EnrollmentClosed",
            f"Federation {where} closed enrollment when it started training ({len(training)} participants); "
            "this Participant can join its next run",
        )
    unmet = unmet_requirements(participant.spec.requires, federation.spec)
    if unmet:
        return Decision(
            False,
            "RequirementsNotMet",
            f"Federation {where} is weaker than this Participant's spec.requires: {'; '.join(unmet)}. Ask its owner "
            "to strengthen it, or relax spec.requires",
        )
    current = terms_digest(federation.spec)
    if accepted is not None and accepted != current and participant.identity not in training:
        return Decision(
            False,
            "TermsChanged",
            f"Federation {where} changed its terms since this Participant consented to them (accepted "
            f"{accepted[:12]}, now {current[:12]}; now: {privacy_summary(federation.spec)}). Review them, and to "
            f"take part set spec.acceptedTerms: {current}",
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


def access_not_granted(namespace: str, user: str, *, refused: str = "", coordinator: bool = False) -> str:
    """What to do when RBAC refuses the operator in ``namespace``: the third consent is the namespace's own.

    A tenant namespace grants the operator its rights by installing the tenant chart (its Role and RoleBinding);
    a coordinator namespace by being listed in the operator chart's ``coordinatorNamespaces``. ``user`` is the
    operator's identity as the API server named it (``system:serviceaccount:<namespace>:<name>``), ``refused``
    what the API server refused (``get secrets``).
    """
    said = f" (refused: {refused})" if refused else ""
    if coordinator:
        return (f"the operator ({user}) has no access to namespace {namespace!r}{said}, so it cannot create this "
                "Federation's aggregator; add the namespace to the operator chart's coordinatorNamespaces "
                "(helm upgrade ... --set coordinatorNamespaces={...})")
    account = user.removeprefix("system:serviceaccount:")
    sa_namespace, _, sa_name = account.partition(":")
    chart_values = (f" --set operator.serviceAccount.namespace={sa_namespace},operator.serviceAccount.name={sa_name}"
                    if sa_name else "")
    return (f"namespace {namespace!r} has not granted the operator ({user}) access{said}, so it cannot create this "
            f"Participant's certificate, config, NetworkPolicy and Job; install the tenant chart here (helm install "
            f"... charts/fedcrm-tenant -n {namespace}{chart_values}; its Role and RoleBinding are the tenant's "
            "consent), or create that Role and RoleBinding yourself (docs/operator.md#rbac)")
