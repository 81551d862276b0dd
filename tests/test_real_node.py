"""The product as a platform team runs it: images, Helm charts and a Federation on a real Kubernetes node.

A control plane plus a real kubelet node (containerd, runc, kube-proxy,
CoreDNS, kube-router enforcing NetworkPolicies) in a network namespace of its
own (``e2e/realnode.py``). The images ``make images`` builds are imported into
the node; then, exactly as docs/walkthrough.md tells a platform team:

* ``helm install`` of the operator chart: the operator runs as a pod from its image;
* three tenants, each with ``helm install`` of the tenant chart and its CRM
  export on a PersistentVolume an admin provided;
* ``kubectl apply`` of a Federation with secure aggregation and sample-level DP.

Training pods and the aggregator StatefulSet really run and train; the
NetworkPolicies the operator wrote are probed from inside pods; an aggregator
pod deleted mid-training comes back and resumes from its checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "e2e"))

from dashboard_queries import assert_every_panel_has_data  # noqa: E402
from images import current_images, image_refs  # noqa: E402
from prometheus_server import Prometheus  # noqa: E402
from realnode import RealNodeCluster  # noqa: E402
from scenario import (  # noqa: E402
    FED_NS,
    FEDERATION,
    GRPC_PORT,
    METRICS_PORT,
    OPERATOR_NS,
    ROUNDS,
    TENANTS,
    aggregator_pod,
    apply_federation,
    get,
    install_operator,
    items,
    load,
    phase,
    provide_tenants,
    status,
    synthesise,
)

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.real_node]

# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealNodeCluster]:
    """A fresh cluster, or with FEDCRM_E2E_CLUSTER=<folder> the one ``e2e/cluster up --real-node`` left running
    there (then kept running afterwards, for a developer to look around)."""
    attach = os.environ.get("FEDCRM_E2E_CLUSTER")
    if attach:
        yield RealNodeCluster.attach(Path(attach))
        return
    logs = tmp_path_factory.mktemp("real-node-logs")
    c = RealNodeCluster(images=current_images(build=True))
    c.start()
    try:
        yield c
    finally:
        _keep_evidence(c, logs)
        c.stop()


def _keep_evidence(cluster: RealNodeCluster, logs: Path) -> None:
    """What a reader of a failure wants, kept in pytest's temporary folder after the cluster is gone."""
    for name, args in (("federations", ["get", "federations,participants", "-A", "-o", "yaml"]),
                       ("pods", ["get", "pods", "-A", "-o", "wide"]), ("events", ["get", "events", "-A"])):
        (logs / f"{name}.txt").write_text(cluster.kubectl(*args, check=False).stdout)
    for pod in json.loads(cluster.kubectl("get", "pods", "-A", "-o", "json", check=False).stdout or '{"items": []}')["items"]:
        ns, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
        out = cluster.kubectl("logs", name, "-n", ns, "--all-containers", "--prefix", check=False).stdout
        (logs / f"pod-{ns}-{name}.log").write_text(out)
    shutil.copytree(cluster.log_dir, logs / "components", dirs_exist_ok=True)


@pytest.fixture(scope="module")
def prometheus(cluster: RealNodeCluster) -> Prometheus:
    """Prometheus on the node, discovering pods through the API server as in a real cluster
    (``kubernetes_sd_configs``, role pod) and scraping every container port named ``metrics``."""
    pki = cluster.dir / "pki"
    config = cluster.dir / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "2s", "scrape_timeout": "1500ms"},
        "scrape_configs": [{
            "job_name": "kubernetes-pods",
            "kubernetes_sd_configs": [{"role": "pod", "api_server": cluster.server, "tls_config": {
                "ca_file": str(pki / "ca.crt"), "cert_file": str(pki / "prometheus.crt"), "key_file": str(pki / "prometheus.key")}}],
            "relabel_configs": [
                {"source_labels": ["__meta_kubernetes_pod_container_port_name"], "regex": "metrics", "action": "keep"},
                {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
                {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
            ],
        }],
    }))
    binary = cluster.node_bin / "prometheus"  # Debian's is built without Kubernetes service discovery
    port = 9099
    cluster.start_process("prometheus", binary, [
        f"--config.file={config}", f"--storage.tsdb.path={cluster.dir / 'prometheus'}",
        f"--web.listen-address=127.0.0.1:{port}"])
    cluster.wait_for("Prometheus ready", lambda: cluster.http_get(f"http://127.0.0.1:{port}/-/ready") != b"", timeout=60)
    return Prometheus(port, fetch=cluster.http_get)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthesise(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="module")
def operator(cluster: RealNodeCluster) -> dict[str, str]:
    """``helm install`` of the operator chart with the locally built images; the operator runs as a pod."""
    return install_operator(cluster)


@pytest.fixture(scope="module")
def tenants(cluster: RealNodeCluster, operator: dict[str, str], synthetic: Path) -> dict[str, dict[str, Any]]:
    return provide_tenants(cluster, synthetic)


@pytest.fixture(scope="module")
def federation(cluster: RealNodeCluster, tenants: dict[str, dict[str, Any]], synthetic: Path) -> dict[str, Any]:
    return apply_federation(cluster, synthetic)


# ---------------------------------------------------------------------- the scenario
def test_operator_runs_as_a_pod_from_its_image(cluster: RealNodeCluster, operator: dict[str, str]) -> None:
    pods = items(cluster, "pods", OPERATOR_NS, "app.kubernetes.io/name=fedcrm-operator")
    assert len(pods) == 2  # the chart's two replicas: one active, one waiting (kopf peering)
    for pod in pods:
        assert pod["spec"]["containers"][0]["image"] == operator["operator"]
        assert pod["spec"]["nodeName"] == "fedcrm-node-0", "the operator must run on the real node, not a KWOK one"
        assert all(s["ready"] for s in pod["status"]["containerStatuses"])
    names = {pod["metadata"]["name"] for pod in pods}

    def peers() -> dict[str, Any]:
        return json.loads(cluster.kubectl("get", "clusterkopfpeering", "fedcrm", "-o", "json").stdout).get("status") or {}

    cluster.wait_for("both replicas in the peering", lambda: names <= set(peers()), timeout=60, every=2)


def test_federation_trains_in_pods_and_survives_its_aggregator_pod_being_deleted(
        cluster: RealNodeCluster, prometheus: Prometheus, federation: dict[str, Any]) -> None:
    cluster.wait_for("training pods Running", lambda: all(
        any(p["status"].get("phase") in ("Running", "Succeeded") for p in items(cluster, "pods", ns, "fedcrm.io/role=training"))
        for ns in TENANTS), timeout=300, every=2)

    # Mid-training, the aggregator's pod goes (a node drain, an eviction): the StatefulSet brings it back.
    # Its own /status (through the API server's pod proxy) says where training is; the Federation's status
    # is a poll behind.
    first = aggregator_pod(cluster)
    assert first is not None

    def progress() -> dict[str, Any]:
        raw = cluster.kubectl("get", "--raw", f"/api/v1/namespaces/{FED_NS}/pods/{first['metadata']['name']}:"
                              f"{METRICS_PORT}/proxy/status", check=False)
        return json.loads(raw.stdout) if raw.returncode == 0 else {}

    seen: list[dict[str, Any]] = []
    cluster.wait_for("a first round", lambda: seen.append(progress()) or seen[-1].get("round", 0) >= 1,
                     timeout=600, every=0.3)
    before = seen[-1]
    cluster.kubectl("delete", "pod", first["metadata"]["name"], "-n", FED_NS, "--wait=false")
    assert before["round"] < ROUNDS, f"training ended before the aggregator could be deleted: {before}"
    cluster.wait_for("a new aggregator pod Ready", lambda: (lambda pod: pod is not None
                     and pod["metadata"]["uid"] != first["metadata"]["uid"]
                     and all(c.get("ready") for c in pod["status"].get("containerStatuses", [{}])))(aggregator_pod(cluster)),
                     timeout=180, every=1)

    cluster.wait_for(f"Federation {FEDERATION} finished", lambda: phase(cluster) in ("Succeeded", "Failed"),
                     timeout=900, every=5)
    final = status(cluster)
    assert final["phase"] == "Succeeded", json.dumps(final, indent=2)
    assert final["round"] == ROUNDS
    assert (before.get("epsilon_spent") or 0) < final["epsilonSpent"] <= 8.0  # rounds after the restart spent more
    assert 0.5 < final["lastMetrics"]["accuracy"] <= 1.0, final

    second = aggregator_pod(cluster)
    assert second is not None
    logs = cluster.kubectl("logs", second["metadata"]["name"], "-n", FED_NS).stdout
    assert "resuming after round" in logs, logs[-3000:]
    # No round counted twice, no privacy spend forgotten: both series only ever grew, across the two pods.
    now = time.time()
    for metric in ("fedcrm_round", "fedcrm_epsilon_spent"):
        series = prometheus.api("query_range", query=f'max({metric}{{federation="{FED_NS}/{FEDERATION}"}})',
                                start=now - 1800, end=now, step="2s")["result"]
        values = [float(v) for _, v in series[0]["values"]]
        assert values == sorted(values), f"{metric} went backwards across the aggregator's restart: {values}"
    assert max(float(v) for _, v in series[0]["values"]) == pytest.approx(final["epsilonSpent"], rel=1e-6)

    table = cluster.kubectl("get", "fed", "-n", FED_NS).stdout
    header, row = table.splitlines()[:2]
    for column in ("PHASE", "ROUND", "PARTICIPANTS", "EPSILON", "ACCURACY"):
        assert column in header.upper(), table
    assert f"{ROUNDS}/{ROUNDS}" in row, table
    for ns in TENANTS:
        pods = items(cluster, "pods", ns, "fedcrm.io/role=training")
        assert pods and all(p["spec"]["nodeName"] == "fedcrm-node-0" for p in pods)
        logs = cluster.kubectl("logs", pods[-1]["metadata"]["name"], "-n", ns, "-c", "node").stdout
        assert "round" in logs.lower(), logs[-2000:]


def test_prometheus_discovers_and_scrapes_the_operator_and_aggregator_pods(
        cluster: RealNodeCluster, prometheus: Prometheus, federation: dict[str, Any]) -> None:
    targets = prometheus.api("targets")["activeTargets"]
    by_pod = {t["labels"].get("pod", ""): t for t in targets}
    operator = [t for pod, t in by_pod.items() if pod.startswith("fedcrm-")]
    aggregator = [t for t in targets if t["labels"].get("namespace") == FED_NS]
    assert operator and aggregator, json.dumps(targets, indent=1)[:3000]
    cluster.wait_for("both scraped", lambda: all(t["health"] == "up" for t in (
        t for t in prometheus.api("targets")["activeTargets"]
        if t["labels"].get("namespace") in (FED_NS, OPERATOR_NS))), timeout=60)
    assert prometheus.query('fedcrm_operator_reconciles_total')
    assert prometheus.query(f'fedcrm_round{{federation="{FED_NS}/{FEDERATION}"}}')


# ---------------------------------------------------------------------- NetworkPolicies, probed live
LISTENER = ("import socket\n"
            "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
            "s.bind(('', 8443)); s.listen(64)\n"
            "while True: s.accept()[0].close()\n")
CONNECT = ("import socket, sys\n"
           "socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).close()\n")


def _probe(cluster: RealNodeCluster, namespace: str, name: str, labels: dict[str, str], image: str) -> str:
    """A pod that listens on 8443 and can dial out, carrying ``labels`` (so the policies that select them apply)."""
    load(cluster, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace, "labels": labels},
                    "spec": {"containers": [{"name": "probe", "image": image, "imagePullPolicy": "IfNotPresent",
                                             "command": ["python3", "-c", LISTENER],
                                             "securityContext": {"allowPrivilegeEscalation": False, "runAsNonRoot": True}}],
                             "terminationGracePeriodSeconds": 1, "automountServiceAccountToken": False}})
    cluster.kubectl("wait", "--for=condition=Ready", f"pod/{name}", "-n", namespace, "--timeout=90s", timeout=100)
    return str((get(cluster, "pod", name, namespace) or {})["status"]["podIP"])


def _connects(cluster: RealNodeCluster, namespace: str, pod: str, host: str, port: int, *, container: str | None = None) -> bool:
    where = ["-c", container] if container else []
    proc = cluster.kubectl("exec", pod, "-n", namespace, *where, "--", "python3", "-c", CONNECT, host, str(port),
                           check=False, timeout=30)
    return proc.returncode == 0


def _eventually_connects(cluster: RealNodeCluster, namespace: str, pod: str, host: str, port: int) -> None:
    """Allowed traffic: a new pod's address reaches the enforcing agent's sets about a second after it starts."""
    cluster.wait_for(f"{namespace}/{pod} → {host}:{port} allowed", lambda: _connects(cluster, namespace, pod, host, port),
                     timeout=30, every=1)


def test_network_policies_are_enforced_between_live_pods(cluster: RealNodeCluster, federation: dict[str, Any]) -> None:
    cluster.wait_for("the Federation finished", lambda: phase(cluster) in ("Succeeded", "Failed"), timeout=900, every=5)
    image = image_refs()["aggregator"]
    policy = get(cluster, "networkpolicy", items(cluster, "networkpolicies", TENANTS[0])[0]["metadata"]["name"], TENANTS[0])
    assert policy is not None
    training_labels = policy["spec"]["podSelector"]["matchLabels"]
    aggregator = aggregator_pod(cluster)
    assert aggregator is not None
    aggregator_ip = aggregator["status"]["podIP"]

    trainer = _probe(cluster, TENANTS[0], "probe-training", training_labels, image)
    other_tenant = _probe(cluster, TENANTS[1], "probe-plain", {"app": "probe"}, image)
    _probe(cluster, "monitoring", "probe-monitoring", {"app": "probe"}, image)

    # Controls first: the listeners answer where no policy stands in the way, so a refusal below is the policy's.
    _eventually_connects(cluster, "monitoring", "probe-monitoring", other_tenant, 8443)
    _eventually_connects(cluster, "monitoring", "probe-monitoring", aggregator_ip, METRICS_PORT)  # monitoring may scrape
    assert _connects(cluster, TENANTS[0], "probe-training", "127.0.0.1", 8443)
    time.sleep(3)  # every probe's address is in the agent's sets by now (it lags about a second)

    database = items(cluster, "pods", TENANTS[1], "app=crm-postgres")[0]["status"]["podIP"]
    _eventually_connects(cluster, "monitoring", "probe-monitoring", database, 5432)
    # A training pod reaches no other tenant (nor its data source), and nothing reaches it.
    assert not _connects(cluster, TENANTS[0], "probe-training", database, 5432), "tenant → another tenant's database"
    assert not _connects(cluster, TENANTS[0], "probe-training", other_tenant, 8443), "tenant → other tenant allowed"
    assert not _connects(cluster, TENANTS[1], "probe-plain", trainer, 8443), "other tenant → training pod allowed"
    assert not _connects(cluster, "monitoring", "probe-monitoring", trainer, 8443), "anything → training pod allowed"
    # It reaches its aggregator's gRPC port only (training succeeded through it), not its metrics port.
    assert not _connects(cluster, TENANTS[0], "probe-training", aggregator_ip, METRICS_PORT), "tenant → aggregator metrics"
    # It resolves names (DNS is allowed) but cannot use the API server.
    resolve = cluster.kubectl("exec", "probe-training", "-n", TENANTS[0], "--", "python3", "-c",
                              "import socket; print(socket.gethostbyname('kubernetes.default.svc.cluster.local'))",
                              check=False)
    assert resolve.stdout.strip() == "10.96.0.1", resolve.stderr
    assert not _connects(cluster, TENANTS[0], "probe-training", "10.96.0.1", 443), "tenant training pod → API server"
    # Another tenant's unlabelled pod cannot reach the aggregator at all.
    assert not _connects(cluster, TENANTS[1], "probe-plain", aggregator_ip, GRPC_PORT), "non-training pod → aggregator"
    # The aggregator only answers: it dials nothing, not a tenant, not the API server.
    assert not _connects(cluster, FED_NS, aggregator["metadata"]["name"], other_tenant, 8443, container="aggregator")
    assert not _connects(cluster, FED_NS, aggregator["metadata"]["name"], "10.96.0.1", 443, container="aggregator")


# ---------------------------------------------------------------------- last: the Federation deleted
def test_deleting_the_federation_removes_its_pods_and_every_dashboard_panel_has_data(
        cluster: RealNodeCluster, prometheus: Prometheus, federation: dict[str, Any]) -> None:
    cluster.wait_for("the Federation finished", lambda: phase(cluster) in ("Succeeded", "Failed"), timeout=900, every=5)
    began = time.time()
    # Deleting it runs the operator's finalizer; its first pass finds children still terminating and retries:
    # the reconcile-errors panel's data (a healthy run has no other failures to show).
    cluster.kubectl("delete", "federation", FEDERATION, "-n", FED_NS, "--wait=true", "--timeout=120s", timeout=150)
    cluster.wait_for("the aggregator and training pods gone", lambda: not items(cluster, "pods", FED_NS, "fedcrm.io/role")
                     and not any(items(cluster, "pods", ns, "fedcrm.io/role=training") for ns in TENANTS), timeout=120)
    assert not items(cluster, "persistentvolumeclaims", FED_NS), "the checkpoint claim outlived its Federation"
    cluster.wait_for("the operator's retry scraped", lambda: prometheus.query(
        f'increase(fedcrm_operator_reconciles_total{{outcome!="ok"}}[{int(time.time() - began) + 30}s]) > 0'), timeout=60)
    time.sleep(5)  # two more scrapes, so rate() over the last minute sees the step
    now = time.time()
    assert_every_panel_has_data(prometheus.api, f"{FED_NS}/{FEDERATION}", now - 1800, now, step="5s")
