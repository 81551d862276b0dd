"""A local federation under load: 100 participants, secure aggregation with client-level DP, 10 % dropping each round.

Three protocols run the same rounds side by side, alternating round by round
(the order rotates each round), each with its own aggregator process:

* ``new`` -- the protocol of :mod:`fedcrm.secagg` as it is: signed keys,
  certificate and signature checks by every participant, the consistency
  check (every survivor signs the survivor set; unmasking needs t signatures).
* ``checks-off`` -- the same code with the participants' checks switched off
  the way ``tests/test_secagg_deviating_aggregator.py`` stands for the old
  behaviour (its ``TrustingVerifier``: no certificate or signature is
  verified). Keys and survivor sets are still signed and the consistency
  stage still runs: this isolates the cost of *verifying*.
* ``v1`` -- the protocol before it held against a deviating aggregator: the
  ``fedcrm.secagg`` package of revision LEGACY_REV (the parent of bbc1811),
  loaded from ``git archive`` into the ``v1`` aggregator process in place of
  today's: no signatures, four stages, no consistency check. New against v1
  is the whole cost of the consistency check and the signed keys.

What is a process and what is not: each protocol's aggregator is one OS
process (``bench/load.py --serve``) that runs the real
:class:`~fedcrm.secagg.server.SecAggServer` state machine; its participants
are real :class:`~fedcrm.secagg.client.SecAggClient` objects, not processes,
spread over ``--workers`` worker processes forked from that aggregator (two
by default: the machine has two cores). Every message between a participant
and the aggregator crosses a pipe between processes, one message per
participant and stage, pickled (the byte counts are those pickles, a proxy
for the wire); the aggregator adds each masked vector to its running sum as it
arrives. Each participant keeps its own signing key and its own certificate
verifier (and its cache) from round to round, as a node does.

The model is a random update vector of --dim float64 values per participant
and round (100,000 by default; seeded by round and participant), not a trained
network. Client-level DP as ``mode: client`` runs it on a participant
(:func:`fedcrm.privacy.plans.client_noise` from a Federation manifest with
epsilon 8, delta 1e-5, clipping norm 1, secure aggregation threshold 0.6,
logarithmic neighbours, 32 bits): clip to L2 norm 1, discretise, add this
participant's share of discrete Gaussian noise, then
``client_dp_fit_quantizer`` / ``client_dp_fit_vector`` (vector length d + 2).

Dropouts: every round, 10 % of the participants (--dropout) chosen at random
(seeded by round, the same for the three protocols) stop at one of the
harness's stages (``tests/secagg_harness.py``: never connect, after
advertising keys, after sharing keys, after the masked input, or their unmask
reply is lost), spread evenly over the stages, so both unmasking paths (a
survivor's self mask, a dropped participant's mask key) run. Every round must
complete: the bench asserts that the unmasked sum equals, exactly, the sum
modulo 2^bits of the quantized noised inputs of the participants whose masked
input arrived (each worker also reports that partial sum on a side channel
that is not counted), and that the decoded participant count equals them.

    python bench/load.py --json OUT.json [--quick] [--rounds R] [--participants N] [--dim D]

prints a table (ratios new / checks-off and new / v1) and writes
{config, what_is_a_process, results: {protocol: summary}, ratios, rounds: [...]}.
Times are medians over rounds; the aggregator's peak RSS is its VmHWM over
the rounds (reset after set-up: CA, certificates, worker start).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the secure-aggregation harness and the tests' switch for the old behaviour

LEGACY_REV = "169697fb733ca770fbbabc70ba2aaba96fcfed63"  # bbc1811^: secure aggregation before signed keys
PROTOCOLS = ("new", "checks-off", "v1")
FEDERATION = "bench/load"
EPSILON, DELTA, CLIP, THRESHOLD, BITS = 8.0, 1e-5, 1.0, 0.6, 32
WHAT_IS_A_PROCESS = (
    "one OS process per protocol for the aggregator (the SecAggServer state machine, measured); the participants "
    "are SecAggClient objects, not processes, spread over W worker processes forked from their aggregator; every "
    "participant message crosses a pipe between processes, pickled; the driver process only sequences rounds"
)


@dataclass(frozen=True)
class Config:
    participants: int
    dim: int
    rounds: int
    dropout: float
    workers: int
    seed: int


def manifest(cfg: Config) -> dict[str, Any]:
    """The Federation these participants consented to: client-level DP under secure aggregation."""
    return {
        "apiVersion": "fedcrm.io/v1alpha1",
        "kind": "Federation",
        "metadata": {"name": "load", "namespace": "fedcrm-system"},
        "spec": {
            "task": {"target": "converted", "features": [{"name": "revenue", "type": "numeric"}]},
            "training": {"rounds": cfg.rounds, "minParticipants": 2, "roundTimeoutSeconds": 600},
            "participants": {"namespaces": [f"tenant-{i:03d}" for i in range(cfg.participants)]},
            "privacy": {
                "differentialPrivacy": {"mode": "client", "epsilon": EPSILON, "delta": DELTA, "clippingNorm": CLIP,
                                        "acceptNoisyPlan": True},  # measures speed, not utility
                "secureAggregation": {"enabled": True, "threshold": THRESHOLD, "neighbours": "logarithmic",
                                      "bits": BITS},
            },
        },
    }


# --- the driver --------------------------------------------------------------------------------------------------


def drop_plan(cfg: Config, round_: int) -> dict[int, str]:
    """Who stops where this round: a seeded random choice, spread evenly over the harness's stages."""
    import numpy as np
    import secagg_harness as harness

    rng = np.random.default_rng([cfg.seed, round_])
    chosen = rng.choice(cfg.participants, size=int(round(cfg.dropout * cfg.participants)), replace=False)
    stages = harness.DROP_STAGES
    return {int(cid): stages[(i + round_) % len(stages)] for i, cid in enumerate(chosen)}


class Aggregator:
    """One protocol's aggregator process, driven a round at a time over its stdin/stdout (JSON lines)."""

    def __init__(self, protocol: str, cfg: Config, legacy: Path | None) -> None:
        argv = [sys.executable, str(Path(__file__).resolve()), "--serve", protocol, "--config", json.dumps(cfg.__dict__)]
        if legacy is not None:
            argv += ["--legacy-src", str(legacy)]
        self.protocol = protocol
        # A process group of its own: the aggregator forks workers, and a worker left behind would hold the
        # caller's stderr open (a test capturing it would wait forever).
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
                                     start_new_session=True)
        try:
            self.ready = self._read()
        except BaseException:
            self.kill()
            raise

    def kill(self) -> None:
        """Stop the aggregator and everything it forked."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.protocol} aggregator exited with {self.proc.wait()} (its stderr is above)")
        return json.loads(line)

    def ask(self, command: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> dict[str, Any]:
        out = self.ask({"stop": True})
        self.proc.wait(timeout=60)
        return out


def legacy_source(into: Path) -> tuple[Path | None, str]:
    """``src/fedcrm/secagg`` of LEGACY_REV, extracted from this repository's history; (None, why) where the
    history is not there (a shallow clone, an exported tree): the run then compares new with checks-off only."""
    try:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", LEGACY_REV, "src/fedcrm/secagg"],
                                 capture_output=True, check=False)
    except FileNotFoundError:
        return None, "git is not installed"
    if archive.returncode != 0:
        return None, (f"git archive {LEGACY_REV} failed, so this checkout lacks the history that holds the old "
                      f"protocol (a shallow clone?): {archive.stderr.decode().strip()[-300:]}")
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into / "src" / "fedcrm" / "secagg", ""


def run(cfg: Config) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fedcrm-load-") as tmp:
        legacy, missing = legacy_source(Path(tmp))
        protocols = PROTOCOLS if legacy is not None else tuple(p for p in PROTOCOLS if p != "v1")
        if legacy is None:
            print(f"v1 left out: {missing}", file=sys.stderr, flush=True)
        aggregators = {}
        try:
            for p in protocols:  # one after the other: set-up (certificates, fork) is not measured
                aggregators[p] = Aggregator(p, cfg, legacy if p == "v1" else None)
                print(f"{p:10} aggregator ready: RSS {aggregators[p].ready['rss_mib']:.1f} MiB", file=sys.stderr,
                      flush=True)
            import secagg_harness as harness

            rounds: list[dict[str, Any]] = []
            for r in range(1, cfg.rounds + 1):
                plan = drop_plan(cfg, r)
                k = (r - 1) % len(protocols)
                order = protocols[k:] + protocols[:k]
                for p in order:
                    out = aggregators[p].ask({"round": r, "drop": {str(c): s for c, s in plan.items()},
                                             "stages": list(harness.DROP_STAGES)})
                    rounds.append({"protocol": p, **out})
                    print(f"round {r:3} {p:10} {out['wall_s']:7.2f} s  survivors {out['survivors']:4}  "
                          f"complete {out['complete']}  peak RSS {out['peak_rss_mib']:.1f} MiB", file=sys.stderr,
                          flush=True)
            finals = {p: a.close() for p, a in aggregators.items()}
        finally:
            for a in aggregators.values():
                a.kill()
    out = summarise(cfg, rounds, finals, {p: a.ready for p, a in aggregators.items()})
    if legacy is None:
        out["unavailable"] = {"v1": missing}
    return out


def summarise(cfg: Config, rounds: list[dict[str, Any]], finals: dict[str, Any], ready: dict[str, Any]) -> dict[str, Any]:
    results = {}
    for p in (p for p in PROTOCOLS if p in ready):
        mine = [r for r in rounds if r["protocol"] == p]
        med = {k: statistics.median(r[k] for r in mine) for k in
               ("wall_s", "secagg_s", "server_cpu_s", "client_cpu_s", "dp_cpu_s", "bytes_up", "bytes_down")}
        stages = {s: statistics.median(r["stages_s"].get(s, 0.0) for r in mine) for s in mine[0]["stages_s"]}
        results[p] = {
            "rounds": len(mine),
            "rounds_complete": sum(r["complete"] for r in mine),
            "round_s": med["wall_s"],
            "round_s_max": max(r["wall_s"] for r in mine),
            "round_1_s": mine[0]["wall_s"],
            "secagg_s": med["secagg_s"],
            "secagg_s_max": max(r["secagg_s"] for r in mine),
            "aggregator_cpu_s": med["server_cpu_s"],
            "client_cpu_s_per_participant": med["client_cpu_s"],
            "dp_cpu_s_per_participant": med["dp_cpu_s"],
            "stage_s": stages,
            "aggregator_rss_before_mib": ready[p]["rss_mib"],
            "aggregator_peak_rss_mib": finals[p]["peak_rss_mib"],
            "aggregator_rss_rise_mib": finals[p]["peak_rss_mib"] - ready[p]["rss_mib"],
            "bytes_up_per_round": med["bytes_up"],
            "bytes_down_per_round": med["bytes_down"],
            "survivors_min": min(r["survivors"] for r in mine),
            "stopped_per_round": statistics.median(r["stopped"] for r in mine),
        }
    ratios = {}
    for base in (b for b in ("checks-off", "v1") if b in results):
        n, b = results["new"], results[base]
        ratios[f"new/{base}"] = {
            "round_s": n["round_s"] / b["round_s"],
            "secagg_s": n["secagg_s"] / b["secagg_s"],
            "aggregator_cpu_s": n["aggregator_cpu_s"] / b["aggregator_cpu_s"],
            "client_cpu_s": n["client_cpu_s_per_participant"] / b["client_cpu_s_per_participant"],
            "aggregator_peak_rss": n["aggregator_peak_rss_mib"] / b["aggregator_peak_rss_mib"],
            "aggregator_rss_rise": n["aggregator_rss_rise_mib"] / b["aggregator_rss_rise_mib"],
            "bytes": (n["bytes_up_per_round"] + n["bytes_down_per_round"])
                     / (b["bytes_up_per_round"] + b["bytes_down_per_round"]),
        }
    return {"config": {**cfg.__dict__, "epsilon": EPSILON, "delta": DELTA, "clipping_norm": CLIP,
                       "threshold": THRESHOLD, "neighbours": "logarithmic", "bits": BITS, "legacy_rev": LEGACY_REV,
                       "model": f"a random update vector of {cfg.dim:,} float64 values per participant and round",
                       "neighbourhood": ready["new"]["neighbourhood"]},
            "what_is_a_process": WHAT_IS_A_PROCESS.replace("W worker", f"{cfg.workers} worker"),
            "results": results, "ratios": ratios, "rounds": rounds}


def table(out: dict[str, Any]) -> str:
    c = out["config"]
    lines = [f"n={c['participants']} d={c['dim']:,} rounds={c['rounds']} dropout={c['dropout']:.0%} "
             f"k={c['neighbourhood']['k']} t={c['neighbourhood']['t']} workers={c['workers']} "
             f"(client DP: epsilon {c['epsilon']:g}, delta {c['delta']:g}); medians over rounds",
             f"{'protocol':10} {'complete':>8} {'round s':>7} {'max s':>6} {'secagg s':>8} {'consist s':>9} "
             f"{'agg CPU s':>9} {'client s':>8} {'RSS MiB':>7} {'peak MiB':>8} {'rise MiB':>8} {'MB/round':>8}"]
    for p, r in out["results"].items():
        lines.append(f"{p:10} {r['rounds_complete']:>4}/{r['rounds']:<3} {r['round_s']:>7.2f} {r['round_s_max']:>6.2f} "
                     f"{r['secagg_s']:>8.3f} {r['stage_s'].get('consistency', 0.0):>9.3f} "
                     f"{r['aggregator_cpu_s']:>9.3f} {r['client_cpu_s_per_participant']:>8.4f} "
                     f"{r['aggregator_rss_before_mib']:>7.1f} {r['aggregator_peak_rss_mib']:>8.1f} "
                     f"{r['aggregator_rss_rise_mib']:>8.1f} "
                     f"{(r['bytes_up_per_round'] + r['bytes_down_per_round']) / 1e6:>8.2f}")
    lines.append(f"{'ratio':16} {'round':>7} {'secagg':>7} {'agg CPU':>7} {'client':>7} {'peak RSS':>8} "
                 f"{'RSS rise':>8} {'bytes':>7}")
    for name, q in out["ratios"].items():
        lines.append(f"{name:16} {q['round_s']:>7.3f} {q['secagg_s']:>7.3f} {q['aggregator_cpu_s']:>7.3f} "
                     f"{q['client_cpu_s']:>7.3f} {q['aggregator_peak_rss']:>8.3f} {q['aggregator_rss_rise']:>8.3f} "
                     f"{q['bytes']:>7.3f}")
    return "\n".join(lines)


# --- one protocol's aggregator process, and its workers --------------------------------------------------------------


def _status(field: str) -> float:
    """VmRSS or VmHWM of this process, MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: reset VmHWM to the current RSS


def _use_legacy(src: Path) -> None:
    """Import ``fedcrm.secagg`` from ``src`` (the old protocol) instead of today's; before anything imports it."""
    import importlib.util

    import fedcrm

    assert not any(m.startswith("fedcrm.secagg") for m in sys.modules), "fedcrm.secagg was imported too early"
    spec = importlib.util.spec_from_file_location("fedcrm.secagg", src / "__init__.py",
                                                  submodule_search_locations=[str(src)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fedcrm.secagg"] = module
    spec.loader.exec_module(module)
    fedcrm.secagg = module  # type: ignore[attr-defined]
    # Today's training code imports these when it loads; the old package predates them. They play no part in the
    # old protocol measured here (client-level DP sums never quantize with log2_ceil, nor sparsify).
    import importlib

    quantization = importlib.import_module("fedcrm.secagg.quantization")
    if not hasattr(quantization, "log2_ceil"):
        quantization.log2_ceil = lambda n: (n - 1).bit_length()  # type: ignore[attr-defined]
    if not (src / "sparsification.py").exists():
        today = Path(fedcrm.__file__).parent / "secagg" / "sparsification.py"
        extra = importlib.util.spec_from_file_location("fedcrm.secagg.sparsification", today)
        assert extra is not None and extra.loader is not None
        sparsification = importlib.util.module_from_spec(extra)
        sys.modules["fedcrm.secagg.sparsification"] = sparsification
        extra.loader.exec_module(sparsification)
        module.sparsification = sparsification  # type: ignore[attr-defined]


class Federation:
    """What the aggregator and its participants share: configuration, member list, DP mechanism, credentials."""

    def __init__(self, protocol: str, cfg: Config) -> None:
        from fedcrm.privacy.plans import client_noise
        from fedcrm.secagg.params import SecAggParams
        from fedcrm.spec import parse_manifest
        from fedcrm.spec.manifests import Federation as FederationManifest
        from fedcrm.training.secure_vectors import client_dp_fit_quantizer

        self.protocol, self.cfg = protocol, cfg
        spec = parse_manifest(manifest(cfg), FederationManifest, "bench/load").spec
        self.noise = client_noise(spec, participants=cfg.participants, dimension=cfg.dim)
        self.quantizer = client_dp_fit_quantizer(self.noise)
        self.length = self.quantizer.size
        self.params = SecAggParams(threshold=THRESHOLD, neighbours="logarithmic", bits=BITS)
        self.ids = list(range(cfg.participants))
        self.members: dict[int, str] = {}
        if protocol != "v1":  # certificates from one federation CA, issued before the workers fork (not measured)
            import secagg_harness as harness

            self.members = {cid: harness.identity_of(cid) for cid in self.ids}
            for identity in self.members.values():
                harness.signer_for(identity)
            harness.federation_ca()


class Participants:
    """The participants one worker process runs: their clients this round, their updates, their verifiers."""

    def __init__(self, fed: Federation, ids: list[int]) -> None:
        self.fed, self.ids = fed, ids
        self.verifiers: dict[int, Any] = {}
        if fed.protocol == "new":
            from fedcrm.secagg.signing import PeerVerifier

            import secagg_harness as harness

            self.verifiers = {cid: PeerVerifier(harness.federation_ca().cert_pem) for cid in ids}
        elif fed.protocol == "checks-off":
            from test_secagg_deviating_aggregator import TrustingVerifier

            trusting = TrustingVerifier()
            self.verifiers = dict.fromkeys(ids, trusting)
        self.clients: dict[int, Any] = {}
        self.inputs: dict[int, Any] = {}
        self.drop: dict[int, str] = {}
        self.stages: list[str] = []

    def alive_after(self, cid: int, stage: str) -> bool:
        stop = self.drop.get(cid)
        return stop is None or self.stages.index(stop) > self.stages.index(stage)

    def train(self, round_: int, drop: dict[int, str], stages: list[str]) -> None:
        """Each participant that connects this round: a random update, clipped, discretised and noised, quantized."""
        import numpy as np

        from fedcrm.training.secure_vectors import client_dp_fit_vector

        fed = self.fed
        self.drop, self.stages, self.clients, self.inputs = drop, stages, {}, {}
        for cid in self.ids:
            if self.alive_after(cid, "never"):
                delta = np.random.default_rng([fed.cfg.seed, round_, cid]).normal(0.0, 0.01, fed.cfg.dim)
                noised = fed.noise.privatize(delta)  # clip to the norm, discretise, this participant's share of noise
                self.inputs[cid] = fed.quantizer.quantize(client_dp_fit_vector(noised, loss_mean=0.5))

    def advertise(self, round_: int, seed: bytes) -> dict[int, Any]:
        """A fresh secure-aggregation client per participant that connects, and its advertised keys."""
        from fedcrm.secagg.client import SecAggClient

        fed = self.fed
        keys = {}
        for cid in self.inputs:
            if fed.protocol == "v1":
                client = SecAggClient(client_id=cid, round_id=round_, params=fed.params, vector_length=fed.length)
            else:
                import secagg_harness as harness

                client = SecAggClient(client_id=cid, round_id=round_, params=fed.params, vector_length=fed.length,
                                      signer=harness.signer_for(fed.members[cid]), verifier=self.verifiers[cid],
                                      members=fed.members, public_seed=seed)
            self.clients[cid] = client
            keys[cid] = client.advertise_keys()
        return keys


def _worker(conn: Any, fed: Federation, ids: list[int]) -> None:
    """A worker process's loop: one command per stage, one pickled message back per participant that answers."""
    import numpy as np

    from fedcrm.secagg.quantization import vector_dtype

    part = Participants(fed, ids)
    while True:
        command, payload = conn.recv()
        if command == "stop":
            return
        cpu0 = time.process_time()
        extra: dict[str, Any] = {}
        if command == "train":
            part.train(payload["round"], payload["drop"], payload["stages"])
        elif command == "advertise":
            for cid, k in part.advertise(payload["round"], payload["seed"]).items():
                conn.send_bytes(pickle.dumps(("msg", cid, k)))
        elif command == "share":
            for cid, request in payload.items():
                if part.alive_after(cid, "after_advertise"):
                    if fed.protocol == "v1":
                        roster, neighbours = request
                        out = part.clients[cid].share_keys(roster, neighbours)
                    else:
                        out = part.clients[cid].share_keys(request)
                    conn.send_bytes(pickle.dumps(("msg", cid, out)))
        elif command == "masked":
            partial = np.zeros(fed.length, dtype=np.uint64)
            for cid, inbox in payload.items():
                if part.alive_after(cid, "after_share_keys"):
                    masked = part.clients[cid].masked_input(inbox, part.inputs[cid])
                    partial += part.inputs[cid]
                    conn.send_bytes(pickle.dumps(("msg", cid, masked)))
            extra["partial"] = (partial & np.uint64(2**BITS - 1)).astype(vector_dtype(BITS))  # not counted
        elif command == "sign":
            for cid, survivors in payload.items():
                if part.alive_after(cid, "after_masked_input"):
                    conn.send_bytes(pickle.dumps(("msg", cid, part.clients[cid].sign_survivors(survivors))))
        elif command == "unmask":
            for cid, request in payload.items():
                if not part.alive_after(cid, "after_masked_input"):
                    continue
                client = part.clients[cid]
                if fed.protocol == "v1":
                    dropped, survivors = request
                    reply = client.unmask(dropped=dropped, survivors=survivors)
                else:
                    reply = client.unmask(survivors=request.survivors, signatures=request.signatures)
                if part.alive_after(cid, "during_unmask"):  # else: computed, but the reply never arrives
                    conn.send_bytes(pickle.dumps(("msg", cid, reply)))
        conn.send_bytes(pickle.dumps(("done", None, {"cpu_s": time.process_time() - cpu0, **extra})))


class Server:
    """The aggregator process: the real SecAggServer per round, talking to the worker processes."""

    def __init__(self, fed: Federation) -> None:
        import multiprocessing

        self.fed = fed
        ctx = multiprocessing.get_context("fork")  # workers inherit the federation CA and participants' keys
        n, w = fed.cfg.participants, fed.cfg.workers
        self.slices = [fed.ids[i::w] for i in range(w)]
        self.owner = {cid: i for i, ids in enumerate(self.slices) for cid in ids}
        self.conns, self.procs = [], []
        for ids in self.slices:
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(theirs, fed, ids), daemon=True)
            proc.start()
            theirs.close()
            self.conns.append(mine)
            self.procs.append(proc)
        self.server_cpu = 0.0
        self.bytes_up = self.bytes_down = 0
        self.client_cpu = 0.0
        self.extras: list[dict[str, Any]] = []
        assert n >= 2 * w

    def call(self, fn: Any, *args: Any) -> Any:
        """A call into the server state machine, its CPU time counted as the aggregator's."""
        t0 = time.process_time()
        out = fn(*args)
        self.server_cpu += time.process_time() - t0
        return out

    def stage(self, command: str, per_cid: dict[int, Any] | None = None, common: Any = None) -> Any:
        """Send ``command`` to every worker (``per_cid`` split by owner) and yield ``(cid, obj)`` as answers arrive."""
        from multiprocessing.connection import wait

        parts: list[Any] = [common] * len(self.conns) if per_cid is None else [{} for _ in self.conns]
        if per_cid is not None:
            for cid, obj in per_cid.items():
                parts[self.owner[cid]][cid] = obj
                self.bytes_down += len(pickle.dumps(obj))
        for conn, part in zip(self.conns, parts):
            conn.send((command, part))
        self.extras = []
        pending = set(range(len(self.conns)))
        while pending:
            for conn in wait([self.conns[i] for i in pending]):
                raw = conn.recv_bytes()  # type: ignore[union-attr]
                kind, cid, obj = pickle.loads(raw)
                if kind == "done":
                    pending.discard(self.conns.index(conn))
                    self.client_cpu += obj["cpu_s"]
                    self.extras.append(obj)
                else:
                    self.bytes_up += len(raw)
                    yield cid, obj

    def round(self, round_: int, drop: dict[int, str], stages: list[str]) -> dict[str, Any]:
        import numpy as np

        from fedcrm.secagg.server import SecAggServer

        fed, v1 = self.fed, self.fed.protocol == "v1"
        self.server_cpu = self.client_cpu = 0.0
        self.bytes_up = self.bytes_down = 0
        timings: dict[str, float] = {}
        start = mark = time.perf_counter()

        def lap(name: str) -> None:
            nonlocal mark
            now = time.perf_counter()
            timings[name] = now - mark
            mark = now

        for _ in self.stage("train", common={"round": round_, "drop": drop, "stages": stages}):
            pass
        dp_cpu = self.client_cpu
        lap("train")
        if v1:
            server = self.call(lambda: SecAggServer(round_id=round_, params=fed.params, client_ids=fed.ids,
                                                    vector_length=fed.length))
            seed = b""
        else:
            from fedcrm.secagg.graph import public_seed

            seed = public_seed(FEDERATION, round_, 1, fed.members)
            server = self.call(lambda: SecAggServer(round_id=round_, params=fed.params, client_ids=fed.ids,
                                                    vector_length=fed.length, public_seed=seed))
        advertised = []
        for cid, keys in self.stage("advertise", common={"round": round_, "seed": seed}):
            self.call(server.receive_keys, cid, keys)
            advertised.append(cid)
        self.call(server.close_advertise)
        lap("advertise")
        rosters = {cid: ((self.call(server.roster_for, cid), self.call(server.neighbours_of, cid)) if v1
                         else self.call(server.roster_for, cid)) for cid in advertised}
        shared = []
        for cid, cts in self.stage("share", rosters):
            self.call(server.receive_shares, cid, cts)
            shared.append(cid)
        self.call(server.close_share_keys)
        lap("share_keys")
        for cid, masked in self.stage("masked", {cid: self.call(server.inbox_for, cid) for cid in shared}):
            self.call(server.receive_masked, cid, masked)
        partials = [e["partial"] for e in self.extras]
        dropped, survivors = self.call(server.close_masked_input)
        lap("masked_input")
        if not v1:
            survivor_set = self.call(server.consistency_request)
            for cid, signature in self.stage("sign", dict.fromkeys(survivors, survivor_set)):
                self.call(server.receive_signature, cid, signature)
            self.call(server.close_consistency)
            lap("consistency")
            asked = self.call(lambda: list(server.signers))
        else:
            asked = list(survivors)
        for cid, reply in self.stage("unmask", {cid: self.call(server.unmask_request_for, cid) for cid in asked}):
            self.call(server.receive_unmask, cid, reply)
        total = self.call(server.finish)
        decoded = self.call(fed.quantizer.dequantize, total)
        lap("unmask")
        wall = time.perf_counter() - start
        expected = np.zeros(fed.length, dtype=np.uint64)
        for p in partials:
            expected += p
        expected &= np.uint64(2**BITS - 1)
        exact = bool(np.array_equal(total.astype(np.uint64), expected))
        counted = int(round(float(decoded[fed.cfg.dim])))
        if not exact or counted != len(survivors):
            raise AssertionError(f"round {round_}: the unmasked sum is not the survivors' sum (exact {exact}, "
                                 f"participants decoded {counted}, survivors {len(survivors)})")
        live = len(advertised)
        return {"round": round_, "complete": True, "wall_s": wall, "secagg_s": wall - timings["train"],
                "stages_s": timings,
                "server_cpu_s": self.server_cpu, "client_cpu_s": (self.client_cpu - dp_cpu) / live,
                "dp_cpu_s": dp_cpu / live, "bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
                "advertised": live, "survivors": len(survivors), "stopped": len(drop),
                "stopped_at": {stage: sum(1 for s in drop.values() if s == stage) for stage in stages},
                "peak_rss_mib": _status("VmHWM"), "rss_mib": _status("VmRSS")}

    def stop(self) -> None:
        for conn in self.conns:
            conn.send(("stop", None))
        for proc in self.procs:
            proc.join(timeout=30)


def serve(protocol: str, cfg: Config, legacy: Path | None) -> int:
    """One protocol's aggregator: set up, print a ready line, then answer one JSON line per command."""
    if protocol == "v1":
        assert legacy is not None
        _use_legacy(legacy)
    fed = Federation(protocol, cfg)
    server = Server(fed)
    k = fed.params.neighbour_count(cfg.participants)
    ready = {"rss_mib": _status("VmRSS"), "neighbourhood": {"k": k, "t": fed.params.shares_needed(k)},
             "survivors_min_for_noise": fed.noise.survivors_min}
    _reset_peak()
    print(json.dumps(ready), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        if command.get("stop"):
            server.stop()
            print(json.dumps({"peak_rss_mib": _status("VmHWM")}), flush=True)
            return 0
        drop = {int(c): stage for c, stage in command["drop"].items()}
        print(json.dumps(server.round(command["round"], drop, command["stages"])), flush=True)
    server.stop()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--quick", action="store_true", help="a smoke test: 20 participants, d=10,000, 5 rounds")
    parser.add_argument("--participants", type=int, default=100)
    parser.add_argument("--dim", type=int, default=100_000, help="parameters in the update vector")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--workers", type=int, default=2, help="worker processes per aggregator for the participants")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--serve", choices=PROTOCOLS, help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--legacy-src", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve(args.serve, Config(**json.loads(args.config)), args.legacy_src)
    if args.quick:
        cfg = Config(participants=20, dim=10_000, rounds=5, dropout=args.dropout, workers=2, seed=args.seed)
    else:
        cfg = Config(args.participants, args.dim, args.rounds, args.dropout, args.workers, args.seed)
    out = run(cfg)
    print()
    print(table(out))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2, allow_nan=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
