"""The fedcrm images ``make images`` builds, as the e2e harness imports them into its node's containerd."""

from __future__ import annotations

import hashlib
import json
import subprocess
import tempfile
from pathlib import Path

from controlplane import ROOT, ControlPlaneError

__all__ = ["IMAGES_INDEX", "current_images", "image_refs", "postgres_image"]

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


# ---------------------------------------------------------------------- images of the e2e's own stand-ins
E2E_CACHE = Path.home() / ".cache" / "fedcrm" / "e2e-images"
DEBIAN_MIRROR = "http://deb.debian.org/debian"


def postgres_image() -> tuple[Path, str]:
    """Debian bookworm's PostgreSQL 15 as an image (a tenant's CRM database in its own namespace), built once.

    mmdebstrap makes the root filesystem (no RUN step is possible here) and buildah
    turns it into an OCI archive; the image runs as Debian's ``postgres`` user, by name."""
    command = ["mmdebstrap", "--variant=minbase", "--include=postgresql-15", "--format=tar",
               "--dpkgopt=path-exclude=/usr/share/doc/*", "--dpkgopt=path-exclude=/usr/share/man/*", "bookworm"]
    key = hashlib.sha256(json.dumps(command).encode()).hexdigest()[:12]
    ref = f"localhost/fedcrm-e2e/postgres:{key}"
    archive = E2E_CACHE / f"postgres-{key}.oci.tar"
    if archive.exists():
        return archive, ref
    E2E_CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=E2E_CACHE) as tmp:
        rootfs = Path(tmp) / "rootfs.tar"
        _run([*command, str(rootfs), DEBIAN_MIRROR], "mmdebstrap of PostgreSQL")
        container = _run(["buildah", "from", "scratch"], "buildah from").strip()
        try:
            _run(["buildah", "add", container, str(rootfs), "/"], "buildah add")
            _run(["buildah", "config", "--user", "postgres", "--env",
                  "PATH=/usr/lib/postgresql/15/bin:/usr/sbin:/usr/bin:/sbin:/bin", "--env", "LANG=C.UTF-8",
                  "--cmd", '["postgres", "--version"]', container], "buildah config")
            _run(["buildah", "commit", "--format", "oci", container, ref], "buildah commit")
        finally:
            subprocess.run(["buildah", "rm", container], capture_output=True)
        partial = Path(tmp) / "image.oci.tar"
        _run(["buildah", "push", ref, f"oci-archive:{partial}:{ref}"], "buildah push")
        subprocess.run(["buildah", "rmi", ref], capture_output=True)
        partial.rename(archive)
    return archive, ref


def _run(argv: list[str], what: str) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ControlPlaneError(f"{what} failed ({' '.join(argv[:3])} ...):\n{proc.stderr[-3000:]}")
    return proc.stdout
