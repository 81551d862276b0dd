"""An aggregator run in the test's own process, and real participant processes dialling it.

Tests that play a deviating aggregator (or watch an honest one refuse a hostile participant) need to reach
into the coordinator: announce one Federation and run another, spy on what it receives.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from fedcrm.data.synthetic import SynthResult
from fedcrm.pki import CertificateAuthority, write_pem_files
from fedcrm.protocol import pb
from fedcrm.runconfig import AggregatorConfig, TlsPaths
from fedcrm.spec.manifests import Federation

__all__ = ["aggregators", "finish", "identities", "start_nodes"]


@contextmanager
def aggregators(tmp_path: Path) -> Iterator[Any]:
    """Yield ``start(announced, actual, participants) -> (coordinator, port, ca)``; every one is stopped after."""
    from fedcrm_aggregator.coordinator import Coordinator
    from fedcrm_aggregator.server import start_server

    started: list[tuple[Any, Any, threading.Thread]] = []

    def start(announced: Federation, actual: Federation, participants: list[str]) -> tuple[Any, int, CertificateAuthority]:
        ca = CertificateAuthority.create("test")
        (tmp_path / "ca.crt").write_bytes(ca.cert_pem)
        cert, key = write_pem_files(tmp_path, "server", ca.issue_server(["localhost", "127.0.0.1"]))
        out = tmp_path / "aggregator"
        out.mkdir()
        config = AggregatorConfig(federation=actual, participants=participants, listen="127.0.0.1:0",
                                  tls=TlsPaths(ca=tmp_path / "ca.crt", cert=cert, key=key), out_dir=out)
        coordinator = Coordinator(actual, participants, out)
        coordinator.federation = announced  # WELCOME carries ``announced``; the rounds follow ``actual``
        plain_fits: list[str] = []
        receive = coordinator._receive_plain_fit

        def spy(identity: str, message: Any) -> Any:
            plain_fits.append(identity)
            return receive(identity, message)

        coordinator._receive_plain_fit = spy  # type: ignore[method-assign]
        coordinator.plain_fits = plain_fits  # type: ignore[attr-defined]
        # Every statistics answer as it reached the aggregator, before any check: (identity, StatisticsResult).
        statistics: list[tuple[str, Any]] = []
        submit = coordinator.submit

        def spy_submit(kind: int, identity: str, message: Any) -> Any:
            if kind == pb.Task.STATISTICS:
                copy = pb.StatisticsResult()
                copy.CopyFrom(message)
                statistics.append((identity, copy))
            return submit(kind, identity, message)

        coordinator.submit = spy_submit  # type: ignore[method-assign]
        coordinator.statistics_received = statistics  # type: ignore[attr-defined]
        server, port = start_server(config, coordinator)
        thread = threading.Thread(target=coordinator.run, daemon=True)
        thread.start()
        started.append((server, coordinator, thread))
        return coordinator, port, ca

    try:
        yield start
    finally:
        for server, coordinator, thread in started:
            thread.join(timeout=60)
            server.stop(grace=0).wait()
            coordinator.close()


def identities(small: SynthResult) -> list[str]:
    docs = [yaml.safe_load(p.read_text())["metadata"] for p in small.participant_paths]
    return [f"{d['namespace']}/{d['name']}" for d in docs]


def client_tls(ca: CertificateAuthority, identity: str, folder: Path) -> tuple[Path, Path]:
    """A participant certificate and key issued by ``ca``."""
    return write_pem_files(folder, "client", ca.issue_client(identity))


def start_nodes(small: SynthResult, own: Path, port: int, ca: CertificateAuthority, tmp_path: Path,
                participants: list[Path] | None = None, extra: list[list[str]] | None = None) -> list[subprocess.Popen[str]]:
    """``python -m fedcrm_node`` per participant manifest (all of ``small`` by default), own terms from ``own``;
    ``extra``: more arguments, per node."""
    procs = []
    manifests = small.participant_paths if participants is None else participants
    for i, (participant, identity) in enumerate(zip(manifests, identities(small))):
        cert, key = client_tls(ca, identity, tmp_path / f"p{i}")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "fedcrm_node", "--participant", str(participant), "--federation", str(own),
             "--aggregator", f"127.0.0.1:{port}", "--server-name", "localhost", "--ca", str(tmp_path / "ca.crt"),
             "--cert", str(cert), "--key", str(key), "--connect-timeout", "20", *(extra[i] if extra else [])],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))
    return procs


def finish(procs: list[subprocess.Popen[str]]) -> list[tuple[int, str]]:
    """(exit code, output) of every process, waiting at most five minutes each."""
    out = []
    for p in procs:
        stdout, _ = p.communicate(timeout=300)
        out.append((p.returncode, stdout))
    return out
