"""A node waiting for its aggregator says so while it waits, not only when it gives up.

gRPC retries name resolution, TCP and TLS in silence; on a real node a
training pod whose aggregator name did not resolve showed nothing in ``kubectl
logs`` for the whole connect timeout (15 minutes).
"""

from __future__ import annotations

import logging
import socket
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import yaml
from fedcrm_node.participant import _wait_until_ready
from inprocess_aggregator import aggregators, identities, start_nodes

from fedcrm.data.synthetic import SynthResult
from fedcrm.exit_codes import NodeExitCode
from fedcrm.spec.loading import load_federation


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_node_waiting_for_an_absent_aggregator_logs_while_it_waits_then_gives_up(caplog: pytest.LogCaptureFixture) -> None:
    target = f"127.0.0.1:{_closed_port()}"
    channel = grpc.insecure_channel(target)
    with caplog.at_level(logging.WARNING):
        assert _wait_until_ready(channel, target, timeout=2.5, every=1.0) is False
    waiting = [r.getMessage() for r in caplog.records if "still connecting to the aggregator" in r.getMessage()]
    assert len(waiting) >= 2, caplog.text
    assert target in waiting[0] and "gRPC state" in waiting[0] and "NetworkPolicies" in waiting[0]
    channel.close()


def test_a_reachable_aggregator_connects_without_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        with caplog.at_level(logging.WARNING):
            assert _wait_until_ready(channel, f"127.0.0.1:{port}", timeout=10, every=1.0) is True
        assert "still connecting" not in caplog.text
    finally:
        channel.close()
        server.stop(None)


def test_a_node_that_connects_after_the_federation_ended_is_told_so_and_exits(small_federation: SynthResult,
                                                                              tmp_path: Path) -> None:
    """In a cluster the aggregator serves on after the end (its status stays readable); a training pod that starts
    late or restarts then must not wait for a task that never comes."""
    spec = yaml.safe_load(small_federation.federation_path.read_text())
    spec["spec"]["training"].update(roundTimeoutSeconds=1)  # nobody connects in time: enrolment fails
    own_path = tmp_path / "federation.yaml"
    own_path.write_text(yaml.safe_dump(spec))
    own = load_federation(own_path)
    with aggregators(tmp_path) as start:
        coordinator, port, ca = start(own, own, identities(small_federation))
        deadline = time.monotonic() + 60
        while coordinator.state != "failed" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert coordinator.state == "failed", coordinator.state
        [node] = start_nodes(small_federation, own_path, port, ca, tmp_path,
                             participants=small_federation.participant_paths[:1])
        try:
            log, _ = node.communicate(timeout=90)
        finally:
            node.kill()
    assert node.returncode == NodeExitCode.STOPPED, log[-2000:]
    assert "the federation stopped" in log and "minParticipants" in log
