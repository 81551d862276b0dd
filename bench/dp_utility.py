"""Differential privacy's utility on small, skewed tenants: per-tenant DP-SGD against pooled DP-SGD.

One command (``make bench-dp-utility``) synthesises ten tenants of 30 to 1,600
rows with label skew (Dirichlet alpha 0.5), then trains the same model with
batch 32, learning rate 0.001 and 20 rounds, side by side in one run:

* ``central``: non-private training on the pooled rows (``fedcrm baseline``),
  the reference;
* ``federated``: no differential privacy;
* ``sample``: DP-SGD inside each tenant at epsilon 1;
* ``pooled``: one central DP-SGD step per round through secure aggregation at
  epsilon 1 (sampling rate 0.5, a plain server step of 2.0);
* ``pooled-momentum`` (``--settings``; by default in ``--case papers`` only):
  the same with server momentum (FedAvgM, 0.9).

DP runs draw fresh noise every time, so each is repeated (``--repeats``) and
reported as mean and spread. Prints a table and writes
``bench/results/dp_utility.json`` and ``dp_utility.md``. ``--quick`` runs one
repeat of each with 5 rounds, as a smoke test of the pipeline.

``--case papers`` runs the papers' scale instead (10 tenants x 10,000 rows, 50
rounds, the generated manifest's batch size and learning rate), by default
``central``, ``pooled`` and ``pooled-momentum`` (the server step FedAvgM,
learning rate 2, momentum 0.9; ``--settings`` to choose; per-tenant DP-SGD
at this scale is in the privacy table), into ``dp_utility_papers.*``.

``--case tenants50`` runs client-level DP where it is meant to be used, many
tenants (50 x 400 rows, a 667-parameter model, clipping norm 0.3): the
non-private federation against DP-FedAvg with every tenant in every round and
with each tenant's secret coin at rate 0.3, into ``dp_utility_tenants50.*``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from fedcrm.experiments.tables import spread

ROOT = Path(__file__).resolve().parents[1]
FEDCRM = [sys.executable, "-m", "fedcrm.cli.main"]
BUDGET = {"epsilon": 1.0, "delta": 1e-5}
SETTINGS: dict[str, dict[str, Any]] = {
    "central": {},
    "federated": {"differentialPrivacy": {"mode": "none"}},
    # Refused by default on small tenants (its noise drowns them); accepted here to measure that failure.
    "sample": {"differentialPrivacy": {"mode": "sample", **BUDGET, "acceptNoisyPlan": True}},
    "pooled": {"differentialPrivacy": {"mode": "pooled", "samplingRate": 0.5, **BUDGET},
               "serverOptimizer": {"name": "none", "learningRate": 2.0}},
    # The same, with server momentum (FedAvgM, beta 0.9): ten times the step along a consistent gradient, which is
    # what 50 steps at the papers' scale lack.
    "pooled-momentum": {"differentialPrivacy": {"mode": "pooled", "samplingRate": 0.5, **BUDGET},
                        "serverOptimizer": {"name": "momentum", "learningRate": 2.0, "momentum": 0.9}},
    # Client-level DP (DP-FedAvg), every participant every round, and with a secret per-round coin at rate 0.3.
    "client": {"differentialPrivacy": {"mode": "client", "clippingNorm": 0.3, **BUDGET}},
    "client-sampled": {"differentialPrivacy": {"mode": "client", "clippingNorm": 0.3, "samplingRate": 0.3, **BUDGET}},
}


#: The data and the training settings of each case (``training`` overrides the generated manifest's).
CASES: dict[str, dict[str, Any]] = {
    "small": {"synth": ["--clients", "10", "--rows", "1600", "--min-rows", "30", "--alpha", "0.5"], "rounds": 20,
              "training": {"batchSize": 32, "learningRate": 0.001},
              "settings": ["central", "federated", "sample", "pooled"], "suffix": "",
              "title": "`fedcrm synth --clients 10 --rows 1600 --min-rows 30 --alpha 0.5`, {rounds} rounds, batch 32, "
                       "learning rate 0.001"},
    "tenants50": {"synth": ["--clients", "50", "--rows", "400"], "rounds": 20, "training": {},
                  "model": {"hidden": [16]}, "settings": ["federated", "client", "client-sampled"], "suffix": "_tenants50",
                  "title": "`fedcrm synth --clients 50 --rows 400`, {rounds} rounds, hidden layers [16] (667 "
                           "parameters), clipping norm 0.3"},
    "papers": {"synth": ["--clients", "10", "--rows", "10000"], "rounds": 50, "training": {},
               "settings": ["central", "pooled", "pooled-momentum"], "suffix": "_papers",
               "title": "`fedcrm synth --clients 10 --rows 10000`, {rounds} rounds, the manifest's batch size and "
                        "learning rate"},
}


def _manifest(data: Path, work: Path, name: str, rounds: int, training: dict[str, Any],
              model: dict[str, Any] | None = None) -> Path:
    doc = yaml.safe_load((data / "federation.yaml").read_text())
    doc["spec"]["training"].update(rounds=rounds, **training)
    if model:
        doc["spec"]["model"] = model
    setting = SETTINGS[name]
    if "differentialPrivacy" in setting:
        doc["spec"]["privacy"]["differentialPrivacy"] = setting["differentialPrivacy"]
    if "serverOptimizer" in setting:
        doc["spec"]["training"]["serverOptimizer"] = setting["serverOptimizer"]
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _run(name: str, data: Path, work: Path, rounds: int, case: dict[str, Any], repeat: int) -> dict[str, Any]:
    out = work / f"{name}-{repeat}"
    command = "baseline" if name == "central" else "run"
    started = time.monotonic()
    proc = subprocess.run([*FEDCRM, command, "--federation", str(_manifest(data, work, name, rounds, case["training"],
                                                                             case.get("model"))),
                           "--participant", *map(str, sorted((data / "participants").glob("*.yaml"))),
                           "--test-data", str(data / "test.csv"), "--out", str(out)],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise SystemExit(f"{name}: fedcrm {command} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    report = json.loads((out / "report.json").read_text())
    m = report["metrics"]
    return {"accuracy": m["accuracy"], "f1": m["f1"], "auc": m["auc"], "recall": m.get("recall"),
            "seconds": round(time.monotonic() - started, 1), "warnings": report.get("warnings") or [],
            "epsilon_spent": (report.get("privacy") or {}).get("epsilon_spent")}


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out = spread(runs, ("accuracy", "f1", "auc"))
    out["collapsed"] = sum(any("predicts" in w for w in r["warnings"]) for r in runs)
    return out


def _table(results: dict[str, Any], meta: dict[str, Any]) -> str:
    ref_name = "central" if "central" in results else "federated"
    ref = results.get(ref_name)
    lines = [f"{meta['title']}, epsilon 1, delta 1e-5; metrics on the held-out test set; DP rows: mean ± sd over "
             f"{meta['repeats']} runs.", "",
             f"| setting | accuracy | vs {ref_name} | F1 | AUC | vs {ref_name} | one-class runs | wall s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        sd = (lambda k: f" ± {100 * r[k + '_sd']:.1f}" if r[k + "_sd"] else "")  # noqa: E731
        points = "–" if ref is None else f"{100 * (r['accuracy'] - ref['accuracy']):+.1f}"
        auc = "–" if ref is None else f"{r['auc'] - ref['auc']:+.3f}"
        lines.append(
            f"| {name} | {100 * r['accuracy']:.1f}%{sd('accuracy')} | {points} | "
            f"{100 * r['f1']:.1f}% | {r['auc']:.3f} | {auc} | "
            f"{r['collapsed']}/{len(r['runs'])} | {statistics.fmean(x['seconds'] for x in r['runs']):.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each DP setting (default 3)")
    ap.add_argument("--quick", action="store_true", help="one repeat, 5 rounds: a smoke test")
    ap.add_argument("--case", choices=sorted(CASES), default="small", help="small skewed tenants (default), the "
                    "papers' scale, or 50 tenants with client-level DP")
    ap.add_argument("--settings", nargs="+", choices=list(SETTINGS), help="default: the case's own (see above)")
    ap.add_argument("--rounds", type=int, help="default 20 ('small') or 50 ('papers')")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    case = CASES[args.case]
    rounds = args.rounds or case["rounds"]
    repeats, rounds = (1, 5) if args.quick else (args.repeats, rounds)
    with tempfile.TemporaryDirectory(prefix="fedcrm-dp-utility-") as tmp:
        work = Path(tmp)
        data = work / "data"
        subprocess.run([*FEDCRM, "synth", *case["synth"], "--rounds", str(rounds), "--out", str(data)], check=True,
                       capture_output=True)
        results: dict[str, Any] = {}
        for name in args.settings or case["settings"]:
            n = repeats if "differentialPrivacy" in SETTINGS[name] and name != "federated" else 1
            runs = []
            for i in range(n):
                runs.append(_run(name, data, work, rounds, case, i))
                print(f"{name} {i + 1}/{n}: accuracy {100 * runs[-1]['accuracy']:.1f}%, AUC {runs[-1]['auc']:.3f} "
                      f"({runs[-1]['seconds']:.0f} s)", file=sys.stderr)
            results[name] = _summary(runs)
    meta = {"case": args.case, "rounds": rounds, "repeats": repeats, "title": case["title"].format(rounds=rounds)}
    table = _table(results, meta)
    print(json.dumps({"settings": meta, "results": results}, indent=1))
    print(table)
    args.results.mkdir(parents=True, exist_ok=True)
    stem = "dp_utility" + case["suffix"]
    (args.results / f"{stem}.json").write_text(json.dumps({"settings": meta, "results": results}, indent=1))
    (args.results / f"{stem}.md").write_text(table)


if __name__ == "__main__":
    main()
