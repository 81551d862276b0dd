"""The container images, built daemonless by tools/build-images and checked from their OCI archives alone.

The module builds the images first: a cache hit in about a second once the archives exist for the current
sources, about 5 minutes on 2 cores the first time (docs/images.md). Everything else reads the archives with
tarfile (index.json, manifest, config, the layers' member lists), so no daemon is needed. The operator and
aggregator images are unpacked and their entry modules run from them: as root, in a chroot of the image's own
root filesystem (its Debian python3) as uid 65532; otherwise with this interpreter on the image's packages.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SITE = "opt/fedcrm/site-packages/"
ROLES = ("operator", "node", "aggregator")
PORTS = {"operator": {"8080/tcp", "8081/tcp"}, "node": set(), "aggregator": {"8443/tcp", "9090/tcp"}}
# What must never be in an image: the operator and aggregator stay small and torch-free (import-linter
# contracts keep their code from importing these; this keeps the packages out of their images).
FORBIDDEN = {"operator": ("torch", "pandas", "opacus"), "aggregator": ("torch", "pandas", "opacus"), "node": ()}

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]


@dataclasses.dataclass
class Image:
    """One built image as the archive holds it."""

    role: str
    ref: str
    archive: Path
    size: int

    @cached_property
    def _index_and_manifest(self) -> tuple[dict, dict]:
        with tarfile.open(self.archive) as tar:
            index = json.load(_member(tar, "index.json"))
            manifest = json.load(_member(tar, _blob(index["manifests"][0]["digest"])))
        return index, manifest

    @property
    def index(self) -> dict:
        return self._index_and_manifest[0]

    @property
    def manifest(self) -> dict:
        return self._index_and_manifest[1]

    @cached_property
    def config(self) -> dict:
        with tarfile.open(self.archive) as tar:
            return json.load(_member(tar, _blob(self.manifest["config"]["digest"])))

    def layer_names(self, layer: int) -> Iterator[str]:
        """Member names of one layer (uncompressed tar inside the archive: headers are read, file data skipped)."""
        with tarfile.open(self.archive) as tar, tarfile.open(
                fileobj=_member(tar, _blob(self.manifest["layers"][layer]["digest"]))) as inner:
            for member in inner:
                yield member.name.removeprefix("./")

    def names(self) -> Iterator[str]:
        for layer in range(len(self.manifest["layers"])):
            yield from self.layer_names(layer)

    def unpack(self, dest: Path) -> Path:
        dest.chmod(0o755)  # the root directory of a filesystem uid 65532 must traverse
        with tarfile.open(self.archive) as tar:
            for layer in self.manifest["layers"]:
                with tarfile.open(fileobj=_member(tar, _blob(layer["digest"]))) as inner:
                    inner.extractall(dest, filter="tar")
        return dest


def _blob(digest: str) -> str:
    return f"blobs/sha256/{digest.removeprefix('sha256:')}"


def _member(tar: tarfile.TarFile, name: str):  # noqa: ANN202 - a readable, seekable file object
    found = tar.extractfile(name)
    assert found is not None, f"{name} is not a file in the archive"
    return found


@pytest.fixture(scope="module")
def images() -> dict[str, Image]:
    """Build (or find current) the three images; the script prints role -> {ref, archive, bytes} as JSON."""
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "build-images")], stdout=subprocess.PIPE,
                            stderr=None, text=True, timeout=2300)
    assert result.returncode == 0, "tools/build-images failed (its messages are above)"
    current = json.loads(result.stdout)
    assert set(current) == set(ROLES)
    assert json.loads((Path.home() / ".cache/fedcrm/images/current.json").read_text()) == current
    return {role: Image(role, v["ref"], Path(v["archive"]), v["bytes"]) for role, v in current.items()}


@pytest.mark.parametrize("role", ROLES)
def test_images_run_their_entry_module_as_65532(images: dict[str, Image], role: str) -> None:
    config = images[role].config["config"]
    assert config["User"] == "65532:65532"
    assert config["Entrypoint"] == ["python3", "-m", f"fedcrm_{role}"]
    assert not config.get("Cmd")
    env = dict(e.split("=", 1) for e in config["Env"])
    assert env["PYTHONPATH"] == "/opt/fedcrm/site-packages"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1" and env["PYTHONUNBUFFERED"] == "1"
    assert set(config.get("ExposedPorts") or {}) == PORTS[role]


@pytest.mark.parametrize("role", ROLES)
def test_archives_name_their_image_for_containerd(images: dict[str, Image], role: str) -> None:
    image = images[role]
    assert re.fullmatch(rf"localhost/fedcrm/{role}:[0-9a-f]{{12}}", image.ref)
    assert image.archive.name == f"{role}-{image.ref.rsplit(':', 1)[1]}.oci.tar"
    assert image.size == image.archive.stat().st_size
    annotations = image.index["manifests"][0]["annotations"]
    assert annotations["org.opencontainers.image.ref.name"] == image.ref  # `ctr images import` keeps it as the name
    # Uncompressed layers: an import does not decompress 6 GB; deps and app are layers of their own.
    assert [layer["mediaType"] for layer in image.manifest["layers"]] == ["application/vnd.oci.image.layer.v1.tar"] * 3


@pytest.mark.parametrize("role", ["operator", "aggregator"])
def test_operator_and_aggregator_images_hold_no_torch(images: dict[str, Image], role: str) -> None:
    packages = {name[len(SITE):].split("/")[0] for name in images[role].names() if name.startswith(SITE)}
    assert f"fedcrm_{role}" in packages and "fedcrm" in packages
    assert not packages & set(FORBIDDEN[role])


def test_node_image_holds_torch(images: dict[str, Image]) -> None:
    deps_layer = 1  # base, deps, app
    assert any(name.startswith(f"{SITE}torch/") for name in images["node"].layer_names(deps_layer))


@pytest.mark.parametrize("role", ROLES)
def test_fedcrm_modules_are_precompiled(images: dict[str, Image], role: str) -> None:
    """Every module of fedcrm's own layer has an unchecked-hash .pyc: valid whatever the files' mtimes, so a
    read-only image never recompiles at start."""
    names = set(images[role].layer_names(2))
    sources = {n for n in names if n.startswith(SITE) and n.endswith(".py")}
    assert any(s.startswith(f"{SITE}fedcrm_{role}/") for s in sources)
    missing = [s for s in sources if f"{s.rsplit('/', 1)[0]}/__pycache__/{Path(s).stem}.cpython-311.pyc" not in names]
    assert not missing


@pytest.fixture(scope="module")
def unpacked(images: dict[str, Image], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """The operator and aggregator images' root filesystems (about 0.7 GB together, removed afterwards)."""
    roots = {role: images[role].unpack(tmp_path_factory.mktemp(role)) for role in ("operator", "aggregator")}
    yield roots
    for root in roots.values():
        shutil.rmtree(root, ignore_errors=True)


def _run_in_image(rootfs: Path, env: dict[str, str], argv: list[str], *, uid: int) -> subprocess.CompletedProcess:
    """Run argv in the unpacked image: chrooted as ``uid`` when we are root, else with this interpreter."""
    if os.geteuid() == 0:
        def enter() -> None:
            os.chroot(rootfs)
            os.chdir("/")
            if uid != 0:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)

        return subprocess.run(argv, env=env, preexec_fn=enter, capture_output=True, text=True, timeout=120)
    host_env = {**env, "PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(rootfs / SITE)}
    # -S: no site-packages of this environment, so only what the image holds can be imported.
    return subprocess.run([sys.executable, "-S", *argv[1:]], env=host_env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("role", ["operator", "aggregator"])
def test_entry_modules_start_from_the_image_files(images: dict[str, Image], unpacked: dict[str, Path],
                                                   role: str) -> None:
    rootfs = unpacked[role]
    env = {**dict(e.split("=", 1) for e in images[role].config["config"]["Env"]), "HOME": "/"}
    helped = _run_in_image(rootfs, env, ["python3", "-m", f"fedcrm_{role}", "--help"], uid=65532)
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith(f"usage: fedcrm-{role}")

    # Every module imports from what the image holds, without pulling in torch or pandas; and with bytecode
    # writing allowed and a user who could write, nothing is written: the .pyc files are already valid.
    before = sorted(p for p in (rootfs / "opt").rglob("*"))
    writable_env = {k: v for k, v in env.items() if k != "PYTHONDONTWRITEBYTECODE"}
    code = (f"import importlib, pkgutil, sys, fedcrm_{role} as p\n"
            "for m in pkgutil.walk_packages(p.__path__, p.__name__ + '.'): importlib.import_module(m.name)\n"
            "print(sorted(k for k in ('torch', 'pandas', 'opacus') if k in sys.modules))")
    imported = _run_in_image(rootfs, writable_env, ["python3", "-c", code], uid=0)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip() == "[]"
    assert sorted(p for p in (rootfs / "opt").rglob("*")) == before


def _build_images_module():  # noqa: ANN202 - the script, loaded as a module for its pure parts
    import importlib.machinery
    import importlib.util

    loader = importlib.machinery.SourceFileLoader("fedcrm_build_images", str(ROOT / "tools" / "build-images"))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[loader.name] = module  # dataclasses look their module up there
    loader.exec_module(module)
    return module


def test_a_build_the_disk_cannot_hold_is_refused_before_it_starts(tmp_path: Path) -> None:
    build_images = _build_images_module()
    plan = build_images.make_plan("buildah")
    node = next(r for r in build_images.ROLES if r.name == "node")
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(build_images.BuildError) as refused:
        build_images.check_free_space(tmp_path, plan, [node], {"node": free})  # needs at least 3× free
    message = str(refused.value)
    assert "building the node image(s) needs about" in message and "is free" in message
    assert "--cache/--storage" in message  # says what to do about it
    build_images.check_free_space(tmp_path, plan, [node], {"node": 1 << 20})  # a small image fits
