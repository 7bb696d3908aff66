"""Protobuf messages whose bulk bytes fields (keys, gradients, values) travel without copies.

upb copies a bytes field at every step: when it is set, when the message is serialised (twice:
into the encoder, then into the Python bytes), when it is parsed, and at every read. A step of a
26-table model moves megabytes in one field of a LookupMulti reply and of a PushMulti, and a
shard with a standby forwards each push inside a ReplicateRequest, so those copies were a large
part of a shard's CPU per step.

Here a bulk field is written once, straight into the serialised message (`encode`), and read as
a memoryview over the bytes the message arrived in (`parse`); the message's other fields go
through protobuf as always. Both sides stay wire-compatible with any protobuf peer: a serialised
message is the concatenation of its fields in any order, and a parser merges a concatenation.

    >>> from ps.rpc import ps_pb2
    >>> data = encode(ps_pb2.LookupRequest(table="t", dim=4), keys=b"\\x01" * 8)
    >>> ps_pb2.LookupRequest.FromString(data).keys == b"\\x01" * 8
    True
    >>> request = parse(ps_pb2.LookupRequest, data, ("keys",))
    >>> request.table, bytes(request.keys) == b"\\x01" * 8, request.SerializeToString() is data
    ('t', True, True)
"""

from __future__ import annotations

import functools
from typing import Any

from google.protobuf.message import DecodeError, Message

_LENGTH_DELIMITED = 2
# Past this many fields a message is parsed by protobuf alone (every field copied, as before):
# the scan below is Python, and must not let a message of millions of tiny fields hold a loop.
_MAX_SCANNED_FIELDS = 4096
_EMPTY = memoryview(b"")


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode(message: Message, **bulk: Any) -> bytes:
    """`message` serialised with each `name=buffer` as its bytes field `name`, the buffer copied
    once, into the result. The message must leave those fields unset. A buffer is any
    C-contiguous object with the buffer protocol (bytes, memoryview, numpy array); an empty one
    is left out, as protobuf leaves out an empty bytes field."""
    return b"".join(encode_parts(message, **bulk))


def encode_parts(message: Message, **bulk: Any) -> list[Any]:
    """What `encode` joins, not joined: the buffers are not copied (a writer that takes several
    buffers, `socket.sendmsg`, sends them as they are)."""
    fields = message.DESCRIPTOR.fields_by_name
    parts: list[Any] = [message.SerializeToString()]
    for name, data in bulk.items():
        field = fields.get(name)
        if field is None or field.type != field.TYPE_BYTES or field.is_repeated:
            raise TypeError(f"{name}: not a singular bytes field of {message.DESCRIPTOR.full_name}")
        size = memoryview(data).nbytes
        if size:
            parts += (_varint(field.number << 3 | _LENGTH_DELIMITED), _varint(size), data)
    return parts


def field_parts(number: int, data: bytes) -> tuple[bytes, bytes, bytes]:
    """A length-delimited field `number` (a message or bytes field, one item of a repeated one)
    holding `data`, as the parts to join into a message's bytes."""
    return _varint(number << 3 | _LENGTH_DELIMITED), _varint(len(data)), data


def serialize(message: Message | bytes) -> bytes:
    """A gRPC serializer for a method whose messages may come already encoded (`encode`)."""
    return message if isinstance(message, bytes) else message.SerializeToString()


class BulkMessage:
    """A message parsed by `parse`: its bulk fields are read-only memoryviews over the bytes it
    was parsed from (empty when absent); every other attribute is the protobuf message's.
    SerializeToString returns those bytes, as they came."""

    __slots__ = ("message", "_bulk", "_names", "_data")

    def __init__(self, message: Message, bulk: dict[str, memoryview], names: frozenset[str], data: bytes) -> None:
        self.message = message
        self._bulk = bulk
        self._names = names
        self._data = data

    def __getattr__(self, name: str) -> Any:
        if name in self._names:
            return self._bulk.get(name, _EMPTY)
        return getattr(self.message, name)

    def SerializeToString(self, **_: Any) -> bytes:  # noqa: N802 - protobuf's name
        return self._data if isinstance(self._data, bytes) else bytes(self._data)

    def ByteSize(self) -> int:  # noqa: N802 - protobuf's name
        return len(self._data)

    def HasField(self, name: str) -> bool:  # noqa: N802 - protobuf's name
        if name in self._names:
            raise ValueError(f"{name}: a proto3 bytes field has no presence")
        return self.message.HasField(name)


def _read_varint(data: bytes, pos: int) -> int:
    """The position after the varint at `pos` (its value is not needed)."""
    end = min(len(data), pos + 10)
    while pos < end:
        if data[pos] < 0x80:
            return pos + 1
        pos += 1
    raise DecodeError("truncated or overlong varint")


def _read_length(data: bytes, pos: int) -> tuple[int, int]:
    value, shift, end = 0, 0, min(len(data), pos + 10)
    while pos < end:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return value, pos
        shift += 7
    raise DecodeError("truncated or overlong varint")


@functools.lru_cache(maxsize=64)
def _bulk_fields(cls: type[Message], bulk: tuple[str, ...]) -> tuple[frozenset[str], dict[int, str]]:
    """(the names of `bulk`, {field number: name}): read once per message type, not per message."""
    return frozenset(bulk), {cls.DESCRIPTOR.fields_by_name[name].number: name for name in bulk}


def _length_delimited(data: bytes | memoryview) -> list[tuple[int, int, int, int]] | None:
    """(field number, where its tag starts, where its value starts, where it ends) of each
    length-delimited field of `data`, in order; None where protobuf must parse the message whole
    (past _MAX_SCANNED_FIELDS fields, or a group or unknown wire type). Raises DecodeError where
    protobuf would for a field it cannot read (truncated, past the end, field number 0)."""
    found: list[tuple[int, int, int, int]] = []
    pos, fields, size = 0, 0, len(data)
    while pos < size:
        fields += 1
        if fields > _MAX_SCANNED_FIELDS:
            return None
        start = pos
        tag, pos = _read_length(data, pos)
        number, wire_type = tag >> 3, tag & 7
        if number == 0:
            raise DecodeError("field number 0")
        if wire_type == _LENGTH_DELIMITED:
            length, pos = _read_length(data, pos)
            end = pos + length
            if end > size:
                raise DecodeError(f"field {number}: {length} bytes, {size - pos} left in the message")
            found.append((number, start, pos, end))
            pos = end
        elif wire_type == 0:
            pos = _read_varint(data, pos)
        elif wire_type == 1 or wire_type == 5:
            pos += 8 if wire_type == 1 else 4
        else:
            return None  # groups (or garbage): protobuf decides
    if pos > size:
        raise DecodeError("the last field runs past the end of the message")
    return found


def parse(cls: type[Message], data: bytes | memoryview, bulk: tuple[str, ...]) -> BulkMessage:
    """`cls.FromString(data)`, with its singular bytes fields `bulk` read as views over `data`
    rather than copied. Raises DecodeError where FromString would. A message that repeats a bulk
    field reads the last, as protobuf does."""
    names, numbers = _bulk_fields(cls, bulk)
    fields = _length_delimited(data)
    if fields is None:
        return _parsed_whole(cls, data, names)
    view = memoryview(data)
    views: dict[str, memoryview] = {}
    rest: list[memoryview] = []  # the other fields, in order
    span = 0
    for number, start, begin, end in fields:
        if number in numbers:
            rest.append(view[span:start])
            views[numbers[number]] = view[begin:end]
            span = end
    if not views:
        return BulkMessage(cls.FromString(data), views, names, data)
    rest.append(view[span:])
    return BulkMessage(cls.FromString(b"".join(rest)), views, names, data)


def _parsed_whole(cls: type[Message], data: bytes, names: frozenset[str]) -> BulkMessage:
    message = cls.FromString(data)
    views = {name: memoryview(getattr(message, name)) for name in names}
    return BulkMessage(message, views, names, data)


def parse_repeated(
    cls: type[Message], data: bytes | memoryview, field: str, item_cls: type[Message], item_bulk: tuple[str, ...]
) -> tuple[Message, list[BulkMessage]]:
    """`cls.FromString(data)` in two parts: the message without its repeated message field `field`,
    and that field's items in order, each read by `parse(item_cls, item, item_bulk)`, so their bulk
    fields are views over `data` (a reply of many tables' rows is not copied). Raises DecodeError
    where FromString would; an occurrence of `field` with another wire type stays in the message,
    an unknown field there, as protobuf keeps it."""
    number = cls.DESCRIPTOR.fields_by_name[field].number
    fields = _length_delimited(data)
    if fields is None:
        message = cls.FromString(bytes(data))
        parsed = [parse(item_cls, item.SerializeToString(), item_bulk) for item in getattr(message, field)]
        message.ClearField(field)
        return message, parsed
    view = memoryview(data)
    items: list[memoryview] = []
    rest: list[memoryview] = []  # the other fields, in order
    span = 0
    for found, start, begin, end in fields:
        if found == number:
            rest.append(view[span:start])
            items.append(view[begin:end])
            span = end
    rest.append(view[span:])
    return cls.FromString(b"".join(rest)), [parse(item_cls, item, item_bulk) for item in items]


def parser(cls: type[Message], bulk: tuple[str, ...]):
    """A gRPC deserializer: bytes -> parse(cls, bytes, bulk)."""
    return lambda data: parse(cls, data, bulk)


def zero_copy_handlers(handlers: dict[str, Any], bulk: dict[str, tuple[str, ...]]) -> dict[str, Any]:
    """gRPC method handlers (by full method name) with the methods of `bulk` parsing their requests
    by `parse`, those fields read as views, and every handler of `handlers` sending a reply that
    is already bytes (`encode`) as it is."""
    out = {}
    for method, handler in handlers.items():
        changes: dict[str, Any] = {}
        if handler.response_serializer is not None:
            changes["response_serializer"] = serialize
        if method in bulk:
            cls = handler.request_deserializer.__self__  # the generated code passes Message.FromString
            changes["request_deserializer"] = parser(cls, bulk[method])
        out[method] = handler._replace(**changes)
    return out
