"""The front door: what the README tells a newcomer to run, run as a subprocess exactly as written.

`make test` itself is the command `.ci/run` runs, so it is exercised by every CI run; every other line of
the README's "Start here" block is run here, and each command's --help must work.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FEDCRM = [sys.executable, "-m", "fedcrm.cli.main"]


def start_here_commands() -> list[str]:
    """The command lines of the first fenced shell block under the README's "## Start here" heading."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Start here", 1)
    assert len(section) == 2, "README.md has no '## Start here' section"
    block = re.search(r"```(?:sh|bash|console)\n(.*?)```", section[1], re.S)
    assert block, "the README's Start here section has no ```sh block"
    lines = [re.sub(r"\s+#.*$", "", ln).strip() for ln in block.group(1).splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def _summary(stdout: str) -> list[str]:
    lines = stdout.splitlines()
    assert "Summary" in lines, f"no Summary in the demo's output:\n{stdout[-3000:]}"
    return [ln.strip() for ln in lines[lines.index("Summary") + 1:] if ln.strip()]


def assert_demo_summary(stdout: str, out: Path, *, enterprises: int, rounds: int, cwd: Path | None = None) -> None:
    """The closing summary the README promises, line by line, and the two reports it names (relative to ``cwd``)."""
    summary = _summary(stdout)
    assert len(summary) == 6, summary
    assert summary[0] == (f"{enterprises} enterprises trained one lead-conversion model together in {rounds} rounds. "
                          "No lead record left its enterprise's process."), summary[0]
    assert re.fullmatch(r"On [\d,]+ held-out leads the federated model predicts conversion with accuracy "
                        r"\d+\.\d\d% \(F1 \d+\.\d\d%, ROC AUC \d\.\d{3}\)\.", summary[1]), summary[1]
    assert re.fullmatch(r"Pooling all the data centrally would give \d+\.\d\d%: .+", summary[2]), summary[2]
    assert summary[3] == ("Updates and evaluation counts were masked (secure aggregation): "
                          "the aggregator saw only sums."), summary[3]
    assert re.fullmatch(r"Each enterprise sent and received [\d.]+ (B|KiB|MiB) per round\.", summary[4]), summary[4]
    federated, baseline = out / "federated" / "report.md", out / "baseline" / "report.md"
    assert summary[5].startswith(f"Reports: {federated} and {baseline} (finished in "), summary[5]
    if cwd is not None:
        for report in (cwd / federated, cwd / baseline):
            assert report.is_file() and report.with_suffix(".json").is_file(), report


@pytest.mark.slow
def test_fedcrm_demo_quick_ends_with_the_summary_and_both_reports(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = subprocess.run([*FEDCRM, "demo", "--quick", "--out", str(out)], capture_output=True, text=True,
                          timeout=600, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert_demo_summary(proc.stdout, out, enterprises=3, rounds=3, cwd=Path.cwd())


@pytest.mark.slow
def test_demo_takes_the_same_run_options_as_run(tmp_path: Path) -> None:
    """A run flag reaches `demo` too (once, --metrics-port existed only on `run` and `demo` crashed)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "demo"
    proc = subprocess.run([*FEDCRM, "demo", "--clients", "2", "--rows", "200", "--rounds", "1", "--metrics-port",
                           str(port), "--out", str(out)], capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_demo_summary(proc.stdout, out, enterprises=2, rounds=1, cwd=Path.cwd())


def test_the_start_here_block_is_what_a_newcomer_needs() -> None:
    commands = start_here_commands()
    assert commands[:2] == ["make demo", "make test"], commands


@pytest.mark.parametrize("command", start_here_commands())
def test_every_start_here_command_parses(command: str) -> None:
    """`make X` has a recipe; every other command's --help exits 0 (words before the first flag, plus --help)."""
    argv = shlex.split(command)
    if argv[0] == "make":
        proc = subprocess.run(["make", "-n", *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=60)
    else:
        words = [w for w in argv[: next((i for i, w in enumerate(argv) if w.startswith("-")), len(argv))]]
        proc = subprocess.run([*words, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{command}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"


@pytest.mark.slow
def test_start_here_commands_run_as_written(tmp_path: Path) -> None:
    """Every line after `make demo` and `make test`, in order, in a fresh folder that has this checkout's .venv."""
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    for command in start_here_commands()[2:]:
        proc = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=900,
                              stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, f"{command}: {proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        assert "Traceback" not in proc.stderr, f"{command}: {proc.stderr[-3000:]}"


@pytest.mark.slow
def test_make_demo_as_written() -> None:
    """The README's first command, from the checkout, exactly as a newcomer types it; the summary it promises."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "MAKEFLAGS", "MFLAGS", "MAKELEVEL"))}
    proc = subprocess.run(["make", "demo"], cwd=ROOT, capture_output=True, text=True, timeout=1800,
                          stdin=subprocess.DEVNULL, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_demo_summary(proc.stdout, Path("runs/demo"), enterprises=10, rounds=20, cwd=ROOT)
    readme = (ROOT / "README.md").read_text()
    promised = re.search(r"\nSummary\n(.*?)```", readme, re.S)
    assert promised, "the README no longer shows the demo's summary"
    assert_demo_summary("Summary\n" + promised.group(1), Path("runs/demo"), enterprises=10, rounds=20)
