"""The participant's GAN augmentation: encoded rows in and out, label conditioning, seeding, counting, the spec."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import yaml
from pydantic import ValidationError

from fedcrm.data.loaders import load_participant_data
from fedcrm.data.synthetic import SynthResult
from fedcrm.errors import ManifestError
from fedcrm.models.layout import ModelLayout
from fedcrm.models.mlp import TabularMLP
from fedcrm.spec.loading import load_federation, load_participant, parse_manifest
from fedcrm.spec.manifests import Federation, GanAugmentation, ModelSpec
from fedcrm.training.augmentation import (
    MIN_CLASS_ROWS,
    RowCodec,
    augment,
    counted_as_real,
    synthetic_counts,
    with_synthetic,
)
from fedcrm.training.local import TrainOutcome, predict, train_epochs
from fedcrm.training.preprocessing import EncodedData, Preprocessing, StatisticsLayout, encode


@dataclass(frozen=True)
class Rows:
    prep: Preprocessing
    train: EncodedData


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """As in a participant process (fedcrm_node sets one thread): small GAN steps are several times faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def rows(small_federation: SynthResult) -> Rows:
    fed = load_federation(small_federation.federation_path)
    participant = load_participant(small_federation.participant_paths[0])
    data = load_participant_data(participant, fed.spec.task, base_dir=small_federation.participant_paths[0].parent)
    layout = StatisticsLayout(fed.spec.task)
    prep = layout.preprocessing(layout.local(data.frame))
    return Rows(prep, encode(data.frame, prep))


def _gan(**kw: object) -> GanAugmentation:
    return GanAugmentation.model_validate({"enabled": True, "epochs": 300, **kw})


def test_codec_round_trips_encoded_rows(rows: Rows) -> None:
    codec = RowCodec.from_preprocessing(rows.prep, label=True)
    back = codec.decode(codec.rows(rows.train))
    np.testing.assert_allclose(back.dense, rows.train.dense, atol=1e-6)
    np.testing.assert_array_equal(back.categorical, rows.train.categorical)
    np.testing.assert_array_equal(back.labels, rows.train.labels)


def test_synthetic_rows_are_valid_model_inputs_in_the_counts_asked_for(rows: Rows) -> None:
    made = augment(rows.train, rows.prep, _gan(syntheticRatio=0.5), batch_size=32, seed=3, identity="tenant-a/p")
    labels = rows.train.labels
    expected, skipped = synthetic_counts(labels, 0.5)
    assert made.per_class == expected and not skipped and sum(expected) == round(0.5 * len(labels))
    s = made.synthetic
    assert len(s) == sum(expected)
    assert [int(np.count_nonzero(s.labels == k)) for k in (0, 1)] == list(expected)
    assert s.dense.shape == (len(s), rows.prep.numeric_width) and s.dense.dtype == np.float32
    assert s.categorical.dtype == np.int64 and s.labels.dtype == np.float32
    codec = RowCodec.from_preprocessing(rows.prep)
    for j, vocab in enumerate(codec.vocab_sizes):
        assert s.categorical[:, j].min() >= 0 and s.categorical[:, j].max() < vocab
    for col in codec.binary:
        assert set(np.unique(s.dense[:, col])) <= {0.0, 1.0}
    for value, flag in codec.missing_of:
        assert np.all(s.dense[s.dense[:, flag] == 1, value] == 0)
    assert np.all(np.abs(s.dense) <= 6.0)
    assert "class 0: %d, class 1: %d" % expected in made.summary()
    # Only training grows: the real rows first, unchanged, then the synthetic ones.
    both = with_synthetic(rows.train, made)
    assert len(both) == len(rows.train) + len(s)
    np.testing.assert_array_equal(both.dense[: len(rows.train)], rows.train.dense)


def test_rows_drawn_for_class_one_look_like_class_one(rows: Rows) -> None:
    """A classifier trained on the real rows scores the GAN's class-1 rows far higher than its class-0 rows."""
    model = TabularMLP(ModelLayout.build(ModelSpec(), rows.prep))
    train_epochs(model, rows.train, epochs=30, batch_size=32, learning_rate=0.005, seed=0)
    made = augment(rows.train, rows.prep, _gan(syntheticRatio=1.0), batch_size=32, seed=0, identity="tenant-a/p")
    probs, _ = predict(model, made.synthetic)
    ones, zeros = probs[made.synthetic.labels == 1].mean(), probs[made.synthetic.labels == 0].mean()
    assert ones - zeros > 0.3, (ones, zeros)


def test_same_seed_and_identity_same_rows(rows: Rows) -> None:
    gan = _gan(epochs=20)
    a = augment(rows.train, rows.prep, gan, batch_size=32, seed=7, identity="tenant-a/p").synthetic
    b = augment(rows.train, rows.prep, gan, batch_size=32, seed=7, identity="tenant-a/p").synthetic
    c = augment(rows.train, rows.prep, gan, batch_size=32, seed=7, identity="tenant-b/p").synthetic
    np.testing.assert_array_equal(a.dense, b.dense)
    np.testing.assert_array_equal(a.categorical, b.categorical)
    assert not np.array_equal(a.dense, c.dense)


def test_unconditional_gan_generates_its_labels(rows: Rows) -> None:
    made = augment(rows.train, rows.prep, _gan(epochs=20, conditionalOnLabel=False, syntheticRatio=0.25),
                   batch_size=32, seed=1, identity="x")
    assert len(made.synthetic) == round(0.25 * len(rows.train)) == sum(made.per_class)
    assert set(np.unique(made.synthetic.labels)) <= {0.0, 1.0}


def test_dp_gan_spends_its_own_budget_and_says_so(rows: Rows) -> None:
    gan = _gan(epochs=5, differentialPrivacy={"epsilon": 2.0, "delta": 1e-5})
    made = augment(rows.train, rows.prep, gan, batch_size=32, seed=1, identity="x")
    assert made.privacy is not None
    assert 1.5 < made.privacy.epsilon <= 2.0 + 1e-6 and made.privacy.steps > 0
    line = made.privacy_summary("client")
    assert "epsilon 2.0" in line or f"epsilon {made.privacy.epsilon:.4f}" in line
    assert "not counted in the federation's budget" in line and "client-level DP covers" in line
    assert "not differentially private" in augment(rows.train, rows.prep, _gan(epochs=1), batch_size=32, seed=1,
                                                   identity="x").privacy_summary("none")


def test_too_few_rows_add_nothing(rows: Rows) -> None:
    few = EncodedData(rows.train.dense[:10], rows.train.categorical[:10], rows.train.labels[:10])
    made = augment(few, rows.prep, _gan(), batch_size=32, seed=0, identity="x")
    assert len(made.synthetic) == 0 and "fewer than the 20" in made.summary()
    assert with_synthetic(few, made) is few


def test_minority_topped_up_first_and_tiny_classes_skipped() -> None:
    labels = np.array([0] * 80 + [1] * 20, dtype=np.float32)
    assert synthetic_counts(labels, 0.5) == ((0, 50), [])  # the gap is 60: all 50 go to class 1
    assert synthetic_counts(labels, 1.0) == ((20, 80), [])  # 60 close the gap, the other 40 split evenly
    tiny = np.array([0] * 96 + [1] * (MIN_CLASS_ROWS - 1), dtype=np.float32)
    assert synthetic_counts(tiny, 0.5) == ((0, 0), [1])


def test_outcome_counts_only_real_rows() -> None:
    outcome = counted_as_real(TrainOutcome(examples=150, loss_sum=30.0, steps=5), 100)
    assert (outcome.examples, outcome.loss_sum, outcome.steps) == (100, pytest.approx(20.0), 5)


# --------------------------------------------------------------------------- the spec


def _federation(small_federation: SynthResult, augmentation: dict[str, object], dp: dict[str, object] | None = None,
                secure: bool = False) -> Federation:
    doc = yaml.safe_load(small_federation.federation_path.read_text())
    doc["spec"]["augmentation"] = augmentation
    if dp is not None:
        doc["spec"]["privacy"] = {"differentialPrivacy": dp, "secureAggregation": {"enabled": secure}}
    return parse_manifest(doc, Federation, "federation.yaml")


def test_spec_defaults_and_camel_case(small_federation: SynthResult) -> None:
    fed = _federation(small_federation, {"gan": {"enabled": True, "syntheticRatio": 1.5, "conditionalOnLabel": False,
                                                 "differentialPrivacy": {"epsilon": 4, "delta": 1e-6}}})
    gan = fed.spec.augmentation.gan
    assert (gan.enabled, gan.synthetic_ratio, gan.epochs, gan.conditional_on_label) == (True, 1.5, 300, False)
    assert gan.differential_privacy is not None and gan.differential_privacy.clipping_norm == 1.0
    assert not load_federation(small_federation.federation_path).spec.augmentation.gan.enabled


@pytest.mark.parametrize(("gan", "message"), [
    ({"syntheticRatio": 0}, "syntheticRatio must be above 0 and at most 10"),
    ({"syntheticRatio": 11}, "syntheticRatio must be above 0 and at most 10"),
    ({"epochs": 0}, "epochs must be from 1 to 5000"),
    ({"differentialPrivacy": {"epsilon": 1}}, "delta"),
    ({"differentialPrivacy": {"epsilon": -1, "delta": 1e-5}}, "epsilon must be a positive number"),
    ({"differentialPrivacy": {"epsilon": 1, "delta": 2}}, "delta must be between 0 and 1"),
    ({"syntheticRatios": 1}, "syntheticRatios"),
])
def test_spec_errors_say_what_to_fix(small_federation: SynthResult, gan: dict[str, object], message: str) -> None:
    with pytest.raises((ManifestError, ValidationError), match=message):
        _federation(small_federation, {"gan": {"enabled": True, **gan}})


@pytest.mark.parametrize("mode", ["sample", "pooled"])
def test_gan_is_refused_with_record_level_dp(small_federation: SynthResult, mode: str) -> None:
    dp = {"mode": mode, "epsilon": 1.0, "delta": 1e-5}
    with pytest.raises((ManifestError, ValidationError), match=f"cannot be combined with differentialPrivacy mode '{mode}'"):
        _federation(small_federation, {"gan": {"enabled": True}}, dp, secure=mode == "pooled")
    assert not _federation(small_federation, {"gan": {"enabled": False}}, dp,
                           secure=mode == "pooled").spec.augmentation.gan.enabled


def test_gan_is_allowed_with_client_level_dp(small_federation: SynthResult) -> None:
    fed = _federation(small_federation, {"gan": {"enabled": True}},
                      {"mode": "client", "epsilon": 2.0, "delta": 1e-5}, secure=True)
    assert fed.spec.augmentation.gan.enabled
