"""A participant that sends poisoned statistics is dropped from the round with a reason; the others go on.

The statistics are summed in the clear and set every participant's preprocessing (means, vocabularies,
quantization bounds): one NaN, a negative count or a claim of 10^15 rows once failed the whole federation
("counts do not fit in 32 bits") or silently poisoned it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import yaml
from inprocess_aggregator import aggregators, client_tls, finish, identities, start_nodes

from fedcrm.data.loaders import load_participant_data
from fedcrm.data.synthetic import SynthResult
from fedcrm.protocol import PROTOCOL_VERSION, TlsFiles, client_channel, pb, rpc, to_vector
from fedcrm.spec.loading import load_federation, load_participant
from fedcrm.training.preprocessing import MAX_PARTICIPANT_ROWS, StatisticsLayout


def _honest_vector(small: SynthResult) -> tuple[StatisticsLayout, np.ndarray]:
    federation = load_federation(small.federation_path)
    path = small.participant_paths[0]
    data = load_participant_data(load_participant(path), federation.spec.task, base_dir=path.parent)
    layout = StatisticsLayout(federation.spec.task)
    return layout, layout.local(data.frame)


def test_honest_statistics_pass_and_impossible_ones_are_named(small_federation: SynthResult) -> None:
    layout, honest = _honest_vector(small_federation)
    layout.check(honest)
    numeric = next(off for _, kind, off, _ in layout.slots if kind.value == "numeric")

    def poisoned(index: int, value: float) -> np.ndarray:
        v = honest.copy()
        v[index] = value
        return v

    for vector, words in [
        (poisoned(0, 1e15), f"from 1 to {MAX_PARTICIPANT_ROWS:,}"),
        (poisoned(0, 0.5), "whole number"),
        (poisoned(1, honest[0] + 1), "positives"),
        (poisoned(3, float("nan")), "finite"),
        (poisoned(numeric, -1), "non-negative"),
        (poisoned(numeric + 1, 1e12), "inconsistent"),
        (honest[:-1], "one per slot"),
    ]:
        with pytest.raises(ValueError, match=words):
            layout.check(vector)


@pytest.mark.slow
def test_a_participant_with_poisoned_statistics_is_dropped_and_the_others_train(
        small_federation: SynthResult, tmp_path: Path) -> None:
    doc = yaml.safe_load(small_federation.federation_path.read_text())
    doc["spec"]["training"].update(rounds=2, minParticipants=2, roundTimeoutSeconds=30)
    own = tmp_path / "federation.yaml"
    own.write_text(yaml.safe_dump(doc))
    federation = load_federation(own)
    honest_ids = identities(small_federation)[:2]
    hostile_id = identities(small_federation)[2]
    _, vector = _honest_vector(small_federation)
    vector[0] = 1e15  # "a billion million leads"

    with aggregators(tmp_path) as start:
        coordinator, port, ca = start(federation, federation, honest_ids + [hostile_id])
        nodes = start_nodes(small_federation, own, port, ca, tmp_path, small_federation.participant_paths[:2])
        cert, key = client_tls(ca, hostile_id, tmp_path / "hostile")
        acks: list[Any] = []
        with client_channel(f"127.0.0.1:{port}", TlsFiles(tmp_path / "ca.crt", cert, key),
                            server_name="localhost") as channel:
            stub = rpc.FederatedTrainingStub(channel)
            stream = stub.Connect(pb.ConnectRequest(protocol_version=PROTOCOL_VERSION, federation=federation.key))
            for task in stream:
                if task.kind == pb.Task.STATISTICS:
                    acks.append(stub.SubmitStatistics(pb.StatisticsResult(round=task.round,
                                                                          statistics=to_vector(vector))))
                    stream.cancel()  # and then it goes quiet
                    break
        results = finish(nodes)

    assert acks and not acks[0].accepted and "row count" in acks[0].message
    assert [code for code, _ in results] == [0, 0], [log[-1000:] for _, log in results]
    assert len(coordinator.history) == 2 and coordinator.preprocessing.rows < 10_000
    events = (tmp_path / "aggregator" / "events.jsonl").read_text()
    assert f'"identity": "{hostile_id}"' in events and "sent a malformed statistics result" in events


def test_an_oversized_result_is_refused_before_it_is_read(small_federation: SynthResult, tmp_path: Path) -> None:
    """The receive limit follows the largest model this Federation can have (here about 1 MiB), not gRPC's
    256 MiB: four concurrent 248 MB updates once took the aggregator from 74 MiB to 1.6 GiB."""
    from fedcrm.models.layout import ModelLayout
    from fedcrm.pki import CertificateAuthority, write_pem_files
    from fedcrm.protocol import max_result_bytes
    from fedcrm.runconfig import AggregatorConfig, TlsPaths
    from fedcrm_aggregator.coordinator import Coordinator
    from fedcrm_aggregator.server import start_server

    federation = load_federation(small_federation.federation_path)
    who = identities(small_federation)
    limit = max_result_bytes(ModelLayout.largest(federation.spec).size, len(who))
    assert limit < 2 * 1024 * 1024
    ca = CertificateAuthority.create("test")
    (tmp_path / "ca.crt").write_bytes(ca.cert_pem)
    cert, key = write_pem_files(tmp_path, "server", ca.issue_server(["localhost", "127.0.0.1"]))
    config = AggregatorConfig(federation=federation, participants=who, listen="127.0.0.1:0",
                              tls=TlsPaths(ca=tmp_path / "ca.crt", cert=cert, key=key), out_dir=tmp_path)
    coordinator = Coordinator(federation, who, tmp_path)
    server, port = start_server(config, coordinator)
    try:
        c_cert, c_key = client_tls(ca, who[0], tmp_path / "hostile")
        with client_channel(f"127.0.0.1:{port}", TlsFiles(tmp_path / "ca.crt", c_cert, c_key),
                            server_name="localhost") as channel:
            stub = rpc.FederatedTrainingStub(channel)
            huge = pb.FitResult(round=1, delta=to_vector(np.zeros(2 * limit // 8, dtype=np.float64)))
            with pytest.raises(grpc.RpcError) as refused:
                stub.SubmitFit(huge, timeout=30)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            fits = pb.FitResult(round=1, delta=to_vector(np.zeros(limit // 16, dtype=np.float64)))
            assert not stub.SubmitFit(fits, timeout=30).accepted  # read, then refused: no stage is running
    finally:
        server.stop(grace=0).wait()
        coordinator.close()


@pytest.mark.slow
def test_an_abandoned_round_is_run_again_with_new_round_ids_and_the_federation_finishes(
        small_federation: SynthResult, tmp_path: Path) -> None:
    """Round 1's training sum is given up at its very end (as when a reconstructed key does not match its advertised
    one: a corrupt share). Before, that failed the whole federation; now the round runs again under new round ids,
    with real participants, and every planned round completes."""
    from fedcrm_aggregator.coordinator import ROUND_ATTEMPTS

    from fedcrm.errors import RoundAbandoned

    doc = yaml.safe_load(small_federation.federation_path.read_text())
    doc["spec"]["training"].update(rounds=2, minParticipants=2, roundTimeoutSeconds=30)
    doc["spec"]["privacy"] = {"secureAggregation": {"enabled": True, "neighbours": "complete"}}
    own = tmp_path / "federation.yaml"
    own.write_text(yaml.safe_dump(doc))
    federation = load_federation(own)
    assert ROUND_ATTEMPTS >= 2
    with aggregators(tmp_path) as start:
        coordinator, port, ca = start(federation, federation, identities(small_federation))
        real_run, round_ids = coordinator.secure.run, []

        def abandon_once(kind: int, round_: int, attempt: int = 0) -> Any:
            result = real_run(kind, round_, attempt)
            round_ids.append((kind, round_, attempt))
            if (kind, round_, attempt) == (pb.Task.FIT, 1, 0):
                raise RoundAbandoned("round 1 training: secure aggregation abandoned, no sum released: a "
                                     "reconstructed key did not match its advertised key")
            return result

        coordinator.secure.run = abandon_once
        results = finish(start_nodes(small_federation, own, port, ca, tmp_path))

    assert [code for code, _ in results] == [0, 0, 0], [log[-1000:] for _, log in results]
    assert [r.round for r in coordinator.history] == [1, 2]
    assert (pb.Task.FIT, 1, 1) in round_ids  # the second try of round 1
    events = (tmp_path / "aggregator" / "events.jsonl").read_text()
    assert '"event": "round_abandoned"' in events and '"attempt": 0' in events
