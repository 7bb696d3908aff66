from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class WriteSnapshotRequest(_message.Message):
    __slots__ = ("uri", "job", "step", "kind", "parent", "num_shards", "last_committed")
    URI_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    LAST_COMMITTED_FIELD_NUMBER: _ClassVar[int]
    uri: str
    job: str
    step: int
    kind: str
    parent: int
    num_shards: int
    last_committed: int
    def __init__(self, uri: _Optional[str] = ..., job: _Optional[str] = ..., step: _Optional[int] = ..., kind: _Optional[str] = ..., parent: _Optional[int] = ..., num_shards: _Optional[int] = ..., last_committed: _Optional[int] = ...) -> None: ...

class WriteSnapshotResponse(_message.Message):
    __slots__ = ("records_json",)
    RECORDS_JSON_FIELD_NUMBER: _ClassVar[int]
    records_json: str
    def __init__(self, records_json: _Optional[str] = ...) -> None: ...

class SnapshotProgress(_message.Message):
    __slots__ = ("staged", "records_json")
    STAGED_FIELD_NUMBER: _ClassVar[int]
    RECORDS_JSON_FIELD_NUMBER: _ClassVar[int]
    staged: bool
    records_json: str
    def __init__(self, staged: _Optional[bool] = ..., records_json: _Optional[str] = ...) -> None: ...
