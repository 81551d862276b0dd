"""The test control plane itself: real scheduling onto KWOK nodes, real controllers."""

from __future__ import annotations

import json
from typing import Any

import pytest
from controlplane import GPU_LABEL, ControlPlane
from operator_harness import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def _pod(name: str, namespace: str, limits: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace},
            "spec": {"containers": [{"name": "c", "image": "busybox",
                                     "resources": {"requests": limits, "limits": limits}}]}}


def _get(cp: ControlPlane, *args: str) -> Any:
    return json.loads(cp.kubectl("get", *args, "-o", "json").stdout)


def test_nodes_advertise_gpus_and_pods_land_where_they_fit(control_plane: ControlPlane) -> None:
    cp = control_plane
    nodes = {n["metadata"]["name"]: n for n in _get(cp, "nodes")["items"]}
    gpu_nodes = {n for n, obj in nodes.items() if obj["metadata"]["labels"].get(GPU_LABEL) == "true"}
    assert len(gpu_nodes) == 2 and all(nodes[n]["status"]["allocatable"]["nvidia.com/gpu"] == "8" for n in gpu_nodes)
    cp.kubectl("create", "namespace", "harness")
    cp.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": [
        _pod("gpu", "harness", {"cpu": "1", "memory": "1Gi", "nvidia.com/gpu": "4"}),
        _pod("cpu", "harness", {"cpu": "1", "memory": "1Gi"}),
        _pod("too-big", "harness", {"cpu": "1", "memory": "1Gi", "nvidia.com/gpu": "9"}),
    ]}))
    wait_for("pods running", lambda: all(
        _get(cp, "pod", name, "-n", "harness")["status"].get("phase") == "Running" for name in ("gpu", "cpu")
    ), timeout=60)
    assert _get(cp, "pod", "gpu", "-n", "harness")["spec"]["nodeName"] in gpu_nodes
    assert _get(cp, "pod", "cpu", "-n", "harness")["spec"]["nodeName"] in nodes
    too_big = wait_for("the scheduler's verdict", lambda: [
        c for c in _get(cp, "pod", "too-big", "-n", "harness")["status"].get("conditions", []) if c["type"] == "PodScheduled"
    ])
    assert too_big[0]["status"] == "False" and "nvidia.com/gpu" in too_big[0]["message"]


def test_controllers_run_jobs_and_finish_namespace_deletion(control_plane: ControlPlane) -> None:
    cp = control_plane
    cp.kubectl("create", "namespace", "harness-jobs")
    cp.kubectl("create", "job", "once", "-n", "harness-jobs", "--image=busybox")
    wait_for("the job to complete", lambda: any(
        c["type"] == "Complete" and c["status"] == "True"
        for c in _get(cp, "job", "once", "-n", "harness-jobs").get("status", {}).get("conditions", [])
    ), timeout=60)
    cp.kubectl("delete", "namespace", "harness-jobs", "--wait=true", "--timeout=60s")
    assert cp.kubectl("get", "namespace", "harness-jobs", check=False).returncode != 0
