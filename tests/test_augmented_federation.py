"""A whole federation with GAN augmentation on (``fedcrm run``): rows added per class, nothing synthetic sent."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedcrm.data.synthetic import SynthResult

pytestmark = pytest.mark.slow

FEDCRM = [sys.executable, "-m", "fedcrm.cli.main"]


def test_participants_train_on_synthetic_rows_and_send_only_real_counts(small_federation: SynthResult,
                                                                      tmp_path: Path) -> None:
    doc = yaml.safe_load(small_federation.federation_path.read_text())
    doc["spec"]["training"]["rounds"] = 2
    doc["spec"]["augmentation"] = {"gan": {"enabled": True, "epochs": 30, "syntheticRatio": 0.5}}
    fed = tmp_path / "federation.yaml"
    fed.write_text(yaml.safe_dump(doc))
    out = tmp_path / "out"
    proc = subprocess.run([*FEDCRM, "run", "--federation", str(fed), "--participant",
                           *map(str, small_federation.participant_paths), "--test-data",
                           str(small_federation.test_path), "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert json.loads((out / "report.json").read_text())["rounds_completed"] == 2
    real_total = 0
    logs = sorted((out / "logs").glob("tenant-*.log"))
    assert len(logs) == 3
    for path in logs:
        text = path.read_text()
        real = int(re.search(r"joined \S+ \(terms \w+\) with (\d+) training", text).group(1))  # type: ignore[union-attr]
        added = re.search(r"augmentation: GAN trained on (\d+) real training rows .*; added (\d+) synthetic rows "
                          r"\(class 0: (\d+), class 1: (\d+)\) to local training only", text)
        assert added, text[-3000:]
        assert int(added.group(1)) == real and int(added.group(2)) == int(added.group(3)) + int(added.group(4)) > 0
        assert int(added.group(2)) == round(0.5 * real)
        assert "augmentation privacy: the GAN is not differentially private" in text
        # What each round reports (and sends as FedAvg's weight) is the real rows, not real + synthetic.
        trained = [int(n) for n in re.findall(r"round \d+: trained on (\d+) rows", text)]
        assert trained == [real, real], text[-3000:]
        real_total += real
    # The statistics were summed before any synthetic row existed: the pooled count is the real rows'.
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert [e["rows"] for e in events if e["event"] == "statistics"] == [real_total]
