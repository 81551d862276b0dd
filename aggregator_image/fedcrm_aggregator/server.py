"""The aggregator's gRPC service: mutual TLS, identity checks, the task streams, and a memory budget.

Memory under hostile participants. gRPC Python's own unary handlers receive the
whole request message before the handler runs, so every worker thread can hold
a message of up to the receive limit, and the HTTP/2 transport, with its window
grown by bandwidth-delay probing, buffers whole messages of calls no worker has
picked up yet: the aggregator's memory grew with the number of concurrent
calls, that is with the number of participants. Here every method is served as
a request-streaming handler: the request is read only after the caller's
identity and a global :class:`PayloadBudget` have admitted it, and a call not
admitted is refused with ``RESOURCE_EXHAUSTED`` before any of its body is
read. Without bandwidth-delay probing, a call not yet read holds at most its
stream's lookahead window (``_LOOKAHEAD`` bytes); a call being read opens the
window to its whole message, so honest uploads are not slowed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc

from fedcrm.models.layout import ModelLayout
from fedcrm.protocol import (
    PROTOCOL_VERSION,
    TlsFiles,
    max_result_bytes,
    pb,
    peer_identity,
    server_credentials,
    server_options,
)
from fedcrm.runconfig import AggregatorConfig
from fedcrm_aggregator.coordinator import Coordinator

__all__ = [
    "RETRY_AFTER_KEY",
    "FederatedTrainingService",
    "PayloadBudget",
    "default_payload_budget",
    "start_server",
]

log = logging.getLogger("fedcrm.aggregator")

# How often an idle task stream checks whether its peer is still there.
_POLL_S = 0.5

#: Results one participant may have in the aggregator's hands at once (being read or handled). An honest node sends
#: one at a time; a hostile one sending many concurrently would otherwise take the whole payload budget.
PEER_IN_FLIGHT = 2

#: What one result costs while it is read and handled, in receive limits: the transport's decrypted frames, gRPC's
#: bytes, the parsed message and the vector decoded from it (measured: 3.5 to 4 under a flood). A result reserves
#: this many times the receive limit, since its size is unknown until it is read.
REQUEST_COPIES = 4

#: Results read at once when neither the operator nor a pod memory limit says otherwise.
DEFAULT_SLOTS = 8

#: The share of the pod's memory limit the default budget may take: the rest is the coordinator's (models, sums,
#: secure-aggregation state) and the interpreter's.
MEMORY_LIMIT_SHARE = 4

#: HTTP/2 bytes a stream may send before the aggregator reads it. A call waiting for a worker or refused
#: unread holds at most this much; a call being read is granted its whole message.
_LOOKAHEAD = 16 * 1024

#: The most the transport reads from one connection at a time.
_READ_BUFFER = 64 * 1024

#: Calls gRPC accepts beyond the worker threads (queued for a worker, each holding at most ``_LOOKAHEAD`` bytes);
#: beyond them gRPC refuses a call with RESOURCE_EXHAUSTED before reading it.
_WAITING_CALLS = 64

#: Trailing metadata on a refusal the caller should retry: after about this many milliseconds.
RETRY_AFTER_KEY = "fedcrm-retry-after-ms"
_RETRY_AFTER_MS = 200

#: Refusals for want of room are logged together, at most this often.
_REFUSALS_LOG_S = 10.0


class PayloadBudget:
    """The bytes of requests the aggregator may be reading or handling at once, all participants together.

    Request sizes are unknown until read, so each admitted request reserves ``request_bytes`` (the most one honest
    result can cost): the budget is a number of slots, ``total // request_bytes``, at least one. It does not
    depend on the number of participants: more of them, or more hostile ones, wait or are refused, they do not
    make the aggregator hold more.
    """

    def __init__(self, total: int, request_bytes: int) -> None:
        if request_bytes <= 0:
            raise ValueError("a request reserves a positive number of bytes")
        self.request_bytes = request_bytes
        self.slots = max(1, total // request_bytes)
        self.total = self.slots * request_bytes
        self._held = 0
        self._lock = threading.Lock()

    @property
    def held(self) -> int:
        """Slots reserved now."""
        return self._held

    def take(self) -> bool:
        """Reserve one request's bytes if they fit; never waits (a waiting call would hold a worker thread)."""
        with self._lock:
            if self._held >= self.slots:
                return False
            self._held += 1
            return True

    def give_back(self) -> None:
        with self._lock:
            self._held -= 1


def pod_memory_limit() -> int | None:
    """The memory limit of this process's cgroup (the pod's container limit), or None where there is none."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # cgroup v1 writes a huge number for "no limit"
            return int(text)
        return None
    return None


def default_payload_budget(receive_limit: int, memory_limit: int | None) -> int:
    """``DEFAULT_SLOTS`` results of the largest honest size, or a quarter of the pod's memory limit if that is less,
    and never less than one result (a budget smaller than one result would refuse every honest one)."""
    request = REQUEST_COPIES * receive_limit
    budget = DEFAULT_SLOTS * request
    if memory_limit is not None:
        budget = min(budget, memory_limit // MEMORY_LIMIT_SHARE)
    return max(budget, request)


class FederatedTrainingService:
    """The ``fedcrm.v1.FederatedTraining`` methods, each taking its request as an iterator read only once admitted.

    The wire contract is the generated one (unary requests); only the server reads them lazily.
    """

    def __init__(self, coordinator: Coordinator, allowed: set[str], budget: PayloadBudget) -> None:
        self.coordinator = coordinator
        self.allowed = allowed
        self.budget = budget
        self._in_flight: dict[str, int] = {}
        self._in_flight_lock = threading.Lock()
        self._refusals, self._refusals_logged = 0, float("-inf")

    def _identity(self, context: grpc.ServicerContext) -> str:
        identity = peer_identity(context)
        if identity is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "a client certificate from the federation CA is required")
        if identity not in self.allowed:
            log.warning("refused a connection from %r: not a participant of this federation", identity)
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{identity!r} is not a participant of federation {self.coordinator.federation.key}",
            )
        return identity  # type: ignore[return-value]

    def _log_refusal(self, identity: str) -> None:
        """Say that requests were refused for want of room, at most every ``_REFUSALS_LOG_S`` (a flood is
        thousands a second)."""
        with self._in_flight_lock:
            self._refusals += 1
            now = time.monotonic()
            if now - self._refusals_logged < _REFUSALS_LOG_S:
                return
            count, self._refusals, self._refusals_logged = self._refusals, 0, now
        log.warning("refused %d request(s) unread, the last from %s: the aggregator is reading %d results already "
                    "(payload budget %d MiB)", count, identity, self.budget.slots, self.budget.total >> 20)

    @staticmethod
    def _refuse(context: grpc.ServicerContext, message: str) -> None:
        """RESOURCE_EXHAUSTED with a retry hint: an honest participant's node waits and sends again."""
        context.set_trailing_metadata(((RETRY_AFTER_KEY, str(_RETRY_AFTER_MS)),))
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message)

    @contextmanager
    def _admitted(self, identity: str, context: grpc.ServicerContext, *, per_peer: bool = True) -> Iterator[None]:
        """Hold one of ``identity``'s in-flight places and one budget slot, or refuse the call before it is read."""
        if per_peer:
            with self._in_flight_lock:
                busy = self._in_flight.get(identity, 0)
                if busy >= PEER_IN_FLIGHT:
                    log.warning("refused a result from %s: %d of its results are still being handled", identity, busy)
                    self._refuse(context, f"{busy} results from {identity} are still being handled; send one at a time")
                self._in_flight[identity] = busy + 1
        try:
            if not self.budget.take():
                self._log_refusal(identity)
                self._refuse(context, "the aggregator is reading as many results as its memory budget allows; "
                             "retry shortly")
            try:
                yield
            finally:
                self.budget.give_back()
        finally:
            if per_peer:
                with self._in_flight_lock:
                    self._in_flight[identity] -= 1

    @staticmethod
    def _read(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        """The call's one request message, read from the transport only now."""
        request = next(requests, None)
        if request is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a request message is required")
        return request

    def Connect(self, requests: Iterator[pb.ConnectRequest], context: grpc.ServicerContext) -> Iterator[pb.Task]:
        identity = self._identity(context)
        # The request is tiny from an honest node, but read under the budget like any other: a hostile one could
        # send the receive limit here too. A new stream replaces the old one, so no per-peer place is held.
        with self._admitted(identity, context, per_peer=False):
            request = self._read(requests, context)
        fed = self.coordinator.federation
        if request.protocol_version != PROTOCOL_VERSION:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"protocol version {request.protocol_version} is not supported (this aggregator speaks {PROTOCOL_VERSION}); "
                "run the same fedcrm version on both sides",
            )
        if request.federation != fed.key:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"this aggregator serves federation {fed.key}, but the participant's manifest names {request.federation}",
            )
        session = self.coordinator.connect(identity)
        context.add_callback(lambda: self.coordinator.disconnect(session))
        self.coordinator.count_up(identity, 0, request.ByteSize())
        welcome = pb.Task(
            kind=pb.Task.WELCOME,
            identity=identity,
            secagg_id=self.coordinator.expected.index(identity),
            federation_json=fed.model_dump_json(by_alias=True, exclude={"status"}),
        )
        session.bytes_down[0] += welcome.ByteSize()
        yield welcome
        while context.is_active():
            task = session.next_task(_POLL_S)
            if task is None:
                if not session.connected:
                    return
                continue
            session.bytes_down[task.round] += task.ByteSize()
            yield task
            if task.kind == pb.Task.FINISH:
                return

    def _submit(self, requests: Iterator[Any], context: grpc.ServicerContext, kind: int | None) -> pb.Ack:
        identity = self._identity(context)
        with self._admitted(identity, context):
            request = self._read(requests, context)
            self.coordinator.count_up(identity, request.round, request.ByteSize())
            return self.coordinator.submit(request.stage if kind is None else kind, identity, request)

    def SubmitStatistics(self, requests: Iterator[pb.StatisticsResult], context: grpc.ServicerContext) -> pb.Ack:
        return self._submit(requests, context, pb.Task.STATISTICS)

    def SubmitFit(self, requests: Iterator[pb.FitResult], context: grpc.ServicerContext) -> pb.Ack:
        return self._submit(requests, context, pb.Task.FIT)

    def SubmitEvaluation(self, requests: Iterator[pb.EvaluationResult], context: grpc.ServicerContext) -> pb.Ack:
        return self._submit(requests, context, pb.Task.EVALUATE)

    def SubmitSecAgg(self, requests: Iterator[pb.SecAggResult], context: grpc.ServicerContext) -> pb.Ack:
        return self._submit(requests, context, None)  # the stage is in the message

    def ReportFailure(self, requests: Iterator[pb.FailureReport], context: grpc.ServicerContext) -> pb.Ack:
        identity = self._identity(context)
        with self._admitted(identity, context):
            request = self._read(requests, context)
        if request.budget_spent:
            self.coordinator.report_budget_spent(identity, request.message, releases=request.releases)
        else:
            self.coordinator.report_failure(identity, request.message)
        return pb.Ack(accepted=True)


_SERVICE = pb.DESCRIPTOR.services_by_name["FederatedTraining"]


def _handlers(service: FederatedTrainingService) -> dict[str, grpc.RpcMethodHandler]:
    """Every method of the service in ``protos/`` as a request-streaming handler: gRPC hands it an unread request
    iterator instead of reading the message before it runs. On the wire nothing changes (one request, then the
    response or the task stream), so clients use the generated stubs as they are. A method added to the protocol
    without a servicer method here stops the aggregator at start, not at its first call."""
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in _SERVICE.methods:
        behaviour = getattr(service, method.name)
        request, response = getattr(pb, method.input_type.name), getattr(pb, method.output_type.name)
        make = grpc.stream_unary_rpc_method_handler
        if method.server_streaming:
            make = grpc.stream_stream_rpc_method_handler
        handlers[method.name] = make(behaviour, request_deserializer=request.FromString,
                                     response_serializer=response.SerializeToString)
    return handlers


def start_server(config: AggregatorConfig, coordinator: Coordinator, *,
                 payload_budget: int | None = None) -> tuple[grpc.Server, int]:
    """Start serving on ``config.listen``; returns the server and the bound port.

    ``payload_budget``: bytes of requests read at once, all participants together (``fedcrm-aggregator
    --payload-budget``); by default :func:`default_payload_budget` of the receive limit and the pod's memory limit.
    """
    # No result larger than the biggest model this Federation can have is read into memory (M7: four 248 MB
    # updates once took the aggregator to 1.6 GiB).
    limit = max_result_bytes(ModelLayout.largest(config.federation.spec).size, len(config.participants))
    if payload_budget is None:
        payload_budget = default_payload_budget(limit, pod_memory_limit())
    budget = PayloadBudget(payload_budget, REQUEST_COPIES * limit)
    # Each open task stream holds a worker thread; the others serve admitted results and refuse the rest quickly.
    workers = len(config.participants) + budget.slots + 8
    options: list[tuple[str, Any]] = [
        *server_options(limit),
        # Probing grows every stream's window to the bandwidth-delay product, megabytes on a fast link: then the
        # transport buffers whole messages of calls nobody reads yet (measured: 100 waiting 1.1 MB calls held
        # 113 MiB with probing, 9 MiB without). A call being read is granted its message regardless.
        ("grpc.http2.bdp_probe", 0),
        ("grpc.http2.lookahead_bytes", _LOOKAHEAD),
        # The transport reads a connection in pieces of at most this much, not megabytes per busy connection
        # (measured: twelve flooding peers +33 MiB at the default, +19 MiB with this; no slower for large results).
        ("grpc.experimental.tcp_max_read_buffer_size", _READ_BUFFER),
    ]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=options,
                         maximum_concurrent_rpcs=workers + _WAITING_CALLS)
    service = FederatedTrainingService(coordinator, set(config.participants), budget)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_SERVICE.full_name, _handlers(service)),))
    creds = server_credentials(TlsFiles(config.tls.ca, config.tls.cert, config.tls.key))
    port = server.add_secure_port(config.listen, creds)
    if port == 0:
        raise OSError(f"cannot listen on {config.listen}")
    server.start()
    if config.port_file is not None:
        tmp = Path(str(config.port_file) + ".tmp")
        tmp.write_text(str(port))
        tmp.replace(config.port_file)
    log.info("serving federation %s on port %d (mutual TLS); payload budget %d MiB: %d results of up to %d KiB read "
             "at once", config.federation.key, port, budget.total >> 20, budget.slots, limit >> 10)
    return server, port
