"""The numeric pieces that make federated results equal pooled ones: statistics, metrics, averaging."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcrm.protocol import from_vector, to_vector
from fedcrm.spec.manifests import Feature, Task
from fedcrm.training.fedavg import fedavg_step, ordered_sum
from fedcrm.training.secure_vectors import fit_vector
from fedcrm.training.metrics import BINS, evaluation_counts, metrics_from_counts
from fedcrm.training.preprocessing import Preprocessing, StatisticsLayout, encode

TASK = Task(
    target="y",
    features=[
        Feature(name="amount", type="numeric", transform="log1p"),
        Feature(name="visits", type="numeric"),
        Feature(name="flag", type="boolean"),
        Feature(name="kind", type="categorical", categories=["a", "b", "c", "never"]),
    ],
)


def _frame(rng: np.random.Generator, n: int) -> pd.DataFrame:
    amount = rng.lognormal(8, 1.5, n)
    amount[rng.random(n) < 0.1] = np.nan
    visits = rng.poisson(3, n).astype(float)
    flag = rng.integers(0, 2, n).astype(float)
    flag[rng.random(n) < 0.2] = np.nan
    kind = rng.choice(["a", "b", "c"], n).astype(object)
    kind[rng.random(n) < 0.1] = None
    return pd.DataFrame({"amount": amount, "visits": visits, "flag": flag, "kind": kind,
                         "y": rng.integers(0, 2, n).astype("int8")})


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), cuts=st.lists(st.integers(1, 199), max_size=6))
def test_summed_statistics_equal_pooled_statistics(seed: int, cuts: list[int]) -> None:
    """However the rows are split among participants, the preprocessing is the pooled one."""
    frame = _frame(np.random.default_rng(seed), 200)
    layout = StatisticsLayout(TASK)
    bounds = [0, *sorted(set(cuts)), 200]
    parts = [frame.iloc[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    federated = layout.preprocessing(ordered_sum((str(i), layout.local(p)) for i, p in enumerate(parts)))
    pooled = layout.preprocessing(layout.local(frame))
    assert federated.rows == pooled.rows == 200
    assert federated.categorical == pooled.categorical
    assert Preprocessing.from_json(federated.to_json()) == federated
    for f, p in zip(federated.numeric, pooled.numeric):
        assert f.mean == pytest.approx(p.mean, rel=1e-9)
        assert f.std == pytest.approx(p.std, rel=1e-9)


def test_preprocessing_values() -> None:
    frame = _frame(np.random.default_rng(1), 500)
    layout = StatisticsLayout(TASK)
    prep = layout.preprocessing(layout.local(frame))
    logs = np.log1p(frame["amount"].dropna())
    assert prep.numeric[0].mean == pytest.approx(logs.mean())
    assert prep.numeric[0].std == pytest.approx(logs.std(ddof=0))
    assert [(c.name, c.vocab) for c in prep.categorical] == [("kind", ["a", "b", "c"])]  # "never" has no rows anywhere: not in the vocabulary
    assert prep.missing_rate["amount"] == pytest.approx(frame["amount"].isna().mean())
    enc = encode(frame, prep)
    assert enc.dense.shape == (500, prep.numeric_width) and enc.dense.dtype == np.float32
    missing = frame["amount"].isna().to_numpy()
    assert np.all(enc.dense[missing, 0] == 0) and np.all(enc.dense[missing, 1] == 1)
    assert np.all(enc.dense[~missing, 1] == 0)
    assert abs(enc.dense[~missing, 0].mean()) < 1e-5
    assert np.all(enc.categorical[frame["kind"].isna().to_numpy(), 0] == 0)
    assert set(np.unique(enc.categorical)) == {0, 1, 2, 3}


def _exact_auc(p: np.ndarray, y: np.ndarray) -> float:
    pos, neg = p[y == 1], p[y == 0]
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (pos.size * neg.size))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(20, 400), split=st.integers(1, 19))
def test_metrics_from_summed_counts_are_the_pooled_metrics(seed: int, n: int, split: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    if y.min() == y.max():
        y[0] = 1 - y[0]
    p = np.clip(0.5 * y + rng.random(n) * 0.6, 0, 1)
    cut = n * split // 20
    parts = [evaluation_counts(p[:cut], y[:cut], 1.0), evaluation_counts(p[cut:], y[cut:], 2.0)]
    m = metrics_from_counts(ordered_sum([("a", parts[0]), ("b", parts[1])]))
    pred = p >= 0.5
    assert m["accuracy"] == pytest.approx(np.mean(pred == y))
    tp = np.sum(pred & (y == 1))
    assert m["f1"] == pytest.approx(2 * tp / (2 * tp + np.sum(pred & (y == 0)) + np.sum(~pred & (y == 1))))
    assert m["loss"] == pytest.approx(3.0 / n)
    # Histogram AUC differs from the exact one only through ties inside a bin.
    assert m["auc"] == pytest.approx(_exact_auc(p, y), abs=2.0 / BINS)


def test_undefined_metrics_are_none() -> None:
    m = metrics_from_counts(evaluation_counts(np.array([0.1, 0.2]), np.array([0, 0]), 0.5))
    assert m["accuracy"] == 1.0 and m["auc"] is None and m["precision"] is None and m["recall"] is None


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), k=st.integers(1, 8))
def test_fedavg_is_the_weighted_mean_and_independent_of_arrival_order(seed: int, k: int) -> None:
    rng = np.random.default_rng(seed)
    weights = rng.standard_normal(50).astype(np.float32)
    parts = [(f"t{i}", int(rng.integers(1, 1000)), rng.standard_normal(50).astype(np.float32) * 0.01, float(rng.random()))
             for i in range(k)]
    vectors = [(name, fit_vector(d, examples=n, loss_sum=loss, clip=np.inf)) for name, n, d, loss in parts]
    step = fedavg_step(weights, ordered_sum(vectors))
    total = sum(n for _, n, _, _ in parts)
    expected = weights + sum(n * d.astype(np.float64) for _, n, d, _ in parts) / total
    np.testing.assert_allclose(step.weights, expected.astype(np.float32), rtol=1e-6, atol=1e-7)
    assert step.examples == total
    assert step.train_loss == pytest.approx(sum(loss for *_, loss in parts) / total)
    shuffled = [vectors[i] for i in rng.permutation(k)]
    assert np.array_equal(fedavg_step(weights, ordered_sum(shuffled)).weights, step.weights)  # bit-identical


def test_fedavg_refuses_an_empty_or_misshapen_sum() -> None:
    with pytest.raises(ValueError, match="no training examples"):
        fedavg_step(np.zeros(3, np.float32), np.zeros(5))
    with pytest.raises(ValueError, match="expected \\(5,\\)"):
        fedavg_step(np.zeros(3, np.float32), np.zeros(4))


def test_vectors_round_trip_and_reject_bad_lengths() -> None:
    a = np.arange(10, dtype=np.float32)
    assert np.array_equal(from_vector(to_vector(a), expected_length=10), a)
    b = np.linspace(0, 1, 7)
    assert from_vector(to_vector(b)).dtype == np.float64
    with pytest.raises(ValueError, match="expected 11"):
        from_vector(to_vector(a), expected_length=11)
    v = to_vector(a)
    v.length = 12
    with pytest.raises(ValueError, match="claims 12 values"):
        from_vector(v)
    with pytest.raises(TypeError):
        to_vector(np.arange(3))


def test_participants_and_the_model_get_only_what_encoding_needs() -> None:
    """In a federation of two, the pooled row count and positive rate minus one's own are the other's exact
    figures: they stay with the aggregator. The encoding is the same with and without them."""
    import numpy as np
    import pandas as pd

    from fedcrm.spec.manifests import Task
    from fedcrm.training.preprocessing import Preprocessing, StatisticsLayout

    task = Task.model_validate({"target": "converted", "features": [
        {"name": "amount", "type": "numeric"}, {"name": "region", "type": "categorical", "categories": ["eu", "us"]}]})
    layout = StatisticsLayout(task)
    a = pd.DataFrame({"amount": [1.0, 2.0, None], "region": ["eu", "us", "eu"], "converted": [True, False, True]})
    b = pd.DataFrame({"amount": [5.0, 7.0], "region": ["us", "us"], "converted": [False, False]})
    full = layout.preprocessing(layout.local(a) + layout.local(b))
    shared = Preprocessing.from_json(full.shared().to_json())
    assert full.rows == 5 and full.positive_rate == 0.4
    assert shared.rows is None and shared.positive_rate is None and shared.missing_rate == {}
    assert shared.numeric == full.numeric and shared.categorical == full.categorical
    assert "rows" not in {k for k, v in json.loads(full.shared().to_json()).items() if v is not None}
    assert np.isfinite(shared.numeric[0].mean)
