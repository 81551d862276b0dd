"""A Participant's status: admitted or refused (and why), and how its training pod is doing.

The tenant reads this with ``kubectl get fedp``; every refusal says who must
change what. The Federation's reconciler makes the same decision (the same
pure function) to create or remove the tenant's children.
"""

from __future__ import annotations

from typing import Any

from fedcrm.errors import ManifestError
from fedcrm.exit_codes import NodeExitCode
from fedcrm.spec.manifests import Federation, ParticipantPhase, Phase
from fedcrm.spec.terms import terms_digest
from fedcrm_operator.admission import ACCESS_NOT_GRANTED, accepted_terms, access_not_granted, decide, siblings_by_namespace
from fedcrm_operator.conditions import condition, find, set_condition, stamped
from fedcrm_operator.kube import AccessDenied, Kube
from fedcrm_operator.naming import Names
from fedcrm_operator.resources import API, parse_federation, parse_participant

__all__ = ["participant_status", "termination_message"]


def _job_phase(job: dict[str, Any] | None) -> tuple[ParticipantPhase, str]:
    if job is None:
        return ParticipantPhase.admitted, "waiting for the training pod to be created"
    for c in (job.get("status") or {}).get("conditions") or []:
        if c.get("status") != "True":
            continue
        if c.get("type") == "Complete":
            return ParticipantPhase.succeeded, "training finished"
        if c.get("type") == "Failed":
            return ParticipantPhase.failed, f"training pod failed: {c.get('message') or c.get('reason')}"
    return ParticipantPhase.training, "training pod scheduled"


def _failed_container(pod: dict[str, Any]) -> tuple[str, int, str] | None:
    """(container name, exit code, termination message) of the pod's first failed container."""
    status = pod.get("status") or {}
    for cs in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
        terminated = (cs.get("state") or {}).get("terminated") or {}
        if terminated.get("exitCode"):
            return str(cs.get("name")), int(terminated["exitCode"]), terminated.get("message") or ""
    return None


def termination_message(pod: dict[str, Any], *, lines: int = 5) -> str:
    """What a failed container said last (its termination message: the enrolment check's problems, or the
    node's error line), joined on one line for a condition."""
    failed = _failed_container(pod)
    if failed is None:
        return ""
    name, code, message = failed
    said = [line.strip() for line in message.splitlines() if line.strip()]
    return f"{name}: " + "; ".join(said[-lines:]) if said else f"{name} exited {code}"


def _failure_detail(kube: Kube, namespace: str, job_name: str) -> tuple[str, str]:
    """The Ready reason and the message of a failed training Job's pod."""
    for pod in kube.list("v1", "Pod", namespace=namespace, selector=f"job-name={job_name}"):
        failed = _failed_container(pod)
        if failed is not None:
            # The node refused the aggregator's terms: the tenant (or the coordinator) must act, not retry.
            reason = "TermsMismatch" if failed[1] == NodeExitCode.TERMS_REFUSED else ParticipantPhase.failed.value
            return reason, termination_message(pod)
    return ParticipantPhase.failed.value, ""


_ASK = object()


def participant_status(kube: Kube, body: dict[str, Any], same_federation: list[dict[str, Any]],
                       federation_body: Any = _ASK) -> dict[str, Any]:
    """``same_federation``: every Participant (any namespace) naming the same Federation, from the operator's index;
    ``federation_body``: the Federation it names (None: there is none) from the operator's index, or, when not
    given, read from the API server."""
    status: dict[str, Any] = dict(body.get("status") or {})
    meta = body["metadata"]
    conditions = status.get("conditions", [])
    try:
        participant = parse_participant(body)
    except ManifestError as err:
        conditions = set_condition(conditions, condition("Admitted", False, "InvalidSpec", str(err)))
        conditions = set_condition(conditions, condition("Ready", False, "InvalidSpec", "fix the spec: see Admitted"))
        return {**status, "phase": ParticipantPhase.refused.value, "conditions": stamped(conditions, meta.get("generation", 0)),
                "observedGeneration": meta.get("generation", 0)}
    ref = participant.spec.federation_ref
    fed_body = kube.get(API, "Federation", ref.namespace, ref.name) if federation_body is _ASK else federation_body
    federation: Federation | None = None
    fed_phase, training = Phase.pending, []
    if fed_body is not None:
        fed_status = fed_body.get("status") or {}
        fed_phase = Phase(fed_status.get("phase") or Phase.pending.value)
        training = list(fed_status.get("participants") or [])
        try:
            federation = parse_federation(fed_body)
        except ManifestError:
            federation = None
    siblings = siblings_by_namespace(same_federation).get(participant.metadata.namespace, [])
    decision = decide(participant, federation, phase=fed_phase, training=training, siblings=siblings,
                      accepted=accepted_terms(body))
    if fed_body is not None and federation is None:
        decision = type(decision)(False, "FederationInvalid",
                                  f"Federation {ref.namespace}/{ref.name} has an invalid spec; its owner must fix it")
    conditions = set_condition(conditions, condition("Admitted", decision.admitted, decision.reason, decision.message))
    denied: AccessDenied | None = None
    if not decision.admitted:
        phase, message = ParticipantPhase.refused, decision.message
    else:
        names = Names(ref.namespace, ref.name)
        job_name = names.training_job(participant.metadata.name)
        try:
            phase, message = _job_phase(kube.get("batch/v1", "Job", participant.metadata.namespace, job_name))
        except AccessDenied as err:  # the namespace has not granted the operator access: say how to
            denied, phase, message = err, ParticipantPhase.admitted, ""
    reason = phase.value
    if decision.admitted and phase is ParticipantPhase.failed:
        try:
            reason, detail = _failure_detail(kube, participant.metadata.namespace, job_name)
        except AccessDenied:
            detail = ""
        message = f"{message}: {detail}" if detail else message
    ready = phase in (ParticipantPhase.training, ParticipantPhase.succeeded)
    children = find(conditions, "ChildrenCreated")  # written by the Federation's pass
    # The API refused this tenant's training objects: that is why it is not training (and, once the others
    # started, why enrollment looks closed to it).
    if denied is not None:
        ready, reason = False, ACCESS_NOT_GRANTED
        message = (access_not_granted(participant.metadata.namespace, denied.user,
                                      refused=f"{denied.verb} {denied.resource}")
                   + "; its Federation goes on with the other tenants")
    elif not ready and children is not None and children.get("status") == "False":
        ready, reason = False, str(children.get("reason") or "ApiError")
        message = ("the operator could not create this Participant's training objects: "
                   f"{children.get('message')}; its Federation goes on with the other tenants")
    conditions = set_condition(conditions, condition("Ready", ready, reason, message))
    if decision.admitted and federation is not None and participant.identity not in training:
        status["acceptedTerms"] = terms_digest(federation.spec)  # the consent the next change is checked against
    return {**status, "phase": phase.value, "identity": participant.identity,
            "conditions": stamped(conditions, meta.get("generation", 0)),
            "observedGeneration": meta.get("generation", 0)}
