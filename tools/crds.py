"""Write crds/ from the manifest models, or (--check) fail when the committed CRDs drift from them."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from fedcrm.spec.crds import crd_manifests

CRDS = Path(__file__).resolve().parents[1] / "crds"
HEADER = "# Generated from src/fedcrm/spec/manifests.py by `make crds`; do not edit by hand.\n"


def render(crd: dict) -> str:
    return HEADER + yaml.safe_dump(crd, sort_keys=False, width=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 on drift")
    args = parser.parse_args()
    stale = []
    for name, crd in crd_manifests().items():
        path, text = CRDS / name, render(crd)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
        else:
            CRDS.mkdir(exist_ok=True)
            path.write_text(text)
    if stale:
        print("CRDs out of date with the spec models (run `make crds` and commit): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
