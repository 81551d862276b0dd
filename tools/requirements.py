"""Print the pinned requirements of fedcrm and the given extras, one per line.

The Makefile downloads these into a wheel cache under ~/.cache/fedcrm keyed by
pyproject.toml's hash, so a fresh clone on a machine that has run before
installs without the network.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path


def requirements(extras: list[str]) -> list[str]:
    project = tomllib.loads(Path(__file__).resolve().parents[1].joinpath("pyproject.toml").read_text())["project"]
    optional = project.get("optional-dependencies", {})
    out: list[str] = list(project["dependencies"])
    pending, seen = list(extras), set()
    while pending:
        extra = pending.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for req in optional[extra]:
            self_ref = re.fullmatch(r"fedcrm\[(.+)\]", req)
            if self_ref:
                pending.extend(x.strip() for x in self_ref.group(1).split(","))
            else:
                out.append(req)
    return sorted(set(out))


if __name__ == "__main__":
    print("\n".join(requirements(sys.argv[1:])))
