"""Reading Federation and Participant objects from the API into the spec models."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from fedcrm.spec.loading import parse_manifest
from fedcrm.spec.manifests import API_VERSION, Federation, Participant

__all__ = ["API", "FROZEN_SECTIONS", "GROUP", "VERSION", "changed_sections", "frozen_digest", "parse_federation",
           "parse_participant"]

API = API_VERSION  # one place: fedcrm.spec.manifests
GROUP, VERSION = API.split("/")


def _manifest(body: dict[str, Any], kind: str) -> dict[str, Any]:
    meta = body.get("metadata") or {}
    return {
        "apiVersion": API,
        "kind": kind,
        "metadata": {"name": meta.get("name"), "namespace": meta.get("namespace")},
        "spec": body.get("spec") or {},
    }


def parse_federation(body: dict[str, Any]) -> Federation:
    """The model of a Federation object; :class:`ManifestError` names the field to fix."""
    meta = body.get("metadata") or {}
    return parse_manifest(_manifest(body, "Federation"), Federation, f"Federation {meta.get('namespace')}/{meta.get('name')}")


def parse_participant(body: dict[str, Any]) -> Participant:
    meta = body.get("metadata") or {}
    return parse_manifest(
        _manifest(body, "Participant"), Participant, f"Participant {meta.get('namespace')}/{meta.get('name')}"
    )


#: What a running training was started with; changing any of it mid-training is refused.
FROZEN_SECTIONS = ("task", "model", "training", "privacy")


def frozen_digest(federation: Federation) -> str:
    spec = federation.spec.model_dump(mode="json", by_alias=True)
    frozen = {k: spec[k] for k in FROZEN_SECTIONS}
    return hashlib.sha256(json.dumps(frozen, sort_keys=True).encode()).hexdigest()[:16]


def changed_sections(federation: Federation, started_with: dict[str, Any] | None) -> list[str]:
    """The frozen sections that differ from the spec training started with."""
    if not started_with:
        return []
    spec = federation.spec.model_dump(mode="json", by_alias=True)
    return [f"spec.{k}" for k in FROZEN_SECTIONS if spec.get(k) != started_with.get(k)]

