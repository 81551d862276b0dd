from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Vector(_message.Message):
    __slots__ = ("dtype", "length", "data")
    class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        DTYPE_UNSPECIFIED: _ClassVar[Vector.DType]
        FLOAT32: _ClassVar[Vector.DType]
        FLOAT64: _ClassVar[Vector.DType]
    DTYPE_UNSPECIFIED: Vector.DType
    FLOAT32: Vector.DType
    FLOAT64: Vector.DType
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: Vector.DType
    length: int
    data: bytes
    def __init__(self, dtype: _Optional[_Union[Vector.DType, str]] = ..., length: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class ConnectRequest(_message.Message):
    __slots__ = ("protocol_version", "federation")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    FEDERATION_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    federation: str
    def __init__(self, protocol_version: _Optional[int] = ..., federation: _Optional[str] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("kind", "round", "federation_json", "identity", "model_version", "model", "preprocessing_json", "deadline_unix", "succeeded", "message")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[Task.Kind]
        WELCOME: _ClassVar[Task.Kind]
        STATISTICS: _ClassVar[Task.Kind]
        FIT: _ClassVar[Task.Kind]
        EVALUATE: _ClassVar[Task.Kind]
        FINISH: _ClassVar[Task.Kind]
    KIND_UNSPECIFIED: Task.Kind
    WELCOME: Task.Kind
    STATISTICS: Task.Kind
    FIT: Task.Kind
    EVALUATE: Task.Kind
    FINISH: Task.Kind
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
    def __init__(self, kind: _Optional[_Union[Task.Kind, str]] = ..., round: _Optional[int] = ..., federation_json: _Optional[str] = ..., identity: _Optional[str] = ..., model_version: _Optional[int] = ..., model: _Optional[_Union[Vector, _Mapping]] = ..., preprocessing_json: _Optional[str] = ..., deadline_unix: _Optional[float] = ..., succeeded: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class StatisticsResult(_message.Message):
    __slots__ = ("round", "statistics")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STATISTICS_FIELD_NUMBER: _ClassVar[int]
    round: int
    statistics: Vector
    def __init__(self, round: _Optional[int] = ..., statistics: _Optional[_Union[Vector, _Mapping]] = ...) -> None: ...

class FitResult(_message.Message):
    __slots__ = ("round", "model_version", "delta", "examples", "loss_sum", "train_seconds")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    LOSS_SUM_FIELD_NUMBER: _ClassVar[int]
    TRAIN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    round: int
    model_version: int
    delta: Vector
    examples: float
    loss_sum: float
    train_seconds: float
    def __init__(self, round: _Optional[int] = ..., model_version: _Optional[int] = ..., delta: _Optional[_Union[Vector, _Mapping]] = ..., examples: _Optional[float] = ..., loss_sum: _Optional[float] = ..., train_seconds: _Optional[float] = ...) -> None: ...

class EvaluationResult(_message.Message):
    __slots__ = ("round", "model_version", "counts")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    round: int
    model_version: int
    counts: Vector
    def __init__(self, round: _Optional[int] = ..., model_version: _Optional[int] = ..., counts: _Optional[_Union[Vector, _Mapping]] = ...) -> None: ...

class FailureReport(_message.Message):
    __slots__ = ("message",)
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    message: str
    def __init__(self, message: _Optional[str] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("accepted", "message")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    message: str
    def __init__(self, accepted: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...
