"""The privacy-accuracy table: DP mode x epsilon -> accuracy, F1, membership-inference AUC.

One command regenerates everything (``make privacy-table``): synthetic data,
the central baseline, a federation without DP, and one federation per
(mode, epsilon), each followed by ``fedcrm audit``. Results go to
``bench/results/privacy_table.json`` after every run (a rerun skips what is
already there for the same settings), then ``privacy_table.md`` and
``privacy_tradeoff.png`` are written from whatever has finished.

``--quick`` is a smoke test of the same pipeline (a few minutes on 2 cores):
2 clients x 500 rows, 2 rounds, sample-level DP at epsilon 1 only, one shadow
model of 5 epochs, in a fresh temporary work folder with nothing resumed; give
it a ``--results`` folder of its own so the published results stay as they
are (``make privacy-table QUICK=1`` does). A run or audit that fails, or
reports a failed federation, stops the script with exit status 1 and the tail
of its stderr.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
FEDCRM = [sys.executable, "-m", "fedcrm.cli.main"]


def _sh(args: list[str]) -> None:
    proc = subprocess.run(args, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args[:4])} ... failed ({proc.returncode}):\n{proc.stderr[-2000:]}")


def _federation(data: Path, work: Path, mode: str, epsilon: float | None, delta: float, clip: float,
                batch_size: int | None) -> Path:
    doc = yaml.safe_load((data / "federation.yaml").read_text())
    if batch_size:
        doc["spec"]["training"]["batchSize"] = batch_size
    dp: dict[str, Any] = {"mode": mode}
    if mode != "none":
        # The table measures the trade-off, failures included (client-level DP over 10 participants is refused
        # by default: its noise drowns the updates).
        dp.update({"epsilon": epsilon, "delta": delta, "clippingNorm": clip, "acceptNoisyPlan": True})
    doc["spec"]["privacy"]["differentialPrivacy"] = dp
    if mode == "pooled":  # 50 single steps need a larger server step: FedAvgM (see bench-dp-utility --case papers)
        doc["spec"]["training"]["serverOptimizer"] = {"name": "momentum", "learningRate": 2.0, "momentum": 0.9}
    path = work / f"federation-{mode}-{epsilon}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _participants(data: Path) -> list[str]:
    return [str(p) for p in sorted((data / "participants").glob("*.yaml"))]


def _run_one(name: str, fed: Path, data: Path, work: Path, *, audit: list[str], baseline: bool = False) -> dict[str, Any]:
    out = work / name
    common = ["--federation", str(fed), "--participant", *_participants(data), "--test-data", str(data / "test.csv")]
    started = time.monotonic()
    _sh([*FEDCRM, "baseline" if baseline else "run", *common, "--out", str(out)])
    took = time.monotonic() - started
    row: dict[str, Any] = {"seconds": round(took, 1)}
    if not baseline:
        _sh([*FEDCRM, "audit", *common[:-2], "--run", str(out), "--test-data", str(data / "test.csv"), *audit])
    report = json.loads((out / "report.json").read_text())
    if report["status"] != "succeeded":
        raise SystemExit(f"{name}: the federation reports {report['status']}: {report.get('message')}")
    row.update(accuracy=report["metrics"]["accuracy"], f1=report["metrics"]["f1"], auc=report["metrics"]["auc"],
               rounds=report["rounds_completed"], privacy=report["privacy"], audit=report.get("privacy_audit"))
    return row


def _markdown(results: dict[str, Any], settings: dict[str, Any]) -> str:
    base = results.get("baseline", {}).get("accuracy")
    lines = [
        f"`fedcrm synth --clients {settings['clients']} --rows {settings['rows']}`, {settings['rounds']} rounds, "
        f"delta {settings['delta']:g}, clipping norm {settings['clip']:g}, secure aggregation on; accuracy and F1 on "
        "the held-out test set; attack AUCs from `fedcrm audit` (members: training records, non-members: held-out "
        "records of the same participants).",
        "",
        "| mode | epsilon | epsilon spent | noise multiplier | accuracy | vs baseline | F1 | loss-threshold AUC "
        "| shadow AUC | shadow TPR @1% FPR | shadows x epochs | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, r in sorted(results.items(), key=lambda kv: _order(kv[0])):
        a = r.get("audit") or {}
        p = r.get("privacy") or {}
        mode, eps = key.split("@") if "@" in key else (key, "–")
        gap = "–" if base is None or key == "baseline" else f"{100 * (r['accuracy'] - base):+.2f}"
        spent = p.get("epsilon_spent")
        shadows = f"{a['shadow_models']} x {a['shadow_epochs']}" if a else "–"
        sigma = p.get("noise_multiplier")
        lines.append(
            f"| {mode} | {eps} | {'–' if spent is None else f'{spent:.3f}'} | "
            f"{'–' if sigma is None else f'{sigma:.3g}'} | {100 * r['accuracy']:.2f}% | {gap} | {100 * r['f1']:.2f}% | "
            f"{_f(a.get('loss_threshold', {}).get('auc'))} | {_f(a.get('shadow', {}).get('auc'))} | "
            f"{_f(a.get('shadow', {}).get('tpr_at_1pct_fpr'))} | {shadows} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def _f(v: float | None) -> str:
    return "–" if v is None else f"{v:.4f}"


def _order(key: str) -> tuple[int, float]:
    if key == "baseline":
        return (0, 0)
    if key == "none":
        return (1, 0)
    mode, eps = key.split("@")
    return ({"sample": 2, "pooled": 3}.get(mode, 4), float(eps))


# (option, full default, --quick default); an option given on the command line wins over both.
DEFAULTS: list[tuple[str, Any, Any]] = [
    ("clients", 10, 2), ("rows", 10_000, 500), ("rounds", 50, 2), ("epsilons", [1.0, 0.5, 2.0, 4.0, 8.0], [1.0]),
    ("modes", ["sample", "pooled", "client"], ["sample"]), ("shadows", 4, 1), ("shadow_epochs", None, 5),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, help="default 10 (2 with --quick)")
    ap.add_argument("--rows", type=int, help="default 10000 (500 with --quick)")
    ap.add_argument("--rounds", type=int, help="default 50 (2 with --quick)")
    ap.add_argument("--epsilons", type=float, nargs="+", help="default 1 0.5 2 4 8 (1 with --quick)")
    ap.add_argument("--modes", nargs="+", help="default sample pooled client (sample with --quick)")
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=None, help="override training.batchSize in every run")
    ap.add_argument("--shadows", type=int, help="shadow models per audit (fewer is faster; default 4, 1 with --quick)")
    ap.add_argument("--shadow-epochs", type=int, help="epochs per shadow model (default: the audit's; 5 with --quick)")
    ap.add_argument("--work", type=Path, help="default runs/privacy-table (a fresh temporary folder with --quick)")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--quick", action="store_true", help="a smoke test (see above); nothing is resumed")
    args = ap.parse_args()
    for name, full, quick in DEFAULTS:
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if args.work is not None:
        regenerate(args)
    elif args.quick:
        with tempfile.TemporaryDirectory(prefix="fedcrm-privacy-table-") as tmp:
            args.work = Path(tmp)
            regenerate(args)
    else:
        args.work = ROOT / "runs" / "privacy-table"
        regenerate(args)


def regenerate(args: argparse.Namespace) -> None:
    settings = {"clients": args.clients, "rows": args.rows, "rounds": args.rounds, "delta": args.delta, "clip": args.clip,
                "batch_size": args.batch_size}
    args.work.mkdir(parents=True, exist_ok=True)
    args.results.mkdir(parents=True, exist_ok=True)
    data = args.work / "data"
    if not (data / "federation.yaml").exists():
        _sh([*FEDCRM, "synth", "--clients", str(args.clients), "--rows", str(args.rows), "--rounds", str(args.rounds),
             "--out", str(data)])
    store = args.results / "privacy_table.json"
    saved = json.loads(store.read_text()) if store.exists() else {}
    resume = saved.get("settings") == settings and not args.quick
    results: dict[str, Any] = saved.get("results", {}) if resume else {}
    marker = {"quick": True} if args.quick else {}

    plan: list[tuple[str, str, float | None]] = [("baseline", "none", None), ("none", "none", None)]
    plan += [(f"{m}@{e:g}", m, e) for e in args.epsilons for m in args.modes]
    for key, mode, eps in plan:
        if key in results:
            continue
        print(f"{key} ...", flush=True)
        fed = _federation(data, args.work, mode, eps, args.delta, args.clip, args.batch_size)
        audit = ["--shadows", str(args.shadows)] + (["--shadow-epochs", str(args.shadow_epochs)] if args.shadow_epochs else [])
        results[key] = _run_one(key.replace("@", "-"), fed, data, args.work, audit=audit, baseline=key == "baseline")
        store.write_text(json.dumps({"settings": settings, "results": results, **marker}, indent=2) + "\n")
        r = results[key]
        print(f"  accuracy {100 * r['accuracy']:.2f}%, shadow AUC {_f((r['audit'] or {}).get('shadow', {}).get('auc'))}, "
              f"{r['seconds']:.0f}s", flush=True)

    (args.results / "privacy_table.md").write_text(_markdown(results, settings))
    from fedcrm.privacy.plots import plot_tradeoff

    series: dict[str, list[tuple[float, float, float]]] = {}
    for key, r in results.items():
        if "@" in key and r.get("audit"):
            mode, eps = key.split("@")
            series.setdefault(mode, []).append((float(eps), r["accuracy"], r["audit"]["shadow"]["auc"]))
    reference = {}
    if "baseline" in results:
        reference["accuracy baseline (central, no DP)"] = results["baseline"]["accuracy"]
    if "none" in results:
        reference["accuracy federated, no DP"] = results["none"]["accuracy"]
        reference["auc federated, no DP"] = results["none"]["audit"]["shadow"]["auc"]
    plot_tradeoff(series, reference, args.results / "privacy_tradeoff.png")
    print((args.results / "privacy_table.md").read_text())


if __name__ == "__main__":
    main()
