"""tools/setup-venv, which `make demo` and `make test` run first: it says where the time goes, and fails loudly.

A newcomer on a cold machine waits minutes for wheels; the script prints one line
per phase with its duration. These tests run it on a tiny requirement against a
wheel cache of our own making (no registry is contacted).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "setup-venv"


def _wheel_cache() -> Path:
    return Path(os.environ.get("HOME", "~")).expanduser() / ".cache" / "fedcrm" / "wheels"


def _offline_env() -> dict[str, str]:
    """pip reaches no index: an unroutable loopback port, no retries, no user or site config."""
    return {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
            "PIP_RETRIES": "0", "PIP_TIMEOUT": "1", "PIP_FIND_LINKS": ""}


def _run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL, env=_offline_env(), cwd=ROOT)


def test_a_cached_install_reports_each_phase(tmp_path: Path) -> None:
    needed = ["pyyaml-*.whl", "setuptools-*.whl", "wheel-*.whl", "packaging-*.whl"]
    wheels = [next(_wheel_cache().glob(pattern), None) for pattern in needed]
    if any(w is None for w in wheels):
        pytest.fail(f"the wheel cache {_wheel_cache()} lacks {needed}: run `make venv` first (make test does)")
    house = tmp_path / "wheels"
    house.mkdir()
    for wheel in wheels:
        shutil.copy(wheel, house)  # type: ignore[arg-type]
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("PyYAML\n")
    key = hashlib.sha256(requirements.read_bytes()).hexdigest()[:16]
    (house / f".complete-{key}").touch()

    proc = _run(tmp_path / "venv", house, requirements)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"setup: created {tmp_path / 'venv'} with Python 3."), lines
    assert lines[1] == f"setup: installing into {tmp_path / 'venv'} from the cache (offline)", lines
    assert lines[2].startswith("setup: installed in ") and lines[2].endswith(" s"), lines
    probe = subprocess.run([str(tmp_path / "venv" / "bin" / "python"), "-c", "import yaml"], capture_output=True)
    assert probe.returncode == 0


def test_a_failed_download_stops_with_pips_error_and_marks_nothing_complete(tmp_path: Path) -> None:
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("PyYAML==6.0.3\n")
    house = tmp_path / "wheels"
    proc = _run(tmp_path / "venv", house, requirements, "--size-note", "tiny")
    assert proc.returncode != 0
    assert "setup: downloading 1 pinned packages and their dependencies into" in proc.stdout
    assert "(once per version of the pins; tiny)" in proc.stdout
    assert "setup-venv: pip download failed" in proc.stderr
    assert not list(house.glob(".complete-*"))
