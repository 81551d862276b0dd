"""What an aggregator process is told at start.

The CLI writes it for a local run; in a cluster the operator renders the same
model into the aggregator's ConfigMap. Paths are absolute or relative to the
process's working directory.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from fedcrm.errors import ManifestError
from fedcrm.spec.manifests import Federation

__all__ = ["AggregatorConfig", "TlsPaths"]


class TlsPaths(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    ca: Path
    cert: Path
    key: Path


class AggregatorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    federation: Federation
    participants: list[str] = Field(description="Identities (<namespace>/<name>) allowed to connect.")
    listen: str = Field(default="0.0.0.0:8443", description="host:port; port 0 picks a free port.")
    tls: TlsPaths
    out_dir: Path = Field(description="Where the model, report, events and checkpoints are written.")
    port_file: Path | None = Field(default=None, description="Written with the bound port once serving.")
    status_listen: str | None = Field(
        default=None,
        description="host:port of the HTTP endpoint serving /healthz, /status (JSON) and /metrics; unset: none.",
    )

    def write(self, path: Path) -> None:
        path.write_text(self.model_dump_json(by_alias=True, indent=2))

    @classmethod
    def read(cls, path: Path) -> AggregatorConfig:
        try:
            return cls.model_validate(json.loads(Path(path).read_text()))
        except FileNotFoundError:
            raise ManifestError(f"{path}: no such aggregator config") from None
        except ValueError as err:
            raise ManifestError(f"{path}: invalid aggregator config: {err}") from None
