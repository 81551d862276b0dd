"""Manifests: what a user writes is validated with the field's path and a way to fix it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fedcrm.errors import ManifestError
from fedcrm.spec import check_membership, dump_manifest, load_federation, load_participant, parse_manifest
from fedcrm.spec.manifests import Federation, FeatureType, Participant

FEDERATION = {
    "apiVersion": "fedcrm.io/v1alpha1",
    "kind": "Federation",
    "metadata": {"name": "lead-conversion", "namespace": "fedcrm-system"},
    "spec": {
        "task": {
            "target": "converted",
            "features": [
                {"name": "industry", "type": "categorical", "categories": ["tech", "retail"]},
                {"name": "revenue", "type": "numeric", "transform": "log1p"},
                {"name": "budget_confirmed", "type": "boolean"},
            ],
        },
        "training": {"rounds": 5, "minParticipants": 2, "roundTimeoutSeconds": 30},
        "participants": {"namespaces": ["tenant-a", "tenant-b"]},
    },
}

PARTICIPANT = {
    "apiVersion": "fedcrm.io/v1alpha1",
    "kind": "Participant",
    "metadata": {"name": "acme", "namespace": "tenant-a"},
    "spec": {
        "federationRef": {"name": "lead-conversion", "namespace": "fedcrm-system"},
        "data": {
            "file": {"path": "leads.csv"},
            "mapping": {"converted": "Won", "industry": "Industry"},
            "values": {"converted": {"Yes": True, "No": False}},
        },
    },
}


def _with(doc: dict, path: str, value: object) -> dict:
    import copy

    out = copy.deepcopy(doc)
    node = out
    keys = path.split(".")
    for k in keys[:-1]:
        node = node[k]
    node[keys[-1]] = value
    return out


def _error(doc: dict, model: type) -> str:
    with pytest.raises(ManifestError) as info:
        parse_manifest(doc, model, "test.yaml")
    return str(info.value)


def test_valid_manifests_parse_with_defaults() -> None:
    fed = parse_manifest(FEDERATION, Federation, "f")
    assert fed.key == "fedcrm-system/lead-conversion"
    assert fed.spec.training.rounds == 5
    assert fed.spec.training.local_epochs == 1  # default
    assert fed.spec.model.hidden == [64, 32]
    assert fed.spec.privacy.differential_privacy.mode == "none"
    assert fed.spec.privacy.secure_aggregation.enabled is False
    assert fed.spec.task.feature("industry").type is FeatureType.categorical
    assert fed.spec.task.field_names[-1] == "converted"
    part = parse_manifest(PARTICIPANT, Participant, "p")
    assert part.identity == "tenant-a/acme"
    check_membership(fed, part)


def test_unknown_field_names_its_path_and_suggests_the_right_one() -> None:
    msg = _error(_with(FEDERATION, "spec.trainig", {"rounds": 3}), Federation)
    assert "spec.trainig: unknown field (did you mean 'training'?)" in msg
    doc = _with(FEDERATION, "spec.task.features", [{"name": "x", "type": "numeric", "transfrom": "log1p"}])
    assert "spec.task.features[0].transfrom: unknown field (did you mean 'transform'?)" in _error(doc, Federation)
    doc = _with(PARTICIPANT, "spec.data.fiel", {"path": "x.csv"})
    assert "spec.data.fiel: unknown field" in _error(doc, Participant)


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("spec.training.rounds", 0, "spec.training.rounds: Input should be greater than 0"),
        ("spec.training.learningRate", "fast", "spec.training.learningRate"),
        ("spec.privacy", {"secureAggregation": {"neighbours": "some"}}, "spec.privacy.secureAggregation.neighbours"),
        ("spec.privacy", {"secureAggregation": {"threshold": 0}}, "spec.privacy.secureAggregation.threshold"),
        ("spec.privacy", {"secureAggregation": {"bits": 64}}, "spec.privacy.secureAggregation.bits"),
        ("spec.privacy", {"differentialPrivacy": {"mode": "laplace"}}, "spec.privacy.differentialPrivacy.mode"),
        ("metadata.name", "Lead_Conversion", "must be a DNS label"),
        ("spec.participants.namespaces", ["ok", "Not OK"], "namespace 'Not OK' must be a DNS label"),
        ("spec.training.minParticipants", 3, "minParticipants is 3 but spec.participants.namespaces allows only 2"),
    ],
)
def test_invalid_values_are_reported_with_their_path(path: str, value: object, expected: str) -> None:
    assert expected in _error(_with(FEDERATION, path, value), Federation)


def test_schema_rules() -> None:
    features = FEDERATION["spec"]["task"]["features"]
    no_categories = [{"name": "industry", "type": "categorical"}]
    assert "needs 'categories'" in _error(_with(FEDERATION, "spec.task.features", no_categories), Federation)
    dupes = [features[1], features[1]]
    assert "repeated: revenue" in _error(_with(FEDERATION, "spec.task.features", dupes), Federation)
    target_as_feature = [*features, {"name": "converted", "type": "boolean"}]
    assert "cannot also be a feature" in _error(_with(FEDERATION, "spec.task.features", target_as_feature), Federation)
    cats_on_numeric = [{"name": "revenue", "type": "numeric", "categories": ["a"]}]
    assert "only categorical" in _error(_with(FEDERATION, "spec.task.features", cats_on_numeric), Federation)


def test_wrong_kind_and_missing_fields() -> None:
    assert "this is a Participant manifest; a Federation is needed" in _error(PARTICIPANT, Federation)
    doc = {k: v for k, v in PARTICIPANT.items() if k != "spec"}
    assert "spec: required field is missing" in _error(doc, Participant)


def test_consent_is_checked_on_both_sides() -> None:
    fed = parse_manifest(FEDERATION, Federation, "f")
    wrong_ref = parse_manifest(_with(PARTICIPANT, "spec.federationRef.name", "churn"), Participant, "p")
    with pytest.raises(ManifestError, match="names federation fedcrm-system/churn.*fix spec.federationRef"):
        check_membership(fed, wrong_ref)
    outsider = parse_manifest(_with(PARTICIPANT, "metadata.namespace", "tenant-z"), Participant, "p")
    with pytest.raises(ManifestError, match="'tenant-z' is not in the federation's spec.participants.namespaces"):
        check_membership(fed, outsider)


def test_files_round_trip_through_yaml(tmp_path: Path) -> None:
    fed = parse_manifest(FEDERATION, Federation, "f")
    path = tmp_path / "fed.yaml"
    path.write_text(dump_manifest(fed))
    assert load_federation(path) == fed
    assert "status" not in yaml.safe_load(path.read_text())
    part_path = tmp_path / "p.yaml"
    part_path.write_text(yaml.safe_dump(PARTICIPANT))
    assert load_participant(part_path).identity == "tenant-a/acme"


def test_unreadable_files_say_so(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="no such file"):
        load_federation(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("spec: [unclosed")
    with pytest.raises(ManifestError, match="not valid YAML"):
        load_federation(bad)
    two = tmp_path / "two.yaml"
    two.write_text(yaml.safe_dump(FEDERATION) + "---\n" + yaml.safe_dump(FEDERATION))
    with pytest.raises(ManifestError, match="exactly one Federation document, found 2"):
        load_federation(two)
