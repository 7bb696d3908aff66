"""Optimizer settings that the kernels' float32 math would turn into NaN rows are refused by the
table's config, with the field named; the settings at the edge of what is accepted keep every row
finite, zero gradients on fresh rows included (the case that divided 0 by 0)."""

from __future__ import annotations

import numpy as np
import pytest

from ps.table.config import (
    MAX_INIT_SCALE,
    MAX_INT8_INIT_SCALE,
    Initializer,
    OptimizerConfig,
    OptimizerKind,
    TableConfig,
)
from ps.table.embedding_table import EmbeddingTable

DIM = 4


def _table(**optimizer) -> TableConfig:
    return TableConfig(name="t", dim=DIM, optimizer=OptimizerConfig(**optimizer))


@pytest.mark.parametrize(
    "optimizer, message",
    [
        (dict(kind=OptimizerKind.ADAM, lr=0.1, beta1=1.0), r"t\.optimizer\.beta1: must be < 1"),
        (dict(kind=OptimizerKind.ADAM, lr=0.1, beta2=1.0), r"t\.optimizer\.beta2: must be < 1"),
        # 1 - 1e-10 is 1.0 in float32, the kernels' precision.
        (dict(kind=OptimizerKind.ADAM, lr=0.1, beta2=1 - 1e-10), r"t\.optimizer\.beta2: must be < 1"),
        (dict(kind=OptimizerKind.ADAM, lr=0.1, eps=0.0), r"t\.optimizer\.eps: adam needs eps > 0"),
        (dict(kind=OptimizerKind.ADAM, lr=0.1, eps=1e-50), r"t\.optimizer\.eps: adam needs eps > 0"),
        (dict(kind=OptimizerKind.ADAGRAD, lr=0.1, eps=0.0, initial_accumulator=0.0),
         r"t\.optimizer\.eps: adagrad needs eps > 0 or initial_accumulator > 0"),
        (dict(kind=OptimizerKind.ROWWISE_ADAGRAD, lr=0.1, eps=0.0, initial_accumulator=0.0),
         r"t\.optimizer\.eps: rowwise_adagrad needs eps > 0 or initial_accumulator > 0"),
        # Not a float32: inf (or 0) in the kernels, NaN rows at the first push of a zero gradient.
        (dict(kind=OptimizerKind.SGD, lr=1e39), r"t\.optimizer\.lr: must be > 0\.0 and <= 3\.40282e\+38, got 1e\+39"),
        (dict(kind=OptimizerKind.ADAM, lr=1e39), r"t\.optimizer\.lr: must be > 0\.0 and <= 3\.40282e\+38"),
        (dict(kind=OptimizerKind.FTRL, lr=1e-50), r"t\.optimizer\.lr: must be at least 1\.17549e-38 .*got 1e-50"),
        (dict(kind=OptimizerKind.ADAM, lr=0.1, eps=1e39), r"t\.optimizer\.eps: must be >= 0\.0 and <= 3\.40282e\+38"),
        (dict(kind=OptimizerKind.FTRL, lr=0.1, l2=1e40), r"t\.optimizer\.l2: must be >= 0\.0 and <= 3\.40282e\+38"),
        # Row-wise Adagrad's factor lr / (sqrt(s) + eps) overflows on a fresh row.
        (dict(kind=OptimizerKind.ROWWISE_ADAGRAD, lr=100.0, eps=1e-37),
         r"t\.optimizer\.eps: rowwise_adagrad's first step multiplies by lr / \(sqrt\(initial_accumulator\) \+ eps\)"),
        (dict(kind=OptimizerKind.ROWWISE_ADAGRAD, lr=0.1, eps=1e-45),
         r"t\.optimizer\.eps: rowwise_adagrad's first step .* overflows float32"),
        # FTRL divides by (ftrl_beta + sqrt(n)) / lr + l2, n 0 until a squared gradient is not 0.
        (dict(kind=OptimizerKind.FTRL, lr=0.1, ftrl_beta=0.0),
         r"t\.optimizer\.ftrl_beta: ftrl needs ftrl_beta > 0 or l2 > 0"),
    ],
)
def test_settings_that_divide_by_zero_are_refused(optimizer, message):
    with pytest.raises(ValueError, match=message):
        _table(**optimizer).validate()


@pytest.mark.parametrize(
    "optimizer",
    [
        dict(kind=OptimizerKind.ADAM, lr=0.1, beta1=float(np.nextafter(np.float32(1), np.float32(0))),
             beta2=float(np.nextafter(np.float32(1), np.float32(0))), eps=1e-30),
        dict(kind=OptimizerKind.ADAM, lr=0.1, beta1=0.0, beta2=0.0, eps=1e-30),
        dict(kind=OptimizerKind.ADAGRAD, lr=0.1, eps=0.0, initial_accumulator=1e-30),
        dict(kind=OptimizerKind.ADAGRAD, lr=0.1, eps=1e-30, initial_accumulator=0.0),
        dict(kind=OptimizerKind.ROWWISE_ADAGRAD, lr=0.1, eps=0.0, initial_accumulator=1e-30),
        dict(kind=OptimizerKind.ROWWISE_ADAGRAD, lr=0.1, eps=1e-30, initial_accumulator=0.0),
        dict(kind=OptimizerKind.SGD, lr=float(np.finfo(np.float32).tiny)),
        dict(kind=OptimizerKind.FTRL, lr=0.1, ftrl_beta=0.0, l2=1e-30),
        dict(kind=OptimizerKind.FTRL, lr=0.1, ftrl_beta=1e-30, l2=0.0),
    ],
)
def test_settings_at_the_edge_keep_rows_finite(optimizer):
    table = EmbeddingTable(_table(**optimizer).validate())
    keys = np.array([1, 2], dtype=np.int64)
    table.apply_gradients(keys, np.zeros((2, DIM), np.float32), step=1)  # zero gradients on fresh rows
    table.apply_gradients(keys, np.full((2, DIM), 1e-30, np.float32), step=2)  # squares 0 in float32
    table.apply_gradients(keys, np.array([[1, 0, 0, 0], [0, 0, 0, 0]], np.float32), step=2)
    table.apply_gradients(keys, np.full((2, DIM), -3.0, np.float32), step=3)
    state = table.export()
    assert np.isfinite(state.values).all(), state.values
    assert np.isfinite(state.optimizer_state).all(), state.optimizer_state


@pytest.mark.parametrize("initializer", [Initializer.UNIFORM, Initializer.NORMAL])
def test_the_largest_init_scale_keeps_every_new_row_finite_and_one_more_is_refused(initializer):
    config = TableConfig(name="t", dim=DIM, initializer=initializer, init_scale=MAX_INIT_SCALE).validate()
    rows = EmbeddingTable(config).lookup(np.arange(20_000, dtype=np.int64)).numpy()
    assert np.isfinite(rows).all()
    with pytest.raises(ValueError, match=r"t\.init_scale: must be >= 0.0 and <= 5e\+37, got 1e\+38"):
        TableConfig(name="t", dim=DIM, initializer=initializer, init_scale=1e38).validate()



@pytest.mark.parametrize("initializer", [Initializer.UNIFORM, Initializer.NORMAL])
def test_an_int8_table_s_largest_init_scale_keeps_its_rows_finite_once_encoded(initializer):
    """An int8 row keeps (max - min) / 255 as its scale: with init_scale near MAX_INIT_SCALE a row's
    span passed float32's largest value, and after one push (even of zero gradients) such rows read
    back all NaN (a review: 8 of 5,000 rows at dim 64). At most MAX_INT8_INIT_SCALE now."""
    config = TableConfig(
        name="t", dim=64, initializer=initializer, init_scale=MAX_INT8_INIT_SCALE, storage="int8"
    ).validate()
    table = EmbeddingTable(config)
    keys = np.arange(5_000, dtype=np.int64)
    table.apply_gradients(keys, np.zeros((keys.shape[0], 64), np.float32), step=1)
    assert np.isfinite(table.read(keys)).all()
    with pytest.raises(ValueError, match=r"t\.init_scale: at most 2\.5e\+37 with storage 'int8'"):
        TableConfig(name="t", dim=64, initializer=initializer, init_scale=4e37, storage="int8").validate()


def test_an_int8_row_trained_past_float32_s_span_keeps_its_minimum_and_saturates_instead_of_turning_nan():
    """A push that takes an int8 row's span (max - min) past float32's largest value made its scale
    (max - min) / 255 infinite, and the whole row decoded NaN (code x inf + min): one diverging
    row of a table read back as NaN, and trained on as NaN. The scale now saturates at float32's
    largest value / 256: the row keeps its minimum, its top saturates, every value stays finite."""
    config = TableConfig(
        name="t", dim=8, optimizer=OptimizerConfig(kind="sgd", lr=3e28), init_scale=0.01, storage="int8"
    ).validate()
    table = EmbeddingTable(config)
    keys = np.arange(4, dtype=np.int64)
    grads = np.zeros((4, 8), np.float32)
    grads[:, 0], grads[:, -1] = -1e10, 1e10  # rows from about -3e38 to 3e38
    table.apply_gradients(keys, grads, step=1)
    rows = table.read(keys)
    assert np.isfinite(rows).all()
    np.testing.assert_allclose(rows[:, -1], -3e38, rtol=1e-2)  # the minimum, kept
    top = np.float32(np.finfo(np.float32).max) / np.float32(256.0) * np.float32(255.0)
    assert (rows[:, 0] >= rows[:, -1] + top * np.float32(0.999)).all()  # the top, saturated
    table.apply_gradients(keys, np.zeros((4, 8), np.float32), step=2)
    assert np.isfinite(table.read(keys)).all()


def test_settings_given_as_strings_are_their_members_and_a_part_of_another_type_is_named():
    """`kind="adam"` and `initializer="normal"` (as TOML gives them) passed validate and then failed
    in the kernels' bindings with an AttributeError naming no field; a dict for the optimizer or
    None for the eviction did the same."""
    config = TableConfig(
        name="t", dim=DIM, optimizer=OptimizerConfig(kind="adam", lr=0.1), initializer="normal", storage="float16"
    ).validate()
    assert config.optimizer.kind is OptimizerKind.ADAM and config.initializer is Initializer.NORMAL
    table = EmbeddingTable(config)
    table.apply_gradients(np.arange(3, dtype=np.int64), np.ones((3, DIM), np.float32), step=1)
    assert np.isfinite(table.export().values).all()
    with pytest.raises(TypeError, match=r"^t\.optimizer: must be an OptimizerConfig, got dict"):
        TableConfig(name="t", dim=DIM, optimizer={"kind": "sgd"}).validate()
    with pytest.raises(TypeError, match=r"^t\.eviction: must be an EvictionConfig, got NoneType None"):
        TableConfig(name="t", dim=DIM, eviction=None).validate()
    with pytest.raises(ValueError, match=r"^t\.optimizer\.kind: must be one of .*got 'nope'"):
        TableConfig(name="t", dim=DIM, optimizer=OptimizerConfig(kind="nope")).validate()
