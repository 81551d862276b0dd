"""``make bench-gan-augmentation QUICK=1``: every setting runs, is audited, and reports finite numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_benchmarks import _assert_finite, _make_quick, _non_finite


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_bench_gan_augmentation_quick_runs_every_setting(tmp_path: Path) -> None:
    _make_quick("bench-gan-augmentation", tmp_path)
    out = json.loads((tmp_path / "gan_augmentation.json").read_text())
    assert not _non_finite(out)
    assert set(out["results"]) == {"federated", "gan", "gan-dp"}
    for name, row in out["results"].items():
        _assert_finite(row, ["accuracy", "f1", "auc", "mia_loss_auc", "mia_shadow_auc"], name)
    assert out["results"]["federated"]["synthetic_rows"] == 0
    assert out["results"]["gan"]["synthetic_rows"] > 0
    assert all(0 < run["gan_epsilon_max"] <= 3.0 for run in out["results"]["gan-dp"]["runs"])
    assert "| gan-dp |" in (tmp_path / "gan_augmentation.md").read_text()
