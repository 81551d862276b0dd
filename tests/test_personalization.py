"""Personalization: each participant fine-tunes the final global model on its own rows and keeps the result."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from fedcrm.data.synthetic import SynthResult
from fedcrm.models.layout import ModelLayout
from fedcrm.models.mlp import TabularMLP, get_flat
from fedcrm.training.local import train_epochs
from fedcrm.training.personalization import personalize
from fedcrm.training.preprocessing import EncodedData


def _data(n: int, flip: bool, seed: int) -> EncodedData:
    """One numeric feature that decides the label; ``flip`` reverses the rule (a tenant unlike the others)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 1)).astype(np.float32)
    y = ((x[:, 0] > 0) ^ flip).astype(np.float32)
    return EncodedData(dense=x, categorical=np.zeros((n, 0), dtype=np.int64), labels=y)


def _layout() -> ModelLayout:
    return ModelLayout(dense_width=1, vocab_sizes=(), embedding_widths=(), hidden=(8,))


def test_fine_tuning_adapts_the_global_model_to_a_tenant_unlike_the_others() -> None:
    layout = _layout()
    torch.manual_seed(0)
    model = TabularMLP(layout)
    train_epochs(model, _data(2000, flip=False, seed=1), epochs=20, batch_size=64, learning_rate=0.01, seed=1)
    global_weights = get_flat(model)  # what the federation learned: the majority's rule
    own_train, own_validation = _data(400, flip=True, seed=2), _data(200, flip=True, seed=3)

    result = personalize(layout, global_weights, own_train, own_validation, epochs=30, batch_size=32,
                         learning_rate=0.05, seed=0, identity="t/odd")

    assert result.validation_rows == 200 and result.epochs == 30
    assert result.global_metrics["accuracy"] is not None and result.global_metrics["accuracy"] < 0.1
    assert result.personalized_metrics["accuracy"] is not None and result.personalized_metrics["accuracy"] > 0.95
    assert not np.array_equal(result.weights, global_weights)
    again = personalize(layout, global_weights, own_train, own_validation, epochs=30, batch_size=32,
                        learning_rate=0.05, seed=0, identity="t/odd")
    assert np.array_equal(again.weights, result.weights)  # seeded: the same run gives the same model
    with pytest.raises(ValueError, match="at least one epoch"):
        personalize(layout, global_weights, own_train, own_validation, epochs=0, batch_size=32,
                    learning_rate=0.01, seed=0, identity="t/odd")


@pytest.mark.slow
def test_a_federation_reports_each_participants_personalized_metrics_without_sending_them(
        small_federation: SynthResult, tmp_path: Path) -> None:
    doc = yaml.safe_load(small_federation.federation_path.read_text())
    doc["spec"]["training"]["personalizationEpochs"] = 2
    fed = tmp_path / "federation.yaml"
    fed.write_text(yaml.safe_dump(doc))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "fedcrm.cli.main", "run", "--federation", str(fed),
                           "--participant", *map(str, small_federation.participant_paths), "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    report = json.loads((out / "report.json").read_text())
    identities = {p["identity"] for p in report["participants"]}
    assert set(report["personalization"]) == identities
    for identity, r in report["personalization"].items():
        assert r["epochs"] == 2 and r["validation_rows"] > 0
        assert 0 <= r["global"]["accuracy"] <= 1 and 0 <= r["personalized"]["accuracy"] <= 1
        stem = identity.replace("/", "_")
        assert (out / "participants" / f"{stem}.npy").exists()  # the personalized model, kept by its owner
        assert "personalized: 2 epochs on the global model of round 3" in (out / "logs" / f"{stem}.log").read_text()
    assert "personalized" not in (out / "logs" / "aggregator.log").read_text()
    assert "personalized" not in (out / "events.jsonl").read_text()  # the aggregator never heard of it
    assert "Accuracy global → personalized" in (out / "report.md").read_text()
