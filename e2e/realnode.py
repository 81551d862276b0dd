"""A Kubernetes cluster with a real node, inside a network namespace of its own, for the e2e tests.

Everything :mod:`controlplane` starts (etcd, kube-apiserver, controller-manager,
scheduler, KWOK GPU nodes) plus a real node: containerd and runc from Debian,
kubelet and kube-proxy from the same ``k8s.io/kubernetes`` module as the
control plane, CoreDNS as the cluster DNS and kube-router enforcing
NetworkPolicies (``e2e/build-node`` builds and caches the Go binaries). Pods
run for real from OCI archives imported into containerd; nothing is pulled.

Every component runs as ``nsenter --net=/run/netns/fedcrm-e2e -- <binary>``:
only the network namespace changes, so cgroups and the mounts kubelet makes stay
visible to containerd and runc (``ip netns exec`` would remount ``/sys``). The
namespace has no default route, so no pod can reach anything the harness did not
create. Addresses and ports inside it are fixed: the node is 10.77.0.1, pods
get 10.244.0.0/24 on the ``cni0`` bridge, Services 10.96.0.0/16, cluster DNS
10.96.0.10.

Three facts of the machines this runs on shape the rest:

* no ``CAP_SYS_RESOURCE``: containerd must clamp oom_score_adj
  (``restrict_oom_score_adj``), or runc cannot start any pod;
* kubelet rewrites host-wide sysctls (``kernel.panic`` & co.) when it starts:
  they are saved before and restored by :meth:`RealNodeCluster.stop`, or by the
  next start when a run was killed;
* kubelet's pod cgroups (``kubepods``) are host-wide, so one real-node cluster
  runs on a machine at a time: a lock file serialises them, and a start first
  removes what a killed run left behind (processes in the namespace, shims of
  our containerd, mounts, cgroups, the namespace itself).

containerd's image store is kept between runs under ``~/.cache/fedcrm/node``,
as a real node keeps its images: an archive already imported is not imported
again.
"""

from __future__ import annotations

import ctypes
import fcntl
import ipaddress
import json
import os
import shutil
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from controlplane import ROOT, ControlPlane, ControlPlaneError, _alive, _cert, _key_pem, _name, _terminate, build_binaries

__all__ = ["NETNS", "NODE_IP", "NODE_NAME", "RealNodeCluster", "build_node_binaries", "in_netns"]

NETNS = "fedcrm-e2e"
NETNS_PATH = Path("/run/netns") / NETNS
NODE_IP = "10.77.0.1"
NODE_NAME = "fedcrm-node-0"
POD_CIDR = "10.244.0.0/24"
CLUSTER_CIDR = "10.244.0.0/16"
SERVICE_CIDR = "10.96.0.0/16"
DNS_IP = "10.96.0.10"
APISERVER_PORT = 6443
STATE_ROOT = Path("/run/fedcrm-e2e")  # lock and saved sysctls: outlive a killed run, not a reboot
LOCK_FILE = STATE_ROOT / "lock"
WORKDIR_RECORD = STATE_ROOT / "workdir"  # the running cluster's folder, for the cleanup after a killed run
CONTAINERD_STATE = STATE_ROOT / "containerd"
SAVED_SYSCTLS = STATE_ROOT / "sysctl.orig"
# The host-wide sysctls kubelet sets at start (no option turns that off).
HOST_SYSCTLS = ("vm.overcommit_memory", "vm.panic_on_oom", "kernel.panic", "kernel.panic_on_oops",
                "kernel.keys.root_maxkeys", "kernel.keys.root_maxbytes")
CONTAINERD_ROOT = Path.home() / ".cache" / "fedcrm" / "node" / "containerd-root"
SANDBOX_IMAGE = "localhost/fedcrm/pause:1"
COREDNS_IMAGE = "localhost/fedcrm/coredns:1"
IMAGE_PREFIX = "localhost/fedcrm"  # fedcrm's images and the e2e's own (pause, CoreDNS, PostgreSQL)
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
CLONE_NEWNET = 0x40000000

T = TypeVar("T")


def build_node_binaries() -> Path:
    """Build (once) and return the folder of node binaries; ``e2e/build-node`` caches them."""
    proc = subprocess.run([str(ROOT / "e2e" / "build-node")], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ControlPlaneError(f"e2e/build-node failed:\n{proc.stderr[-3000:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


def in_netns(fn: Callable[[], T], netns: Path = NETNS_PATH) -> T:
    """Run ``fn`` in a thread that has joined the cluster's network namespace.

    A network namespace belongs to a thread, not a process: the thread enters it,
    runs ``fn`` (sockets it opens live in the namespace) and ends, so the caller's
    own threads never leave the host's namespace."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            fd = os.open(netns, os.O_RDONLY)
            try:
                if ctypes.CDLL("libc.so.6", use_errno=True).setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns({netns}) failed")
            finally:
                os.close(fd)
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=run, name=f"in-netns-{netns.name}")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def _run(*argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=check, timeout=timeout)


class RealNodeCluster(ControlPlane):
    """A control plane plus a real node, all in the ``fedcrm-e2e`` network namespace.

    ``images`` are OCI archives (``path`` → ``ref``) imported into the node's
    containerd before the kubelet starts. :attr:`kubeconfig` is an admin kubeconfig
    whose server is the node address, so use :meth:`kubectl` / :meth:`helm` (they
    enter the namespace) or :func:`in_netns`."""

    def __init__(self, *, gpu_nodes: int = 1, images: dict[Path, str] | None = None, workdir: Path | None = None,
                 keep: bool = False, detached: bool = False) -> None:
        super().__init__(gpu_nodes=gpu_nodes, cpu_nodes=0, workdir=workdir, keep=keep, detached=detached)
        self.images = dict(images or {})
        self.node_bin = Path()
        self.timings: dict[str, float] = {}
        self._lock_fd: int | None = None
        self._sysctls_saved = False

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> RealNodeCluster:
        began = time.monotonic()
        try:
            self._step("build", self._build)
            self._step("clean stale run", self._take_machine)
            self._step("network namespace", self._network_namespace)
            self._step("certificates", self._certificates)
            self._step("control plane", self._start_control_plane)
            self._step("containerd", self._start_containerd)
            self._step("image import", self._import_images)
            self._step("kubelet", self._start_kubelet)
            self._step("kube-proxy, DNS, NetworkPolicy", self._start_networking)
            self._step("KWOK GPU nodes", self._start_gpu_nodes)
            self._wait("kube-controller-manager", lambda: self.kubectl(
                "get", "serviceaccount", "default", "-n", "default", check=False).returncode == 0, timeout=60)
            self._step("cluster DNS ready", lambda: self.wait_for("CoreDNS pod Ready", lambda: self.kubectl(
                "wait", "--for=condition=Ready", "pod", "-l", "k8s-app=kube-dns", "-n", "kube-system", "--timeout=5s",
                check=False).returncode == 0, timeout=90))
        except BaseException:
            self.stop()
            raise
        self.started_s = time.monotonic() - began
        self._save_state()
        return self

    def _step(self, name: str, fn: Callable[[], None]) -> None:
        began = time.monotonic()
        fn()
        self.timings[name] = round(time.monotonic() - began, 2)

    def stop(self) -> None:
        """Stop everything this cluster started, by PID, and put the machine back as it was.

        Pods are deleted while the kubelet still runs (so their mounts and network
        go the orderly way); whatever is left after that is removed by force."""
        if "kubelet" in self.pids and _alive(self.pids["kubelet"]):
            self.kubectl("delete", "pods", "--all", "--all-namespaces", "--wait=true", "--timeout=40s",
                         "--grace-period=2", check=False, timeout=60)
        for name in ("kwok", "kube-router", "coredns", "kube-proxy", "kubelet"):
            if name in self.pids:
                _terminate(self.pids.pop(name), timeout=10)
        if "containerd" in self.pids and _alive(self.pids["containerd"]):
            self._remove_containers()
        super().stop()

    def _after_components_stopped(self) -> None:
        _clean_machine(self.dir)
        self._release_machine()

    # ------------------------------------------------------------------ helpers for tests
    @property
    def server(self) -> str:
        return f"https://{NODE_IP}:{APISERVER_PORT}"

    @property
    def containerd_socket(self) -> Path:
        """Under the machine-wide state folder: a short path (sockets have a 108-byte limit) that a later run
        recognises in the command lines of shims a killed run left behind."""
        return CONTAINERD_STATE / "containerd.sock"

    def command_prefix(self) -> list[str]:
        """``nsenter --net``: only the network namespace changes (``ip netns exec`` would remount /sys, hiding the
        cgroups from kubelet and its mounts from containerd)."""
        return ["nsenter", f"--net={NETNS_PATH}", "--"]

    def helm(self, *args: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        argv = [*self.command_prefix(), str(self.bin_dir / "helm"), "--kubeconfig", str(self.kubeconfig), *args]
        env = {**os.environ, "HELM_CACHE_HOME": str(self.dir / "helm" / "cache"),
               "HELM_CONFIG_HOME": str(self.dir / "helm" / "config"), "HELM_DATA_HOME": str(self.dir / "helm" / "data")}
        return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=timeout, env=env)

    def ctr(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return _run("ctr", "-a", str(self.containerd_socket), "-n", "k8s.io", *args, check=check, timeout=timeout)

    def start_process(self, name: str, binary: Path, args: list[str]) -> int:
        """Start a host process of the node (a Prometheus, say) inside the namespace; :meth:`stop` stops it."""
        self._spawn(name, args, binary=binary)
        return self.pids[name]

    def http_get(self, url: str, timeout: float = 5) -> bytes:
        """GET a URL from inside the cluster's namespace (a Prometheus there, a pod IP, the node)."""
        def fetch() -> bytes:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                return r.read()
        return in_netns(fetch)

    def wait_for(self, what: str, check: Callable[[], bool], timeout: float = 120, every: float = 1.0) -> None:
        """Poll ``check`` until true; on timeout, fail with the node's recent events for context."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if check():
                    return
            except (OSError, ValueError, KeyError, subprocess.SubprocessError):
                pass
            time.sleep(every)
        events = self.kubectl("get", "events", "-A", "--sort-by=.lastTimestamp", check=False).stdout
        raise ControlPlaneError(f"{what}: not after {timeout:.0f}s; recent events:\n" + "\n".join(events.splitlines()[-25:]))

    # ------------------------------------------------------------------ steps
    def _build(self) -> None:
        self.bin_dir = build_binaries()
        self.node_bin = build_node_binaries()
        missing = [tool for tool in ("containerd", "runc", "ctr", "iptables", "ipset", "nft", "nsenter")
                   if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists()]
        if not Path("/usr/lib/cni/bridge").exists():
            missing.append("CNI plugins (/usr/lib/cni)")
        if missing:
            raise ControlPlaneError(f"missing on this machine: {', '.join(missing)}; run tools/install-system-packages")
        if os.geteuid() != 0:
            raise ControlPlaneError("a real node needs root (network namespace, mounts, cgroups)")

    def _take_machine(self) -> None:
        """Hold the machine-wide lock, then undo whatever a killed run left behind."""
        STATE_ROOT.mkdir(parents=True, exist_ok=True)
        fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ControlPlaneError(f"another real-node cluster runs on this machine (lock {LOCK_FILE}); "
                                    "stop it first (e2e/cluster down)") from None
        self._lock_fd = fd
        _clean_machine(Path(WORKDIR_RECORD.read_text()) if WORKDIR_RECORD.exists() else None)
        WORKDIR_RECORD.write_text(str(self.dir))
        self._save_sysctls()

    def _release_machine(self) -> None:
        if self._sysctls_saved:
            _restore_sysctls()
            self._sysctls_saved = False
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _save_sysctls(self) -> None:
        if not SAVED_SYSCTLS.exists():  # present only if a killed run could not restore them: keep the originals
            values = {name: _read_sysctl(name) for name in HOST_SYSCTLS}
            SAVED_SYSCTLS.write_text(json.dumps(values))
        self._sysctls_saved = True

    def _network_namespace(self) -> None:
        _run("ip", "netns", "add", NETNS)
        ip = ("ip", "-n", NETNS)
        _run(*ip, "link", "set", "lo", "up")
        # No dummy interfaces on these kernels: a veth pair whose two ends both stay inside the namespace.
        _run(*ip, "link", "add", "fedcrm0", "type", "veth", "peer", "name", "fedcrm1")
        _run(*ip, "addr", "add", f"{NODE_IP}/24", "dev", "fedcrm0")
        _run(*ip, "link", "set", "fedcrm0", "up")
        _run(*ip, "link", "set", "fedcrm1", "up")
        for key, value in (("net.ipv4.ip_forward", "1"), ("net.bridge.bridge-nf-call-iptables", "1")):
            _run(*self.command_prefix(), "sysctl", "-qw", f"{key}={value}")

    def _certificates(self) -> None:
        """One CA signs every identity: apiserver, node, kube-proxy, DNS, NetworkPolicy agent, admin."""
        d = self.dir / "pki"
        d.mkdir(parents=True, exist_ok=True)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = _cert(_name("fedcrm-e2e-ca"), ca_key, _name("fedcrm-e2e-ca"), ca_key, ca=True)
        pem = serialization.Encoding.PEM
        files: dict[str, bytes] = {"ca.crt": ca.public_bytes(pem), "ca.key": _key_pem(ca_key)}

        def leaf(name: str, cn: str, org: str | None = None, ips: Iterable[str] = (), dns: Iterable[str] = ()) -> None:
            key = ec.generate_private_key(ec.SECP256R1())
            sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns]
            sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ips]
            cert = _cert(_name(cn, org), key, ca.subject, ca_key, ca=False, sans=sans or None)
            files[f"{name}.crt"], files[f"{name}.key"] = cert.public_bytes(pem), _key_pem(key)

        leaf("apiserver", "kube-apiserver", ips=(NODE_IP, "127.0.0.1", "10.96.0.1"),
             dns=("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                  "kubernetes.default.svc.cluster.local"))
        leaf("apiserver-kubelet-client", "kube-apiserver-kubelet-client", "system:masters")
        leaf("kubelet-client", f"system:node:{NODE_NAME}", "system:nodes")
        leaf("kubelet-serving", f"system:node:{NODE_NAME}", "system:nodes", ips=(NODE_IP,), dns=(NODE_NAME,))
        leaf("kube-proxy", "system:kube-proxy")
        for user in ("admin", "netpol", "prometheus"):
            leaf(user, f"fedcrm-e2e-{user}", "system:masters")
        sa_key = ec.generate_private_key(ec.SECP256R1())
        files["sa.key"] = _key_pem(sa_key)
        files["sa.pub"] = sa_key.public_key().public_bytes(pem, serialization.PublicFormat.SubjectPublicKeyInfo)
        for name, data in files.items():
            (d / name).write_bytes(data)
            (d / name).chmod(0o600)
        for user in ("admin", "kubelet-client", "kube-proxy", "netpol", "prometheus"):
            (d / f"{user}.kubeconfig").write_text(self._kubeconfig_for(user))
        shutil.copy(d / "admin.kubeconfig", self.kubeconfig)
        self.kubeconfig.chmod(0o600)
        self.ports = {"etcd": 2379, "etcd-peer": 2380, "apiserver": APISERVER_PORT, "controller-manager": 10257,
                      "scheduler": 10259}

    def _kubeconfig_for(self, user: str) -> str:
        pki = self.dir / "pki"
        return json.dumps({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "fedcrm-e2e", "cluster": {"server": self.server, "certificate-authority": str(pki / "ca.crt")}}],
            "users": [{"name": user, "user": {"client-certificate": str(pki / f"{user}.crt"),
                                              "client-key": str(pki / f"{user}.key")}}],
            "contexts": [{"name": "fedcrm-e2e", "context": {"cluster": "fedcrm-e2e", "user": user}}],
            "current-context": "fedcrm-e2e",
        }, indent=2)

    def _https_ok(self, port: int, path: str) -> bool:
        import ssl

        pki = self.dir / "pki"
        context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        context.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
        host = NODE_IP if port == APISERVER_PORT else "127.0.0.1"
        if port != APISERVER_PORT:  # controller-manager and scheduler serve self-signed certificates
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE

        def get() -> bool:
            with urllib.request.urlopen(f"https://{host}:{port}{path}", context=context, timeout=2) as r:
                return r.status == 200
        return in_netns(get)

    def _start_control_plane(self) -> None:
        pki = self.dir / "pki"
        client, peer = "http://127.0.0.1:2379", "http://127.0.0.1:2380"
        self._spawn("etcd", [
            f"--data-dir={self.dir / 'etcd'}", f"--listen-client-urls={client}", f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}", f"--initial-cluster=default={peer}",
            "--unsafe-no-fsync=true", "--quota-backend-bytes=2147483648", "--listen-metrics-urls=http://127.0.0.1:2381",
        ])
        self._wait("etcd", lambda: in_netns(lambda: urllib.request.urlopen(f"{client}/health", timeout=2).status == 200))
        self._spawn("kube-apiserver", [
            f"--etcd-servers={client}", f"--secure-port={APISERVER_PORT}", "--bind-address=0.0.0.0",
            f"--advertise-address={NODE_IP}", f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}", f"--client-ca-file={pki / 'ca.crt'}",
            "--authorization-mode=Node,RBAC", "--enable-admission-plugins=NodeRestriction",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki / 'sa.pub'}", f"--service-account-signing-key-file={pki / 'sa.key'}",
            f"--kubelet-client-certificate={pki / 'apiserver-kubelet-client.crt'}",
            f"--kubelet-client-key={pki / 'apiserver-kubelet-client.key'}",
            f"--kubelet-certificate-authority={pki / 'ca.crt'}", "--kubelet-preferred-address-types=InternalIP",
            f"--cert-dir={self.dir / 'apiserver-certs'}", "--allow-privileged=true",
        ])
        self._wait("kube-apiserver", lambda: self._https_ok(APISERVER_PORT, "/readyz"), timeout=120)
        self._spawn("kube-controller-manager", [
            f"--kubeconfig={self.kubeconfig}", "--leader-elect=false", "--bind-address=127.0.0.1",
            "--secure-port=10257", f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--root-ca-file={pki / 'ca.crt'}", "--use-service-account-credentials=true",
            "--allocate-node-cidrs=true", f"--cluster-cidr={CLUSTER_CIDR}", "--node-cidr-mask-size=24",
            f"--service-cluster-ip-range={SERVICE_CIDR}", f"--cluster-signing-cert-file={pki / 'ca.crt'}",
            f"--cluster-signing-key-file={pki / 'ca.key'}", f"--cert-dir={self.dir / 'kcm-certs'}",
            "--authorization-always-allow-paths=/healthz,/readyz,/livez",
        ])
        self._spawn("kube-scheduler", [
            f"--kubeconfig={self.kubeconfig}", "--leader-elect=false", "--bind-address=127.0.0.1",
            "--secure-port=10259", f"--cert-dir={self.dir / 'scheduler-certs'}",
            "--authorization-always-allow-paths=/healthz,/readyz,/livez",
        ])
        self._wait("kube-controller-manager", lambda: self._https_ok(10257, "/healthz"))
        self._wait("kube-scheduler", lambda: self._https_ok(10259, "/healthz"))

    def _start_containerd(self) -> None:
        d = self.dir / "containerd"
        for sub in ("certs.d", "opt"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        (CONTAINERD_STATE / "state").mkdir(parents=True, exist_ok=True)
        CONTAINERD_ROOT.mkdir(parents=True, exist_ok=True)
        cni = self.dir / "cni"
        (cni / "net.d").mkdir(parents=True, exist_ok=True)
        (cni / "net.d" / "10-fedcrm-e2e.conflist").write_text(json.dumps({
            "cniVersion": "1.0.0", "name": "fedcrm-e2e-pods", "plugins": [
                # hairpinMode lets a pod reach itself through its own Service; the bridge plugin refuses it
                # together with promiscMode, and containerd brings `lo` up itself (no loopback plugin).
                {"type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": False, "hairpinMode": True,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_CIDR, "gateway": "10.244.0.1"}]],
                          "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(cni / "ipam")}},
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ]}, indent=2))
        config = f"""version = 2
root = "{CONTAINERD_ROOT}"
state = "{CONTAINERD_STATE / 'state'}"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{self.containerd_socket}"
[ttrpc]
  address = "{self.containerd_socket}.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{SANDBOX_IMAGE}"
  enable_selinux = false
  disable_apparmor = true
  # These machines lack CAP_SYS_RESOURCE: runc cannot lower oom_score_adj below containerd's own.
  restrict_oom_score_adj = true
  max_container_log_line_size = 16384
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        BinaryName = "/usr/sbin/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni / 'net.d'}"
    max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{d / 'certs.d'}"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d / 'opt'}"
"""
        (self.dir / "containerd.toml").write_text(config)
        self._spawn("containerd", ["--config", str(self.dir / "containerd.toml")], binary=Path("/usr/bin/containerd"))
        self._wait("containerd", lambda: self.ctr("version", timeout=5).returncode == 0, timeout=60)
        self._remove_containers()  # a killed run's pods must not come back as orphans

    def _import_images(self) -> None:
        self.images.setdefault(self._pause_archive(), SANDBOX_IMAGE)
        self.images.setdefault(self._binary_image("coredns", COREDNS_IMAGE, user="65532:65532"), COREDNS_IMAGE)
        # The store outlives runs: images of earlier builds go, or every source change would leave 6 GB behind.
        # The CRI plugin also names each image by its config digest (``sha256:...``); those names keep an old
        # image's content alive after its own name is gone, so they go with it.
        wanted = set(self.images.values())
        listed = self._listed_images()
        stale = [ref for ref in listed if ref.startswith(IMAGE_PREFIX) and ref not in wanted]
        kept_targets = {target for ref, target in listed.items() if ref not in stale and not ref.startswith("sha256:")}
        stale += [ref for ref, target in listed.items() if ref.startswith("sha256:") and target not in kept_targets]
        if stale:
            self.ctr("images", "rm", "--sync", *stale, timeout=300)
        self.import_images(self.images)

    def _listed_images(self) -> dict[str, str]:
        """Every image name in the node's containerd → the digest of the manifest it names."""
        rows = self.ctr("images", "ls").stdout.splitlines()[1:]
        return {cols[0]: cols[2] for cols in (row.split() for row in rows) if len(cols) >= 3}

    def import_images(self, images: dict[Path, str]) -> None:
        """Import OCI archives (path → ref) into the node's containerd, skipping refs it already holds.

        Once unpacked, an image's layer blobs are deleted from the content store (what the CRI plugin's
        ``discard_unpacked_layers`` does for pulled images; ``ctr import`` has no such option): containers start
        from the unpacked snapshots, and keeping the blobs would hold a second copy of the 6 GB node image."""
        present = set(self._listed_images())
        for archive, ref in images.items():
            if ref in present:
                continue
            self.ctr("images", "import", str(archive), timeout=900)
            target = self._listed_images().get(ref)
            if target is None:
                raise ControlPlaneError(f"importing {archive} did not register {ref}")
            self._discard_layers(ref, target)

    def _discard_layers(self, ref: str, manifest_digest: str) -> None:
        rows = self.ctr("images", "check", f"name=={ref}").stdout.splitlines()[1:]
        if not rows or rows[0].split()[-1] != "true":  # the last column: UNPACKED
            raise ControlPlaneError(f"{ref} was imported but not unpacked: {rows}")
        manifest = json.loads(self.ctr("content", "get", manifest_digest).stdout)
        layers = [layer["digest"] for layer in manifest.get("layers", [])]
        if layers:
            self.ctr("content", "rm", *layers, check=False)

    def _pause_archive(self) -> Path:
        """The pod sandbox image: our own pause binary in an otherwise empty image (never pulled)."""
        return self._binary_image("pause", SANDBOX_IMAGE, user="65535:65535")

    def _binary_image(self, binary: str, ref: str, *, user: str) -> Path:
        """An image holding one static Go binary of ours as its entrypoint, cached beside the binaries."""
        cache = self.node_bin.parent / f"{binary}-image.oci.tar"
        if cache.exists():
            return cache
        container = _run("buildah", "from", "scratch").stdout.strip()
        try:
            _run("buildah", "copy", container, str(self.node_bin / binary), f"/{binary}")
            _run("buildah", "config", "--entrypoint", f'["/{binary}"]', "--cmd", "[]", "--user", user, container)
            _run("buildah", "commit", "--format", "oci", container, ref)
        finally:
            _run("buildah", "rm", container, check=False)
        tmp = cache.with_suffix(".tmp")
        _run("buildah", "push", ref, f"oci-archive:{tmp}:{ref}")
        tmp.rename(cache)
        return cache

    def _start_kubelet(self) -> None:
        cfg = self.dir / "kubelet"
        cfg.mkdir(parents=True, exist_ok=True)
        pki = self.dir / "pki"
        # No search domain of the node's own: pods would append it to every name they look up, and with no
        # upstream resolver in the namespace CoreDNS answers it SERVFAIL, which ends c-ares's search (gRPC's
        # resolver) before it tries the name itself. On a real node the upstream would answer NXDOMAIN.
        (cfg / "resolv.conf").write_text(f"nameserver {NODE_IP}\n")
        (cfg / "config.yaml").write_text(json.dumps({
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "containerRuntimeEndpoint": f"unix://{self.containerd_socket}",
            "cgroupDriver": "cgroupfs", "failCgroupV1": False, "failSwapOn": False,
            "address": NODE_IP, "port": 10250, "readOnlyPort": 0, "healthzBindAddress": "127.0.0.1", "healthzPort": 10248,
            "tlsCertFile": str(pki / "kubelet-serving.crt"), "tlsPrivateKeyFile": str(pki / "kubelet-serving.key"),
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                               "x509": {"clientCAFile": str(pki / "ca.crt")}},
            "authorization": {"mode": "Webhook"},
            "clusterDomain": "cluster.local", "clusterDNS": [DNS_IP], "resolvConf": str(cfg / "resolv.conf"),
            "serializeImagePulls": False,
            # The images were imported, not pulled: garbage-collecting them would break the next pod.
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%",
                             "nodefs.inodesFree": "1%"},
            "syncFrequency": "10s", "fileCheckFrequency": "20s", "nodeStatusUpdateFrequency": "10s",
            "maxPods": 60, "podPidsLimit": -1,
        }, indent=2))
        self._spawn("kubelet", [
            f"--config={cfg / 'config.yaml'}", f"--kubeconfig={pki / 'kubelet-client.kubeconfig'}",
            f"--root-dir={cfg / 'root'}", f"--cert-dir={cfg / 'pki'}", f"--hostname-override={NODE_NAME}",
            f"--node-ip={NODE_IP}", "--v=1",
        ], binary=self.node_bin / "kubelet")
        self._wait("kubelet", lambda: self._node_ready(NODE_NAME), timeout=90)

    def _node_ready(self, name: str) -> bool:
        node = json.loads(self.kubectl("get", "node", name, "-o", "json", check=False).stdout or "{}")
        conditions = node.get("status", {}).get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    def _start_networking(self) -> None:
        pki = self.dir / "pki"
        (self.dir / "kube-proxy.yaml").write_text(json.dumps({
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration", "mode": "nftables",
            "clientConnection": {"kubeconfig": str(pki / "kube-proxy.kubeconfig")}, "hostnameOverride": NODE_NAME,
            "clusterCIDR": CLUSTER_CIDR, "bindAddress": NODE_IP, "healthzBindAddress": "127.0.0.1:10256",
            "metricsBindAddress": "127.0.0.1:10249", "nodePortAddresses": [f"{NODE_IP}/32"],
            # Leave the host-wide conntrack sysctls alone.
            "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
        }))
        self._spawn("kube-proxy", [f"--config={self.dir / 'kube-proxy.yaml'}"], binary=self.node_bin / "kube-proxy")
        # Cluster DNS runs as pods labelled k8s-app=kube-dns in kube-system, as in every distribution: the
        # NetworkPolicies fedcrm writes allow DNS to exactly those pods, and a host process would not match.
        self.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": _cluster_dns()}))
        self._spawn("kube-router", [
            "--run-firewall=true", "--run-router=false", "--run-service-proxy=false",
            f"--kubeconfig={pki / 'netpol.kubeconfig'}", f"--hostname-override={NODE_NAME}",
            f"--service-cluster-ip-range={SERVICE_CIDR}", "--health-port=20244", "--metrics-port=0", "--v=1",
        ], binary=self.node_bin / "kube-router")
        self._wait("kube-proxy", lambda: in_netns(lambda: urllib.request.urlopen("http://127.0.0.1:10256/healthz", timeout=2).status == 200))
        self._wait("kube-router", lambda: in_netns(lambda: urllib.request.urlopen("http://127.0.0.1:20244/healthz", timeout=2).status == 200))

    def _start_gpu_nodes(self) -> None:
        if not self.gpu_nodes:
            return
        stages = self.bin_dir.parent / "kwok-stages.yaml"
        self._spawn("kwok", [
            f"--kubeconfig={self.kubeconfig}", "--manage-all-nodes=false",
            "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake", f"--config={stages}",
            f"--node-ip={NODE_IP}",
        ])
        for i in range(self.gpu_nodes):
            self.create_node(f"gpu-node-{i}", gpus=8)
            # As on managed GPU pools: only pods that tolerate GPUs land there, so nothing meant to really run
            # is scheduled onto a node whose "containers" KWOK only pretends to run.
            self.kubectl("taint", "node", f"gpu-node-{i}", f"{GPU_TAINT['key']}={GPU_TAINT['value']}:{GPU_TAINT['effect']}")
        self._wait("kwok", lambda: all(self._node_ready(f"gpu-node-{i}") for i in range(self.gpu_nodes)), timeout=60)

    def _remove_containers(self) -> None:
        """Kill and delete every container of our containerd (its store outlives this cluster)."""
        for cid in self.ctr("containers", "ls", "-q", check=False, timeout=30).stdout.split():
            self.ctr("tasks", "kill", "-s", "SIGKILL", cid, check=False, timeout=30)
            self.ctr("tasks", "delete", "-f", cid, check=False, timeout=30)
            self.ctr("containers", "delete", cid, check=False, timeout=30)

    def _save_state(self) -> None:
        (self.dir / "state.json").write_text(json.dumps({
            "pids": self.pids, "ports": self.ports, "kubeconfig": str(self.kubeconfig), "bin_dir": str(self.bin_dir),
            "node_bin": str(self.node_bin), "real_node": True, "timings": self.timings,
        }, indent=2))

    @classmethod
    def attach(cls, workdir: Path) -> RealNodeCluster:
        state: dict[str, Any] = json.loads((Path(workdir) / "state.json").read_text())
        cluster = cls(workdir=workdir, detached=True)
        cluster.pids, cluster.ports = dict(state["pids"]), dict(state["ports"])
        cluster.bin_dir, cluster.node_bin = Path(state["bin_dir"]), Path(state["node_bin"])
        cluster._sysctls_saved = True
        return cluster


def _cluster_dns() -> list[dict[str, Any]]:
    """CoreDNS as a kube-system Deployment with the read-only RBAC its kubernetes plugin needs."""
    labels = {"k8s-app": "kube-dns"}
    corefile = """.:53 {
    errors
    health :8080
    ready :8181
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }
    cache 30
    loop
    loadbalance
}
"""
    meta = {"name": "coredns", "namespace": "kube-system", "labels": labels}
    pod_spec = {
        "serviceAccountName": "coredns", "dnsPolicy": "Default", "priorityClassName": "system-cluster-critical",
        # Port 53 as a non-root user: a namespaced sysctl instead of a capability (no RUN step sets file caps).
        "securityContext": {"runAsNonRoot": True, "runAsUser": 65532,
                            "sysctls": [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "53"}]},
        "containers": [{
            "name": "coredns", "image": COREDNS_IMAGE, "imagePullPolicy": "Never", "args": ["-conf", "/etc/coredns/Corefile"],
            "ports": [{"name": "dns", "containerPort": 53, "protocol": "UDP"},
                      {"name": "dns-tcp", "containerPort": 53, "protocol": "TCP"}],
            "readinessProbe": {"httpGet": {"path": "/ready", "port": 8181}, "periodSeconds": 2},
            "livenessProbe": {"httpGet": {"path": "/health", "port": 8080}, "periodSeconds": 10},
            "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "170Mi"}},
            "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                "capabilities": {"drop": ["ALL"]}},
            "volumeMounts": [{"name": "config", "mountPath": "/etc/coredns", "readOnly": True}],
        }],
        "volumes": [{"name": "config", "configMap": {"name": "coredns"}}],
    }
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "coredns", "namespace": "kube-system"}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "fedcrm-e2e:coredns"},
         "rules": [{"apiGroups": [""], "resources": ["services", "pods", "namespaces"], "verbs": ["list", "watch"]},
                   {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": "fedcrm-e2e:coredns"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "fedcrm-e2e:coredns"},
         "subjects": [{"kind": "ServiceAccount", "name": "coredns", "namespace": "kube-system"}]},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {"Corefile": corefile}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta,
         "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                  "template": {"metadata": {"labels": labels}, "spec": pod_spec}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "kube-dns", "namespace": "kube-system", "labels": labels},
         "spec": {"selector": labels, "clusterIP": DNS_IP,
                  "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}, {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]}},
    ]


# ---------------------------------------------------------------------- machine-wide cleanup
def _read_sysctl(name: str) -> str:
    return Path("/proc/sys", *name.split(".")).read_text().strip()


def _restore_sysctls() -> None:
    if not SAVED_SYSCTLS.exists():
        return
    for name, value in json.loads(SAVED_SYSCTLS.read_text()).items():
        try:
            Path("/proc/sys", *name.split(".")).write_text(value)
        except OSError:
            pass
    SAVED_SYSCTLS.unlink()


def _clean_machine(workdir: Path | None) -> None:
    """Remove what a real-node cluster leaves on the machine, whether it stopped in order or was killed.

    Only things that are ours by construction are touched: processes inside our
    namespace, shims whose command line names a socket under a ``fedcrm`` folder
    of ours, mounts under ``workdir`` or our containerd store, pod network
    namespaces, the ``kubepods`` cgroups and the namespace itself."""
    if NETNS_PATH.exists():
        pids = _run("ip", "netns", "pids", NETNS, check=False).stdout.split()
        for pid in pids:
            _terminate(int(pid), timeout=5)
    ours = [str(CONTAINERD_ROOT), str(CONTAINERD_STATE)] + ([str(workdir)] if workdir else [])
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace").replace("\0", " ")
        except OSError:
            continue
        if "containerd-shim" in cmdline and str(CONTAINERD_STATE) in cmdline:
            _terminate(int(proc.name), timeout=2)
    mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    prefixes = ours + ["/run/netns/cni-"]
    for mountpoint in sorted((m for m in mounts if any(m.startswith(p) for p in prefixes)), key=len, reverse=True):
        _run("umount", "-l", mountpoint, check=False)
    for netns in Path("/run/netns").glob("cni-*") if Path("/run/netns").exists() else []:
        try:
            netns.unlink()
        except OSError:
            pass
    for controller in Path("/sys/fs/cgroup").iterdir() if Path("/sys/fs/cgroup").exists() else []:
        tree = controller / "kubepods"
        if tree.is_dir() and not tree.is_symlink():
            for directory in sorted((p for p in tree.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
                try:
                    directory.rmdir()
                except OSError:
                    pass
            try:
                tree.rmdir()
            except OSError:
                pass
    if NETNS_PATH.exists():
        _run("ip", "netns", "del", NETNS, check=False)
    shutil.rmtree(CONTAINERD_STATE, ignore_errors=True)
    WORKDIR_RECORD.unlink(missing_ok=True)
    _restore_sysctls()
