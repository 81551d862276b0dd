"""Under secure aggregation the preprocessing statistics are a secure sum: the aggregator learns only the pooled
vector, which decodes to what the clear path computes (within the fixed-point resolution); numeric values beyond
their feature's bound are clipped by the participant, which says how many."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from inprocess_aggregator import aggregators, finish, identities, start_nodes

from fedcrm.data.loaders import load_participant_data
from fedcrm.data.splits import train_validation_split
from fedcrm.data.synthetic import SynthResult
from fedcrm.secagg.quantization import modular_add
from fedcrm.spec.loading import load_federation, load_participant
from fedcrm.spec.manifests import Federation
from fedcrm.training.preprocessing import MAX_PARTICIPANT_ROWS, StatisticsLayout
from fedcrm.training.secure_vectors import STATISTICS_BITS, StatisticsEncoding

#: A bound below some of the synthetic data's values (days since the last activity run into the hundreds).
CLIPPED, BOUND = "days_since_last_activity", 30.0


def _training_frames(small: SynthResult, federation: Federation) -> list[object]:
    """Each participant's training split, exactly as its node cuts it."""
    frames = []
    for path, identity in zip(small.participant_paths, identities(small)):
        data = load_participant_data(load_participant(path), federation.spec.task, base_dir=path.parent)
        training = federation.spec.training
        frames.append(train_validation_split(data.frame, fraction=training.validation_fraction, seed=training.seed,
                                             identity=identity)[0])
    return frames


def test_the_modular_sum_decodes_to_the_clear_sum_and_hostile_values_stay_within_the_bounds(
        small_federation: SynthResult) -> None:
    federation = load_federation(small_federation.federation_path)
    layout = StatisticsLayout(federation.spec.task)
    encoding = StatisticsEncoding(layout, participants=3)
    vectors = [layout.bounded(f)[0] for f in _training_frames(small_federation, federation)]  # type: ignore[arg-type]
    total = np.zeros(encoding.size, dtype=np.uint64)
    for v in vectors:
        q = encoding.quantize(v)
        assert q.dtype == np.uint64 and q.size == encoding.size and np.all(q < 2**STATISTICS_BITS)
        modular_add(total, q, STATISTICS_BITS)
    decoded, clear = encoding.dequantize(total), np.sum(vectors, axis=0)
    assert np.all(np.abs(decoded - clear) <= 3 * encoding.resolution + 1e-12 * np.abs(clear))
    counts = encoding.resolution == 0
    assert np.array_equal(decoded[counts], clear[counts])  # counts are exact
    layout.check_sum(decoded, contributors=3, resolution=3 * encoding.resolution)

    # A participant claiming more than the pooled bounds allow is clipped to them: the sum stays in range, and the
    # check of the decoded sum names what no honest cohort could produce.
    hostile = vectors[0].copy()
    hostile[0] = 1e30
    assert encoding.dequantize(encoding.quantize(hostile))[0] == 3 * MAX_PARTICIPANT_ROWS
    with pytest.raises(ValueError, match="row count"):
        layout.check_sum(encoding.dequantize(encoding.quantize(hostile)), contributors=1,
                         resolution=encoding.resolution)


def test_values_beyond_the_bound_are_clipped_and_counted(small_federation: SynthResult, tmp_path: Path) -> None:
    doc = yaml.safe_load(small_federation.federation_path.read_text())
    next(f for f in doc["spec"]["task"]["features"] if f["name"] == CLIPPED)["bound"] = BOUND
    path = tmp_path / "federation.yaml"
    path.write_text(yaml.safe_dump(doc))
    federation = load_federation(path)
    layout = StatisticsLayout(federation.spec.task)
    frame = _training_frames(small_federation, federation)[0]
    bounded, clipped = layout.bounded(frame)  # type: ignore[arg-type]
    values = frame[CLIPPED].dropna().to_numpy()  # type: ignore[index]
    assert clipped[CLIPPED] == int(np.sum(np.abs(values) > BOUND)) > 0
    assert set(clipped) == {f.name for f in federation.spec.task.features if f.type.value == "numeric"}
    off = next(o for name, _, o, _ in layout.slots if name == CLIPPED)
    assert bounded[off + 1] == pytest.approx(np.clip(values, -BOUND, BOUND).sum())
    clear = layout.local(frame)  # type: ignore[arg-type]
    assert clear[off + 1] == pytest.approx(values.sum()) and clear[off + 1] > bounded[off + 1]
    others = np.ones(layout.size, dtype=bool)
    others[off + 1 : off + 3] = False
    assert np.array_equal(bounded[others], clear[others])  # counts and every other feature untouched


@pytest.mark.slow
def test_the_aggregator_receives_no_statistics_in_the_clear_and_pools_the_same_preprocessing(
        small_federation: SynthResult, tmp_path: Path) -> None:
    doc = yaml.safe_load(small_federation.federation_path.read_text())
    doc["spec"]["training"].update(rounds=1, localEpochs=1)
    doc["spec"]["privacy"] = {"secureAggregation": {"enabled": True, "neighbours": "complete", "threshold": 0.6}}
    next(f for f in doc["spec"]["task"]["features"] if f["name"] == CLIPPED)["bound"] = BOUND
    own = tmp_path / "federation.yaml"
    own.write_text(yaml.safe_dump(doc))
    federation = load_federation(own)

    with aggregators(tmp_path) as start:
        coordinator, port, ca = start(federation, federation, identities(small_federation))
        results = finish(start_nodes(small_federation, own, port, ca, tmp_path))
    assert [code for code, _ in results] == [0, 0, 0], [log[-2000:] for _, log in results]

    # What reached the aggregator: signed keys, never a vector; no row count either (no sample-level DP).
    received = coordinator.statistics_received
    assert sorted(i for i, _ in received) == identities(small_federation)
    for _, message in received:
        assert not message.HasField("statistics") and message.HasField("secagg_keys") and message.rows == 0
    events = (tmp_path / "aggregator" / "events.jsonl").read_text()
    assert '"masked": true' in events

    # The pooled preprocessing is the clear path's, within the resolution, except where values were clipped.
    layout = StatisticsLayout(federation.spec.task)
    frames = _training_frames(small_federation, federation)
    clear = layout.preprocessing(np.sum([layout.local(f) for f in frames], axis=0))  # type: ignore[arg-type]
    bounded = layout.preprocessing(np.sum([layout.bounded(f)[0] for f in frames], axis=0))  # type: ignore[arg-type]
    pooled = coordinator.preprocessing
    assert pooled.rows == clear.rows and pooled.positive_rate == clear.positive_rate
    assert pooled.categorical == clear.categorical and pooled.boolean == clear.boolean
    assert pooled.missing_rate == clear.missing_rate
    for got, want, capped in zip(pooled.numeric, clear.numeric, bounded.numeric):
        expected = capped if got.name == CLIPPED else want
        assert got.mean == pytest.approx(expected.mean, rel=1e-9, abs=1e-9), got.name
        assert got.std == pytest.approx(expected.std, rel=1e-9, abs=1e-9), got.name
    clipped_means = {n.name: n.mean for n in clear.numeric}[CLIPPED], {n.name: n.mean for n in bounded.numeric}[CLIPPED]
    assert clipped_means[0] > clipped_means[1]
    for (_, log), frame in zip(results, frames):
        over = int(np.sum(np.abs(frame[CLIPPED].dropna().to_numpy()) > BOUND))  # type: ignore[index]
        if over:
            assert f"clipped {over} value(s) of {CLIPPED} to +-{BOUND:g}" in log
