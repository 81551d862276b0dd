from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Vector(_message.Message):
    __slots__ = ("dtype", "length", "data", "bits")
    class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        DTYPE_UNSPECIFIED: _ClassVar[Vector.DType]
        FLOAT32: _ClassVar[Vector.DType]
        FLOAT64: _ClassVar[Vector.DType]
        UINT32: _ClassVar[Vector.DType]
        UINT64: _ClassVar[Vector.DType]
        PACKED: _ClassVar[Vector.DType]
    DTYPE_UNSPECIFIED: Vector.DType
    FLOAT32: Vector.DType
    FLOAT64: Vector.DType
    UINT32: Vector.DType
    UINT64: Vector.DType
    PACKED: Vector.DType
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    BITS_FIELD_NUMBER: _ClassVar[int]
    dtype: Vector.DType
    length: int
    data: bytes
    bits: int
    def __init__(self, dtype: _Optional[_Union[Vector.DType, str]] = ..., length: _Optional[int] = ..., data: _Optional[bytes] = ..., bits: _Optional[int] = ...) -> None: ...

class ConnectRequest(_message.Message):
    __slots__ = ("protocol_version", "federation")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    FEDERATION_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    federation: str
    def __init__(self, protocol_version: _Optional[int] = ..., federation: _Optional[str] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("kind", "round", "federation_json", "identity", "model_version", "model", "preprocessing_json", "deadline_unix", "succeeded", "message", "secagg_id", "secagg")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[Task.Kind]
        WELCOME: _ClassVar[Task.Kind]
        STATISTICS: _ClassVar[Task.Kind]
        FIT: _ClassVar[Task.Kind]
        EVALUATE: _ClassVar[Task.Kind]
        FINISH: _ClassVar[Task.Kind]
        SECAGG_SHARE_KEYS: _ClassVar[Task.Kind]
        SECAGG_MASKED_INPUT: _ClassVar[Task.Kind]
        SECAGG_UNMASK: _ClassVar[Task.Kind]
        SECAGG_CONSISTENCY: _ClassVar[Task.Kind]
        SECAGG_MEMBERS: _ClassVar[Task.Kind]
    KIND_UNSPECIFIED: Task.Kind
    WELCOME: Task.Kind
    STATISTICS: Task.Kind
    FIT: Task.Kind
    EVALUATE: Task.Kind
    FINISH: Task.Kind
    SECAGG_SHARE_KEYS: Task.Kind
    SECAGG_MASKED_INPUT: Task.Kind
    SECAGG_UNMASK: Task.Kind
    SECAGG_CONSISTENCY: Task.Kind
    SECAGG_MEMBERS: Task.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    FEDERATION_JSON_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PREPROCESSING_JSON_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_FIELD_NUMBER: _ClassVar[int]
    SUCCEEDED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SECAGG_ID_FIELD_NUMBER: _ClassVar[int]
    SECAGG_FIELD_NUMBER: _ClassVar[int]
    kind: Task.Kind
    round: int
    federation_json: str
    identity: str
    model_version: int
    model: Vector
    preprocessing_json: str
    deadline_unix: float
    succeeded: bool
    message: str
    secagg_id: int
    secagg: SecAggTask
    def __init__(self, kind: _Optional[_Union[Task.Kind, str]] = ..., round: _Optional[int] = ..., federation_json: _Optional[str] = ..., identity: _Optional[str] = ..., model_version: _Optional[int] = ..., model: _Optional[_Union[Vector, _Mapping]] = ..., preprocessing_json: _Optional[str] = ..., deadline_unix: _Optional[float] = ..., succeeded: _Optional[bool] = ..., message: _Optional[str] = ..., secagg_id: _Optional[int] = ..., secagg: _Optional[_Union[SecAggTask, _Mapping]] = ...) -> None: ...

class SecAggTask(_message.Message):
    __slots__ = ("phase", "round_id", "threshold", "neighbours", "bits", "weight_bound", "clip", "roster", "inbox", "dropped", "survivors", "members", "signatures", "member_ids", "member_signatures", "member_echoes", "member_reveals")
    class Phase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        PHASE_UNSPECIFIED: _ClassVar[SecAggTask.Phase]
        FIT: _ClassVar[SecAggTask.Phase]
        EVALUATE: _ClassVar[SecAggTask.Phase]
        STATISTICS: _ClassVar[SecAggTask.Phase]
    PHASE_UNSPECIFIED: SecAggTask.Phase
    FIT: SecAggTask.Phase
    EVALUATE: SecAggTask.Phase
    STATISTICS: SecAggTask.Phase
    class RosterEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: SecAggKeys
        def __init__(self, key: _Optional[int] = ..., value: _Optional[_Union[SecAggKeys, _Mapping]] = ...) -> None: ...
    class InboxEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: bytes
        def __init__(self, key: _Optional[int] = ..., value: _Optional[bytes] = ...) -> None: ...
    class SignaturesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: bytes
        def __init__(self, key: _Optional[int] = ..., value: _Optional[bytes] = ...) -> None: ...
    class MemberSignaturesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: MemberSignature
        def __init__(self, key: _Optional[int] = ..., value: _Optional[_Union[MemberSignature, _Mapping]] = ...) -> None: ...
    class MemberEchoesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: bytes
        def __init__(self, key: _Optional[int] = ..., value: _Optional[bytes] = ...) -> None: ...
    class MemberRevealsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: bytes
        def __init__(self, key: _Optional[int] = ..., value: _Optional[bytes] = ...) -> None: ...
    PHASE_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    BITS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BOUND_FIELD_NUMBER: _ClassVar[int]
    CLIP_FIELD_NUMBER: _ClassVar[int]
    ROSTER_FIELD_NUMBER: _ClassVar[int]
    INBOX_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    SIGNATURES_FIELD_NUMBER: _ClassVar[int]
    MEMBER_IDS_FIELD_NUMBER: _ClassVar[int]
    MEMBER_SIGNATURES_FIELD_NUMBER: _ClassVar[int]
    MEMBER_ECHOES_FIELD_NUMBER: _ClassVar[int]
    MEMBER_REVEALS_FIELD_NUMBER: _ClassVar[int]
    phase: SecAggTask.Phase
    round_id: int
    threshold: float
    neighbours: str
    bits: int
    weight_bound: float
    clip: float
    roster: _containers.MessageMap[int, SecAggKeys]
    inbox: _containers.ScalarMap[int, bytes]
    dropped: _containers.RepeatedScalarFieldContainer[int]
    survivors: _containers.RepeatedScalarFieldContainer[int]
    members: _containers.RepeatedScalarFieldContainer[str]
    signatures: _containers.ScalarMap[int, bytes]
    member_ids: _containers.RepeatedScalarFieldContainer[int]
    member_signatures: _containers.MessageMap[int, MemberSignature]
    member_echoes: _containers.ScalarMap[int, bytes]
    member_reveals: _containers.ScalarMap[int, bytes]
    def __init__(self, phase: _Optional[_Union[SecAggTask.Phase, str]] = ..., round_id: _Optional[int] = ..., threshold: _Optional[float] = ..., neighbours: _Optional[str] = ..., bits: _Optional[int] = ..., weight_bound: _Optional[float] = ..., clip: _Optional[float] = ..., roster: _Optional[_Mapping[int, SecAggKeys]] = ..., inbox: _Optional[_Mapping[int, bytes]] = ..., dropped: _Optional[_Iterable[int]] = ..., survivors: _Optional[_Iterable[int]] = ..., members: _Optional[_Iterable[str]] = ..., signatures: _Optional[_Mapping[int, bytes]] = ..., member_ids: _Optional[_Iterable[int]] = ..., member_signatures: _Optional[_Mapping[int, MemberSignature]] = ..., member_echoes: _Optional[_Mapping[int, bytes]] = ..., member_reveals: _Optional[_Mapping[int, bytes]] = ...) -> None: ...

class MemberSignature(_message.Message):
    __slots__ = ("signature", "certificate", "commitment")
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    COMMITMENT_FIELD_NUMBER: _ClassVar[int]
    signature: bytes
    certificate: bytes
    commitment: bytes
    def __init__(self, signature: _Optional[bytes] = ..., certificate: _Optional[bytes] = ..., commitment: _Optional[bytes] = ...) -> None: ...

class SecAggKeys(_message.Message):
    __slots__ = ("c_pk", "s_pk", "signature", "certificate")
    C_PK_FIELD_NUMBER: _ClassVar[int]
    S_PK_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    c_pk: bytes
    s_pk: bytes
    signature: bytes
    certificate: bytes
    def __init__(self, c_pk: _Optional[bytes] = ..., s_pk: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., certificate: _Optional[bytes] = ...) -> None: ...

class StatisticsResult(_message.Message):
    __slots__ = ("round", "statistics", "secagg_keys", "rows")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STATISTICS_FIELD_NUMBER: _ClassVar[int]
    SECAGG_KEYS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    round: int
    statistics: Vector
    secagg_keys: SecAggKeys
    rows: int
    def __init__(self, round: _Optional[int] = ..., statistics: _Optional[_Union[Vector, _Mapping]] = ..., secagg_keys: _Optional[_Union[SecAggKeys, _Mapping]] = ..., rows: _Optional[int] = ...) -> None: ...

class FitResult(_message.Message):
    __slots__ = ("round", "model_version", "delta", "examples", "loss_sum", "train_seconds", "secagg_keys")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    LOSS_SUM_FIELD_NUMBER: _ClassVar[int]
    TRAIN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SECAGG_KEYS_FIELD_NUMBER: _ClassVar[int]
    round: int
    model_version: int
    delta: Vector
    examples: float
    loss_sum: float
    train_seconds: float
    secagg_keys: SecAggKeys
    def __init__(self, round: _Optional[int] = ..., model_version: _Optional[int] = ..., delta: _Optional[_Union[Vector, _Mapping]] = ..., examples: _Optional[float] = ..., loss_sum: _Optional[float] = ..., train_seconds: _Optional[float] = ..., secagg_keys: _Optional[_Union[SecAggKeys, _Mapping]] = ...) -> None: ...

class EvaluationResult(_message.Message):
    __slots__ = ("round", "model_version", "counts", "secagg_keys")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    SECAGG_KEYS_FIELD_NUMBER: _ClassVar[int]
    round: int
    model_version: int
    counts: Vector
    secagg_keys: SecAggKeys
    def __init__(self, round: _Optional[int] = ..., model_version: _Optional[int] = ..., counts: _Optional[_Union[Vector, _Mapping]] = ..., secagg_keys: _Optional[_Union[SecAggKeys, _Mapping]] = ...) -> None: ...

class SecAggResult(_message.Message):
    __slots__ = ("round", "phase", "round_id", "stage", "shares", "masked", "self_mask_shares", "key_shares", "survivors_signature", "member_signature", "member_echo", "member_reveal")
    class SharesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: bytes
        def __init__(self, key: _Optional[int] = ..., value: _Optional[bytes] = ...) -> None: ...
    class SelfMaskSharesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: bytes
        def __init__(self, key: _Optional[int] = ..., value: _Optional[bytes] = ...) -> None: ...
    class KeySharesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: bytes
        def __init__(self, key: _Optional[int] = ..., value: _Optional[bytes] = ...) -> None: ...
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    MASKED_FIELD_NUMBER: _ClassVar[int]
    SELF_MASK_SHARES_FIELD_NUMBER: _ClassVar[int]
    KEY_SHARES_FIELD_NUMBER: _ClassVar[int]
    SURVIVORS_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    MEMBER_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    MEMBER_ECHO_FIELD_NUMBER: _ClassVar[int]
    MEMBER_REVEAL_FIELD_NUMBER: _ClassVar[int]
    round: int
    phase: SecAggTask.Phase
    round_id: int
    stage: Task.Kind
    shares: _containers.ScalarMap[int, bytes]
    masked: Vector
    self_mask_shares: _containers.ScalarMap[int, bytes]
    key_shares: _containers.ScalarMap[int, bytes]
    survivors_signature: bytes
    member_signature: MemberSignature
    member_echo: bytes
    member_reveal: bytes
    def __init__(self, round: _Optional[int] = ..., phase: _Optional[_Union[SecAggTask.Phase, str]] = ..., round_id: _Optional[int] = ..., stage: _Optional[_Union[Task.Kind, str]] = ..., shares: _Optional[_Mapping[int, bytes]] = ..., masked: _Optional[_Union[Vector, _Mapping]] = ..., self_mask_shares: _Optional[_Mapping[int, bytes]] = ..., key_shares: _Optional[_Mapping[int, bytes]] = ..., survivors_signature: _Optional[bytes] = ..., member_signature: _Optional[_Union[MemberSignature, _Mapping]] = ..., member_echo: _Optional[bytes] = ..., member_reveal: _Optional[bytes] = ...) -> None: ...

class FailureReport(_message.Message):
    __slots__ = ("message", "budget_spent", "releases")
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    BUDGET_SPENT_FIELD_NUMBER: _ClassVar[int]
    RELEASES_FIELD_NUMBER: _ClassVar[int]
    message: str
    budget_spent: bool
    releases: int
    def __init__(self, message: _Optional[str] = ..., budget_spent: _Optional[bool] = ..., releases: _Optional[int] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("accepted", "message")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    message: str
    def __init__(self, accepted: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...
