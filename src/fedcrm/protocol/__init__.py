"""The gRPC contract: generated stubs (from ``protos/``), vector encoding and mutual-TLS transport.

Imports neither torch nor pandas.
"""

from fedcrm.protocol import federation_pb2 as pb
from fedcrm.protocol import federation_pb2_grpc as rpc
from fedcrm.protocol.transport import (
    GRPC_OPTIONS,
    PROTOCOL_VERSION,
    TlsFiles,
    client_channel,
    max_result_bytes,
    peer_identity,
    server_credentials,
    server_options,
)
from fedcrm.protocol.vectors import from_vector, to_vector

__all__ = [
    "GRPC_OPTIONS",
    "PROTOCOL_VERSION",
    "TlsFiles",
    "client_channel",
    "from_vector",
    "max_result_bytes",
    "pb",
    "peer_identity",
    "rpc",
    "server_credentials",
    "server_options",
    "to_vector",
]
