"""Shared fixtures: a small synthetic federation written once per session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

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
    """One real PostgreSQL server for the session (Debian's package, see tools/install-postgres)."""
    server = PostgresServer()
    yield server
    server.stop()
