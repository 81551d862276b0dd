"""Regenerate the committed gRPC stubs from protos/, or (--check) fail if they are stale.

The stubs are committed so images need no protoc; CI runs --check so the
committed code always matches the .proto contract.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[1]
PROTOS = ROOT / "protos"
OUT = ROOT / "src"
GENERATED = ("federation_pb2.py", "federation_pb2.pyi", "federation_pb2_grpc.py")


def generate(into: Path) -> None:
    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    code = protoc.main(
        ["protoc", f"-I{PROTOS}", f"--python_out={into}", f"--pyi_out={into}", f"--grpc_python_out={into}", *sources]
    )
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 if stale")
    args = parser.parse_args()
    if not args.check:
        generate(OUT)
        print("regenerated stubs in src/fedcrm/protocol/")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        stale = [
            name for name in GENERATED
            if not filecmp.cmp(Path(tmp) / "fedcrm/protocol" / name, OUT / "fedcrm/protocol" / name, shallow=False)
        ]
    if stale:
        print(f"stale generated stubs: {', '.join(stale)}; run `make protos` and commit", file=sys.stderr)
        return 1
    print("generated stubs match protos/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
