"""One round of Flower's SecAgg+, driven stage by stage in one process, for bench/secagg.py.

Runs in its own virtual environment (``make bench-secagg`` creates
``.venv-bench`` with ``flwr``): Flower 1.42 requires protobuf < 7 and
cryptography >= 50, which our pinned gRPC stubs and dependencies do not allow,
so the benchmark calls this file as a subprocess and reads one JSON line.

Client side: the very stage functions of Flower's client mod
(``flwr.client.mod.secure_aggregation.secaggplus_mod``: ``_setup``,
``_share_keys``, ``_collect_masked_vectors``, ``_unmask``) on a
``SecAggPlusState`` with the config records the workflow sends.

Server side: Flower's ``SecAggPlusWorkflow`` is written against its Grid and
message runtime, so its per-stage computation is reproduced here line for
line with the same Flower functions (ring neighbourhoods over shuffled node
ids, forwarding of ciphertexts, ``bytes_to_ndarray`` + ``parameters_addition`` +
``parameters_mod`` of the masked vectors, ``combine_shares``,
``pseudo_rand_gen`` and ``generate_shared_key`` to remove masks,
``factor_extract`` and ``dequantize``), with the workflow's default clipping,
quantization and modulus ranges. Message transport is not timed on either side.

    python bench/flower_secaggplus.py --n 50 --d 100000 --dropout 0.1 --num-shares 3 --threshold 2
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from typing import Any

import numpy as np
from flwr.app import ConfigRecord
from flwr.client.mod.secure_aggregation.secaggplus_mod import (
    SecAggPlusState,
    _collect_masked_vectors,
    _setup,
    _share_keys,
    _unmask,
)
from flwr.common import bytes_to_ndarray, ndarrays_to_parameters
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    factor_extract,
    get_parameters_shape,
    parameters_addition,
    parameters_mod,
    parameters_subtraction,
)
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.common.secure_aggregation.secaggplus_constants import Key
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

# SecAggPlusWorkflow's defaults.
CLIPPING_RANGE = 8.0
QUANTIZATION_RANGE = 4194304
MODULUS_RANGE = 4294967296
MAX_WEIGHT = 1000.0


def _recoverable_dropouts(rng: random.Random, neighbours: dict[int, set[int]], count: int, threshold: int) -> set[int]:
    """The same rule as ours: drop participants only where every secret keeps ``threshold`` holders."""
    chosen: set[int] = set()
    order = sorted(neighbours)
    rng.shuffle(order)
    for i in order:
        if len(chosen) == count:
            break
        trial = chosen | {i}
        if all(len(neighbours[j] - trial) >= threshold for j in neighbours):
            chosen = trial
    return chosen


def run_flower_round(*, n: int, d: int, dropout: float, num_shares: int, threshold: int, seed: int = 0) -> dict[str, Any]:
    rng = random.Random(seed)
    nprng = np.random.default_rng(seed)
    node_ids = list(range(1, n + 1))
    client_time = dict.fromkeys(node_ids, 0.0)
    server_time = 0.0

    def client(nid: int, fn, *args):  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        out = fn(*args)
        client_time[nid] += time.perf_counter() - t
        return out

    # --- setup (server): configuration and ring neighbourhoods, as setup_stage does
    t = time.perf_counter()
    shares = num_shares
    if n != shares and shares & 1 == 0:
        shares += 1
    sampled = list(node_ids)
    rng.shuffle(sampled)
    half = shares >> 1
    nid_to_neighbours = {
        nid: {sampled[(idx + off) % n] for off in range(-half, half + 1)} for idx, nid in enumerate(sampled)
    }
    setup_cfg = ConfigRecord({
        Key.SAMPLE_NUMBER: n, Key.SHARE_NUMBER: num_shares, Key.THRESHOLD: threshold,
        Key.CLIPPING_RANGE: CLIPPING_RANGE, Key.TARGET_RANGE: QUANTIZATION_RANGE,
        Key.MOD_RANGE: MODULUS_RANGE, Key.MAX_WEIGHT: MAX_WEIGHT,
    })
    server_time += time.perf_counter() - t
    states = {nid: SecAggPlusState(nid=nid) for nid in node_ids}
    public_keys: dict[int, list[bytes]] = {}
    for nid in node_ids:
        out = client(nid, _setup, states[nid], setup_cfg)
        public_keys[nid] = [out[Key.PUBLIC_KEY_1], out[Key.PUBLIC_KEY_2]]
    dropped = _recoverable_dropouts(rng, nid_to_neighbours, int(round(dropout * n)), threshold)

    # --- share keys
    active = set(node_ids)
    forward_ct: dict[int, list[bytes]] = {nid: [] for nid in active}
    forward_src: dict[int, list[int]] = {nid: [] for nid in active}
    for nid in node_ids:
        t = time.perf_counter()
        neighbours = nid_to_neighbours[nid] & active
        cfg = ConfigRecord({str(v): public_keys[v] for v in neighbours})
        server_time += time.perf_counter() - t
        out = client(nid, _share_keys, states[nid], cfg)
        t = time.perf_counter()
        for dst, ct in zip(out[Key.DESTINATION_LIST], out[Key.CIPHERTEXT_LIST], strict=True):
            if dst in forward_ct:
                forward_ct[dst].append(ct)
                forward_src[dst].append(nid)
        server_time += time.perf_counter() - t

    # --- collect masked vectors (the dropped never answer)
    survivors = [nid for nid in node_ids if nid not in dropped]
    inputs = {nid: [nprng.uniform(-0.1, 0.1, d).astype(np.float32)] for nid in survivors}
    upload: list[int] = []
    masked_sum = None
    for nid in survivors:
        cfg = ConfigRecord({Key.CIPHERTEXT_LIST: forward_ct[nid], Key.SOURCE_LIST: forward_src[nid]})
        out = client(nid, _collect_masked_vectors, states[nid], cfg, 1, ndarrays_to_parameters(inputs[nid]))
        blobs = out[Key.MASKED_PARAMETERS]
        upload.append(sum(len(b) for b in blobs))
        t = time.perf_counter()
        vec = [bytes_to_ndarray(b) for b in blobs]
        masked_sum = vec if masked_sum is None else parameters_addition(masked_sum, vec)
        server_time += time.perf_counter() - t
    t = time.perf_counter()
    masked_sum = parameters_mod(masked_sum, MODULUS_RANGE)
    active_set = set(survivors)
    dead = set(node_ids) - active_set
    server_time += time.perf_counter() - t

    # --- unmask
    collected: dict[int, list[bytes]] = {nid: [] for nid in node_ids}
    for nid in survivors:
        t = time.perf_counter()
        neighbours = nid_to_neighbours[nid]
        cfg = ConfigRecord({Key.ACTIVE_NODE_ID_LIST: list(neighbours & active_set),
                            Key.DEAD_NODE_ID_LIST: list(neighbours & dead)})
        server_time += time.perf_counter() - t
        out = client(nid, _unmask, states[nid], cfg)
        t = time.perf_counter()
        for owner, share in zip(out[Key.NODE_ID_LIST], out[Key.SHARE_LIST], strict=True):
            collected[owner].append(share)
        server_time += time.perf_counter() - t
    t = time.perf_counter()
    vector = masked_sum
    for nid, share_list in collected.items():
        if len(share_list) < threshold:
            raise RuntimeError(f"not enough shares to recover node {nid}'s secret")
        secret = combine_shares(share_list)
        if nid in active_set:
            vector = parameters_subtraction(vector, pseudo_rand_gen(secret, MODULUS_RANGE, get_parameters_shape(vector)))
        else:
            for neighbour in nid_to_neighbours[nid] - {nid}:
                key = generate_shared_key(bytes_to_private_key(secret), bytes_to_public_key(public_keys[neighbour][0]))
                mask = pseudo_rand_gen(key, MODULUS_RANGE, get_parameters_shape(vector))
                vector = parameters_addition(vector, mask) if nid > neighbour else parameters_subtraction(vector, mask)
    recon = parameters_mod(vector, MODULUS_RANGE)
    q_total_ratio, recon = factor_extract(recon)
    inv_dq_total_ratio = QUANTIZATION_RANGE / q_total_ratio
    aggregated = dequantize(recon, CLIPPING_RANGE, QUANTIZATION_RANGE)
    offset = -(len(active_set) - 1) * CLIPPING_RANGE
    for vec in aggregated:
        vec += offset
        vec *= inv_dq_total_ratio
    server_time += time.perf_counter() - t

    # Flower's result is the weighted mean; with weight 1 each, compare with the plain mean.
    expected = np.mean([inputs[nid][0].astype(np.float64) for nid in survivors], axis=0)
    # Each value is scaled by the quantized weight ratio before quantization, so one quantization
    # step of the scaled value is step / dq_ratio of the original (here 1 / max_weight).
    dq_ratio = round(QUANTIZATION_RANGE / MAX_WEIGHT) / QUANTIZATION_RANGE
    step = 2 * CLIPPING_RANGE / QUANTIZATION_RANGE / dq_ratio
    error = float(np.max(np.abs(aggregated[0] - expected)))
    correct = error <= step
    return {
        "client_s": float(np.mean([client_time[nid] for nid in survivors])),
        "server_s": server_time,
        "upload_bytes": float(np.mean(upload)),
        "correct": correct,
        "max_error": error,
        "dropped": len(dropped),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--d", type=int, required=True)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--num-shares", type=int, required=True, help="Flower's num_shares (neighbours + 1)")
    parser.add_argument("--threshold", type=int, required=True, help="Flower's reconstruction_threshold")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = run_flower_round(n=args.n, d=args.d, dropout=args.dropout, num_shares=args.num_shares,
                           threshold=args.threshold, seed=args.seed)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
