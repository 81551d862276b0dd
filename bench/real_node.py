"""What Kubernetes costs a federation: the walkthrough's scenario on a real node, against `fedcrm run`.

Runs e2e/scenario.py (the commands of docs/walkthrough.md) on the real-node
harness of e2e/realnode.py and times, side by side in one run:

    images (warm)      tools/build-images when nothing changed (a cache hit)
    cluster start      control plane, containerd, image import, kubelet, DNS, kube-proxy, kube-router
    apply -> Running   kubectl apply of the Federation until every training pod runs
    apply -> Succeeded the same Federation trained in pods to the end
    fedcrm run         the same federation (same data, rounds, DP and secure aggregation) as local processes

and reports the Kubernetes overhead as the ratio of the last two. Needs root
(a network namespace, mounts, cgroups), like the e2e test.

    python bench/real_node.py [--quick] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "e2e"))

from images import current_images  # noqa: E402
from realnode import RealNodeCluster  # noqa: E402
from scenario import (  # noqa: E402
    TENANTS,
    apply_federation,
    install_operator,
    items,
    phase,
    provide_tenants,
    status,
    synthesise,
)


def _timed(fn: Any) -> tuple[Any, float]:
    began = time.monotonic()
    value = fn()
    return value, time.monotonic() - began


def _local_run(synthetic: Path, in_cluster: dict[str, Any], out: Path) -> float:
    """``fedcrm run`` of the federation the cluster trained: same task, rounds and privacy; each tenant's rows
    from its CSV (the SQL tenant's database was loaded from the same file)."""
    fed = dict(in_cluster)
    # The participants' manifests name the Federation as fedcrm synth wrote it.
    fed["metadata"] = yaml.safe_load((synthetic / "federation.yaml").read_text())["metadata"]
    path = out / "federation.yaml"
    path.write_text(yaml.safe_dump(fed))
    participants = [synthetic / "participants" / f"{ns}.yaml" for ns in TENANTS]
    began = time.monotonic()
    run = subprocess.run([str(ROOT / ".venv" / "bin" / "fedcrm"), "run", "--federation", str(path), "--participant",
                          *map(str, participants), "--out", str(out / "run")], capture_output=True, text=True,
                         timeout=1800)
    if run.returncode != 0:
        raise SystemExit(f"fedcrm run failed ({run.returncode}):\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}")
    return time.monotonic() - began


def measure(work: Path) -> dict[str, Any]:
    _, images_warm = _timed(lambda: current_images(build=True))
    cluster = RealNodeCluster(images=current_images())
    _, start = _timed(cluster.start)
    try:
        synthetic = synthesise(work / "synthetic")
        install_operator(cluster)
        provide_tenants(cluster, synthetic)
        applied = time.monotonic()
        fed = apply_federation(cluster, synthetic)
        cluster.wait_for("training pods Running", lambda: all(
            any(p["status"].get("phase") in ("Running", "Succeeded") for p in items(cluster, "pods", ns, "fedcrm.io/role=training"))
            for ns in TENANTS), timeout=600, every=0.5)
        running = time.monotonic() - applied
        cluster.wait_for("the Federation finished", lambda: phase(cluster) in ("Succeeded", "Failed"), timeout=1800, every=1)
        in_pods = time.monotonic() - applied
        final = status(cluster)
        if final.get("phase") != "Succeeded":
            raise SystemExit(f"the Federation did not succeed: {json.dumps(final)[:2000]}")
        timings = dict(cluster.timings)
    finally:
        cluster.stop()
    local = _local_run(synthetic, fed, work)
    return {
        "images_warm_s": round(images_warm, 2),
        "cluster_start_s": round(start, 2),
        "cluster_start_steps_s": timings,
        "apply_to_training_pods_running_s": round(running, 2),
        "federation_in_pods_s": round(in_pods, 2),
        "federation_fedcrm_run_s": round(local, 2),
        "kubernetes_overhead_ratio": round(in_pods / local, 2),
        "rounds": final.get("round"),
        "epsilon_spent": final.get("epsilonSpent"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="accepted for symmetry with the other benchmarks: the "
                        "scenario is already smoke-sized (3 tenants x 500 rows, 6 rounds)")
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedcrm-bench-real-node-") as tmp:
        result = measure(Path(tmp))
    rows = [("make images, nothing changed", result["images_warm_s"]),
            ("cluster with a real node: start", result["cluster_start_s"]),
            ("kubectl apply -> every training pod Running", result["apply_to_training_pods_running_s"]),
            ("kubectl apply -> Federation Succeeded", result["federation_in_pods_s"]),
            ("fedcrm run, same federation", result["federation_fedcrm_run_s"])]
    for label, seconds in rows:
        print(f"{label:<46} {seconds:8.1f} s")
    print(f"{'in pods / fedcrm run':<46} {result['kubernetes_overhead_ratio']:8.2f} x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
