from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TableVersion(_message.Message):
    __slots__ = ("table", "version")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    table: str
    version: int
    def __init__(self, table: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class ReplicateRequest(_message.Message):
    __slots__ = ("epoch", "sequence", "method", "request", "incarnation", "versions", "shard", "state", "table", "last", "sealed_tables", "rows", "lineage", "primary")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TABLE_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    SEALED_TABLES_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    LINEAGE_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    sequence: int
    method: str
    request: bytes
    incarnation: int
    versions: _containers.RepeatedCompositeFieldContainer[TableVersion]
    shard: int
    state: bytes
    table: str
    last: bool
    sealed_tables: _containers.RepeatedScalarFieldContainer[str]
    rows: bytes
    lineage: str
    primary: str
    def __init__(self, epoch: _Optional[int] = ..., sequence: _Optional[int] = ..., method: _Optional[str] = ..., request: _Optional[bytes] = ..., incarnation: _Optional[int] = ..., versions: _Optional[_Iterable[_Union[TableVersion, _Mapping]]] = ..., shard: _Optional[int] = ..., state: _Optional[bytes] = ..., table: _Optional[str] = ..., last: _Optional[bool] = ..., sealed_tables: _Optional[_Iterable[str]] = ..., rows: _Optional[bytes] = ..., lineage: _Optional[str] = ..., primary: _Optional[str] = ...) -> None: ...

class ReplicateAck(_message.Message):
    __slots__ = ("sequence", "epoch", "needs_copy", "answer", "error", "link_port", "link_key")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    NEEDS_COPY_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    LINK_PORT_FIELD_NUMBER: _ClassVar[int]
    LINK_KEY_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    epoch: int
    needs_copy: bool
    answer: bytes
    error: str
    link_port: int
    link_key: bytes
    def __init__(self, sequence: _Optional[int] = ..., epoch: _Optional[int] = ..., needs_copy: _Optional[bool] = ..., answer: _Optional[bytes] = ..., error: _Optional[str] = ..., link_port: _Optional[int] = ..., link_key: _Optional[bytes] = ...) -> None: ...
