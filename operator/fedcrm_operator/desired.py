"""What one Federation pass wants, as a pure function of what it read.

:func:`desired` takes the Federation, the Participants naming it and an :class:`Observed` (what the pass read:
the time, the aggregator's ConfigMap and report, which tenants the API refused) and returns a :class:`Desired`:
every child to apply, the certificates to keep current, what to remove, each Participant's admission and the
Federation's status. No client, no clock, no randomness: the same inputs give the same value, which is what lets
``tests/test_operator_desired.py`` check its invariants over generated participant sets and observed states
instead of over a cluster. The applier (:func:`fedcrm_operator.federations.reconcile`) does the I/O around it;
key generation stays there, so certificates appear here only as intents.

Which tenants the API refused is known only after their children were applied, and enrolment must close over
the tenants whose children exist (a tenant whose Job a quota refused would otherwise be counted into training
and never dial in). So a pass applies, then calls :func:`desired` once more with the refusals in
:attr:`Observed.refused`; the second call changes only what depends on them (the phase, ``status.participants``
and the aggregator's children), never the tenant children already applied. Feeding the previous pass's refusals
instead would let a tenant refused on its first pass start training with the others; keeping the refusals
between passes would make the decision depend on history rather than on what exists now.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedcrm.errors import ManifestError
from fedcrm.privacy import plans
from fedcrm.runconfig import AggregatorConfig
from fedcrm.spec.manifests import Federation, Participant, Phase
from fedcrm_operator import builders, enrollment
from fedcrm_operator.admission import Decision, accepted_terms, decide, siblings_by_namespace
from fedcrm_operator.aggregator_status import AggregatorStatus
from fedcrm_operator.conditions import condition, set_condition, stamped
from fedcrm_operator.naming import ROLE_LABEL, Names
from fedcrm_operator.resources import changed_sections, frozen_digest, parse_federation, parse_participant
from fedcrm_operator.settings import OperatorSettings

__all__ = ["BY_NAME", "TENANT_KINDS", "Certificate", "Child", "Desired", "Observed", "Refused", "Sweep", "Tenant",
           "desired", "model_condition", "progress_fields", "removals"]

#: Kinds of children in tenant namespaces, for sweeps by label. Pods are listed so deletion waits for a Job's
#: pods too. Not Secrets: a tenant's Role lets the operator read only the certificate Secrets it names
#: (``resourceNames``), never list them, so those are deleted by name (:func:`removals`).
TENANT_KINDS = (
    ("batch/v1", "Job"),
    ("v1", "Pod"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
    ("v1", "ConfigMap"),
)
#: Kinds of a tenant's children removed by name when its Participant is no longer admitted; its Pods are left to
#: their Job's garbage collection.
BY_NAME = (("batch/v1", "Job"), ("v1", "ConfigMap"), ("networking.k8s.io/v1", "NetworkPolicy"), ("v1", "Secret"))


@dataclass(frozen=True)
class Refused:
    """What the API server refused: ``reason`` (``AccessNotGranted``, ``ApiError``) and a message saying who must
    do what."""

    reason: str
    message: str


@dataclass(frozen=True)
class Observed:
    """What a pass read before (and, for :attr:`refused`, while) applying."""

    now: dt.datetime
    #: Whether the cluster serves ServiceMonitors (the Prometheus operator's CRD is installed).
    service_monitors: bool = False
    #: The aggregator ConfigMap's config text as read (None: absent, or not read because the Federation was not
    #: training). Training keeps the spec it started with: this, not the current spec, is what the aggregator runs.
    aggregator_config: str | None = None
    #: The aggregator's /status report (None: unreachable, or not asked because the Federation was not training).
    aggregator: AggregatorStatus | None = None
    #: Tenants (Participant identities) whose children the API refused in this pass.
    refused: Mapping[str, Refused] = field(default_factory=dict)
    #: RBAC refused the operator in the coordinator namespace: nothing can be created for this Federation.
    coordinator_refused: Refused | None = None


@dataclass(frozen=True)
class Child:
    """An object to apply; ``once``: created when absent and never rewritten (a Job's pod template cannot change;
    the aggregator keeps the ConfigMap training started with), else applied on every pass."""

    obj: dict[str, Any]
    once: bool = False


@dataclass(frozen=True)
class Certificate:
    """A TLS Secret kept holding a certificate from the federation's CA: issued when absent, reissued when due
    (:mod:`fedcrm_operator.certificates`). ``participant``: whose client certificate (None: the aggregator's
    server certificate, for ``hosts``)."""

    namespace: str
    name: str
    owner: dict[str, Any] | None
    participant: Participant | None = None
    hosts: tuple[str, ...] = ()


@dataclass(frozen=True)
class Tenant:
    """One admitted participant's children; the API refusing any of them is that tenant's problem alone."""

    identity: str
    owner: dict[str, Any] | None
    certificate: Certificate
    children: tuple[Child, ...]


@dataclass(frozen=True)
class Sweep:
    """Delete every object of ``kinds`` matching ``selector`` in ``namespaces`` but ``keep`` ((kind, namespace,
    name)): children no Participant this pass knows names (one moved to another Federation, or left by an older
    operator). Costs one list per kind and namespace, so the applier runs it only now and then."""

    kinds: tuple[tuple[str, str], ...]
    selector: str
    namespaces: frozenset[str]
    keep: frozenset[tuple[str, str, str]]


@dataclass(frozen=True)
class Desired:
    """What the pass applies and reports. ``server`` is None when nothing is to be applied (an invalid spec, or a
    coordinator namespace that refused the operator)."""

    status: dict[str, Any]
    decisions: dict[str, Decision] = field(default_factory=dict)
    server: Certificate | None = None
    coordinator: tuple[Child, ...] = ()
    tenants: tuple[Tenant, ...] = ()
    #: The aggregator's ConfigMap and StatefulSet, in that order: only while training with a known config.
    aggregator: tuple[Child, ...] = ()
    #: (apiVersion, kind, namespace, name) of the children of Participants no longer admitted.
    remove: tuple[tuple[str, str, str, str], ...] = ()
    sweep: Sweep | None = None


def _candidates(bodies: list[dict[str, Any]]) -> list[Participant]:
    """Participants that name this federation and parse; an invalid one is reported by its own handler."""
    out = []
    for body in bodies:
        try:
            out.append(parse_participant(body))
        except ManifestError:
            continue
    return sorted(out, key=lambda p: p.identity)


def _server_hosts(names: Names, settings: OperatorSettings) -> tuple[str, ...]:
    short = names.aggregator_client_service
    return (names.aggregator_host(settings.cluster_domain), f"{short}.{names.namespace}.svc",
            f"{short}.{names.namespace}", short)


def _tenant(names: Names, federation: Federation, participant: Participant, body: dict[str, Any] | None,
            settings: OperatorSettings, *, finished: bool) -> Tenant:
    """The participant's certificate, config, policy and training Job (the Job only while the federation runs: a
    Job deleted after the federation finished is not brought back to dial a finished aggregator)."""
    children = [Child(builders.owned_by(builders.participant_config_map(names, federation, participant), body)),
                Child(builders.owned_by(builders.participant_network_policy(names, participant, settings), body))]
    if not finished:
        connect_timeout = federation.spec.participants.enrollment_timeout_seconds + 600
        job = builders.training_job(names, federation, participant, settings, connect_timeout=connect_timeout)
        children.append(Child(builders.owned_by(job, body), once=True))
    ns, name = participant.metadata.namespace, participant.metadata.name
    certificate = Certificate(ns, names.client_secret(name), body, participant=participant)
    return Tenant(participant.identity, body, certificate, tuple(children))


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


def removals(names: Names, participant_bodies: list[dict[str, Any]], keep: set[str],
             kinds: tuple[tuple[str, str], ...] = BY_NAME) -> tuple[tuple[str, str, str, str], ...]:
    """(apiVersion, kind, namespace, name) of the children (of ``kinds``, by their deterministic names) of every
    Participant naming this federation whose identity is not in ``keep``. By name: the tenant's Role does not let
    the operator list Secrets."""
    name_of = {"Secret": names.client_secret, "ConfigMap": names.participant_config,
               "NetworkPolicy": names.participant_policy, "Job": names.training_job}
    out = []
    for body in participant_bodies:
        meta = body["metadata"]
        if f"{meta['namespace']}/{meta['name']}" in keep:
            continue
        out.extend((api_version, kind, meta["namespace"], name_of[kind](meta["name"])) for api_version, kind in kinds)
    return tuple(out)


def _started_with(text: str | None) -> AggregatorConfig | None:
    if text is None:
        return None
    try:
        return AggregatorConfig.model_validate(json.loads(text))
    except ValueError:
        return None


def desired(body: dict[str, Any], participant_bodies: list[dict[str, Any]], observed: Observed,
            settings: OperatorSettings) -> Desired:
    """The pass's whole desired state; ``participant_bodies``: the Participants naming this Federation (the
    operator's index). Never modifies its arguments."""
    meta = body["metadata"]
    names = Names(meta["namespace"], meta["name"])
    generation = meta.get("generation", 0)
    at = enrollment.format_time(observed.now)
    status: dict[str, Any] = dict(body.get("status") or {})
    try:
        federation = parse_federation(body)
    except ManifestError as err:
        conditions = set_condition(status.get("conditions", []),
                                   condition("SpecAccepted", False, "InvalidSpec", str(err)), at=at)
        conditions = set_condition(conditions, condition("Ready", False, "InvalidSpec", "fix the spec: see SpecAccepted"),
                                   at=at)
        return Desired({**status, "phase": status.get("phase") or Phase.pending.value,
                        "conditions": stamped(conditions, generation)})
    phase = Phase(status.get("phase") or Phase.pending.value)
    conditions = set_condition(status.get("conditions", []), condition("SpecAccepted", True, "Valid", "the spec is valid"),
                               at=at)
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

    if observed.coordinator_refused is not None:
        refused = observed.coordinator_refused
        conditions = set_condition(conditions, condition("Ready", False, refused.reason, refused.message), at=at)
        return Desired({**status, "phase": status.get("phase") or Phase.pending.value,
                        "observedGeneration": generation, "conditions": stamped(conditions, generation)}, decisions)

    # Coordinator side.
    coordinator = [Child(builders.owned_by(service, body)) for service in builders.aggregator_services(names, settings)]
    coordinator.append(Child(builders.owned_by(
        builders.aggregator_network_policy(names, [p.metadata.namespace for p in admitted], settings), body)))
    if observed.service_monitors:
        coordinator.append(Child(builders.owned_by(builders.service_monitor(names), body)))
    server = Certificate(names.namespace, names.server_secret, body, hosts=_server_hosts(names, settings))

    # Tenant side: children of admitted participants; everything else of ours in tenant namespaces goes.
    finished = phase in (Phase.succeeded, Phase.failed)
    tenants = tuple(_tenant(names, federation, p, by_identity.get(p.identity), settings, finished=finished)
                    for p in admitted)
    keep: set[tuple[str, str, str]] = set().union(*(_tenant_keys(names, p) for p in admitted))
    sweep = Sweep(tuple(k for k in TENANT_KINDS if k[1] != "Pod"), f"{names.selector()},{ROLE_LABEL}=training",
                  frozenset(_tenant_namespaces(federation, participant_bodies, training_ids)), frozenset(keep))
    remove = removals(names, participant_bodies, {p.identity for p in admitted})

    # Enrollment -> training, over the tenants whose children exist.
    ready_tenants = [p for p in admitted if p.identity not in observed.refused]
    message = ""
    if phase is Phase.enrolling:
        closing = enrollment.closes(federation, ready_tenants, status.get("enrollment"), now=observed.now)
        conditions, message = set_condition(conditions, closing.condition, at=at), closing.message
        if closing.enrollment is not None:
            status["enrollment"] = closing.enrollment
        elif "enrollment" in status:
            status["enrollment"] = None  # a merge patch removes it; the next pass finds it absent
        if closing.start:
            training_ids = [p.identity for p in ready_tenants]
            phase = Phase.training
            status["trainingSpecDigest"] = frozen_digest(federation)
            message = f"training with {len(training_ids)} participants"

    aggregator: tuple[Child, ...] = ()
    report: AggregatorStatus | None = None
    if phase is Phase.training:
        # Every pass while training, not once: a deleted StatefulSet (or its ConfigMap) comes back and the
        # aggregator resumes from its retained checkpoint volume. The ConfigMap is rebuilt only from the spec
        # training started with (a refused change never reaches the aggregator).
        started = _started_with(observed.aggregator_config)
        config_known = status.get("trainingSpecDigest") == frozen_digest(federation) or started is not None
        if config_known:
            config = builders.owned_by(builders.aggregator_config_map(names, federation, training_ids, settings), body)
            text = (observed.aggregator_config if observed.aggregator_config is not None
                    else config["data"][builders.AGGREGATOR_CONFIG_KEY])
            digest = hashlib.sha256(text.encode()).hexdigest()[:16]
            stateful_set = builders.owned_by(builders.aggregator_stateful_set(names, settings, config_digest=digest), body)
            aggregator = (Child(config, once=True), Child(stateful_set, once=True))
        else:
            conditions = set_condition(conditions, condition(
                "AggregatorReachable", False, "ConfigLost",
                "the aggregator's ConfigMap was deleted and the spec changed since training started; revert the "
                "spec to recreate it"), at=at)
        started_spec = started.federation.spec.model_dump(mode="json", by_alias=True) if started else None
        changed = changed_sections(federation, started_spec)
        if changed:
            conditions = set_condition(conditions, condition(
                "SpecAccepted", False, "ChangeRefused",
                f"{', '.join(changed)} cannot change while training (the running rounds keep the spec they "
                "started with); revert the change, or create a new Federation",
            ), at=at)
        report = observed.aggregator
        if config_known:  # a lost config stays the condition to act on, whatever the aggregator still says
            conditions = set_condition(conditions, condition(
                "AggregatorReachable", None, "NoStatusYet", "waiting for the aggregator's status endpoint")
                if report is None else
                condition("AggregatorReachable", True, "Reporting", "the aggregator reports progress"), at=at)
        if report is not None:
            if report.round:
                conditions = set_condition(conditions, model_condition(report.warnings), at=at)
            if report.finished:
                phase = Phase.succeeded if report.succeeded else Phase.failed
            message = report.message or message

    rounds = federation.spec.training.rounds
    round_ = report.round if report else int(status.get("round") or 0)
    ready = phase in (Phase.training, Phase.succeeded)
    ready_reason = {Phase.enrolling: "Enrolling", Phase.training: "Training", Phase.succeeded: "Succeeded",
                    Phase.failed: "Failed"}[phase]
    conditions = set_condition(conditions, condition("Ready", ready if phase is not Phase.enrolling else False,
                                                     ready_reason, message or ready_reason), at=at)
    status.update(
        phase=phase.value,
        observedGeneration=generation,
        rounds=rounds,
        round=round_,
        progress=f"{round_}/{rounds}",
        enrolledParticipants=len(admitted) if phase is Phase.enrolling else len(training_ids),
        participants=training_ids,
        conditions=stamped(conditions, generation),
    )
    if federation.spec.privacy.differential_privacy.enabled:
        status["privacyPlan"] = plans.privacy_plan(federation.spec)
    if report is not None:
        status.update(progress_fields(report))
    return Desired(status, decisions, server, tuple(coordinator), tenants, aggregator, remove, sweep)


def model_condition(warnings: tuple[str, ...]) -> dict[str, Any]:
    """``ModelHealthy``: False when the model learned nothing (one class predicted, loss rising at the end)."""
    if warnings:
        return condition("ModelHealthy", False, "NoSignal", "; ".join(warnings))
    return condition("ModelHealthy", True, "Learning", "the model predicts both classes on validation data")


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
