"""The dense tower's bytes (worker/dense_publish.py): bit-exact round trips, real safetensors both
ways, the old torch.save bytes still read, and malformed bytes refused with ValueError."""

from __future__ import annotations

import io
import json
import struct

import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from worker.dense_publish import DENSE_FORMAT, TORCH_SAVE_FORMAT, decode_dense, encode_dense
from worker.model import DLRMDenseTower
from worker.model_config import ModelConfig


def _tower() -> nn.Module:
    torch.manual_seed(5)
    return DLRMDenseTower(ModelConfig(num_dense=13, num_sparse=26, dim=16, bottom_sizes=(64, 16), top_sizes=(64,)))


class _Buffers(nn.Module):
    """A state_dict of every dtype and shape the format carries, odd sizes between them."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("bf16", torch.randn(3, 5).to(torch.bfloat16))
        self.register_buffer("scalar", torch.tensor(7, dtype=torch.int64))
        self.register_buffer("empty", torch.zeros(0, 5))
        self.register_buffer("flags", torch.tensor([True, False, True]))
        self.register_buffer("i8", torch.arange(5, dtype=torch.int8))
        self.register_buffer("f16", torch.randn(7).half())
        self.register_buffer("f64", torch.randn(2, 2, dtype=torch.float64))
        self.register_buffer("strided", torch.randn(4, 6).t())  # not contiguous


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert got[name].shape == tensor.shape, name
        assert torch.equal(got[name], tensor), name


@pytest.mark.parametrize("module", [_tower, _Buffers], ids=["tower", "every-dtype"])
def test_the_state_comes_back_bit_for_bit_and_is_real_safetensors(module) -> None:
    model = module()
    state = encode_dense(model)
    assert DENSE_FORMAT == "safetensors"
    _assert_same(decode_dense(state), model.state_dict())
    _assert_same(safetensors.torch.load(state), model.state_dict())  # any safetensors reader takes it
    (length,) = struct.unpack_from("<Q", state)
    assert (8 + length) % 8 == 0  # the tensors start aligned


def test_bytes_that_safetensors_wrote_decode() -> None:
    want = _Buffers().state_dict()
    contiguous = {name: tensor.contiguous() for name, tensor in want.items()}
    _assert_same(decode_dense(safetensors.torch.save(contiguous)), want)


def test_a_decoded_state_loads_into_the_tower_and_owns_its_bytes() -> None:
    model, other = _tower(), _tower()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    state = encode_dense(model)
    other.load_state_dict(decode_dense(state))
    _assert_same(other.state_dict(), model.state_dict())
    decoded = decode_dense(state)
    next(iter(decoded.values())).add_(1.0)  # writable, and not the bytes the state holds
    _assert_same(decode_dense(state), model.state_dict())


def test_torch_save_bytes_of_an_older_rank_0_still_decode() -> None:
    model = _tower()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    _assert_same(decode_dense(buffer.getvalue(), TORCH_SAVE_FORMAT), model.state_dict())


def _with_header(header: object, data: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


@pytest.mark.parametrize(
    ("state", "names"),
    [
        (b"", "shorter than the header's length"),
        (struct.pack("<Q", 1 << 40), "a header of"),
        (struct.pack("<Q", 4) + b"{no", "a header of"),
        (struct.pack("<Q", 3) + b"{no", "not JSON"),
        (_with_header([1, 2]), "not a JSON object"),
        (_with_header({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4), "'w'"),
        (_with_header({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8), "'w'"),
        (_with_header({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8), "shape"),
        (_with_header({"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8), "malformed"),
        (_with_header({"w": {"dtype": "F32", "shape": [1]}}, b"\0" * 4), "malformed"),
        (_with_header({"w": [1]}), "malformed"),
        (_with_header({"w": {"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}}, b"\0" * 8), "'w'"),
    ],
)
def test_malformed_bytes_are_refused_with_a_value_error_naming_what(state: bytes, names: str) -> None:
    with pytest.raises(ValueError, match=names):
        decode_dense(state)


def test_an_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="'pickle' is not supported"):
        decode_dense(encode_dense(_tower()), "pickle")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 64))
def test_random_and_cut_bytes_give_a_state_or_a_value_error(noise: bytes, cut: int) -> None:
    good = encode_dense(_Buffers())
    for state in (noise, good[: len(good) * cut // 64], good[:16] + noise):
        try:
            decoded = decode_dense(state)
        except ValueError:
            continue
        assert isinstance(decoded, dict)
