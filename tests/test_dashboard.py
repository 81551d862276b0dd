"""The chart's Grafana dashboard: well-formed, shipped by the chart, and every query answered by a real Prometheus.

The fast tests read the JSON and the chart; the slow one runs the operator
against the test control plane and a differentially private federation with
its metrics port, lets Debian's Prometheus scrape both, and runs every panel's
query, template variables filled in as Grafana would, through Prometheus's
HTTP API. Grafana itself is not run: the queries are proven, not the rendering.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from dashboard_queries import (
    CHART,
    DATASOURCE,
    EXPORTERS,
    assert_every_panel_has_data,
    dashboard,
    exported_metrics,
    metric_names,
    targets,
)
from operator_harness import (
    Kubectl,
    OperatorProcess,
    free_port,
    grant_tenant_access,
    install_chart,
    provide_claim,
    service_account_kubeconfig,
    wait_for,
)
from prometheus_server import prometheus

from fedcrm.data.synthetic import generate_federation
from fedcrm_aggregator.status_http import StatusServer

# ----------------------------------------------------------------- fast


def test_dashboard_is_grafana_json_with_a_datasource_and_a_federation_variable() -> None:
    board = dashboard()
    assert board["uid"] == "fedcrm" and 36 <= board["schemaVersion"] <= 41
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    federation = variables["federation"]
    assert federation["type"] == "query" and federation["datasource"]["uid"] == DATASOURCE
    assert federation["definition"] == federation["query"]["query"] == "label_values(fedcrm_round, federation)"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))


def test_every_panel_has_a_title_the_datasource_variable_and_a_query() -> None:
    for panel in dashboard()["panels"]:
        assert panel.get("title"), panel
        assert panel["datasource"] == {"type": "prometheus", "uid": DATASOURCE}, panel["title"]
        assert panel["targets"], f"{panel['title']}: no query"
        for target in panel["targets"]:
            assert target.get("expr", "").strip(), f"{panel['title']}: a target without expr"
            assert target["datasource"]["uid"] == DATASOURCE, panel["title"]
            assert "$datasource" not in target["expr"] and DATASOURCE not in target["expr"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]


def test_every_metric_a_query_uses_is_one_the_aggregator_or_the_operator_exports() -> None:
    exported = exported_metrics()
    assert {"fedcrm_round", "fedcrm_epsilon_budget", "fedcrm_operator_reconciles_total",
            "fedcrm_operator_reconcile_seconds_bucket"} <= exported
    used: set[str] = set()
    for title, expr in targets(dashboard()):
        names = metric_names(expr)
        assert names, f"{title}: no metric in {expr!r}"
        unknown = names - exported
        assert not unknown, f"{title}: {sorted(unknown)} in {expr!r} is exported by neither {[p.name for p in EXPORTERS]}"
        used |= names
    assert metric_names('sum by (le) (rate(fedcrm_x_bucket{a="b"}[5m]))') == {"fedcrm_x_bucket"}  # the parser itself
    # Every round, participant, validation, privacy and operator metric has a panel.
    assert exported - used <= {"fedcrm_operator_reconcile_seconds", "fedcrm_operator_reconcile_seconds_sum",
                               "fedcrm_operator_reconcile_seconds_count"}, exported - used


def test_aggregator_exports_the_epsilon_budget_only_with_differential_privacy() -> None:
    progress: dict[str, Any] = {
        "federation": "coord/churn", "state": "training", "round": 2, "rounds": 5, "expected_participants": 3,
        "active_participants": 3, "metrics": {}, "round_duration_s": 1.0, "bytes_up_per_client": 10.0,
        "epsilon_spent": 1.5, "epsilon_budget": 8.0,
    }
    server = StatusServer("127.0.0.1:0", lambda: progress).start()
    try:
        def scrape() -> str:
            return urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5).read().decode()

        assert 'fedcrm_epsilon_budget{federation="coord/churn"} 8.0' in scrape()
        progress.update(epsilon_spent=None, epsilon_budget=None)
        assert "fedcrm_epsilon_budget" not in scrape()
        del progress["epsilon_budget"]  # a snapshot that predates the key
        assert "fedcrm_epsilon" not in scrape()
    finally:
        server.stop()


def _helm() -> Path:
    found = shutil.which("helm") or str(Path.home() / ".cache" / "fedcrm" / "k8s" / "v1.36.3" / "bin" / "helm")
    if not Path(found).exists():
        pytest.skip("helm is not built yet: e2e/build-control-plane builds it with the control plane")
    return Path(found)


def _render(*sets: str) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [str(_helm()), "template", "fedcrm", str(CHART), "--namespace", "fedcrm-system", "--kube-version", "1.36.3",
         *[a for s in sets for a in ("--set", s)]],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def test_chart_ships_the_dashboard_as_a_configmap_for_grafanas_sidecar_when_enabled() -> None:
    assert not [d for d in _render() if d["kind"] == "ConfigMap"], "the dashboard is off by default"
    (config_map,) = [d for d in _render("dashboards.enabled=true") if d["kind"] == "ConfigMap"]
    assert config_map["metadata"]["namespace"] == "fedcrm-system"
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["fedcrm.json"]) == dashboard()
    (moved,) = [d for d in _render("dashboards.enabled=true", "dashboards.label=dashboards", "dashboards.labelValue=fedcrm",
                                   "dashboards.namespace=monitoring", "dashboards.annotations.grafana_folder=fedcrm")
                if d["kind"] == "ConfigMap"]
    assert moved["metadata"]["labels"]["dashboards"] == "fedcrm" and "grafana_dashboard" not in moved["metadata"]["labels"]
    assert moved["metadata"]["namespace"] == "monitoring"
    assert moved["metadata"]["annotations"] == {"grafana_folder": "fedcrm"}
    typo = subprocess.run([str(_helm()), "template", "x", str(CHART), "--kube-version", "1.36.3",
                           "--set", "dashboards.enabeld=true"], capture_output=True, text=True, timeout=60)
    assert typo.returncode != 0 and "enabeld" in typo.stderr


# ----------------------------------------------------------------- slow: a real Prometheus

COORD, TENANTS = "dash-coord", ["dash-a", "dash-b"]


def _operator_reconciles_something(kubectl: Kubectl) -> None:
    """A Federation with one of its two tenants enrolled, then deleted: ok passes, a retry (children still
    being deleted), and phases for both gauges."""
    for ns in [COORD, *TENANTS]:
        kubectl("create", "namespace", ns, check=False)
    provide_claim(kubectl, TENANTS[0])
    # The tenant's grant, as installing the tenant chart gives it: without it the operator can create none of the
    # Participant's children and it only says AccessNotGranted.
    grant_tenant_access(kubectl, TENANTS[0], (COORD, "dash"), "crm")
    kubectl.apply(
        {"apiVersion": "fedcrm.io/v1alpha1", "kind": "Federation", "metadata": {"name": "dash", "namespace": COORD},
         "spec": {"task": {"target": "converted", "features": [{"name": "revenue", "type": "numeric"}]},
                  "training": {"rounds": 3, "minParticipants": 2}, "participants": {"namespaces": TENANTS}}},
        {"apiVersion": "fedcrm.io/v1alpha1", "kind": "Participant", "metadata": {"name": "crm", "namespace": TENANTS[0]},
         "spec": {"federationRef": {"name": "dash", "namespace": COORD},
                  "data": {"pvc": {"claimName": "crm-data", "path": "leads.csv"}, "mapping": {"converted": "Converted"}}}},
    )

    def phase(kind: str, name: str, ns: str) -> str | None:
        return ((kubectl.get(kind, name, ns) or {}).get("status") or {}).get("phase")

    wait_for("the Federation enrolling", lambda: phase("federation", "dash", COORD) == "Enrolling", timeout=60)
    wait_for("the Participant admitted", lambda: phase("participant", "crm", TENANTS[0]) not in (None, "Pending"), timeout=60)
    kubectl("delete", "federation", "dash", "-n", COORD, "--wait=false")
    wait_for("the Federation gone", lambda: kubectl.get("federation", "dash", COORD) is None, timeout=60)


@pytest.mark.slow
@pytest.mark.cluster
def test_every_panel_query_returns_data_from_a_real_prometheus(control_plane: Any, tmp_path: Path) -> None:
    kubectl = Kubectl(control_plane.bin_dir / "kubectl", control_plane.kubeconfig)
    install_chart(control_plane.bin_dir / "helm", control_plane.kubeconfig)
    kubectl("create", "namespace", "fedcrm-system", check=False)
    operator = OperatorProcess(service_account_kubeconfig(kubectl, control_plane.kubeconfig, tmp_path / "sa.kubeconfig"),
                               tmp_path)

    # Differential privacy on, so the epsilon panel has data; enough rows for a run of several seconds.
    synth = generate_federation(tmp_path / "fed", clients=3, rows=4000, seed=5, rounds=10)
    doc = yaml.safe_load(synth.federation_path.read_text())
    doc["spec"]["privacy"]["differentialPrivacy"] = {"mode": "sample", "epsilon": 8.0, "delta": 1e-5}
    synth.federation_path.write_text(yaml.safe_dump(doc))
    key = f"{doc['metadata']['namespace']}/{doc['metadata']['name']}"

    aggregator_port = free_port()
    scraped = {"fedcrm-aggregator": aggregator_port, "fedcrm-operator": operator.metrics_port}
    with prometheus(tmp_path, scraped) as prom:
        start = time.time()
        operator.start()
        try:
            _operator_reconciles_something(kubectl)
            run = subprocess.run(
                [sys.executable, "-m", "fedcrm.cli.main", "run", "--federation", str(synth.federation_path),
                 "--participant", *map(str, synth.participant_paths), "--out", str(tmp_path / "run"),
                 "--metrics-port", str(aggregator_port)],
                capture_output=True, text=True, timeout=600,
            )
            assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
            time.sleep(1)  # a few more operator scrapes after the aggregator exited
            end = time.time()

            assert_every_panel_has_data(prom.api, key, start, end)
            # The run was seen through: the budget and a spend within it, and the planned rounds.
            budget = prom.query(f'max_over_time(fedcrm_epsilon_budget{{federation="{key}"}}[10m])', time=end)
            assert float(budget[0]["value"][1]) == 8.0
            spent = prom.query(f'max_over_time(fedcrm_epsilon_spent{{federation="{key}"}}[10m])', time=end)
            assert 0 < float(spent[0]["value"][1]) <= 8.0
        finally:
            operator.stop()
            kubectl("delete", "participant", "crm", "-n", TENANTS[0], "--wait=false", check=False)
