"""The ``fedcrm`` command.

Every user-facing failure is a :class:`fedcrm.errors.FedcrmError`, printed as
``error: <what to fix>`` with exit code 2; a federation that ran but did not
succeed exits 1 with its partial report written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from fedcrm import __version__
from fedcrm.cli import experiment
from fedcrm.errors import FedcrmError

__all__ = ["main"]

_EPILOG_RUN = """\
outputs in OUT:
  report.json, report.md   metrics, per-round history, traffic, participants, privacy spent
  checkpoint/              what a restarted aggregator resumes from: the last completed round, the privacy
                           ledger (privacy.json) and the secure-aggregation member list (secagg-members.json)
  model/                   model.npz (weights) and model.json (preprocessing, digest)
  participants/            with personalizationEpochs: each participant's personalized model (.npy) and its
                           metrics (.json), as the node's --report-file writes them
  events.jsonl             what the aggregator recorded, one JSON object per event
  logs/                    the aggregator's and each participant's log
  pki/                     this run's CA certificate and issued certificates
  credentials/             while the run lasts only: each participant's Secret values, one 0600 file per key
                           (the layout a mounted Secret has in a pod); removed when the run ends
  audit.json, audit_roc.png
                           written later by `fedcrm audit --run OUT`: the membership-inference result and its ROC
  aggregator.json, aggregator.port, processes.json, ready/
                           the launcher's own: the aggregator's config and port, the process ids, and each
                           participant's data-check result

differential privacy (spec.privacy.differentialPrivacy): the epsilon spent so far is printed every round;
training stops before a round that would exceed the budget (exit 0, report marked partial).
Audit the result with `fedcrm audit`.

exit codes: 0 succeeded (or stopped at the privacy budget); 1 the federation failed (report marked
partial); 2 bad input
"""


_EPILOG_CHECK = """\
credentials (keys of the Secret named in spec.data.<source>.secretRef, same namespace as the Participant):
  salesforce   instanceUrl + accessToken | username + password + securityToken | username + consumerKey + privateKey
  sql          url (a SQLAlchemy URL, e.g. postgresql+psycopg://user:password@host:5432/crm)

exit codes: 0 every participant's data fits; 1 problems found (each says what to change); 2 bad input
"""


def _console() -> Any:
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


def _add_federation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--federation", required=True, type=Path, metavar="FED.yaml", help="the Federation manifest")
    p.add_argument("--participant", dest="participants", required=True, action="extend", nargs="+", type=Path,
                   metavar="P.yaml",
                   help="Participant manifest(s) and the v1 Secret manifests they reference: repeat the flag or list "
                   "several (shell globs work: participants/*.yaml)")
    p.add_argument("--test-data", type=Path, metavar="TEST.csv",
                   help="held-out rows in the canonical schema; final metrics are computed on them")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder (created; earlier outputs are replaced)")


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """Everything one federated run takes, whoever starts it.

    ``fedcrm run`` fills it from its flags and ``fedcrm demo`` from the files it
    synthesised plus the same run flags (``_add_run_options`` adds them to both
    parsers), so an option added here reaches both commands or fails loudly in
    ``from_args`` instead of being forgotten by one of them.
    """

    federation: Path
    participants: list[Path]
    out: Path
    test_data: Path | None = None
    metrics_port: int | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace, **given: Any) -> RunOptions:
        """Fields from ``given`` first, the rest from the parsed flags of the same name."""
        values = {f.name: given[f.name] if f.name in given else getattr(args, f.name) for f in dataclasses.fields(cls)}
        return cls(**values)


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """How a run is served, common to `run` and `demo` (what it trains on is each command's own business)."""
    p.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="also serve the aggregator's Prometheus metrics (/metrics), /status and /healthz on "
                   "127.0.0.1:PORT while the federation runs, as it does in a cluster")


# The demo's size, and the size of `fedcrm demo --quick` (same code path, for smoke tests and a first look).
_DEMO_SIZE = {"clients": 10, "rows": 2000, "rounds": 20}
_DEMO_QUICK = {"clients": 3, "rows": 400, "rounds": 3}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedcrm",
        description="Train one model across enterprises' CRM data without moving the data.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Start with `fedcrm demo`. Every command has --help.",
    )
    parser.add_argument("--version", action="version", version=f"fedcrm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run a federation on this machine (aggregator + one process per participant, mutual TLS)",
        description="Run a whole federation locally from the same manifests a cluster uses: an aggregator process "
        "and one process per participant, talking gRPC over mutual TLS with a CA made for this run.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_EPILOG_RUN,
    )
    _add_federation_args(run)
    _add_run_options(run)
    run.set_defaults(handler=_cmd_run)

    base = sub.add_parser(
        "baseline",
        help="train the same model centrally on the pooled data (the non-private reference)",
        description="Pool every participant's mapped rows and train the same model with the same settings "
        "(rounds x localEpochs epochs). Writes the same report format as `fedcrm run`, for comparison. "
        "Only meaningful where you may pool the data, e.g. on synthetic data.",
    )
    _add_federation_args(base)
    base.set_defaults(handler=_cmd_baseline)

    synth = sub.add_parser(
        "synth",
        help="write synthetic CRM data for N enterprises, each in its own local schema, with manifests",
        description="Generate lead-conversion data for N fictional enterprises: each gets a CSV in its own column "
        "names, spellings and units, and a Participant manifest whose mapping translates it; plus one Federation "
        "manifest and a canonical held-out test set. Clients are non-IID (label skew and feature shift).",
    )
    synth.add_argument("--clients", type=int, default=10, help="number of enterprises (default 10)")
    synth.add_argument("--rows", type=int, default=2000,
                       help="leads per enterprise, or the largest enterprise's with --min-rows (default 2000)")
    synth.add_argument("--min-rows", type=int, default=None, metavar="N",
                       help="spread enterprise sizes log-uniformly from N to --rows (e.g. --min-rows 30 --rows 1600: "
                       "many small tenants, a few large); default: every enterprise has --rows")
    synth.add_argument("--seed", type=int, default=0, help="random seed; same seed, same files (default 0)")
    synth.add_argument("--alpha", type=float, default=0.5,
                       help="Dirichlet concentration of the non-IID split: smaller is more skewed (default 0.5)")
    synth.add_argument("--rounds", type=int, default=20, help="rounds written into the Federation manifest (default 20)")
    synth.add_argument("--test-rows", type=int, default=None, help="rows in test.csv (default: scales with the data)")
    synth.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    synth.set_defaults(handler=_cmd_synth)

    audit = sub.add_parser(
        "audit",
        help="membership-inference audit of a run's final model: measured leakage (attack AUC, TPR at 1%% FPR)",
        description="Attack the final global model of RUN_DIR with (a) a loss-threshold attack and (b) a shadow-model "
        "likelihood-ratio attack (shadow models trained on --test-data, data the auditor controls). Members are "
        "records participants trained on, non-members their held-out validation records. Needs the participants' "
        "data, so it runs where the data may be read (e.g. synthetic data, or inside one enterprise).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="writes RUN_DIR/audit.json ({loss_threshold, shadow}: {auc, advantage, tpr_at_1pct_fpr}), "
        "RUN_DIR/audit_roc.png,\nand adds the same object as privacy_audit to RUN_DIR/report.json",
    )
    audit.add_argument("--federation", required=True, type=Path, metavar="FED.yaml", help="the Federation manifest")
    audit.add_argument("--participant", dest="participants", required=True, action="extend", nargs="+", type=Path, metavar="P.yaml",
                       help="Participant manifest(s) whose records the model was trained on")
    audit.add_argument("--run", required=True, type=Path, metavar="RUN_DIR", help="output folder of `fedcrm run`")
    audit.add_argument("--test-data", type=Path, metavar="TEST.csv",
                       help="the auditor's own canonical rows for shadow models (default: half the held-out records)")
    audit.add_argument("--shadows", type=int, default=4, help="shadow models to train (default 4)")
    audit.add_argument("--shadow-epochs", type=int, default=None,
                       help="epochs per shadow model (default: rounds x localEpochs, at most 50)")
    audit.add_argument("--max-records", type=int, default=5000,
                       help="members and non-members attacked, each (default 5000)")
    audit.add_argument("--seed", type=int, default=0, help="seeds target sampling and shadow training (default 0)")
    audit.set_defaults(handler=_cmd_audit)

    demo = sub.add_parser(
        "demo",
        help="synthesise 10 enterprises' CRM data and train a federated model on it, end to end",
        description="The whole product in one command: synthetic data for 10 enterprises, a federated run over "
        "mutual TLS, and the same model trained centrally for comparison.",
    )
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default runs/demo)")
    demo.add_argument("--clients", type=int, help=f"number of enterprises (default {_DEMO_SIZE['clients']})")
    demo.add_argument("--rows", type=int, help=f"leads per enterprise (default {_DEMO_SIZE['rows']})")
    demo.add_argument("--rounds", type=int, help=f"federated rounds (default {_DEMO_SIZE['rounds']})")
    demo.add_argument("--quick", action="store_true",
                      help="a smaller demo through the same code path ({clients} enterprises x {rows} leads, {rounds} "
                      "rounds; flags given explicitly still win)".format(**_DEMO_QUICK))
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    _add_run_options(demo)
    demo.set_defaults(handler=_cmd_demo)

    terms_cmd = sub.add_parser(
        "terms",
        help="print a Federation's terms digest (what a Participant's spec.acceptedTerms pins)",
        description="Print the digest of a Federation's terms (task, model, training, privacy) and a one-line "
        "summary of its privacy. A tenant pins its consent with spec.acceptedTerms: <digest>; after the Federation's "
        "owner changes the terms, the operator refuses the Participant (reason TermsChanged) until the tenant sets the "
        "new digest. With --participant, also says whether each Participant's spec.requires and spec.acceptedTerms "
        "accept this Federation (exit 1 when one does not).",
    )
    terms_cmd.add_argument("federation", type=Path, metavar="FED.yaml", help="the Federation manifest")
    terms_cmd.add_argument("--participant", dest="participants", action="extend", nargs="+", type=Path, default=[],
                           metavar="P.yaml", help="Participant manifest(s) to check against it")
    terms_cmd.set_defaults(handler=_cmd_terms)

    data = sub.add_parser(
        "data",
        help="check a participant's data source before joining a federation",
        description="Work with a participant's data where it lives (a file, a Salesforce org, a SQL database).",
    )
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    check = data_sub.add_parser(
        "check",
        help="connect, read a sample, apply the mapping and report per canonical field",
        description="Connect to each Participant's data source with the credentials of the Secret it references, "
        "read a sample, apply spec.data.mapping/values/transforms, and report per canonical field: the local column, "
        "whether it is present, its type, the share of missing values, values with no mapping, and the label balance. "
        "The operator runs the same check when a Participant enrols.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_EPILOG_CHECK,
    )
    check.add_argument("--federation", required=True, type=Path, metavar="FED.yaml",
                       help="the Federation manifest (its task defines the canonical fields)")
    check.add_argument("--participant", dest="participants", required=True, action="extend", nargs="+", type=Path, metavar="P.yaml",
                       help="Participant manifest(s) and the v1 Secret manifests they reference "
                       "(a file may hold a Participant and its Secret as separate YAML documents)")
    check.add_argument("--rows", type=int, default=1000, help="rows to sample per participant (default 1000)")
    check.add_argument("--json", action="store_true", help="print the reports as JSON instead of tables")
    check.set_defaults(handler=_cmd_data_check)
    experiment.add_parser(sub)
    return parser


# --------------------------------------------------------------------------- commands


def _run(options: RunOptions, console: Any) -> tuple[int, dict[str, Any]]:
    from fedcrm.cli.launcher import load_federation_inputs, run_federation
    from fedcrm.cli.progress import RunProgress

    inputs = load_federation_inputs(options.federation, options.participants)
    fed = inputs.federation
    console.print(
        f"federation [bold]{fed.key}[/]: {len(inputs.participants)} participants, {fed.spec.training.rounds} rounds, "
        f"mutual TLS, outputs in {options.out}"
    )
    dp = fed.spec.privacy.differential_privacy
    if dp.enabled:
        from fedcrm.privacy.plans import privacy_plan

        console.print(f"differential privacy [bold]{dp.mode}[/]: budget epsilon {dp.epsilon:g}, delta {dp.delta:g}; "
                      "training stops before a round that would exceed it")
        console.print(f"  plan: {privacy_plan(fed.spec)}")
    with RunProgress(console, fed.spec.training.rounds, len(inputs.participants), private=dp.enabled) as progress:
        result = run_federation(inputs, options.out, test_data=options.test_data, progress=progress,
                                metrics_port=options.metrics_port)
    for warning in result.report.get("warnings") or []:
        console.print(f"[yellow]warning: {warning}[/]")
    return result.exit_code, result.report


def _print_outcome(console: Any, report: dict[str, Any], out: Path) -> None:
    from fedcrm.cli.progress import pct

    m = report["metrics"]
    if report["status"] == "succeeded":
        console.print(
            f"[green]done[/]: {report['rounds_completed']} rounds; on the {report['metrics_source']} set "
            f"accuracy {pct(m['accuracy'])}, F1 {pct(m['f1'])}, ROC AUC {m['auc'] if m['auc'] is None else round(m['auc'], 4)}"
        )
    else:
        console.print(f"[red]federation failed[/]: {report['message']}")
        console.print(f"partial results ({report['rounds_completed']} rounds) are in {out}")
    console.print(f"report: {out / 'report.md'}")


def _cmd_run(args: argparse.Namespace) -> int:
    console = _console()
    options = RunOptions.from_args(args)
    code, report = _run(options, console)
    _print_outcome(console, report, options.out)
    return code


def _baseline(args: argparse.Namespace | RunOptions, console: Any) -> dict[str, Any]:
    from fedcrm.cli.launcher import load_federation_inputs
    from fedcrm.cli.pooled_data import load_inputs_data
    from fedcrm.data.loaders import load_canonical_file
    from fedcrm.models.artifacts import load_model
    from fedcrm.models.scoring import score_frame
    from fedcrm.reporting import write_report
    from fedcrm.training.central import train_central
    from fedcrm.training.local import one_thread

    inputs = load_federation_inputs(args.federation, args.participants)
    task = inputs.federation.spec.task
    datasets = load_inputs_data(inputs)
    test = load_canonical_file(args.test_data, task) if args.test_data else None
    args.out.mkdir(parents=True, exist_ok=True)
    rows = sum(len(d) for d in datasets.values())
    console.print(f"baseline: central training on {rows:,} pooled rows, {inputs.federation.spec.training.rounds} rounds")
    one_thread()
    report = train_central(inputs.federation, datasets, args.out)
    if test is not None:
        metrics = score_frame(load_model(args.out / "model"), test.frame)
        report["metrics"] = {k: metrics[k] for k in report["metrics"]}
        report["metrics_source"] = "test"
        report["test_rows"] = len(test)
    write_report(args.out, report)
    return report


def _cmd_baseline(args: argparse.Namespace) -> int:
    console = _console()
    report = _baseline(args, console)
    _print_outcome(console, report, args.out)
    return 0


def _cmd_terms(args: argparse.Namespace) -> int:
    from fedcrm.spec.loading import check_membership, load_federation, load_participant_manifests
    from fedcrm.spec.terms import privacy_summary, terms_digest

    federation = load_federation(args.federation)
    print(f"{federation.key}: terms {terms_digest(federation.spec)}")
    print(f"  {privacy_summary(federation.spec)}")
    refused = 0
    for participant, _ in load_participant_manifests(args.participants).participants if args.participants else []:
        try:
            check_membership(federation, participant)
        except FedcrmError as err:
            refused += 1
            print(f"  {participant.identity}: refuses: {err}")
        else:
            print(f"  {participant.identity}: accepts")
    return 1 if refused else 0


def _cmd_audit(args: argparse.Namespace) -> int:
    from fedcrm.cli.launcher import load_federation_inputs
    from fedcrm.cli.pooled_data import load_inputs_data
    from fedcrm.data.loaders import load_canonical_file
    from fedcrm.privacy.audit import run_audit
    from fedcrm.privacy.plots import plot_roc
    from fedcrm.reporting import read_report, write_report
    from fedcrm.training.local import one_thread

    console = _console()
    if not (args.run / "report.json").exists() or not (args.run / "model").is_dir():
        raise FedcrmError(f"{args.run}: not the output folder of a finished `fedcrm run` (report.json or model/ is missing)")
    if args.shadows < 1 or args.max_records < 10 or (args.shadow_epochs is not None and args.shadow_epochs < 1):
        raise FedcrmError("--shadows and --shadow-epochs must be at least 1 and --max-records at least 10")
    inputs = load_federation_inputs(args.federation, args.participants)
    datasets = load_inputs_data(inputs)
    test = load_canonical_file(args.test_data, inputs.federation.spec.task).frame if args.test_data else None
    one_thread()
    console.print(f"auditing {args.run / 'model'}: loss-threshold attack and {args.shadows} shadow models")
    audit, curves = run_audit(inputs.federation, datasets, args.run, auditor_data=test, shadows=args.shadows,
                              shadow_epochs=args.shadow_epochs, max_records=args.max_records, seed=args.seed)
    (args.run / "audit.json").write_text(json.dumps(audit, indent=2) + "\n")
    plot_roc({"loss threshold": curves["loss_threshold"], "shadow (offline LiRA)": curves["shadow"]},
             args.run / "audit_roc.png", title=f"Membership inference on {args.run.name}")
    report = read_report(args.run)
    report["privacy_audit"] = audit
    write_report(args.run, report)
    for name in ("loss_threshold", "shadow"):
        a = audit[name]
        console.print(f"  {name:>14}: AUC {a['auc']:.4f}, advantage {a['advantage']:.4f}, "
                      f"TPR at 1% FPR {a['tpr_at_1pct_fpr']:.4f}")
    console.print(f"wrote {args.run / 'audit.json'} and {args.run / 'audit_roc.png'}")
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from fedcrm.data.synthetic import generate_federation

    console = _console()
    result = generate_federation(
        args.out, clients=args.clients, rows=args.rows, seed=args.seed, alpha=args.alpha,
        test_rows=args.test_rows, rounds=args.rounds, min_rows=args.min_rows,
    )
    sizes = f"{args.min_rows:,}-{args.rows:,}" if args.min_rows else f"{args.rows:,}"
    console.print(f"wrote {args.clients} participants x {sizes} rows, a Federation and a test set to {result.out_dir}")
    command = (
        f"fedcrm run --federation {result.federation_path} --participant {result.out_dir / 'participants'}/*.yaml "
        f"--test-data {result.test_path} --out runs/{result.out_dir.name}"
    )
    console.print(f"next: {command}", soft_wrap=True)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from fedcrm.data.synthetic import generate_federation

    console = _console()
    started = time.monotonic()
    out: Path = args.out
    size = _DEMO_QUICK if args.quick else _DEMO_SIZE
    for name, default in size.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    phase_started = time.monotonic()

    def phase_done(what: str) -> None:
        nonlocal phase_started
        console.print(f"    {what} in {time.monotonic() - phase_started:.1f}s")
        phase_started = time.monotonic()

    console.print(f"[bold]1/3[/] synthesising CRM data for {args.clients} enterprises x {args.rows:,} leads ...")
    synth = generate_federation(out / "data", clients=args.clients, rows=args.rows, seed=args.seed, rounds=args.rounds)
    phase_done(f"wrote {out / 'data'}")
    console.print("[bold]2/3[/] federated training: each enterprise's leads stay in its own process; "
                  "only model updates and counts cross mutual TLS")
    options = RunOptions.from_args(args, federation=synth.federation_path, participants=synth.participant_paths,
                                   test_data=synth.test_path, out=out / "federated")
    code, fed_report = _run(options, console)
    if code != 0:
        _print_outcome(console, fed_report, options.out)
        return code
    phase_done("federated training finished")
    console.print("[bold]3/3[/] for comparison, the same model trained centrally on pooled data (what federation avoids)")
    base_report = _baseline(dataclasses.replace(options, out=out / "baseline"), console)
    phase_done("central training finished")

    from fedcrm.cli.progress import human_bytes, pct
    from fedcrm.spec.loading import load_federation

    fm, bm = fed_report["metrics"], base_report["metrics"]
    gap = None if fm["accuracy"] is None or bm["accuracy"] is None else 100 * (bm["accuracy"] - fm["accuracy"])
    console.print()
    console.print("[bold]Summary[/]")
    console.print(
        f"  {args.clients} enterprises trained one lead-conversion model together in "
        f"{fed_report['rounds_completed']} rounds. No lead record left its enterprise's process."
    )
    console.print(f"  On {fed_report.get('test_rows', 0):,} held-out leads the federated model predicts conversion with "
                  f"accuracy {pct(fm['accuracy'])} (F1 {pct(fm['f1'])}, ROC AUC {fm['auc']:.3f}).")
    if gap is None:
        comparison = "."
    elif gap > 0:
        comparison = f": federation costs {gap:.2f} accuracy points."
    else:
        comparison = f": the federated model is {-gap:.2f} points better here (FedAvg's averaging regularises)."
    console.print(f"  Pooling all the data centrally would give {pct(bm['accuracy'])}{comparison}")
    secure = load_federation(synth.federation_path).spec.privacy.secure_aggregation.enabled
    if secure:
        console.print("  Updates and evaluation counts were masked (secure aggregation): the aggregator saw only sums.")
    console.print(f"  Each enterprise sent and received {human_bytes(fed_report['bytes_per_client_per_round'])} per round.")
    console.print(f"  Reports: {options.out / 'report.md'} and {out / 'baseline' / 'report.md'} "
                  f"(finished in {time.monotonic() - started:.0f}s)")
    return 0


def _print_check(console: Any, report: Any) -> None:
    """The report as aligned plain columns (long unmapped-value lists last), readable in a terminal or a CI log."""
    state = "[green]ok[/]" if report.ok else "[red]problems[/]"
    console.print(f"participant [bold]{report.participant}[/] ({report.origin}): {state}, "
                  f"{report.rows_sampled:,} rows sampled")
    if report.fields:
        header = ("field", "type", "column", "present", "source type", "missing %", "unmapped values")
        rows = [header] + [
            (r.field, r.type, r.column or "(not mapped)", "yes" if r.present else ("-" if r.column is None else "NO"),
             r.local_type or "-", "-" if r.missing_pct is None else f"{r.missing_pct:g}", ", ".join(r.unmapped) or "-")
            for r in report.fields
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
        for row in rows:
            console.print("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1], markup=False)
    if report.positive_pct is not None:
        console.print(f"label balance: {report.positive_pct:g}% positive")
    for w in report.warnings:
        console.print(f"[yellow]warning[/]: {w}")
    for p in report.problems:
        console.print("[red]problem[/]: ", end="")
        console.print(p, markup=False)


def _cmd_data_check(args: argparse.Namespace) -> int:
    import json

    from fedcrm.cli.launcher import load_check_inputs
    from fedcrm.data.check import check_participant

    if args.rows < 1:
        raise FedcrmError("--rows must be at least 1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s", stream=sys.stderr)
    federation, participants = load_check_inputs(args.federation, args.participants)
    reports = [
        check_participant(participant, federation.spec.task, base_dir=path.resolve().parent, credentials=creds,
                          sample_rows=args.rows)
        for participant, path, creds in participants
    ]
    if args.json:
        print(json.dumps({"ok": all(r.ok for r in reports), "participants": [r.to_dict() for r in reports]}, indent=2))
    else:
        console = _console()
        for report in reports:
            _print_check(console, report)
    return 0 if all(r.ok for r in reports) else 1


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        code = args.handler(args)
    except FedcrmError as err:
        print(f"error: {err}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
