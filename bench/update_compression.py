"""Compression compatible with secure aggregation: unquantized against 16-bit and 8-bit updates, and 8-bit updates
of which each round keeps a shared random half, quarter or tenth of the coordinates (``keepFraction``), side by
side.

One command (``make bench-compression``) synthesises ten tenants (``fedcrm synth --clients 10 --rows 1000``), then
trains the same model (hidden layers 512 and 256, about 150,000 parameters, so the update rather than the key
exchange dominates the upload) for 20 rounds with secure aggregation, three ways in one run:

* ``unquantized``: today's masked sum modulo ``2**32``, four bytes an element, the size of float32 weights;
* ``16-bit`` and ``8-bit``: ``quantizationBits`` 16 and 8, summed modulo ``2**(q + ceil(log2 10))`` and sent
  packed at that width (20 and 12 bits an element);
* ``8-bit keep 50%``, ``25%`` and ``10%``: as ``8-bit``, and every participant sends only the round's shared
  random support of ``k = ceil(keepFraction x d)`` coordinates; the others keep the global model's value that
  round, the kept ones are multiplied by ``d / k`` (``rescaleKept``, the default);
* ``8-bit keep 25% unscaled``: ``rescaleKept: false``, the kept coordinates applied as they are.

Reports accuracy and ROC AUC on the held-out test set, the bytes each participant sends per round (every secure-
aggregation message of the training and evaluation sums, from the run's report), the masked training vector's own
size, and both as ratios to the unquantized run. Quantized runs round at random, so each is repeated
(``--repeats``) and reported as mean and spread. Prints a table and writes ``bench/results/compression.json`` and
``compression.md``. ``--quick`` runs one repeat of 3 rounds on a small model, as a smoke test of the pipeline.
"""

from __future__ import annotations

import argparse
import json
import math
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
CLIENTS = 10
#: ``quantizationBits`` of each setting (None: unquantized, the modulus of ``bits``, 32 by default).
SETTINGS: dict[str, int | None] = {"unquantized": None, "16-bit": 16, "8-bit": 8, "8-bit keep 50%": 8,
                                   "8-bit keep 25%": 8, "8-bit keep 10%": 8, "8-bit keep 25% unscaled": 8}
#: ``keepFraction`` of each setting (absent: 1, every coordinate, no sparsification).
KEEP: dict[str, float] = {"8-bit keep 50%": 0.5, "8-bit keep 25%": 0.25, "8-bit keep 10%": 0.1,
                          "8-bit keep 25% unscaled": 0.25}
#: Settings with ``rescaleKept: false``.
UNSCALED = {"8-bit keep 25% unscaled"}


def _manifest(data: Path, work: Path, name: str, rounds: int, hidden: list[int]) -> Path:
    doc = yaml.safe_load((data / "federation.yaml").read_text())
    doc["spec"]["training"]["rounds"] = rounds
    doc["spec"].setdefault("model", {})["hidden"] = hidden
    secure = doc["spec"].setdefault("privacy", {}).setdefault("secureAggregation", {})
    secure["enabled"] = True
    if SETTINGS[name] is not None:
        secure["quantizationBits"] = SETTINGS[name]
    if name in KEEP:
        secure["keepFraction"] = KEEP[name]
        secure["rescaleKept"] = name not in UNSCALED
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _masked_bytes(parameters: int, q: int | None, keep: float = 1.0) -> int:
    """The masked training vector's bytes: 4 an element at 32 bits, else packed at q + ceil(log2 n) bits (the
    examples and loss slots add a few elements); with ``keep`` < 1, of the ``ceil(keep x parameters)`` kept."""
    parameters = math.ceil(keep * parameters)
    if q is None:
        return 4 * (parameters + 2)
    bits = q + math.ceil(math.log2(CLIENTS))
    digits = bits - 1 - math.ceil(math.log2(CLIENTS))
    return math.ceil((parameters + math.ceil(32 / digits) * 2) * bits / 8)


def _run(name: str, data: Path, work: Path, rounds: int, hidden: list[int], repeat: int) -> dict[str, Any]:
    out = work / f"{name}-{repeat}"
    started = time.monotonic()
    proc = subprocess.run([*FEDCRM, "run", "--federation", str(_manifest(data, work, name, rounds, hidden)),
                           "--participant", *map(str, sorted((data / "participants").glob("*.yaml"))),
                           "--test-data", str(data / "test.csv"), "--out", str(out)],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise SystemExit(f"{name}: fedcrm run failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    report = json.loads((out / "report.json").read_text())
    ups = [h["bytes_up_per_client"] for h in report["history"]]
    log = (out / "logs" / "aggregator.log").read_text()
    parameters = int(log.split(" parameters")[0].rsplit("model has ", 1)[1])
    m = report["metrics"]
    return {"accuracy": m["accuracy"], "auc": m["auc"], "bytes_up_per_client_per_round": statistics.fmean(ups),
            "parameters": parameters, "masked_update_bytes": _masked_bytes(parameters, SETTINGS[name], KEEP.get(name, 1.0)),
            "seconds": round(time.monotonic() - started, 1)}


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out = spread(runs, ("accuracy", "auc", "bytes_up_per_client_per_round"))
    out["masked_update_bytes"] = runs[0]["masked_update_bytes"]
    out["parameters"] = runs[0]["parameters"]
    return out


def _table(results: dict[str, Any], meta: dict[str, Any]) -> str:
    ref = results["unquantized"]
    lines = [f"{meta['title']}; quantized rows: mean ± sd over {meta['repeats']} runs. Bytes up: every message a "
             "participant sends per round (training and evaluation secure sums: keys, shares, masked vector, "
             "signatures); masked update: the training sum's masked vector alone.", "",
             "| setting | bits on the wire | accuracy | vs unquantized | AUC | vs unquantized | bytes up / client / "
             "round | ratio | masked update bytes | ratio |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        q = SETTINGS[name]
        wire = 32 if q is None else q + math.ceil(math.log2(CLIENTS))
        sd = (lambda k, f: f" ± {f * r[k + '_sd']:.1f}" if r[k + "_sd"] else "")  # noqa: E731
        lines.append(
            f"| {name} | {wire} | {100 * r['accuracy']:.2f}%{sd('accuracy', 100)} | "
            f"{100 * (r['accuracy'] - ref['accuracy']):+.2f} | {r['auc']:.4f} | {r['auc'] - ref['auc']:+.4f} | "
            f"{r['bytes_up_per_client_per_round'] / 1024:.1f} KiB | "
            f"{r['bytes_up_per_client_per_round'] / ref['bytes_up_per_client_per_round']:.1%} | "
            f"{r['masked_update_bytes'] / 1024:.1f} KiB | {r['masked_update_bytes'] / ref['masked_update_bytes']:.1%} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2, help="runs of each quantized setting (default 2)")
    ap.add_argument("--rows", type=int, default=1000, help="rows per tenant (default 1000)")
    ap.add_argument("--rounds", type=int, default=20, help="rounds (default 20)")
    ap.add_argument("--quick", action="store_true", help="one repeat, 3 rounds, a small model: a smoke test")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    repeats, rounds, rows, hidden = ((1, 3, 300, [64, 32]) if args.quick
                                     else (args.repeats, args.rounds, args.rows, [512, 256]))
    with tempfile.TemporaryDirectory(prefix="fedcrm-compression-") as tmp:
        work = Path(tmp)
        data = work / "data"
        subprocess.run([*FEDCRM, "synth", "--clients", str(CLIENTS), "--rows", str(rows), "--rounds", str(rounds),
                        "--out", str(data)], check=True, capture_output=True)
        results: dict[str, Any] = {}
        for name, q in SETTINGS.items():
            n = 1 if q is None else repeats  # the unquantized run is deterministic (same seeds, rounding to nearest)
            runs = []
            for i in range(n):
                runs.append(_run(name, data, work, rounds, hidden, i))
                print(f"{name} {i + 1}/{n}: accuracy {100 * runs[-1]['accuracy']:.2f}%, AUC {runs[-1]['auc']:.4f}, "
                      f"{runs[-1]['bytes_up_per_client_per_round'] / 1024:.1f} KiB up per client per round "
                      f"({runs[-1]['seconds']:.0f} s)", file=sys.stderr)
            results[name] = _summary(runs)
    meta = {"clients": CLIENTS, "rows": rows, "rounds": rounds, "hidden": hidden, "repeats": repeats,
            "title": f"`fedcrm synth --clients {CLIENTS} --rows {rows}`, hidden {hidden}, {rounds} rounds, secure "
                     "aggregation"}
    table = _table(results, meta)
    print(json.dumps({"settings": meta, "results": results}, indent=1))
    print(table)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "compression.json").write_text(json.dumps({"settings": meta, "results": results}, indent=1))
    (args.results / "compression.md").write_text(table)


if __name__ == "__main__":
    main()
