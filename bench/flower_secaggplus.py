"""One round of Flower's own SecAgg+ (the ``flwr`` package), run in one process, for bench/secagg.py.

Runs in its own virtual environment ``.venv-bench`` (``make bench-secagg``
creates it from bench/requirements-flower.txt): flwr 1.42.0 requires
protobuf < 7 and cryptography >= 50, which our pinned stubs and dependencies
(protobuf 7.36, cryptography 48) do not allow, so bench/secagg.py calls this
file as a subprocess and reads the one JSON line it prints.

Nothing of Flower's protocol is re-implemented here; no gRPC, SuperLink,
SuperNode or simulation runtime is started:

* Server: the four stage methods of Flower's ``SecAggPlusWorkflow``
  (``setup_stage``, ``share_keys_stage``, ``collect_masked_vectors_stage``,
  ``unmask_stage``) are called in turn, exactly as ``SecAggPlusWorkflow.__call__``
  does, on a ``WorkflowState`` and a ``LegacyContext`` (FedAvg sampling every
  registered node, one ``GridClientProxy`` per node, Flower's default clipping
  range 8.0, quantization range 2**22, modulus 2**32, max_weight 1000). The
  ``Grid`` they talk to is the in-process ``_LoopbackGrid`` below: its
  ``send_and_receive`` copies each instruction (``copy.deepcopy`` stands in for
  the wire, so nothing is shared between the two sides), hands it to that
  node's client, and copies the reply back. A node that has dropped out
  sends no reply, which is what the workflow sees when a node times out.
* Client: each node runs Flower's client mod ``secaggplus_mod`` itself (state
  kept in the node's ``Context.state`` as Flower keeps it, stage checks,
  ``_setup`` / ``_share_keys`` / ``_collect_masked_vectors`` / ``_unmask``).
  Its ``call_next`` is a stand-in ClientApp that returns the node's update as
  a legacy ``FitRes`` (``fitres_to_recorddict``); its time is not the mod's.

So the computation is Flower's: key generation and ECDH key agreement, Fernet
encryption of the shares, Shamir ``create_shares`` / ``combine_shares``
(pycryptodome), stochastic ``quantize`` with the clipping and target ranges,
``pseudo_rand_gen`` masks, the workflow's ring of ``num_shares`` neighbours
over shuffled node ids, summation mod 2**32, mask removal for the survivors'
seeds and the dropped nodes' pairwise masks, ``factor_extract`` and
``dequantize``.

Timing (``time.perf_counter``; transport copies are never counted):

* ``client_s``: per surviving client, the wall time of its four
  ``secaggplus_mod`` calls minus the time spent in its ClientApp, averaged.
  ``client_fn_s`` is the same restricted to the mod's stage functions.
* ``server_s``: the wall time of the four workflow stage methods minus the
  time spent inside ``grid.send_and_receive`` (delivery and all client work)
  and minus ``strategy.aggregate_fit``. The latter is Flower's legacy
  compatibility step after secure aggregation (FedAvg over n copies of the
  already aggregated vector); it is replaced by a capture of the workflow's
  result, not run. ``server_stage_s`` breaks ``server_s`` down by stage.
* ``upload_bytes``: mean over survivors of the masked vector a client sends
  in the collect-masked-vectors stage, as Flower serializes it (the
  ``masked_params`` list of ``ndarray_to_bytes`` blobs: the int64 weight
  factor and the int64 masked vector).

Dropout: after the share-keys stage, ``round(dropout * n)`` nodes (chosen at
random among those whose loss leaves every node with at least ``threshold``
live holders of its shares, the workflow's own ``_check_threshold`` rule)
stop answering, so the workflow's dropout recovery path runs.

Correctness: each client weights its update by ``num_examples = max_weight``
(so Flower quantizes at full resolution) and Flower returns the weighted
mean. Each survivor's stochastic quantization is replayed outside the timers
(``np.random`` is seeded per node before delivery), the exact integer sum mod
2**32 is pushed through the workflow's dequantization, and ``exact`` says
whether Flower's unmasked result equals it bit for bit; ``max_error`` is the
distance to the plain float mean of the survivors' inputs and must stay within
two quantization steps. ``correct`` is both.

    .venv-bench/bin/python bench/flower_secaggplus.py --n 50 --d 100000 --dropout 0.1 --neighbours 3 --threshold 2
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import logging
import random
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

import flwr
import flwr.compat.common.recorddict_compat as compat
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import Code, FitRes, Parameters, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.ndarrays_arithmetic import factor_combine, factor_extract, parameters_multiply
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import SecAggPlusWorkflow, WorkflowState
from flwr.supercore.task_identity import TaskIdentity

# The package re-exports the function under the module's name, so take the module from sys.modules.
_MOD = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
_STAGE_FUNCTIONS = ("_setup", "_share_keys", "_collect_masked_vectors", "_unmask")
_WORKFLOW_STAGES = ("setup_stage", "share_keys_stage", "collect_masked_vectors_stage", "unmask_stage")

# SecAggPlusWorkflow's defaults (read from the class so a Flower change shows up here).
_DEFAULTS = SecAggPlusWorkflow(3, 2)
CLIPPING_RANGE = _DEFAULTS.clipping_range
QUANTIZATION_RANGE = _DEFAULTS.quantization_range
MODULUS_RANGE = _DEFAULTS.modulus_range
MAX_WEIGHT = _DEFAULTS.max_weight
NUM_EXAMPLES = int(MAX_WEIGHT)  # every client's weight; q_ratio = quantization range, i.e. full resolution


class _Clock:
    """Accumulates perf_counter time, per key."""

    def __init__(self) -> None:
        self.total: dict[Any, float] = {}

    def add(self, key: Any, seconds: float) -> None:
        self.total[key] = self.total.get(key, 0.0) + seconds


class _CaptureFedAvg(FedAvg):
    """FedAvg sampling every node; ``aggregate_fit`` only records the workflow's aggregate (and its time)."""

    def __init__(self, n: int) -> None:
        super().__init__(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=n, min_evaluate_clients=0,
                         min_available_clients=n)
        self.aggregate: Parameters | None = None
        self.seconds = 0.0

    def aggregate_fit(self, server_round, results, failures):  # type: ignore[no-untyped-def, override]
        t = time.perf_counter()
        self.aggregate = results[0][1].parameters if results else None  # the workflow set every result to it
        self.seconds += time.perf_counter() - t
        return self.aggregate, {}


class _LoopbackGrid:
    """The part of Flower's ``Grid`` the workflow uses, delivering to in-process clients.

    Every instruction is deep-copied on the way in and every reply on the way
    out, standing in for serialization on the wire. Nodes in ``dropped`` never
    reply. Everything done inside ``send_and_receive`` is counted in
    ``seconds`` so it can be taken out of the server's time.
    """

    def __init__(self, nodes: dict[int, _ClientNode], progress: bool) -> None:
        self.nodes = nodes
        self.dropped: set[int] = set()
        self.seconds = 0.0
        self.progress = progress
        self.t0 = time.perf_counter()

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        t = time.perf_counter()
        messages = list(messages)
        replies = []
        for i, msg in enumerate(messages, 1):
            nid = msg.metadata.dst_node_id
            if nid in self.dropped:
                continue
            reply = self.nodes[nid].handle(copy.deepcopy(msg))
            replies.append(copy.deepcopy(reply))
            if self.progress and (i % max(1, len(messages) // 10) == 0 or i == len(messages)):
                _log(f"  delivered {i}/{len(messages)} ({time.perf_counter() - self.t0:.1f}s)")
        self.seconds += time.perf_counter() - t
        return replies


class _ClientNode:
    """One SuperNode: Flower's ``secaggplus_mod`` in front of a stand-in ClientApp."""

    def __init__(self, nid: int, update: Callable[[int], np.ndarray], quant_seed: int,
                 mod_clock: _Clock, fn_clock: _Clock) -> None:
        self.nid = nid
        self.context = Context(run_id=1, node_id=nid, node_config={}, state=RecordDict(), run_config={})
        self.update = update
        self.quant_seed = quant_seed
        self.mod_clock = mod_clock
        self.fn_clock = fn_clock
        self.app_seconds = 0.0
        self.upload: int | None = None

    def _client_app(self, msg: Message, ctxt: Context) -> Message:
        """The ClientApp behind the mod: 'trains' and answers with a legacy FitRes (not the mod's time)."""
        t = time.perf_counter()
        fitres = FitRes(status=Status(code=Code.OK, message="Success"),
                        parameters=ndarrays_to_parameters([self.update(self.nid)]),
                        num_examples=NUM_EXAMPLES, metrics={})
        reply = Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)
        self.app_seconds += time.perf_counter() - t
        return reply

    def handle(self, msg: Message) -> Message:
        # Flower's stochastic rounding draws from the global np.random: seed it so the
        # quantization can be replayed for the correctness check (only quantize draws from it).
        np.random.seed(self.quant_seed)
        _StageTimer.current = self.nid
        self.app_seconds = 0.0
        t = time.perf_counter()
        reply = _MOD.secaggplus_mod(msg, self.context, self._client_app)
        self.mod_clock.add(self.nid, time.perf_counter() - t - self.app_seconds)
        _StageTimer.current = None
        configs = reply.content.config_records[RECORD_KEY_CONFIGS]
        if Key.MASKED_PARAMETERS in configs:
            self.upload = sum(len(b) for b in configs[Key.MASKED_PARAMETERS])
        return reply


class _StageTimer:
    """Wraps the mod's stage functions (looked up as module globals at call time) to time them per node."""

    current: int | None = None
    clock = _Clock()

    @classmethod
    def install(cls) -> None:
        for name in _STAGE_FUNCTIONS:
            fn = getattr(_MOD, name)
            if getattr(fn, "_timed", False):
                continue

            def timed(*args: Any, _fn: Callable[..., Any] = fn) -> Any:
                t = time.perf_counter()
                try:
                    return _fn(*args)
                finally:
                    cls.clock.add(cls.current, time.perf_counter() - t)

            timed._timed = True  # type: ignore[attr-defined]
            setattr(_MOD, name, timed)


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _recoverable_dropouts(rng: random.Random, neighbours: dict[int, set[int]], count: int, threshold: int) -> set[int]:
    """``count`` random nodes whose loss still passes the workflow's ``_check_threshold`` (fewer if impossible)."""
    chosen: set[int] = set()
    order = sorted(neighbours)
    rng.shuffle(order)
    for nid in order:
        if len(chosen) == count:
            break
        trial = chosen | {nid}
        if all(len(nbrs - trial) >= threshold for nbrs in neighbours.values()):
            chosen = trial
    return chosen


def _flower_num_shares(n: int, neighbours: int | float | str) -> int | float:
    if neighbours == "complete":
        return 1.0  # Flower's spelling of "everyone": num_shares = round(1.0 * n) = n
    if isinstance(neighbours, str):
        raise ValueError(f"neighbours must be an int, a float or 'complete', not {neighbours!r}")
    if isinstance(neighbours, int) and neighbours < n and neighbours % 2 == 0:
        # setup_stage tells the clients share_num = num_shares but then widens the ring to
        # num_shares + 1, and the mod's _share_keys indexes past its num_shares shares.
        raise ValueError(f"Flower {flwr.__version__} fails with an even integer num_shares < n "
                         f"(IndexError in the mod's _share_keys); use an odd one such as {neighbours + 1}")
    return neighbours


def run_flower_round(*, n: int, d: int, dropout: float, neighbours: int | float | str, threshold: int | float,
                     seed: int = 0, progress: bool = False) -> dict[str, Any]:
    """One SecAgg+ round with n clients and vectors of d float32 values, as Flower's client mod and server workflow compute it.

    neighbours: Flower's ``num_shares`` (an int, a float fraction of n, or "complete" for num_shares = n);
    threshold: Flower's ``reconstruction_threshold`` (an int, or a float fraction of num_shares);
    dropout: fraction of the n clients that stop answering after the share-keys stage.
    Returns client_s, server_s, upload_bytes and correct (see the module docstring), plus details.
    """
    logging.getLogger("flwr").setLevel(logging.WARNING)
    _StageTimer.install()
    _StageTimer.clock = _Clock()
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    random.seed(seed)  # the workflow shuffles the ring, and the client manager samples, with the global `random`

    def update(nid: int) -> np.ndarray:
        return np.random.default_rng([seed, nid]).uniform(-0.1, 0.1, d).astype(np.float32)

    node_ids = list(range(1, n + 1))
    mod_clock = _Clock()
    nodes = {nid: _ClientNode(nid, update, quant_seed=(seed * 1_000_003 + nid) % 2**32, mod_clock=mod_clock,
                              fn_clock=_StageTimer.clock) for nid in node_ids}
    grid = _LoopbackGrid(nodes, progress)

    workflow = SecAggPlusWorkflow(num_shares=_flower_num_shares(n, neighbours), reconstruction_threshold=threshold)
    strategy = _CaptureFedAvg(n)
    client_manager = SimpleClientManager()
    for nid in node_ids:
        client_manager.register(GridClientProxy(nid, grid, run_id=1))  # type: ignore[arg-type]
    context = LegacyContext(Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                            strategy=strategy, client_manager=client_manager)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: 1})
    context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters([np.zeros(d, np.float32)]), keep_input=True)
    state = WorkflowState()

    server_stage: dict[str, float] = {}
    dropped: set[int] = set()
    for name in _WORKFLOW_STAGES:
        grid_before, strategy_before = grid.seconds, strategy.seconds
        t = time.perf_counter()
        ok = getattr(workflow, name)(grid, context, state)
        wall = time.perf_counter() - t
        server_stage[name] = wall - (grid.seconds - grid_before) - (strategy.seconds - strategy_before)
        if progress:
            _log(f"{name}: server {server_stage[name]:.3f}s, wall {wall:.1f}s")
        if not ok:
            raise RuntimeError(f"Flower's SecAgg+ workflow halted in {name}")
        if name == "share_keys_stage":
            dropped = _recoverable_dropouts(random.Random(seed + 1), state.nid_to_neighbours,
                                            round(dropout * n), state.threshold)
            grid.dropped = dropped
    survivors = [nid for nid in node_ids if nid not in dropped]
    assert state.active_node_ids == set(survivors)

    # Correctness, outside every timer: replay each survivor's quantization and sum exactly.
    q_ratio = round(NUM_EXAMPLES / MAX_WEIGHT * QUANTIZATION_RANGE)
    int_sum: list[np.ndarray] | None = None
    float_sum = np.zeros(d)
    for nid in survivors:
        x = update(nid)
        float_sum += x
        np.random.seed(nodes[nid].quant_seed)
        q = factor_combine(q_ratio, quantize(parameters_multiply([x], q_ratio / QUANTIZATION_RANGE),
                                             CLIPPING_RANGE, QUANTIZATION_RANGE))
        q = [a.astype(np.int64) for a in q]
        int_sum = q if int_sum is None else [a + b for a, b in zip(int_sum, q, strict=True)]
    assert int_sum is not None
    int_sum = [a % MODULUS_RANGE for a in int_sum]
    q_total, recon = factor_extract(int_sum)
    reference = dequantize(recon, CLIPPING_RANGE, QUANTIZATION_RANGE)[0]
    reference += -(len(survivors) - 1) * CLIPPING_RANGE
    reference *= QUANTIZATION_RANGE / q_total
    assert strategy.aggregate is not None
    aggregate = parameters_to_ndarrays(strategy.aggregate)[0]
    exact = bool(q_total == q_ratio * len(survivors) and np.array_equal(aggregate, reference))
    error = float(np.max(np.abs(aggregate - float_sum / len(survivors))))
    step = 2 * CLIPPING_RANGE / QUANTIZATION_RANGE / (q_ratio / QUANTIZATION_RANGE)
    return {
        "client_s": float(np.mean([mod_clock.total[nid] for nid in survivors])),
        "server_s": float(sum(server_stage.values())),
        "upload_bytes": float(np.mean([nodes[nid].upload for nid in survivors])),
        "correct": exact and error <= 2 * step,
        "exact": exact,
        "max_error": error,
        "quantization_step": step,
        "client_fn_s": float(np.mean([_StageTimer.clock.total[nid] for nid in survivors])),
        "server_stage_s": server_stage,
        "n": n,
        "d": d,
        "num_shares": state.num_shares,
        "threshold": state.threshold,
        "dropped": len(dropped),
        "flwr": flwr.__version__,
    }


def _number_or_word(text: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, required=True, help="number of clients")
    parser.add_argument("--d", type=int, required=True, help="float32 values per client")
    parser.add_argument("--dropout", type=float, default=0.0, help="fraction dropping after share keys")
    parser.add_argument("--neighbours", "--num-shares", dest="neighbours", type=_number_or_word, required=True,
                        help="Flower's num_shares (an int, a fraction of n, or 'complete')")
    parser.add_argument("--threshold", type=_number_or_word, required=True,
                        help="Flower's reconstruction_threshold (an int, or a fraction of num_shares)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", action="store_true", help="report stage progress on stderr")
    args = parser.parse_args()
    out = run_flower_round(n=args.n, d=args.d, dropout=args.dropout, neighbours=args.neighbours,
                           threshold=args.threshold, seed=args.seed, progress=args.progress)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
