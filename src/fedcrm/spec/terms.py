"""A Federation's terms: what a participant consented to, compared field by field.

A participant enforces its own copy of the Federation (mounted beside it in a
pod, the file it was given locally), never the aggregator's word: an
aggregator that serves weaker terms — secure aggregation off, a lower
threshold, a larger epsilon, more rounds — is refused before anything is
trained. The terms are the sections that decide what is learned and what
leaks: task, model, training and privacy. Who may join and what pods request
are the coordinator's business and may differ.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from fedcrm.spec.manifests import FederationSpec

__all__ = ["TERMS_SECTIONS", "terms", "terms_differences", "terms_digest"]

TERMS_SECTIONS = ("task", "model", "training", "privacy")


def terms(spec: FederationSpec) -> dict[str, Any]:
    """The terms as plain JSON values, with the manifest's field names."""
    dumped = spec.model_dump(mode="json", by_alias=True)
    return {section: dumped[section] for section in TERMS_SECTIONS}


def terms_digest(spec: FederationSpec) -> str:
    """SHA-256 of the canonical JSON of the terms: equal digests, equal terms."""
    canonical = json.dumps(terms(spec), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _flatten(value: Any, path: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(item, f"{path}.{key}" if path else key, out)
    else:
        out[path] = value


def terms_differences(own: FederationSpec, served: FederationSpec) -> list[str]:
    """``spec.<path>: own X, served Y`` for every field where the served terms differ from one's own."""
    mine: dict[str, Any] = {}
    theirs: dict[str, Any] = {}
    _flatten(terms(own), "", mine)
    _flatten(terms(served), "", theirs)
    return [
        f"spec.{path}: own {json.dumps(mine.get(path))}, served {json.dumps(theirs.get(path))}"
        for path in sorted(set(mine) | set(theirs))
        if mine.get(path) != theirs.get(path)
    ]
