"""``fedcrm run``: a whole federation on one machine, as real processes over mutual TLS.

The launcher does what the operator does in a cluster, with processes instead
of pods: it checks consent and every participant's data up front (so a bad
mapping is reported before anything starts), issues a per-run CA and
certificates, starts the aggregator and one node process per participant, and
watches them. A participant process that dies is reported by name and counts
as a dropout; the aggregator decides whether the federation can go on.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedcrm.data.credentials import Credentials
from fedcrm.errors import DataError, FedcrmError, ManifestError
from fedcrm.pki import CertificateAuthority, write_pem_files
from fedcrm.reporting import read_report, write_report
from fedcrm.runconfig import AggregatorConfig, TlsPaths
from fedcrm.spec.loading import ParticipantManifests, check_membership, load_federation, load_participant_manifests, secret_values
from fedcrm.spec.manifests import Federation, Participant

__all__ = ["LoadedFederation", "RunResult", "load_check_inputs", "load_federation_inputs", "load_inputs_data", "run_federation"]

_OUTPUTS = ("pki", "credentials", "logs", "model", "checkpoint", "events.jsonl", "report.json", "report.md",
            "processes.json", "aggregator.json", "aggregator.port", "audit.json", "audit_roc.png")


# How often `fedcrm run` restarts a crashed aggregator before giving up.
_MAX_AGGREGATOR_RESTARTS = 3


@dataclass(frozen=True)
class LoadedFederation:
    federation: Federation
    participants: list[tuple[Participant, Path]]  # manifest and its path
    # Per identity, the keys of the Secret its data source references (absent when it needs none).
    credentials: dict[str, Credentials] = field(default_factory=dict, repr=False)


@dataclass
class RunResult:
    report: dict[str, Any]
    exit_code: int
    crashed: dict[str, str] = field(default_factory=dict)


def _credentials(participant: Participant, manifests: ParticipantManifests) -> Credentials | None:
    """The keys of the Secret ``participant`` references, from the manifests given beside it."""
    values = secret_values(participant, manifests.secrets)
    if values is None:
        return None
    return Credentials(values, origin=f"Secret {participant.metadata.namespace}/{participant.spec.credentials_secret_name()}")


def load_federation_inputs(federation_path: Path, participant_paths: list[Path]) -> LoadedFederation:
    """Parse every manifest (Participants and the Secrets they reference) and check consent, reporting all problems at once."""
    federation = load_federation(federation_path)
    if not participant_paths:
        raise ManifestError("no --participant given; a federation needs at least one Participant manifest")
    manifests = load_participant_manifests(participant_paths)
    problems: list[str] = []
    loaded: list[tuple[Participant, Path]] = []
    credentials: dict[str, Credentials] = {}
    seen: dict[str, Path] = {}
    for participant, path in manifests.participants:
        try:
            check_membership(federation, participant)
            creds = _credentials(participant, manifests)
        except ManifestError as err:
            problems.append(str(err))
            continue
        if participant.identity in seen:
            problems.append(f"{path}: participant {participant.identity} is also defined in {seen[participant.identity]}")
            continue
        seen[participant.identity] = path
        loaded.append((participant, path))
        if creds is not None:
            credentials[participant.identity] = creds
    if not problems and len(loaded) < federation.spec.training.min_participants:
        problems.append(
            f"{len(loaded)} participant(s) given but spec.training.minParticipants is "
            f"{federation.spec.training.min_participants}; add participants or lower minParticipants"
        )
    if problems:
        raise ManifestError("\n".join(problems))
    return LoadedFederation(federation, loaded, credentials)


def load_check_inputs(
    federation_path: Path, participant_paths: list[Path]
) -> tuple[Federation, list[tuple[Participant, Path, Credentials | None]]]:
    """For ``fedcrm data check``: the Federation and each Participant with its file and credentials (or None).

    Unlike a run, no minimum number of participants applies: a tenant checks its own.
    """
    federation = load_federation(federation_path)
    manifests = load_participant_manifests(participant_paths)
    if not manifests.participants:
        raise ManifestError("the files given with --participant hold no Participant manifest")
    out, problems = [], []
    for participant, path in manifests.participants:
        try:
            check_membership(federation, participant)
            out.append((participant, path, _credentials(participant, manifests)))
        except ManifestError as err:
            problems.append(str(err))
    if problems:
        raise ManifestError("\n".join(problems))
    return federation, out


def load_inputs_data(inputs: LoadedFederation) -> dict[str, Any]:
    """Load and map every participant's data in this process; returns CanonicalData per identity."""
    from fedcrm.data.loaders import load_participant_data

    problems, datasets = [], {}
    for participant, path in inputs.participants:
        try:
            datasets[participant.identity] = load_participant_data(
                participant, inputs.federation.spec.task, base_dir=path.resolve().parent,
                credentials=inputs.credentials.get(participant.identity))
        except DataError as err:
            problems.append(str(err))
    if problems:
        raise DataError("\n".join(problems))
    return datasets


def check_participant_data(inputs: LoadedFederation) -> dict[str, int]:
    """Load and map every participant's data (as each node will); returns rows per identity."""
    return {identity: len(data) for identity, data in load_inputs_data(inputs).items()}


def _write_credentials(out: Path, inputs: LoadedFederation) -> dict[str, Path]:
    """Each participant's Secret as the directory of 0600 key files a cluster would mount; removed after the run."""
    from fedcrm.data.credentials import write_credentials_dir

    base = out / "credentials"
    if inputs.credentials:
        base.mkdir(mode=0o700, exist_ok=True)
    return {identity: write_credentials_dir(base / identity.replace("/", "_"), values)
            for identity, values in inputs.credentials.items()}


def _prepare_out_dir(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in _OUTPUTS:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def _issue_certificates(out: Path, inputs: LoadedFederation) -> tuple[TlsPaths, dict[str, TlsPaths]]:
    """A fresh CA per run; its private key is never written to disk."""
    pki = out / "pki"
    ca = CertificateAuthority.create(inputs.federation.key)
    ca_path = pki / "ca.crt"
    pki.mkdir(parents=True, exist_ok=True)
    ca_path.write_bytes(ca.cert_pem)
    cert, key = write_pem_files(pki, "aggregator", ca.issue_server(["localhost", "127.0.0.1", "::1"]))
    server = TlsPaths(ca=ca_path, cert=cert, key=key)
    clients = {}
    for participant, _ in inputs.participants:
        stem = participant.identity.replace("/", "_")
        c, k = write_pem_files(pki / "participants", stem, ca.issue_client(participant.identity))
        clients[participant.identity] = TlsPaths(ca=ca_path, cert=c, key=k)
    return server, clients


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # Many participants share the machine; one thread each avoids oversubscription.
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _last_error_line(log_path: Path, *, or_last_line: bool = False) -> str:
    """The last ERROR message of a process's log (or its last line, for a process that died early)."""
    try:
        lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    for ln in reversed(lines):
        if " ERROR " in ln:
            return ln.split(": ", 1)[-1]
    return lines[-1] if lines and or_last_line else ""


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class _Processes:
    """The aggregator and node processes of one run, stopped together whatever happens."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.aggregator: subprocess.Popen[bytes] | None = None
        self.nodes: dict[str, subprocess.Popen[bytes]] = {}
        self._handles: list[Any] = []

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "ab")
        self._handles.append(log)
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=_child_env())

    def record(self) -> None:
        pids = {"aggregator": self.aggregator.pid if self.aggregator else None}
        pids.update({k: p.pid for k, p in self.nodes.items()})
        (self.out / "processes.json").write_text(json.dumps(pids, indent=2))

    def stop_all(self, grace: float = 5.0) -> None:
        procs = [p for p in [self.aggregator, *self.nodes.values()] if p is not None and p.poll() is None]
        for p in procs:
            p.terminate()
        deadline = time.monotonic() + grace
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for h in self._handles:
            h.close()


def _wait_for_port(procs: _Processes, port_file: Path, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    assert procs.aggregator is not None
    while time.monotonic() < deadline:
        if port_file.exists():
            return int(port_file.read_text())
        if procs.aggregator.poll() is not None:
            reason = _last_error_line(procs.logs / "aggregator.log", or_last_line=True)
            raise FedcrmError(f"the aggregator exited before serving ({_describe_exit(procs.aggregator.returncode)}): {reason}")
        time.sleep(0.05)
    raise FedcrmError(f"the aggregator did not start serving within {timeout:g}s; see {procs.logs / 'aggregator.log'}")


def run_federation(
    inputs: LoadedFederation,
    out: Path,
    *,
    test_data: Path | None,
    progress: Any,
    metrics_port: int | None = None,
) -> RunResult:
    """Run the federation to its end; ``progress`` receives events and process notices.

    ``metrics_port``: the aggregator also serves /healthz, /status and Prometheus /metrics on this loopback port.
    """
    from fedcrm.data.loaders import load_canonical_file

    check_participant_data(inputs)
    test = load_canonical_file(test_data, inputs.federation.spec.task) if test_data else None
    out = out.resolve()
    _prepare_out_dir(out)
    server_tls, client_tls = _issue_certificates(out, inputs)
    credential_dirs = _write_credentials(out, inputs)
    port_file = out / "aggregator.port"
    config = AggregatorConfig(
        federation=inputs.federation,
        participants=[p.identity for p, _ in inputs.participants],
        listen="127.0.0.1:0",
        tls=server_tls,
        out_dir=out,
        port_file=port_file,
        status_listen=f"127.0.0.1:{metrics_port}" if metrics_port else None,
    )
    config.write(out / "aggregator.json")

    procs = _Processes(out)
    crashed: dict[str, str] = {}
    interrupted = False
    aggregator_argv = [sys.executable, "-m", "fedcrm_aggregator", "--config", str(out / "aggregator.json")]
    restarts = 0
    try:
        procs.aggregator = procs.start("aggregator", aggregator_argv)
        port = _wait_for_port(procs, port_file, timeout=60)
        # A restarted aggregator must come back on the same port for the participants to find it.
        config.model_copy(update={"listen": f"127.0.0.1:{port}"}).write(out / "aggregator.json")
        for participant, path in inputs.participants:
            tls = client_tls[participant.identity]
            procs.nodes[participant.identity] = procs.start(
                participant.identity.replace("/", "_"),
                [sys.executable, "-m", "fedcrm_node", "--participant", str(path.resolve()),
                 "--aggregator", f"127.0.0.1:{port}", "--server-name", "localhost",
                 "--ca", str(tls.ca), "--cert", str(tls.cert), "--key", str(tls.key)]
                + (["--credentials", str(credential_dirs[participant.identity])]
                   if participant.identity in credential_dirs else []),
            )
        procs.record()
        events = out / "events.jsonl"
        offset = 0
        while True:
            offset = progress.feed_events(events, offset)
            for identity, p in procs.nodes.items():
                code = p.poll()
                # Exit code 3 is a node leaving because the federation stopped: not a crash of its own.
                if code not in (None, 0, 3) and identity not in crashed:
                    reason = _last_error_line(procs.logs / f"{identity.replace('/', '_')}.log")
                    crashed[identity] = f"{_describe_exit(code)}" + (f": {reason}" if reason else "")
                    progress.participant_exited(identity, crashed[identity])
            code = procs.aggregator.poll()
            if code is not None:
                # 0 succeeded, 1 failed, 2 bad config: final. Anything else is a crash, restarted
                # from the checkpoint as a StatefulSet would restart its pod.
                if code in (0, 1, 2) or restarts >= _MAX_AGGREGATOR_RESTARTS:
                    break
                restarts += 1
                progress.aggregator_restarted(_describe_exit(code), restarts, _MAX_AGGREGATOR_RESTARTS)
                procs.aggregator = procs.start("aggregator", aggregator_argv)
                procs.record()
            time.sleep(0.1)
        progress.feed_events(events, offset)
        # Nodes got FINISH; give them a moment to leave on their own.
        deadline = time.monotonic() + 10
        for p in procs.nodes.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
    except KeyboardInterrupt:
        interrupted = True
    finally:
        procs.stop_all()
        shutil.rmtree(out / "credentials", ignore_errors=True)

    if not (out / "report.json").exists():
        reason = "interrupted" if interrupted else _last_error_line(procs.logs / "aggregator.log", or_last_line=True)
        raise FedcrmError(f"the federation stopped without a report ({reason}); logs are in {procs.logs}")
    report = read_report(out)
    if interrupted:
        report.update(status="failed", partial=True, message="interrupted by the user")
    for p in report["participants"]:
        if p["identity"] in crashed:
            p["message"] = f"process {crashed[p['identity']]}"
    if test is not None and report.get("model_digest"):
        from fedcrm.models.artifacts import load_model
        from fedcrm.models.scoring import score_frame

        metrics = score_frame(load_model(out / "model"), test.frame)
        report["metrics"] = {k: metrics[k] for k in report["metrics"]}
        report["metrics_source"] = "test"
        report["test_rows"] = len(test)
    report["aggregator_restarts"] = restarts
    write_report(out, report)
    return RunResult(report=report, exit_code=0 if report["status"] == "succeeded" else 1, crashed=crashed)
