"""kopf registrations: which events run which reconciler.

Federations and Participants are reconciled on every change of their spec, and
whenever something they depend on changes: a child (the operator watches its
children, :mod:`fedcrm_operator.watches`), a Participant naming the
Federation, the Federation a Participant names. Such a change *wakes* the
object; a short timer per object runs the pass of a woken one within a tick.
Unwoken, a pass runs only as a slow safety net (:data:`SAFETY_SECONDS`), or
every few seconds while a Federation enrolls (enrollment closes by time). Every
pass reads what exists from the watches and kopf's indexes, so a pass that finds
nothing to change makes no request at all. A Federation carries a
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
import time
from typing import Any

import kopf
from kubernetes import client as k8s
from prometheus_client import start_http_server

from fedcrm.spec.manifests import ParticipantPhase, Phase
from fedcrm_operator import federations, metrics, watches
from fedcrm_operator.conditions import strip_times
from fedcrm_operator.events import transition_event
from fedcrm_operator.kube import Kube, connect
from fedcrm_operator.naming import FEDERATION_LABEL, FEDERATION_NAMESPACE_LABEL, PARTICIPANT_LABEL, Names
from fedcrm_operator.participants import participant_status
from fedcrm_operator.resources import GROUP, VERSION
from fedcrm_operator.settings import OperatorSettings

log = logging.getLogger("fedcrm.operator")

FINALIZER = "fedcrm.io/cleanup"
#: How often an enrolling (or pending) Federation's pass runs: enrollment closes by time.
RECONCILE_SECONDS = 3.0
#: How often a pass runs when nothing woke it: the safety net for what no watch reports (a watch that was down,
#: a tenant namespace that granted access after its Participant appeared). With the watches up it makes no
#: request unless something differs. A Federation's also runs at least ten times per certificate lifetime.
SAFETY_SECONDS = 60.0
#: How often the per-object timers look whether their object was woken (no request; a woken Federation's pass
#: runs within a tick, a woken Participant's within five).
FEDERATION_TICK_SECONDS = 1.0
PARTICIPANT_SECONDS = 5.0


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
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
    memo.woken = set()  # wake keys (_federation_key, _participant_key) of objects whose pass is due
    memo.next_pass = {}  # wake key -> time.monotonic() of its next safety-net pass
    if own.watch_children:
        woken: set[str] = memo.woken
        children = watches.Children(k8s.Configuration.get_default_copy(), lambda obj: _wake_for_child(woken, obj))
        children.start(asyncio.get_running_loop())
        memo.kube.cache = children
    port = int(os.environ.get("FEDCRM_OPERATOR_METRICS_PORT", "8080"))
    if port:
        start_http_server(port)
        log.info("operator metrics on :%d/metrics", port)


@kopf.on.cleanup()
async def close_watches(memo: kopf.Memo, **_: Any) -> None:
    cache = getattr(memo.get("kube"), "cache", None)
    if cache is not None:
        await cache.close()


def _federation_key(namespace: str, name: str) -> str:
    """A Federation's wake key, as its children's labels name it (a long name is bounded there)."""
    return f"F:{namespace}/{Names(namespace, name).labels('training')[FEDERATION_LABEL]}"


def _participant_key(namespace: str, name: str) -> str:
    return f"P:{namespace}/{name}"


def _ref_key(spec: Any) -> tuple[str, str]:
    ref = (spec or {}).get("federationRef") or {}
    return str(ref.get("namespace", "default")), str(ref.get("name"))


def _wake_for_child(woken: set[str], obj: dict[str, Any]) -> None:
    """A watched child changed: wake the Federation and the Participant its labels name."""
    meta = obj.get("metadata") or {}
    labels = meta.get("labels") or {}
    if labels.get(FEDERATION_LABEL) and labels.get(FEDERATION_NAMESPACE_LABEL):
        woken.add(f"F:{labels[FEDERATION_NAMESPACE_LABEL]}/{labels[FEDERATION_LABEL]}")
    if labels.get(PARTICIPANT_LABEL):
        woken.add(_participant_key(str(meta.get("namespace")), labels[PARTICIPANT_LABEL]))


def _due(memo: kopf.Memo, key: str) -> bool:
    """Whether the pass of the object known by ``key`` should run now: woken, or its safety net is due."""
    if key in memo.woken:
        memo.woken.discard(key)
        return True
    return time.monotonic() >= memo.next_pass.get(key, 0.0)


@kopf.index(GROUP, VERSION, "federations")
def federations_by_key(body: kopf.Body, meta: kopf.Meta, **_: Any) -> dict[str, Any]:
    """Federation bodies by namespace/name, so a Participant's pass reads its Federation without a request."""
    return {f"{meta['namespace']}/{meta['name']}": copy.deepcopy(dict(body))}


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


def _federation_interval(status: dict[str, Any], settings: OperatorSettings) -> float:
    if status.get("phase") in (None, Phase.pending.value, Phase.enrolling.value):
        return RECONCILE_SECONDS
    return min(SAFETY_SECONDS, max(settings.certificate_lifetime.total_seconds() / 10, FEDERATION_TICK_SECONDS))


def _federation_pass(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, participants_by_federation: kopf.Index, **_: Any) -> None:
    key = f"{body['metadata']['namespace']}/{body['metadata']['name']}"
    wake_key = _federation_key(body["metadata"]["namespace"], body["metadata"]["name"])
    memo.next_pass[wake_key] = time.monotonic() + _federation_interval(dict(body.get("status") or {}), memo.settings)
    with metrics.reconciling("federation"):
        outcome = federations.reconcile(memo.kube, dict(body), list(participants_by_federation.get(key, [])), memo.settings)
    for concerned, event in outcome.events:  # renewed certificates, on the Federation or Participant they serve
        kopf.event(concerned, type=event.type, reason=event.reason, message=event.message[:1024])
    _record(patch, body, outcome.status, memo.federation_phases, metrics.FEDERATIONS, Phase)


@kopf.on.create(GROUP, VERSION, "federations")
@kopf.on.update(GROUP, VERSION, "federations", field="spec")
@kopf.on.resume(GROUP, VERSION, "federations")
async def federation_changed(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Created, its spec changed, or found at start: its pass runs at the next tick.

    Only the timer runs a Federation's passes, one at a time: kopf runs timers beside the change handlers, and a
    pass here would run alongside the timer's, the slower of the two writing a status computed from a Federation
    the other had already moved on (Training, then Enrolling again, then Training: the round follower stopped
    and started in between)."""
    memo.woken.add(_federation_key(body["metadata"]["namespace"], body["metadata"]["name"]))


@kopf.timer(GROUP, VERSION, "federations", interval=FEDERATION_TICK_SECONDS, initial_delay=0)
async def federation_tick(body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
    key = _federation_key(body["metadata"]["namespace"], body["metadata"]["name"])
    if not _due(memo, key):
        return
    try:
        await asyncio.to_thread(_federation_pass, body=body, memo=memo, **kwargs)
    except Exception:
        memo.woken.add(key)  # try again at the next tick (kopf logs it)
        raise


@kopf.on.event(GROUP, VERSION, "federations")
async def federation_event(body: kopf.Body, memo: kopf.Memo, participants_by_federation: kopf.Index, **_: Any) -> None:
    """A Federation changed (spec or status): its own pass, and those of its Participants, which read it."""
    meta = body["metadata"]
    memo.woken.add(_federation_key(meta["namespace"], meta["name"]))
    for participant in participants_by_federation.get(f"{meta['namespace']}/{meta['name']}", []):
        memo.woken.add(_participant_key(participant["metadata"]["namespace"], participant["metadata"]["name"]))


@kopf.on.event(GROUP, VERSION, "participants")
async def participant_event(body: kopf.Body, memo: kopf.Memo, participants_by_federation: kopf.Index, **_: Any) -> None:
    """A Participant changed (spec or status): its Federation's pass, its own, and those of the Participants of its
    namespace naming the same Federation (one namespace joins once: they decide together)."""
    meta = body["metadata"]
    namespace, name = _ref_key(body.get("spec"))
    memo.woken.add(_federation_key(namespace, name))
    memo.woken.add(_participant_key(meta["namespace"], meta["name"]))
    for sibling in participants_by_federation.get(f"{namespace}/{name}", []):
        if sibling["metadata"]["namespace"] == meta["namespace"]:
            memo.woken.add(_participant_key(meta["namespace"], sibling["metadata"]["name"]))


def _training(status: kopf.Status, **_: Any) -> bool:
    return status.get("phase") == Phase.training.value


#: How long a stopped round follower may take to notice (one status read: its timeout is a second) before kopf
#: cancels it; kopf logs a cancellation as a warning ("is cancelled. Will escalate."), a normal stop as nothing.
FOLLOWER_STOP_SECONDS = 5.0


@kopf.daemon(GROUP, VERSION, "federations", when=_training, cancellation_backoff=FOLLOWER_STOP_SECONDS,
             cancellation_timeout=5)
async def follow_rounds(stopped: kopf.DaemonStopped, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """While a Federation trains, copy each finished round into its status within a poll interval.

    The full reconcile runs every few seconds; rounds can be faster, so this light loop reads only the
    aggregator's /status and writes only when the round or the outcome changed. It is async on purpose:
    a sync daemon would hold one of kopf's worker threads for the whole training, and a few dozen
    training federations would starve every other handler. ``body`` is kopf's live view of the object.

    kopf stops it when the Federation leaves Training (its ``when`` no longer matches), is deleted, or the
    operator stops or loses its peering; it waits on ``stopped`` rather than sleeping, so it returns at once
    and says why, instead of being cancelled.
    """
    meta = body["metadata"]
    names = Names(meta["namespace"], meta["name"])
    settings: OperatorSettings = memo.settings
    while not stopped:
        status = body.get("status") or {}
        aggregator = await asyncio.to_thread(federations.fetch_aggregator, names, settings)
        if aggregator is not None and not stopped:
            fields = federations.progress_fields(aggregator)
            if any(status.get(k) != v for k, v in fields.items()):
                await asyncio.to_thread(memo.kube.patch_status, f"{GROUP}/{VERSION}", "Federation",
                                        names.namespace, names.federation, fields)
        await stopped.wait(settings.status_poll_seconds)
    log.info("federation %s/%s: no longer following its rounds (%s)", names.namespace, names.federation,
             _stop_reason(stopped.reason))


def _stop_reason(reason: kopf.DaemonStoppingReason | None) -> str:
    """Why kopf stopped a daemon, in words."""
    words = {
        kopf.DaemonStoppingReason.FILTERS_MISMATCH: "it left the Training phase",
        kopf.DaemonStoppingReason.RESOURCE_DELETED: "it is being deleted",
        kopf.DaemonStoppingReason.OPERATOR_PAUSING: "this operator replica is pausing (another one is active)",
        kopf.DaemonStoppingReason.OPERATOR_EXITING: "the operator is stopping",
    }
    said = [text for flag, text in words.items() if reason is not None and flag in reason]
    return "; ".join(said) or f"stopped: {reason}"


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
                      federations_by_key: kopf.Index, **_: Any) -> None:
    meta = body["metadata"]
    memo.next_pass[_participant_key(meta["namespace"], meta["name"])] = time.monotonic() + SAFETY_SECONDS
    key = "/".join(_ref_key(body.get("spec")))
    same_federation = [dict(b) for b in participants_by_federation.get(key, [])]  # the indexes: no request
    federation = next(iter(federations_by_key.get(key, [])), None)
    with metrics.reconciling("participant"):
        status = participant_status(memo.kube, dict(body), same_federation, federation)
    _record(patch, body, status, memo.participant_phases, metrics.PARTICIPANTS, ParticipantPhase)


@kopf.on.create(GROUP, VERSION, "participants")
@kopf.on.update(GROUP, VERSION, "participants", field="spec")
@kopf.on.resume(GROUP, VERSION, "participants")
def participant_changed(**kwargs: Any) -> None:
    _participant_pass(**kwargs)


@kopf.timer(GROUP, VERSION, "participants", interval=PARTICIPANT_SECONDS, initial_delay=1.0)
async def participant_tick(body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
    key = _participant_key(body["metadata"]["namespace"], body["metadata"]["name"])
    if not _due(memo, key):
        return
    try:
        await asyncio.to_thread(_participant_pass, body=body, memo=memo, **kwargs)
    except Exception:
        memo.woken.add(key)
        raise


# optional: this handler asks for no finalizer. The timer above puts kopf's on the Participant all the same (kopf
# stops a timer through it); the operator removes it on deletion, and the children go by owner references.
@kopf.on.delete(GROUP, VERSION, "participants", optional=True)
def participant_gone(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    memo.participant_phases.pop(f"{body['metadata']['namespace']}/{body['metadata']['name']}", None)
    metrics.count_phases(metrics.PARTICIPANTS, memo.participant_phases, [p.value for p in ParticipantPhase])


__all__ = ["FINALIZER", "Kube"]
