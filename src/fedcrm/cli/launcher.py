"""``fedcrm run``: a whole federation on one machine, as real processes over mutual TLS.

The launcher does what the operator does in a cluster, with processes instead
of pods: it checks consent, issues a per-run CA and certificates, starts the
aggregator and one node process per participant, and watches them. As the
enrolment check does in a pod, each participant loads and maps its own data
against its own copy of the Federation before dialling the aggregator; the
launcher waits for every participant's verdict (and the held-out file's) and
stops the run with all their problems at once, before any round. A participant
process that dies later is reported by name and counts as a dropout; the
aggregator decides whether the federation can go on.

Participants and the held-out scorer are forked from one warm interpreter (see
:mod:`fedcrm.cli.children`); the launcher itself imports neither torch nor
pandas and holds no participant's records.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedcrm.cli.children import Child, Warm, start_subprocess
from fedcrm.data.credentials import Credentials
from fedcrm.errors import DataError, FedcrmError, ManifestError
from fedcrm.exit_codes import NodeExitCode
from fedcrm.files import atomic_write
from fedcrm.pki import CertificateAuthority, write_pem_files
from fedcrm.reporting import read_report, write_report
from fedcrm.runconfig import AggregatorConfig, TlsPaths
from fedcrm.spec.loading import ParticipantManifests, check_membership, load_federation, load_participant_manifests, secret_values
from fedcrm.spec.manifests import Federation, Participant, Task

__all__ = ["RUN_OUTPUTS", "LoadedFederation", "RunResult", "load_check_inputs", "load_federation_inputs", "run_federation"]

#: Every top-level name a run may write in its output folder; a rerun clears them (and nothing else).
RUN_OUTPUTS = ("pki", "credentials", "logs", "model", "checkpoint", "events.jsonl", "report.json", "report.md",
               "processes.json", "aggregator.json", "aggregator.port", "audit.json", "audit_roc.png", "ready",
               "participants")


# How often `fedcrm run` restarts a crashed aggregator before giving up.
_MAX_AGGREGATOR_RESTARTS = 3


@dataclass(frozen=True)
class LoadedFederation:
    federation: Federation
    federation_path: Path
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
    tenants: dict[str, str] = {}  # namespace -> the participant it joins with
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
        namespace = participant.metadata.namespace
        if namespace in tenants:
            problems.append(
                f"{path}: participant {participant.identity} is in namespace {namespace!r} like {tenants[namespace]}; "
                "a tenant takes part once (minParticipants and secure aggregation count tenants)"
            )
            continue
        seen[participant.identity] = path
        tenants[namespace] = participant.identity
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
    return LoadedFederation(federation, federation_path, loaded, credentials)


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
    for name in RUN_OUTPUTS:
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


def _personalization(folder: Path, identities: list[str]) -> dict[str, Any]:
    """What each participant wrote for itself after fine-tuning (on one machine the launcher can read it; in a
    cluster it stays in the participant's log)."""
    out: dict[str, Any] = {}
    for identity in identities:
        path = folder / f"{_stem(identity)}.json"
        if path.exists():
            data = json.loads(path.read_text())
            out[identity] = {k: data[k] for k in ("epochs", "validation_rows", "global", "personalized")}
    return out


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


# The modules a participant imports, loaded once by the forkserver; opacus too when DP-SGD is on.
_NODE_PRELOAD = ["fedcrm_node.preload"]


def _preload(federation: Federation) -> list[str]:
    return _NODE_PRELOAD + (["opacus"] if federation.spec.privacy.differential_privacy.mode == "sample" else [])


class _Processes:
    """The aggregator, node and scorer processes of one run, stopped together whatever happens."""

    def __init__(self, out: Path, warm: Warm) -> None:
        self.out = out
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.warm = warm
        self.aggregator: subprocess.Popen[bytes] | None = None
        self.nodes: dict[str, Child] = {}
        self.scorer: Child | None = None

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def start_aggregator(self, argv: list[str]) -> None:
        self.aggregator = start_subprocess("fedcrm_aggregator", argv, self.log("aggregator"))

    def start_node(self, identity: str, argv: list[str]) -> None:
        self.nodes[identity] = self.warm.run_module("fedcrm_node", argv, self.log(_stem(identity)))

    def record(self) -> None:
        pids = {"aggregator": self.aggregator.pid if self.aggregator else None}
        pids.update({k: p.pid for k, p in self.nodes.items()})
        atomic_write(self.out / "processes.json", json.dumps(pids, indent=2).encode())

    def stop_all(self, grace: float = 5.0) -> None:
        procs = [p for p in [self.aggregator, *self.nodes.values(), self.scorer] if p is not None and p.poll() is None]
        for p in procs:
            p.terminate()
        deadline = time.monotonic() + grace
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _stem(identity: str) -> str:
    return identity.replace("/", "_")


class _HeldOut:
    """The held-out scorer child: loads and checks the test file at once, scores the final model at the end."""

    def __init__(self, procs: _Processes, test_data: Path, task: Task) -> None:
        self._conn, child_end = procs.warm.pipe()
        procs.scorer = procs.warm.call("fedcrm.cli.held_out", "serve", procs.log("held-out-scorer"),
                                       child_end, str(test_data), task)
        child_end.close()
        # The scorer's first answer: {"rows": n}, or {"problem": message} for a file that does not fit.
        while not self._conn.poll(0.05):
            if procs.scorer.poll() is not None:
                raise FedcrmError(f"the held-out scorer exited early; see {procs.log('held-out-scorer')}")
        loaded = self._conn.recv()
        if "problem" in loaded:
            raise DataError(loaded["problem"])
        self.rows = int(loaded["rows"])

    def score(self, model_dir: Path) -> dict[str, Any]:
        self._conn.send(str(model_dir))
        reply = self._conn.recv()
        if "problem" in reply:
            raise FedcrmError(f"scoring the final model on the held-out rows failed: {reply['problem']}")
        return dict(reply["metrics"])

    def close(self) -> None:
        try:
            self._conn.send(None)
        except OSError:
            pass
        self._conn.close()


def _read_ready(path: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads(path.read_text()))
    except FileNotFoundError:
        return None


def _await_data_checks(procs: _Processes, ready_dir: Path, progress: Any) -> None:
    """Wait until every participant has loaded its data or failed to; raise all their problems at once.

    No round can start before: the aggregator waits for every expected participant to enrol, and a
    participant whose data does not fit exits before it dials the aggregator.
    """
    pending = set(procs.nodes)
    rows: dict[str, int] = {}
    problems: dict[str, str] = {}
    while pending:
        for identity in sorted(pending):
            verdict = _read_ready(ready_dir / f"{_stem(identity)}.json")
            if verdict is not None:
                pending.discard(identity)
                if "problem" in verdict:
                    problems[identity] = verdict["problem"]
                else:
                    rows[identity] = int(verdict["rows"])
            elif procs.nodes[identity].poll() is not None:
                pending.discard(identity)  # died before a verdict: reported as a crash by the run loop
        if procs.aggregator is not None and procs.aggregator.poll() is not None:
            return  # the run loop reports what became of the aggregator
        time.sleep(0.05)
    if problems:
        raise DataError("\n".join(problems[k] for k in sorted(problems)))
    progress.data_checked(rows)


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
    Raises :class:`DataError` with every participant's data problems (and the held-out file's) before any round.
    """
    out = out.resolve()
    _prepare_out_dir(out)
    warm = Warm(_preload(inputs.federation))
    warm.start()  # the forkserver imports torch while certificates are issued and the aggregator starts
    server_tls, client_tls = _issue_certificates(out, inputs)
    credential_dirs = _write_credentials(out, inputs)
    port_file = out / "aggregator.port"
    ready_dir = out / "ready"
    ready_dir.mkdir()
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

    procs = _Processes(out, warm)
    held_out: _HeldOut | None = None
    crashed: dict[str, str] = {}
    interrupted = False
    aggregator_argv = ["--config", str(out / "aggregator.json")]
    restarts = 0
    try:
        procs.start_aggregator(aggregator_argv)
        port = _wait_for_port(procs, port_file, timeout=60)
        # A restarted aggregator must come back on the same port for the participants to find it.
        config.model_copy(update={"listen": f"127.0.0.1:{port}"}).write(out / "aggregator.json")
        if test_data is not None:
            # Checked before any participant can enrol, so a bad held-out file stops the run before round 1.
            held_out = _HeldOut(procs, test_data, inputs.federation.spec.task)
        for participant, path in inputs.participants:
            tls = client_tls[participant.identity]
            procs.start_node(
                participant.identity,
                # Its own copy of the Federation, as a pod has it mounted: the data is checked against its task.
                ["--participant", str(path.resolve()), "--federation", str(inputs.federation_path.resolve()),
                 "--ready-file", str(ready_dir / f"{_stem(participant.identity)}.json"),
                 "--report-file", str(out / "participants" / f"{_stem(participant.identity)}.json"),
                 "--aggregator", f"127.0.0.1:{port}", "--server-name", "localhost",
                 "--ca", str(tls.ca), "--cert", str(tls.cert), "--key", str(tls.key)]
                + (["--credentials", str(credential_dirs[participant.identity])]
                   if participant.identity in credential_dirs else []),
            )
        procs.record()
        _await_data_checks(procs, ready_dir, progress)
        events = out / "events.jsonl"
        offset = 0
        while True:
            offset = progress.feed_events(events, offset)
            for identity, p in procs.nodes.items():
                code = p.poll()
                # A node leaving because the federation stopped is not a crash of its own.
                if code not in (None, NodeExitCode.SUCCEEDED, NodeExitCode.STOPPED) and identity not in crashed:
                    reason = _last_error_line(procs.log(_stem(identity)))
                    crashed[identity] = f"{_describe_exit(code)}" + (f": {reason}" if reason else "")
                    progress.participant_exited(identity, crashed[identity])
            code = procs.aggregator.poll()  # type: ignore[union-attr]
            if code is not None:
                # 0 succeeded, 1 failed, 2 bad config: final. Anything else is a crash, restarted
                # from the checkpoint as a StatefulSet would restart its pod.
                if code in (0, 1, 2) or restarts >= _MAX_AGGREGATOR_RESTARTS:
                    break
                restarts += 1
                progress.aggregator_restarted(_describe_exit(code), restarts, _MAX_AGGREGATOR_RESTARTS)
                procs.start_aggregator(aggregator_argv)
                procs.record()
            time.sleep(0.1)
        progress.feed_events(events, offset)
        # Nodes got FINISH; give them a moment to leave on their own (longer while they fine-tune their own copy).
        deadline = time.monotonic() + 10 + (300 if inputs.federation.spec.training.personalization_epochs else 0)
        for p in procs.nodes.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        report = read_report(out) if (out / "report.json").exists() else None
        if held_out is not None and report is not None and report.get("model_digest"):
            report["metrics"] = {k: v for k, v in held_out.score(out / "model").items() if k in report["metrics"]}
            report["metrics_source"] = "test"
            report["test_rows"] = held_out.rows
    except KeyboardInterrupt:
        interrupted = True
        report = read_report(out) if (out / "report.json").exists() else None
    finally:
        if held_out is not None:
            held_out.close()
        procs.stop_all()
        shutil.rmtree(out / "credentials", ignore_errors=True)

    if report is None:
        reason = "interrupted" if interrupted else _last_error_line(procs.log("aggregator"), or_last_line=True)
        raise FedcrmError(f"the federation stopped without a report ({reason}); logs are in {procs.logs}")
    if interrupted:
        report.update(status="failed", partial=True, message="interrupted by the user")
    for p in report["participants"]:
        if p["identity"] in crashed:
            p["message"] = f"process {crashed[p['identity']]}"
    report["aggregator_restarts"] = restarts
    personalized = _personalization(out / "participants", [p.identity for p, _ in inputs.participants])
    if personalized:
        report["personalization"] = personalized
    write_report(out, report)
    return RunResult(report=report, exit_code=0 if report["status"] == "succeeded" else 1, crashed=crashed)
