"""The operator's pure parts: object builders, owner references, admission, conditions, the enrollment timer,
generated CRDs, network isolation."""

from __future__ import annotations

import itertools
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import yaml
from fedcrm_operator import builders, enrollment
from fedcrm_operator.admission import decide
from fedcrm_operator.conditions import condition, set_condition
from fedcrm_operator.naming import Names
from fedcrm_operator.resources import changed_sections, parse_federation
from fedcrm_operator.settings import OperatorSettings
from hypothesis import given
from hypothesis import strategies as st
from netpol import Pod, allowed, selects

from fedcrm.spec.crds import crd_manifests
from fedcrm.spec.loading import parse_manifest
from fedcrm.spec.manifests import Federation, Participant, Phase

SETTINGS = OperatorSettings()
TASK = {"target": "converted", "features": [{"name": "revenue", "type": "numeric"}]}


def federation(**spec: Any) -> Federation:
    body = {"task": TASK, "participants": {"namespaces": ["tenant-a", "tenant-b", "tenant-c"]}, **spec}
    return parse_manifest(
        {"apiVersion": "fedcrm.io/v1alpha1", "kind": "Federation", "metadata": {"name": "churn", "namespace": "coord"}, "spec": body},
        Federation, "test",
    )


def participant(ns: str = "tenant-a", name: str = "crm", **spec: Any) -> Participant:
    body = {
        "federationRef": {"name": "churn", "namespace": "coord"},
        "data": {"pvc": {"claimName": "crm-data", "path": "exports/leads.csv"}, "mapping": {"converted": "Converted"}},
        **spec,
    }
    return parse_manifest(
        {"apiVersion": "fedcrm.io/v1alpha1", "kind": "Participant", "metadata": {"name": name, "namespace": ns}, "spec": body},
        Participant, "test",
    )


NAMES = Names("coord", "churn")


def _job(fed: Federation, p: Participant) -> dict[str, Any]:
    return builders.training_job(NAMES, fed, p, SETTINGS, connect_timeout=900)


def _pod_spec(job: dict[str, Any]) -> dict[str, Any]:
    return job["spec"]["template"]["spec"]


# --------------------------------------------------------------------------- training pods


def test_gpu_request_goes_into_requests_and_limits_with_a_toleration() -> None:
    spec = _pod_spec(_job(federation(resources={"cpu": "2", "memory": "4Gi", "gpu": 1}), participant()))
    resources = spec["containers"][0]["resources"]
    assert resources["requests"] == resources["limits"] == {"cpu": "2", "memory": "4Gi", "nvidia.com/gpu": "1"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]


def test_cpu_only_pods_request_no_gpu_and_tolerate_nothing_extra() -> None:
    spec = _pod_spec(_job(federation(), participant()))
    assert "nvidia.com/gpu" not in spec["containers"][0]["resources"]["limits"]
    assert "tolerations" not in spec


def test_participant_overrides_resources_field_by_field_and_passes_scheduling_through() -> None:
    p = participant(
        resources={"gpu": 2}, nodeSelector={"pool": "a100"},
        tolerations=[{"key": "dedicated", "operator": "Equal", "value": "tenant-a", "effect": "NoSchedule"}],
    )
    spec = _pod_spec(_job(federation(resources={"cpu": "4", "memory": "8Gi"}), p))
    assert spec["containers"][0]["resources"]["limits"] == {"cpu": "4", "memory": "8Gi", "nvidia.com/gpu": "2"}
    assert spec["nodeSelector"] == {"pool": "a100"}
    assert {"key": "dedicated", "operator": "Equal", "value": "tenant-a", "effect": "NoSchedule"} in spec["tolerations"]
    assert spec["containers"][0]["env"] == [{"name": "FEDCRM_TORCH_THREADS", "value": "4"}]


def test_training_pod_is_hardened_and_mounts_only_its_own_namespace_objects() -> None:
    job = _job(federation(), participant())
    spec = _pod_spec(job)
    assert job["metadata"]["namespace"] == "tenant-a"
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True
    container = spec["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"] == {"claimName": "crm-data", "readOnly": True}
    assert volumes["tls"]["secret"]["secretName"] == NAMES.client_secret("crm")
    assert "--data-root" in container["args"]
    assert container["args"][container["args"].index("--aggregator") + 1] == "churn-aggregator-grpc.coord.svc.cluster.local:8443"
    # A wrong manifest (exit code 2) or an aggregator serving other terms (5) fails the Job at once instead of
    # crash-looping.
    rule = job["spec"]["podFailurePolicy"]["rules"][0]
    assert rule["action"] == "FailJob" and rule["onExitCodes"]["values"] == [2, 5]
    assert spec["restartPolicy"] == "Never"
    # The node enforces the tenant's own copy of the terms, mounted beside its Participant.
    own = container["args"][container["args"].index("--federation") + 1]
    participant_manifest = container["args"][container["args"].index("--participant") + 1]
    assert own.rsplit("/", 1) == [participant_manifest.rsplit("/", 1)[0], "federation.yaml"]


def test_aggregator_is_one_hardened_replica_with_a_checkpoint_volume() -> None:
    sts = builders.aggregator_stateful_set(NAMES, SETTINGS, config_digest="abc")
    assert sts["spec"]["replicas"] == 1
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "checkpoints"
    pod = sts["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert pod["automountServiceAccountToken"] is False
    assert c["securityContext"]["readOnlyRootFilesystem"] and c["securityContext"]["runAsNonRoot"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/healthz" and c["livenessProbe"]
    assert c["resources"]["requests"] == c["resources"]["limits"]
    assert "--serve-after-finish" in c["args"]


def test_aggregator_config_is_the_runtime_config_with_in_pod_paths() -> None:
    cm = builders.aggregator_config_map(NAMES, federation(), ["tenant-b/crm", "tenant-a/crm"], SETTINGS)
    from fedcrm.runconfig import AggregatorConfig

    config = AggregatorConfig.model_validate_json(cm["data"][builders.AGGREGATOR_CONFIG_KEY])
    assert config.participants == ["tenant-a/crm", "tenant-b/crm"]
    assert str(config.tls.key).startswith("/etc/fedcrm/tls")
    assert config.status_listen == "0.0.0.0:9090"


def test_long_names_stay_within_kubernetes_limits_and_unique() -> None:
    names = Names("coord", "x" * 60)
    a, b = names.training_job("p" * 60), names.training_job("p" * 59 + "q")
    assert len(a) <= 63 and len(b) <= 63 and a != b
    assert len(names.aggregator) <= 52
    assert all(len(v) <= 63 for v in names.labels("training", "p" * 60).values())


# --------------------------------------------------------------------------- admission


@pytest.mark.parametrize(
    ("namespace", "fed_exists", "phase", "training", "reason"),
    [
        ("tenant-a", True, Phase.enrolling, [], "Admitted"),
        ("tenant-z", True, Phase.enrolling, [], "NamespaceNotAllowed"),
        ("tenant-a", False, Phase.enrolling, [], "FederationNotFound"),
        ("tenant-a", True, Phase.training, ["tenant-b/crm"], "EnrollmentClosed"),
        ("tenant-a", True, Phase.training, ["tenant-a/crm"], "Admitted"),
    ],
)
def test_admission_needs_consent_on_both_sides(namespace: str, fed_exists: bool, phase: Phase, training: list[str], reason: str) -> None:
    d = decide(participant(namespace), federation() if fed_exists else None, phase=phase, training=training)
    assert d.reason == reason
    assert d.admitted == (reason == "Admitted")
    if not d.admitted:
        assert "coord/churn" in d.message


def test_refusal_message_says_who_must_do_what() -> None:
    d = decide(participant("tenant-z"), federation(), phase=Phase.enrolling, training=[])
    assert "spec.participants.namespaces" in d.message and "'tenant-z'" in d.message


def test_frozen_sections_changed_mid_training_are_named() -> None:
    before = federation().spec.model_dump(mode="json", by_alias=True)
    after = federation(training={"rounds": 99}, resources={"cpu": "3"})
    assert changed_sections(after, before) == ["spec.training"]


def test_cluster_objects_parse_with_server_fields() -> None:
    body = {
        "apiVersion": "fedcrm.io/v1alpha1", "kind": "Federation",
        "metadata": {"name": "churn", "namespace": "coord", "uid": "1", "resourceVersion": "7", "generation": 2,
                     "managedFields": [], "finalizers": ["fedcrm.io/cleanup"]},
        "spec": {"task": TASK}, "status": {"phase": "Training"},
    }
    assert parse_federation(body).key == "coord/churn"


# --------------------------------------------------------------------------- conditions


def test_condition_transition_time_moves_only_when_status_changes() -> None:
    first = set_condition([], condition("Ready", False, "Enrolling", "waiting"))
    stamp = first[0]["lastTransitionTime"]
    same = set_condition([{**first[0], "lastTransitionTime": "2020-01-01T00:00:00Z"}], condition("Ready", False, "Enrolling", "still"))
    assert same[0]["lastTransitionTime"] == "2020-01-01T00:00:00Z" and same[0]["message"] == "still"
    flipped = set_condition(same, condition("Ready", True, "Training", "go"))
    assert flipped[0]["lastTransitionTime"] >= stamp and flipped[0]["status"] == "True"


# --------------------------------------------------------------------------- CRDs


def test_committed_crds_match_the_models() -> None:
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "crds"
    for name, crd in crd_manifests().items():
        assert yaml.safe_load((root / name).read_text()) == crd, f"crds/{name} is stale: run `make crds`"


def test_crds_document_every_field_and_enforce_enums_and_ranges() -> None:
    fed = crd_manifests()["fedcrm.io_federations.yaml"]
    version = fed["spec"]["versions"][0]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    training = spec["properties"]["training"]["properties"]
    assert training["rounds"]["minimum"] == 0 and training["rounds"]["exclusiveMinimum"] is True
    assert training["algorithm"]["enum"] == ["fedavg", "fedprox"]
    assert training["rounds"]["default"] == 20
    assert version["subresources"] == {"status": {}}
    assert fed["spec"]["names"]["shortNames"] == ["fed"]
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Round"] == ".status.progress" and "Epsilon" in columns and "Accuracy" in columns
    part = crd_manifests()["fedcrm.io_participants.yaml"]
    data = part["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["data"]
    assert "exactly one data source" in data["x-kubernetes-validations"][0]["message"]


# --------------------------------------------------------------------------- network isolation


def test_network_policies_allow_exactly_the_federation_paths() -> None:
    """Every (source, destination, port) among fedcrm pods and their neighbours, against the intended set."""
    fed = federation()
    admitted = [participant("tenant-a"), participant("tenant-b")]
    policies = [builders.aggregator_network_policy(NAMES, ["tenant-a", "tenant-b"], SETTINGS)]
    policies += [builders.participant_network_policy(NAMES, p, SETTINGS) for p in admitted]
    aggregator_sts = builders.aggregator_stateful_set(NAMES, SETTINGS, config_digest="abc")
    aggregator = Pod("churn-aggregator-0", "coord", aggregator_sts["spec"]["template"]["metadata"]["labels"])
    trainers = [
        Pod(f"{p.metadata.name}-job", p.metadata.namespace, _job(fed, p)["spec"]["template"]["metadata"]["labels"])
        for p in admitted
    ]
    dns = Pod("coredns", "kube-system", {"k8s-app": "kube-dns"})
    prometheus = Pod("prometheus", "monitoring", {"app": "prometheus"})
    operator = Pod("operator", "fedcrm-system", {"app.kubernetes.io/name": "fedcrm-operator"})
    stranger = Pod("web", "tenant-a", {"app": "web"})
    other_tenant = Pod("spy", "tenant-z", NAMES.labels("training", "crm"))  # same labels, namespace not admitted
    pods = [aggregator, *trainers, dns, prometheus, operator, stranger, other_tenant]
    ports = [(8443, "TCP"), (9090, "TCP"), (53, "UDP"), (53, "TCP"), (22, "TCP")]
    expected = {(t, aggregator, 8443, "TCP") for t in trainers}
    expected |= {(t, dns, 53, proto) for t in trainers for proto in ("UDP", "TCP")}
    expected |= {(prometheus, aggregator, 9090, "TCP"), (operator, aggregator, 9090, "TCP")}
    ours = {aggregator, *trainers}
    for src, dst in itertools.permutations(pods, 2):
        if src not in ours and dst not in ours:
            continue  # paths between pods the operator does not manage are not its policies' business
        for port, proto in ports:
            assert allowed(policies, src, dst, port, proto) == ((src, dst, port, proto) in expected), (
                f"{src.namespace}/{src.name} -> {dst.namespace}/{dst.name}:{port}/{proto}"
            )


def test_training_pods_reach_exactly_their_own_declared_data_source() -> None:
    """A tenant reading PostgreSQL running beside it and a tenant reading Salesforce: each training pod reaches its
    own source on its port, and nothing else outside the federation paths (once, both were denied: an enforcing
    network plugin would have failed their data check)."""
    fed = federation()
    sql = participant("tenant-a", data={
        "sql": {"query": "SELECT * FROM leads", "secretRef": {"name": "crm-db"},
                "egress": [{"podSelector": {"app": "crm-postgres"}, "ports": [5432]}]},
        "mapping": {"converted": "Converted"}})
    salesforce = participant("tenant-b", data={
        "salesforce": {"object": "Lead", "fields": ["Id", "IsConverted"], "secretRef": {"name": "sf"}},
        "mapping": {"converted": "IsConverted"}})
    policies = [builders.participant_network_policy(NAMES, p, SETTINGS) for p in (sql, salesforce)]
    sql_pod, sf_pod = (Pod(f"{p.metadata.namespace}-job", p.metadata.namespace,
                           _job(fed, p)["spec"]["template"]["metadata"]["labels"]) for p in (sql, salesforce))
    postgres = Pod("postgres-0", "tenant-a", {"app": "crm-postgres"}, ip="10.244.1.7")
    others_postgres = Pod("postgres-0", "tenant-b", {"app": "crm-postgres"}, ip="10.244.2.7")  # another tenant's
    web = Pod("web", "tenant-a", {"app": "web"}, ip="10.244.1.8")
    salesforce_api = Pod("na1.salesforce.com", "internet", ip="203.0.113.10")
    salesforce_v6 = Pod("na1.salesforce.com-v6", "internet", ip="2001:db8::10")
    private_host = Pod("db.corp", "internet", ip="10.20.0.15")
    for src, dst, port, ok in [
        (sql_pod, postgres, 5432, True), (sql_pod, postgres, 22, False), (sql_pod, others_postgres, 5432, False),
        (sql_pod, web, 5432, False), (sql_pod, salesforce_api, 443, False),
        (sf_pod, salesforce_api, 443, True), (sf_pod, salesforce_v6, 443, True), (sf_pod, salesforce_api, 80, False),
        (sf_pod, private_host, 443, False), (sf_pod, postgres, 443, False), (sf_pod, others_postgres, 5432, False),
    ]:
        assert allowed(policies, src, dst, port) == ok, f"{src.name} -> {dst.namespace}/{dst.name}:{port}"


def test_a_namespace_joins_a_federation_once() -> None:
    """A tenant with several Participants could meet minParticipants alone and subtract its own updates from the
    sum: the oldest (or the one already training) is the namespace's, the others are refused and told why."""
    from fedcrm_operator.admission import Sibling

    first, second = participant("tenant-a", "crm"), participant("tenant-a", "crm-2")
    siblings = [Sibling("tenant-a/crm-2", "2026-11-30T10:00:05Z"), Sibling("tenant-a/crm", "2026-11-30T10:00:00Z")]
    enrolling = {"phase": Phase.enrolling, "training": [], "siblings": siblings}
    assert decide(first, federation(), **enrolling).admitted
    d = decide(second, federation(), **enrolling)
    assert (d.admitted, d.reason) == (False, "OneParticipantPerNamespace")
    assert "through Participant tenant-a/crm" in d.message and "Delete one of them" in d.message
    # Already training wins over age: a restart of the operator never swaps a tenant's representative.
    training = {"phase": Phase.training, "training": ["tenant-a/crm-2"], "siblings": siblings}
    assert decide(second, federation(), **training).admitted
    assert decide(first, federation(), **training).reason == "OneParticipantPerNamespace"
    other = participant("tenant-b", "crm")
    assert decide(other, federation(), phase=Phase.enrolling, training=[],
                  siblings=[Sibling("tenant-b/crm", "2026-11-30T11:00:00Z")]).admitted


def test_a_sql_participant_must_say_where_its_database_is() -> None:
    data = {"sql": {"query": "SELECT 1", "secretRef": {"name": "crm-db"}}, "mapping": {"converted": "Converted"}}
    d = decide(participant(data=data), federation(), phase=Phase.enrolling, training=[])
    assert (d.admitted, d.reason) == (False, "EgressMissing")
    assert "spec.data.sql.egress is empty" in d.message and "cidr" in d.message and "podSelector" in d.message
    data["sql"]["egress"] = [{"cidr": "10.20.0.15/32", "ports": [5432]}]
    assert decide(participant(data=data), federation(), phase=Phase.enrolling, training=[]).admitted


@pytest.mark.parametrize(
    ("rule", "error"),
    [
        ({"ports": [5432]}, "give either 'cidr' or 'podSelector'"),
        ({"cidr": "10.20.0.15/24", "ports": [5432]}, "'10.20.0.15/24' is not a CIDR"),
        ({"podSelector": {}, "ports": [5432]}, "podSelector needs at least one label"),
        ({"podSelector": {"app": "db"}, "except": ["10.0.0.0/8"], "ports": [5432]}, "'except' goes with 'cidr'"),
        ({"cidr": "10.0.0.0/8", "ports": []}, "ports"),
        ({"cidr": "10.0.0.0/8", "ports": [5432], "namespace": "tenant-b"}, "unknown field"),
    ],
)
def test_bad_egress_rules_are_refused_with_what_to_fix(rule: dict[str, Any], error: str) -> None:
    from fedcrm.errors import ManifestError

    data = {"sql": {"query": "SELECT 1", "secretRef": {"name": "crm-db"}, "egress": [rule]}, "mapping": {}}
    with pytest.raises(ManifestError) as info:
        participant(data=data)
    assert error in str(info.value) and "spec.data.sql.egress" in str(info.value)


def test_policy_evaluator_semantics() -> None:
    a, b = Pod("a", "ns1", {"app": "a"}), Pod("b", "ns2", {"app": "b"})
    deny_in = {"metadata": {"namespace": "ns2"}, "spec": {"podSelector": {}, "policyTypes": ["Ingress"], "ingress": []}}
    assert allowed([], a, b, 80)
    assert not allowed([deny_in], a, b, 80)
    open_from_ns1 = {"metadata": {"namespace": "ns2"}, "spec": {"podSelector": {"matchLabels": {"app": "b"}}, "ingress": [
        {"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ns1"}}, "podSelector": {"matchLabels": {"app": "zzz"}}}]}]}}
    assert not allowed([deny_in, open_from_ns1], a, b, 80)  # namespace AND pod selector
    open_from_ns1["spec"]["ingress"][0]["from"][0]["podSelector"] = {"matchLabels": {"app": "a"}}
    assert allowed([deny_in, open_from_ns1], a, b, 80)  # policies union
    assert selects({"matchExpressions": [{"key": "app", "operator": "In", "values": ["a", "c"]}]}, {"app": "a"})
    assert not selects({"matchExpressions": [{"key": "app", "operator": "DoesNotExist"}]}, {"app": "a"})


def test_connector_credentials_are_the_tenants_own_secret_mounted_read_only_for_the_node() -> None:
    p = participant(data={"sql": {"query": "SELECT * FROM leads", "secretRef": {"name": "crm-db"}},
                          "mapping": {"converted": "converted"}})
    spec = _pod_spec(_job(federation(), p))
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["credentials"]["secret"] == {"secretName": "crm-db", "defaultMode": 0o400}
    assert "data" not in volumes  # no claim for a SQL source
    container = spec["containers"][0]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "credentials")
    assert mount["readOnly"] and container["args"][container["args"].index("--credentials") + 1] == mount["mountPath"]
    assert spec["securityContext"]["runAsUser"] == container["securityContext"]["runAsUser"]  # 0400 is readable by it


def test_a_secret_in_another_namespace_cannot_even_be_named() -> None:
    from fedcrm.errors import ManifestError

    with pytest.raises(ManifestError, match="own namespace"):
        participant(data={"sql": {"query": "SELECT 1", "secretRef": {"name": "crm-db", "namespace": "tenant-b"}},
                          "mapping": {}})


def test_the_enrolment_check_runs_before_training_with_the_same_data_mounts() -> None:
    job = _job(federation(), participant())
    spec = _pod_spec(job)
    check, node = spec["initContainers"][0], spec["containers"][0]
    assert check["name"] == "data-check" and "--check-only" in check["args"]
    assert check["volumeMounts"] == node["volumeMounts"] and "--aggregator" not in check["args"]
    assert check["args"][check["args"].index("--data-root") + 1] == node["args"][node["args"].index("--data-root") + 1]
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert {r["onExitCodes"]["containerName"] for r in rules if r["action"] == "FailJob"} == {"data-check", "node"}
    config = builders.participant_config_map(NAMES, federation(), participant())
    assert set(config["data"]) == {"participant.yaml", "federation.yaml"}


def test_a_failed_check_reaches_the_participant_as_its_own_words() -> None:
    from fedcrm_operator.participants import termination_message

    pod = {"status": {"initContainerStatuses": [{"name": "data-check", "state": {"terminated": {
        "exitCode": 2, "message": "participant tenant-a/crm: column 'Converted' not found in leads.csv; "
        "add it or fix spec.data.mapping.converted\n"}}}]}}
    assert termination_message(pod) == ("data-check: participant tenant-a/crm: column 'Converted' not found in leads.csv; "
                                        "add it or fix spec.data.mapping.converted")
    assert termination_message({"status": {"containerStatuses": [{"name": "node", "state": {"terminated": {"exitCode": 0}}}]}}) == ""


def test_a_refused_aggregator_is_named_terms_mismatch_on_the_participant() -> None:
    from fedcrm_operator.participants import _failure_detail

    said = "refusing the aggregator's request: its Federation differs ... spec.privacy.secureAggregation.enabled\n"
    pods = {5: "TermsMismatch", 1: "Failed"}
    for code, reason in pods.items():
        pod = {"status": {"containerStatuses": [{"name": "node", "state": {"terminated": {"exitCode": code, "message": said}}}]}}

        class OnePod:
            def list(self, *_: object, **__: object) -> list[dict]:
                return [pod]

        got_reason, message = _failure_detail(OnePod(), "tenant-a", "job")  # type: ignore[arg-type]
        assert got_reason == reason and message.startswith("node: refusing the aggregator's request")


def test_operator_default_resources_apply_when_the_federation_keeps_the_built_in_ones() -> None:
    from fedcrm.spec.manifests import Resources

    settings = OperatorSettings(default_resources=Resources(cpu="3", memory="6Gi", gpu=1))
    sized = builders.training_resources(federation(), participant(), settings)
    assert (sized.cpu, sized.memory, sized.gpu) == ("3", "6Gi", 1)
    own = builders.training_resources(federation(resources={"cpu": "2"}), participant(resources={"memory": "1Gi"}), settings)
    assert (own.cpu, own.memory, own.gpu) == ("2", "1Gi", 0)


def test_a_state_claim_is_mounted_read_write_in_the_training_container_only() -> None:
    job = _job(federation(), participant(stateClaim="crm-fedcrm-state"))
    spec = _pod_spec(job)
    assert {"name": "state", "persistentVolumeClaim": {"claimName": "crm-fedcrm-state"}} in spec["volumes"]
    node, check = spec["containers"][0], spec["initContainers"][0]
    state = next(m for m in node["volumeMounts"] if m["name"] == "state")
    assert not state.get("readOnly") and node["args"][node["args"].index("--state-dir") + 1] == state["mountPath"]
    assert all(m["name"] != "state" for m in check["volumeMounts"]) and "--state-dir" not in check["args"]
    without = _pod_spec(_job(federation(), participant()))
    assert "--state-dir" not in without["containers"][0]["args"]
    assert all(v["name"] != "state" for v in without["volumes"])


# --------------------------------------------------------------------------- events


def _status(phase: str, **conditions: tuple[str, str]) -> dict[str, Any]:
    return {"phase": phase, "conditions": [{"type": t, "status": "False", "reason": r, "message": m}
                                           for t, (r, m) in conditions.items()]}


def test_events_mark_transitions_and_each_new_refusal_never_a_quiet_pass() -> None:
    from fedcrm_operator.events import transition_event

    refused = _status("Refused", Admitted=("RequirementsNotMet", "epsilon must be at most 1"))
    event = transition_event("Participant", {}, refused)
    assert event is not None and (event.type, event.reason) == ("Warning", "RequirementsNotMet")
    assert event.message == "Pending -> Refused: epsilon must be at most 1"
    assert transition_event("Participant", refused, refused) is None  # a pass that changed nothing
    again = _status("Refused", Admitted=("TermsChanged", "set spec.acceptedTerms: abc"))
    event = transition_event("Participant", refused, again)
    assert event is not None and (event.type, event.reason) == ("Warning", "TermsChanged")  # a new refusal
    training = _status("Training", Admitted=("Admitted", "admitted"), Ready=("Training", "training pod scheduled"))
    event = transition_event("Participant", again, training)
    assert event is not None and (event.type, event.reason) == ("Normal", "Training")
    enrolling = _status("Enrolling", Ready=("Enrolling", "1 of at least 2 participants admitted"))
    started = _status("Training", Ready=("Training", "training with 2 participants"))
    event = transition_event("Federation", enrolling, started)
    assert event is not None and event.message == "Enrolling -> Training: training with 2 participants"
    assert transition_event("Federation", started, {**started, "round": 3}) is None  # progress is not an event
    failed = _status("Failed", Ready=("Failed", "enrolment: 0 participant(s) answered"))
    event = transition_event("Federation", started, failed)
    assert event is not None and event.type == "Warning"


def test_conditions_are_a_list_map_and_say_which_generation_they_describe() -> None:
    from fedcrm_operator.conditions import stamped

    for name in ("fedcrm.io_federations.yaml", "fedcrm.io_participants.yaml"):
        version = crd_manifests()[name]["spec"]["versions"][0]
        conditions = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["conditions"]
        assert conditions["x-kubernetes-list-type"] == "map" and conditions["x-kubernetes-list-map-keys"] == ["type"]
        assert "type" in conditions["items"]["required"] and "observedGeneration" in conditions["items"]["properties"]
    marked = stamped(set_condition([], condition("Ready", True, "Training", "ok")), 7)
    assert marked[0]["observedGeneration"] == 7 and marked[0]["type"] == "Ready"


# --------------------------------------------------------------------------- RBAC in the charts


def _render(chart: str, namespace: str, *sets: str) -> list[dict[str, Any]]:
    import shutil
    import subprocess
    from pathlib import Path

    helm = shutil.which("helm") or str(Path.home() / ".cache" / "fedcrm" / "k8s" / "v1.36.3" / "bin" / "helm")
    if not Path(helm).exists():
        pytest.skip("helm is not built yet: e2e/build-control-plane builds it with the control plane")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([helm, "template", "rel", str(root / "charts" / chart), "--namespace", namespace,
                           "--kube-version", "1.36.3", *[a for s in sets for a in ("--set", s)]],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def test_the_operator_has_no_cluster_wide_rights_on_anyone_elses_namespaced_objects() -> None:
    docs = _render("fedcrm-operator", "fedcrm-system", "coordinatorNamespaces={coord-a,coord-b}")
    cluster_role = next(d for d in docs if d["kind"] == "ClusterRole" and d["metadata"]["name"] == "rel")
    granted = {(g, r) for rule in cluster_role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    assert granted == {("fedcrm.io", "federations"), ("fedcrm.io", "participants"), ("fedcrm.io", "federations/status"),
                       ("fedcrm.io", "participants/status"), ("kopf.dev", "clusterkopfpeerings"), ("kopf.dev", "kopfpeerings"),
                       ("apiextensions.k8s.io", "customresourcedefinitions"), ("", "namespaces")}
    roles = {d["metadata"]["namespace"]: d for d in docs if d["kind"] == "Role"}
    bindings = {d["metadata"]["namespace"]: d for d in docs if d["kind"] == "RoleBinding"}
    assert set(roles) == set(bindings) == {"coord-a", "coord-b"}
    assert bindings["coord-a"]["subjects"] == [{"kind": "ServiceAccount", "name": "rel", "namespace": "fedcrm-system"}]
    kinds = {r for rule in roles["coord-a"]["rules"] for r in rule["resources"]}
    assert {"statefulsets", "secrets", "servicemonitors", "persistentvolumeclaims", "events"} <= kinds
    assert "jobs" not in kinds  # training runs in tenant namespaces only


@pytest.mark.parametrize("fed, name", [("churn", "crm"), ("a-federation-with-a-rather-long-name---", "and-a-participant-too")])
def test_the_tenant_chart_grants_the_operator_its_certificate_secret_by_name_and_no_other(fed: str, name: str) -> None:
    docs = _render("fedcrm-tenant", "tenant-a", f"participant.name={name}", f"participant.federation.name={fed}",
                   "operator.serviceAccount.name=ops", "operator.serviceAccount.namespace=ops-system")
    role = next(d for d in docs if d["kind"] == "Role")
    binding = next(d for d in docs if d["kind"] == "RoleBinding" and d["roleRef"]["kind"] == "Role")
    assert binding["roleRef"]["name"] == role["metadata"]["name"] == "fedcrm-operator-rel"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "ops", "namespace": "ops-system"}]
    secrets = [rule for rule in role["rules"] if "secrets" in rule["resources"]]
    # create cannot name its object (RBAC sees no name before it exists); everything else names the certificate.
    assert [r["verbs"] for r in secrets if "resourceNames" not in r] == [["create"]]
    named = [r for r in secrets if "resourceNames" in r]
    assert [r["resourceNames"] for r in named] == [[Names("coord", fed).client_secret(name)]]
    assert all("list" not in r["verbs"] and "watch" not in r["verbs"] for r in secrets)
    kinds = {r for rule in role["rules"] for r in rule["resources"]}
    assert kinds == {"jobs", "networkpolicies", "configmaps", "pods", "events", "secrets"}
    off = _render("fedcrm-tenant", "tenant-a", "operator.grant=false")
    assert not [d for d in off if d["kind"] in ("Role", "RoleBinding")]


def test_an_rbac_refusal_is_access_denied_and_a_quota_refusal_is_not() -> None:
    import json

    from fedcrm_operator.kube import AccessDenied, Kube
    from kubernetes.client.exceptions import ApiException

    def refusal(message: str) -> ApiException:
        err = ApiException(status=403, reason="Forbidden")
        err.body = json.dumps({"kind": "Status", "status": "Failure", "reason": "Forbidden", "code": 403, "message": message})
        return err

    rbac = Kube._translate(refusal(
        'jobs.batch "f1-crm" is forbidden: User "system:serviceaccount:fedcrm-system:fedcrm" cannot create resource '
        '"jobs" in API group "batch" in the namespace "tenant-z"'), "create Job tenant-z/f1-crm")
    assert isinstance(rbac, AccessDenied)
    assert (rbac.user, rbac.namespace, rbac.verb, rbac.resource) == (
        "system:serviceaccount:fedcrm-system:fedcrm", "tenant-z", "create", "jobs")
    quota = Kube._translate(refusal('jobs.batch "f1-crm" is forbidden: exceeded quota: no-jobs, requested: '
                                    'count/jobs.batch=1, used: count/jobs.batch=0, limited: count/jobs.batch=0'), "create Job")
    assert not isinstance(quota, AccessDenied) and "exceeded quota" in str(quota)


def test_children_of_participants_no_longer_admitted_are_removed_by_name_and_absent_ones_cost_nothing() -> None:
    from fedcrm_operator.federations import _BY_NAME, _remove_children
    from fedcrm_operator.kube import Kube
    from kubernetes.client.exceptions import ApiException

    deleted: list[tuple[str, str, str]] = []

    class Resource:
        def __init__(self, kind: str) -> None:
            self.kind = kind

        def delete(self, *, name: str, namespace: str, body: dict[str, Any]) -> None:
            deleted.append((self.kind, namespace, name))
            raise ApiException(status=404, reason="Not Found")

    class Offline(Kube):
        """The real client's caches and error handling; resources that answer 404 to every delete."""

        def __init__(self) -> None:
            import threading

            self._applied, self._ensured, self._kinds, self._absent, self._due = {}, {}, {}, {}, {}
            self._lock, self.requests = threading.Lock(), 0

        def _resource(self, api_version: str, kind: str) -> Any:
            return Resource(kind)

    kube = Offline()
    bodies = [{"metadata": {"namespace": "tenant-a", "name": "crm"}}, {"metadata": {"namespace": "tenant-b", "name": "crm"}}]
    _remove_children(kube, NAMES, bodies, keep={"tenant-a/crm"}, kinds=_BY_NAME)
    assert sorted(deleted) == sorted([("Job", "tenant-b", "churn-crm"), ("ConfigMap", "tenant-b", "churn-crm-config"),
                                      ("NetworkPolicy", "tenant-b", "churn-crm-training"), ("Secret", "tenant-b", "churn-crm-tls")])
    _remove_children(kube, NAMES, bodies, keep={"tenant-a/crm"}, kinds=_BY_NAME)
    assert len(deleted) == 4  # known absent: no second request
    assert kube.due("sweep", 30) and not kube.due("sweep", 30)


# --------------------------------------------------------------------------- enrollment timer

UTC = timezone.utc
MOMENTS = st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2900, 12, 31), timezones=st.just(UTC))


@st.composite
def rfc3339(draw: st.DrawFn) -> tuple[str, datetime]:
    """A timestamp as some writer may put it (RFC 3339 and the ISO 8601 forms Kubernetes' date-time accepts),
    and the instant it means (fractions past microseconds cut off)."""
    moment = draw(MOMENTS)
    zone = draw(st.sampled_from(["Z", "z", "offset", "offset-no-colon", "none", "-00:00"]))
    minutes = draw(st.integers(-(23 * 60 + 59), 23 * 60 + 59)) if zone.startswith("offset") else 0
    local = moment.astimezone(timezone(timedelta(minutes=minutes)))
    digits = draw(st.integers(0, 9))
    nanos = f"{local.microsecond:06d}{draw(st.integers(0, 999)):03d}"
    fraction = "" if digits == 0 else draw(st.sampled_from([".", ","])) + nanos[:digits]
    sign, magnitude = ("-" if minutes < 0 else "+"), abs(minutes)
    suffix = {"offset": f"{sign}{magnitude // 60:02d}:{magnitude % 60:02d}",
              "offset-no-colon": f"{sign}{magnitude // 60:02d}{magnitude % 60:02d}",
              "none": ""}.get(zone, zone)
    separator = draw(st.sampled_from(["T", "t", " "]))
    text = local.strftime(f"%Y-%m-%d{separator}%H:%M:%S") + fraction
    kept = int(nanos[:min(digits, 6)].ljust(6, "0")) if digits else 0
    return text + suffix, moment.replace(microsecond=kept - local.microsecond + moment.microsecond)


@given(rfc3339())
def test_any_rfc3339_form_of_a_time_reads_as_that_instant(case: tuple[str, datetime]) -> None:
    text, instant = case
    parsed = enrollment.parse_time(text)
    assert parsed == instant and parsed is not None and parsed.utcoffset() == timedelta(0), text


@given(MOMENTS)
def test_a_written_time_reads_back_to_the_second(moment: datetime) -> None:
    written = enrollment.format_time(moment)
    assert written.endswith("Z") and len(written) == 20
    assert enrollment.parse_time(written) == moment.replace(microsecond=0)


@given(st.one_of(st.text(max_size=40), st.none(), st.integers(), st.floats(), st.lists(st.integers())))
def test_reading_anything_never_raises(value: Any) -> None:
    parsed = enrollment.parse_time(value)
    assert parsed is None or parsed.tzinfo is not None


@pytest.mark.parametrize("text", ["", "now", "2024-02-30T00:00:00Z", "2024-01-01T24:00:00Z", "2024-01-01T00:00:00+24:00",
                                  "2024-01-01T00:00:00+01:60", "2024-01-01", "00:00:00Z", "2024-1-1T00:00:00Z",
                                  "2024-01-01T00:00:00Z trailing", "0001-01-01T00:00:00+01:00"])
def test_what_is_not_a_timestamp_reads_as_none(text: str) -> None:
    assert enrollment.parse_time(text) is None


def test_a_leap_second_and_minute_precision_are_read() -> None:
    assert enrollment.parse_time("2016-12-31T23:59:60Z") == datetime(2016, 12, 31, 23, 59, 59, tzinfo=UTC)
    assert enrollment.parse_time("2024-05-01T10:30+02:00") == datetime(2024, 5, 1, 8, 30, tzinfo=UTC)


NOW = datetime(2026, 11, 30, 20, 0, 0, tzinfo=UTC)


def enrolling(timeout: float = 60, minimum: int = 2) -> Federation:
    return federation(training={"minParticipants": minimum},
                      participants={"namespaces": ["tenant-a", "tenant-b", "tenant-c"], "enrollmentTimeoutSeconds": timeout})


def joined(*namespaces: str) -> list[Participant]:
    return [participant(ns) for ns in namespaces]


def test_enrollment_waits_below_the_minimum_and_forgets_an_earlier_minimum() -> None:
    closing = enrollment.closes(enrolling(), joined("tenant-a"), {"minReachedAt": "2026-11-30T19:00:00Z"}, now=NOW)
    assert not closing.start and closing.enrollment is None
    assert (closing.condition["status"], closing.condition["reason"]) == ("False", "WaitingForParticipants")


def test_the_minimum_reached_records_the_time_once_and_training_starts_after_the_timeout() -> None:
    fed, two = enrolling(timeout=60), joined("tenant-a", "tenant-b")
    first = enrollment.closes(fed, two, None, now=NOW)
    assert not first.start and first.enrollment == {"minReachedAt": "2026-11-30T20:00:00Z"}
    assert (first.condition["status"], first.condition["reason"]) == ("False", "MinimumReached")
    assert "at 2026-11-30T20:01:00Z" in first.message
    later = enrollment.closes(fed, two, first.enrollment, now=NOW + timedelta(seconds=59))
    assert not later.start and later.enrollment == first.enrollment and later.message == first.message
    due = enrollment.closes(fed, two, later.enrollment, now=NOW + timedelta(seconds=60))
    assert due.start and due.enrollment == first.enrollment
    assert (due.condition["status"], due.condition["reason"]) == ("True", "TimeoutReached")


def test_every_allowed_namespace_joined_starts_at_once() -> None:
    closing = enrollment.closes(enrolling(timeout=3600), joined("tenant-a", "tenant-b", "tenant-c"), None, now=NOW)
    assert closing.start and closing.condition["reason"] == "AllJoined" and closing.enrollment is None


@pytest.mark.parametrize("recorded", ["soon", "2026-13-01T00:00:00Z", 17, "2027-01-01T00:00:00Z"])
def test_an_unreadable_or_future_time_restarts_the_timer_with_a_log_line(recorded: Any, caplog: pytest.LogCaptureFixture) -> None:
    closing = enrollment.closes(enrolling(timeout=60), joined("tenant-a", "tenant-b"), {"minReachedAt": recorded}, now=NOW)
    assert not closing.start and closing.enrollment == {"minReachedAt": "2026-11-30T20:00:00Z"}
    assert "minReachedAt" in caplog.text and "restarts now" in caplog.text


def test_a_time_a_little_ahead_of_this_clock_is_kept() -> None:
    """Operator replicas' clocks differ by a little: that is no reason to restart the timeout."""
    ahead = {"minReachedAt": "2026-11-30T20:00:30Z"}
    assert enrollment.closes(enrolling(timeout=60), joined("tenant-a", "tenant-b"), ahead, now=NOW).enrollment == ahead


@given(rfc3339(), st.floats(0.5, 10_000), st.floats(-30, 20_000))
def test_training_starts_exactly_when_the_timeout_has_passed_since_the_recorded_time(
        case: tuple[str, datetime], timeout: float, elapsed: float) -> None:
    text, instant = case
    now = instant + timedelta(seconds=elapsed)
    closing = enrollment.closes(enrolling(timeout=timeout), joined("tenant-a", "tenant-b"), {"minReachedAt": text}, now=now)
    assert closing.start == ((now - instant).total_seconds() >= timeout)
    assert closing.enrollment == {"minReachedAt": text}  # read as it is, never rewritten


# --------------------------------------------------------------------------- owner references


def _owner(kind: str, namespace: str, name: str = "crm", uid: str = "0f1e") -> dict[str, Any]:
    return {"apiVersion": "fedcrm.io/v1alpha1", "kind": kind,
            "metadata": {"name": name, "namespace": namespace, "uid": uid, "labels": {"team": "sales"}},
            "spec": {}}


def test_children_in_their_owners_namespace_get_one_controller_reference_through_kopf() -> None:
    import kopf

    fed, p = federation(), participant()
    owner = _owner("Participant", "tenant-a")
    built = builders.participant_config_map(NAMES, fed, p)
    owned = builders.owned_by(built, owner)
    assert "ownerReferences" not in built["metadata"]  # the builder's own dict is left alone
    expected = kopf.build_owner_reference(kopf.Body(owner), controller=True, block_owner_deletion=False)
    assert owned["metadata"]["ownerReferences"] == [expected]
    assert expected == {"apiVersion": "fedcrm.io/v1alpha1", "kind": "Participant", "name": "crm", "uid": "0f1e",
                        "controller": True, "blockOwnerDeletion": False}
    assert builders.owned_by(owned, owner)["metadata"]["ownerReferences"] == [expected]  # once, however often
    assert owned["metadata"]["labels"] == built["metadata"]["labels"]  # the tenant's labels stay on its object


def test_a_federation_owns_its_coordinator_children_but_never_a_tenant_namespace_child() -> None:
    fed, p = federation(), participant()
    owner = _owner("Federation", "coord", name="churn")
    for child in [builders.aggregator_stateful_set(NAMES, SETTINGS, config_digest="d"), builders.service_monitor(NAMES),
                  *builders.aggregator_services(NAMES, SETTINGS), builders.aggregator_network_policy(NAMES, ["tenant-a"], SETTINGS)]:
        refs = builders.owned_by(child, owner)["metadata"]["ownerReferences"]
        assert [(r["kind"], r["name"], r["controller"]) for r in refs] == [("Federation", "churn", True)]
    for child in [_job(fed, p), builders.participant_network_policy(NAMES, p, SETTINGS)]:
        # The garbage collector would look for a Federation in tenant-a, find none and delete the child.
        assert "ownerReferences" not in builders.owned_by(child, owner)["metadata"]
    assert "ownerReferences" not in builders.owned_by(_job(fed, p), None)["metadata"]
    unsaved = {**owner, "metadata": {**owner["metadata"], "uid": None, "namespace": "tenant-a"}}
    assert "ownerReferences" not in builders.owned_by(_job(fed, p), unsaved)["metadata"]


class RecordingKube:
    """Just enough of :class:`fedcrm_operator.kube.Kube` for one Federation pass: every object it would create or
    apply is kept by (kind, namespace, name)."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}

    def _key(self, obj: dict[str, Any]) -> tuple[str, str, str]:
        return obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"]

    def ensure(self, api_version: str, kind: str, namespace: str, name: str, build: Any) -> dict[str, Any]:
        return self.objects.setdefault((kind, namespace, name), build())

    def apply(self, obj: dict[str, Any]) -> None:
        self.objects[self._key(obj)] = obj

    def has_kind(self, api_version: str, kind: str) -> bool:
        return True

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self.objects.get((kind, namespace, name))

    def patch_status(self, *_: Any) -> None:
        pass

    def delete_named(self, *_: Any) -> None:
        pass

    def due(self, *_: Any) -> bool:
        return False


def _participant_body(ns: str) -> dict[str, Any]:
    return {"apiVersion": "fedcrm.io/v1alpha1", "kind": "Participant",
            "metadata": {"name": "crm", "namespace": ns, "uid": f"uid-{ns}"},
            "spec": {"federationRef": {"name": "churn", "namespace": "coord"},
                     "data": {"pvc": {"claimName": "crm-data", "path": "leads.csv"}, "mapping": {"converted": "Converted"}}}}


def test_a_pass_records_the_minimum_once_owns_what_it_may_and_removes_the_timer_below_the_minimum() -> None:
    from fedcrm_operator.federations import reconcile

    kube = RecordingKube()
    body: dict[str, Any] = {
        "apiVersion": "fedcrm.io/v1alpha1", "kind": "Federation",
        "metadata": {"name": "churn", "namespace": "coord", "uid": "uid-fed", "generation": 1},
        "spec": {"task": TASK, "training": {"minParticipants": 2},
                 "participants": {"namespaces": ["tenant-a", "tenant-b", "tenant-c"], "enrollmentTimeoutSeconds": 3600}},
    }
    two = [_participant_body("tenant-a"), _participant_body("tenant-b")]
    status = reconcile(kube, body, two, SETTINGS).status  # type: ignore[arg-type]
    reached = status["enrollment"]["minReachedAt"]
    assert status["phase"] == "Enrolling" and enrollment.parse_time(reached) is not None
    assert next(c for c in status["conditions"] if c["type"] == "Enrolled")["reason"] == "MinimumReached"
    again = reconcile(kube, {**body, "status": status}, two, SETTINGS).status  # type: ignore[arg-type]
    assert again["enrollment"] == {"minReachedAt": reached}  # written once

    for (kind, namespace, name), obj in kube.objects.items():
        refs = [(r["kind"], r["uid"], r["controller"]) for r in obj["metadata"].get("ownerReferences", [])]
        owner = ("Federation", "uid-fed", True) if namespace == "coord" else ("Participant", f"uid-{namespace}", True)
        assert refs == [owner], (kind, namespace, name)
    assert {ns for _, ns, _ in kube.objects} == {"coord", "tenant-a", "tenant-b"}

    below = reconcile(kube, {**body, "status": again}, two[:1], SETTINGS).status  # type: ignore[arg-type]
    assert "enrollment" in below and below["enrollment"] is None  # a merge patch's null removes it
    gone = {k: v for k, v in below.items() if k != "enrollment"}
    assert "enrollment" not in reconcile(kube, {**body, "status": gone}, two[:1], SETTINGS).status  # type: ignore[arg-type]


def test_the_operator_process_loads_no_numpy() -> None:
    """The operator image runs kopf, the Kubernetes client and the spec models; numpy (needed by the privacy
    mechanisms and secure aggregation, not by the plan the operator writes into status.privacyPlan) would add some
    10 MiB to every replica's resident memory. import-linter cannot say this: fedcrm.privacy.plans imports the
    mechanisms inside the functions that need them, which it counts as imports too."""
    import os
    import subprocess
    import sys

    code = ("import sys, fedcrm_operator.__main__, fedcrm_operator.handlers, fedcrm_operator.desired; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'numpy', 'torch', 'pandas', 'scipy'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)})
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
