"""Reconciling one Federation: its coordinator-side children, its admitted participants' children, its phase.

Level-based: every pass computes the whole desired state from the Federation,
the Participants that name it and what already exists, applies it, and
removes what is no longer wanted. Passes are idempotent, so a re-delivered
event, a timer tick or an operator restart in the middle of a pass converge on
the same objects and never duplicate one.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import kopf

from fedcrm.errors import ManifestError
from fedcrm.pki import CertificateAuthority, IssuedCertificate
from fedcrm.privacy import plans
from fedcrm.runconfig import AggregatorConfig
from fedcrm.spec.manifests import Federation, Participant, Phase
from fedcrm_operator import builders, certificates, enrollment
from fedcrm_operator.admission import (
    ACCESS_NOT_GRANTED,
    Decision,
    accepted_terms,
    access_not_granted,
    decide,
    siblings_by_namespace,
)
from fedcrm_operator.aggregator_status import AggregatorStatus, fetch_status
from fedcrm_operator.conditions import condition, find, set_condition, stamped
from fedcrm_operator.events import Event
from fedcrm_operator.kube import AccessDenied, Kube
from fedcrm_operator.naming import Names
from fedcrm_operator.resources import API, changed_sections, frozen_digest, parse_federation, parse_participant
from fedcrm_operator.settings import OperatorSettings

__all__ = ["COORDINATOR_KINDS", "TENANT_KINDS", "Outcome", "cleanup", "fetch_aggregator", "model_condition",
           "progress_fields", "reconcile"]

log = logging.getLogger("fedcrm.operator")

#: Kinds of children in tenant namespaces, for sweeps by label. Pods are listed so deletion waits for a Job's
#: pods too. Not Secrets: a tenant's Role lets the operator read only the certificate Secrets it names
#: (``resourceNames``), never list them, so those are deleted by name (:func:`_remove_children`).
TENANT_KINDS = [
    ("batch/v1", "Job"),
    ("v1", "Pod"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
    ("v1", "ConfigMap"),
]
#: Kinds of children in the coordinator namespace, where the operator chart's Role lets it list Secrets too.
COORDINATOR_KINDS = [
    ("apps/v1", "StatefulSet"),
    ("v1", "Service"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("v1", "PersistentVolumeClaim"),
    *TENANT_KINDS,
    ("v1", "Secret"),
]


@dataclass
class Outcome:
    """What a pass found, for the status and the metrics."""

    status: dict[str, Any]
    decisions: dict[str, Decision] = field(default_factory=dict)
    #: Events to post, each on the object it concerns (a Federation or a Participant body): renewed certificates.
    events: list[tuple[dict[str, Any], Event]] = field(default_factory=list)


def _invalid(status: dict[str, Any], err: ManifestError, generation: int) -> Outcome:
    conditions = set_condition(status.get("conditions", []), condition("SpecAccepted", False, "InvalidSpec", str(err)))
    conditions = set_condition(conditions, condition("Ready", False, "InvalidSpec", "fix the spec: see SpecAccepted"))
    return Outcome({**status, "phase": status.get("phase") or Phase.pending.value,
                    "conditions": stamped(conditions, generation)})


def _candidates(bodies: list[dict[str, Any]]) -> list[Participant]:
    """Participants that name this federation and parse; an invalid one is reported by its own handler."""
    out = []
    for body in bodies:
        try:
            out.append(parse_participant(body))
        except ManifestError:
            continue
    return sorted(out, key=lambda p: p.identity)


def _ca(kube: Kube, names: Names, owner: dict[str, Any]) -> CertificateAuthority:
    """The federation's CA: created once, then always read back, so certificates stay valid across restarts."""
    def build() -> dict[str, Any]:
        fresh = CertificateAuthority.create(f"{names.namespace}/{names.federation}")
        return builders.owned_by(builders.ca_secret(names, cert_pem=fresh.cert_pem, key_pem=fresh.key_pem), owner)

    held = kube.ensure("v1", "Secret", names.namespace, names.ca_secret, build)
    data = held.get("data") or {}
    return CertificateAuthority.load(base64.b64decode(data["ca.crt"]), base64.b64decode(data["ca.key"]))


def _server_hosts(names: Names, settings: OperatorSettings) -> list[str]:
    short = names.aggregator_client_service
    return [
        names.aggregator_host(settings.cluster_domain),
        f"{short}.{names.namespace}.svc",
        f"{short}.{names.namespace}",
        short,
    ]


def _tenant_children(
    kube: Kube, names: Names, federation: Federation, participant: Participant, body: dict[str, Any] | None,
    ca: CertificateAuthority, settings: OperatorSettings, *, finished: bool, now: dt.datetime,
) -> Event | None:
    """The participant's certificate (renewed when due: the Event to post on the Participant), config, policy and
    training Job (the Job only while the federation runs: a Job deleted after the federation finished is not
    brought back to dial a finished aggregator)."""
    ns, name = participant.metadata.namespace, participant.metadata.name

    def issue() -> IssuedCertificate:
        return ca.issue_client(participant.identity, lifetime=settings.certificate_lifetime)

    def certificate() -> dict[str, Any]:
        issued = issue()
        secret = builders.client_secret(names, participant, ca_pem=ca.cert_pem, cert_pem=issued.cert_pem, key_pem=issued.key_pem)
        return builders.owned_by(secret, body)

    def job() -> dict[str, Any]:
        connect_timeout = federation.spec.participants.enrollment_timeout_seconds + 600
        return builders.owned_by(builders.training_job(names, federation, participant, settings, connect_timeout=connect_timeout), body)

    held = kube.ensure("v1", "Secret", ns, names.client_secret(name), certificate)
    renewed = certificates.renew_if_due(kube, held, ca, issue, now=now)
    kube.apply(builders.owned_by(builders.participant_config_map(names, federation, participant), body))
    kube.apply(builders.owned_by(builders.participant_network_policy(names, participant, settings), body))
    if not finished:
        kube.ensure("batch/v1", "Job", ns, names.training_job(name), job)
    return renewed


def _tenant_keys(names: Names, participant: Participant) -> set[tuple[str, str, str]]:
    """(kind, namespace, name) of every child of one tenant, kept by the sweep even while some fail to apply."""
    ns, name = participant.metadata.namespace, participant.metadata.name
    return {
        ("Secret", ns, names.client_secret(name)),
        ("ConfigMap", ns, names.participant_config(name)),
        ("NetworkPolicy", ns, names.participant_policy(name)),
        ("Job", ns, names.training_job(name)),
    }


def _tenant_namespaces(federation: Federation, participant_bodies: list[dict[str, Any]], training: list[str]) -> set[str]:
    """Where this federation's tenant children can be: the allowed namespaces, those of the Participants naming
    it, and those training counts. The sweeps list these one by one, never the whole cluster."""
    namespaces = set(federation.spec.participants.namespaces)
    namespaces |= {b["metadata"]["namespace"] for b in participant_bodies}
    namespaces |= {identity.split("/", 1)[0] for identity in training}
    return namespaces


#: How often a pass also sweeps its tenant namespaces by label (one list per kind and namespace) for children
#: that no Participant it knows names: one that moved to another Federation, or left by an older operator.
#: Children of the Participants it knows are removed by name on every pass, and a deleted Participant's go with
#: it (owner references).
LABEL_SWEEP_SECONDS = 30.0


def _remove_children(kube: Kube, names: Names, participant_bodies: list[dict[str, Any]], keep: set[str],
                     *, kinds: tuple[tuple[str, str], ...]) -> None:
    """Delete by name the children (of ``kinds``, by their deterministic names) of every Participant naming this
    federation that is not in ``keep`` (identities). By name: the tenant's Role does not let the operator list
    Secrets, and a name known absent costs no request (:meth:`Kube.delete_named`)."""
    name_of = {"Secret": names.client_secret, "ConfigMap": names.participant_config,
               "NetworkPolicy": names.participant_policy, "Job": names.training_job}
    for body in participant_bodies:
        meta = body["metadata"]
        if f"{meta['namespace']}/{meta['name']}" in keep:
            continue
        for api_version, kind in kinds:
            kube.delete_named(api_version, kind, meta["namespace"], name_of[kind](meta["name"]))


_BY_NAME = (("batch/v1", "Job"), ("v1", "ConfigMap"), ("networking.k8s.io/v1", "NetworkPolicy"), ("v1", "Secret"))

CHILDREN_CONDITION = "ChildrenCreated"


def _report_children(kube: Kube, body: dict[str, Any] | None, problem: tuple[str, str] | None) -> None:
    """The tenant's own Participant says whether its children could be created; patched only on a change.
    ``problem``: the reason (``ApiError``, ``AccessNotGranted``) and the message."""
    if body is None:
        return
    meta = body["metadata"]
    conditions = (body.get("status") or {}).get("conditions") or []
    wanted = (condition(CHILDREN_CONDITION, True, "Created", "certificate, config, NetworkPolicy and Job exist")
              if problem is None else condition(CHILDREN_CONDITION, False, *problem))
    current = find(conditions, CHILDREN_CONDITION)
    if current is None and problem is None:
        return  # nothing to correct: absence means no problem was ever seen
    if current and (current.get("status"), current.get("reason"), current.get("message")) == (
            wanted["status"], wanted["reason"], wanted["message"]):
        return
    kube.patch_status(API, "Participant", meta["namespace"], meta["name"],
                      {"conditions": set_condition(conditions, wanted)})


def _started_with(kube: Kube, names: Names) -> AggregatorConfig | None:
    cm = kube.get("v1", "ConfigMap", names.namespace, names.aggregator_config)
    if not cm:
        return None
    try:
        return AggregatorConfig.model_validate(json.loads(cm["data"][builders.AGGREGATOR_CONFIG_KEY]))
    except (KeyError, ValueError):
        return None


def reconcile(
    kube: Kube, body: dict[str, Any], participant_bodies: list[dict[str, Any]], settings: OperatorSettings
) -> Outcome:
    meta = body["metadata"]
    names = Names(meta["namespace"], meta["name"])
    status: dict[str, Any] = dict(body.get("status") or {})
    try:
        federation = parse_federation(body)
    except ManifestError as err:
        return _invalid(status, err, meta.get("generation", 0))
    cache = getattr(kube, "cache", None)
    if cache is not None:
        cache.coordinator(names.namespace)  # its Secrets, Services and StatefulSet are watched too
    phase = Phase(status.get("phase") or Phase.pending.value)
    conditions = set_condition(status.get("conditions", []), condition("SpecAccepted", True, "Valid", "the spec is valid"))
    training_ids: list[str] = list(status.get("participants") or [])
    if phase is Phase.pending:
        phase = Phase.enrolling

    by_identity = {f"{b['metadata']['namespace']}/{b['metadata']['name']}": b for b in participant_bodies}
    candidates = _candidates(participant_bodies)
    siblings = siblings_by_namespace(participant_bodies)
    decisions = {p.identity: decide(p, federation, phase=phase, training=training_ids,
                                    siblings=siblings.get(p.metadata.namespace, []),
                                    accepted=accepted_terms(by_identity[p.identity]))
                 for p in candidates}
    admitted = [p for p in candidates if decisions[p.identity].admitted]
    now = dt.datetime.now(dt.timezone.utc)
    events: list[tuple[dict[str, Any], Event]] = []

    # Coordinator side. The operator chart grants the operator its rights only in its coordinatorNamespaces.
    try:
        ca = _ca(kube, names, body)

        def issue_server() -> IssuedCertificate:
            return ca.issue_server(_server_hosts(names, settings), lifetime=settings.certificate_lifetime)

        def server_certificate() -> dict[str, Any]:
            issued = issue_server()
            return builders.owned_by(
                builders.server_secret(names, ca_pem=ca.cert_pem, cert_pem=issued.cert_pem, key_pem=issued.key_pem), body)

        held = kube.ensure("v1", "Secret", names.namespace, names.server_secret, server_certificate)
        renewed = certificates.renew_if_due(kube, held, ca, issue_server, now=now)
        if renewed is not None:
            events.append((body, renewed))
        for service in builders.aggregator_services(names, settings):
            kube.apply(builders.owned_by(service, body))
        kube.apply(builders.owned_by(
            builders.aggregator_network_policy(names, [p.metadata.namespace for p in admitted], settings), body))
        if kube.has_kind("monitoring.coreos.com/v1", "ServiceMonitor"):
            kube.apply(builders.owned_by(builders.service_monitor(names), body))
    except AccessDenied as err:
        if err.namespace not in (None, names.namespace):
            raise
        message = access_not_granted(names.namespace, err.user, refused=f"{err.verb} {err.resource}", coordinator=True)
        conditions = set_condition(conditions, condition("Ready", False, ACCESS_NOT_GRANTED, message))
        return Outcome({**status, "phase": status.get("phase") or Phase.pending.value,
                        "observedGeneration": meta.get("generation", 0),
                        "conditions": stamped(conditions, meta.get("generation", 0))}, decisions, events)

    # Tenant side: children of admitted participants; everything else of ours in tenant namespaces goes.
    # The API refusing one tenant's child (a quota, a policy, a webhook) is that tenant's problem: it is
    # written on its Participant and the other tenants go on.
    # A namespace that has not granted the operator access (no tenant chart: RBAC 403) is the same: its
    # Participant is told to install the tenant chart (AccessNotGranted).
    finished = phase in (Phase.succeeded, Phase.failed)

    def tenant(p: Participant) -> tuple[Event | None, tuple[str, str] | None]:
        owner = by_identity.get(p.identity)
        renewed, problem = None, None
        try:
            renewed = _tenant_children(kube, names, federation, p, owner, ca, settings, finished=finished, now=now)
        except AccessDenied as err:
            problem = (ACCESS_NOT_GRANTED,
                       access_not_granted(p.metadata.namespace, err.user, refused=f"{err.verb} {err.resource}"))
            log.warning("federation %s/%s: no access to namespace %s: %s", names.namespace, names.federation,
                        p.metadata.namespace, err)
        except kopf.PermanentError as err:
            problem = ("ApiError", str(err))
            log.warning("federation %s/%s: children of %s: %s", names.namespace, names.federation, p.identity, err)
        _report_children(kube, owner, problem)
        return renewed, problem

    # Tenants in parallel (the client's shared threads): their children are independent, and a first pass over 50
    # tenants otherwise waits for some 250 requests one after the other. A retryable error of any tenant still
    # fails the pass, once all ran.
    keep: set[tuple[str, str, str]] = set().union(*(_tenant_keys(names, p) for p in admitted))
    failed: dict[str, tuple[str, str]] = {}
    each = getattr(kube, "each", None)  # a stand-in client (tests) may lack it: one after the other
    outcomes = each(tenant, admitted) if each is not None else [tenant(p) for p in admitted]
    for p, (renewed, problem) in zip(admitted, outcomes):
        owner = by_identity.get(p.identity)
        if renewed is not None and owner is not None:
            events.append((owner, renewed))
        if problem is not None:
            failed[p.identity] = problem
    ready = [p for p in admitted if p.identity not in failed]
    # Pods are left to their Jobs' garbage collection.
    _remove_children(kube, names, participant_bodies, keep={p.identity for p in admitted}, kinds=_BY_NAME)
    if kube.due(f"sweep {names.namespace}/{names.federation}", LABEL_SWEEP_SECONDS):
        kube.delete_labelled([k for k in TENANT_KINDS if k[1] != "Pod"], names.selector() + ",fedcrm.io/role=training",
                             namespaces=_tenant_namespaces(federation, participant_bodies, training_ids), keep=keep)

    # Enrollment -> training.
    message = ""
    if phase is Phase.enrolling:
        closing = enrollment.closes(federation, ready, status.get("enrollment"), now=dt.datetime.now(dt.timezone.utc))
        conditions, message, start = set_condition(conditions, closing.condition), closing.message, closing.start
        if closing.enrollment is not None:
            status["enrollment"] = closing.enrollment
        elif "enrollment" in status:
            status["enrollment"] = None  # a merge patch removes it; the next pass finds it absent
        if start:
            training_ids = [p.identity for p in ready]
            phase = Phase.training
            status["trainingSpecDigest"] = frozen_digest(federation)
            message = f"training with {len(training_ids)} participants"

    aggregator: AggregatorStatus | None = None
    if phase is Phase.training:
        # Every pass while training, not once: a deleted StatefulSet (or its ConfigMap) comes back and the
        # aggregator resumes from its retained checkpoint volume. The ConfigMap is rebuilt only from the spec
        # training started with (a refused change never reaches the aggregator).
        if status.get("trainingSpecDigest") == frozen_digest(federation) or _started_with(kube, names) is not None:
            held = kube.ensure("v1", "ConfigMap", names.namespace, names.aggregator_config,
                               lambda: builders.owned_by(
                                   builders.aggregator_config_map(names, federation, training_ids, settings), body))
            digest = hashlib.sha256(held["data"][builders.AGGREGATOR_CONFIG_KEY].encode()).hexdigest()[:16]
            kube.ensure("apps/v1", "StatefulSet", names.namespace, names.aggregator,
                        lambda: builders.owned_by(builders.aggregator_stateful_set(names, settings, config_digest=digest), body))
        else:
            conditions = set_condition(conditions, condition(
                "AggregatorReachable", False, "ConfigLost",
                "the aggregator's ConfigMap was deleted and the spec changed since training started; revert the "
                "spec to recreate it"))
        started = _started_with(kube, names)
        changed = changed_sections(federation, started.federation.spec.model_dump(mode="json", by_alias=True) if started else None)
        if changed:
            conditions = set_condition(conditions, condition(
                "SpecAccepted", False, "ChangeRefused",
                f"{', '.join(changed)} cannot change while training (the running rounds keep the spec they "
                "started with); revert the change, or create a new Federation",
            ))
        aggregator = fetch_aggregator(names, settings)
        if aggregator is None:
            conditions = set_condition(conditions, condition(
                "AggregatorReachable", None, "NoStatusYet", "waiting for the aggregator's status endpoint"))
        else:
            conditions = set_condition(conditions, condition("AggregatorReachable", True, "Reporting", "the aggregator reports progress"))
            if aggregator.round:
                conditions = set_condition(conditions, model_condition(aggregator.warnings))
            if aggregator.finished:
                phase = Phase.succeeded if aggregator.succeeded else Phase.failed
            message = aggregator.message or message

    rounds = federation.spec.training.rounds
    round_ = aggregator.round if aggregator else int(status.get("round") or 0)
    ready = phase in (Phase.training, Phase.succeeded)
    ready_reason = {Phase.enrolling: "Enrolling", Phase.training: "Training", Phase.succeeded: "Succeeded", Phase.failed: "Failed"}[phase]
    conditions = set_condition(conditions, condition("Ready", ready if phase is not Phase.enrolling else False, ready_reason, message or ready_reason))
    status.update(
        phase=phase.value,
        observedGeneration=meta.get("generation", 0),
        rounds=rounds,
        round=round_,
        progress=f"{round_}/{rounds}",
        enrolledParticipants=len(admitted) if phase is Phase.enrolling else len(training_ids),
        participants=training_ids,
        conditions=stamped(conditions, meta.get("generation", 0)),
    )
    if federation.spec.privacy.differential_privacy.enabled:
        status["privacyPlan"] = plans.privacy_plan(federation.spec)
    if aggregator is not None:
        status.update(progress_fields(aggregator))
    return Outcome(status, decisions, events)


def model_condition(warnings: tuple[str, ...]) -> dict[str, Any]:
    """``ModelHealthy``: False when the model learned nothing (one class predicted, loss rising at the end)."""
    if warnings:
        return condition("ModelHealthy", False, "NoSignal", "; ".join(warnings))
    return condition("ModelHealthy", True, "Learning", "the model predicts both classes on validation data")


def fetch_aggregator(names: Names, settings: OperatorSettings) -> AggregatorStatus | None:
    url = settings.aggregator_status_url.format(
        service=names.aggregator_client_service, namespace=names.namespace, port=settings.metrics_port
    )
    return fetch_status(url, f"{names.namespace}/{names.federation}")


def progress_fields(aggregator: AggregatorStatus) -> dict[str, Any]:
    """The Federation status fields the aggregator's report fills (phase aside)."""
    fields: dict[str, Any] = {
        "round": aggregator.round,
        "activeParticipants": aggregator.active_participants,
    }
    if aggregator.rounds:
        fields["progress"] = f"{aggregator.round}/{aggregator.rounds}"
    if aggregator.metrics:
        fields["lastMetrics"] = aggregator.metrics
        if "accuracy" in aggregator.metrics:
            fields["accuracy"] = f"{100 * aggregator.metrics['accuracy']:.2f}%"
    if aggregator.epsilon_spent is not None:
        fields["epsilonSpent"] = aggregator.epsilon_spent
    if aggregator.model_digest:
        fields["modelDigest"] = aggregator.model_digest
    if aggregator.finished:
        fields["phase"] = Phase.succeeded.value if aggregator.succeeded else Phase.failed.value
    return fields


def cleanup(kube: Kube, body: dict[str, Any], participant_bodies: list[dict[str, Any]]) -> int:
    """Delete every child of the federation in its own and every tenant namespace it may have used; returns how
    many were still there. ``participant_bodies``: the Participants naming it (the operator's index)."""
    meta = body["metadata"]
    names = Names(meta["namespace"], meta["name"])
    spec = body.get("spec") or {}
    training = list((body.get("status") or {}).get("participants") or [])
    tenants = set((spec.get("participants") or {}).get("namespaces") or [])
    tenants |= {b["metadata"]["namespace"] for b in participant_bodies}
    tenants |= {identity.split("/", 1)[0] for identity in training}
    tenants.discard(names.namespace)
    _remove_children(kube, names, participant_bodies, keep=set(), kinds=(("v1", "Secret"),))
    return (kube.delete_labelled(COORDINATOR_KINDS, names.selector(), namespaces=[names.namespace], fresh=True)
            + kube.delete_labelled(TENANT_KINDS, names.selector(), namespaces=tenants, fresh=True))

