"""Sending again what the aggregator refused only for want of room.

The aggregator reads a bounded number of results at once, all participants
together (its payload budget), and refuses the rest with ``RESOURCE_EXHAUSTED``
before reading them, marking the refusal as worth retrying. gRPC's own retry
policy cannot resend them: it keeps at most 256 KiB of a request for replay, and
a model update is larger. This channel interceptor resends the kept request
message itself, with exponential backoff and jitter, for a bounded time.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

__all__ = ["RETRY_AFTER_KEY", "RetryWhenBusy", "intercept"]

log = logging.getLogger("fedcrm.node")

#: Trailing metadata the aggregator sets on a refusal to retry (the same key as in the aggregator's server module,
#: which the node image does not ship).
RETRY_AFTER_KEY = "fedcrm-retry-after-ms"

#: gRPC's refusal when the server's whole call limit is taken (also before reading the request).
_CALL_LIMIT_DETAILS = "Concurrent RPC limit exceeded!"


def _retry_after(err: grpc.RpcError) -> float | None:
    """Seconds the aggregator asked to wait before sending ``err``'s call again, or None if it is not worth it."""
    if not isinstance(err, grpc.Call) or err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None
    for key, value in err.trailing_metadata() or ():
        if key == RETRY_AFTER_KEY:
            try:
                return max(0.0, int(value) / 1000)
            except ValueError:
                return 0.0
    return 0.0 if err.details() == _CALL_LIMIT_DETAILS else None


class _FirstAgain:
    """A response stream whose first response was already taken (to see whether the call was refused)."""

    def __init__(self, call: Any, first: Any) -> None:
        self._call, self._first = call, [first]

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        if self._first:
            return self._first.pop()
        return next(self._call)

    def __getattr__(self, name: str) -> Any:  # cancel(), code(), trailing_metadata(), ...
        return getattr(self._call, name)


class RetryWhenBusy(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Resend a call the aggregator refused for want of room, waiting ``first_delay`` doubling to ``max_delay``
    (at least what the aggregator asked, with jitter so refused nodes do not return together), for at most
    ``patience`` seconds; then the refusal is raised as any other error."""

    def __init__(self, *, patience: float = 300.0, first_delay: float = 0.2, max_delay: float = 5.0,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.patience, self.first_delay, self.max_delay, self.sleep = patience, first_delay, max_delay, sleep

    def _again(self, attempt: Callable[[], Any], method: str) -> Any:
        began, delay, refused = time.monotonic(), self.first_delay, 0
        while True:
            try:
                return attempt()
            except grpc.RpcError as err:
                hint = _retry_after(err)
                if hint is None or time.monotonic() - began + delay > self.patience:
                    raise
                refused += 1
                wait = max(delay, hint) * random.uniform(0.5, 1.5)
                if refused == 1 or refused % 10 == 0:
                    log.info("the aggregator is busy (%s refused %d times: %s); sending again in %.1fs",
                             method, refused, err.details(), wait)
                self.sleep(wait)
                delay = min(2 * delay, self.max_delay)

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        def attempt() -> Any:
            call = continuation(client_call_details, request)
            call.result()  # raises the refusal, if any
            return call

        return self._again(attempt, client_call_details.method)

    def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        def attempt() -> Any:
            call = continuation(client_call_details, request)
            # A refusal comes before any response: wait for the first one (the aggregator's welcome) to tell.
            try:
                first = next(call)
            except StopIteration:
                return call  # ended without a response: nothing to put back
            return _FirstAgain(call, first)

        return self._again(attempt, client_call_details.method)


def intercept(channel: grpc.Channel, **kwargs: Any) -> grpc.Channel:
    """``channel`` with refused-for-room calls sent again (see :class:`RetryWhenBusy`)."""
    return grpc.intercept_channel(channel, RetryWhenBusy(**kwargs))
