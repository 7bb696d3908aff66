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
