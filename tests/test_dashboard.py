"""The chart's Grafana dashboard: well-formed, shipped by the chart, and every query answered by a real Prometheus.

The fast tests read the JSON and the chart; the slow one runs the operator
against the test control plane and a differentially private federation with
its metrics port, lets Debian's Prometheus scrape both, and runs every panel's
query, template variables filled in as Grafana would, through Prometheus's
HTTP API. Grafana itself is not run: the queries are proven, not the rendering.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from operator_harness import (
    ROOT,
    Kubectl,
    OperatorProcess,
    free_port,
    install_chart,
    provide_claim,
    service_account_kubeconfig,
    wait_for,
)
from prometheus_server import prometheus

from fedcrm.data.synthetic import generate_federation
from fedcrm_aggregator.status_http import StatusServer

CHART = ROOT / "charts" / "fedcrm-operator"
DASHBOARD = CHART / "dashboards" / "fedcrm.json"
EXPORTERS = [ROOT / "aggregator_image" / "fedcrm_aggregator" / "status_http.py",
             ROOT / "operator" / "fedcrm_operator" / "metrics.py"]
DATASOURCE = "${datasource}"
# What Grafana puts in place of its variables; the federation is filled in per run.
RATE_INTERVAL = "1m"
PROMQL_WORDS = {
    "sum", "min", "max", "avg", "count", "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
    "unless", "bool", "offset", "rate", "irate", "increase", "delta", "histogram_quantile", "max_over_time",
    "min_over_time", "avg_over_time", "last_over_time", "clamp_min", "clamp_max", "vector", "scalar", "abs",
}


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def targets(board: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(panel title, expr) for every query of every panel."""
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            yield panel.get("title", f"panel {panel.get('id')}"), target.get("expr", "")


def exported_metrics() -> set[str]:
    """Sample names the aggregator and the operator expose, read from where they are defined."""
    names: set[str] = set()
    for path in EXPORTERS:
        source = path.read_text()
        names |= set(re.findall(r'"(fedcrm_[a-z_]+)"', source))
        for histogram in re.findall(r'Histogram\(\s*"(fedcrm_[a-z_]+)"', source):
            names |= {f"{histogram}_bucket", f"{histogram}_sum", f"{histogram}_count"}
    return names


def metric_names(expr: str) -> set[str]:
    """The identifiers of a PromQL expression that are neither functions nor keywords: its metric names."""
    bare = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # strings
    bare = re.sub(r"\{[^}]*\}", "", bare)  # label matchers
    bare = re.sub(r"\[[^\]]*\]", "", bare)  # range selectors
    bare = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1", bare)  # label lists
    return {word for word in re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", bare) if word not in PROMQL_WORDS}


def grafana_regex_escape(value: str) -> str:
    """A selected value of a multi-value variable as Grafana's Prometheus data source writes it into a query
    (``prometheusSpecialRegexEscape``): regex characters escaped inside a PromQL string."""
    return re.sub(r"[$^*{}\[\]'+?.()|]", lambda m: "\\\\" + m.group(0), value.replace("\\", "\\\\\\\\"))


def expand(expr: str, federation: str) -> str:
    """Fill in the template variables as Grafana does; ``federation`` is the variable's value, already escaped."""
    values = {"federation": federation, "__rate_interval": RATE_INTERVAL, "__interval": "15s", "__range": "10m"}
    out = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values[m.group(1) or m.group(2)], expr)
    assert "$" not in out, out
    return out


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

            board = dashboard()
            variable = next(v for v in board["templating"]["list"] if v["name"] == "federation")
            assert variable["definition"] == "label_values(fedcrm_round, federation)"
            values = prom.api("label/federation/values", **{"match[]": "fedcrm_round", "start": start, "end": end})
            assert key in values, f"the federation variable's query offers {values}, not {key}"

            checked = []
            for title, expr in targets(board):
                # The one federation selected, and "All" (the variable's allValue).
                for query in sorted({expand(expr, grafana_regex_escape(key)), expand(expr, variable["allValue"])}):
                    result = prom.api("query_range", query=query, start=start, end=end, step="1s")["result"]
                    finite = [v for series in result for _, v in series["values"] if math.isfinite(float(v))]
                    assert finite, f"panel {title!r}: {expr!r} (as {query!r}) returned no data from Prometheus"
                checked.append(title)
            assert len(checked) == sum(len(p["targets"]) for p in board["panels"])
            # The run was seen through: the budget and a spend within it, and the planned rounds.
            budget = prom.query(f'max_over_time(fedcrm_epsilon_budget{{federation="{key}"}}[10m])', time=end)
            assert float(budget[0]["value"][1]) == 8.0
            spent = prom.query(f'max_over_time(fedcrm_epsilon_spent{{federation="{key}"}}[10m])', time=end)
            assert 0 < float(spent[0]["value"][1]) <= 8.0
        finally:
            operator.stop()
            kubectl("delete", "participant", "crm", "-n", TENANTS[0], "--wait=false", check=False)
