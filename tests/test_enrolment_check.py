"""The enrolment check the operator runs as the training pod's init container: ``fedcrm-node --check-only``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from fedcrm.data.synthetic import SynthResult


def _check(participant: Path, federation: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedcrm_node", "--participant", str(participant), "--check-only", str(federation), *extra],
        capture_output=True, text=True, timeout=120,
    )


def test_fitting_data_passes(small_federation: SynthResult) -> None:
    proc = _check(small_federation.participant_paths[0], small_federation.federation_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "data check passed" in proc.stderr


def test_a_wrong_mapping_fails_with_what_to_fix_and_no_traceback(small_federation: SynthResult, tmp_path: Path) -> None:
    doc = yaml.safe_load(small_federation.participant_paths[0].read_text())
    target = next(iter(k for k in doc["spec"]["data"]["mapping"] if k == "converted"))
    doc["spec"]["data"]["mapping"][target] = "NoSuchColumn"
    broken = small_federation.participant_paths[0].parent / "broken.yaml"
    broken.write_text(yaml.safe_dump(doc))
    proc = _check(broken, small_federation.federation_path)
    assert proc.returncode == 2
    assert "NoSuchColumn" in proc.stdout and "Traceback" not in proc.stdout + proc.stderr


def test_a_pvc_source_reads_from_the_mounted_claim(small_federation: SynthResult, tmp_path: Path) -> None:
    doc = yaml.safe_load(small_federation.participant_paths[0].read_text())
    source = small_federation.participant_paths[0].parent / doc["spec"]["data"].pop("file")["path"]
    claim = tmp_path / "claim"
    claim.mkdir()
    (claim / "exports").mkdir()
    (claim / "exports" / "leads.csv").write_bytes(source.read_bytes())
    doc["spec"]["data"]["pvc"] = {"claimName": "crm-data", "path": "exports/leads.csv"}
    manifest = tmp_path / "participant.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    assert _check(manifest, small_federation.federation_path, "--data-root", str(claim)).returncode == 0
    missing = _check(manifest, small_federation.federation_path, "--data-root", str(tmp_path / "elsewhere"))
    assert missing.returncode == 2 and "spec.data.pvc" in missing.stdout
