"""Secure aggregation, ours against Flower's SecAgg+, side by side in one run.

For each configuration both implementations run one full round in this
process with the same n, d, dropout fraction, neighbourhood and threshold:
every client's stage work is timed per client, the server's work separately,
and the upload is the masked vector as each puts it on the wire. Dropouts
happen after ShareKeys, so both exercise mask recovery.

    python bench/secagg.py --json OUT.json [--quick] [--no-flower]

prints a table (ours / Flower ratios) and writes rows {impl, n, d, dropout,
neighbours, threshold, status, client_s, server_s, upload_bytes, ...}. Flower
comes from the virtual environment ``.venv-bench`` that ``make bench-secagg``
creates (Flower 1.42 needs protobuf < 7 and cryptography >= 50, which our
pinned stubs cannot share a process with), run as a subprocess per
configuration.

Every row is either measured (``status: "measured"``, every time and size a
finite number) or deliberately not run (``status: "not run"``, the numbers
null and ``note`` saying why): a Flower configuration estimated from the
smaller runs to exceed --flower-budget seconds is not started, and one that
does not finish within the budget is stopped. Nothing else is skipped: without
a working ``.venv-bench`` (and no --no-flower), or when a Flower run fails or
computes a wrong sum, the script prints the reason (the tail of Flower's
stderr) and exits 1 without writing the JSON. With --quick (a smoke test, n=10
and d=10,000 in both neighbourhood shapes) there is no budget: every
configuration runs.

"neighbours" is the number of peers each client shares with besides itself
(Flower's ``num_shares`` minus one); "threshold" is the number of shares needed
to reconstruct (Flower's ``reconstruction_threshold``).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
import tracemalloc
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fedcrm.pki import CertificateAuthority
from fedcrm.protocol import to_vector
from fedcrm.secagg.client import SecAggClient
from fedcrm.secagg.graph import public_seed
from fedcrm.secagg.params import SecAggParams
from fedcrm.secagg.quantization import choose_scale, quantize
from fedcrm.secagg.server import SecAggServer
from fedcrm.secagg.signing import PeerVerifier, Signer

BITS = 32
CLIP = 1.0


@dataclass
class Config:
    n: int
    d: int
    dropout: float
    neighbours: int | str  # peers besides self, or "complete" / "logarithmic"
    threshold: int

    def label(self) -> str:
        return f"n={self.n} d={self.d:,} drop={self.dropout:.0%} k={self.neighbours} t={self.threshold}"


MEASURED, NOT_RUN = "measured", "not run"


class PeerFailed(RuntimeError):
    """The Flower side could not produce a measurement; the message carries its stderr's tail."""


@dataclass
class Row:
    impl: str
    n: int
    d: int
    dropout: float
    neighbours: int | str
    threshold: int
    client_s: float | None  # None only when status is NOT_RUN
    server_s: float | None
    upload_bytes: float | None
    peak_server_mb: float | None = None  # measured for n >= 1000 only
    note: str = ""
    status: str = MEASURED

    @property
    def measured(self) -> bool:
        return self.status == MEASURED


def _not_run(cfg: Config, threshold: int, why: str) -> Row:
    return Row("flower", cfg.n, cfg.d, cfg.dropout, cfg.neighbours, threshold, None, None, None,
               note=f"not run: {why}", status=NOT_RUN)


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.strip().splitlines()[-lines:]) or "(no output)"


def configurations(quick: bool) -> list[Config]:
    if quick:  # a smoke test: both neighbourhood shapes and the dropout path, seconds per run
        return [Config(10, 10_000, 0.1, 2, 2), Config(10, 10_000, 0.1, "complete", 6)]
    out = []
    for n in (10, 50, 200):
        for d in (100_000, 1_000_000):
            for dropout in (0.0, 0.1):
                out.append(Config(n, d, dropout, 2, 2))
                out.append(Config(n, d, dropout, "complete", n // 2 + 1))
    out.append(Config(1000, 100_000, 0.1, "logarithmic", 0))
    return out


def _params(cfg: Config) -> SecAggParams:
    """Our parameters for a configuration: same neighbourhood size and absolute threshold."""
    if cfg.neighbours == "logarithmic":
        return SecAggParams(threshold=0.51, neighbours="logarithmic", bits=BITS)
    k = cfg.n - 1 if cfg.neighbours == "complete" else int(cfg.neighbours)
    # shares_needed(k) = ceil(threshold * (k + 1)), a strict majority; pick the fraction that yields cfg.threshold.
    fraction = max((cfg.threshold - 0.25) / (k + 1), 0.5 + 1e-9)
    params = SecAggParams(threshold=fraction, neighbours="complete" if cfg.neighbours == "complete" else k, bits=BITS)
    assert params.shares_needed(k) == cfg.threshold, (params.shares_needed(k), cfg.threshold)
    return params


def _recoverable_dropouts(rng: np.random.Generator, neighbours: dict[int, tuple[int, ...]], count: int,
                          threshold: int) -> set[int]:
    """``count`` random participants whose dropping leaves every secret reconstructible.

    With 3 shares and threshold 2, two dropouts next to one participant leave
    one of its secrets with a single holder and the round must be abandoned (in
    either implementation); the benchmark measures the recovery path.
    """
    chosen: set[int] = set()

    def holders_ok(trial: set[int]) -> bool:
        return all(len(({j} | set(neighbours[j])) - trial) >= threshold for j in neighbours)

    for i in rng.permutation(sorted(neighbours)).tolist():
        if len(chosen) == count:
            break
        if holders_ok(chosen | {i}):
            chosen.add(i)
    return chosen


def run_fedcrm(cfg: Config, seed: int = 0, *, trace_memory: bool = False) -> Row:
    """One in-process round of ours; with ``trace_memory`` the server's peak allocation is measured (slower)."""
    rng = np.random.default_rng(seed)
    params = _params(cfg)
    ids = list(range(cfg.n))
    client_time = dict.fromkeys(ids, 0.0)
    server_time = 0.0

    def timed_client(cid: int, fn, *args):  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        out = fn(*args)
        client_time[cid] += time.perf_counter() - t
        return out

    scale = choose_scale(clip=CLIP, weight_bound=cfg.n, bits=BITS)
    # Each participant signs with its own certificate and checks its neighbours' against the federation CA with
    # a verifier of its own (an empty cache: this is a participant's first round, certificate checks included).
    # Issuing the certificates is the PKI's work, outside the round, and not timed.
    members, signers = _credentials(cfg.n)
    seed = public_seed("bench/secagg", 1, 1, members)
    clients = {i: SecAggClient(client_id=i, round_id=1, params=params, vector_length=cfg.d, signer=signers[i],
                               verifier=PeerVerifier(_ca(cfg.n).cert_pem), members=members, public_seed=seed)
               for i in ids}
    server_peak = 0

    class _Server:
        """Times (and optionally traces) every call into the server."""

        def __init__(self, inner: SecAggServer) -> None:
            self.inner = inner

        def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
            attr = getattr(self.inner, name)
            if not callable(attr):
                return attr

            def call(*args, **kwargs):  # type: ignore[no-untyped-def]
                nonlocal server_time, server_peak
                if trace_memory:
                    base = tracemalloc.get_traced_memory()[0]
                    tracemalloc.reset_peak()
                t0 = time.perf_counter()
                out = attr(*args, **kwargs)
                server_time += time.perf_counter() - t0
                if trace_memory:
                    server_peak = max(server_peak, tracemalloc.get_traced_memory()[1] - base + running_sum)
                return out

            return call

    running_sum = cfg.d * 8  # the server's one persistent vector (machine-width accumulator)
    if trace_memory:
        tracemalloc.start()
    t = time.perf_counter()
    server = _Server(SecAggServer(round_id=1, params=params, client_ids=ids, vector_length=cfg.d, public_seed=seed))
    server_time += time.perf_counter() - t
    keys = {i: timed_client(i, clients[i].advertise_keys) for i in ids}
    for i, k in keys.items():
        server.receive_keys(i, k)
    server.close_advertise()
    rosters = {i: server.roster_for(i) for i in ids}
    dropped = _recoverable_dropouts(rng, {i: server.neighbours_of(i) for i in ids}, int(round(cfg.dropout * cfg.n)),
                                    params.shares_needed(params.neighbour_count(cfg.n)))
    for i in ids:
        shares = timed_client(i, clients[i].share_keys, rosters[i])
        server.receive_shares(i, shares)
    server.close_share_keys()
    inboxes = {i: server.inbox_for(i) for i in ids if i not in dropped}
    upload = []
    for i in ids:
        if i in dropped:
            continue
        values = rng.uniform(-0.1, 0.1, cfg.d).astype(np.float32)
        q = timed_client(i, lambda v: quantize(v.astype(np.float64), clip=CLIP, scale=scale, bits=BITS), values)
        masked = timed_client(i, clients[i].masked_input, inboxes[i], q)
        upload.append(to_vector(masked).ByteSize())
        server.receive_masked(i, masked)
    gone, survivors = server.close_masked_input()
    survivor_set = server.consistency_request()
    for i in survivors:
        server.receive_signature(i, timed_client(i, clients[i].sign_survivors, survivor_set))
    server.close_consistency()
    for i in survivors:
        request = server.unmask_request_for(i)
        reply = timed_client(i, lambda: clients[i].unmask(survivors=request.survivors, signatures=request.signatures))
        server.receive_unmask(i, reply)
    server.finish()
    if trace_memory:
        tracemalloc.stop()
    active = [client_time[i] for i in ids if i not in dropped]
    return Row("fedcrm", cfg.n, cfg.d, cfg.dropout, cfg.neighbours, params.shares_needed(params.neighbour_count(cfg.n)),
               float(np.mean(active)), server_time, float(np.mean(upload)),
               server_peak / 2**20 if trace_memory else None)


_CAS: dict[int, CertificateAuthority] = {}
_ISSUED: dict[int, tuple[dict[int, str], dict[int, Signer]]] = {}


def _ca(n: int) -> CertificateAuthority:
    if n not in _CAS:
        _CAS[n] = CertificateAuthority.create(f"bench-{n}")
    return _CAS[n]


def _credentials(n: int) -> tuple[dict[int, str], dict[int, Signer]]:
    """Member list and client certificates for ``n`` participants, issued once per size (not timed)."""
    if n not in _ISSUED:
        members = {i: f"tenant-{i:04d}/crm" for i in range(n)}
        signers = {}
        for i, identity in members.items():
            issued = _ca(n).issue_client(identity)
            signers[i] = Signer.from_pem(issued.cert_pem, issued.key_pem)
        _ISSUED[n] = (members, signers)
    return _ISSUED[n]


def _flower_shape(cfg: Config) -> tuple[int, int]:
    """Flower's (num_shares, reconstruction_threshold) for the same neighbourhood and threshold as ours."""
    params = _params(cfg)
    k = params.neighbour_count(cfg.n)
    return (cfg.n if cfg.neighbours == "complete" else k + 1), params.shares_needed(k)


FLOWER_SCRIPT = Path(__file__).with_name("flower_secaggplus.py")


def run_flower(cfg: Config, python: Path, timeout: float | None, seed: int = 0) -> Row:
    """Flower's round in its own interpreter (see bench/flower_secaggplus.py for why).

    A run stopped at ``timeout`` seconds is a NOT_RUN row; any other failure, and a wrong sum, raise PeerFailed.
    """
    num_shares, threshold = _flower_shape(cfg)
    argv = [str(python), str(FLOWER_SCRIPT), "--n", str(cfg.n), "--d", str(cfg.d),
            "--dropout", str(cfg.dropout), "--num-shares", str(num_shares), "--threshold", str(threshold),
            "--seed", str(seed)]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as err:
        return _not_run(cfg, threshold, f"stopped after {err.timeout:.0f}s, over the budget")
    if proc.returncode != 0:
        raise PeerFailed(f"Flower's round for {cfg.label()} exited with {proc.returncode}:\n{_tail(proc.stderr)}")
    try:
        out = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise PeerFailed(f"Flower's round for {cfg.label()} printed no result line:\n"
                         f"{_tail(proc.stdout)}\n{_tail(proc.stderr)}") from None
    if not out["correct"]:
        raise PeerFailed(f"Flower's round for {cfg.label()} computed a wrong sum (exact: {out['exact']}, "
                         f"max error {out['max_error']:.3g}, quantization step {out['quantization_step']:.3g})")
    return Row("flower", cfg.n, cfg.d, cfg.dropout, cfg.neighbours, threshold, out["client_s"], out["server_s"],
               out["upload_bytes"])


def _flower_python() -> Path:
    """The interpreter of .venv-bench (made by `make bench-secagg`), checked by loading the Flower script itself.

    ``--help`` imports everything the script imports, from the same sys.path[0] (bench/), so a module there that
    shadows one Flower needs fails here, with its traceback, rather than as a failed row later.
    """
    python = Path(__file__).resolve().parents[1] / ".venv-bench" / "bin" / "python"
    if not python.exists():
        raise PeerFailed(f"{python} does not exist: `make bench-secagg` creates it (or pass --no-flower)")
    probe = subprocess.run([str(python), str(FLOWER_SCRIPT), "--help"], capture_output=True, text=True,
                           stdin=subprocess.DEVNULL)
    if probe.returncode != 0:
        raise PeerFailed(f"{python} {FLOWER_SCRIPT.name} --help exited with {probe.returncode}:\n{_tail(probe.stderr)}")
    return python


def _estimate(rows: list[Row], cfg: Config) -> float | None:
    """Flower's time for ``cfg`` extrapolated from the measured runs of the same shape (the largest estimate).

    Complete graphs scale with n^3 (pure-Python Shamir over every pair) and at least linearly in d; a
    same-shape run that was stopped or not run makes any larger one infinite.
    """
    same = [r for r in rows if r.impl == "flower" and r.neighbours == cfg.neighbours and r.n <= cfg.n and r.d <= cfg.d]
    if not all(r.measured for r in same):  # stopped, or itself over budget
        return math.inf
    estimates = [
        (r.server_s + r.client_s * r.n) * (cfg.d / r.d) ** (0 if cfg.neighbours == "complete" else 1)  # type: ignore[operator]
        * (cfg.n / r.n) ** (3 if cfg.neighbours == "complete" else 1)
        for r in same
    ]
    return max(estimates) if estimates else None


def _table(rows: list[Row]) -> str:
    lines = [f"{'impl':7} {'n':>5} {'d':>9} {'drop':>5} {'k':>11} {'t':>4} {'client s':>9} {'server s':>9} "
             f"{'upload MB':>9} {'client x':>8} {'server x':>8} {'upload x':>8}"]
    flower = {(r.n, r.d, r.dropout, str(r.neighbours)): r for r in rows if r.impl == "flower" and r.measured}
    for r in rows:
        if not r.measured:
            lines.append(f"{r.impl:7} {r.n:>5} {r.d:>9,} {r.dropout:>5.0%} {str(r.neighbours):>11} {r.threshold:>4} "
                         f"{'-':>9} {'-':>9} {'-':>9} {'':>8} {'':>8} {'':>8}  {r.note}")
            continue
        assert r.client_s is not None and r.server_s is not None and r.upload_bytes is not None
        ratios = ["", "", ""]
        if r.impl == "fedcrm" and (f := flower.get((r.n, r.d, r.dropout, str(r.neighbours)))) and f.server_s:
            assert f.client_s is not None and f.upload_bytes is not None
            ratios = [f"{r.client_s / f.client_s:.3f}", f"{r.server_s / f.server_s:.3f}", f"{r.upload_bytes / f.upload_bytes:.3f}"]
        lines.append(f"{r.impl:7} {r.n:>5} {r.d:>9,} {r.dropout:>5.0%} {str(r.neighbours):>11} {r.threshold:>4} "
                     f"{r.client_s:>9.4f} {r.server_s:>9.3f} {r.upload_bytes / 1e6:>9.2f} "
                     f"{ratios[0]:>8} {ratios[1]:>8} {ratios[2]:>8}" + (f"  {r.note}" if r.note else ""))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke test: n=10, d=10,000, 10%% dropout, k=2 and complete; no Flower budget")
    parser.add_argument("--no-flower", action="store_true", help="run ours only")
    parser.add_argument("--flower-budget", type=float, default=600.0,
                        help="do not run (or stop) a Flower configuration estimated to take (or taking) longer than "
                             "this many seconds; reported as a 'not run' row (default 600; none with --quick)")
    args = parser.parse_args()
    try:
        rows = _measure(args)
    except PeerFailed as err:
        print(f"bench/secagg.py: Flower failed, no results written: {err}", file=sys.stderr)
        return 1
    print()
    print(_table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2, default=str, allow_nan=False) + "\n")
    return 0


def _measure(args: argparse.Namespace) -> list[Row]:
    flower_python = None if args.no_flower else _flower_python()
    budget = None if args.quick else args.flower_budget
    rows: list[Row] = []
    for cfg in configurations(args.quick):
        row = run_fedcrm(cfg)
        if cfg.n >= 1000:  # the memory target: a second, traced run (tracing slows allocation)
            traced = run_fedcrm(cfg, trace_memory=True)
            row.peak_server_mb = traced.peak_server_mb
            row.note = (f"server peak {traced.peak_server_mb:.1f} MB vs 3 x n_active x d x 4 B = "
                        f"{3 * cfg.n * (1 - cfg.dropout) * cfg.d * 4 / 2**20:.0f} MB")
        rows.append(row)
        print(f"fedcrm  {cfg.label():45} client {row.client_s:.4f}s server {row.server_s:.3f}s", flush=True)
        if flower_python is None:
            continue
        estimate = None if budget is None else _estimate(rows, cfg)
        if budget is not None and estimate is not None and estimate > budget:
            why = (f"a smaller run of this shape was already over the {budget:.0f}s budget"
                   if math.isinf(estimate) else f"estimated {estimate:.0f}s > budget {budget:.0f}s")
            row = _not_run(cfg, _flower_shape(cfg)[1], why)
        else:
            row = run_flower(cfg, flower_python, timeout=budget)
        rows.append(row)
        if row.measured:
            print(f"flower  {cfg.label():45} client {row.client_s:.4f}s server {row.server_s:.3f}s", flush=True)
        else:
            print(f"flower  {cfg.label():45} {row.note}", flush=True)
    return rows


if __name__ == "__main__":
    sys.exit(main())
