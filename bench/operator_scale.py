"""How fast the operator turns applied manifests into children, against a real control plane.

Scenarios (each on a fresh set of namespaces of one running control plane):
  - 1 federation x 50 participants (50 tenant namespaces)
  - 20 federations x 5 participants (the same 5 tenant namespaces)
  - with --quick only 1 federation x 3 participants (a smoke test, about a minute)
Each scenario's coordinator namespace is one of the chart's coordinatorNamespaces
(created before `helm install`, as the chart requires), and every tenant
namespace grants the operator access for each of its Participants as the tenant
chart would (`grant_tenant_access`), before the clock starts.
For each: seconds from `kubectl apply` of every manifest to every child
existing (per participant: certificate Secret, ConfigMap, NetworkPolicy, Job
with its pod bound to a node; per federation: CA and server Secrets,
Services, NetworkPolicy, aggregator StatefulSet), the API requests the
operator made, and the operator's resident memory (current and peak).

    .venv/bin/python bench/operator_scale.py [--quick] [--json bench/results/operator.json]

If the operator or the control plane fails, the script exits non-zero with the
operator's log tail; it never writes a partial result.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "e2e"), str(ROOT / "tests")]

from controlplane import ControlPlane  # noqa: E402
from operator_harness import (  # noqa: E402
    Kubectl,
    OperatorProcess,
    grant_tenant_access,
    install_chart,
    provide_claim,
    service_account_kubeconfig,
    wait_for,
)

TASK = {"target": "converted", "features": [{"name": "revenue", "type": "numeric"}]}


def coordinator_namespace(prefix: str) -> str:
    return f"{prefix}-coord"


def manifests(prefix: str, federations: int, participants: int) -> tuple[list[dict[str, Any]], list[str]]:
    coord = coordinator_namespace(prefix)
    tenants = [f"{prefix}-t{i:02d}" for i in range(participants)]
    docs: list[dict[str, Any]] = []
    for f in range(federations):
        name = f"fed{f:02d}"
        docs.append({
            "apiVersion": "fedcrm.io/v1alpha1", "kind": "Federation",
            "metadata": {"name": name, "namespace": coord},
            "spec": {"task": TASK, "training": {"minParticipants": 2}, "participants": {"namespaces": tenants}},
        })
        for ns in tenants:
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


def run_scenario(kubectl: Kubectl, operator: OperatorProcess, prefix: str, federations: int, participants: int) -> dict[str, Any]:
    docs, namespaces = manifests(prefix, federations, participants)
    tenants = namespaces[1:]  # the coordinator namespace, namespaces[0], install_chart created (its Role is there)
    for ns in tenants:
        kubectl("create", "namespace", ns)
        provide_claim(kubectl, ns, "crm")
    # Each tenant's consent, as `helm install` of the tenant chart gives it: without it every Participant would
    # sit at AccessNotGranted and no child would ever exist in a tenant namespace.
    for doc in docs:
        if doc["kind"] == "Participant":
            ref = doc["spec"]["federationRef"]
            grant_tenant_access(kubectl, doc["metadata"]["namespace"], (ref["namespace"], ref["name"]), doc["metadata"]["name"])
    reconciles_before = _operator_reconciles(operator)
    started = time.perf_counter()
    kubectl.apply(*docs)
    applied = time.perf_counter() - started
    wait_for(f"{prefix}: every child", lambda: all_children_exist(kubectl, prefix, federations, participants),
             timeout=900, interval=0.5)
    elapsed = time.perf_counter() - started
    rss, peak = rss_kib(operator.proc.pid)  # type: ignore[union-attr]
    return {
        "scenario": f"{federations} federation(s) x {participants} participants",
        "federations": federations,
        "participants_per_federation": participants,
        "objects_applied": len(docs),
        "apply_s": round(applied, 2),
        "apply_to_all_children_s": round(elapsed, 2),
        "per_participant_ms": round(1000 * elapsed / (federations * participants), 1),
        "operator_reconciles": _operator_reconciles(operator) - reconciles_before,
        "operator_rss_mib": round(rss / 1024, 1),
        "operator_peak_rss_mib": round(peak / 1024, 1),
    }


def _operator_reconciles(operator: OperatorProcess) -> int:
    total = 0.0
    for line in operator.metrics().splitlines():
        if line.startswith("fedcrm_operator_reconciles_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--quick", action="store_true", help="one small scenario (1 federation x 3 participants)")
    args = parser.parse_args()
    scenarios = [("wide", 1, 3)] if args.quick else [("wide", 1, 50), ("many", 20, 5)]
    with tempfile.TemporaryDirectory(prefix="fedcrm-bench-") as tmp, ControlPlane(gpu_nodes=2, cpu_nodes=2) as cp:
        kubectl = Kubectl(cp.bin_dir / "kubectl", cp.kubeconfig)
        install_chart(cp.bin_dir / "helm", cp.kubeconfig,
                      coordinator_namespaces=tuple(coordinator_namespace(prefix) for prefix, _, _ in scenarios))
        operator = OperatorProcess(service_account_kubeconfig(kubectl, cp.kubeconfig, Path(tmp) / "sa.kubeconfig"), Path(tmp)).start()
        try:
            idle_rss, _ = rss_kib(operator.proc.pid)  # type: ignore[union-attr]
            results = [run_scenario(kubectl, operator, *scenario) for scenario in scenarios]
        except Exception as err:
            print(f"operator benchmark failed: {err}\noperator log (tail):\n{operator.log_tail()}", file=sys.stderr)
            return 1
        finally:
            operator.stop()
    out = {"benchmark": "operator", "quick": args.quick, "operator_idle_rss_mib": round(idle_rss / 1024, 1), "results": results}
    print(json.dumps(out, indent=2))
    print()
    print(f"{'scenario':<36}{'apply->children s':>18}{'per participant ms':>20}{'reconciles':>12}{'RSS MiB':>9}{'peak MiB':>10}")
    for r in results:
        print(f"{r['scenario']:<36}{r['apply_to_all_children_s']:>18}{r['per_participant_ms']:>20}"
              f"{r['operator_reconciles']:>12}{r['operator_rss_mib']:>9}{r['operator_peak_rss_mib']:>10}")
    print(f"operator idle RSS: {out['operator_idle_rss_mib']} MiB")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
