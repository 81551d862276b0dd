"""The numpy layout the aggregator uses and the torch module the nodes train must agree exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedcrm.errors import FedcrmError
from fedcrm.models.artifacts import load_model, save_model
from fedcrm.models.layout import ModelLayout
from fedcrm.models.mlp import TabularMLP, get_flat, set_flat
from fedcrm.spec.manifests import ModelSpec, Task
from fedcrm.training.preprocessing import CategoricalVocab, NumericStats, Preprocessing

PREP = Preprocessing(
    numeric=[NumericStats("a", 0.0, 1.0, "none"), NumericStats("b", 2.0, 3.0, "log1p")],
    boolean=["c"],
    # Deliberately not in alphabetical order: serialisation must keep the model's input order.
    categorical=[CategoricalVocab("e", ["p", "q"]), CategoricalVocab("d", ["x", "y", "z"])],
    target="y",
    rows=100,
    positive_rate=0.3,
)


def test_layout_matches_the_torch_state_dict() -> None:
    layout = ModelLayout.build(ModelSpec(hidden=[16, 8]), PREP)
    model = TabularMLP(layout)
    state = model.state_dict()
    assert [(n, tuple(s)) for n, s in layout.shapes()] == [(n, tuple(t.shape)) for n, t in state.items()]
    assert layout.size == sum(t.numel() for t in state.values())
    assert layout.dense_width == 6 and layout.vocab_sizes == (3, 4)


def test_flat_weights_round_trip_and_initialisation_is_seeded() -> None:
    layout = ModelLayout.build(ModelSpec(hidden=[8]), PREP)
    w = layout.initial(3)
    assert np.array_equal(w, layout.initial(3)) and not np.array_equal(w, layout.initial(4))
    model = TabularMLP(layout)
    set_flat(model, w)
    assert np.array_equal(get_flat(model), w)
    with pytest.raises(ValueError, match="this layout needs"):
        set_flat(model, w[:-1])


def test_saved_models_are_checked_on_load(tmp_path: Path) -> None:
    layout = ModelLayout.build(ModelSpec(hidden=[8]), PREP)
    task = Task.model_validate({"target": "y", "features": [{"name": "a", "type": "numeric"}]})
    digest = save_model(tmp_path, weights=layout.initial(0), layout=layout, preprocessing=PREP, task=task,
                        metadata={"rounds_completed": 1})
    saved = load_model(tmp_path)
    assert saved.metadata["digest"] == digest and saved.preprocessing == PREP and saved.layout == layout
    np.savez(tmp_path / "model.npz", weights=layout.initial(1))
    with pytest.raises(FedcrmError, match="does not match the digest"):
        load_model(tmp_path)
    with pytest.raises(FedcrmError, match="no saved model here"):
        load_model(tmp_path / "elsewhere")
