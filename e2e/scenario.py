"""The platform team's scenario on a real node, step by step: what docs/walkthrough.md tells people to run.

Shared by ``tests/test_real_node.py`` (which then checks every promise) and
``bench/real_node.py`` (which times it against ``fedcrm run``), so both run
exactly the same thing.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml
from images import image_refs, postgres_image
from realnode import RealNodeCluster

from fedcrm.pki import CertificateAuthority, write_pem_files

ROOT = Path(__file__).resolve().parents[1]

OPERATOR_NS = "fedcrm-system"
OPERATOR_RELEASE = "fedcrm"  # the operator's ServiceAccount has the release's name
FED_NS = "fedcrm"
FEDERATION = "lead-conversion"
TENANTS = ["tenant-01", "tenant-02", "tenant-03"]
CSV_TENANT = "tenant-01"  # reads an export on a PersistentVolume the admin provided
SQL_TENANT = "tenant-02"  # reads a PostgreSQL running as a pod in its own namespace
SALESFORCE_TENANT = "tenant-03"  # reads a Salesforce stand-in behind a Service on 443, with its own CA
DB_PASSWORD = "e2e-only-not-a-secret"
ROUNDS = 6
GRPC_PORT, METRICS_PORT = 8443, 9090
# The node has 2 CPUs: three training pods, the aggregator (the chart's default 1 CPU), the operator and DNS
# must fit side by side, so the Federation asks for small training pods (the chart stays as shipped).
TRAINING_RESOURCES = {"cpu": "250m", "memory": "1536Mi"}


def load(cluster: RealNodeCluster, *docs: dict[str, Any]) -> None:
    """``kubectl apply`` server-side: a client-side apply copies each object into an annotation, which a
    ConfigMap of a few hundred kB (the stand-in org's records) exceeds."""
    proc = cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=yaml.safe_dump_all(docs),
                           check=False)
    if proc.returncode != 0:
        raise AssertionError(f"kubectl apply failed: {proc.stderr[-2000:]}")


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
    """``helm install`` of the operator chart with the locally built images; the operator runs as a pod.

    The coordinator namespace exists first: the chart gives the operator its rights there with a Role."""
    refs = image_refs()
    repository, tag = refs["operator"].rsplit(":", 1)
    create_namespace(cluster, FED_NS)
    cluster.helm(
        "upgrade", "--install", OPERATOR_RELEASE, str(ROOT / "charts" / "fedcrm-operator"), "--namespace", OPERATOR_NS,
        "--create-namespace", "--set", f"coordinatorNamespaces={{{FED_NS}}}",
        "--set", f"image.repository={repository}", "--set", f"image.tag={tag}",
        "--set", f"runtimeImages.node={refs['node']}", "--set", f"runtimeImages.aggregator={refs['aggregator']}",
        "--wait", "--timeout", "4m", timeout=300,
    )
    return refs


def provide_tenants(cluster: RealNodeCluster, synthetic: Path) -> dict[str, dict[str, Any]]:
    """Each tenant's CRM data where it lives (an export on a PersistentVolume the admin provided, a PostgreSQL in
    its namespace, a Salesforce org), then ``helm install`` of the tenant chart."""
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
        if ns == CSV_TENANT:
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
                                                  "federation": {"name": FEDERATION, "namespace": FED_NS}, "data": data},
                                  # The tenant's grant to the operator (the chart's Role and RoleBinding), named.
                                  "operator": {"serviceAccount": {"name": OPERATOR_RELEASE, "namespace": OPERATOR_NS}}}
        if ns == SQL_TENANT:
            host = postgres_with_leads(cluster, ns, volume / "leads.csv")
            data["sql"] = {"query": "SELECT * FROM leads", "secretRef": {"name": "crm-credentials"},
                           # The tenant declares where its database is; the operator turns it into egress.
                           "egress": [{"podSelector": {"app": "crm-postgres"}, "ports": [5432]}]}
            data["pvc"] = None  # the chart's default source is a claim: null removes it (Helm merges values)
            values["credentials"] = {"create": True, "name": "crm-credentials", "stringData": {
                "url": f"postgresql+psycopg://crm:{DB_PASSWORD}@{host}:5432/crm"}}
        elif ns == SALESFORCE_TENANT:
            org = salesforce_with_leads(cluster, ns, volume / "leads.csv")
            data["salesforce"] = {"object": "Lead", "fields": sorted(org.fields.values()),
                                  "secretRef": {"name": "crm-credentials"},
                                  "egress": [{"podSelector": {"app": "salesforce-standin"}, "ports": [443]}]}
            data["mapping"] = {canonical: org.fields[column] for canonical, column in data["mapping"].items()}
            data["pvc"] = None
            values["credentials"] = {"create": True, "name": "crm-credentials", "stringData": {
                "instanceUrl": org.url, "accessToken": org.token, "caBundle": org.ca_pem}}
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


@dataclasses.dataclass(frozen=True)
class StandInOrg:
    url: str
    token: str
    ca_pem: str
    fields: dict[str, str]  # CSV column -> Salesforce field name


def salesforce_with_leads(cluster: RealNodeCluster, namespace: str, csv_path: Path) -> StandInOrg:
    """tests/salesforce_server.py as a pod in the tenant's namespace (from the node image, which has its
    dependencies), serving the tenant's leads as Lead records over HTTPS on 443 with a certificate of a CA of
    its own, behind the Service ``salesforce``."""
    host = f"salesforce.{namespace}.svc.cluster.local"
    ca = CertificateAuthority.create(f"{namespace} Salesforce stand-in")
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = write_pem_files(Path(tmp), "salesforce", ca.issue_server([host, f"salesforce.{namespace}.svc"]))
        tls = {"tls.crt": cert.read_text(), "tls.key": key.read_text()}
    with csv_path.open(newline="") as f:
        reader = csv.DictReader(f)
        rows, columns = list(reader), list(reader.fieldnames or [])
    fields = {c: re.sub(r"[^A-Za-z0-9]+", "_", c).strip("_") + "__c" for c in columns}
    kinds = {c: _column_kind([r[c] for r in rows]) for c in columns}
    records = [{"Id": f"00Q{i:015d}", **{fields[c]: _typed(r[c], kinds[c]) for c in columns}} for i, r in enumerate(rows)]
    token = "00D000000000001!" + secrets.token_urlsafe(24)
    labels = {"app": "salesforce-standin"}
    load(cluster,
         {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "salesforce-standin", "namespace": namespace},
          "stringData": {**tls, "tokens": token}},
         {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "salesforce-standin", "namespace": namespace},
          "data": {"salesforce_server.py": (ROOT / "tests" / "salesforce_server.py").read_text(),
                   "records.json": json.dumps({"Lead": records})}},
         {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "salesforce-standin", "namespace": namespace},
          "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": {"metadata": {"labels": labels}, "spec": {
              # Port 443 as the image's non-root user, as CoreDNS binds 53.
              "securityContext": {"sysctls": [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "443"}]},
              "containers": [{
                  "name": "salesforce", "image": image_refs()["node"], "imagePullPolicy": "IfNotPresent",
                  "command": ["python3", "/standin/salesforce_server.py", "--records", "/standin/records.json",
                              "--cert", "/tls/tls.crt", "--key", "/tls/tls.key", "--port", "443"],
                  "env": [{"name": "SALESFORCE_TOKENS",
                           "valueFrom": {"secretKeyRef": {"name": "salesforce-standin", "key": "tokens"}}}],
                  "ports": [{"name": "https", "containerPort": 443}],
                  "readinessProbe": {"tcpSocket": {"port": 443}, "periodSeconds": 2},
                  "volumeMounts": [{"name": "code", "mountPath": "/standin", "readOnly": True},
                                   {"name": "tls", "mountPath": "/tls", "readOnly": True}]}],
              "volumes": [{"name": "code", "configMap": {"name": "salesforce-standin"}},
                          {"name": "tls", "secret": {"secretName": "salesforce-standin", "defaultMode": 0o444}}]}}}},
         {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "salesforce", "namespace": namespace},
          "spec": {"selector": labels, "ports": [{"name": "https", "port": 443}]}})
    cluster.kubectl("rollout", "status", "deployment/salesforce-standin", "-n", namespace, "--timeout=180s", timeout=190)
    return StandInOrg(url=f"https://{host}", token=token, ca_pem=ca.cert_pem.decode(), fields=fields)


def _column_kind(values: list[str]) -> str:
    present = {v for v in values if v != ""}
    if present <= {"true", "false"}:
        return "boolean"
    try:
        [float(v) for v in present]
    except ValueError:
        return "text"
    return "number"


def _typed(value: str, kind: str) -> Any:
    """A CSV cell as Salesforce's JSON has it: null, a boolean, a number or text."""
    if value == "":
        return None
    if kind == "boolean":
        return value == "true"
    if kind == "number":
        number = float(value)
        return int(number) if number.is_integer() else number
    return value


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

    sql_types = {"boolean": "boolean", "number": "double precision", "text": "text"}
    ddl = ", ".join(f'"{c}" {sql_types[_column_kind([r[c] for r in rows])]}' for c in columns)
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


