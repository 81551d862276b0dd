"""kopf registrations: which events run which reconciler.

Federations and Participants are reconciled on every change and, as a safety
net for cross-object dependencies (a Participant that appears before its
Federation, a Job that finishes), on a short timer. A Federation carries a
finalizer because some of its children live in other namespaces, where owner
references cannot reach (those in its own namespace carry a controller owner
reference too); a Participant's children are owned by it (same namespace,
controller owner references) and go with it.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
from typing import Any

import kopf
from prometheus_client import start_http_server

from fedcrm.spec.manifests import ParticipantPhase, Phase
from fedcrm_operator import federations, metrics
from fedcrm_operator.conditions import strip_times
from fedcrm_operator.events import transition_event
from fedcrm_operator.kube import Kube, connect
from fedcrm_operator.naming import Names
from fedcrm_operator.participants import participant_status
from fedcrm_operator.resources import GROUP, VERSION
from fedcrm_operator.settings import OperatorSettings

log = logging.getLogger("fedcrm.operator")

FINALIZER = "fedcrm.io/cleanup"
RECONCILE_SECONDS = 3.0
#: Participants change less often than their Federation's pass; their status is refreshed on every change too.
PARTICIPANT_SECONDS = 5.0


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    own = OperatorSettings.from_environment()
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="fedcrm.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="fedcrm.io", key="last-handled-configuration")
    settings.posting.level = logging.WARNING  # refusals and failures become Kubernetes Events too
    settings.watching.server_timeout = 300
    settings.execution.max_workers = 16
    # With peering (FEDCRM_OPERATOR_PEERING): a replica that stops renewing its record is presumed gone after this
    # long, and a standby takes over. kopf makes the peering object mandatory when given a peering name (the chart
    # creates it); setting it here too would pause a standalone operator forever (no peering resource to find).
    settings.peering.lifetime = int(os.environ.get("FEDCRM_OPERATOR_PEERING_LIFETIME", "30"))
    memo.settings = own
    memo.kube = connect()
    memo.federation_phases = {}
    memo.participant_phases = {}
    port = int(os.environ.get("FEDCRM_OPERATOR_METRICS_PORT", "8080"))
    if port:
        start_http_server(port)
        log.info("operator metrics on :%d/metrics", port)


@kopf.index(GROUP, VERSION, "participants")
def participants_by_federation(body: kopf.Body, meta: kopf.Meta, spec: kopf.Spec, **_: Any) -> dict[str, Any] | None:
    """Participant bodies keyed by the Federation they name, so a Federation's pass needs no list call."""
    if meta.get("deletionTimestamp"):
        return None  # leaving: its children go with it
    ref = spec.get("federationRef") or {}
    key = f"{ref.get('namespace', 'default')}/{ref.get('name')}"
    return {key: copy.deepcopy(dict(body))}


def _record(patch: kopf.Patch, body: kopf.Body, new: dict[str, Any], phases: dict[str, str], gauge: Any, known: type) -> None:
    """Write the status if it changed, post an Event for a transition, and count the object's phase for the metrics."""
    old = dict(body.get("status") or {})
    if strip_times(old) != strip_times(new):
        for key, value in new.items():
            patch.status[key] = value
        event = transition_event(str(body.get("kind")), old, new)
        if event is not None:
            kopf.event(body, type=event.type, reason=event.reason, message=event.message[:1024])
    phases[f"{body['metadata']['namespace']}/{body['metadata']['name']}"] = new.get("phase", "Pending")
    metrics.count_phases(gauge, phases, [p.value for p in known])


def _federation_pass(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, participants_by_federation: kopf.Index, **_: Any) -> None:
    key = f"{body['metadata']['namespace']}/{body['metadata']['name']}"
    with metrics.reconciling("federation"):
        outcome = federations.reconcile(memo.kube, dict(body), list(participants_by_federation.get(key, [])), memo.settings)
    for concerned, event in outcome.events:  # renewed certificates, on the Federation or Participant they serve
        kopf.event(concerned, type=event.type, reason=event.reason, message=event.message[:1024])
    _record(patch, body, outcome.status, memo.federation_phases, metrics.FEDERATIONS, Phase)


@kopf.on.create(GROUP, VERSION, "federations")
@kopf.on.update(GROUP, VERSION, "federations", field="spec")
@kopf.on.resume(GROUP, VERSION, "federations")
def federation_changed(**kwargs: Any) -> None:
    _federation_pass(**kwargs)


@kopf.timer(GROUP, VERSION, "federations", interval=RECONCILE_SECONDS, initial_delay=RECONCILE_SECONDS)
def federation_tick(**kwargs: Any) -> None:
    _federation_pass(**kwargs)


def _training(status: kopf.Status, **_: Any) -> bool:
    return status.get("phase") == Phase.training.value


@kopf.daemon(GROUP, VERSION, "federations", when=_training, cancellation_timeout=5)
async def follow_rounds(stopped: kopf.DaemonStopped, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """While a Federation trains, copy each finished round into its status within a poll interval.

    The full reconcile runs every few seconds; rounds can be faster, so this light loop reads only the
    aggregator's /status and writes only when the round or the outcome changed. It is async on purpose:
    a sync daemon would hold one of kopf's worker threads for the whole training, and a few dozen
    training federations would starve every other handler. ``body`` is kopf's live view of the object.
    """
    meta = body["metadata"]
    names = Names(meta["namespace"], meta["name"])
    settings: OperatorSettings = memo.settings
    while not stopped:
        status = body.get("status") or {}
        aggregator = await asyncio.to_thread(federations.fetch_aggregator, names, settings)
        if aggregator is not None:
            fields = federations.progress_fields(aggregator)
            if any(status.get(k) != v for k, v in fields.items()):
                await asyncio.to_thread(memo.kube.patch_status, f"{GROUP}/{VERSION}", "Federation",
                                        names.namespace, names.federation, fields)
        await asyncio.sleep(settings.status_poll_seconds)


@kopf.on.delete(GROUP, VERSION, "federations")
def federation_deleted(name: str, namespace: str, body: kopf.Body, memo: kopf.Memo,
                       participants_by_federation: kopf.Index, **_: Any) -> None:
    """Remove every child in every namespace; the finalizer stays until nothing is left."""
    participants = [dict(b) for b in participants_by_federation.get(f"{namespace}/{name}", [])]
    with metrics.reconciling("federation"):
        remaining = federations.cleanup(memo.kube, dict(body), participants)
        if remaining:
            raise kopf.TemporaryError(f"waiting for {remaining} children to be deleted", delay=1)
    memo.federation_phases.pop(f"{namespace}/{name}", None)
    metrics.count_phases(metrics.FEDERATIONS, memo.federation_phases, [p.value for p in Phase])


def _participant_pass(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, participants_by_federation: kopf.Index,
                      **_: Any) -> None:
    ref = (body.get("spec") or {}).get("federationRef") or {}
    key = f"{ref.get('namespace', 'default')}/{ref.get('name')}"
    same_federation = [dict(b) for b in participants_by_federation.get(key, [])]  # the index: no list call
    with metrics.reconciling("participant"):
        status = participant_status(memo.kube, dict(body), same_federation)
    _record(patch, body, status, memo.participant_phases, metrics.PARTICIPANTS, ParticipantPhase)


@kopf.on.create(GROUP, VERSION, "participants")
@kopf.on.update(GROUP, VERSION, "participants", field="spec")
@kopf.on.resume(GROUP, VERSION, "participants")
def participant_changed(**kwargs: Any) -> None:
    _participant_pass(**kwargs)


@kopf.timer(GROUP, VERSION, "participants", interval=PARTICIPANT_SECONDS, initial_delay=1.0)
def participant_tick(**kwargs: Any) -> None:
    _participant_pass(**kwargs)


# optional: this handler asks for no finalizer. The timer above puts kopf's on the Participant all the same (kopf
# stops a timer through it); the operator removes it on deletion, and the children go by owner references.
@kopf.on.delete(GROUP, VERSION, "participants", optional=True)
def participant_gone(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    memo.participant_phases.pop(f"{body['metadata']['namespace']}/{body['metadata']['name']}", None)
    metrics.count_phases(metrics.PARTICIPANTS, memo.participant_phases, [p.value for p in ParticipantPhase])


__all__ = ["FINALIZER", "Kube"]
