"""CustomResourceDefinitions generated from the manifest models.

The pydantic models are the one source of truth for what a Federation or a
Participant may contain. This module turns their JSON Schema into the
structural OpenAPI v3 schema Kubernetes wants, so the API server enforces the
same types, ranges, enums and defaults that ``fedcrm run`` does, and
``kubectl explain`` shows the same descriptions. ``tools/crds.py`` writes the
result into ``crds/``; CI fails when the committed files drift from the models.

Rules that JSON Schema cannot say (a model validator) are repeated as CEL
``x-kubernetes-validations`` next to the field, or checked by the operator,
which reports them as a status condition.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel

from fedcrm.spec.manifests import (
    API_VERSION,
    FederationSpec,
    FederationStatus,
    ParticipantSpec,
    ParticipantStatus,
)

__all__ = ["GROUP", "VERSION", "crd_manifests", "openapi_schema"]

GROUP, VERSION = API_VERSION.split("/")

# JSON Schema keywords Kubernetes' structural schemas accept as they are.
_KEPT = {
    "type",
    "format",
    "description",
    "enum",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "pattern",
    "default",
    "x-kubernetes-validations",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
}


class SchemaGap(ValueError):
    """The models use a construct this generator cannot express; fix the model or the generator."""


def openapi_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of ``model``, with every ``$ref`` inlined."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    return _convert(raw, defs, path=model.__name__)


def _convert(node: dict[str, Any], defs: dict[str, Any], *, path: str) -> dict[str, Any]:
    node = copy.deepcopy(node)
    if "$ref" in node:
        target = defs[node.pop("$ref").rsplit("/", 1)[-1]]
        merged = {**target, **node}  # a field's own description wins over the class docstring
        return _convert(merged, defs, path=path)

    if "anyOf" in node:
        # Optional fields are simply omitted: no `nullable`, so the server never stores an explicit null.
        options = [o for o in node.pop("anyOf") if o.get("type") != "null"]
        if len(options) == 1:
            inner = _convert({**options[0]}, defs, path=path)
            for key in ("description", "x-kubernetes-validations"):
                if key in node:
                    inner[key] = node[key]
            node = {**node, **inner}
        elif _is_int_or_string(options):
            node["x-kubernetes-int-or-string"] = True
            node["anyOf"] = [_scalar_for_int_or_string(o) for o in options]
        elif all(o.get("type") in {"string", "boolean", "integer", "number"} for o in options):
            # A mixed scalar (e.g. a mapped label value); pydantic checks it, the API server keeps it.
            node["x-kubernetes-preserve-unknown-fields"] = True
        else:
            raise SchemaGap(f"{path}: cannot express anyOf {options} in a structural schema")
    if "const" in node:
        node["enum"] = [node.pop("const")]
    if isinstance(node.get("exclusiveMinimum"), (int, float)) and not isinstance(node["exclusiveMinimum"], bool):
        node["minimum"], node["exclusiveMinimum"] = node["exclusiveMinimum"], True
    if isinstance(node.get("exclusiveMaximum"), (int, float)) and not isinstance(node["exclusiveMaximum"], bool):
        node["maximum"], node["exclusiveMaximum"] = node["exclusiveMaximum"], True

    out: dict[str, Any] = {k: v for k, v in node.items() if k in _KEPT | {"exclusiveMinimum", "exclusiveMaximum"}}
    for flag in ("x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields", "anyOf"):
        if flag in node:
            out[flag] = node[flag]
    if out.get("default", 0) is None:
        del out["default"]  # "unset" needs no default; the API server would store an explicit null

    kind = node.get("type")
    if kind == "object" or "properties" in node:
        out["type"] = "object"
        props = node.get("properties", {})
        if props:
            out["properties"] = {
                name: _convert(sub, defs, path=f"{path}.{name}") for name, sub in props.items()
            }
        if node.get("required"):
            out["required"] = list(node["required"])
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            out["additionalProperties"] = _convert(extra, defs, path=f"{path}.*")
        if isinstance(out.get("default"), dict) and props:
            out["default"] = {}  # let the server fill the nested defaults below, one field at a time
    elif kind == "array":
        out["items"] = _convert(node.get("items", {}), defs, path=f"{path}[]")
        if isinstance(out.get("default"), list) and out["default"] and isinstance(out["default"][0], dict):
            raise SchemaGap(f"{path}: object defaults inside a list are not supported")
    return out


def _is_int_or_string(options: list[dict[str, Any]]) -> bool:
    return sorted(o.get("type", "") for o in options) == ["integer", "string"]


def _scalar_for_int_or_string(option: dict[str, Any]) -> dict[str, Any]:
    # Structural schemas forbid `type` under anyOf: x-kubernetes-int-or-string already says it.
    kept = {k: v for k, v in option.items() if k in _KEPT - {"default", "description", "type"}}
    if "const" in option:
        kept["enum"] = [option["const"]]
    return kept


def _undocumented(schema: dict[str, Any], path: str) -> list[str]:
    """Fields without a description: ``kubectl explain`` must document every one."""
    missing = []
    for name, sub in schema.get("properties", {}).items():
        here = f"{path}.{name}"
        if not sub.get("description"):
            missing.append(here)
        missing += _undocumented(sub, here)
        if "items" in sub:
            missing += _undocumented(sub["items"], f"{here}[]")
        if isinstance(sub.get("additionalProperties"), dict):
            missing += _undocumented(sub["additionalProperties"], f"{here}.*")
    return missing


def _ready_column() -> dict[str, Any]:
    return {
        "name": "Ready",
        "type": "string",
        "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
        "priority": 1,
    }


def _crd(
    *,
    kind: str,
    plural: str,
    short: str,
    spec_model: type[BaseModel],
    status_model: type[BaseModel],
    description: str,
    columns: list[dict[str, Any]],
) -> dict[str, Any]:
    spec = openapi_schema(spec_model)
    status = openapi_schema(status_model)
    missing = _undocumented(spec, f"{kind}.spec") + _undocumented(status, f"{kind}.status")
    if missing:
        raise SchemaGap("fields without a description (add Field(description=...)): " + ", ".join(missing))
    spec.pop("default", None)
    status.pop("default", None)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{plural}.{GROUP}",
            "labels": {"app.kubernetes.io/part-of": "fedcrm"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": [short],
                "categories": ["fedcrm"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": description,
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string", "description": API_VERSION},
                                "kind": {"type": "string", "description": kind},
                                "metadata": {"type": "object"},
                                "spec": spec,
                                "status": status,
                            },
                        }
                    },
                }
            ],
        },
    }


def crd_manifests() -> dict[str, dict[str, Any]]:
    """File name -> CRD, for ``crds/``."""
    age = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
    federation = _crd(
        kind="Federation",
        plural="federations",
        short="fed",
        spec_model=FederationSpec,
        status_model=FederationStatus,
        description=(
            "A federated training job across tenants' CRM data: what to learn, how, under which privacy "
            "guarantees, and which tenant namespaces may join. Lives in the coordinator's namespace."
        ),
        columns=[
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            {"name": "Round", "type": "string", "jsonPath": ".status.progress"},
            {"name": "Participants", "type": "integer", "jsonPath": ".status.enrolledParticipants"},
            {"name": "Epsilon", "type": "number", "jsonPath": ".status.epsilonSpent"},
            {"name": "Accuracy", "type": "string", "jsonPath": ".status.accuracy"},
            _ready_column(),
            age,
        ],
    )
    participant = _crd(
        kind="Participant",
        plural="participants",
        short="fedp",
        spec_model=ParticipantSpec,
        status_model=ParticipantStatus,
        description=(
            "A tenant's consent to join a Federation with its own data. Lives in the tenant's namespace and "
            "may reference only objects there."
        ),
        columns=[
            {"name": "Federation", "type": "string", "jsonPath": ".spec.federationRef.name"},
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            {
                "name": "Reason",
                "type": "string",
                "jsonPath": '.status.conditions[?(@.type=="Admitted")].reason',
            },
            _ready_column(),
            age,
        ],
    )
    return {"fedcrm.io_federations.yaml": federation, "fedcrm.io_participants.yaml": participant}
