from ps.rpc import ps_pb2 as _ps_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ServingLookupRequest(_message.Message):
    __slots__ = ("table", "keys", "dim", "dtype")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    table: str
    keys: bytes
    dim: int
    dtype: _ps_pb2.DType
    def __init__(self, table: _Optional[str] = ..., keys: _Optional[bytes] = ..., dim: _Optional[int] = ..., dtype: _Optional[_Union[_ps_pb2.DType, str]] = ...) -> None: ...

class ServedShard(_message.Message):
    __slots__ = ("shard", "version", "incarnation", "stale")
    SHARD_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    STALE_FIELD_NUMBER: _ClassVar[int]
    shard: int
    version: int
    incarnation: int
    stale: bool
    def __init__(self, shard: _Optional[int] = ..., version: _Optional[int] = ..., incarnation: _Optional[int] = ..., stale: _Optional[bool] = ...) -> None: ...

class ServingLookupResponse(_message.Message):
    __slots__ = ("values", "dim", "dtype", "found", "shards", "model_version")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    FOUND_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    values: bytes
    dim: int
    dtype: _ps_pb2.DType
    found: bytes
    shards: _containers.RepeatedCompositeFieldContainer[ServedShard]
    model_version: int
    def __init__(self, values: _Optional[bytes] = ..., dim: _Optional[int] = ..., dtype: _Optional[_Union[_ps_pb2.DType, str]] = ..., found: _Optional[bytes] = ..., shards: _Optional[_Iterable[_Union[ServedShard, _Mapping]]] = ..., model_version: _Optional[int] = ...) -> None: ...

class ServingLookupManyRequest(_message.Message):
    __slots__ = ("lookups",)
    LOOKUPS_FIELD_NUMBER: _ClassVar[int]
    lookups: _containers.RepeatedCompositeFieldContainer[ServingLookupRequest]
    def __init__(self, lookups: _Optional[_Iterable[_Union[ServingLookupRequest, _Mapping]]] = ...) -> None: ...

class ServingLookupManyResponse(_message.Message):
    __slots__ = ("results", "model_version")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ServingLookupResponse]
    model_version: int
    def __init__(self, results: _Optional[_Iterable[_Union[ServingLookupResponse, _Mapping]]] = ..., model_version: _Optional[int] = ...) -> None: ...

class DenseModelRequest(_message.Message):
    __slots__ = ("step",)
    STEP_FIELD_NUMBER: _ClassVar[int]
    step: int
    def __init__(self, step: _Optional[int] = ...) -> None: ...

class DenseModelResponse(_message.Message):
    __slots__ = ("step", "state", "format")
    STEP_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    step: int
    state: bytes
    format: str
    def __init__(self, step: _Optional[int] = ..., state: _Optional[bytes] = ..., format: _Optional[str] = ...) -> None: ...

class ServingStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ShardStatus(_message.Message):
    __slots__ = ("table", "shard", "version", "incarnation", "connected", "stale", "seconds_since_message", "rows", "num_resyncs", "last_error")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    STALE_FIELD_NUMBER: _ClassVar[int]
    SECONDS_SINCE_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    NUM_RESYNCS_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    table: str
    shard: int
    version: int
    incarnation: int
    connected: bool
    stale: bool
    seconds_since_message: float
    rows: int
    num_resyncs: int
    last_error: str
    def __init__(self, table: _Optional[str] = ..., shard: _Optional[int] = ..., version: _Optional[int] = ..., incarnation: _Optional[int] = ..., connected: _Optional[bool] = ..., stale: _Optional[bool] = ..., seconds_since_message: _Optional[float] = ..., rows: _Optional[int] = ..., num_resyncs: _Optional[int] = ..., last_error: _Optional[str] = ...) -> None: ...

class ServingStatusResponse(_message.Message):
    __slots__ = ("shards", "model_version", "newest_step", "waiting_bytes")
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    NEWEST_STEP_FIELD_NUMBER: _ClassVar[int]
    WAITING_BYTES_FIELD_NUMBER: _ClassVar[int]
    shards: _containers.RepeatedCompositeFieldContainer[ShardStatus]
    model_version: int
    newest_step: int
    waiting_bytes: int
    def __init__(self, shards: _Optional[_Iterable[_Union[ShardStatus, _Mapping]]] = ..., model_version: _Optional[int] = ..., newest_step: _Optional[int] = ..., waiting_bytes: _Optional[int] = ...) -> None: ...
