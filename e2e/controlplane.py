"""A real Kubernetes control plane on loopback, for tests, benchmarks and trying the operator by hand.

etcd, kube-apiserver, kube-controller-manager, kube-scheduler (built from the
``k8s.io/kubernetes`` Go module by ``e2e/build-control-plane``) and KWOK, which
plays the kubelets: nodes report Ready (some advertising ``nvidia.com/gpu``),
scheduled pods report Running, a Job's pods complete. Nothing is mocked: the
API server validates, admits and authorises; the scheduler binds; the
controller manager runs Jobs, garbage collection, namespaces and tokens.

Certificates are made fresh per start with the ``cryptography`` package
(serving CA, client CA with a ``system:masters`` admin, service-account key),
every component listens on a free loopback port, and :meth:`ControlPlane.stop`
kills by PID in reverse order, so a failed start leaves nothing behind.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

__all__ = ["ControlPlane", "ControlPlaneError", "build_binaries", "die_with_parent"]

ROOT = Path(__file__).resolve().parents[1]
GPU_LABEL = "fedcrm.io/test-gpu"


class ControlPlaneError(RuntimeError):
    """A component did not come up; the message carries the tail of its log."""


def build_binaries() -> Path:
    """Build (once) and return the folder of control-plane binaries; ``e2e/build-control-plane`` caches them."""
    proc = subprocess.run([str(ROOT / "e2e" / "build-control-plane")], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ControlPlaneError(f"e2e/build-control-plane failed:\n{proc.stderr[-3000:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _cert(subject: x509.Name, key: ec.EllipticCurvePrivateKey, issuer: x509.Name, signer: ec.EllipticCurvePrivateKey,
          *, ca: bool, sans: list[x509.GeneralName] | None = None) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(signer, hashes.SHA256())


def _name(cn: str, org: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


class ControlPlane:
    """Start with :meth:`start` (or ``with ControlPlane() as cp:``); :attr:`kubeconfig` is an admin kubeconfig."""

    def __init__(self, *, gpu_nodes: int = 2, cpu_nodes: int = 2, workdir: Path | None = None, keep: bool = False,
                 detached: bool = False) -> None:
        """``detached``: the components outlive this process (``e2e/cluster up``); otherwise they are killed
        with it even when it dies without cleaning up (a killed test run leaves no orphans)."""
        self.gpu_nodes, self.cpu_nodes = gpu_nodes, cpu_nodes
        self.detached = detached
        self.keep = keep or workdir is not None
        self.dir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="fedcrm-k8s-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.bin_dir = Path()
        self.kubeconfig = self.dir / "kubeconfig"
        self.ports: dict[str, int] = {}
        self.pids: dict[str, int] = {}
        self.started_s: float | None = None

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def start(self) -> ControlPlane:
        began = time.monotonic()
        try:
            self.bin_dir = build_binaries()
            self._certificates()
            self._start_etcd()
            self._start_apiserver()
            self._start_controllers()
            self._start_kwok()
            self._create_nodes()
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self.started_s = time.monotonic() - began
        self._save_state()
        return self

    def stop(self) -> None:
        """Kill every component (reverse start order), then remove the working folder unless asked to keep it."""
        for name in reversed(list(self.pids)):
            _terminate(self.pids.pop(name))
        self._after_components_stopped()
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _after_components_stopped(self) -> None:
        """What a subclass must undo on the machine once no component runs (nothing, on loopback)."""

    # ------------------------------------------------------------------ helpers
    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports['apiserver']}"

    @property
    def log_dir(self) -> Path:
        return self.dir / "logs"

    def command_prefix(self) -> list[str]:
        """What every component and client command is run under (a subclass enters a network namespace)."""
        return []

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 60) -> subprocess.CompletedProcess[str]:
        argv = [*self.command_prefix(), str(self.bin_dir / "kubectl"), "--kubeconfig", str(self.kubeconfig), *args]
        return subprocess.run(argv, input=input, capture_output=True, text=True, check=check, timeout=timeout)

    def create_node(self, name: str, *, gpus: int = 0, cpu: str = "32", memory: str = "256Gi") -> None:
        """A KWOK node; with ``gpus`` it advertises ``nvidia.com/gpu`` (and the usual GPU-node labels)."""
        capacity = {"cpu": cpu, "memory": memory, "pods": "110"}
        labels = {"type": "kwok", "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64", "kubernetes.io/hostname": name}
        if gpus:
            capacity["nvidia.com/gpu"] = str(gpus)
            labels |= {GPU_LABEL: "true", "nvidia.com/gpu.present": "true"}
        node = {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": labels, "annotations": {"kwok.x-k8s.io/node": "fake"}},
            "status": {"capacity": capacity, "allocatable": capacity},
        }
        self.kubectl("create", "-f", "-", input=json.dumps(node))

    # ------------------------------------------------------------------ steps
    def _certificates(self) -> None:
        d = self.dir / "pki"
        d.mkdir(exist_ok=True)
        serving_key, client_key, sa_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
        serving_ca = _cert(_name("fedcrm-test-serving-ca"), serving_key, _name("fedcrm-test-serving-ca"), serving_key, ca=True)
        client_ca = _cert(_name("fedcrm-test-client-ca"), client_key, _name("fedcrm-test-client-ca"), client_key, ca=True)
        server_key, admin_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in ("localhost", "kubernetes", "kubernetes.default.svc")]
        sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ("127.0.0.1", "::1", "10.96.0.1")]
        server = _cert(_name("kube-apiserver"), server_key, serving_ca.subject, serving_key, ca=False, sans=sans)
        admin = _cert(_name("fedcrm-test-admin", "system:masters"), admin_key, client_ca.subject, client_key, ca=False)
        pem = serialization.Encoding.PEM
        files = {
            "serving-ca.crt": serving_ca.public_bytes(pem), "apiserver.crt": server.public_bytes(pem),
            "apiserver.key": _key_pem(server_key), "client-ca.crt": client_ca.public_bytes(pem),
            "admin.crt": admin.public_bytes(pem), "admin.key": _key_pem(admin_key), "sa.key": _key_pem(sa_key),
            "sa.pub": sa_key.public_key().public_bytes(pem, serialization.PublicFormat.SubjectPublicKeyInfo),
        }
        for name, data in files.items():
            (d / name).write_bytes(data)
            (d / name).chmod(0o600)
        self.ports = {name: _free_port() for name in ("etcd", "etcd-peer", "apiserver", "controller-manager", "scheduler")}
        self.kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "fedcrm-test", "cluster": {"server": self.server, "certificate-authority": str(d / "serving-ca.crt")}}],
            "users": [{"name": "admin", "user": {"client-certificate": str(d / "admin.crt"), "client-key": str(d / "admin.key")}}],
            "contexts": [{"name": "fedcrm-test", "context": {"cluster": "fedcrm-test", "user": "admin"}}],
            "current-context": "fedcrm-test",
        }, indent=2))
        self.kubeconfig.chmod(0o600)

    def _spawn(self, name: str, args: list[str], *, binary: Path | None = None) -> None:
        """Start a component with its own log file; its PID is kept for :meth:`stop` (the prefix execs it)."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        exe = binary or self.bin_dir / name.split(":")[0]
        with open(self.log_dir / f"{name}.log", "wb") as log:
            proc = subprocess.Popen([*self.command_prefix(), str(exe), *args], stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    preexec_fn=None if self.detached else die_with_parent)
        self.pids[name] = proc.pid

    def _wait(self, name: str, check: Callable[[], bool], timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if name in self.pids and not _alive(self.pids[name]):
                raise ControlPlaneError(f"{name} exited during start-up:\n{self._tail(name)}")
            try:
                if check():
                    return
            except (OSError, ValueError, subprocess.SubprocessError):
                pass
            time.sleep(0.2)
        raise ControlPlaneError(f"{name} not ready after {timeout:.0f}s:\n{self._tail(name)}")

    def _tail(self, name: str, lines: int = 30) -> str:
        path = self.log_dir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"

    def _https_ok(self, port: int, path: str) -> bool:
        pki = self.dir / "pki"
        context = ssl.create_default_context(cafile=str(pki / "serving-ca.crt"))
        context.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
        if port != self.ports["apiserver"]:  # controller-manager and scheduler serve self-signed certificates
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        with urllib.request.urlopen(f"https://127.0.0.1:{port}{path}", context=context, timeout=2) as r:
            return r.status == 200

    def _start_etcd(self) -> None:
        client, peer = f"http://127.0.0.1:{self.ports['etcd']}", f"http://127.0.0.1:{self.ports['etcd-peer']}"
        self._spawn("etcd", [
            f"--data-dir={self.dir / 'etcd'}", f"--listen-client-urls={client}", f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}", f"--initial-cluster=default={peer}",
            "--unsafe-no-fsync=true", "--quota-backend-bytes=2147483648",
        ])
        self._wait("etcd", lambda: urllib.request.urlopen(f"{client}/health", timeout=2).status == 200)

    def _start_apiserver(self) -> None:
        pki, port = self.dir / "pki", self.ports["apiserver"]
        self._spawn("kube-apiserver", [
            f"--etcd-servers=http://127.0.0.1:{self.ports['etcd']}", f"--secure-port={port}", "--bind-address=127.0.0.1",
            f"--tls-cert-file={pki / 'apiserver.crt'}", f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'client-ca.crt'}", "--authorization-mode=Node,RBAC",
            "--service-cluster-ip-range=10.96.0.0/16", f"--service-account-issuer=https://127.0.0.1:{port}/",
            f"--service-account-key-file={pki / 'sa.pub'}", f"--service-account-signing-key-file={pki / 'sa.key'}",
            f"--cert-dir={self.dir / 'apiserver-certs'}", "--allow-privileged=true",
        ])
        self._wait("kube-apiserver", lambda: self._https_ok(port, "/readyz"), timeout=120)

    def _start_controllers(self) -> None:
        pki = self.dir / "pki"
        self._spawn("kube-controller-manager", [
            f"--kubeconfig={self.kubeconfig}", "--leader-elect=false", "--bind-address=127.0.0.1",
            f"--secure-port={self.ports['controller-manager']}", f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--root-ca-file={pki / 'serving-ca.crt'}", "--use-service-account-credentials=true",
            f"--cert-dir={self.dir / 'kcm-certs'}", "--authorization-always-allow-paths=/healthz,/readyz,/livez",
        ])
        self._spawn("kube-scheduler", [
            f"--kubeconfig={self.kubeconfig}", "--leader-elect=false", "--bind-address=127.0.0.1",
            f"--secure-port={self.ports['scheduler']}", f"--cert-dir={self.dir / 'scheduler-certs'}",
            "--authorization-always-allow-paths=/healthz,/readyz,/livez",
        ])
        self._wait("kube-controller-manager", lambda: self._https_ok(self.ports["controller-manager"], "/healthz"))
        self._wait("kube-scheduler", lambda: self._https_ok(self.ports["scheduler"], "/healthz"))

    def _start_kwok(self) -> None:
        stages = self.bin_dir.parent / "kwok-stages.yaml"
        self._spawn("kwok", [
            f"--kubeconfig={self.kubeconfig}", "--manage-all-nodes=false",
            "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
            "--cidr=10.244.0.0/16", "--node-ip=10.0.0.1", f"--config={stages}",
        ])

    def _create_nodes(self) -> None:
        for i in range(self.gpu_nodes):
            self.create_node(f"gpu-node-{i}", gpus=8)
        for i in range(self.cpu_nodes):
            self.create_node(f"cpu-node-{i}")

    def _wait_ready(self) -> None:
        want = self.gpu_nodes + self.cpu_nodes

        def nodes_ready() -> bool:
            items = json.loads(self.kubectl("get", "nodes", "-o", "json").stdout)["items"]
            ready = [
                n for n in items
                if any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"].get("conditions", []))
                and not any(t["key"] == "node.kubernetes.io/not-ready" for t in n["spec"].get("taints", []))
            ]
            return len(ready) == want

        self._wait("kwok", nodes_ready, timeout=60)
        self._wait("kube-controller-manager", lambda: self.kubectl("get", "serviceaccount", "default", "-n", "default",
                                                                   check=False).returncode == 0, timeout=60)

    def _save_state(self) -> None:
        (self.dir / "state.json").write_text(json.dumps({
            "pids": self.pids, "ports": self.ports, "kubeconfig": str(self.kubeconfig), "bin_dir": str(self.bin_dir),
        }, indent=2))

    @classmethod
    def attach(cls, workdir: Path) -> ControlPlane:
        """The control plane a previous ``start`` left running in ``workdir`` (for ``e2e/cluster down``)."""
        state: dict[str, Any] = json.loads((Path(workdir) / "state.json").read_text())
        cp = cls(workdir=workdir, detached=True)
        cp.pids, cp.ports, cp.bin_dir = dict(state["pids"]), dict(state["ports"]), Path(state["bin_dir"])
        return cp


def die_with_parent() -> None:
    """In the child, before exec: SIGKILL when the parent goes (Linux prctl PR_SET_PDEATHSIG)."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie of ours counts as gone
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


def _terminate(pid: int, timeout: float = 5.0) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.1)
    if _alive(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
