"""A participant that computes for minutes between messages keeps its connection.

Both sides ping an idle connection (:func:`fedcrm.protocol.transport.keepalive_options`); gRPC's receiving side
by default accepts such pings only every 5 minutes and closes the connection after two early ones (GOAWAY
``too_many_pings``), which dropped every participant of a 50-tenant federation training its GANs in the first
round. Here the pace is 2 s instead of 30 s: a stream idle for 12 s sees the five pings that gRPC's default policy
cuts at the fourth (about 8 s in; the control waits up to 30 s, since a loaded machine delays the pings).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from fedcrm.protocol.transport import keepalive_options

pytestmark = pytest.mark.slow

EVERY_MS = 2_000


def _idle_stream(server_options: list[tuple[str, int]], idle_s: float) -> list[bytes]:
    """Answers of a server stream that says nothing for ``idle_s``, then one message, over a local connection."""
    def slow(_request: bytes, _context: grpc.ServicerContext) -> Iterator[bytes]:
        time.sleep(idle_s)
        yield b"done"

    handler = grpc.method_handlers_generic_handler("keepalive.Test", {"Slow": grpc.unary_stream_rpc_method_handler(slow)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=server_options)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=keepalive_options(EVERY_MS)) as channel:
            return list(channel.unary_stream("/keepalive.Test/Slow")(b"", timeout=idle_s + 30))
    finally:
        server.stop(grace=None)


def test_an_idle_stream_survives_the_keepalive_pings() -> None:
    assert _idle_stream(keepalive_options(EVERY_MS), idle_s=12) == [b"done"]


def test_without_accepting_the_pings_the_same_stream_is_cut() -> None:
    """The control: the receiving side's default ping policy closes the connection before the answer."""
    tolerant = "grpc.http2.min_ping_interval_without_data_ms"
    strict = [(k, v) for k, v in keepalive_options(EVERY_MS) if k != tolerant]
    with pytest.raises(grpc.RpcError) as err:
        _idle_stream(strict, idle_s=30)
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
