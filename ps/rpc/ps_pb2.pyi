from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    INT8_ROWWISE: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT16: DType
INT8_ROWWISE: DType

class LookupRequest(_message.Message):
    __slots__ = ("table", "keys", "dim", "step")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    table: str
    keys: bytes
    dim: int
    step: int
    def __init__(self, table: _Optional[str] = ..., keys: _Optional[bytes] = ..., dim: _Optional[int] = ..., step: _Optional[int] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("values", "dim", "dtype", "version")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    values: bytes
    dim: int
    dtype: DType
    version: int
    def __init__(self, values: _Optional[bytes] = ..., dim: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., version: _Optional[int] = ...) -> None: ...

class PushId(_message.Message):
    __slots__ = ("client_id", "sequence")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    sequence: int
    def __init__(self, client_id: _Optional[str] = ..., sequence: _Optional[int] = ...) -> None: ...

class PushRequest(_message.Message):
    __slots__ = ("table", "keys", "grads", "dim", "dtype", "step", "push_id", "counts")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    GRADS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    PUSH_ID_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    table: str
    keys: bytes
    grads: bytes
    dim: int
    dtype: DType
    step: int
    push_id: PushId
    counts: bytes
    def __init__(self, table: _Optional[str] = ..., keys: _Optional[bytes] = ..., grads: _Optional[bytes] = ..., dim: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., step: _Optional[int] = ..., push_id: _Optional[_Union[PushId, _Mapping]] = ..., counts: _Optional[bytes] = ...) -> None: ...

class PushResponse(_message.Message):
    __slots__ = ("version", "num_updated", "num_inserted", "num_evicted", "duplicate")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_UPDATED_FIELD_NUMBER: _ClassVar[int]
    NUM_INSERTED_FIELD_NUMBER: _ClassVar[int]
    NUM_EVICTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    version: int
    num_updated: int
    num_inserted: int
    num_evicted: int
    duplicate: bool
    def __init__(self, version: _Optional[int] = ..., num_updated: _Optional[int] = ..., num_inserted: _Optional[int] = ..., num_evicted: _Optional[int] = ..., duplicate: _Optional[bool] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TableStats(_message.Message):
    __slots__ = ("name", "dim", "rows", "memory_bytes", "version", "step", "num_admitted", "num_evicted")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    NUM_ADMITTED_FIELD_NUMBER: _ClassVar[int]
    NUM_EVICTED_FIELD_NUMBER: _ClassVar[int]
    name: str
    dim: int
    rows: int
    memory_bytes: int
    version: int
    step: int
    num_admitted: int
    num_evicted: int
    def __init__(self, name: _Optional[str] = ..., dim: _Optional[int] = ..., rows: _Optional[int] = ..., memory_bytes: _Optional[int] = ..., version: _Optional[int] = ..., step: _Optional[int] = ..., num_admitted: _Optional[int] = ..., num_evicted: _Optional[int] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("job", "shard", "num_shards", "tables")
    JOB_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    job: str
    shard: int
    num_shards: int
    tables: _containers.RepeatedCompositeFieldContainer[TableStats]
    def __init__(self, job: _Optional[str] = ..., shard: _Optional[int] = ..., num_shards: _Optional[int] = ..., tables: _Optional[_Iterable[_Union[TableStats, _Mapping]]] = ...) -> None: ...

class SubscribeRequest(_message.Message):
    __slots__ = ("table", "from_version", "incarnation", "full_sync", "committed", "with_dense", "stored_rows", "heartbeat_group", "stream_id")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    FROM_VERSION_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    FULL_SYNC_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    WITH_DENSE_FIELD_NUMBER: _ClassVar[int]
    STORED_ROWS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_GROUP_FIELD_NUMBER: _ClassVar[int]
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    table: str
    from_version: int
    incarnation: int
    full_sync: bool
    committed: bool
    with_dense: bool
    stored_rows: bool
    heartbeat_group: str
    stream_id: int
    def __init__(self, table: _Optional[str] = ..., from_version: _Optional[int] = ..., incarnation: _Optional[int] = ..., full_sync: _Optional[bool] = ..., committed: _Optional[bool] = ..., with_dense: _Optional[bool] = ..., stored_rows: _Optional[bool] = ..., heartbeat_group: _Optional[str] = ..., stream_id: _Optional[int] = ...) -> None: ...

class VersionAck(_message.Message):
    __slots__ = ("version", "ack_time", "num_keys")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ACK_TIME_FIELD_NUMBER: _ClassVar[int]
    NUM_KEYS_FIELD_NUMBER: _ClassVar[int]
    version: int
    ack_time: float
    num_keys: int
    def __init__(self, version: _Optional[int] = ..., ack_time: _Optional[float] = ..., num_keys: _Optional[int] = ...) -> None: ...

class UpdateBatch(_message.Message):
    __slots__ = ("table", "shard", "incarnation", "from_version", "to_version", "keys", "values", "dim", "dtype", "deleted_keys", "reset", "last", "acks", "sent_time", "step", "dense_step", "dense_state", "dense_format", "commit_time", "stream_id")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    FROM_VERSION_FIELD_NUMBER: _ClassVar[int]
    TO_VERSION_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DELETED_KEYS_FIELD_NUMBER: _ClassVar[int]
    RESET_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    ACKS_FIELD_NUMBER: _ClassVar[int]
    SENT_TIME_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    DENSE_STEP_FIELD_NUMBER: _ClassVar[int]
    DENSE_STATE_FIELD_NUMBER: _ClassVar[int]
    DENSE_FORMAT_FIELD_NUMBER: _ClassVar[int]
    COMMIT_TIME_FIELD_NUMBER: _ClassVar[int]
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    table: str
    shard: int
    incarnation: int
    from_version: int
    to_version: int
    keys: bytes
    values: bytes
    dim: int
    dtype: DType
    deleted_keys: bytes
    reset: bool
    last: bool
    acks: _containers.RepeatedCompositeFieldContainer[VersionAck]
    sent_time: float
    step: int
    dense_step: int
    dense_state: bytes
    dense_format: str
    commit_time: float
    stream_id: int
    def __init__(self, table: _Optional[str] = ..., shard: _Optional[int] = ..., incarnation: _Optional[int] = ..., from_version: _Optional[int] = ..., to_version: _Optional[int] = ..., keys: _Optional[bytes] = ..., values: _Optional[bytes] = ..., dim: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., deleted_keys: _Optional[bytes] = ..., reset: _Optional[bool] = ..., last: _Optional[bool] = ..., acks: _Optional[_Iterable[_Union[VersionAck, _Mapping]]] = ..., sent_time: _Optional[float] = ..., step: _Optional[int] = ..., dense_step: _Optional[int] = ..., dense_state: _Optional[bytes] = ..., dense_format: _Optional[str] = ..., commit_time: _Optional[float] = ..., stream_id: _Optional[int] = ...) -> None: ...

class SubscribeTablesRequest(_message.Message):
    __slots__ = ("subscribe", "stop", "window", "credit")
    SUBSCRIBE_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    CREDIT_FIELD_NUMBER: _ClassVar[int]
    subscribe: _containers.RepeatedCompositeFieldContainer[SubscribeRequest]
    stop: _containers.RepeatedScalarFieldContainer[int]
    window: int
    credit: _containers.RepeatedCompositeFieldContainer[StreamCredit]
    def __init__(self, subscribe: _Optional[_Iterable[_Union[SubscribeRequest, _Mapping]]] = ..., stop: _Optional[_Iterable[int]] = ..., window: _Optional[int] = ..., credit: _Optional[_Iterable[_Union[StreamCredit, _Mapping]]] = ...) -> None: ...

class StreamCredit(_message.Message):
    __slots__ = ("stream_id", "messages")
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    stream_id: int
    messages: int
    def __init__(self, stream_id: _Optional[int] = ..., messages: _Optional[int] = ...) -> None: ...

class TableStreamEnd(_message.Message):
    __slots__ = ("table", "code", "message", "stream_id")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    table: str
    code: int
    message: str
    stream_id: int
    def __init__(self, table: _Optional[str] = ..., code: _Optional[int] = ..., message: _Optional[str] = ..., stream_id: _Optional[int] = ...) -> None: ...

class SubscribeTablesReply(_message.Message):
    __slots__ = ("batches", "ended")
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    ENDED_FIELD_NUMBER: _ClassVar[int]
    batches: _containers.RepeatedCompositeFieldContainer[UpdateBatch]
    ended: _containers.RepeatedCompositeFieldContainer[TableStreamEnd]
    def __init__(self, batches: _Optional[_Iterable[_Union[UpdateBatch, _Mapping]]] = ..., ended: _Optional[_Iterable[_Union[TableStreamEnd, _Mapping]]] = ...) -> None: ...

class CommitRequest(_message.Message):
    __slots__ = ("step", "dense_state", "dense_format")
    STEP_FIELD_NUMBER: _ClassVar[int]
    DENSE_STATE_FIELD_NUMBER: _ClassVar[int]
    DENSE_FORMAT_FIELD_NUMBER: _ClassVar[int]
    step: int
    dense_state: bytes
    dense_format: str
    def __init__(self, step: _Optional[int] = ..., dense_state: _Optional[bytes] = ..., dense_format: _Optional[str] = ...) -> None: ...

class CommitResponse(_message.Message):
    __slots__ = ("step", "versions")
    STEP_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    step: int
    versions: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, step: _Optional[int] = ..., versions: _Optional[_Iterable[int]] = ...) -> None: ...

class LookupBatchRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[LookupRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[LookupRequest, _Mapping]]] = ...) -> None: ...

class LookupBatchResponse(_message.Message):
    __slots__ = ("responses",)
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    responses: _containers.RepeatedCompositeFieldContainer[LookupResponse]
    def __init__(self, responses: _Optional[_Iterable[_Union[LookupResponse, _Mapping]]] = ...) -> None: ...

class PushBatchRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[PushRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[PushRequest, _Mapping]]] = ...) -> None: ...

class PushBatchResponse(_message.Message):
    __slots__ = ("responses",)
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    responses: _containers.RepeatedCompositeFieldContainer[PushResponse]
    def __init__(self, responses: _Optional[_Iterable[_Union[PushResponse, _Mapping]]] = ...) -> None: ...

class MultiLookupRequest(_message.Message):
    __slots__ = ("tables", "dims", "offsets", "keys", "step")
    TABLES_FIELD_NUMBER: _ClassVar[int]
    DIMS_FIELD_NUMBER: _ClassVar[int]
    OFFSETS_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    tables: _containers.RepeatedScalarFieldContainer[str]
    dims: _containers.RepeatedScalarFieldContainer[int]
    offsets: _containers.RepeatedScalarFieldContainer[int]
    keys: bytes
    step: int
    def __init__(self, tables: _Optional[_Iterable[str]] = ..., dims: _Optional[_Iterable[int]] = ..., offsets: _Optional[_Iterable[int]] = ..., keys: _Optional[bytes] = ..., step: _Optional[int] = ...) -> None: ...

class MultiLookupResponse(_message.Message):
    __slots__ = ("values", "dtype", "versions")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    values: bytes
    dtype: DType
    versions: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, values: _Optional[bytes] = ..., dtype: _Optional[_Union[DType, str]] = ..., versions: _Optional[_Iterable[int]] = ...) -> None: ...

class MultiPushRequest(_message.Message):
    __slots__ = ("tables", "dims", "offsets", "keys", "grads", "dtype", "step", "push_id", "counts")
    TABLES_FIELD_NUMBER: _ClassVar[int]
    DIMS_FIELD_NUMBER: _ClassVar[int]
    OFFSETS_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    GRADS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    PUSH_ID_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    tables: _containers.RepeatedScalarFieldContainer[str]
    dims: _containers.RepeatedScalarFieldContainer[int]
    offsets: _containers.RepeatedScalarFieldContainer[int]
    keys: bytes
    grads: bytes
    dtype: DType
    step: int
    push_id: PushId
    counts: bytes
    def __init__(self, tables: _Optional[_Iterable[str]] = ..., dims: _Optional[_Iterable[int]] = ..., offsets: _Optional[_Iterable[int]] = ..., keys: _Optional[bytes] = ..., grads: _Optional[bytes] = ..., dtype: _Optional[_Union[DType, str]] = ..., step: _Optional[int] = ..., push_id: _Optional[_Union[PushId, _Mapping]] = ..., counts: _Optional[bytes] = ...) -> None: ...

class MultiPushResponse(_message.Message):
    __slots__ = ("versions", "num_updated", "num_inserted", "num_evicted", "duplicate")
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    NUM_UPDATED_FIELD_NUMBER: _ClassVar[int]
    NUM_INSERTED_FIELD_NUMBER: _ClassVar[int]
    NUM_EVICTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedScalarFieldContainer[int]
    num_updated: int
    num_inserted: int
    num_evicted: int
    duplicate: bool
    def __init__(self, versions: _Optional[_Iterable[int]] = ..., num_updated: _Optional[int] = ..., num_inserted: _Optional[int] = ..., num_evicted: _Optional[int] = ..., duplicate: _Optional[bool] = ...) -> None: ...
