"""``fedcrm-node``: run one participant of a federation.

Exit codes (``fedcrm.exit_codes.NodeExitCode``): 0 the federation succeeded;
2 this participant's manifest, data or certificate is wrong (the message says
what to fix); 3 the federation stopped without success; 4 the aggregator could
not be reached, went away or broke the protocol; 5 the aggregator asked for
something this participant's own Federation manifest does not allow (other
terms, an unmasked result, more rounds than planned): nothing of it was sent.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from fedcrm.data.credentials import MOUNT_PATH
from fedcrm.errors import DataError, FedcrmError, ManifestError
from fedcrm.exit_codes import NodeExitCode
from fedcrm.logs import add_log_level_argument, configure
from fedcrm.protocol import TlsFiles
from fedcrm.spec.loading import load_federation, load_participant

if TYPE_CHECKING:
    from fedcrm_node.participant import ParticipantNode

log = logging.getLogger("fedcrm.node")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedcrm-node",
        description="Run one participant: read its own data, train locally, send only updates and counts.",
    )
    p.add_argument("--participant", required=True, type=Path, help="the Participant manifest (YAML)")
    p.add_argument("--aggregator", help="host:port of the aggregator's gRPC endpoint (required unless --check-only)")
    p.add_argument("--ca", type=Path, help="the federation CA certificate (PEM)")
    p.add_argument("--cert", type=Path, help="this participant's certificate (PEM)")
    p.add_argument("--key", type=Path, help="this participant's private key (PEM)")
    p.add_argument("--check-only", type=Path, metavar="FEDERATION",
                   help="only check this participant's data against the Federation manifest's task (the enrolment "
                   "check the operator runs before training) and exit: 0 it fits, 2 it does not (problems printed)")
    p.add_argument("--federation", type=Path, metavar="FEDERATION",
                   help="this participant's own copy of the Federation manifest (required to train): the data is "
                   "checked against its task before the aggregator is dialled, and the aggregator must serve exactly "
                   "its terms (task, model, training, privacy) or nothing is trained (exit 5)")
    p.add_argument("--ready-file", type=Path, metavar="PATH",
                   help="write {\"rows\": N} here once the data is loaded and mapped, or "
                   "{\"problem\": MESSAGE} (and exit 2) when it does not fit; `fedcrm run` waits for every participant's")
    p.add_argument("--data-root", type=Path,
                   help="where the spec.data.pvc claim is mounted (set by the operator in a training pod)")
    p.add_argument("--credentials", type=Path, default=None, metavar="DIR",
                   help="directory with one file per key of the Secret the data source references "
                   f"(default {MOUNT_PATH}, where the operator mounts it)")
    p.add_argument("--state-dir", type=Path, metavar="DIR",
                   help="a directory that outlives this process (in a cluster: the Participant's spec.stateClaim) where "
                   "the node keeps its count of privacy releases, so a restarted pod never releases more than the "
                   "budget was planned for; without it the count lives in this process")
    p.add_argument("--report-file", type=Path, metavar="PATH",
                   help="where this participant writes what stays with it when the federation succeeds: with "
                   "spec.training.personalizationEpochs, the global and the personalized model's metrics on its own "
                   "validation rows (JSON; the personalized weights go beside it as .npy); without it, only the log")
    p.add_argument("--server-name", help="name to verify in the aggregator's certificate, if not the host in --aggregator")
    p.add_argument("--connect-timeout", type=float, default=60.0, help="seconds to wait for the aggregator (default 60)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("FEDCRM_TORCH_THREADS", "1")),
                   help="torch threads for local training (default 1, or $FEDCRM_TORCH_THREADS)")
    add_log_level_argument(p)
    return p


def _check_only(args: argparse.Namespace) -> None:
    """Print the data check's problems one per line (the pod's termination message shows the last ones)."""
    from fedcrm.data.check import check_participant
    from fedcrm.data.credentials import read_credentials_dir

    try:
        participant = load_participant(args.participant)
        federation = load_federation(args.check_only)
        directory = args.credentials or Path(MOUNT_PATH)
        credentials = read_credentials_dir(directory) if participant.spec.credentials_secret_name() else None
        report = check_participant(participant, federation.spec.task, base_dir=args.participant.resolve().parent,
                                   credentials=credentials, pvc_root=args.data_root)
    except FedcrmError as err:
        print(err, flush=True)
        sys.exit(NodeExitCode.CONFIG)
    for warning in report.warnings:
        log.warning("%s", warning)
    if not report.ok:
        for problem in report.problems:
            print(problem, flush=True)
        sys.exit(NodeExitCode.CONFIG)
    log.info("data check passed: %d rows sampled from %s", report.rows_sampled, report.origin)


def _write_ready(path: Path | None, content: dict[str, object]) -> None:
    if path is None:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(content))
    tmp.replace(path)  # whoever waits for it never reads half a file


def _load_data(node: ParticipantNode, ready_file: Path | None) -> None:
    """Load and check the data up front; a problem is reported (ready file, log) and ends the node with exit 2."""
    try:
        rows = node.load_data()
    except (DataError, ManifestError) as err:
        _write_ready(ready_file, {"problem": str(err)})
        raise
    log.info("data loaded and mapped: %d rows", rows)
    _write_ready(ready_file, {"rows": rows})


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    configure(args.log_level)
    if args.check_only:
        _check_only(args)
        return
    missing = [f"--{n}" for n in ("federation", "aggregator", "ca", "cert", "key") if getattr(args, n) is None]
    if missing:
        parser.error(f"{', '.join(missing)} required to train (or use --check-only FEDERATION)")
    import torch

    torch.set_num_threads(max(1, args.threads))
    from fedcrm_node.participant import NodeExit, ParticipantNode

    try:
        participant = load_participant(args.participant)
        node = ParticipantNode(
            participant,
            manifest_dir=args.participant.resolve().parent,
            data_root=args.data_root,
            aggregator=args.aggregator,
            tls=TlsFiles(args.ca, args.cert, args.key),
            server_name=args.server_name,
            connect_timeout=args.connect_timeout,
            credentials_dir=args.credentials or Path(MOUNT_PATH),
            own_federation=load_federation(args.federation),
            state_dir=args.state_dir,
            report_file=args.report_file,
        )
        if not node.ledger.durable and node.own_federation.spec.privacy.differential_privacy.enabled:
            log.info("privacy releases are counted in this process only (no --state-dir): a restart counts from zero; "
                     "the aggregator's ledger still counts every release")
        _load_data(node, args.ready_file)
        node.run()
    except NodeExit as err:
        log.error("%s", err)
        sys.exit(err.code)
    except FedcrmError as err:
        log.error("%s", err)
        sys.exit(NodeExitCode.CONFIG)


if __name__ == "__main__":
    main()
