"""A whole federation with 8-bit quantized updates (``quantizationBits``): it learns, and uploads far less."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from test_local_federation import _run

from fedcrm.data.synthetic import SynthResult

pytestmark = pytest.mark.slow


def test_an_8_bit_federation_trains_and_uploads_under_40_percent_of_the_unquantized_one(
        small_federation: SynthResult, tmp_path: Path) -> None:
    runs = {}
    for q in (None, 8):
        doc = yaml.safe_load(small_federation.federation_path.read_text())
        doc["spec"].setdefault("model", {})["hidden"] = [256, 128]  # the update, not the key exchange, dominates
        secure = {"enabled": True, "neighbours": "complete"}
        if q is not None:
            secure["quantizationBits"] = q
        doc["spec"]["privacy"] = {"secureAggregation": secure}
        fed = tmp_path / f"fed-{q}.yaml"
        fed.write_text(yaml.safe_dump(doc))
        proc = _run(fed, small_federation, tmp_path / f"out-{q}")
        assert proc.returncode == 0, proc.stderr + proc.stdout
        runs[q] = json.loads((tmp_path / f"out-{q}" / "report.json").read_text())
    full, eight = runs[None], runs[8]
    assert eight["status"] == "succeeded" and eight["rounds_completed"] == 3
    assert eight["metrics"]["accuracy"] > 0.75 and eight["metrics"]["auc"] > 0.8  # it learned
    assert eight["metrics"]["accuracy"] == pytest.approx(full["metrics"]["accuracy"], abs=0.03)
    assert eight["history"][-1]["loss"] < eight["history"][0]["loss"]
    # 3 members: modulo 2^(8 + 2), 10 bits an element on the wire against 32
    for e, f in zip(eight["history"], full["history"]):
        assert e["bytes_up_per_client"] < 0.4 * f["bytes_up_per_client"]


def test_a_federation_keeping_a_quarter_of_each_8_bit_update_trains_and_uploads_about_a_quarter(
        small_federation: SynthResult, tmp_path: Path) -> None:
    """keepFraction 0.25 on top of quantizationBits 8: the same support everywhere, so the masks cancel, and the
    model learns about as well as the dense 8-bit one (3 rounds of a quarter of the coordinates each, rescaled by
    4: rescaleKept), with about a quarter of the upload."""
    runs = {}
    for keep in (1.0, 0.25):
        doc = yaml.safe_load(small_federation.federation_path.read_text())
        doc["spec"].setdefault("model", {})["hidden"] = [256, 128]
        doc["spec"]["privacy"] = {"secureAggregation": {"enabled": True, "neighbours": "complete",
                                                        "quantizationBits": 8, "keepFraction": keep}}
        fed = tmp_path / f"fed-{keep}.yaml"
        fed.write_text(yaml.safe_dump(doc))
        proc = _run(fed, small_federation, tmp_path / f"out-{keep}")
        assert proc.returncode == 0, proc.stderr + proc.stdout
        runs[keep] = json.loads((tmp_path / f"out-{keep}" / "report.json").read_text())
    dense, sparse = runs[1.0], runs[0.25]
    assert sparse["status"] == "succeeded" and sparse["rounds_completed"] == 3
    assert sparse["history"][-1]["loss"] < sparse["history"][0]["loss"]  # it learned
    assert sparse["metrics"]["accuracy"] > 0.75 and sparse["metrics"]["auc"] > 0.8
    assert sparse["metrics"]["auc"] == pytest.approx(dense["metrics"]["auc"], abs=0.05)
    for s, d in zip(sparse["history"], dense["history"]):
        # the masked vector is a quarter; keys, shares and signatures are not, so a little more than a quarter
        assert 0.2 * d["bytes_up_per_client"] < s["bytes_up_per_client"] < 0.35 * d["bytes_up_per_client"]
