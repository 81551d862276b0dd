"""This participant's own count of privacy releases, kept where a restarted process finds it.

The node refuses to let out more training results than its Federation's budget was planned for
(``spec.training.rounds`` with differential privacy). Counted in memory only, a pod restarted
mid-federation would start again from zero and could be talked into releasing the planned number
once more. With a state directory (a small claim in the tenant's own namespace, ``spec.stateClaim``)
the count survives: it is written, atomically and durably, *before* the release leaves — a crash
between the two over-counts by one, never under-counts.

One file per Federation and version of its terms: a new Federation, or changed terms (which the
tenant re-consented to), starts its own count; the same Federation restarted continues it.

The same file keeps the noised preprocessing statistics once released under differential privacy: an
aggregator that asks again (a retried sum, a restart, or on purpose) gets the very same vector, never a
fresh draw it could average the noise out of.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from fedcrm.errors import ManifestError

__all__ = ["ReleaseLedger"]

log = logging.getLogger("fedcrm.node")


class ReleaseLedger:
    def __init__(self, directory: Path | None, *, federation: str, terms: str) -> None:
        self.path = None if directory is None else directory / f"releases-{terms[:16]}.json"
        self.federation, self.terms = federation, terms
        self.count = 0
        self.statistics: list[float] | None = None
        if self.path is None:
            return
        if not directory.is_dir():  # type: ignore[union-attr]
            raise ManifestError(f"--state-dir {directory} is not a directory (in a cluster: the Participant's "
                                "spec.stateClaim, mounted read-write)")
        if self.path.exists():
            try:
                saved = json.loads(self.path.read_text())
                self.count = int(saved["releases"])
                kept = saved.get("statistics")
                self.statistics = None if kept is None else [float(v) for v in kept]
            except (ValueError, KeyError, TypeError) as err:
                # Unreadable is not zero: guessing low would let the budget be spent twice.
                raise ManifestError(f"{self.path}: this participant's count of privacy releases is unreadable "
                                    f"({err}); restore it, or remove it only if this Federation never trained "
                                    "with this participant") from None
            log.info("privacy releases already counted for %s: %d (from %s)", federation, self.count, self.path)

    @property
    def durable(self) -> bool:
        return self.path is not None

    def record(self) -> None:
        """Count one release; with a state directory, durably, before the caller lets it out."""
        self.count += 1
        log.info("privacy release %d of this participant (%s)", self.count,
                 f"counted in {self.path}" if self.path is not None else "counted in this process")
        self._save()

    def keep_statistics(self, noised: list[float]) -> None:
        """Keep the noised statistics (durably, with a state directory) before they are first let out."""
        self.statistics = list(noised)
        log.info("noised preprocessing statistics kept (%s); every later request gets the same vector",
                 f"in {self.path}" if self.path is not None else "in this process")
        self._save()

    def _save(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w") as f:
            json.dump({"federation": self.federation, "terms": self.terms, "releases": self.count,
                       "statistics": self.statistics}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself survives a power loss
        finally:
            os.close(directory)
