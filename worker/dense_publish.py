"""The dense tower's state as it travels with a committed step (CommitRequest.dense_state).

    format "safetensors" (written): the tower's state_dict in the safetensors layout: an 8-byte
    little-endian header length N, N bytes of JSON naming each tensor's dtype, shape and byte
    range, then the tensors' bytes, little-endian and contiguous. Any safetensors reader loads it
    (`safetensors.torch.load(state)`); decode_dense does without that package.
    format "torch.save" (read only, what rank 0 wrote before): torch.load(io.BytesIO(state),
    weights_only=True).

Rank 0 of a sync job sends it with Commit(step) every `train.publish_dense_every` steps, on the
training thread (the next step changes the tower in place), so encoding it is on the step's path:
torch.save took 4.0 ms for the 0.6 MB tower of `embps bench train`, this layout 0.7 ms (one copy of
its bytes; for a 20 MB tower both are about that copy, ~10 ms). The replica serves the bytes as
they came (it never imports torch) beside the rows of that step.
"""

from __future__ import annotations

import io
import json
import struct

import torch
from torch import nn

DENSE_FORMAT = "safetensors"
TORCH_SAVE_FORMAT = "torch.save"

# safetensors' dtype names (its format's spec) for the dtypes a state_dict holds.
_DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}
_HEADER_LENGTH = struct.Struct("<Q")
MAX_HEADER_BYTES = 100_000_000  # as safetensors' own reader bounds it: a larger length is not a header


def encode_dense(model: nn.Module) -> bytes:
    """model's state_dict as bytes in DENSE_FORMAT: each tensor's bytes copied once, into the result."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    arrays = []
    offset = 0
    for name, tensor in model.state_dict().items():  # detached tensors
        if tensor.dtype not in _DTYPE_NAMES:
            raise ValueError(f"dense tower: {name} is {tensor.dtype}, which the dense format does not carry")
        tensor = tensor.cpu().contiguous()  # the same tensor when it is both already
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]
        }
        offset += size
        if size:  # numpy has no bfloat16: its bytes go as int16's
            arrays.append((tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor).numpy())
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the tensors start 8-byte aligned
    return b"".join([_HEADER_LENGTH.pack(len(text)), text, *arrays])


def decode_dense(state: bytes, fmt: str = DENSE_FORMAT) -> dict[str, torch.Tensor]:
    """The state_dict of bytes in `fmt` (DENSE_FORMAT, or TORCH_SAVE_FORMAT as rank 0 wrote it
    before); ValueError for another format or bytes that are not a well-formed state of it."""
    if fmt == TORCH_SAVE_FORMAT:
        return torch.load(io.BytesIO(state), weights_only=True)
    if fmt != DENSE_FORMAT:
        raise ValueError(f"dense format: {fmt!r} is not supported, only {DENSE_FORMAT!r} and {TORCH_SAVE_FORMAT!r}")
    return _decode_safetensors(state)


def _decode_safetensors(state: bytes) -> dict[str, torch.Tensor]:
    if len(state) < _HEADER_LENGTH.size:
        raise ValueError(f"dense state: {len(state)} bytes, shorter than the header's length")
    (length,) = _HEADER_LENGTH.unpack_from(state)
    start = _HEADER_LENGTH.size + length
    if length > MAX_HEADER_BYTES or start > len(state):
        raise ValueError(f"dense state: a header of {length} bytes in a state of {len(state)}")
    try:
        header = json.loads(bytes(state[_HEADER_LENGTH.size : start]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"dense state: the header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ValueError("dense state: the header is not a JSON object")
    data = bytearray(memoryview(state)[start:])  # one copy: the tensors own their bytes (state is read-only)
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        tensors[name] = _tensor(name, entry, data)
    return tensors


def _tensor(name: str, entry: object, data: bytearray) -> torch.Tensor:
    """The tensor `entry` of the header describes, a view of data; ValueError naming it when the
    entry is malformed or its bytes do not fit."""
    try:
        dtype = _DTYPES[entry["dtype"]]
        shape = [int(n) for n in entry["shape"]]
        begin, end = (int(n) for n in entry["data_offsets"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"dense state: tensor {name!r}: a malformed entry {entry!r} ({exc!r})") from None
    count = 1
    for n in shape:
        if n < 0:
            raise ValueError(f"dense state: tensor {name!r}: shape {shape}")
        count *= n
    if not 0 <= begin <= end <= len(data) or end - begin != count * dtype.itemsize:
        raise ValueError(
            f"dense state: tensor {name!r}: bytes {begin}..{end} of {len(data)} for {count} x {entry['dtype']}"
        )
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(data, dtype=dtype, count=count, offset=begin).reshape(shape)
