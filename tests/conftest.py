"""Shared fixtures: a small synthetic federation written once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedcrm.data.synthetic import SynthResult, generate_federation


@pytest.fixture(scope="session")
def small_federation(tmp_path_factory: pytest.TempPathFactory) -> SynthResult:
    """Three enterprises x 400 leads, three rounds: big enough to learn, small enough to run in seconds."""
    return generate_federation(tmp_path_factory.mktemp("synth") / "fed", clients=3, rows=400, seed=11, rounds=3)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
