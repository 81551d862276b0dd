"""The fedcrm images ``make images`` builds, as the e2e harness imports them into its node's containerd."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from controlplane import ROOT, ControlPlaneError

__all__ = ["IMAGES_INDEX", "current_images", "image_refs"]

IMAGES_INDEX = Path.home() / ".cache" / "fedcrm" / "images" / "current.json"
ROLES = ("operator", "node", "aggregator")


def _index(build: bool) -> dict[str, dict[str, object]]:
    if build:
        proc = subprocess.run([str(ROOT / "tools" / "build-images")], cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ControlPlaneError(f"tools/build-images failed:\n{proc.stderr[-3000:]}")
    if not IMAGES_INDEX.exists():
        raise ControlPlaneError(f"{IMAGES_INDEX} is missing: run `make images` first")
    index: dict[str, dict[str, object]] = json.loads(IMAGES_INDEX.read_text())
    missing = [role for role in ROLES if role not in index or not Path(str(index[role]["archive"])).exists()]
    if missing:
        raise ControlPlaneError(f"images missing for {', '.join(missing)}: run `make images`")
    return index


def current_images(*, build: bool = False) -> dict[Path, str]:
    """Archive → image reference, for :class:`realnode.RealNodeCluster` (``build``: run ``make images`` first)."""
    return {Path(str(entry["archive"])): str(entry["ref"]) for entry in _index(build).values()}


def image_refs() -> dict[str, str]:
    """Role (operator, node, aggregator) → image reference, for chart values."""
    return {role: str(entry["ref"]) for role, entry in _index(False).items()}
