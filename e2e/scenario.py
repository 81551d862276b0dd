"""The platform team's scenario on a real node, step by step: what docs/walkthrough.md tells people to run.

Shared by ``tests/test_real_node.py`` (which then checks every promise) and
``bench/real_node.py`` (which times it against ``fedcrm run``), so both run
exactly the same thing.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml
from images import image_refs, postgres_image
from realnode import RealNodeCluster

ROOT = Path(__file__).resolve().parents[1]

OPERATOR_NS = "fedcrm-system"
FED_NS = "fedcrm"
FEDERATION = "lead-conversion"
TENANTS = ["tenant-01", "tenant-02", "tenant-03"]
SQL_TENANT = "tenant-02"  # reads a PostgreSQL running as a pod in its own namespace; the others a CSV on a volume
DB_PASSWORD = "e2e-only-not-a-secret"
ROUNDS = 6
GRPC_PORT, METRICS_PORT = 8443, 9090
# The node has 2 CPUs: three training pods, the aggregator (the chart's default 1 CPU), the operator and DNS
# must fit side by side, so the Federation asks for small training pods (the chart stays as shipped).
TRAINING_RESOURCES = {"cpu": "250m", "memory": "1536Mi"}


def load(cluster: RealNodeCluster, *docs: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))


def get(cluster: RealNodeCluster, kind: str, name: str, namespace: str) -> dict[str, Any] | None:
    proc = cluster.kubectl("get", kind, name, "-n", namespace, "-o", "json", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def items(cluster: RealNodeCluster, kind: str, namespace: str, selector: str = "") -> list[dict[str, Any]]:
    args = ["get", kind, "-n", namespace, "-o", "json"] + (["-l", selector] if selector else [])
    return json.loads(cluster.kubectl(*args).stdout)["items"]


def create_namespace(cluster: RealNodeCluster, name: str) -> None:
    """``kubectl create namespace``, as the walkthrough says; one left by an earlier run against the same
    cluster (FEDCRM_E2E_CLUSTER) is fine."""
    if get(cluster, "namespace", name, "default") is None:
        cluster.kubectl("create", "namespace", name)


def phase(cluster: RealNodeCluster) -> str | None:
    fed = get(cluster, "federation", FEDERATION, FED_NS)
    return ((fed or {}).get("status") or {}).get("phase")


def status(cluster: RealNodeCluster) -> dict[str, Any]:
    return ((get(cluster, "federation", FEDERATION, FED_NS) or {}).get("status") or {})


def aggregator_pod(cluster: RealNodeCluster) -> dict[str, Any] | None:
    pods = items(cluster, "pods", FED_NS, "fedcrm.io/role=aggregator")
    return pods[0] if pods else None


def synthesise(out: Path) -> Path:
    subprocess.run([str(ROOT / ".venv" / "bin" / "fedcrm"), "synth", "--clients", str(len(TENANTS)), "--rows", "500",
                    "--rounds", str(ROUNDS), "--out", str(out)], check=True, capture_output=True, text=True, timeout=300)
    return out


def install_operator(cluster: RealNodeCluster) -> dict[str, str]:
    """``helm install`` of the operator chart with the locally built images; the operator runs as a pod."""
    refs = image_refs()
    repository, tag = refs["operator"].rsplit(":", 1)
    cluster.helm(
        "upgrade", "--install", "fedcrm", str(ROOT / "charts" / "fedcrm-operator"), "--namespace", OPERATOR_NS, "--create-namespace",
        "--set", f"image.repository={repository}", "--set", f"image.tag={tag}",
        "--set", f"runtimeImages.node={refs['node']}", "--set", f"runtimeImages.aggregator={refs['aggregator']}",
        "--wait", "--timeout", "4m", timeout=300,
    )
    return refs


def provide_tenants(cluster: RealNodeCluster, synthetic: Path) -> dict[str, dict[str, Any]]:
    """Each tenant's CRM data where it lives (an export on a PersistentVolume the admin provided, or a PostgreSQL
    in its namespace), then ``helm install`` of the tenant chart."""
    for ns in (FED_NS, "monitoring"):
        create_namespace(cluster, ns)
    participants: dict[str, dict[str, Any]] = {}
    for ns in TENANTS:
        manifest = yaml.safe_load((synthetic / "participants" / f"{ns}.yaml").read_text())
        volume = cluster.dir / "volumes" / ns
        volume.mkdir(parents=True, exist_ok=True)
        shutil.copy(synthetic / "data" / ns / "leads.csv", volume / "leads.csv")
        os.chmod(volume, 0o755)
        os.chmod(volume / "leads.csv", 0o644)
        create_namespace(cluster, ns)
        if ns != SQL_TENANT:
            load(cluster,
              {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": f"{ns}-crm-data"},
               "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadOnlyMany"], "storageClassName": "tenant-data",
                        "hostPath": {"path": str(volume), "type": "Directory"},
                        "claimRef": {"namespace": ns, "name": "crm-data"}}},
              {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "crm-data", "namespace": ns},
               "spec": {"accessModes": ["ReadOnlyMany"], "storageClassName": "tenant-data",
                        "resources": {"requests": {"storage": "1Gi"}}}})
        data = dict(manifest["spec"]["data"])
        data.pop("file")
        values: dict[str, Any] = {"participant": {"name": manifest["metadata"]["name"],
                                                  "federation": {"name": FEDERATION, "namespace": FED_NS}, "data": data}}
        if ns == SQL_TENANT:
            host = postgres_with_leads(cluster, ns, volume / "leads.csv")
            data["sql"] = {"query": "SELECT * FROM leads", "secretRef": {"name": "crm-credentials"},
                           # The tenant declares where its database is; the operator turns it into egress.
                           "egress": [{"podSelector": {"app": "crm-postgres"}, "ports": [5432]}]}
            data["pvc"] = None  # the chart's default source is a claim: null removes it (Helm merges values)
            values["credentials"] = {"create": True, "name": "crm-credentials", "stringData": {
                "url": f"postgresql+psycopg://crm:{DB_PASSWORD}@{host}:5432/crm"}}
        else:
            data["pvc"] = {"claimName": "crm-data", "path": "leads.csv"}
        values_file = cluster.dir / f"{ns}-values.yaml"
        values_file.write_text(yaml.safe_dump(values))
        cluster.helm("upgrade", "--install", "crm", str(ROOT / "charts" / "fedcrm-tenant"), "--namespace", ns, "-f", str(values_file))
        participants[ns] = manifest
    # Checkpoint volumes for the aggregator's claim (no provisioner runs here, as in many on-premise clusters).
    for n in range(2):
        path = cluster.dir / "volumes" / f"checkpoints-{n}"
        path.mkdir(parents=True, exist_ok=True)
        os.chown(path, 65532, 65532)
        load(cluster, {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": f"checkpoints-{n}"},
                        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                                 "hostPath": {"path": str(path), "type": "Directory"}}})
    return participants


def postgres_with_leads(cluster: RealNodeCluster, namespace: str, csv_path: Path) -> str:
    """Debian's PostgreSQL as a pod in the tenant's namespace, its ``leads`` table loaded from the CRM export;
    returns the Service's DNS name."""
    archive, image = postgres_image()
    cluster.import_images({archive: image})
    start = ("set -e; printf '%s' \"$DB_PASSWORD\" > /tmp/pw; "
             "initdb -D /tmp/pg -U crm --pwfile=/tmp/pw --auth-local=trust --auth-host=scram-sha-256 >/dev/null; "
             "echo 'host all all 0.0.0.0/0 scram-sha-256' >> /tmp/pg/pg_hba.conf; "
             "exec postgres -D /tmp/pg -c listen_addresses='*' -c unix_socket_directories=/tmp")
    labels = {"app": "crm-postgres"}
    load(cluster,
          {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "crm-postgres", "namespace": namespace},
           "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": {"metadata": {"labels": labels}, "spec": {
               "containers": [{"name": "postgres", "image": image, "imagePullPolicy": "Never",
                               "command": ["sh", "-c", start], "env": [{"name": "DB_PASSWORD", "value": DB_PASSWORD}],
                               "ports": [{"name": "postgres", "containerPort": 5432}],
                               "readinessProbe": {"exec": {"command": ["pg_isready", "-h", "/tmp", "-U", "crm"]},
                                                  "periodSeconds": 2},
                               "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}]}],
               "volumes": [{"name": "tmp", "emptyDir": {}}]}}}},
          {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "crm-postgres", "namespace": namespace},
           "spec": {"selector": labels, "ports": [{"name": "postgres", "port": 5432}]}})
    cluster.kubectl("rollout", "status", "deployment/crm-postgres", "-n", namespace, "--timeout=120s", timeout=130)
    with csv_path.open(newline="") as f:
        reader = csv.DictReader(f)
        rows, columns = list(reader), list(reader.fieldnames or [])

    def sql_type(column: str) -> str:
        values = {r[column] for r in rows if r[column] != ""}
        if values <= {"true", "false"}:
            return "boolean"
        try:
            [float(v) for v in values]
        except ValueError:
            return "text"
        return "double precision"

    ddl = ", ".join(f'"{c}" {sql_type(c)}' for c in columns)
    script = (f"CREATE DATABASE crm;\n\\connect crm\nCREATE TABLE leads ({ddl});\n"
              "\\copy leads FROM STDIN WITH (FORMAT csv, HEADER true)\n" + csv_path.read_text() + "\\.\n")
    cluster.kubectl("exec", "-i", "deploy/crm-postgres", "-n", namespace, "--", "psql", "-h", "/tmp", "-U", "crm",
                    "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-q", input=script, timeout=60)
    return f"crm-postgres.{namespace}.svc.cluster.local"


def apply_federation(cluster: RealNodeCluster, synthetic: Path) -> dict[str, Any]:
    """``kubectl apply`` of the Federation: secure aggregation and sample-level DP on."""
    fed = yaml.safe_load((synthetic / "federation.yaml").read_text())
    fed["metadata"] = {"name": FEDERATION, "namespace": FED_NS}
    fed["spec"]["participants"] = {"namespaces": TENANTS}
    fed["spec"]["training"] = {**fed["spec"].get("training", {}), "rounds": ROUNDS, "minParticipants": len(TENANTS)}
    fed["spec"]["privacy"] = {"secureAggregation": {"enabled": True},
                              "differentialPrivacy": {"mode": "sample", "epsilon": 8.0, "delta": 1e-5}}
    fed["spec"]["resources"] = TRAINING_RESOURCES
    path = cluster.dir / "federation.yaml"
    path.write_text(yaml.safe_dump(fed))
    cluster.kubectl("apply", "-f", str(path))
    return fed


