"""The C++ enums as they cross into Python: named like the config's StrEnums, never plain ints."""

from enum import StrEnum

import _embps_native
import numpy as np
import pytest

from ps import native
from ps.table.config import Initializer, OptimizerKind


@pytest.mark.parametrize(
    ("config_enum", "native_enum"),
    [(Initializer, native.Initializer), (OptimizerKind, native.OptimizerKind)],
    ids=["initializer", "optimizer"],
)
def test_every_config_member_has_the_native_member_of_its_name(config_enum, native_enum):
    assert [m.name for m in config_enum] == [m.name for m in native_enum]
    for member in config_enum:
        assert native.native_enum(native_enum, member) is native_enum[member.name]


def test_a_member_the_core_lacks_is_refused_by_name():
    class Initializer(StrEnum):
        ORTHOGONAL = "orthogonal"

    with pytest.raises(ValueError, match=r"Initializer\.ORTHOGONAL: the C\+\+ core has no Initializer"):
        native.native_enum(native.Initializer, Initializer.ORTHOGONAL)


def test_native_functions_refuse_integer_codes():
    keys = np.arange(3, dtype=np.int64)
    out = np.empty((3, 4), dtype=np.float32)
    with pytest.raises(TypeError):
        _embps_native.init_values(1, 2, 0.1, keys, out)
    _embps_native.init_values(1, native.Initializer.NORMAL, 0.1, keys, out)
    np.testing.assert_array_equal(out, native.init_values(1, Initializer.NORMAL, 0.1, keys, 4))
    block = np.zeros((16, 6), dtype=np.float32)  # rows of [value (4) | freq | last_step], sgd
    sgd_lr_1 = np.array([1.0, 0.0, 0.0, 0.0])
    args = (sgd_lr_1, np.array([block.ctypes.data], dtype=np.uint64), 4, 6, 4, 0, keys[:1],
            np.ones((1, 4), np.float32), np.ones(1, dtype=np.int64), 7)
    with pytest.raises(TypeError):
        _embps_native.apply_update(0, *args)
    assert not block.any()
    _embps_native.apply_update(native.OptimizerKind.SGD, *args)
    assert block[0, :4].tolist() == [-1.0] * 4 and block[0, 4:].view(np.uint32).tolist() == [1, 7]


def _one_row_table(value: float, dim: int = 4) -> tuple:
    """A map holding keys 0..3 and a block whose rows all hold `value` (sgd: width dim + 2)."""
    hash_map = _embps_native.HashMap(0, 1)
    keys = np.arange(4, dtype=np.int64)
    hash_map.find_or_insert(keys, np.empty(4, np.int64), np.empty(4, np.uint8))
    return hash_map, np.full((16, dim + 2), value, dtype=np.float32)


def test_argument_checks_the_python_wrappers_rely_on_refuse_what_would_read_or_write_outside_a_buffer():
    """Found by a review of the bindings; each call did what its comment says before the check.
    The wrappers in ps/ pass well-formed arrays; these are the calls a wrong one would make."""
    dim = 4
    (map_a, block_a), (map_b, block_b) = _one_row_table(1.0), _one_row_table(2.0)
    params = np.array([[4, dim + 2, dim, 0, 0, 0, 0, 0, 0]] * 2, np.int64)  # sgd, no state, no TTL
    lookup = (params, np.zeros((2, 6)), np.zeros(2, np.uint64), np.array([0, 1, 0, 1], np.int64),
              np.array([0, 2, 4], np.int64), np.empty(4 * dim, np.float32))
    # Block addresses as int64 were converted into a copy freed before the rows were read: table 0 read table 1's.
    with pytest.raises(ValueError, match="each blocks entry must be a contiguous uint64 array"):
        _embps_native.lookup_multi([map_a, map_b], [np.array([block_a.ctypes.data], np.int64)] * 2, *lookup)
    blocks = [np.array([block_a.ctypes.data], np.uint64), np.array([block_b.ctypes.data], np.uint64)]
    with pytest.raises(ValueError, match="a map is None"):  # was a segfault
        _embps_native.lookup_multi([None, None], blocks, *lookup)
    # Adam keeps 2 dim + 1 state words a row; a row given none had the next row written.
    rows = np.zeros((2, dim + 2), np.float32)
    with pytest.raises(ValueError, match="state_width: 0 words, the optimizer keeps 9"):
        _embps_native.apply_update(native.OptimizerKind.ADAM, np.array([0.1, 0.9, 0.999, 1e-8]),
                                   np.array([rows.ctypes.data], np.uint64), 1, dim + 2, dim, 0,
                                   np.array([0], np.int64), np.ones((1, dim), np.float32), np.ones(1, np.int64), 1)
    assert not rows.any()
    # col + columns wrapped past int64: gather read, scatter wrote, before the row.
    out = np.empty((1, dim), np.float32)
    for verb, array in (("gather", out), ("scatter", np.full((1, dim), 7.0, np.float32))):
        with pytest.raises(ValueError, match="columns outside the row"):
            getattr(_embps_native, verb)(np.array([rows.ctypes.data], np.uint64), 1, dim + 2,
                                         np.array([0], np.int64), 2**63 - 2, array)
    # A validity offset past int64 when added to the rows: read far outside the bitmap (a segfault).
    strings = (0, np.array([0, 1, 2], np.int32), np.frombuffer(b"ab", np.uint8), np.array([0xFF], np.uint8))
    with pytest.raises(ValueError, match="validity bitmap shorter than its rows"):
        _embps_native.hash_string_columns([(*strings, 2**63 - 1, None, None, 0)], np.empty((2, 1), np.int64))
    # An output of another dtype or layout was replaced by a converted copy: the call "succeeded",
    # the caller's array unchanged.
    found = np.full(8, -7, np.int64)
    for wrong in (found[::2], np.full(4, -7, np.int32)):
        with pytest.raises(TypeError):
            map_a.find(np.arange(4, dtype=np.int64), wrong)
