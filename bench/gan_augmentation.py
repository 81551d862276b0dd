"""GAN augmentation on small, skewed tenants: does each participant's synthetic data help, and does it leak more?

One command (``make bench-gan-augmentation``) synthesises ten tenants of 30 to
1,600 rows with label skew (Dirichlet alpha 0.5), then trains the same model
with batch 32, learning rate 0.001 and 20 rounds, side by side in one run:

* ``federated``: no augmentation, the reference;
* ``gan``: each participant trains the conditional tabular GAN
  (``spec.augmentation.gan``, 300 epochs, syntheticRatio 0.5, minority class
  topped up first) and adds its rows to local training;
* ``gan-dp``: the same with the discriminator trained by DP-SGD to the GAN's
  own epsilon 3, delta 1e-5 (50 epochs: more steps at that budget mean more
  noise per step).

Each setting runs with ``--seeds`` training seeds (default 2; the data stay
the same) and every run is audited with ``fedcrm audit`` (loss-threshold and
shadow-model membership inference against the real training records). Prints
a table and writes ``bench/results/gan_augmentation.json`` and
``gan_augmentation.md``. ``--quick``: one seed, 3 rounds, 20 GAN epochs, one
shadow model: a smoke test of the pipeline.
"""

from __future__ import annotations

import argparse
import json
import re
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
SYNTH = ["--clients", "10", "--rows", "1600", "--min-rows", "30", "--alpha", "0.5"]
TRAINING = {"batchSize": 32, "learningRate": 0.001, "roundTimeoutSeconds": 3600.0}
SETTINGS: dict[str, dict[str, Any]] = {
    "federated": {},
    "gan": {"gan": {"enabled": True, "epochs": 300, "syntheticRatio": 0.5}},
    "gan-dp": {"gan": {"enabled": True, "epochs": 50, "syntheticRatio": 0.5,
                       "differentialPrivacy": {"epsilon": 3.0, "delta": 1e-5}}},
}
_ADDED = re.compile(r"added (\d+) synthetic rows \(class 0: (\d+), class 1: (\d+)\)")
_GAN_EPSILON = re.compile(r"the GAN's discriminator spent epsilon ([0-9.]+)")


def _manifest(data: Path, work: Path, name: str, rounds: int, seed: int, epochs: int | None) -> Path:
    doc = yaml.safe_load((data / "federation.yaml").read_text())
    doc["spec"]["training"].update(rounds=rounds, seed=seed, **TRAINING)
    augmentation = json.loads(json.dumps(SETTINGS[name]))
    if augmentation and epochs is not None:
        augmentation["gan"]["epochs"] = epochs
    if augmentation:
        doc["spec"]["augmentation"] = augmentation
    path = work / f"{name}-{seed}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _run(name: str, data: Path, work: Path, *, rounds: int, seed: int, epochs: int | None,
         shadows: int) -> dict[str, Any]:
    out = work / f"{name}-{seed}"
    fed = _manifest(data, work, name, rounds, seed, epochs)
    participants = [str(p) for p in sorted((data / "participants").glob("*.yaml"))]
    started = time.monotonic()
    common = ["--federation", str(fed), "--participant", *participants, "--test-data", str(data / "test.csv")]
    for args in (["run", *common, "--out", str(out)],
                 ["audit", *common, "--run", str(out), "--shadows", str(shadows), "--seed", str(seed)]):
        proc = subprocess.run([*FEDCRM, *args], capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise SystemExit(f"{name} seed {seed}: fedcrm {args[0]} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    report = json.loads((out / "report.json").read_text())
    m, audit = report["metrics"], report["privacy_audit"]
    added = [0, 0, 0]
    gan_epsilon: list[float] = []
    for log in (out / "logs").glob("tenant-*.log"):
        text = log.read_text()
        for match in _ADDED.finditer(text):
            added = [a + int(x) for a, x in zip(added, match.groups())]
        gan_epsilon += [float(e) for e in _GAN_EPSILON.findall(text)]
    return {"accuracy": m["accuracy"], "f1": m["f1"], "auc": m["auc"], "recall": m.get("recall"),
            "mia_loss_auc": audit["loss_threshold"]["auc"], "mia_shadow_auc": audit["shadow"]["auc"],
            "participants_completed": sum(p["status"] == "completed" for p in report["participants"]),
            "synthetic_rows": added[0], "synthetic_class0": added[1], "synthetic_class1": added[2],
            "gan_epsilon_max": max(gan_epsilon) if gan_epsilon else None,
            "seconds": round(time.monotonic() - started, 1), "warnings": report.get("warnings") or []}


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out = spread(runs, ("accuracy", "f1", "auc", "mia_loss_auc", "mia_shadow_auc"))
    out["synthetic_rows"] = runs[0]["synthetic_rows"]
    out["synthetic_class1"] = runs[0]["synthetic_class1"]
    return out


def _table(results: dict[str, Any], meta: dict[str, Any]) -> str:
    ref = results["federated"]
    lines = [f"{meta['title']}; metrics on the held-out test set, membership-inference AUCs from `fedcrm audit` "
             f"({meta['shadows']} shadow models); mean ± sd over training seeds {meta['seeds']}.", "",
             "| setting | synthetic rows (class 1) | accuracy | F1 | AUC | vs federated | MIA AUC, loss | "
             "MIA AUC, shadow | wall s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        sd = (lambda k, scale=100, digits=1: f" ± {scale * r[k + '_sd']:.{digits}f}" if r[k + "_sd"] else "")  # noqa: E731
        lines.append(
            f"| {name} | {r['synthetic_rows']} ({r['synthetic_class1']}) | {100 * r['accuracy']:.1f}%{sd('accuracy')} | "
            f"{100 * r['f1']:.1f}%{sd('f1')} | {r['auc']:.3f}{sd('auc', 1, 3)} | {r['auc'] - ref['auc']:+.3f} | "
            f"{r['mia_loss_auc']:.3f}{sd('mia_loss_auc', 1, 3)} | {r['mia_shadow_auc']:.3f}{sd('mia_shadow_auc', 1, 3)} | "
            f"{statistics.fmean(x['seconds'] for x in r['runs']):.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds (default 0 1)")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--shadows", type=int, default=2, help="shadow models per audit (default 2)")
    ap.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    ap.add_argument("--quick", action="store_true", help="one seed, 3 rounds, 20 GAN epochs, 1 shadow: a smoke test")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    seeds, rounds, shadows, epochs = args.seeds, args.rounds, args.shadows, None
    if args.quick:
        seeds, rounds, shadows, epochs = seeds[:1], 3, 1, 20
    with tempfile.TemporaryDirectory(prefix="fedcrm-gan-") as tmp:
        work = Path(tmp)
        data = work / "data"
        subprocess.run([*FEDCRM, "synth", *SYNTH, "--rounds", str(rounds), "--out", str(data)], check=True,
                       capture_output=True)
        results: dict[str, Any] = {}
        for name in ["federated", *[s for s in args.settings if s != "federated"]]:
            runs = []
            for seed in seeds:
                runs.append(_run(name, data, work, rounds=rounds, seed=seed, epochs=epochs, shadows=shadows))
                r = runs[-1]
                print(f"{name} seed {seed}: accuracy {100 * r['accuracy']:.1f}%, AUC {r['auc']:.3f}, MIA AUC "
                      f"{r['mia_loss_auc']:.3f}/{r['mia_shadow_auc']:.3f}, {r['synthetic_rows']} synthetic rows "
                      f"({r['seconds']:.0f} s)", file=sys.stderr)
            results[name] = _summary(runs)
    meta = {"rounds": rounds, "seeds": seeds, "shadows": shadows, "settings": {k: SETTINGS[k] for k in results},
            "gan_epochs_override": epochs,
            "title": f"`fedcrm synth {' '.join(SYNTH)}`, {rounds} rounds, batch 32, learning rate 0.001"}
    table = _table(results, meta)
    print(table)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "gan_augmentation.json").write_text(json.dumps({"settings": meta, "results": results}, indent=1))
    (args.results / "gan_augmentation.md").write_text(table)


if __name__ == "__main__":
    main()
