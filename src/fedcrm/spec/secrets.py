"""Kubernetes ``v1 Secret`` manifests, read locally so the same files work with and without a cluster.

``fedcrm run`` and ``fedcrm data check`` accept the Secret a Participant
references as an ordinary manifest next to it; in a cluster the operator mounts
the real Secret instead. Values never appear in ``repr`` or error messages.
"""

from __future__ import annotations

import base64
import binascii
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedcrm.spec.manifests import ObjectMeta

__all__ = ["Secret"]


class Secret(BaseModel):
    """A Secret as ``kubectl apply`` takes it: ``stringData`` in clear and/or base64 ``data``."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    api_version: Literal["v1"] = Field(default="v1", alias="apiVersion")
    kind: Literal["Secret"] = "Secret"
    metadata: ObjectMeta
    type: str = "Opaque"
    data: dict[str, str] = Field(default_factory=dict, repr=False)
    string_data: dict[str, str] = Field(default_factory=dict, alias="stringData", repr=False)
    immutable: bool | None = None

    @model_validator(mode="after")
    def _base64(self) -> Secret:
        for key, value in self.data.items():
            try:
                base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError(f"data.{key}: not valid base64 (put clear text under stringData instead)") from None
        return self

    @property
    def key(self) -> tuple[str, str]:
        return self.metadata.namespace, self.metadata.name

    def values(self) -> dict[str, str]:
        """Every key's text; ``stringData`` wins over ``data``, as the API server merges them."""
        out = {k: base64.b64decode(v).decode("utf-8") for k, v in self.data.items()}
        out.update(self.string_data)
        return out
