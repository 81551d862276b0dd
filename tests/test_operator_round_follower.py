"""The round follower (a kopf daemon per training Federation) stops when kopf asks, at once, and says why.

kopf stops it when the Federation leaves Training, is deleted, or the operator stops; a follower that slept
through the request was cancelled, which kopf logs as a warning ("is cancelled. Will escalate.").
"""

from __future__ import annotations

import asyncio
import logging

import pytest

kopf = pytest.importorskip("kopf")

from kopf._cogs.aiokits.aioenums import AsyncFlagWaiter, FlagSetter  # noqa: E402

from fedcrm_operator import handlers  # noqa: E402
from fedcrm_operator.settings import OperatorSettings  # noqa: E402


@pytest.mark.parametrize(("reason", "said"), [
    (kopf.DaemonStoppingReason.FILTERS_MISMATCH, "it left the Training phase"),
    (kopf.DaemonStoppingReason.RESOURCE_DELETED, "it is being deleted"),
    (kopf.DaemonStoppingReason.OPERATOR_EXITING, "the operator is stopping"),
])
def test_the_round_follower_returns_at_once_when_stopped_and_logs_why(
        reason: kopf.DaemonStoppingReason, said: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    polls: list[str] = []
    monkeypatch.setattr(handlers.federations, "fetch_aggregator", lambda names, settings: polls.append(names.federation))
    memo = kopf.Memo(settings=OperatorSettings(status_poll_seconds=60.0), kube=None)  # polls once a minute
    body = {"metadata": {"namespace": "coord", "name": "fed"}, "status": {"phase": "Training"}}

    async def scenario() -> None:
        setter: FlagSetter[kopf.DaemonStoppingReason] = FlagSetter()
        follower = asyncio.create_task(handlers.follow_rounds(stopped=AsyncFlagWaiter(setter), body=body, memo=memo))
        while not polls:
            await asyncio.sleep(0.01)
        setter.set(reason=reason)
        await asyncio.wait_for(follower, timeout=2)  # not the minute of its poll interval: no cancellation needed

    with caplog.at_level(logging.INFO, logger="fedcrm.operator"):
        asyncio.run(scenario())
    assert polls == ["fed"]
    assert f"coord/fed: no longer following its rounds ({said})" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
