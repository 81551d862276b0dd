"""Credentials of a data source: one file per Secret key, in one directory.

In a cluster the operator mounts the Secret a Participant references
(``spec.data.<source>.secretRef``) at :data:`MOUNT_PATH` in the training
container only, readable by it alone; locally ``fedcrm run`` writes the same
layout from the Secret manifest given next to the Participant. Either way the
node reads the directory with :func:`read_credentials_dir`.

Keys per source and login kind:

* Salesforce, access token: ``instanceUrl`` + ``accessToken``
* Salesforce, password: ``username`` + ``password`` + ``securityToken``
* Salesforce, JWT bearer: ``username`` + ``consumerKey`` + ``privateKey`` (PEM)
* SQL: ``url`` (a SQLAlchemy URL, e.g. ``postgresql+psycopg://user:pass@host:5432/crm``)
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path

from fedcrm.errors import DataError

__all__ = ["Credentials", "MOUNT_PATH", "read_credentials_dir", "write_credentials_dir"]

MOUNT_PATH = "/var/run/secrets/fedcrm/credentials"


class Credentials(Mapping[str, str]):
    """Secret values by key; ``repr`` and ``str`` show the keys only, so a stray log line leaks nothing."""

    def __init__(self, values: Mapping[str, str], *, origin: str) -> None:
        self._values = dict(values)
        self.origin = origin  # where they came from, for messages: "Secret tenant-a/sf-login"

    def __getitem__(self, key: str) -> str:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Credentials({self.origin}: keys {sorted(self._values)})"

    __str__ = __repr__


def read_credentials_dir(path: str | Path, *, origin: str | None = None) -> Credentials:
    """Every key file of a mounted Secret directory (Kubernetes' ``..data`` bookkeeping entries skipped)."""
    directory = Path(path)
    if not directory.is_dir():
        raise DataError(f"credentials directory {directory} does not exist; mount the Participant's Secret there")
    values = {}
    for entry in sorted(directory.iterdir()):
        if entry.name.startswith(".") or not entry.is_file():
            continue
        try:
            values[entry.name] = entry.read_text(encoding="utf-8").rstrip("\n")
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"cannot read credentials key {entry.name!r} in {directory}: {err}") from None
    return Credentials(values, origin=origin or str(directory))


def write_credentials_dir(path: str | Path, values: Mapping[str, str]) -> Path:
    """Write one 0600 file per key into a fresh 0700 directory: the mounted-Secret layout, for local runs."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(directory, 0o700)
    for key, value in values.items():
        if "/" in key or key.startswith("."):
            raise DataError(f"Secret key {key!r} cannot be a file name")
        fd = os.open(directory / key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(value)
    return directory
