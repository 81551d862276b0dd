"""Reconciling one Federation: observe, decide (:mod:`fedcrm_operator.desired`), apply.

Level-based: every pass computes the whole desired state from the Federation, the Participants that name it and
what it read, applies every child, and removes what is no longer wanted. Passes are idempotent, so a re-delivered
event, a timer tick or an operator restart in the middle of a pass converge on the same objects and never
duplicate one. This module is only the I/O around the pure :func:`~fedcrm_operator.desired.desired`: it reads,
it generates keys (the CA, certificates), it writes, and it records each tenant's API errors on that tenant's
Participant while the others proceed.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import logging
from dataclasses import dataclass, field
from typing import Any

import kopf

from fedcrm.errors import ManifestError
from fedcrm.pki import CertificateAuthority, IssuedCertificate
from fedcrm.spec.manifests import Phase
from fedcrm_operator import builders, certificates
from fedcrm_operator.admission import ACCESS_NOT_GRANTED, Decision, access_not_granted
from fedcrm_operator.aggregator_status import AggregatorStatus, fetch_status
from fedcrm_operator.conditions import condition, find, set_condition
from fedcrm_operator.desired import (
    BY_NAME,
    TENANT_KINDS,
    Certificate,
    Child,
    Observed,
    Refused,
    Tenant,
    desired,
    model_condition,
    progress_fields,
    removals,
)
from fedcrm_operator.events import Event
from fedcrm_operator.kube import AccessDenied, Kube
from fedcrm_operator.naming import Names
from fedcrm_operator.resources import API, parse_federation
from fedcrm_operator.settings import OperatorSettings

__all__ = ["COORDINATOR_KINDS", "TENANT_KINDS", "Outcome", "cleanup", "fetch_aggregator", "model_condition",
           "progress_fields", "reconcile"]

log = logging.getLogger("fedcrm.operator")

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


def _ca(kube: Kube, names: Names, owner: dict[str, Any]) -> CertificateAuthority:
    """The federation's CA: created once, then always read back, so certificates stay valid across restarts."""
    def build() -> dict[str, Any]:
        fresh = CertificateAuthority.create(f"{names.namespace}/{names.federation}")
        return builders.owned_by(builders.ca_secret(names, cert_pem=fresh.cert_pem, key_pem=fresh.key_pem), owner)

    held = kube.ensure("v1", "Secret", names.namespace, names.ca_secret, build)
    data = held.get("data") or {}
    return CertificateAuthority.load(base64.b64decode(data["ca.crt"]), base64.b64decode(data["ca.key"]))


def _keep_certificate(kube: Kube, names: Names, wanted: Certificate, ca: CertificateAuthority,
                      settings: OperatorSettings, now: dt.datetime) -> Event | None:
    """Issue the certificate Secret ``wanted`` names when absent, reissue it when due; the Event to post on its
    owner when this call renewed it. Here, not in :func:`desired`: issuing generates a key."""
    def issue() -> IssuedCertificate:
        if wanted.participant is None:
            return ca.issue_server(list(wanted.hosts), lifetime=settings.certificate_lifetime)
        return ca.issue_client(wanted.participant.identity, lifetime=settings.certificate_lifetime)

    def build() -> dict[str, Any]:
        issued = issue()
        pems = {"ca_pem": ca.cert_pem, "cert_pem": issued.cert_pem, "key_pem": issued.key_pem}
        secret = (builders.server_secret(names, **pems) if wanted.participant is None
                  else builders.client_secret(names, wanted.participant, **pems))
        return builders.owned_by(secret, wanted.owner)

    held = kube.ensure("v1", "Secret", wanted.namespace, wanted.name, build)
    return certificates.renew_if_due(kube, held, ca, issue, now=now)


def _put(kube: Kube, child: Child) -> None:
    obj, meta = child.obj, child.obj["metadata"]
    if child.once:
        kube.ensure(obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"], lambda: obj)
    else:
        kube.apply(obj)


#: How often a pass also sweeps its tenant namespaces by label (one list per kind and namespace) for children
#: that no Participant it knows names: one that moved to another Federation, or left by an older operator.
#: Children of the Participants it knows are removed by name on every pass, and a deleted Participant's go with
#: it (owner references).
LABEL_SWEEP_SECONDS = 30.0

_BY_NAME = BY_NAME


def _remove_children(kube: Kube, names: Names, participant_bodies: list[dict[str, Any]], keep: set[str],
                     *, kinds: tuple[tuple[str, str], ...]) -> None:
    """Delete by name the children (of ``kinds``) of every Participant naming this federation that is not in
    ``keep`` (identities); a name known absent costs no request (:meth:`Kube.delete_named`)."""
    for removal in removals(names, participant_bodies, keep, kinds):
        kube.delete_named(*removal)


CHILDREN_CONDITION = "ChildrenCreated"


def _report_children(kube: Kube, body: dict[str, Any] | None, problem: Refused | None) -> None:
    """The tenant's own Participant says whether its children could be created; patched only on a change."""
    if body is None:
        return
    meta = body["metadata"]
    conditions = (body.get("status") or {}).get("conditions") or []
    wanted = (condition(CHILDREN_CONDITION, True, "Created", "certificate, config, NetworkPolicy and Job exist")
              if problem is None else condition(CHILDREN_CONDITION, False, problem.reason, problem.message))
    current = find(conditions, CHILDREN_CONDITION)
    if current is None and problem is None:
        return  # nothing to correct: absence means no problem was ever seen
    if current and (current.get("status"), current.get("reason"), current.get("message")) == (
            wanted["status"], wanted["reason"], wanted["message"]):
        return
    kube.patch_status(API, "Participant", meta["namespace"], meta["name"],
                      {"conditions": set_condition(conditions, wanted)})


def _observe(kube: Kube, names: Names, body: dict[str, Any], settings: OperatorSettings, now: dt.datetime) -> Observed:
    """What :func:`desired` needs read. The aggregator's ConfigMap and /status only while training: before, there
    is none to read, and asking an aggregator that does not exist costs a timeout."""
    try:
        parse_federation(body)
    except ManifestError:
        return Observed(now)  # reported as it is; nothing is read or written for it
    cache = getattr(kube, "cache", None)
    if cache is not None:
        cache.coordinator(names.namespace)  # its Secrets, Services and StatefulSet are watched too
    monitors = kube.has_kind("monitoring.coreos.com/v1", "ServiceMonitor")
    if (body.get("status") or {}).get("phase") != Phase.training.value:
        return Observed(now, service_monitors=monitors)
    cm = kube.get("v1", "ConfigMap", names.namespace, names.aggregator_config)
    config = None if cm is None else (cm.get("data") or {}).get(builders.AGGREGATOR_CONFIG_KEY, "")
    return Observed(now, service_monitors=monitors, aggregator_config=config,
                    aggregator=fetch_aggregator(names, settings))


def reconcile(
    kube: Kube, body: dict[str, Any], participant_bodies: list[dict[str, Any]], settings: OperatorSettings
) -> Outcome:
    meta = body["metadata"]
    names = Names(meta["namespace"], meta["name"])
    now = dt.datetime.now(dt.timezone.utc)
    events: list[tuple[dict[str, Any], Event]] = []
    observed = Observed(now)

    # Coordinator side. The operator chart grants the operator its rights only in its coordinatorNamespaces.
    try:
        observed = _observe(kube, names, body, settings, now)
        plan = desired(body, participant_bodies, observed, settings)
        if plan.server is None:  # an invalid spec: nothing to apply
            return Outcome(plan.status, plan.decisions)
        ca = _ca(kube, names, body)
        renewed = _keep_certificate(kube, names, plan.server, ca, settings, now)
        if renewed is not None:
            events.append((body, renewed))
        for child in plan.coordinator:
            _put(kube, child)
    except AccessDenied as err:
        if err.namespace not in (None, names.namespace):
            raise
        refused = Refused(ACCESS_NOT_GRANTED, access_not_granted(
            names.namespace, err.user, refused=f"{err.verb} {err.resource}", coordinator=True))
        plan = desired(body, participant_bodies, dataclasses.replace(observed, coordinator_refused=refused), settings)
        return Outcome(plan.status, plan.decisions, events)

    # Tenant side. The API refusing one tenant's child (a quota, a policy, a webhook) is that tenant's problem: it
    # is written on its Participant and the other tenants go on. A namespace that has not granted the operator
    # access (no tenant chart: RBAC 403) is the same: its Participant is told to install the tenant chart.
    def tenant(t: Tenant) -> tuple[Event | None, Refused | None]:
        renewed, problem = None, None
        namespace = t.certificate.namespace
        try:
            renewed = _keep_certificate(kube, names, t.certificate, ca, settings, now)
            for child in t.children:
                _put(kube, child)
        except AccessDenied as err:
            problem = Refused(ACCESS_NOT_GRANTED,
                              access_not_granted(namespace, err.user, refused=f"{err.verb} {err.resource}"))
            log.warning("federation %s/%s: no access to namespace %s: %s", names.namespace, names.federation,
                        namespace, err)
        except kopf.PermanentError as err:
            problem = Refused("ApiError", str(err))
            log.warning("federation %s/%s: children of %s: %s", names.namespace, names.federation, t.identity, err)
        _report_children(kube, t.owner, problem)
        return renewed, problem

    # Tenants in parallel (the client's shared threads): their children are independent, and a first pass over 50
    # tenants otherwise waits for some 250 requests one after the other. A retryable error of any tenant still
    # fails the pass, once all ran.
    each = getattr(kube, "each", None)  # a stand-in client (tests) may lack it: one after the other
    tenants = list(plan.tenants)
    results = each(tenant, tenants) if each is not None else [tenant(t) for t in tenants]
    refusals: dict[str, Refused] = {}
    for t, (renewed, problem) in zip(tenants, results):
        if renewed is not None and t.owner is not None:
            events.append((t.owner, renewed))
        if problem is not None:
            refusals[t.identity] = problem
    for removal in plan.remove:
        kube.delete_named(*removal)
    if plan.sweep is not None and kube.due(f"sweep {names.namespace}/{names.federation}", LABEL_SWEEP_SECONDS):
        kube.delete_labelled(list(plan.sweep.kinds), plan.sweep.selector, namespaces=plan.sweep.namespaces,
                             keep=set(plan.sweep.keep))

    # What depends on which tenants' children exist: enrolment closes over those only (fedcrm_operator.desired).
    if refusals:
        plan = desired(body, participant_bodies, dataclasses.replace(observed, refused=refusals), settings)
    for child in plan.aggregator:
        _put(kube, child)
    return Outcome(plan.status, plan.decisions, events)


def fetch_aggregator(names: Names, settings: OperatorSettings) -> AggregatorStatus | None:
    url = settings.aggregator_status_url.format(
        service=names.aggregator_client_service, namespace=names.namespace, port=settings.metrics_port
    )
    return fetch_status(url, f"{names.namespace}/{names.federation}")
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

