"""Shared fixtures: a small synthetic federation, a PostgreSQL server and a Kubernetes control plane per session."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from controlplane import ControlPlane  # noqa: E402

from fedcrm.data.synthetic import SynthResult, generate_federation
from postgres_server import PostgresServer


@pytest.fixture(scope="session")
def small_federation(tmp_path_factory: pytest.TempPathFactory) -> SynthResult:
    """Three enterprises x 400 leads, three rounds: big enough to learn, small enough to run in seconds."""
    return generate_federation(tmp_path_factory.mktemp("synth") / "fed", clients=3, rows=400, seed=11, rounds=3)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One real PostgreSQL server for the session (Debian's package, see tools/install-system-packages)."""
    server = PostgresServer()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def control_plane() -> Iterator[ControlPlane]:
    """etcd, kube-apiserver, controller-manager, scheduler and KWOK (2 GPU nodes with 8 GPUs each, 2 CPU nodes),
    shared by the session's cluster tests and stopped at the end. FEDCRM_KEEP_CLUSTER=1 keeps its folder (logs)."""
    import os

    cp = ControlPlane(gpu_nodes=2, cpu_nodes=2, keep=os.environ.get("FEDCRM_KEEP_CLUSTER") == "1").start()
    try:
        yield cp
    finally:
        cp.stop()
