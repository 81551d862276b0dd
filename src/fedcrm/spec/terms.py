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

from fedcrm.spec.manifests import FederationSpec, Requirements

__all__ = [
    "TERMS_SECTIONS", "privacy_summary", "terms", "terms_differences", "terms_digest", "unmet_requirements",
]

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


def unmet_requirements(requires: Requirements, spec: FederationSpec) -> list[str]:
    """Each of a tenant's requirements (``spec.requires``) that the Federation's spec falls short of, in words."""
    privacy, unmet = spec.privacy, []
    secagg, dp = privacy.secure_aggregation, privacy.differential_privacy
    if (requires.secure_aggregation or requires.min_threshold is not None) and not secagg.enabled:
        unmet.append("secure aggregation must be on (spec.privacy.secureAggregation.enabled is false)")
    elif requires.min_threshold is not None and secagg.threshold < requires.min_threshold:
        unmet.append(f"the secure-aggregation threshold must be at least {requires.min_threshold} "
                     f"(spec.privacy.secureAggregation.threshold is {secagg.threshold})")
    if requires.max_epsilon is not None:
        if not dp.enabled:
            unmet.append(f"differential privacy must be on with epsilon at most {requires.max_epsilon} "
                         "(spec.privacy.differentialPrivacy.mode is none)")
        elif dp.epsilon is not None and dp.epsilon > requires.max_epsilon:
            unmet.append(f"epsilon must be at most {requires.max_epsilon} "
                         f"(spec.privacy.differentialPrivacy.epsilon is {dp.epsilon})")
    if requires.min_tenants is not None and spec.training.min_participants < requires.min_tenants:
        unmet.append(f"every round must have at least {requires.min_tenants} tenants "
                     f"(spec.training.minParticipants is {spec.training.min_participants})")
    return unmet


def privacy_summary(spec: FederationSpec) -> str:
    """The terms a tenant weighs, on one line: for a condition asking it to re-consent."""
    secagg, dp = spec.privacy.secure_aggregation, spec.privacy.differential_privacy
    masking = f"secure aggregation on (threshold {secagg.threshold})" if secagg.enabled else "secure aggregation off"
    noise = f"DP {dp.mode} with epsilon {dp.epsilon}, delta {dp.delta}" if dp.enabled else "no differential privacy"
    return (f"{masking}; {noise}; {spec.training.rounds} rounds; at least {spec.training.min_participants} "
            "participants per round")
