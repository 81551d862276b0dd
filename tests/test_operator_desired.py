"""A Federation pass's decisions, over generated participant sets and observed states.

:func:`fedcrm_operator.desired.desired` is pure, so its invariants are checked here without a cluster: who gets
children, what every child carries, when enrolment closes and over whom, that the phase only moves forward and
the training set never changes once fixed, when the aggregator exists, and what is removed. The applier around
it (:func:`fedcrm_operator.federations.reconcile`) is checked with a stand-in client for the one thing it adds:
one tenant's refused child leaves the others training.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
from typing import Any

import kopf
import pytest
from fedcrm_operator import builders
from fedcrm_operator.aggregator_status import AggregatorStatus
from fedcrm_operator.conditions import find
from fedcrm_operator.desired import BY_NAME, Desired, Observed, Refused, desired
from fedcrm_operator.naming import FEDERATION_LABEL, FEDERATION_NAMESPACE_LABEL, Names
from fedcrm_operator.resources import frozen_digest, parse_federation
from fedcrm_operator.settings import OperatorSettings
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedcrm.runconfig import AggregatorConfig
from fedcrm.spec.manifests import Phase
from fedcrm.spec.terms import terms_digest

SETTINGS = OperatorSettings()
NAMES = Names("coord", "churn")
POOL = ("tenant-a", "tenant-b", "tenant-c", "tenant-d")  # tenant-d is never allowed
TASK = {"target": "converted", "features": [{"name": "revenue", "type": "numeric"}]}
NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.timezone.utc)
RANK = {"Pending": 0, "Enrolling": 1, "Training": 2, "Succeeded": 3, "Failed": 3}
PROPERTIES = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _federation_body(allowed: list[str], min_participants: int, *, rounds: int = 3, secure: bool = False,
                     dp: bool = False, status: dict[str, Any] | None = None) -> dict[str, Any]:
    privacy: dict[str, Any] = {"secureAggregation": {"enabled": secure}}
    if dp:
        privacy["differentialPrivacy"] = {"mode": "client", "epsilon": 8.0, "delta": 1e-5}
    return {
        "apiVersion": "fedcrm.io/v1alpha1", "kind": "Federation",
        "metadata": {"name": "churn", "namespace": "coord", "uid": "uid-fed", "generation": 3},
        "spec": {"task": TASK, "training": {"minParticipants": min_participants, "rounds": rounds},
                 "participants": {"namespaces": allowed, "enrollmentTimeoutSeconds": 600}, "privacy": privacy},
        "status": status or {},
    }


def _participant_body(ns: str, name: str, *, created: str, requires: dict[str, Any] | None = None,
                      accepted: str | None = None, invalid: bool = False) -> dict[str, Any]:
    spec: dict[str, Any] = {"federationRef": {"name": "churn", "namespace": "coord"}}
    if not invalid:
        spec["data"] = {"pvc": {"claimName": "crm-data", "path": "leads.csv"}, "mapping": {"converted": "Converted"}}
    if requires:
        spec["requires"] = requires
    if accepted:
        spec["acceptedTerms"] = accepted
    return {"apiVersion": "fedcrm.io/v1alpha1", "kind": "Participant",
            "metadata": {"name": name, "namespace": ns, "uid": f"uid-{ns}-{name}", "creationTimestamp": created},
            "spec": spec}


@st.composite
def passes(draw: st.DrawFn, phase: str | None = "any") -> tuple[dict[str, Any], list[dict[str, Any]], Observed]:
    """A Federation (with the status an earlier pass may have left), the Participants naming it, and what this
    pass observed. ``phase``: the one recorded ("Enrolling": past the timeout once the minimum is reached), or
    any."""
    closing = phase == "Enrolling"
    allowed = draw(st.lists(st.sampled_from(POOL[:3]), min_size=1, max_size=3, unique=True))
    minimum = draw(st.integers(1, len(allowed)))
    secure, dp = draw(st.booleans()), draw(st.sampled_from([False, False, False, True]))
    invalid_spec = draw(st.sampled_from([False] * 15 + [True]))
    body = _federation_body(allowed, len(allowed) + 1 if invalid_spec else minimum, secure=secure, dp=dp)
    current_terms = terms_digest(parse_federation(_federation_body(allowed, minimum, secure=secure, dp=dp)).spec)

    participants, plain = [], 8 if closing else 2  # closing: fewer refusals, so that enough are admitted
    for ns in POOL:
        least = 1 if closing and ns in allowed else 0  # closing: every allowed namespace asks to join
        for name in draw(st.lists(st.sampled_from(["crm", "erp"]), min_size=least, max_size=2, unique=True)):
            participants.append(_participant_body(
                ns, name, created=draw(st.sampled_from(["2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z"])),
                requires=draw(st.sampled_from([None] * plain + [{"secureAggregation": True}, {"minTenants": 4}])),
                accepted=draw(st.sampled_from([None] * plain + [current_terms, "f" * 64])),
                invalid=draw(st.sampled_from([False] * 4 * plain + [True]))))
    identities = [f"{p['metadata']['namespace']}/{p['metadata']['name']}" for p in participants]

    if phase == "any":
        phase = draw(st.sampled_from(["Enrolling", None, "Pending", "Enrolling", "Training", "Training", "Succeeded",
                                      "Failed"]))
    status: dict[str, Any] = {} if phase is None else {"phase": phase}
    training: list[str] = []
    if phase in ("Training", "Succeeded", "Failed"):
        training = sorted(draw(st.sets(st.sampled_from(identities + ["tenant-c/gone"]))))
        status["participants"] = training
        digest = frozen_digest(parse_federation(body)) if not invalid_spec else "0" * 16
        status["trainingSpecDigest"] = draw(st.sampled_from([digest, "0" * 16]))
    elif phase == "Enrolling" and (closing or draw(st.sampled_from([True, True, False]))):
        ago = 900 if closing else draw(st.sampled_from([900, 0, 300]))  # the timeout is 600 s
        since = NOW - dt.timedelta(seconds=ago)
        status["enrollment"] = {"minReachedAt": since.strftime("%Y-%m-%dT%H:%M:%SZ")}
    body["status"] = status

    config = None
    if not invalid_spec and phase == "Training":
        kind = draw(st.sampled_from(["absent", "same", "changed", "garbage"]))
        rounds = 3 if kind == "same" else 7
        started = parse_federation(_federation_body(allowed, minimum, rounds=rounds, secure=secure, dp=dp))
        config = {"absent": None, "garbage": "{not json"}.get(
            kind, builders.aggregator_config_map(NAMES, started, training, SETTINGS)["data"][builders.AGGREGATOR_CONFIG_KEY])
    report = None
    if phase == "Training":
        state = draw(st.sampled_from([None, "training", "succeeded", "failed"]))
        report = None if state is None else AggregatorStatus(state=state, round=draw(st.integers(0, 3)), rounds=3)
    refused = draw(st.sets(st.sampled_from(identities), max_size=2)) if identities else set()
    observed = Observed(
        NOW + dt.timedelta(seconds=draw(st.sampled_from([0, 1, 3600]))),
        service_monitors=draw(st.booleans()), aggregator_config=config, aggregator=report,
        refused={i: Refused("ApiError", f"create Job {i}: exceeded quota") for i in sorted(refused)},
        coordinator_refused=draw(st.sampled_from([None] * 15 + [Refused("AccessNotGranted", "install the chart")])))
    return body, participants, observed


def _plan(case: tuple[dict[str, Any], list[dict[str, Any]], Observed]) -> Desired:
    body, participants, observed = case
    return desired(body, participants, observed, SETTINGS)


def _children(plan: Desired) -> list[dict[str, Any]]:
    return [c.obj for c in plan.coordinator + plan.aggregator] + [c.obj for t in plan.tenants for c in t.children]


def _condition(plan: Desired, type_: str) -> dict[str, Any] | None:
    return find(plan.status.get("conditions", []), type_)


@PROPERTIES
@given(case=passes())
def test_the_same_inputs_give_the_same_plan_and_the_inputs_are_left_alone(case: Any) -> None:
    before = copy.deepcopy(case)
    first, second = _plan(case), _plan(copy.deepcopy(case))
    assert first == second
    assert case == before


@PROPERTIES
@given(case=passes())
def test_children_exist_only_for_admitted_participants_one_per_allowed_namespace(case: Any) -> None:
    body, _, _ = case
    plan = _plan(case)
    admitted = {i for i, d in plan.decisions.items() if d.admitted}
    tenants = [t.identity for t in plan.tenants]
    assert set(tenants) <= admitted and len(tenants) == len(set(tenants))
    namespaces = [i.split("/")[0] for i in tenants]
    assert len(namespaces) == len(set(namespaces))
    assert set(namespaces) <= set(body["spec"]["participants"]["namespaces"])
    if plan.server is not None:
        assert set(tenants) == admitted
    for t in plan.tenants:
        kinds = {c.obj["kind"] for c in t.children}
        finished = body["status"].get("phase") in ("Succeeded", "Failed")
        assert ("Job" in kinds) is not finished  # no Job brought back to dial a finished aggregator
        assert {c.obj["metadata"]["namespace"] for c in t.children} == {t.certificate.namespace}


@PROPERTIES
@given(case=passes())
def test_every_child_carries_the_federations_labels_and_an_owner_in_its_namespace(case: Any) -> None:
    plan = _plan(case)
    for obj in _children(plan):
        meta = obj["metadata"]
        assert meta["labels"][FEDERATION_LABEL] == "churn" and meta["labels"][FEDERATION_NAMESPACE_LABEL] == "coord"
        owner = "uid-fed" if meta["namespace"] == "coord" else f"uid-{meta['namespace']}-"
        (ref,) = meta["ownerReferences"]
        assert ref["uid"].startswith(owner) and ref["controller"] is True
    for t in plan.tenants:
        assert t.owner is not None and t.certificate.owner is t.owner
        assert all(c.obj["metadata"]["ownerReferences"][0]["uid"] == t.owner["metadata"]["uid"] for c in t.children)


@settings(PROPERTIES, max_examples=200)
@given(case=st.one_of(passes("Enrolling"), passes()))
def test_enrolment_closes_only_over_admitted_tenants_whose_children_exist(case: Any) -> None:
    body, _, observed = case
    plan = _plan(case)
    was = body["status"].get("phase") or "Pending"
    if RANK[was] < RANK["Training"] and plan.status["phase"] == "Training":
        training = set(plan.status["participants"])
        admitted = {i for i, d in plan.decisions.items() if d.admitted}
        assert training == admitted - set(observed.refused)
        assert len(training) >= body["spec"]["training"]["minParticipants"]
        assert plan.status["trainingSpecDigest"] == frozen_digest(parse_federation(body))


@PROPERTIES
@given(case=passes())
def test_the_training_set_never_changes_once_training_and_the_phase_only_moves_forward(case: Any) -> None:
    body, _, _ = case
    plan = _plan(case)
    was, now = body["status"].get("phase") or "Pending", plan.status["phase"]
    assert RANK[now] >= RANK[was]
    if was in ("Succeeded", "Failed"):
        assert now == was
    if was in ("Training", "Succeeded", "Failed"):
        assert plan.status["participants"] == body["status"]["participants"]
    if plan.server is None:  # nothing applied: the phase stays as recorded
        assert now == (body["status"].get("phase") or "Pending")


@PROPERTIES
@given(case=st.one_of(passes(), passes("Training")))
def test_the_aggregator_exists_while_training_with_the_config_it_started_with(case: Any) -> None:
    body, _, observed = case
    plan = _plan(case)
    kinds = [c.obj["kind"] for c in plan.aggregator]
    training = plan.server is not None and (plan.status["phase"] == "Training" or (
        body["status"].get("phase") == "Training" and plan.status["phase"] in ("Succeeded", "Failed")))
    if not training:
        assert kinds == []
        return
    started = None  # the generator writes a config that parses, or "{not json"
    if observed.aggregator_config not in (None, "{not json"):
        started = AggregatorConfig.model_validate_json(observed.aggregator_config)
    known = plan.status.get("trainingSpecDigest") == frozen_digest(parse_federation(body)) or started is not None
    reachable = _condition(plan, "AggregatorReachable")
    assert reachable is not None
    if not known:
        assert kinds == [] and reachable["reason"] == "ConfigLost"
        return
    assert kinds == ["ConfigMap", "StatefulSet"] and all(c.once for c in plan.aggregator)
    assert reachable["reason"] == ("NoStatusYet" if observed.aggregator is None else "Reporting")
    config, stateful_set = (c.obj for c in plan.aggregator)
    text = observed.aggregator_config if observed.aggregator_config is not None else config["data"][
        builders.AGGREGATOR_CONFIG_KEY]
    annotations = stateful_set["spec"]["template"]["metadata"]["annotations"]
    assert annotations["fedcrm.io/config-digest"] == hashlib.sha256(text.encode()).hexdigest()[:16]
    refused = _condition(plan, "SpecAccepted")
    assert refused is not None
    changed = started is not None and started.federation.spec.training.rounds != body["spec"]["training"]["rounds"]
    assert (refused["reason"] == "ChangeRefused") is changed


@PROPERTIES
@given(case=passes())
def test_enrolled_participants_counts_the_admitted_then_the_training_set(case: Any) -> None:
    plan = _plan(case)
    if plan.server is None:
        return
    admitted = [i for i, d in plan.decisions.items() if d.admitted]
    expected = len(admitted) if plan.status["phase"] == "Enrolling" else len(plan.status["participants"])
    assert plan.status["enrolledParticipants"] == expected


@PROPERTIES
@given(case=passes())
def test_a_participant_no_longer_admitted_has_its_children_removed_by_name_and_the_others_are_kept(case: Any) -> None:
    _, participants, _ = case
    plan = _plan(case)
    if plan.server is None:
        assert plan.remove == () and plan.tenants == () and plan.coordinator == ()
        return
    kept = {t.identity for t in plan.tenants}
    removed = {(kind, ns, name) for _, kind, ns, name in plan.remove}
    for p in participants:
        ns, name = p["metadata"]["namespace"], p["metadata"]["name"]
        children = {("Job", ns, NAMES.training_job(name)), ("ConfigMap", ns, NAMES.participant_config(name)),
                    ("NetworkPolicy", ns, NAMES.participant_policy(name)), ("Secret", ns, NAMES.client_secret(name))}
        assert {k for _, k in BY_NAME} == {k for k, _, _ in children}
        if f"{ns}/{name}" in kept:
            assert not children & removed
            assert children <= plan.sweep.keep if plan.sweep else False
        else:
            assert children <= removed
            assert not children & (plan.sweep.keep if plan.sweep else frozenset())


@PROPERTIES
@given(case=passes())
def test_a_refused_coordinator_namespace_or_an_invalid_spec_applies_nothing_and_says_why(case: Any) -> None:
    body, _, observed = case
    plan = _plan(case)
    invalid = body["spec"]["training"]["minParticipants"] > len(body["spec"]["participants"]["namespaces"])
    if invalid:
        spec = _condition(plan, "SpecAccepted")
        assert spec is not None and spec["reason"] == "InvalidSpec"
    elif observed.coordinator_refused is not None:
        ready = _condition(plan, "Ready")
        assert ready is not None and ready["reason"] == "AccessNotGranted"
    else:
        assert plan.server is not None
        return
    assert plan.server is None and not _children(plan) and plan.sweep is None


def test_a_pass_keeps_the_privacy_plan_in_the_status() -> None:
    body = _federation_body(["tenant-a", "tenant-b"], 2, dp=True)
    plan = desired(body, [], Observed(NOW), SETTINGS)
    assert plan.status["privacyPlan"] and plan.status["phase"] == "Enrolling"
    assert "privacyPlan" not in desired(_federation_body(["tenant-a"], 1), [], Observed(NOW), SETTINGS).status


# --------------------------------------------------------------------------- the applier


class QuotaKube:
    """Just enough of a client for one pass: every object is kept by (kind, namespace, name); creating the Job in
    ``quota`` is refused as a ResourceQuota would refuse it."""

    def __init__(self, quota: str) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.quota = quota
        self.patched: dict[tuple[str, str], dict[str, Any]] = {}

    def ensure(self, api_version: str, kind: str, namespace: str, name: str, build: Any) -> dict[str, Any]:
        if kind == "Job" and namespace == self.quota:
            raise kopf.PermanentError(f"create Job {namespace}/{name}: exceeded quota: no-jobs")
        return self.objects.setdefault((kind, namespace, name), build())

    def apply(self, obj: dict[str, Any]) -> None:
        self.objects[(obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"])] = obj

    def has_kind(self, *_: Any) -> bool:
        return False

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self.objects.get((kind, namespace, name))

    def patch_status(self, api_version: str, kind: str, namespace: str, name: str, fields: dict[str, Any]) -> None:
        self.patched[(namespace, name)] = fields

    def delete_named(self, *_: Any) -> None:
        pass

    def due(self, *_: Any) -> bool:
        return False


@pytest.mark.parametrize("quota", ["tenant-b", "none"])
def test_a_tenant_whose_job_the_api_refuses_is_told_so_and_the_others_start_training(quota: str) -> None:
    from fedcrm_operator.federations import reconcile

    kube = QuotaKube(quota)
    # The minimum was reached long ago: enrolment closes now, over the tenants whose children exist.
    body = _federation_body(["tenant-a", "tenant-b", "tenant-c"], 2,
                            status={"phase": "Enrolling", "enrollment": {"minReachedAt": "2020-01-01T00:00:00Z"}})
    tenants = ("tenant-a", "tenant-b", "tenant-c")
    bodies = [_participant_body(ns, "crm", created="2026-01-01T00:00:00Z") for ns in tenants]
    outcome = reconcile(kube, body, bodies, SETTINGS)  # type: ignore[arg-type]
    trained = {f"{ns}/crm" for ns in tenants if ns != quota}
    assert outcome.status["phase"] == Phase.training.value
    assert set(outcome.status["participants"]) == trained
    assert {ns for kind, ns, _ in kube.objects if kind == "Job"} == {i.split("/")[0] for i in trained}
    assert ("StatefulSet", "coord", NAMES.aggregator) in kube.objects
    config = kube.objects[("ConfigMap", "coord", NAMES.aggregator_config)]["data"][builders.AGGREGATOR_CONFIG_KEY]
    assert ("tenant-b/crm" in config) is (quota != "tenant-b")
    if quota == "tenant-b":
        (condition,) = kube.patched[("tenant-b", "crm")]["conditions"]
        assert (condition["type"], condition["status"], condition["reason"]) == ("ChildrenCreated", "False", "ApiError")
        assert "exceeded quota" in condition["message"] and set(kube.patched) == {("tenant-b", "crm")}
    else:
        assert kube.patched == {}
