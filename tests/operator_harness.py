"""Running the operator as the chart installs it, against the test control plane.

``helm install`` puts the CRDs, the operator's ServiceAccount and its
least-privilege RBAC into the cluster; the operator process then runs here,
authenticated with a token of that ServiceAccount, so every API call it makes
is checked against the chart's RBAC exactly as in a real cluster: its
ClusterRole, the Roles in the coordinator namespaces, and in a tenant namespace
only what :func:`grant_tenant_access` applied there, rendered from the tenant
chart as ``helm install`` of it would.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from controlplane import die_with_parent

ROOT = Path(__file__).resolve().parents[1]
OPERATOR_NAMESPACE = "fedcrm-system"
RELEASE = "fedcrm"
#: The coordinator namespaces of every cluster test (one control plane and one operator release per session,
#: and each module's `helm upgrade` replaces the values): the chart's Role goes into each of them.
COORDINATOR_NAMESPACES = ("fedcrm-coord", "ha-coord", "dash-coord")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60.0, interval: float = 0.25) -> Any:
    """Poll ``check`` until it returns something truthy; fail with ``what`` and the last value."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            last = check()
        except subprocess.CalledProcessError as err:
            last = err.stderr
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}")


class Kubectl:
    def __init__(self, binary: Path, kubeconfig: Path) -> None:
        self.binary, self.kubeconfig = binary, kubeconfig

    def __call__(self, *args: str, input: str | None = None, check: bool = True,
                 timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.binary), "--kubeconfig", str(self.kubeconfig), *args],
            input=input, capture_output=True, text=True, check=check, timeout=timeout,
        )

    def apply(self, *docs: dict[str, Any], check: bool = True, server_side: bool = False,
              timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """``kubectl apply`` of ``docs``; ``server_side``: one request per object (no read first, no annotation)."""
        return self("apply", *(["--server-side"] if server_side else []), "-f", "-", input=yaml.safe_dump_all(docs),
                    check=check, timeout=timeout)

    def json(self, *args: str) -> Any:
        return json.loads(self(*args, "-o", "json").stdout)

    def items(self, kind: str, *, selector: str = "", namespace: str | None = None) -> list[dict[str, Any]]:
        where = ["-n", namespace] if namespace else ["-A"]
        args = ["get", kind, *where] + (["-l", selector] if selector else [])
        return self.json(*args)["items"]

    def get(self, kind: str, name: str, namespace: str) -> dict[str, Any] | None:
        proc = self("get", kind, name, "-n", namespace, "-o", "json", check=False)
        return json.loads(proc.stdout) if proc.returncode == 0 else None


def provide_claim(kubectl: Kubectl, namespace: str, name: str = "crm-data") -> None:
    """A tenant's data volume: a PersistentVolume bound to its claim (no provisioner runs here)."""
    kubectl.apply(
        {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": f"{namespace}-{name}"},
         "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadOnlyMany", "ReadWriteOnce"],
                  "storageClassName": "tenant-data", "hostPath": {"path": f"/srv/{namespace}"},
                  "claimRef": {"namespace": namespace, "name": name}}},
        {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name, "namespace": namespace},
         "spec": {"accessModes": ["ReadOnlyMany"], "storageClassName": "tenant-data", "resources": {"requests": {"storage": "1Gi"}}}},
    )


def install_chart(helm: Path, kubeconfig: Path, coordinator_namespaces: tuple[str, ...] = COORDINATOR_NAMESPACES) -> None:
    """``helm upgrade --install`` of the operator chart; the coordinator namespaces are created first (the chart
    puts a Role into each)."""
    kubectl = Kubectl(helm.parent / "kubectl", kubeconfig)
    for ns in coordinator_namespaces:
        kubectl("create", "namespace", ns, check=False)
    subprocess.run(
        [str(helm), "upgrade", "--install", RELEASE, str(ROOT / "charts" / "fedcrm-operator"),
         "--namespace", OPERATOR_NAMESPACE, "--create-namespace", "--kubeconfig", str(kubeconfig), "--wait=false",
         "--set", "coordinatorNamespaces={" + ",".join(coordinator_namespaces) + "}"],
        check=True, capture_output=True, text=True, timeout=120,
    )


def tenant_grant(helm: Path, namespace: str, federation: tuple[str, str], participant: str) -> list[dict[str, Any]]:
    """The Role and RoleBinding the tenant chart installs for one Participant (``federation``: its namespace and
    name), rendered by ``helm template`` from the chart itself, for the harness's operator ServiceAccount."""
    fed_ns, fed_name = federation
    proc = subprocess.run(
        [str(helm), "template", f"grant-{fed_name}-{participant}"[:53], str(ROOT / "charts" / "fedcrm-tenant"),
         "--namespace", namespace, "--kube-version", "1.36.3", "--show-only", "templates/operator-role.yaml",
         "--set", f"participant.name={participant}", "--set", f"participant.federation.name={fed_name}",
         "--set", f"participant.federation.namespace={fed_ns}",
         "--set", f"operator.serviceAccount.name={RELEASE}", "--set", f"operator.serviceAccount.namespace={OPERATOR_NAMESPACE}"],
        check=True, capture_output=True, text=True, timeout=60,
    )
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def grant_tenant_access(kubectl: Kubectl, namespace: str, federation: tuple[str, str], *participants: str) -> None:
    """What installing the tenant chart grants the operator in ``namespace`` (its consent), for each of
    ``participants`` (names of Participants there joining ``federation``, its namespace and name): without this,
    the operator can create nothing in a tenant namespace and the Participant says AccessNotGranted."""
    helm = kubectl.binary.parent / "helm"
    docs = [doc for name in participants for doc in tenant_grant(helm, namespace, federation, name)]
    kubectl.apply(*docs)


def service_account_kubeconfig(kubectl: Kubectl, admin_kubeconfig: Path, out: Path) -> Path:
    """A kubeconfig that acts as the chart's ServiceAccount (a bound token from the TokenRequest API)."""
    token = kubectl("create", "token", RELEASE, "-n", OPERATOR_NAMESPACE, "--duration", "3h").stdout.strip()
    admin = yaml.safe_load(admin_kubeconfig.read_text())
    cluster = admin["clusters"][0]["cluster"]
    ca = cluster.get("certificate-authority-data") or base64.b64encode(Path(cluster["certificate-authority"]).read_bytes()).decode()
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": {"server": cluster["server"], "certificate-authority-data": ca}}],
        "users": [{"name": "operator", "user": {"token": token}}],
        "contexts": [{"name": "operator", "context": {"cluster": "test", "user": "operator"}}],
        "current-context": "operator",
    }
    out.write_text(yaml.safe_dump(config))
    out.chmod(0o600)
    return out


class OperatorProcess:
    """``fedcrm-operator`` as a child process with its own log file; restartable, killable."""

    def __init__(self, kubeconfig: Path, log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.kubeconfig, self.log_dir = kubeconfig, log_dir
        self.metrics_port, self.health_port = free_port(), free_port()
        self.extra_env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"operator-{self.starts}.log"

    def start(self) -> OperatorProcess:
        self.starts += 1
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "FEDCRM_OPERATOR_METRICS_PORT": str(self.metrics_port),
            "FEDCRM_OPERATOR_NAMESPACE": OPERATOR_NAMESPACE,
            **self.extra_env,
        }
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fedcrm_operator", "--liveness", f"http://127.0.0.1:{self.health_port}/healthz"],
                env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
            )
        wait_for("the operator's liveness endpoint", self._alive, timeout=60)
        return self

    def _alive(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"operator exited with {self.proc.returncode}:\n{self.log_tail()}")
        try:
            import urllib.request

            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=1):
                return True
        except OSError:
            return False

    def metrics(self) -> str:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def kill(self) -> None:
        """SIGKILL: no cleanup, no finalizer work, as when a node dies under the operator."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
