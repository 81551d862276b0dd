"""How fast the operator turns applied manifests into children, and what it asks of the API server when nothing
changes, against a real control plane.

Scenarios (each on a fresh set of namespaces of one running control plane, one operator throughout):
  - 1 federation x 50 participants (50 tenant namespaces)
  - 20 federations x 10 participants in 50 tenant namespaces (200 participants; federation f takes the ten
    namespaces from 10f mod 50, so every namespace holds 4 Participants of 4 Federations)
  - with --quick only 1 federation x 3 participants (a smoke test, a few minutes)
Each scenario's coordinator namespace is one of the chart's coordinatorNamespaces
(created before `helm install`, as the chart requires), and every tenant
namespace grants the operator access for each of its Participants as the tenant
chart would (`grant_tenant_access`), before the clock starts.

Per scenario: seconds from `kubectl apply` of every manifest to every child
existing (per participant: certificate Secret, ConfigMap, NetworkPolicy, Job
with its pod bound to a node; per federation: CA and server Secrets,
Services, NetworkPolicy, aggregator StatefulSet), the operator's passes and
their latency (p50/p99 of its own `fedcrm_operator_reconcile_seconds`
histogram over that interval), and its resident memory (current and peak).

And where those seconds went, from the API server's audit log (``timelines``
in the JSON, one per scenario; the breakdown also in each row): the apply
itself; the operator after it, until its last write of a Job or the aggregator
StatefulSet (``operator_after_apply_s``); the Kubernetes controllers after the
operator, until the last training pod is bound to a node: the job controller
creating pods and the scheduler binding them, paced by the controller
manager's own client rate limit (``controllers_after_operator_s``); and this
benchmark's polling (``benchmark_polling_s``). The timeline itself: first and
last Participant and Federation status patch, child write, Job, StatefulSet,
pod created and pod bound, enrolment closed, and the operator's requests by
verb and resource.

Then the idle cost: once every scenario's children exist, a settling pause,
then a window (120 s; 30 s with --quick) in which nothing is applied. What the
operator asks of the API server in it comes from the API server's audit log,
which this benchmark's control plane writes for every request of the operator's
ServiceAccount and every other client's writes (Metadata level, one line per
finished request; the idle count reads the operator's lines): requests per minute per
Federation, overall and per scenario (by the namespace a request names;
cluster-scoped requests, the watches and peering, are shared), and which verbs
on which resources they were. The API server's own `apiserver_request_total`
(scraped from /metrics before and after the window) has no user label: its
delta counts every client (the controller manager, the scheduler, KWOK's node
heartbeats as well), and is reported beside the audit count as a cross-check.

    .venv/bin/python bench/operator_scale.py [--quick] [--json bench/results/operator.json]

If the operator or the control plane fails, the script exits non-zero with the
operator's log tail; it never writes a partial result.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "e2e"), str(ROOT / "tests")]

from controlplane import ControlPlane  # noqa: E402
from operator_harness import (  # noqa: E402
    OPERATOR_NAMESPACE,
    RELEASE,
    Kubectl,
    OperatorProcess,
    grant_tenant_access,
    install_chart,
    provide_claim,
    service_account_kubeconfig,
    wait_for,
)

TASK = {"target": "converted", "features": [{"name": "revenue", "type": "numeric"}]}
OPERATOR_USER = f"system:serviceaccount:{OPERATOR_NAMESPACE}:{RELEASE}"
#: Audit every request of the operator, and every other client's writes (kubectl's apply, the job controller's
#: pods, the scheduler's bindings) for the timeline, once per request when its response is complete (a watch:
#: when it ends). Leases (every component's heartbeat) are left out.
AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1", "kind": "Policy",
    "omitStages": ["RequestReceived", "ResponseStarted"],
    "rules": [{"level": "Metadata", "users": [OPERATOR_USER]},
              {"level": "None", "resources": [{"group": "coordination.k8s.io", "resources": ["leases"]}]},
              {"level": "Metadata", "verbs": ["create", "patch", "update", "delete"]},
              {"level": "None"}],
}
#: The children a pass creates (or applies), by API resource.
CHILD_RESOURCES = frozenset({"secrets", "configmaps", "networkpolicies", "jobs", "services", "statefulsets"})


class AuditedControlPlane(ControlPlane):
    """The tests' control plane, its API server writing an audit log of the operator's requests."""

    @property
    def audit_log(self) -> Path:
        return self.dir / "audit.log"

    def _spawn(self, name: str, args: list[str], *, binary: Path | None = None) -> None:
        if name == "kube-apiserver":
            policy = self.dir / "audit-policy.json"
            policy.write_text(json.dumps(AUDIT_POLICY))
            args = [*args, f"--audit-policy-file={policy}", f"--audit-log-path={self.audit_log}",
                    "--audit-log-format=json", "--audit-log-mode=blocking"]
        super()._spawn(name, args, binary=binary)


def coordinator_namespace(prefix: str) -> str:
    return f"{prefix}-coord"


def manifests(prefix: str, federations: int, participants: int, namespaces: int | None = None
              ) -> tuple[list[dict[str, Any]], list[str]]:
    """``federations`` Federations of ``participants`` Participants each, over ``namespaces`` tenant namespaces
    (default: as many as participants per federation, every federation in all of them); federation f takes the
    ``participants`` namespaces from ``f * participants`` on, wrapping around."""
    coord = coordinator_namespace(prefix)
    count = namespaces or participants
    tenants = [f"{prefix}-t{i:02d}" for i in range(count)]
    docs: list[dict[str, Any]] = []
    for f in range(federations):
        name = f"fed{f:02d}"
        mine = [tenants[(f * participants + i) % count] for i in range(participants)]
        docs.append({
            "apiVersion": "fedcrm.io/v1alpha1", "kind": "Federation",
            "metadata": {"name": name, "namespace": coord},
            "spec": {"task": TASK, "training": {"minParticipants": 2}, "participants": {"namespaces": mine}},
        })
        for ns in mine:
            docs.append({
                "apiVersion": "fedcrm.io/v1alpha1", "kind": "Participant",
                "metadata": {"name": f"p-{name}", "namespace": ns},
                "spec": {"federationRef": {"name": name, "namespace": coord},
                         "data": {"pvc": {"claimName": "crm", "path": "leads.csv"}, "mapping": {"converted": "Converted"}}},
            })
    return docs, [coord, *tenants]


def rss_kib(pid: int) -> tuple[int, int]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def all_children_exist(kubectl: Kubectl, prefix: str, federations: int, participants: int) -> bool:
    coord = coordinator_namespace(prefix)
    sts = [s for s in kubectl.items("statefulsets", namespace=coord)]
    if len(sts) < federations:
        return False
    jobs = [j for j in kubectl.items("jobs", selector="fedcrm.io/role=training") if j["metadata"]["namespace"].startswith(prefix)]
    pods = [p for p in kubectl.items("pods", selector="fedcrm.io/role=training")
            if p["metadata"]["namespace"].startswith(prefix) and p["spec"].get("nodeName")]
    policies = [n for n in kubectl.items("networkpolicies") if n["metadata"]["namespace"].startswith(prefix)]
    want = federations * participants
    return len(jobs) >= want and len(pods) >= want and len(policies) >= want + federations


# ---------------------------------------------------------------- Prometheus text, parsed just enough

def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """``{sorted label pairs: value}`` of one metric family's samples in Prometheus text format."""
    out: dict[tuple[tuple[str, str], ...], float] = {}
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        labels: dict[str, str] = {}
        if "{" in head:
            for part in head[head.index("{") + 1:head.rindex("}")].split('",'):
                if "=" in part:
                    key, _, val = part.partition("=")
                    labels[key.strip().lstrip(",")] = val.strip().strip('"')
        out[tuple(sorted(labels.items()))] = float(value)
    return out


def delta(after: dict[Any, float], before: dict[Any, float]) -> dict[Any, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}


def quantile(q: float, buckets: dict[float, float]) -> float:
    """``histogram_quantile``: linear interpolation inside the bucket (cumulative counts by upper bound)."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0.0
    if total <= 0:
        return 0.0
    rank, lower, below = q * total, 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower  # beyond the last finite bucket: its bound is the best lower estimate
            return lower + (bound - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = bound, count
    return lower


def latency(before: str, after: str, resource: str) -> dict[str, float]:
    """Passes of ``resource`` between two scrapes of the operator's metrics, and their p50/p99 in ms."""
    name = "fedcrm_operator_reconcile_seconds_bucket"
    diff = delta(samples(after, name), samples(before, name))
    buckets = {float(dict(k)["le"]): v for k, v in diff.items() if dict(k).get("resource") == resource}
    if not buckets:
        return {"passes": 0, "p50_ms": 0.0, "p99_ms": 0.0}
    return {"passes": int(max(buckets.values())), "p50_ms": round(1000 * quantile(0.5, buckets), 1),
            "p99_ms": round(1000 * quantile(0.99, buckets), 1)}


def apiserver_metrics(kubectl: Kubectl) -> str:
    return kubectl("get", "--raw", "/metrics").stdout


def _operator_reconciles(operator: OperatorProcess) -> int:
    return int(sum(samples(operator.metrics(), "fedcrm_operator_reconciles_total").values()))


# ---------------------------------------------------------------- the timeline of one scenario

def _timestamp(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _events(audit_log: Path, start: float, prefix: str) -> list[dict[str, Any]]:
    """Every audited request, of any client, that names a namespace of the scenario and completed after ``start``."""
    out = []
    with open(audit_log, encoding="utf-8") as lines:
        for line in lines:
            event = json.loads(line)
            namespace = (event.get("objectRef") or {}).get("namespace") or ""
            if (event.get("stage") == "ResponseComplete" and namespace.startswith(prefix + "-")
                    and _timestamp(event["stageTimestamp"]) >= start):
                out.append(event)
    return out


def timeline(audit_log: Path, prefix: str, start: float, applied_s: float, seen_s: float, enrolled_at: list[float]
             ) -> dict[str, Any]:
    """Where the seconds from ``kubectl apply`` to every child went, from the audit log (seconds after ``start``,
    the moment the apply began; each request counted when its response completed).

    The operator's part ends with its last write of a Job or StatefulSet (the children that take longest; every
    other child is written before them in a pass); what follows, until the last training pod is bound to a node,
    is the job controller's and the scheduler's; what follows that is this benchmark's polling."""
    events = _events(audit_log, start, prefix)

    def at(event: dict[str, Any]) -> float:
        return round(_timestamp(event["stageTimestamp"]) - start, 2)

    def span(picked: list[dict[str, Any]]) -> list[float | None]:
        times = sorted(at(e) for e in picked if str(e.get("responseStatus", {}).get("code", 200)).startswith("2"))
        return [times[0], times[-1]] if times else [None, None]

    def ref(e: dict[str, Any]) -> dict[str, Any]:
        return e.get("objectRef") or {}

    operator = [e for e in events if e.get("user", {}).get("username") == OPERATOR_USER]
    others = [e for e in events if e.get("user", {}).get("username") != OPERATOR_USER]
    writes = [e for e in operator if e["verb"] in ("create", "patch", "update") and not ref(e).get("subresource")]
    children = [e for e in writes if ref(e).get("resource") in CHILD_RESOURCES]
    jobs = [e for e in children if ref(e).get("resource") == "jobs"]
    sets = [e for e in children if ref(e).get("resource") == "statefulsets"]
    status = [e for e in operator if ref(e).get("subresource") == "status" and e["verb"] == "patch"]
    pods = [e for e in others if e["verb"] == "create" and ref(e).get("resource") == "pods" and not ref(e).get("subresource")]
    bound = [e for e in others if e["verb"] == "create" and ref(e).get("subresource") == "binding"]
    operator_done = max((t for t in (span(jobs)[1], span(sets)[1]) if t is not None), default=None)
    last_bound = span(bound)[1]
    out: dict[str, Any] = {
        "apply_done_s": round(applied_s, 2),
        "participant_status_patches_s": span([e for e in status if ref(e).get("resource") == "participants"]),
        "federation_status_patches_s": span([e for e in status if ref(e).get("resource") == "federations"]),
        "operator_child_writes_s": span(children),
        "operator_jobs_s": span(jobs),
        "enrollment_closed_s": [round(t - start, 2) for t in sorted(enrolled_at)[:1] + sorted(enrolled_at)[-1:]] or [None, None],
        "statefulsets_s": span(sets),
        "pods_created_s": span(pods),
        "pods_bound_s": span(bound),
        "all_children_seen_s": round(seen_s, 2),
        "operator_requests": len(operator),
        "operator_writes": len(writes),
        "operator_requests_by_verb_resource": dict(collections.Counter(_what(e) for e in operator).most_common(12)),
    }
    if operator_done is not None and last_bound is not None:
        end = max(operator_done, last_bound)
        out["breakdown_s"] = {
            "kubectl_apply": round(applied_s, 2),
            "operator_after_apply": round(max(0.0, operator_done - applied_s), 2),
            "controllers_after_operator": round(max(0.0, last_bound - max(operator_done, applied_s)), 2),
            "benchmark_polling": round(max(0.0, seen_s - max(end, applied_s)), 2),
        }
    return out


def enrolled_times(kubectl: Kubectl, namespace: str) -> list[float]:
    """When each Federation of ``namespace`` closed enrolment (its Enrolled condition's transition, to the second)."""
    out = []
    for fed in kubectl.items("federations", namespace=namespace):
        for cond in (fed.get("status") or {}).get("conditions") or []:
            if cond.get("type") == "Enrolled" and cond.get("status") == "True" and cond.get("lastTransitionTime"):
                out.append(_timestamp(cond["lastTransitionTime"]))
    return out


# ---------------------------------------------------------------- scenarios

def run_scenario(kubectl: Kubectl, operator: OperatorProcess, audit_log: Path, prefix: str, federations: int,
                 participants: int, namespaces: int | None) -> dict[str, Any]:
    docs, all_namespaces = manifests(prefix, federations, participants, namespaces)
    tenants = all_namespaces[1:]  # the coordinator namespace, all_namespaces[0], install_chart created (its Role is there)
    for ns in tenants:
        kubectl("create", "namespace", ns)
        provide_claim(kubectl, ns, "crm")
    # Each tenant's consent, as `helm install` of the tenant chart gives it: without it every Participant would
    # sit at AccessNotGranted and no child would ever exist in a tenant namespace.
    for doc in docs:
        if doc["kind"] == "Participant":
            ref = doc["spec"]["federationRef"]
            grant_tenant_access(kubectl, doc["metadata"]["namespace"], (ref["namespace"], ref["name"]), doc["metadata"]["name"])
    reconciles_before, metrics_before = _operator_reconciles(operator), operator.metrics()
    started, wall = time.perf_counter(), time.time()
    kubectl.apply(*docs, server_side=True, timeout=600)
    applied = time.perf_counter() - started
    wait_for(f"{prefix}: every child", lambda: all_children_exist(kubectl, prefix, federations, participants),
             timeout=900, interval=0.5)
    elapsed = time.perf_counter() - started
    rss, peak = rss_kib(operator.proc.pid)  # type: ignore[union-attr]
    metrics_after = operator.metrics()
    federation_passes = latency(metrics_before, metrics_after, "federation")
    time.sleep(1)  # the audit backend writes a request's line when its response completes
    steps = timeline(audit_log, prefix, wall, applied, elapsed, enrolled_times(kubectl, coordinator_namespace(prefix)))
    participant_passes = latency(metrics_before, metrics_after, "participant")
    return {
        "scenario": f"{federations} federation(s) x {participants} participants in {len(tenants)} namespaces",
        "federations": federations,
        "participants_per_federation": participants,
        "tenant_namespaces": len(tenants),
        "objects_applied": len(docs),
        "apply_s": round(applied, 2),
        "apply_to_all_children_s": round(elapsed, 2),
        "per_participant_ms": round(1000 * elapsed / (federations * participants), 1),
        "operator_reconciles": _operator_reconciles(operator) - reconciles_before,
        "federation_pass_p50_ms": federation_passes["p50_ms"],
        "federation_pass_p99_ms": federation_passes["p99_ms"],
        "participant_pass_p50_ms": participant_passes["p50_ms"],
        "participant_pass_p99_ms": participant_passes["p99_ms"],
        "operator_rss_mib": round(rss / 1024, 1),
        "operator_peak_rss_mib": round(peak / 1024, 1),
        # Where the seconds went: the apply, the operator after it, the controllers (job controller, scheduler)
        # after the operator, this benchmark's polling; they add up to apply_to_all_children_s.
        **{f"{part}_s": seconds for part, seconds in (steps.get("breakdown_s") or {}).items() if part != "kubectl_apply"},
        "timeline": steps,
    }




def audited_requests(audit_log: Path, start: float, end: float) -> list[dict[str, Any]]:
    """The operator's requests received in [start, end) (epoch seconds), one audit event each."""
    out = []
    with open(audit_log, encoding="utf-8") as lines:
        for line in lines:
            event = json.loads(line)
            if event.get("user", {}).get("username") != OPERATOR_USER or event.get("stage") != "ResponseComplete":
                continue
            if start <= _timestamp(event["requestReceivedTimestamp"]) < end:
                out.append(event)
    return out


def _what(event: dict[str, Any]) -> str:
    ref = event.get("objectRef") or {}
    resource = ref.get("resource", event.get("requestURI", "?").split("?")[0])
    if ref.get("subresource"):
        resource += "/" + ref["subresource"]
    return f"{event['verb']} {resource}"


def idle_window(kubectl: Kubectl, operator: OperatorProcess, audit_log: Path, scenarios: list[tuple[str, int, int, int | None]],
                rows: list[dict[str, Any]], *, settle_s: float, window_s: float) -> dict[str, Any]:
    """Nothing applied for ``window_s`` after ``settle_s``: the operator's requests per minute per Federation."""
    time.sleep(settle_s)
    server_before, operator_before = apiserver_metrics(kubectl), operator.metrics()
    start = time.time()
    time.sleep(window_s)
    end = time.time()
    server_after, operator_after = apiserver_metrics(kubectl), operator.metrics()
    time.sleep(2)  # the audit backend writes a request's line when its response completes
    events = audited_requests(audit_log, start, end)
    minutes = max(end - start, 1e-3) / 60  # --idle 0: no window, and no division by zero
    federations = sum(f for _, f, _, _ in scenarios)
    by_what = collections.Counter(_what(e) for e in events)
    by_scope = collections.Counter(
        next((prefix for prefix, *_ in scenarios if ((e.get("objectRef") or {}).get("namespace") or "").startswith(prefix + "-")),
             "cluster-scoped") for e in events)
    for row, (prefix, feds, _, _) in zip(rows, scenarios):
        row["idle_requests_per_federation_minute"] = round(by_scope[prefix] / feds / minutes, 2)
    server = delta(samples(server_after, "apiserver_request_total"), samples(server_before, "apiserver_request_total"))
    server_by_what = collections.Counter()
    for labels, value in server.items():
        d = dict(labels)
        resource = d.get("resource", "") + (f"/{d['subresource']}" if d.get("subresource") else "")
        server_by_what[f"{d.get('verb', '?')} {resource}"] += value
    return {
        "window_s": round(end - start, 1),
        "settle_s": settle_s,
        "federations": federations,
        "participants": sum(f * p for _, f, p, _ in scenarios),
        "source": "API server audit log, operator's ServiceAccount only",
        "operator_requests": len(events),
        "requests_per_federation_minute": round(len(events) / federations / minutes, 2),
        "cluster_scoped_per_minute": round(by_scope["cluster-scoped"] / minutes, 2),
        "by_verb_resource_per_minute": {k: round(v / minutes, 2) for k, v in by_what.most_common()},
        "apiserver_request_total_all_clients": int(sum(server.values())),
        "apiserver_request_total_per_minute_by_verb_resource": {
            k: round(v / minutes, 2) for k, v in server_by_what.most_common(15)},
        "federation_pass": latency(operator_before, operator_after, "federation"),
        "participant_pass": latency(operator_before, operator_after, "participant"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--quick", action="store_true", help="one small scenario (1 federation x 3 participants)")
    parser.add_argument("--idle", type=float, help="seconds of the idle window (default 120; 30 with --quick)")
    parser.add_argument("--only", choices=["wide", "issue"], help="run only this scenario (1 x 50, or 20 x 10)")
    parser.add_argument("--operator-log", type=Path, help="keep the operator's log here")
    parser.add_argument("--audit-log", type=Path, help="keep the API server's audit log here")
    args = parser.parse_args()
    scenarios: list[tuple[str, int, int, int | None]] = (
        [("wide", 1, 3, None)] if args.quick else [("wide", 1, 50, None), ("issue", 20, 10, 50)])
    scenarios = [s for s in scenarios if args.only in (None, s[0])]
    window = args.idle if args.idle is not None else (30.0 if args.quick else 120.0)
    load_start = os.getloadavg()[0]  # the machine is shared: how busy it was is part of the result
    with tempfile.TemporaryDirectory(prefix="fedcrm-bench-") as tmp, AuditedControlPlane(gpu_nodes=2, cpu_nodes=2) as cp:
        kubectl = Kubectl(cp.bin_dir / "kubectl", cp.kubeconfig)
        install_chart(cp.bin_dir / "helm", cp.kubeconfig,
                      coordinator_namespaces=tuple(coordinator_namespace(prefix) for prefix, *_ in scenarios))
        operator = OperatorProcess(service_account_kubeconfig(kubectl, cp.kubeconfig, Path(tmp) / "sa.kubeconfig"), Path(tmp),
                                   env={"FEDCRM_AGGREGATOR_STATUS_URL": "http://127.0.0.1:9/status"}).start()
        try:
            idle_rss, _ = rss_kib(operator.proc.pid)  # type: ignore[union-attr]
            results = [run_scenario(kubectl, operator, cp.audit_log, *scenario) for scenario in scenarios]
            idle = idle_window(kubectl, operator, cp.audit_log, scenarios, results,
                               settle_s=10.0 if args.quick or window < 30 else 30.0, window_s=window)
            rss, peak = rss_kib(operator.proc.pid)  # type: ignore[union-attr]
        except Exception as err:
            print(f"operator benchmark failed: {err}\noperator log (tail):\n{operator.log_tail()}", file=sys.stderr)
            return 1
        finally:
            operator.stop()
            if args.operator_log:
                shutil.copyfile(operator.log_path, args.operator_log)
            if args.audit_log:
                shutil.copyfile(cp.audit_log, args.audit_log)
    idle |= {"operator_rss_mib": round(rss / 1024, 1), "operator_peak_rss_mib": round(peak / 1024, 1)}
    timelines = {r["scenario"]: r.pop("timeline") for r in results}  # the rows stay flat numbers
    out = {"benchmark": "operator", "quick": args.quick, "load_average_1m": {"start": load_start, "end": os.getloadavg()[0]},
           "operator_idle_rss_mib": round(idle_rss / 1024, 1),
           "results": results, "timelines": timelines, "idle": idle}
    print(json.dumps(out, indent=2))
    print()
    print(f"{'scenario':<58}{'apply->children s':>18}{'fed pass p50/p99 ms':>21}{'RSS (peak) MiB':>16}{'idle req/fed/min':>18}")
    for r in results:
        print(f"{r['scenario']:<58}{r['apply_to_all_children_s']:>18}"
              f"{str(r['federation_pass_p50_ms']) + '/' + str(r['federation_pass_p99_ms']):>21}"
              f"{str(r['operator_rss_mib']) + ' (' + str(r['operator_peak_rss_mib']) + ')':>16}"
              f"{r['idle_requests_per_federation_minute']:>18}")
    print()
    print(f"{'where the seconds went (from the audit log)':<58}{'apply':>8}{'operator':>10}{'controllers':>13}{'polling':>9}")
    for r in results:
        b = timelines[r["scenario"]].get("breakdown_s") or {}
        print(f"{r['scenario']:<58}{b.get('kubectl_apply', '-'):>8}{b.get('operator_after_apply', '-'):>10}"
              f"{b.get('controllers_after_operator', '-'):>13}{b.get('benchmark_polling', '-'):>9}")
    print(f"idle, all {idle['federations']} federations: {idle['requests_per_federation_minute']} requests/min each "
          f"({idle['operator_requests']} in {idle['window_s']} s; cluster-scoped {idle['cluster_scoped_per_minute']}/min)")
    print(f"operator idle RSS before any federation: {out['operator_idle_rss_mib']} MiB")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
