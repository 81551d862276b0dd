"""The Grafana dashboard's queries as Grafana sends them, and the check that each returns data from a Prometheus.

Shared by the dashboard tests on loopback and the real-node e2e, so both hold
every panel to the same standard.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
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



def assert_every_panel_has_data(api: Callable[..., Any], key: str, start: float, end: float, step: str = "1s") -> list[str]:
    """Run every panel's query through ``api`` (Prometheus's ``/api/v1/<path>`` with parameters) over [start, end],
    once with ``key`` as the selected federation and once with "All"; each must return a finite sample."""
    board = dashboard()
    variable = next(v for v in board["templating"]["list"] if v["name"] == "federation")
    assert variable["definition"] == "label_values(fedcrm_round, federation)"
    values = api("label/federation/values", **{"match[]": "fedcrm_round", "start": start, "end": end})
    assert key in values, f"the federation variable's query offers {values}, not {key}"
    checked = []
    for title, expr in targets(board):
        for query in sorted({expand(expr, grafana_regex_escape(key)), expand(expr, variable["allValue"])}):
            result = api("query_range", query=query, start=start, end=end, step=step)["result"]
            finite = [v for series in result for _, v in series["values"] if math.isfinite(float(v))]
            assert finite, f"panel {title!r}: {expr!r} (as {query!r}) returned no data from Prometheus"
        checked.append(title)
    assert len(checked) == sum(len(p["targets"]) for p in board["panels"])
    return checked
