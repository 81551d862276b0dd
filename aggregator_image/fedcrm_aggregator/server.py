"""The aggregator's gRPC service: mutual TLS, identity checks, and the task streams."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from concurrent import futures
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
    rpc,
    server_credentials,
    server_options,
)
from fedcrm.runconfig import AggregatorConfig
from fedcrm_aggregator.coordinator import Coordinator

__all__ = ["FederatedTrainingService", "start_server"]

log = logging.getLogger("fedcrm.aggregator")

# How often an idle task stream checks whether its peer is still there.
_POLL_S = 0.5

#: Results one participant may have in the aggregator's hands at once. An honest node sends one at a time; a
#: hostile one sending many concurrently would otherwise hold the unary workers every other participant needs.
#: (Memory is bounded apart from this: each message is at most the receive limit, read only by a worker.)
PEER_IN_FLIGHT = 2


class FederatedTrainingService(rpc.FederatedTrainingServicer):
    def __init__(self, coordinator: Coordinator, allowed: set[str]) -> None:
        self.coordinator = coordinator
        self.allowed = allowed
        self._in_flight: dict[str, int] = {}
        self._in_flight_lock = threading.Lock()

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

    def Connect(self, request: pb.ConnectRequest, context: grpc.ServicerContext) -> Iterator[pb.Task]:
        identity = self._identity(context)
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

    def _submit(self, kind: int, request: Any, context: grpc.ServicerContext) -> pb.Ack:
        identity = self._identity(context)
        with self._in_flight_lock:
            busy = self._in_flight.get(identity, 0)
            if busy >= PEER_IN_FLIGHT:
                log.warning("refused a result from %s: %d of its results are still being handled", identity, busy)
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"{busy} results from {identity} are still being handled; send one at a time")
            self._in_flight[identity] = busy + 1
        try:
            self.coordinator.count_up(identity, request.round, request.ByteSize())
            return self.coordinator.submit(kind, identity, request)
        finally:
            with self._in_flight_lock:
                self._in_flight[identity] -= 1

    def SubmitStatistics(self, request: pb.StatisticsResult, context: grpc.ServicerContext) -> pb.Ack:
        return self._submit(pb.Task.STATISTICS, request, context)

    def SubmitFit(self, request: pb.FitResult, context: grpc.ServicerContext) -> pb.Ack:
        return self._submit(pb.Task.FIT, request, context)

    def SubmitEvaluation(self, request: pb.EvaluationResult, context: grpc.ServicerContext) -> pb.Ack:
        return self._submit(pb.Task.EVALUATE, request, context)

    def SubmitSecAgg(self, request: pb.SecAggResult, context: grpc.ServicerContext) -> pb.Ack:
        return self._submit(request.stage, request, context)

    def ReportFailure(self, request: pb.FailureReport, context: grpc.ServicerContext) -> pb.Ack:
        identity = self._identity(context)
        if request.budget_spent:
            self.coordinator.report_budget_spent(identity, request.message, releases=request.releases)
        else:
            self.coordinator.report_failure(identity, request.message)
        return pb.Ack(accepted=True)


def start_server(config: AggregatorConfig, coordinator: Coordinator) -> tuple[grpc.Server, int]:
    """Start serving on ``config.listen``; returns the server and the bound port."""
    # Each open task stream holds a worker thread; leave room for the unary calls.
    workers = 2 * len(config.participants) + 8
    # No result larger than the biggest model this Federation can have is read into memory (M7: four 248 MB
    # updates once took the aggregator to 1.6 GiB).
    limit = max_result_bytes(ModelLayout.largest(config.federation.spec).size, len(config.participants))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=server_options(limit))
    rpc.add_FederatedTrainingServicer_to_server(FederatedTrainingService(coordinator, set(config.participants)), server)
    creds = server_credentials(TlsFiles(config.tls.ca, config.tls.cert, config.tls.key))
    port = server.add_secure_port(config.listen, creds)
    if port == 0:
        raise OSError(f"cannot listen on {config.listen}")
    server.start()
    if config.port_file is not None:
        tmp = Path(str(config.port_file) + ".tmp")
        tmp.write_text(str(port))
        tmp.replace(config.port_file)
    log.info("serving federation %s on port %d (mutual TLS)", config.federation.key, port)
    return server, port
