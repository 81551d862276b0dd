"""The synthetic federation: deterministic, loadable through the real manifests, really heterogeneous.

These tests go through the same path a tenant's data takes (Participant
manifest -> ``load_participant_data``) and compare what comes out with the
generator's own pre-blank truth, so a wrong spelling table or unit transform
in a generated manifest fails here rather than as a quietly worse model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedcrm.data import synthetic
from fedcrm.data.loaders import load_canonical_file, load_participant_data
from fedcrm.data.synthetic import (
    LEAD_CONVERSION_TASK,
    SynthResult,
    canonical_task,
    conversion_probability,
    generate_federation,
)
from fedcrm.errors import FedcrmError
from fedcrm.spec.loading import load_federation, load_participant
from fedcrm.spec.manifests import FeatureType

CLIENTS = 4
ROWS = 300
SEED = 7


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> SynthResult:
    return generate_federation(tmp_path_factory.mktemp("fed") / "out", clients=CLIENTS, rows=ROWS, seed=SEED)


@pytest.fixture(scope="module")
def simulation() -> synthetic._Simulation:
    """The in-memory truth behind ``generated`` (same arguments, so the same draws)."""
    return synthetic._simulate(clients=CLIENTS, rows=ROWS, seed=SEED)


def test_layout_and_federation_manifest(generated: SynthResult) -> None:
    out = generated.out_dir
    namespaces = [f"tenant-{i:02d}" for i in range(1, CLIENTS + 1)]
    assert generated.federation_path == out / "federation.yaml"
    assert generated.test_path == out / "test.csv"
    assert generated.participant_paths == [out / "participants" / f"{ns}.yaml" for ns in namespaces]
    for ns in namespaces:
        assert (out / "data" / ns / "leads.csv").is_file()
    readme = (out / "README.md").read_text(encoding="utf-8")
    assert "fedcrm run --federation federation.yaml" in readme
    assert 5 <= len([line for line in readme.splitlines() if line.strip()]) <= 10

    fed = load_federation(generated.federation_path)
    assert (fed.metadata.name, fed.metadata.namespace) == ("lead-conversion", "fedcrm-system")
    assert fed.spec.task == canonical_task() == LEAD_CONVERSION_TASK
    assert fed.spec.participants.namespaces == namespaces
    assert fed.spec.model.hidden == [64, 32]
    t = fed.spec.training
    assert (t.rounds, t.local_epochs, t.batch_size, t.learning_rate) == (20, 1, 64, 0.005)
    assert (t.min_participants, t.round_timeout_seconds, t.seed) == (2, 120, SEED)
    assert all(f.description for f in fed.spec.task.features)

    names = set()
    for path, ns in zip(generated.participant_paths, namespaces):
        participant = load_participant(path)
        assert participant.metadata.namespace == ns
        assert participant.spec.federation_ref.name == "lead-conversion"
        assert participant.spec.federation_ref.namespace == "fedcrm-system"
        assert participant.spec.data.file.path == f"../data/{ns}/leads.csv"
        names.add(participant.metadata.name)
    assert len(names) == CLIENTS


def test_same_seed_same_bytes_other_seed_other_data(generated: SynthResult, tmp_path: Path) -> None:
    again = generate_federation(tmp_path / "again", clients=CLIENTS, rows=ROWS, seed=SEED)
    assert _files(again.out_dir) == _files(generated.out_dir)

    other = generate_federation(tmp_path / "other", clients=CLIENTS, rows=ROWS, seed=SEED + 1)
    assert other.test_path.read_bytes() != generated.test_path.read_bytes()
    for ns in (f"tenant-{i:02d}" for i in range(1, CLIENTS + 1)):
        a = (generated.out_dir / "data" / ns / "leads.csv").read_bytes()
        b = (other.out_dir / "data" / ns / "leads.csv").read_bytes()
        assert a != b


def test_every_participant_maps_back_to_the_truth(generated: SynthResult, simulation: synthetic._Simulation) -> None:
    task = load_federation(generated.federation_path).spec.task
    blank_cells = 0
    feature_cells = 0
    for path, client in zip(generated.participant_paths, simulation.clients):
        data = load_participant_data(load_participant(path), task, base_dir=path.parent)
        frame = data.frame
        assert len(frame) == ROWS and data.dropped_unlabelled == 0
        assert list(frame.columns) == task.field_names
        truth = client.frame
        assert (frame[task.target].to_numpy() == truth[task.target].to_numpy().astype("int8")).all()
        mapping = load_participant(path).spec.data.mapping
        for feature in task.features:
            got = frame[feature.name]
            if feature.name not in mapping:
                assert got.isna().all(), f"{client.namespace}: unmapped {feature.name} should be missing"
                continue
            blank = client.blank[feature.name].to_numpy()
            assert (got.isna().to_numpy() == blank).all(), f"{client.namespace}: {feature.name} blanks differ"
            blank_cells += int(blank.sum())
            feature_cells += len(blank)
            kept, expected = got[~blank], truth[feature.name][~blank]
            if feature.type is FeatureType.numeric:
                # Local units are rounded (revenue to $100, weeks to 0.01): within a few tens of units.
                np.testing.assert_allclose(kept.to_numpy(float), expected.to_numpy(float), rtol=1e-3, atol=60)
            elif feature.type is FeatureType.boolean:
                assert (kept.to_numpy(float) == expected.to_numpy(float)).all()
            else:
                assert list(kept) == list(expected), f"{client.namespace}: {feature.name} spellings not mapped"
    assert 0.015 <= blank_cells / feature_cells <= 0.045

    test = load_canonical_file(generated.test_path, task)
    assert len(test) == 2000  # max(2000, min(20000, 4 * 300 // 5))
    assert list(test.frame.columns) == task.field_names
    assert (test.frame[task.target].to_numpy() == simulation.test[task.target].to_numpy().astype("int8")).all()
    assert test.frame[[f.name for f in task.features]].isna().to_numpy().any()


def test_dialects_really_differ(generated: SynthResult) -> None:
    task = canonical_task()
    headers = []
    sources = []
    for path in generated.participant_paths:
        source = load_participant(path).spec.data
        table = pd.read_csv(path.parent / source.file.path, dtype=str, keep_default_na=False)
        headers.append(frozenset(table.columns))
        sources.append(source)
        assert set(source.mapping.values()) < set(table.columns), "every client keeps at least one unmapped column"
        assert table[source.mapping[task.target]].str.len().gt(0).all(), "the target is never blank"
    assert len(set(headers)) >= 2
    assert any(s.transforms for s in sources)
    assert any(set(s.mapping) < set(task.field_names) for s in sources)
    assert any(s.values for s in sources)


def test_label_skew_follows_alpha() -> None:
    def spread(alpha: float) -> float:
        sim = synthetic._simulate(clients=8, rows=100, seed=3, alpha=alpha, test_rows=50)
        return float(np.std([c.frame[LEAD_CONVERSION_TASK.target].mean() for c in sim.clients]))

    skewed, iid = spread(0.1), spread(100.0)
    assert skewed > iid + 0.1


def test_bayes_classifier_is_accurate_on_the_test_set(simulation: synthetic._Simulation) -> None:
    target = LEAD_CONVERSION_TASK.target
    y = simulation.test[target].to_numpy()
    p = conversion_probability(simulation.test)
    accuracy = float(((p > 0.5) == y).mean())
    rate = float(y.mean())
    assert 0.2 <= rate <= 0.45
    assert accuracy >= 0.85
    assert accuracy >= max(rate, 1 - rate) + 0.1, "well above always predicting the majority class"
    # Labels are draws from the model, so the model's own probabilities are calibrated on them.
    assert abs(float(p.mean()) - rate) < 0.05


def test_conversion_probability_refuses_missing_values(simulation: synthetic._Simulation) -> None:
    frame = simulation.test.head(10).copy()
    frame.loc[0, "email_opens"] = np.nan
    with pytest.raises(ValueError, match="email_opens"):
        conversion_probability(frame)


def test_many_clients_get_unique_company_names() -> None:
    sim = synthetic._simulate(clients=40, rows=20, seed=0, test_rows=40)
    names = [c.name for c in sim.clients]
    assert len(set(names)) == 40
    assert names[-1].endswith("-40")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"clients": 0, "rows": 300},
        {"clients": 2, "rows": 19},
        {"clients": 2, "rows": 300, "alpha": 0.0},
        {"clients": 2, "rows": 300, "alpha": -1.0},
        {"clients": 2, "rows": 300, "seed": -1},
    ],
)
def test_bad_arguments_are_refused(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(FedcrmError):
        generate_federation(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_tenant_sizes_spread_from_min_rows_to_rows_and_leave_the_default_as_it_was(tmp_path: Path) -> None:
    spread = synthetic._simulate(clients=10, rows=1600, min_rows=30, seed=0, test_rows=100)
    sizes = [len(c.frame) for c in spread.clients]
    assert min(sizes) >= 30 and max(sizes) <= 1600 and max(sizes) > 10 * min(sizes), sizes
    assert sizes == [len(c.frame) for c in synthetic._simulate(clients=10, rows=1600, min_rows=30, seed=0,
                                                               test_rows=100).clients]
    same = synthetic._simulate(clients=3, rows=200, seed=4, test_rows=50)
    again = synthetic._simulate(clients=3, rows=200, seed=4, test_rows=50, min_rows=None)
    assert all(a.local.equals(b.local) for a, b in zip(same.clients, again.clients))
    with pytest.raises(FedcrmError, match="min_rows must be from 20 to rows"):
        synthetic._simulate(clients=3, rows=200, min_rows=500)
