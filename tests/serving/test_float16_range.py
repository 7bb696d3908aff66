"""Values beyond float16's range become +-65504 wherever embps makes a float16 of a float32, as a
float16 table stores them: a float16 replica, a float16 reply (Python and the gate's), a float16
export. They became +-inf there (numpy's astype, the gate's conversion), silently."""

from __future__ import annotations

import numpy as np
import pytest

from ps import wire
from ps.snapshot.files import open_snapshot
from ps.snapshot.ops import ShardSnapshotter, export_for_serving
from ps.table.config import Initializer, OptimizerConfig, OptimizerKind, TableConfig
from ps.table.embedding_table import EmbeddingTable
from serving.config import StorageDType
from serving.store import ShardRows, _embps_gate

VALUES = np.array([[7e4, -1e5, 1.0, 65519.0, 65520.0, np.inf, -np.inf, np.nan]], np.float32)
WANT = np.array([[65504, -65504, 1.0, 65504, 65504, np.inf, -np.inf, np.nan]], np.float32)
KEYS = np.array([7], np.int64)


def test_to_float16_saturates_finite_values_and_keeps_inf_and_nan():
    np.testing.assert_array_equal(wire.to_float16(VALUES).astype(np.float32), WANT)


@pytest.mark.parametrize("store", [StorageDType.FLOAT16, StorageDType.FLOAT32])
def test_a_replica_s_float16_rows_and_replies_saturate(store):
    rows = ShardRows(VALUES.shape[1], store)
    rows.upsert_rows(KEYS, VALUES, "float32")
    words = np.zeros((1, rows.width), np.float32)
    rows.gather(KEYS, words)
    np.testing.assert_array_equal(rows.decode(words, np.float16).astype(np.float32), WANT)


@pytest.mark.skipif(_embps_gate is None, reason="built without the serving gate")
def test_the_gate_s_float16_reply_saturates():
    halves = [_embps_gate.float_to_half(float(v)) for v in VALUES[0]]
    np.testing.assert_array_equal(np.array(halves, np.uint16).view(np.float16).astype(np.float32), WANT[0])


def test_a_float16_export_saturates(tmp_path):
    finite = VALUES[:, :5]
    sgd = OptimizerConfig(kind=OptimizerKind.SGD, lr=1.0)
    table = EmbeddingTable(TableConfig(name="t", dim=5, initializer=Initializer.ZEROS, optimizer=sgd))
    table.apply_gradients(KEYS, -finite, step=1)  # rows = the values
    src = str(tmp_path / "snaps")
    ShardSnapshotter({"t": table}, 0).snapshot(src, "job", 1)
    export_for_serving(src, "job", None, str(tmp_path / "serving"), dtype="float16")
    keys, values = open_snapshot(str(tmp_path / "serving"), "job").load_values("t", 0)
    assert keys.tolist() == KEYS.tolist()
    np.testing.assert_array_equal(values.astype(np.float32), WANT[:, :5])
