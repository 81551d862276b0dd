"""The benchmarks run, and fail loudly when they cannot.

A script run as ``python bench/<script>.py`` has bench/ as sys.path[0], ahead of
the standard library and site-packages, so a module there named like one
Python or a dependency imports replaces it (bench/operator.py once broke
``import argparse`` in the Flower environment, and bench-secagg wrote NaN rows
and exited 0). The slow tests run every ``make bench-*`` target with QUICK=1
and check that each result is a finite measurement.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import json
import math
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
VENVS = [ROOT / ".venv" / "bin" / "python", ROOT / ".venv-bench" / "bin" / "python"]
# Folders ahead of site-packages when a benchmark runs: its own (sys.path[0]) and those
# bench/operator_scale.py prepends to reach the control-plane harness.
SCRIPT_PATHS = [BENCH, ROOT / "e2e", ROOT / "tests"]

_TAKEN = """
import importlib.metadata, json, sys
taken = {name: f"the standard library's {name!r}" for name in sys.stdlib_module_names}
for name, dists in importlib.metadata.packages_distributions().items():
    taken.setdefault(name, f"{name!r} of {', '.join(sorted(set(dists)))} in {sys.prefix}")
print(json.dumps(taken))
"""


def module_names(folder: Path) -> dict[str, Path]:
    """The top-level modules and regular packages ``folder`` provides as a sys.path entry.

    A folder without ``__init__.py`` is left out: it would only be a namespace portion, which
    never wins over a module found further along sys.path.
    """
    suffixes = sorted(importlib.machinery.all_suffixes(), key=len, reverse=True)
    names: dict[str, Path] = {}
    for entry in sorted(folder.iterdir()):
        if entry.is_dir() and (entry / "__init__.py").exists():
            names[entry.name] = entry
        elif entry.is_file() and (suffix := next((s for s in suffixes if entry.name.endswith(s)), None)):
            names[entry.name.removesuffix(suffix)] = entry
    return names


def shadowing(folder: Path, taken: Mapping[str, str]) -> list[str]:
    """One line per module of ``folder`` that has a name in ``taken`` (import name -> what it is)."""
    return [f"{path} shadows {taken[name]}" for name, path in module_names(folder).items() if name in taken]


def taken_names(pythons: list[Path]) -> dict[str, str]:
    """Every standard-library module and top-level import name of an installed distribution, per interpreter."""
    taken: dict[str, str] = {}
    for python in pythons:
        out = subprocess.run([str(python), "-I", "-c", _TAKEN], capture_output=True, text=True, check=True)
        for name, what in json.loads(out.stdout).items():
            taken.setdefault(name, what)
    return taken


def test_a_module_named_like_a_standard_or_installed_one_is_reported(tmp_path: Path) -> None:
    (tmp_path / "operator.py").write_text("")
    (tmp_path / "flwr").mkdir()
    (tmp_path / "flwr" / "__init__.py").write_text("")
    (tmp_path / "json").mkdir()  # no __init__.py: a namespace portion, shadows nothing
    (tmp_path / "operator_scale.py").write_text("")
    taken = {"operator": "the standard library's 'operator'", "flwr": "'flwr' of flwr", "json": "the standard library's 'json'"}
    assert shadowing(tmp_path, taken) == [
        f"{tmp_path / 'flwr'} shadows 'flwr' of flwr",
        f"{tmp_path / 'operator.py'} shadows the standard library's 'operator'",
    ]


def test_the_old_operator_benchmark_name_is_caught_by_the_real_names(tmp_path: Path) -> None:
    (tmp_path / "operator.py").write_text("")
    assert shadowing(tmp_path, taken_names([Path(sys.executable)])) == [
        f"{tmp_path / 'operator.py'} shadows the standard library's 'operator'"
    ]


@pytest.fixture(scope="module")
def taken() -> dict[str, str]:
    return taken_names([p for p in VENVS if p.exists()] or [Path(sys.executable)])


@pytest.mark.parametrize("folder", SCRIPT_PATHS, ids=lambda p: p.name)
def test_no_script_folder_shadows_a_module_the_scripts_import(folder: Path, taken: dict[str, str]) -> None:
    problems = shadowing(folder, taken)
    assert not problems, "rename these (a benchmark run as a script would import them instead):\n" + "\n".join(problems)


def test_the_flower_script_loads_in_its_environment() -> None:
    python = ROOT / ".venv-bench" / "bin" / "python"
    assert python.exists(), "no .venv-bench: `make .venv-bench/.installed` creates it (make test does)"
    proc = subprocess.run([str(python), str(BENCH / "flower_secaggplus.py"), "--help"], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


# --- the make targets, smoke-sized ---------------------------------------------------------------------------------


def _make_quick(target: str, out: Path) -> str:
    """``make TARGET QUICK=1 BENCH_OUT=out`` from the repository root, as CI runs it; the published results stay."""
    published = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (BENCH / "results").glob("*") if p.is_file()}
    argv = ["make", "--no-print-directory", target, "QUICK=1", f"BENCH_OUT={out}"]
    env = {**os.environ, "CI": "true"}
    with subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                          text=True, env=env, start_new_session=True) as proc:
        try:
            output, _ = proc.communicate()
        except BaseException:  # a pytest timeout: take make's children (the benchmark) down with it
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    assert proc.returncode == 0, f"make {target} QUICK=1 exited with {proc.returncode}:\n{output[-6000:]}"
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (BENCH / "results").glob("*") if p.is_file()}
    assert after == published, f"make {target} QUICK=1 changed the published results in bench/results/"
    return output


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _non_finite(value: Any, where: str = "") -> list[str]:
    """Paths to every NaN or infinity anywhere in a loaded JSON document."""
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _non_finite(v, f"{where}.{k}")]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _non_finite(v, f"{where}[{i}]")]
    return [where] if isinstance(value, float) and not math.isfinite(value) else []


def _assert_finite(row: Mapping[str, Any], fields: list[str], what: str) -> None:
    bad = {f: row.get(f) for f in fields if not _finite(row.get(f))}
    assert not bad, f"{what}: not finite numbers: {bad}"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_bench_secagg_quick_measures_both_implementations(tmp_path: Path) -> None:
    _make_quick("bench-secagg", tmp_path)
    rows = json.loads((tmp_path / "secagg.json").read_text())
    assert not _non_finite(rows)
    for row in rows:
        assert row["status"] == "measured", row
        _assert_finite(row, ["n", "d", "dropout", "threshold", "client_s", "server_s", "upload_bytes"], f"{row['impl']} row")
    fedcrm = [(r["n"], r["d"], r["neighbours"]) for r in rows if r["impl"] == "fedcrm"]
    flower = [(r["n"], r["d"], r["neighbours"]) for r in rows if r["impl"] == "flower"]
    assert fedcrm and flower == fedcrm  # a Flower row for every configuration


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_bench_dp_quick_measures_every_variant(tmp_path: Path) -> None:
    _make_quick("bench-dp", tmp_path)
    summary = json.loads((tmp_path / "dp_cost.json").read_text())
    assert not _non_finite(summary)
    assert set(summary["results"]) == {"plain", "dpsgd-hooks", "dpsgd-functorch", "plain-threaded"}
    for variant, row in summary["results"].items():
        _assert_finite(row, ["samples_per_s", "samples_per_cpu_s", "peak_rise_mib", "peak_rss_mib", "rows", "parameters"],
                       variant)
    for variant, ratios in summary["ratios_over_plain"].items():
        _assert_finite(ratios, ["throughput", "wall_throughput", "peak_rss"], f"{variant} / plain")


@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.timeout(900)
def test_bench_operator_quick_measures_a_small_federation(tmp_path: Path) -> None:
    _make_quick("bench-operator", tmp_path)
    out = json.loads((tmp_path / "operator.json").read_text())
    assert not _non_finite(out)
    assert _finite(out["operator_idle_rss_mib"]) and out["results"]
    for row in out["results"]:
        _assert_finite(row, [k for k in row if k != "scenario"], row["scenario"])


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_privacy_table_quick_trains_and_audits_every_row(tmp_path: Path) -> None:
    _make_quick("privacy-table", tmp_path)
    store = json.loads((tmp_path / "privacy_table.json").read_text())
    assert not _non_finite(store)
    assert set(store["results"]) == {"baseline", "none", "sample@1"}
    for key, row in store["results"].items():
        _assert_finite(row, ["seconds", "accuracy", "f1", "auc", "rounds"], key)
        if key != "baseline":
            _assert_finite(row["audit"]["loss_threshold"], ["auc"], f"{key} loss-threshold attack")
            _assert_finite(row["audit"]["shadow"], ["auc", "tpr_at_1pct_fpr"], f"{key} shadow attack")
    assert _finite(store["results"]["sample@1"]["privacy"]["epsilon_spent"])
    assert (tmp_path / "privacy_table.md").exists() and (tmp_path / "privacy_tradeoff.png").exists()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_bench_startup_quick_splits_a_real_run(tmp_path: Path) -> None:
    _make_quick("bench-startup", tmp_path)
    out = json.loads((tmp_path / "startup.json").read_text())
    assert not _non_finite(out)
    fields = ["wall_s", "startup_s", "rounds_s", "tail_s", "outside_s", "launcher_peak_rss_mib", "accuracy"]
    assert out["rows"]
    for row in out["rows"]:
        _assert_finite(row, fields, f"{row['impl']} run {row['repeat']}")
        assert row["launcher_peak_rss_mib"] > 0 and row["rounds_s"] > 0
        assert abs(row["wall_s"] - row["rounds_s"] - row["outside_s"]) < 0.01


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_bench_load_quick_completes_every_round_of_every_protocol(tmp_path: Path) -> None:
    _make_quick("bench-load", tmp_path)
    out = json.loads((tmp_path / "load.json").read_text())
    assert not _non_finite(out)
    # The old protocol comes from this repository's history; a checkout without it (a shallow clone) says so.
    expected = {"new", "checks-off", "v1"} - set(out.get("unavailable", {}))
    assert set(out["results"]) == expected and {"new", "checks-off"} <= expected
    assert all("history" in why or "git" in why for why in out.get("unavailable", {}).values())
    rounds = out["config"]["rounds"]
    for protocol, row in out["results"].items():
        assert row["rounds"] == rounds and row["rounds_complete"] == rounds, (protocol, row)
        _assert_finite(row, ["round_s", "secagg_s", "aggregator_cpu_s", "client_cpu_s_per_participant",
                             "aggregator_peak_rss_mib", "bytes_up_per_round", "bytes_down_per_round"], protocol)
        assert row["aggregator_peak_rss_mib"] > 0 and row["round_s"] > 0
    assert "consistency" in out["results"]["new"]["stage_s"]
    if "v1" in out["results"]:
        assert "consistency" not in out["results"]["v1"]["stage_s"]
    for row in out["rounds"]:  # the bench itself checks each unmasked sum; here: every dropout stage was exercised
        assert row["complete"] and row["stopped"] > 0 and row["survivors"] <= row["advertised"]
    stopped = {stage for row in out["rounds"] for stage, count in row["stopped_at"].items() if count}
    assert stopped == {"never", "after_advertise", "after_share_keys", "after_masked_input", "during_unmask"}
    for name in (f"new/{base}" for base in ("checks-off", "v1") if base in out["results"]):
        _assert_finite(out["ratios"][name], ["round_s", "secagg_s", "aggregator_peak_rss", "bytes"], name)
    assert "process" in out["what_is_a_process"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_bench_dp_utility_quick_runs_every_setting(tmp_path: Path) -> None:
    _make_quick("bench-dp-utility", tmp_path)
    out = json.loads((tmp_path / "dp_utility.json").read_text())
    assert not _non_finite(out)
    assert set(out["results"]) == {"central", "federated", "sample", "pooled"}
    for name, row in out["results"].items():
        _assert_finite(row, ["accuracy", "f1", "auc"], name)
    for name in ("sample", "pooled"):
        assert all(0 < run["epsilon_spent"] <= 1.0 for run in out["results"][name]["runs"]), name
    assert "| pooled |" in (tmp_path / "dp_utility.md").read_text()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_bench_compression_quick_runs_every_setting(tmp_path: Path) -> None:
    _make_quick("bench-compression", tmp_path)
    out = json.loads((tmp_path / "compression.json").read_text())
    assert not _non_finite(out)
    assert set(out["results"]) == {"unquantized", "16-bit", "8-bit", "8-bit keep 50%", "8-bit keep 25%",
                                   "8-bit keep 10%", "8-bit keep 25% unscaled"}
    for name, row in out["results"].items():
        _assert_finite(row, ["accuracy", "auc", "bytes_up_per_client_per_round", "masked_update_bytes"], name)
    rows = out["results"]
    assert rows["8-bit"]["masked_update_bytes"] < rows["16-bit"]["masked_update_bytes"] < rows["unquantized"]["masked_update_bytes"]
    assert rows["8-bit"]["bytes_up_per_client_per_round"] < rows["unquantized"]["bytes_up_per_client_per_round"]
    assert rows["8-bit keep 10%"]["masked_update_bytes"] < rows["8-bit keep 25%"]["masked_update_bytes"] \
        == rows["8-bit keep 25% unscaled"]["masked_update_bytes"] < rows["8-bit keep 50%"]["masked_update_bytes"] \
        < rows["8-bit"]["masked_update_bytes"]
    assert rows["8-bit keep 25%"]["bytes_up_per_client_per_round"] < rows["8-bit"]["bytes_up_per_client_per_round"]
    assert "| 8-bit | 12 |" in (tmp_path / "compression.md").read_text()
