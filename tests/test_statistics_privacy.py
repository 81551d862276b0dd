"""Under differential privacy the preprocessing statistics are noised per record by each participant, accounted,
and released once: an aggregator that asks again gets the same vector, never a fresh draw to average."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from inprocess_aggregator import aggregators, finish, identities, start_nodes
from opacus.accountants import RDPAccountant as OpacusRDP

from fedcrm.data.loaders import load_participant_data
from fedcrm.data.splits import train_validation_split
from fedcrm.data.synthetic import SynthResult
from fedcrm.privacy.accounting import epsilon_for
from fedcrm.privacy.mechanisms import STATISTICS_LATTICE_BITS, StatisticsNoise
from fedcrm.privacy.plans import STATISTICS_SHARE, sample_accountant, statistics_epsilon, statistics_noise_multiplier
from fedcrm.privacy.rdp import DEFAULT_ORDERS
from fedcrm.spec.loading import load_federation, load_participant
from fedcrm.spec.manifests import Federation, FeatureType
from fedcrm.training.preprocessing import StatisticsLayout

DP = {"mode": "sample", "epsilon": 1.0, "delta": 1e-5}
#: A tight bound for one feature, so its noise is small enough to see the mean survive.
TIGHT, TIGHT_BOUND = "days_since_last_activity", 400.0


def _federation(small: SynthResult, folder: Path, *, secure: bool = True) -> tuple[Path, Federation]:
    doc = yaml.safe_load(small.federation_path.read_text())
    doc["spec"]["training"].update(rounds=1, localEpochs=1)
    doc["spec"]["privacy"] = {"differentialPrivacy": dict(DP)}
    if secure:
        doc["spec"]["privacy"]["secureAggregation"] = {"enabled": True, "neighbours": "complete", "threshold": 0.6}
    next(f for f in doc["spec"]["task"]["features"] if f["name"] == TIGHT)["bound"] = TIGHT_BOUND
    own = folder / "federation.yaml"
    own.write_text(yaml.safe_dump(doc))
    return own, load_federation(own)


def _frame(small: SynthResult, federation: Federation, index: int = 0) -> object:
    path, identity = small.participant_paths[index], identities(small)[index]
    data = load_participant_data(load_participant(path), federation.spec.task, base_dir=path.parent)
    training = federation.spec.training
    return train_validation_split(data.frame, fraction=training.validation_fraction, seed=training.seed,
                                  identity=identity)[0]


# ----------------------------------------------------------------- the mechanism

@settings(max_examples=25, deadline=None)
@given(row=st.integers(0, 10_000))
def test_one_record_moves_the_normalised_statistics_by_at_most_the_declared_sensitivity(
        small_federation: SynthResult, tmp_path_factory: pytest.TempPathFactory, row: int) -> None:
    _, federation = _federation(small_federation, tmp_path_factory.mktemp("fed"))
    layout = StatisticsLayout(federation.spec.task)
    frame = _frame(small_federation, federation)
    row %= len(frame)  # type: ignore[arg-type]
    noise = layout.noise(1.0)
    with_it = layout.bounded(frame)[0]  # type: ignore[arg-type]
    without = layout.bounded(frame.drop(frame.index[row]))[0]  # type: ignore[attr-defined]
    moved = (with_it - without) / np.asarray(noise.maxima)
    assert float(np.linalg.norm(moved)) <= math.sqrt(noise.touched) + 1e-9
    assert np.count_nonzero(moved) <= noise.touched


def test_the_noise_has_the_declared_spread_on_the_lattice(small_federation: SynthResult, tmp_path: Path) -> None:
    _, federation = _federation(small_federation, tmp_path)
    layout = StatisticsLayout(federation.spec.task)
    values = layout.bounded(_frame(small_federation, federation))[0]  # type: ignore[arg-type]
    noise = layout.noise(2.0)
    draws = np.array([noise.privatize(values) for _ in range(400)])
    steps = noise.steps
    assert np.allclose(np.rint(draws / steps) * steps, draws, rtol=0, atol=1e-6 * steps.max())
    expected = noise.stds
    spread = draws.std(axis=0)
    assert np.all(np.abs(spread / expected - 1) < 0.2), (spread / expected).round(2)
    centre = (draws.mean(axis=0) - values) / expected
    assert np.all(np.abs(centre) < 0.3)
    # Every slot is noised at sqrt(touched) sensitivities: counts by whole numbers, sums on a finer lattice.
    slots = layout.slots
    numeric = [off for _, kind, off, _ in slots if kind is FeatureType.numeric]
    assert all(steps[off] == 1.0 and steps[off + 1] == TIGHT_BOUND * 2.0**-STATISTICS_LATTICE_BITS
               for name, _, off, _ in slots if name == TIGHT)
    assert numeric and noise.touched == 2 + 3 * len(numeric) + sum(
        2 if kind is FeatureType.boolean else 1 for _, kind, _, w in slots if kind is not FeatureType.numeric and w)


def test_noised_statistics_pass_the_checks_and_are_made_consistent(small_federation: SynthResult,
                                                                   tmp_path: Path) -> None:
    _, federation = _federation(small_federation, tmp_path)
    layout = StatisticsLayout(federation.spec.task)
    noise = layout.noise(statistics_noise_multiplier(federation.spec) or 0.0)
    frames = [_frame(small_federation, federation, i) for i in range(3)]
    noised = [noise.privatize(layout.bounded(f)[0]) for f in frames]  # type: ignore[arg-type]
    for vector in noised:
        layout.check(vector, noise=noise)
    total = np.sum(noised, axis=0)
    layout.check_sum(total, contributors=3, resolution=np.zeros(layout.size), noise=noise)
    with pytest.raises(ValueError, match="row count"):
        layout.check(np.where(np.arange(layout.size) == 0, 1e12, noised[0]), noise=noise)
    with pytest.raises(ValueError, match="out of range"):
        bad = noised[0].copy()
        bad[[off for name, _, off, _ in layout.slots if name == TIGHT][0] + 1] = 1e15
        layout.check(bad, noise=noise)
    rows = sum(len(f) for f in frames)  # type: ignore[arg-type]
    fixed = layout.clamped(total, rows=rows)
    assert fixed[0] == rows and 0 <= fixed[1] <= rows
    prep = layout.preprocessing(fixed)
    assert all(math.isfinite(n.mean) and n.std > 0 for n in prep.numeric)
    exact = layout.preprocessing(np.sum([layout.bounded(f)[0] for f in frames], axis=0))  # type: ignore[arg-type]
    want, got = {n.name: n for n in exact.numeric}[TIGHT], {n.name: n for n in prep.numeric}[TIGHT]
    tolerance = _mean_tolerance(layout, noise, exact_total=np.sum([layout.bounded(f)[0] for f in frames], axis=0),
                                contributors=3)
    assert got.mean != want.mean and abs(got.mean - want.mean) <= tolerance


def _mean_tolerance(layout: StatisticsLayout, noise: StatisticsNoise, *, exact_total: np.ndarray,
                    contributors: int) -> float:
    """Six standard deviations of the noised mean of the tightly bounded feature, to first order: the noise of
    the sum, and the noise of the count times the mean, over the count."""
    off = next(off for name, _, off, _ in layout.slots if name == TIGHT)
    stds = noise.stds * math.sqrt(contributors)
    n, total = exact_total[off], exact_total[off + 1]
    return float(6 * (stds[off + 1] + abs(total / n) * stds[off]) / n)


# ----------------------------------------------------------------- accounting

def test_statistics_and_training_compose_to_the_budget_as_opacus_counts_them(small_federation: SynthResult,
                                                                              tmp_path: Path) -> None:
    _, federation = _federation(small_federation, tmp_path)
    spec = federation.spec
    sigma_s = statistics_noise_multiplier(spec)
    assert sigma_s is not None
    assert statistics_epsilon(spec) == pytest.approx(STATISTICS_SHARE * DP["epsilon"], rel=0.01)
    assert statistics_epsilon(spec) <= STATISTICS_SHARE * DP["epsilon"]
    accountant = sample_accountant(spec, train_rows=1_800)
    for r in range(spec.training.rounds):
        accountant.record(f"{r + 1}@1")
    ours = accountant.spent()
    assert ours <= DP["epsilon"] and ours == pytest.approx(DP["epsilon"], rel=0.01)
    # The training alone spends less: the calibration left the statistics their part (under RDP composition far
    # less than their share alone, 0.1, since both are Gaussian).
    alone = epsilon_for(q=accountant.q, noise_multiplier=accountant.noise_multiplier, steps=accountant.steps,
                        delta=DP["delta"])
    assert alone < ours
    opacus = OpacusRDP()
    opacus.history = [(sigma_s, 1.0, 1), (accountant.noise_multiplier, accountant.q, accountant.steps)]
    assert opacus.get_epsilon(delta=DP["delta"], alphas=list(DEFAULT_ORDERS)) == pytest.approx(ours, rel=1e-6)


# ----------------------------------------------------------------- a federation

def _pool_once(small: SynthResult, own: Path, federation: Federation, tmp_path: Path,
               state: list[Path]) -> tuple[object, list[tuple[int, str]]]:
    tmp_path.mkdir()
    with aggregators(tmp_path) as start:
        coordinator, port, ca = start(federation, federation, identities(small))
        procs = start_nodes(small, own, port, ca, tmp_path, extra=[["--state-dir", str(s)] for s in state])
        results = finish(procs)
    return coordinator, results


@pytest.mark.parametrize("secure", [True, False], ids=["masked", "clear"])
def test_an_aggregator_that_asks_again_gets_the_same_noised_statistics(small_federation: SynthResult,
                                                                       tmp_path: Path, secure: bool) -> None:
    own, federation = _federation(small_federation, tmp_path, secure=secure)
    state = [tmp_path / f"state-{i}" for i in range(3)]
    for s in state:
        s.mkdir()
    first, results = _pool_once(small_federation, own, federation, tmp_path / "first", state)
    assert [code for code, _ in results] == [0, 0, 0], [log[-2000:] for _, log in results]
    assert all("statistics: noised per record" in log for _, log in results)
    report = json.loads((tmp_path / "first" / "aggregator" / "report.json").read_text())
    assert report["privacy"]["statistics"]["in_epsilon_spent"] is True
    assert report["privacy"]["epsilon_spent"] <= DP["epsilon"]

    layout = StatisticsLayout(federation.spec.task)
    frames = [_frame(small_federation, federation, i) for i in range(3)]
    exact = layout.preprocessing(np.sum([layout.bounded(f)[0] for f in frames], axis=0))  # type: ignore[arg-type]
    pooled = first.preprocessing  # type: ignore[attr-defined]
    assert pooled.rows == exact.rows  # sample-level DP sends the rows anyway; the rest is noised
    got, want = {n.name: n for n in pooled.numeric}, {n.name: n for n in exact.numeric}
    noise = layout.noise(statistics_noise_multiplier(federation.spec) or 0.0)
    tolerance = _mean_tolerance(layout, noise, exact_total=np.sum([layout.bounded(f)[0] for f in frames], axis=0),
                                contributors=3)
    assert got[TIGHT].mean != want[TIGHT].mean and abs(got[TIGHT].mean - want[TIGHT].mean) <= tolerance

    # The same participants asked again, by a fresh aggregator: nothing new to average.
    again, results = _pool_once(small_federation, own, federation, tmp_path / "again", state)
    assert all("sending the noised statistics already released" in log for _, log in results)
    assert again.preprocessing.numeric == pooled.numeric  # type: ignore[attr-defined]
    assert again.preprocessing.categorical == pooled.categorical  # type: ignore[attr-defined]
