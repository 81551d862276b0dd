"""The operator against a real control plane: kube-apiserver, controller-manager, scheduler, etcd, KWOK nodes.

Everything here is asserted on the API objects the operator writes, as the
chart's ServiceAccount (least-privilege RBAC: in a tenant namespace the
operator can do only what the tenant chart grants, see grant_tenant_access). KWOK plays the kubelets: pods
are scheduled by the real scheduler and reported Running, but no container
runs, so training itself is covered by the local-federation tests.
"""

from __future__ import annotations

import base64
import subprocess
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from fedcrm_operator import watches
from netpol import Pod, allowed
from operator_harness import (
    OPERATOR_NAMESPACE,
    Kubectl,
    OperatorProcess,
    free_port,
    grant_tenant_access,
    install_chart,
    provide_claim,
    service_account_kubeconfig,
    wait_for,
)

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

COORD = "fedcrm-coord"
TENANTS = ["tenant-a", "tenant-b", "tenant-c"]
OUTSIDER = "tenant-z"
NO_GRANT = "tenant-nogrant"  # a tenant namespace that never installed the tenant chart
STATUS_PORT = free_port()
SERVICE_MONITOR_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
    "metadata": {"name": "servicemonitors.monitoring.coreos.com"},
    "spec": {"group": "monitoring.coreos.com", "scope": "Namespaced",
             "names": {"kind": "ServiceMonitor", "plural": "servicemonitors", "singular": "servicemonitor", "listKind": "ServiceMonitorList"},
             "versions": [{"name": "v1", "served": True, "storage": True,
                           "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}}]},
}
TASK = {
    "target": "converted",
    "features": [
        {"name": "revenue", "type": "numeric", "transform": "log1p", "description": "annual revenue"},
        {"name": "industry", "type": "categorical", "categories": ["tech", "retail", "finance"]},
    ],
}


def federation(name: str, *, namespaces: list[str] = TENANTS, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "fedcrm.io/v1alpha1",
        "kind": "Federation",
        "metadata": {"name": name, "namespace": COORD},
        "spec": {
            "task": TASK,
            "training": {"rounds": 5, "minParticipants": 2},
            "participants": {"namespaces": namespaces},
            **spec,
        },
    }


def participant(namespace: str, fed: str, *, name: str = "crm", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "fedcrm.io/v1alpha1",
        "kind": "Participant",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "federationRef": {"name": fed, "namespace": COORD},
            "data": {"pvc": {"claimName": "crm-data", "path": "leads.csv"}, "mapping": {"converted": "Converted"}},
            **spec,
        },
    }


@pytest.fixture(scope="module")
def kubectl(control_plane: Any) -> Kubectl:
    return Kubectl(control_plane.bin_dir / "kubectl", control_plane.kubeconfig)


@pytest.fixture(scope="module")
def operator(control_plane: Any, kubectl: Kubectl, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    work = tmp_path_factory.mktemp("operator")
    install_chart(control_plane.bin_dir / "helm", control_plane.kubeconfig)
    kubectl.apply(SERVICE_MONITOR_CRD)  # as where the Prometheus operator runs: the operator then adds ServiceMonitors
    wait_for("the ServiceMonitor kind", lambda: kubectl("get", "servicemonitors", "-A", check=False).returncode == 0)
    for ns in [COORD, *TENANTS, OUTSIDER, "monitoring"]:
        kubectl("create", "namespace", ns, check=False)
    for ns in TENANTS:
        provide_claim(kubectl, ns)
        grant_tenant_access(kubectl, ns, (COORD, "f1"), "crm")  # as `helm install` of the tenant chart would
        grant_tenant_access(kubectl, ns, (COORD, "f2"), "crm2")
    grant_tenant_access(kubectl, OUTSIDER, (COORD, "f1"), "crm")  # it consents; f1 does not allow it
    sa_config = service_account_kubeconfig(kubectl, control_plane.kubeconfig, work / "operator.kubeconfig")
    # No pod really runs under KWOK, so the end-to-end test runs the aggregator's own command here; the
    # operator polls it on loopback instead of through the (unreachable) Service name.
    status_url = f"http://127.0.0.1:{STATUS_PORT}/status"
    proc = OperatorProcess(sa_config, work, env={"FEDCRM_AGGREGATOR_STATUS_URL": status_url}).start()
    yield proc
    proc.stop()


def phase_of(kubectl: Kubectl, kind: str, name: str, namespace: str) -> str | None:
    obj = kubectl.get(kind, name, namespace)
    return ((obj or {}).get("status") or {}).get("phase")


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in obj["status"]["conditions"] if c["type"] == type_)


def children(kubectl: Kubectl, fed: str) -> dict[str, list[tuple[str, str]]]:
    selector = f"fedcrm.io/federation={fed},fedcrm.io/federation-namespace={COORD}"
    kinds = ["secrets", "configmaps", "services", "statefulsets", "jobs", "pods", "networkpolicies", "persistentvolumeclaims",
             "servicemonitors"]
    return {
        kind: sorted((i["metadata"]["namespace"], i["metadata"]["name"]) for i in kubectl.items(kind, selector=selector))
        for kind in kinds
    }


def test_api_server_rejects_invalid_federations_with_a_readable_message(operator: OperatorProcess, kubectl: Kubectl) -> None:
    bad = federation("bad-rounds", training={"rounds": 0})
    proc = kubectl.apply(bad, check=False)
    assert proc.returncode != 0
    assert "spec.training.rounds" in proc.stderr and "greater than 0" in proc.stderr
    typo = federation("bad-typo")
    typo["spec"]["trainig"] = typo["spec"].pop("training")
    proc = kubectl.apply(typo, check=False)
    assert proc.returncode != 0 and 'unknown field "spec.trainig"' in proc.stderr
    enum = federation("bad-enum", training={"algorithm": "fedsgd"})
    proc = kubectl.apply(enum, check=False)
    assert proc.returncode != 0 and "fedavg" in proc.stderr and "fedprox" in proc.stderr
    assert kubectl.get("federation", "bad-rounds", COORD) is None


def test_kubectl_explain_documents_the_fields(operator: OperatorProcess, kubectl: Kubectl) -> None:
    def explain(path: str) -> str:
        return " ".join(kubectl("explain", path).stdout.split())  # kubectl wraps long descriptions

    assert "Fraction of each neighbourhood" in explain("federation.spec.privacy.secureAggregation")
    assert "a plain name, no namespace" in explain("participant.spec.data.pvc")
    assert "Total privacy budget over the whole run" in explain("federation.spec.privacy.differentialPrivacy")


def test_participant_referencing_another_namespace_is_refused_at_apply(operator: OperatorProcess, kubectl: Kubectl) -> None:
    sneaky = participant("tenant-a", "f1", name="sneaky")
    sneaky["spec"]["data"]["pvc"]["claimName"] = "tenant-b/crm-data"
    proc = kubectl.apply(sneaky, check=False)
    assert proc.returncode != 0 and "spec.data.pvc.claimName" in proc.stderr
    other_secret = participant("tenant-a", "f1", name="borrower")
    other_secret["spec"]["data"] = {"sql": {"query": "SELECT 1", "secretRef": {"name": "crm-db", "namespace": "tenant-b"}},
                                    "mapping": {}}
    proc = kubectl.apply(other_secret, check=False)
    assert proc.returncode != 0 and 'unknown field "spec.data.sql.secretRef.namespace"' in proc.stderr
    two_sources = participant("tenant-a", "f1", name="two")
    two_sources["spec"]["data"]["file"] = {"path": "/etc/passwd"}
    proc = kubectl.apply(two_sources, check=False)
    assert proc.returncode != 0 and "exactly one data source" in proc.stderr
    escape = participant("tenant-a", "f1", name="escape")
    escape["spec"]["data"]["pvc"]["path"] = "../../etc/shadow"
    proc = kubectl.apply(escape, check=False)
    assert proc.returncode != 0 and "inside the claim" in proc.stderr
    # Egress is a CIDR or pods of the tenant's own namespace, never both, never another namespace.
    both = participant("tenant-a", "f1", name="both")
    both["spec"]["data"] = {"sql": {"query": "SELECT 1", "secretRef": {"name": "crm-db"}, "egress": [
        {"cidr": "10.0.0.0/8", "podSelector": {"app": "db"}, "ports": [5432]}]}, "mapping": {}}
    proc = kubectl.apply(both, check=False)
    assert proc.returncode != 0 and "give either cidr or podSelector" in proc.stderr
    elsewhere = participant("tenant-a", "f1", name="elsewhere")
    elsewhere["spec"]["data"] = {"sql": {"query": "SELECT 1", "secretRef": {"name": "crm-db"}, "egress": [
        {"podSelector": {"app": "db"}, "namespaceSelector": {"name": "tenant-b"}, "ports": [5432]}]}, "mapping": {}}
    proc = kubectl.apply(elsewhere, check=False)
    assert proc.returncode != 0 and 'unknown field "spec.data.sql.egress[0].namespaceSelector"' in proc.stderr


def test_federation_and_three_participants_get_every_child_with_the_right_spec(operator: OperatorProcess, kubectl: Kubectl) -> None:
    kubectl.apply(
        federation("f1", resources={"cpu": "500m", "memory": "1Gi"}),
        participant("tenant-a", "f1", resources={"gpu": 1}),
        participant("tenant-b", "f1"),
        participant("tenant-c", "f1", resources={"gpu": 2, "memory": "4Gi"}),
    )
    wait_for("f1 to start training", lambda: phase_of(kubectl, "federation", "f1", COORD) == "Training", timeout=90)
    started = wait_for("f1's Training Event", lambda: next((e for e in kubectl.items("events", namespace=COORD)
                                                           if e["involvedObject"].get("name") == "f1"
                                                           and e["reason"] == "Training"), None))
    assert started["type"] == "Normal" and "-> Training: training with 3 participants" in started["message"]
    for ns in TENANTS:
        wait_for(f"{ns}/crm admitted", lambda ns=ns: phase_of(kubectl, "participant", "crm", ns) in ("Training", "Succeeded"))

    found = children(kubectl, "f1")
    assert found["statefulsets"] == [(COORD, "f1-aggregator")]
    assert found["services"] == [(COORD, "f1-aggregator"), (COORD, "f1-aggregator-grpc")]
    monitors = kubectl.items("servicemonitors", namespace=COORD, selector="fedcrm.io/federation=f1")
    assert [m["spec"]["endpoints"][0]["port"] for m in monitors] == ["metrics"]
    assert [j for j in found["jobs"]] == [(ns, "f1-crm") for ns in TENANTS]
    assert sorted(found["networkpolicies"]) == sorted([(COORD, "f1-aggregator")] + [(ns, "f1-crm-training") for ns in TENANTS])
    assert set(found["secrets"]) == {(COORD, "f1-ca"), (COORD, "f1-aggregator-tls")} | {(ns, "f1-crm-tls") for ns in TENANTS}

    # Each tenant's certificate carries its identity and is signed by the federation's CA.
    ca = x509.load_pem_x509_certificate(base64.b64decode(kubectl.get("secret", "f1-ca", COORD)["data"]["ca.crt"]))
    for ns in TENANTS:
        data = kubectl.get("secret", "f1-crm-tls", ns)["data"]
        cert = x509.load_pem_x509_certificate(base64.b64decode(data["tls.crt"]))
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == f"{ns}/crm"
        assert cert.issuer == ca.subject
        assert "ca.key" not in data

    # The aggregator's config lists exactly the admitted identities.
    config = kubectl.get("configmap", "f1-aggregator-config", COORD)["data"]["aggregator.json"]
    assert all(f'"{ns}/crm"' in config for ns in TENANTS)
    fed = kubectl.get("federation", "f1", COORD)
    assert condition(fed, "Enrolled")["status"] == "True" and condition(fed, "Enrolled")["reason"] == "AllJoined"

    # Owner references: a controller reference to the owner in the child's own namespace, never across one.
    def controllers(kind: str, namespace: str, name: str) -> list[tuple[str, str, str, bool]]:
        refs = kubectl.get(kind, name, namespace)["metadata"].get("ownerReferences") or []
        return [(r["kind"], r["name"], r["uid"], bool(r.get("controller"))) for r in refs]

    fed_ref = [("Federation", "f1", fed["metadata"]["uid"], True)]
    for kind, name in [("statefulset", "f1-aggregator"), ("service", "f1-aggregator"), ("service", "f1-aggregator-grpc"),
                       ("networkpolicy", "f1-aggregator"), ("secret", "f1-ca"), ("secret", "f1-aggregator-tls"),
                       ("configmap", "f1-aggregator-config"), ("servicemonitor", "f1-aggregator")]:
        assert controllers(kind, COORD, name) == fed_ref, (kind, name)
    for ns in TENANTS:
        own = [("Participant", "crm", kubectl.get("participant", "crm", ns)["metadata"]["uid"], True)]
        for kind, name in [("job", "f1-crm"), ("secret", "f1-crm-tls"), ("configmap", "f1-crm-config"),
                           ("networkpolicy", "f1-crm-training")]:
            assert controllers(kind, ns, name) == own, (kind, ns, name)

    # Scheduling: GPU pods only on GPU nodes, CPU pods anywhere; every pod Running under KWOK.
    nodes = {n["metadata"]["name"]: n for n in kubectl.items("nodes")}
    def gpus(node: str) -> int:
        return int(nodes[node]["status"]["allocatable"].get("nvidia.com/gpu", "0"))

    pods = wait_for("training pods bound", lambda: [
        p for p in kubectl.items("pods", selector="fedcrm.io/role=training,fedcrm.io/federation=f1")
        if p["spec"].get("nodeName")
    ] if len(kubectl.items("pods", selector="fedcrm.io/role=training,fedcrm.io/federation=f1")) == 3 else None, timeout=60)
    by_ns = {p["metadata"]["namespace"]: p for p in pods}
    assert set(by_ns) == set(TENANTS)
    assert gpus(by_ns["tenant-a"]["spec"]["nodeName"]) >= 1
    assert gpus(by_ns["tenant-c"]["spec"]["nodeName"]) >= 2
    limits_c = by_ns["tenant-c"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits_c == {"cpu": "500m", "memory": "4Gi", "nvidia.com/gpu": "2"}
    assert "nvidia.com/gpu" not in by_ns["tenant-b"]["spec"]["containers"][0]["resources"]["limits"]
    assert by_ns["tenant-b"]["spec"]["automountServiceAccountToken"] is False

    # Printer columns.
    table = kubectl("get", "federation", "f1", "-n", COORD).stdout
    header, row = table.splitlines()[:2]
    assert header.split()[:4] == ["NAME", "PHASE", "ROUND", "PARTICIPANTS"]
    assert row.split()[:4] == ["f1", "Training", "0/5", "3"]
    table = kubectl("get", "fedp", "-n", "tenant-a").stdout
    assert "Admitted" in table and "f1" in table


def test_participant_of_a_namespace_not_allowed_gets_a_condition_and_nothing_else(operator: OperatorProcess, kubectl: Kubectl) -> None:
    kubectl.apply(participant(OUTSIDER, "f1"))
    wait_for("the outsider refused", lambda: phase_of(kubectl, "participant", "crm", OUTSIDER) == "Refused")
    obj = kubectl.get("participant", "crm", OUTSIDER)
    admitted = condition(obj, "Admitted")
    assert admitted["status"] == "False" and admitted["reason"] == "NamespaceNotAllowed"
    assert "spec.participants.namespaces" in admitted["message"]
    # kubectl describe shows the refusal as an Event on the Participant.
    event = wait_for("the refusal's Event", lambda: next((e for e in kubectl.items("events", namespace=OUTSIDER)
                                                         if e["involvedObject"].get("name") == "crm"
                                                         and e["reason"] == "NamespaceNotAllowed"), None))
    assert event["type"] == "Warning" and event["involvedObject"]["kind"] == "Participant"
    assert "Pending -> Refused" in event["message"]
    for kind in ["secrets", "configmaps", "jobs", "pods", "networkpolicies"]:
        assert kubectl.items(kind, namespace=OUTSIDER, selector="fedcrm.io/federation") == [], kind
    kubectl("delete", "participant", "crm", "-n", OUTSIDER)


def test_participant_of_a_missing_federation_says_so(operator: OperatorProcess, kubectl: Kubectl) -> None:
    kubectl.apply(participant("tenant-a", "nope", name="lost"))
    wait_for("refusal", lambda: phase_of(kubectl, "participant", "lost", "tenant-a") == "Refused")
    cond = condition(kubectl.get("participant", "lost", "tenant-a"), "Admitted")
    assert cond["reason"] == "FederationNotFound" and f"{COORD}/nope" in cond["message"]
    kubectl("delete", "participant", "lost", "-n", "tenant-a")


def test_network_policies_as_stored_allow_exactly_the_federation_paths(operator: OperatorProcess, kubectl: Kubectl) -> None:
    wait_for("f1 training", lambda: phase_of(kubectl, "federation", "f1", COORD) == "Training", timeout=90)
    policies = kubectl.items("networkpolicies")
    aggregator_pods = wait_for("the aggregator pod", lambda: kubectl.items("pods", namespace=COORD, selector="fedcrm.io/role=aggregator"))
    trainers = kubectl.items("pods", selector="fedcrm.io/role=training,fedcrm.io/federation=f1")

    def pod(obj: dict[str, Any]) -> Pod:
        return Pod(obj["metadata"]["name"], obj["metadata"]["namespace"], obj["metadata"].get("labels") or {})

    agg = pod(aggregator_pods[0])
    tenants = [pod(p) for p in trainers]
    assert len(tenants) == 3
    dns = Pod("coredns", "kube-system", {"k8s-app": "kube-dns"})
    prometheus = Pod("prometheus", "monitoring", {"app": "prometheus"})
    operator_pod = Pod("operator", OPERATOR_NAMESPACE, {"app.kubernetes.io/name": "fedcrm-operator"})
    neighbour = Pod("web", "tenant-a", {"app": "web"})
    outsider = Pod("spy", OUTSIDER, dict(tenants[0].labels))
    everyone = [agg, *tenants, dns, prometheus, operator_pod, neighbour, outsider]
    expected = {(t, agg, 8443, "TCP") for t in tenants}
    expected |= {(t, dns, 53, proto) for t in tenants for proto in ("UDP", "TCP")}
    expected |= {(prometheus, agg, 9090, "TCP"), (operator_pod, agg, 9090, "TCP")}
    ours = {agg, *tenants}
    for src in everyone:
        for dst in everyone:
            if src == dst or (src not in ours and dst not in ours):
                continue
            for port, proto in [(8443, "TCP"), (9090, "TCP"), (53, "UDP"), (53, "TCP"), (443, "TCP")]:
                assert allowed(policies, src, dst, port, proto) == ((src, dst, port, proto) in expected), (
                    f"{src.namespace}/{src.name} -> {dst.namespace}/{dst.name}:{port}/{proto}"
                )


def test_unsafe_spec_change_mid_training_is_refused_and_safe_one_applied(operator: OperatorProcess, kubectl: Kubectl) -> None:
    wait_for("f1 training", lambda: phase_of(kubectl, "federation", "f1", COORD) == "Training", timeout=90)
    kubectl("patch", "federation", "f1", "-n", COORD, "--type=merge", "-p", '{"spec":{"training":{"rounds":50}}}')
    refused = wait_for("the refusal condition", lambda: (
        c if (c := condition(kubectl.get("federation", "f1", COORD), "SpecAccepted"))["status"] == "False" else None
    ))
    assert refused["reason"] == "ChangeRefused" and "spec.training" in refused["message"]
    config = kubectl.get("configmap", "f1-aggregator-config", COORD)["data"]["aggregator.json"]
    assert '"rounds": 5' in config  # the running training keeps its spec
    kubectl("patch", "federation", "f1", "-n", COORD, "--type=merge", "-p", '{"spec":{"training":{"rounds":5}}}')
    wait_for("acceptance again", lambda: condition(kubectl.get("federation", "f1", COORD), "SpecAccepted")["status"] == "True")


def test_operator_killed_mid_reconcile_and_restarted_creates_nothing_twice(operator: OperatorProcess, kubectl: Kubectl) -> None:
    kubectl.apply(federation("f2"), *(participant(ns, "f2", name="crm2") for ns in TENANTS))
    wait_for("f2's first children", lambda: kubectl.items("secrets", namespace=COORD, selector="fedcrm.io/federation=f2"), timeout=30, interval=0.05)
    operator.kill()
    half_done = children(kubectl, "f2")
    operator.start()
    wait_for("f2 training", lambda: phase_of(kubectl, "federation", "f2", COORD) == "Training", timeout=90)
    ca_before = kubectl.get("secret", "f2-ca", COORD)
    operator.kill()
    operator.start()
    wait_for("a pass after the restart", lambda: "fedcrm_operator_reconciles_total" in operator.metrics()
             and 'resource="federation"' in operator.metrics(), timeout=30)
    found = children(kubectl, "f2")
    assert len(found["jobs"]) == 3 and len(found["statefulsets"]) == 1 and len(found["secrets"]) == 5
    assert all(len(v) == len(set(v)) for v in found.values())
    assert kubectl.get("secret", "f2-ca", COORD)["data"] == ca_before["data"]  # the CA was never regenerated
    assert set(half_done["secrets"]) <= set(found["secrets"])


def test_deleting_a_participant_mid_training_is_a_dropout(operator: OperatorProcess, kubectl: Kubectl) -> None:
    """The tenant's children go with its Participant through their owner references: the operator is down
    meanwhile (and kopf's finalizer, which its timer puts on the Participant, taken off by hand), so only the
    garbage collector can have removed them."""
    wait_for("f2 training", lambda: phase_of(kubectl, "federation", "f2", COORD) == "Training", timeout=90)
    operator.kill()
    try:
        kubectl("patch", "participant", "crm2", "-n", "tenant-c", "--type=merge", "-p", '{"metadata":{"finalizers":null}}')
        kubectl("delete", "participant", "crm2", "-n", "tenant-c", "--wait=true")
        wait_for("tenant-c's children gone", lambda: not any(
            kubectl.items(kind, namespace="tenant-c", selector="fedcrm.io/federation=f2") for kind in ["jobs", "secrets", "networkpolicies", "configmaps"]
        ), timeout=60)
    finally:
        operator.start()
    assert phase_of(kubectl, "federation", "f2", COORD) == "Training"
    assert len(kubectl.items("jobs", selector="fedcrm.io/federation=f2")) == 2


def test_a_deleted_aggregator_statefulset_comes_back_and_keeps_its_checkpoint_claim(
        operator: OperatorProcess, kubectl: Kubectl) -> None:
    """The claim holds the privacy ledger: deleting the StatefulSet must neither lose it nor stall the Federation."""
    wait_for("f2 training", lambda: phase_of(kubectl, "federation", "f2", COORD) == "Training", timeout=90)
    sts = kubectl.get("statefulset", "f2-aggregator", COORD)
    assert sts["spec"]["persistentVolumeClaimRetentionPolicy"]["whenDeleted"] == "Retain"
    claims = wait_for("the checkpoint claim", lambda: kubectl.items("persistentvolumeclaims", namespace=COORD,
                                                                     selector="fedcrm.io/federation=f2"), timeout=60)
    kubectl("delete", "statefulset", "f2-aggregator", "-n", COORD, "--wait=true")
    back = wait_for("the StatefulSet back", lambda: kubectl.get("statefulset", "f2-aggregator", COORD), timeout=90)
    assert back["metadata"]["uid"] != sts["metadata"]["uid"]
    kept = kubectl.items("persistentvolumeclaims", namespace=COORD, selector="fedcrm.io/federation=f2")
    assert [c["metadata"]["uid"] for c in kept] == [c["metadata"]["uid"] for c in claims]  # the same volume
    assert phase_of(kubectl, "federation", "f2", COORD) == "Training"


def test_one_tenant_refused_by_the_api_does_not_stall_the_others(operator: OperatorProcess, kubectl: Kubectl) -> None:
    """A ResourceQuota forbids Jobs in one tenant namespace (a 403 from the API server): that tenant's Participant
    says so, and the Federation trains with the other tenant."""
    open_ns, quota_ns = "quota-open", "quota-full"
    for ns in (open_ns, quota_ns):
        kubectl("create", "namespace", ns, check=False)
        provide_claim(kubectl, ns)
        grant_tenant_access(kubectl, ns, (COORD, "f5"), "crm")
    kubectl.apply({"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "no-jobs", "namespace": quota_ns},
                   "spec": {"hard": {"count/jobs.batch": "0"}}})
    fed = federation("f5", namespaces=[open_ns, quota_ns])
    fed["spec"]["training"]["minParticipants"] = 1
    fed["spec"]["participants"] = {"namespaces": [open_ns, quota_ns], "enrollmentTimeoutSeconds": 3}
    kubectl.apply(fed, participant(open_ns, "f5"), participant(quota_ns, "f5"))
    wait_for("f5 training", lambda: phase_of(kubectl, "federation", "f5", COORD) == "Training", timeout=90)
    status = kubectl.get("federation", "f5", COORD)["status"]
    assert status["participants"] == [f"{open_ns}/crm"]
    # The timeout ran from its own status field, as the API server stored it; Enrolled only says how it ended.
    reached = datetime.fromisoformat(status["enrollment"]["minReachedAt"])
    started = datetime.fromisoformat(condition({"status": status}, "Ready")["lastTransitionTime"])
    assert timedelta(seconds=2) <= started - reached <= timedelta(seconds=60), status
    enrolled = condition({"status": status}, "Enrolled")
    assert (enrolled["status"], enrolled["reason"]) == ("True", "TimeoutReached"), enrolled
    assert kubectl.items("jobs", namespace=open_ns, selector="fedcrm.io/federation=f5")

    def refused() -> dict[str, Any] | None:
        ready = condition(kubectl.get("participant", "crm", quota_ns), "Ready")
        return ready if ready["reason"] == "ApiError" else None

    ready = wait_for("the quota tenant's reason", refused, timeout=60)
    assert ready["status"] == "False" and "exceeded quota" in ready["message"], ready
    assert "goes on with the other tenants" in ready["message"]
    kubectl("delete", "federation", "f5", "-n", COORD, "--wait=true", "--timeout=90s")


def _watches(kinds: frozenset[str]) -> list[tuple[str, str]]:
    """``kubectl auth can-i`` arguments to watch each of ``kinds`` (as the operator's watches name them)."""
    out = []
    for kind in sorted(kinds):
        api_version, plural = watches.KINDS[kind]
        out.append(("watch", f"{plural}.{api_version.split('/')[0]}" if "/" in api_version else plural))
    return out


def test_the_operator_can_do_only_what_the_charts_grant(operator: OperatorProcess, kubectl: Kubectl) -> None:
    """``kubectl auth can-i`` with the operator's own token (SelfSubjectAccessReviews against the real RBAC): no
    namespaced kind across the cluster, nothing in a namespace without the tenant chart, and where the tenant
    granted access, its own children but never the tenant's credentials."""
    wait_for("f1 training", lambda: phase_of(kubectl, "federation", "f1", COORD) == "Training", timeout=90)
    as_operator = Kubectl(kubectl.binary, operator.kubeconfig)
    kubectl("create", "namespace", NO_GRANT, check=False)
    for ns in ("tenant-a", NO_GRANT):
        kubectl.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "crm-credentials", "namespace": ns},
                       "stringData": {"url": "postgresql+psycopg://crm:hunter2@db:5432/crm"}})

    def can(*args: str) -> bool:
        answer = as_operator("auth", "can-i", *args, check=False).stdout.strip()
        assert answer in ("yes", "no"), answer
        return answer == "yes"

    # Across the cluster: its own resources, namespaces and peering; no namespaced kind of anyone else.
    for verb, resource in [("list", "participants.fedcrm.io"), ("watch", "federations.fedcrm.io"),
                           ("list", "namespaces"), ("list", "clusterkopfpeerings.kopf.dev")]:
        assert can(verb, resource, "-A"), (verb, resource)
    assert can("patch", "participants.fedcrm.io", "--subresource=status", "-n", NO_GRANT)
    for verb in ("get", "list", "watch"):
        for resource in ("secrets", "configmaps", "jobs.batch", "pods", "networkpolicies.networking.k8s.io",
                         "statefulsets.apps", "services"):
            assert not can(verb, resource, "-A"), (verb, resource)
    # A tenant namespace that did not install the tenant chart: nothing at all.
    for verb, resource in [("get", "secrets"), ("list", "secrets"), ("get", "secrets/crm-credentials"),
                           ("create", "secrets"), ("create", "jobs.batch"), ("list", "configmaps"), ("list", "pods"),
                           ("create", "networkpolicies.networking.k8s.io"), ("create", "events")]:
        assert not can(verb, resource, "-n", NO_GRANT), (verb, resource)
    # A tenant that granted access: its training objects, its pods and Events, its certificate Secret; not the
    # credentials, nor any Secret but the certificate (create is not limited by name, see docs/operator.md#rbac).
    # The kinds the operator reads from watches there can be watched.
    for verb, resource in [*_watches(watches.TENANT_KINDS), ("create", "jobs.batch"), ("list", "jobs.batch"),
                           ("delete", "jobs.batch"),
                           ("patch", "configmaps"), ("list", "configmaps"), ("delete", "networkpolicies.networking.k8s.io"),
                           ("list", "pods"), ("delete", "pods"), ("create", "events"), ("create", "secrets"),
                           ("get", "secrets/f1-crm-tls"), ("delete", "secrets/f1-crm-tls")]:
        assert can(verb, resource, "-n", "tenant-a"), (verb, resource)
    for verb, resource in [("get", "secrets/crm-credentials"), ("patch", "secrets/crm-credentials"),
                           ("delete", "secrets/crm-credentials"), ("list", "secrets"), ("watch", "secrets"),
                           ("get", "secrets"), ("create", "pods"), ("create", "deployments.apps"),
                           ("create", "rolebindings.rbac.authorization.k8s.io")]:
        assert not can(verb, resource, "-n", "tenant-a"), (verb, resource)
    refused = as_operator("get", "secret", "crm-credentials", "-n", "tenant-a", check=False)
    assert refused.returncode != 0 and "forbidden" in refused.stderr.lower()
    assert as_operator("get", "secret", "f1-crm-tls", "-n", "tenant-a", "-o", "name").stdout.strip() == "secret/f1-crm-tls"
    # The coordinator namespace: the aggregator's objects, watched; no other namespace's. (Training Jobs only where
    # a tenant chart grants them.)
    for verb, resource in [*_watches(watches.COORDINATOR_KINDS - {"Job"}), ("create", "statefulsets.apps"), ("get", "secrets"),
                           ("list", "secrets"), ("create", "services"),
                           ("delete", "persistentvolumeclaims"), ("create", "servicemonitors.monitoring.coreos.com"),
                           ("create", "events")]:
        assert can(verb, resource, "-n", COORD), (verb, resource)
    assert not can("get", "secrets", "-n", "kube-system") and not can("get", "secrets", "-n", OPERATOR_NAMESPACE)


def test_a_tenant_that_did_not_grant_access_is_told_so_while_the_other_trains(operator: OperatorProcess, kubectl: Kubectl) -> None:
    """No tenant chart in one namespace: the operator's 403 there lands on that Participant (AccessNotGranted,
    saying to install the tenant chart), and the Federation trains with the tenant that did grant access."""
    granted = "tenant-granted"
    for ns in (granted, NO_GRANT):
        kubectl("create", "namespace", ns, check=False)
        provide_claim(kubectl, ns)
    grant_tenant_access(kubectl, granted, (COORD, "f6"), "crm")
    fed = federation("f6", namespaces=[granted, NO_GRANT], training={"rounds": 5, "minParticipants": 1})
    fed["spec"]["participants"]["enrollmentTimeoutSeconds"] = 3
    kubectl.apply(fed, participant(granted, "f6"), participant(NO_GRANT, "f6"))
    wait_for("f6 training", lambda: phase_of(kubectl, "federation", "f6", COORD) == "Training", timeout=90)
    assert kubectl.get("federation", "f6", COORD)["status"]["participants"] == [f"{granted}/crm"]
    assert kubectl.items("jobs", namespace=granted, selector="fedcrm.io/federation=f6")

    def told() -> dict[str, Any] | None:
        obj = kubectl.get("participant", "crm", NO_GRANT)
        if not (obj or {}).get("status", {}).get("conditions"):
            return None
        return obj if condition(obj, "Ready")["reason"] == "AccessNotGranted" else None

    obj = wait_for("the ungranted tenant's reason", told, timeout=60)
    ready = condition(obj, "Ready")
    assert ready["status"] == "False" and "install the tenant chart" in ready["message"], ready
    assert f"-n {NO_GRANT}" in ready["message"] and "system:serviceaccount:fedcrm-system:fedcrm" in ready["message"]
    assert "goes on with the other tenants" in ready["message"]
    assert condition(obj, "ChildrenCreated")["reason"] == "AccessNotGranted"
    for kind in ["secrets", "configmaps", "jobs", "networkpolicies"]:
        assert kubectl.items(kind, namespace=NO_GRANT, selector="fedcrm.io/federation=f6") == [], kind
    # The finalizer's sweep skips the namespace it cannot see, and removes the rest.
    kubectl("delete", "federation", "f6", "-n", COORD, "--wait=true", "--timeout=90s")
    assert not any(kubectl.items(kind, namespace=granted, selector="fedcrm.io/federation=f6")
                   for kind in ["secrets", "configmaps", "jobs", "networkpolicies"])
    kubectl("delete", "participant", "crm", "-n", NO_GRANT)


def test_a_federation_outside_the_coordinator_namespaces_is_told_so(operator: OperatorProcess, kubectl: Kubectl) -> None:
    elsewhere = "not-a-coordinator"
    kubectl("create", "namespace", elsewhere, check=False)
    fed = federation("f7")
    fed["metadata"]["namespace"] = elsewhere
    kubectl.apply(fed)

    def told() -> dict[str, Any] | None:
        obj = kubectl.get("federation", "f7", elsewhere)
        if not (obj or {}).get("status", {}).get("conditions"):
            return None
        ready = condition(obj, "Ready")
        return ready if ready["reason"] == "AccessNotGranted" else None

    ready = wait_for("the Federation's reason", told, timeout=60)
    assert ready["status"] == "False" and "coordinatorNamespaces" in ready["message"], ready
    assert kubectl.items("secrets", namespace=elsewhere, selector="fedcrm.io/federation=f7") == []
    kubectl("delete", "federation", "f7", "-n", elsewhere, "--wait=true", "--timeout=60s")


def test_a_second_participant_in_the_same_namespace_is_refused(operator: OperatorProcess, kubectl: Kubectl) -> None:
    kubectl.apply(participant("tenant-a", "f1", name="crm-again"))

    def refused() -> dict[str, Any] | None:
        obj = kubectl.get("participant", "crm-again", "tenant-a")
        admitted = condition(obj, "Admitted") if (obj or {}).get("status") else None
        return admitted if admitted and admitted["reason"] == "OneParticipantPerNamespace" else None

    admitted = wait_for("the second Participant refused", refused, timeout=60)
    assert "through Participant tenant-a/crm" in admitted["message"]
    assert not kubectl.items("jobs", namespace="tenant-a", selector="fedcrm.io/participant=crm-again")
    assert phase_of(kubectl, "participant", "crm", "tenant-a") in ("Training", "Succeeded")  # the first goes on
    kubectl("delete", "participant", "crm-again", "-n", "tenant-a", "--wait=true")


def test_tenant_requirements_and_a_terms_change_need_the_tenants_consent(operator: OperatorProcess, kubectl: Kubectl) -> None:
    """spec.requires is checked on every pass; a terms change after admission refuses the tenant (and removes its
    training objects) until it pins the new digest in spec.acceptedTerms."""
    from fedcrm.spec.loading import parse_manifest
    from fedcrm.spec.manifests import Federation
    from fedcrm.spec.terms import terms_digest

    def private(epsilon: float) -> dict[str, Any]:
        return federation("consent", namespaces=["tenant-a", "tenant-b"],  # one of the two never joins: stays Enrolling
                          participants={"namespaces": ["tenant-a", "tenant-b"], "enrollmentTimeoutSeconds": 3600},
                          privacy={"secureAggregation": {"enabled": True},
                                   "differentialPrivacy": {"mode": "client", "epsilon": epsilon, "delta": 1e-5}})

    def digest(body: dict[str, Any]) -> str:
        return terms_digest(parse_manifest(body, Federation, "test").spec)

    def admitted(expect_reason: str) -> Any:
        def check() -> dict[str, Any] | None:
            obj = kubectl.get("participant", "terms", "tenant-a")
            found = condition(obj, "Admitted") if (obj or {}).get("status", {}).get("conditions") else None
            return obj if found and found["reason"] == expect_reason else None
        return wait_for(f"Admitted reason {expect_reason}", check, timeout=60)

    def jobs() -> list[dict[str, Any]]:
        return kubectl.items("jobs", namespace="tenant-a", selector="fedcrm.io/participant=terms,fedcrm.io/federation=consent")

    grant_tenant_access(kubectl, "tenant-a", (COORD, "consent"), "terms")
    kubectl.apply(private(1.0))
    kubectl.apply(participant("tenant-a", "consent", name="terms", requires={"secureAggregation": True, "maxEpsilon": 4}))
    obj = admitted("Admitted")
    assert obj["status"]["acceptedTerms"] == digest(private(1.0))  # consent to the terms as they were
    wait_for("its training Job", jobs)

    kubectl.apply(private(3.0))  # within the tenant's requirements, but not what it consented to
    obj = admitted("TermsChanged")
    message = condition(obj, "Admitted")["message"]
    assert f"spec.acceptedTerms: {digest(private(3.0))}" in message and "epsilon 3.0" in message
    wait_for("its training Job removed", lambda: not jobs())

    kubectl("patch", "participant", "terms", "-n", "tenant-a", "--type", "merge",
            "-p", f'{{"spec": {{"acceptedTerms": "{digest(private(3.0))}"}}}}')
    obj = admitted("Admitted")
    assert obj["status"]["acceptedTerms"] == digest(private(3.0))
    # Every condition says which spec it describes: the patched one (generation 2).
    assert obj["metadata"]["generation"] == 2
    assert {c["type"]: c["observedGeneration"] for c in obj["status"]["conditions"]} == {"Admitted": 2, "Ready": 2}
    wait_for("its training Job again", jobs)

    kubectl.apply(private(8.0))  # below what the tenant requires: no consent can cover it
    obj = admitted("RequirementsNotMet")
    assert "epsilon must be at most 4" in condition(obj, "Admitted")["message"]
    wait_for("its training Job removed again", lambda: not jobs())
    kubectl("delete", "participant", "terms", "-n", "tenant-a", "--wait=true")
    kubectl("delete", "federation", "consent", "-n", COORD, "--wait=true")


def test_deleting_a_federation_leaves_no_child_in_any_namespace(operator: OperatorProcess, kubectl: Kubectl) -> None:
    for fed in ["f1", "f2"]:
        kubectl("delete", "federation", fed, "-n", COORD, "--wait=true", "--timeout=90s")
        left = children(kubectl, fed)
        assert all(not v for v in left.values()), left
    # Participants stay (they are the tenants'), and now say why they are idle.
    wait_for("participants notice", lambda: phase_of(kubectl, "participant", "crm", "tenant-a") == "Refused")
    assert condition(kubectl.get("participant", "crm", "tenant-a"), "Admitted")["reason"] == "FederationNotFound"


def test_operator_exports_reconcile_and_phase_metrics(operator: OperatorProcess, kubectl: Kubectl) -> None:
    text = operator.metrics()
    assert 'fedcrm_operator_reconciles_total{outcome="ok",resource="federation"}' in text
    assert 'fedcrm_operator_reconcile_seconds_bucket{le="0.5",resource="participant"}' in text
    assert 'fedcrm_operator_participants{phase="Refused"}' in text
    assert 'fedcrm_operator_federations{phase="Training"}' in text


def test_tenant_chart_installs_a_participant_the_operator_understands(control_plane: Any, operator: OperatorProcess, kubectl: Kubectl) -> None:
    kubectl.apply(federation("f3", namespaces=["tenant-b"], training={"minParticipants": 1}))
    helm = control_plane.bin_dir / "helm"
    root = Path(__file__).resolve().parents[1]
    values = ["--set", "participant.name=helm-crm", "--set", "participant.federation.name=f3",
              "--set", f"participant.federation.namespace={COORD}", "--set", "access.groups[0]=tenant-b-analysts"]
    subprocess.run(
        [str(helm), "upgrade", "--install", "crm-f3", str(root / "charts" / "fedcrm-tenant"), "-n", "tenant-b",
         "--kubeconfig", str(control_plane.kubeconfig), *values, "--set", "participant.requires.minTenants=2"],
        check=True, capture_output=True, text=True, timeout=120,
    )
    # The chart passes the tenant's requirements through: f3 lets rounds run with one tenant, below them.
    refused = wait_for("the chart's participant refused", lambda: phase_of(kubectl, "participant", "helm-crm", "tenant-b") == "Refused", timeout=60)
    assert refused
    assert condition(kubectl.get("participant", "helm-crm", "tenant-b"), "Admitted")["reason"] == "RequirementsNotMet"
    subprocess.run(
        [str(helm), "upgrade", "crm-f3", str(root / "charts" / "fedcrm-tenant"), "-n", "tenant-b",
         "--kubeconfig", str(control_plane.kubeconfig), *values],
        check=True, capture_output=True, text=True, timeout=120,
    )
    wait_for("the chart's participant admitted", lambda: phase_of(kubectl, "participant", "helm-crm", "tenant-b") in ("Training", "Succeeded"), timeout=60)
    # The tenant's analysts may manage Participants in their namespace, and nothing else of fedcrm.
    can = kubectl("auth", "can-i", "create", "participants.fedcrm.io", "-n", "tenant-b", "--as", "alice", "--as-group", "tenant-b-analysts", check=False)
    assert can.stdout.strip() == "yes"
    cannot = kubectl("auth", "can-i", "create", "federations.fedcrm.io", "-n", "tenant-b", "--as", "alice", "--as-group", "tenant-b-analysts", check=False)
    assert cannot.stdout.strip() == "no"
    elsewhere = kubectl("auth", "can-i", "create", "participants.fedcrm.io", "-n", "tenant-a", "--as", "alice", "--as-group", "tenant-b-analysts", check=False)
    assert elsewhere.stdout.strip() == "no"
    kubectl("delete", "federation", "f3", "-n", COORD, "--wait=true", "--timeout=90s")
    subprocess.run([str(helm), "uninstall", "crm-f3", "-n", "tenant-b", "--kubeconfig", str(control_plane.kubeconfig)],
                   check=True, capture_output=True, timeout=60)


def _secret_files(kubectl: Kubectl, name: str, namespace: str, folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for key, value in kubectl.get("secret", name, namespace)["data"].items():
        path = folder / key
        path.write_bytes(base64.b64decode(value))
        path.chmod(0o600)
        out[key] = path
    return out


def test_training_runs_end_to_end_and_rounds_reach_the_federation_status(
    operator: OperatorProcess, kubectl: Kubectl, tmp_path: Path
) -> None:
    """The operator's objects are enough to train: its config, certificates and manifests, run as the pods would."""
    import json
    import shutil
    import sys
    import time

    import yaml

    from fedcrm.data.synthetic import generate_federation
    from fedcrm.runconfig import AggregatorConfig

    synth = generate_federation(tmp_path / "synth", clients=3, rows=300, seed=5, rounds=8)
    fed_doc = yaml.safe_load(synth.federation_path.read_text())
    namespaces = fed_doc["spec"]["participants"]["namespaces"]
    fed_doc["metadata"] = {"name": "f4", "namespace": COORD}
    fed_doc["spec"]["training"]["roundTimeoutSeconds"] = 60
    fed_doc["spec"]["privacy"]["differentialPrivacy"] = {"mode": "sample", "epsilon": 8.0, "delta": 1e-4, "clippingNorm": 1.0}
    docs = [fed_doc]
    for path in synth.participant_paths:
        doc = yaml.safe_load(path.read_text())
        ns = doc["metadata"]["namespace"]
        kubectl("create", "namespace", ns, check=False)
        provide_claim(kubectl, ns)
        grant_tenant_access(kubectl, ns, (COORD, "f4"), doc["metadata"]["name"])
        data_dir = tmp_path / "claims" / ns
        data_dir.mkdir(parents=True)
        shutil.copy(synth.out_dir / "data" / ns / "leads.csv", data_dir / "leads.csv")
        doc["spec"]["federationRef"] = {"name": "f4", "namespace": COORD}
        doc["spec"]["data"].pop("file")
        doc["spec"]["data"]["pvc"] = {"claimName": "crm-data", "path": "leads.csv"}
        docs.append(doc)
    kubectl.apply(*docs)
    wait_for("f4 training", lambda: phase_of(kubectl, "federation", "f4", COORD) == "Training", timeout=90)

    # The aggregator, as its StatefulSet would run it: the operator's ConfigMap and server certificate.
    stored = AggregatorConfig.model_validate_json(kubectl.get("configmap", "f4-aggregator-config", COORD)["data"]["aggregator.json"])
    tls = _secret_files(kubectl, "f4-aggregator-tls", COORD, tmp_path / "aggregator-tls")
    port_file = tmp_path / "aggregator.port"
    config = stored.model_copy(update={
        "listen": "127.0.0.1:0", "port_file": port_file, "out_dir": tmp_path / "aggregator",
        "status_listen": f"127.0.0.1:{STATUS_PORT}",
        "tls": stored.tls.model_copy(update={"ca": tls["ca.crt"], "cert": tls["tls.crt"], "key": tls["tls.key"]}),
    })
    assert sorted(config.participants) == sorted(f"{ns}/{yaml.safe_load(p.read_text())['metadata']['name']}"
                                                 for ns, p in zip(namespaces, synth.participant_paths))
    config.write(tmp_path / "aggregator.json")
    procs = [subprocess.Popen([sys.executable, "-m", "fedcrm_aggregator", "--config", str(tmp_path / "aggregator.json"),
                               "--serve-after-finish"], stdout=open(tmp_path / "aggregator.log", "wb"), stderr=subprocess.STDOUT)]
    try:
        port = wait_for("the aggregator's port", lambda: port_file.exists() and port_file.read_text().strip(), timeout=60)
        host = "f4-aggregator-grpc.fedcrm-coord.svc.cluster.local"
        for doc in docs[1:]:
            ns, name = doc["metadata"]["namespace"], doc["metadata"]["name"]
            prefix = f"f4-{name}"
            cm = kubectl.get("configmap", f"{prefix}-config", ns)["data"]
            manifest = tmp_path / "nodes" / ns / "participant.yaml"
            manifest.parent.mkdir(parents=True)
            manifest.write_text(cm["participant.yaml"])
            own_federation = manifest.with_name("federation.yaml")  # the tenant's own copy of the terms
            own_federation.write_text(cm["federation.yaml"])
            certs = _secret_files(kubectl, f"{prefix}-tls", ns, tmp_path / "nodes" / ns / "tls")
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "fedcrm_node", "--participant", str(manifest), "--federation", str(own_federation),
                 "--aggregator", f"127.0.0.1:{port}",
                 "--server-name", host, "--ca", str(certs["ca.crt"]), "--cert", str(certs["tls.crt"]),
                 "--key", str(certs["tls.key"]), "--data-root", str(tmp_path / "claims" / ns)],
                stdout=open(tmp_path / f"node-{ns}.log", "wb"), stderr=subprocess.STDOUT,
            ))
        def finished() -> dict[str, Any] | None:
            status = (kubectl.get("federation", "f4", COORD) or {}).get("status") or {}
            return status if status.get("phase") in ("Succeeded", "Failed") else None

        status = wait_for("f4 to finish", finished, timeout=240, interval=0.2)
        seen_at = time.time()
        log = (tmp_path / "aggregator.log").read_text(errors="replace")[-3000:]
        assert status["phase"] == "Succeeded", f"{json.dumps(status, indent=1)}\n{log}"
        assert status["progress"] == "8/8" and status["round"] == 8
        assert status["accuracy"].endswith("%") and 0.5 < status["lastMetrics"]["accuracy"] <= 1.0
        assert status["modelDigest"] and status["activeParticipants"] == 3
        assert 0 < status["epsilonSpent"] <= 8.0  # DP-SGD's spend, accounted by the aggregator, shown by kubectl
        assert status["privacyPlan"].startswith("each participant runs DP-SGD on its own rows over 8 rounds")
        events = [json.loads(line) for line in (tmp_path / "aggregator" / "events.jsonl").read_text().splitlines()]
        ended = next(e["time"] for e in events if e["event"] == "finished")
        assert seen_at - ended < 5.0, f"the Federation status showed the outcome {seen_at - ended:.1f}s after the aggregator"
        table = kubectl("get", "federation", "f4", "-n", COORD).stdout.splitlines()[1].split()
        assert table[1:4] == ["Succeeded", "8/8", "3"] and table[-1] != "" and any(c.endswith("%") for c in table)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=10)
        kubectl("delete", "federation", "f4", "-n", COORD, "--wait=true", "--timeout=90s", check=False)
