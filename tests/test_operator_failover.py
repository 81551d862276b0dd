"""Two operator replicas on a real control plane: one works, the other waits; kill the active one and the other
takes over, catching up on what changed while nobody worked, with nothing created twice.

The replicas run as the chart's ServiceAccount, with kopf peering as the chart configures it (here namespaced:
the chart's KopfPeering objects for watchNamespaces, created by the test as the chart would).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from operator_harness import (
    RELEASE,
    Kubectl,
    OperatorProcess,
    grant_tenant_access,
    install_chart,
    provide_claim,
    service_account_kubeconfig,
    wait_for,
)

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

COORD, TENANTS = "ha-coord", ["ha-a", "ha-b"]
LIFETIME = 8  # seconds a silent replica is presumed alive: the failover time


@pytest.fixture(scope="module")
def kubectl(control_plane: Any) -> Kubectl:
    return Kubectl(control_plane.bin_dir / "kubectl", control_plane.kubeconfig)


@pytest.fixture(scope="module")
def replicas(control_plane: Any, kubectl: Kubectl, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, OperatorProcess]]:
    work = tmp_path_factory.mktemp("failover")
    install_chart(control_plane.bin_dir / "helm", control_plane.kubeconfig)
    for ns in [COORD, *TENANTS]:
        kubectl("create", "namespace", ns, check=False)
        kubectl.apply({"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": RELEASE, "namespace": ns}})
    for ns in TENANTS:
        provide_claim(kubectl, ns)
        for fed in ("ha1", "ha2"):  # the tenant chart's grant, for each Participant the test creates there
            grant_tenant_access(kubectl, ns, (COORD, fed), fed)
    config = service_account_kubeconfig(kubectl, control_plane.kubeconfig, work / "operator.kubeconfig")

    def replica(name: str, priority: int) -> OperatorProcess:
        return OperatorProcess(config, work / name, env={
            "FEDCRM_WATCH_NAMESPACES": ",".join([COORD, *TENANTS]), "FEDCRM_OPERATOR_PEERING": RELEASE,
            "FEDCRM_OPERATOR_PRIORITY": str(priority), "FEDCRM_OPERATOR_IDENTITY": name,
            "FEDCRM_OPERATOR_PEERING_LIFETIME": str(LIFETIME), "FEDCRM_AGGREGATOR_STATUS_URL": "http://127.0.0.1:9/status",
        })

    (work / "active").mkdir()
    (work / "standby").mkdir()
    pair = {"active": replica("active", 200), "standby": replica("standby", 100)}
    for p in pair.values():
        p.start()
    yield pair
    for ns in [COORD, *TENANTS]:
        kubectl("delete", "participants,federations", "--all", "-n", ns, "--wait=false", check=False)
    for p in pair.values():
        p.stop()


def _reconciles(replica: OperatorProcess) -> float:
    """How many passes this replica ran (its own metrics)."""
    total = 0.0
    for line in replica.metrics().splitlines():
        if line.startswith("fedcrm_operator_reconciles_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _federation(name: str) -> dict[str, Any]:
    return {"apiVersion": "fedcrm.io/v1alpha1", "kind": "Federation", "metadata": {"name": name, "namespace": COORD},
            "spec": {"task": {"target": "converted", "features": [{"name": "revenue", "type": "numeric"}]},
                     "training": {"rounds": 3, "minParticipants": 2}, "participants": {"namespaces": TENANTS}}}


def _participant(namespace: str, fed: str) -> dict[str, Any]:
    return {"apiVersion": "fedcrm.io/v1alpha1", "kind": "Participant", "metadata": {"name": fed, "namespace": namespace},
            "spec": {"federationRef": {"name": fed, "namespace": COORD},
                     "data": {"pvc": {"claimName": "crm-data", "path": "leads.csv"}, "mapping": {"converted": "Converted"}}}}


def _phase(kubectl: Kubectl, kind: str, name: str, namespace: str) -> str | None:
    return ((kubectl.get(kind, name, namespace) or {}).get("status") or {}).get("phase")


def _jobs(kubectl: Kubectl, fed: str) -> list[tuple[str, str]]:
    return sorted((j["metadata"]["namespace"], j["metadata"]["name"])
                  for ns in TENANTS for j in kubectl.items("jobs", namespace=ns, selector=f"fedcrm.io/federation={fed}"))


def test_one_replica_works_and_the_other_takes_over_when_it_dies(replicas: dict[str, OperatorProcess],
                                                                 kubectl: Kubectl) -> None:
    active, standby = replicas["active"], replicas["standby"]
    kubectl.apply(_federation("ha1"))
    for ns in TENANTS:
        kubectl.apply(_participant(ns, "ha1"))
    wait_for("ha1 training", lambda: _phase(kubectl, "federation", "ha1", COORD) == "Training", timeout=90)
    wait_for("a training Job per tenant", lambda: len(_jobs(kubectl, "ha1")) == 2)
    assert _reconciles(active) > 0
    assert _reconciles(standby) == 0, "the standby must wait while the active replica works"

    active.kill()  # SIGKILL: it cannot say goodbye; its peering record has to expire
    # While no replica works: a tenant leaves, and a new Federation is created.
    kubectl("delete", "participant", "ha1", "-n", "ha-b", "--wait=false")
    kubectl.apply(_federation("ha2"))
    for ns in TENANTS:
        kubectl.apply(_participant(ns, "ha2"))

    wait_for("the standby to take over", lambda: _reconciles(standby) > 0, timeout=LIFETIME + 60)
    wait_for("ha2 training", lambda: _phase(kubectl, "federation", "ha2", COORD) == "Training", timeout=90)
    wait_for("the departed tenant's Job removed", lambda: _jobs(kubectl, "ha1") == [("ha-a", _jobs(kubectl, "ha1")[0][1])]
             if _jobs(kubectl, "ha1") else False, timeout=60)
    assert len(_jobs(kubectl, "ha2")) == 2  # every child once: names are deterministic, creation idempotent
    participants = kubectl.items("participants", namespace="ha-b")
    assert [p["metadata"]["name"] for p in participants] == ["ha2"]  # the finalizer-free delete went through
