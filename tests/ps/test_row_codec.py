"""float16 and row-wise int8 rows: the C++ codec against the numpy reference bit for bit, training
against the reference with the same rounding, shard independence, snapshots and exact resume."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from ps import native
from ps.snapshot.files import restore
from ps.snapshot.ops import ShardSnapshotter
from ps.table.config import OptimizerConfig, OptimizerKind, Storage, TableConfig
from ps.table.embedding_table import EmbeddingTable
from tests.helpers.snapshot_files import shard_file
from tests.ps import reference_codec as ref

LOW = ["float16", "int8"]


def awkward_values(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    """Rows of every shape the codec must survive: ordinary, tiny (half subnormals), constant,
    zero, large, mixed signs, a span int8 cannot resolve."""
    values = rng.normal(scale=0.05, size=(n, dim)).astype(np.float32)
    values[1] = rng.normal(scale=1e-6, size=dim)
    values[2] = 0.125
    values[3] = 0.0
    values[4] = rng.normal(scale=3e4, size=dim)
    values[5, ::2] *= 1e3
    if n > 6:  # a span below ~7.5e-37: int8's scale is subnormal, its inverse inf (every code was 255)
        values[6] = 0.0
        values[6, -1] = 1e-37
    if n > 7:  # a span past float32's largest value: int8's scale was inf, every value NaN
        values[7, 0], values[7, -1] = 3e38, -3e38
    return values


@pytest.mark.parametrize("storage", LOW)
@pytest.mark.parametrize("dim", [1, 7, 64])
def test_encode_and_decode_match_the_numpy_reference_bit_for_bit(storage, dim):
    rng = np.random.default_rng(dim)
    n = 64
    keys = rng.integers(-(2**62), 2**62, n).astype(np.int64)
    values = awkward_values(rng, n, dim)
    for seed, stream in [(0, 1), (12345, 2**32 + 7), (2**64 - 1, 2**32 - 1)]:
        words = native.encode_words(Storage(storage), seed, keys, stream, values)
        want = ref.encode(storage, seed, keys, stream, values)
        np.testing.assert_array_equal(words.view(np.uint8), want)
        decoded = native.decode_words(Storage(storage), words, dim)
        np.testing.assert_array_equal(decoded.view(np.uint32), ref.decode(storage, want, dim).view(np.uint32))
    # A float16 value already representable, and an int8 row's min and max, come back exactly.
    if storage == "float16":
        exact = np.clip(values, -6e4, 6e4).astype(np.float16).astype(np.float32)
        words = native.encode_words(Storage(storage), 0, keys, 1, exact)
        np.testing.assert_array_equal(native.decode_words(Storage(storage), words, dim), exact)
    else:
        decoded = native.decode_words(Storage(storage), native.encode_words(Storage(storage), 0, keys, 1, values), dim)
        np.testing.assert_array_equal(decoded.min(axis=1), values.min(axis=1))
        assert np.isfinite(decoded).all()


@pytest.mark.parametrize("storage", LOW)
def test_stochastic_rounding_is_unbiased_and_a_pure_function_of_seed_key_and_step(storage):
    dim = 64
    rng = np.random.default_rng(1)
    value = rng.normal(scale=0.05, size=(1, dim)).astype(np.float32)
    key = np.array([42], dtype=np.int64)
    draws = np.stack(
        [native.decode_words(Storage(storage), native.encode_words(Storage(storage), 9, key, s, value), dim)[0]
         for s in range(400)]
    )
    spread = np.abs(draws - value).max()
    assert spread > 0  # it does round
    # Unbiased: the mean of 400 roundings is far closer to the value than one rounding can be.
    assert np.abs(draws.mean(axis=0) - value[0]).max() < spread / 5
    again = native.encode_words(Storage(storage), 9, key, 3, value)
    np.testing.assert_array_equal(again, native.encode_words(Storage(storage), 9, key, 3, value))
    other_key = native.encode_words(Storage(storage), 9, np.array([43], dtype=np.int64), 3, value)
    other_seed = native.encode_words(Storage(storage), 10, key, 3, value)
    assert not np.array_equal(again, other_key) and not np.array_equal(again, other_seed)


def low_table(storage: str, kind: str = "rowwise_adagrad", **kw) -> EmbeddingTable:
    optimizer = OptimizerConfig(kind=OptimizerKind(kind), lr=0.05, eps=1e-6)
    return EmbeddingTable(TableConfig(name="t", dim=16, seed=7, init_scale=0.1, storage=storage, optimizer=optimizer,
                                      **kw))


def pushes(num_steps: int, seed: int = 5):
    rng = np.random.default_rng(seed)
    for step in range(1, num_steps + 1):
        keys = rng.integers(-40, 40, size=int(rng.integers(1, 60))).astype(np.int64)
        yield step, keys, rng.normal(size=(keys.shape[0], 16)).astype(np.float32)


@pytest.mark.parametrize("storage", LOW)
@pytest.mark.parametrize("kind", ["sgd", "rowwise_adagrad"])
def test_training_matches_the_reference_with_the_same_rounding_bit_for_bit(storage, kind):
    table = low_table(storage, kind)
    reference = ref.LowPrecisionReference(storage, kind, 0.05, 1e-6, 7, table.init_values)
    for step, keys, grads in pushes(25):
        table.apply_gradients(keys, grads, step=step)
        reference.step(keys, grads, step)
    keys = np.arange(-45, 45, dtype=np.int64)
    np.testing.assert_array_equal(table.lookup(keys).numpy(), reference.lookup(keys))
    state = table.export()
    np.testing.assert_array_equal(state.encoded, np.stack([reference.rows[k] for k in state.keys.tolist()]))
    assert np.abs(state.values - table.init_values(state.keys)).max() > 1e-2  # the rows did move


@pytest.mark.parametrize("storage", LOW)
def test_every_instruction_set_of_the_update_kernel_gives_the_reference_bits(storage):
    """The encoded update runs on the widest instruction set the CPU has (csrc/row_codec.h:
    baseline, AVX2, AVX-512); each tier this CPU has, at dims with and without vector tails,
    trains the reference's rows bit for bit."""
    levels = range(native.cpu_isa() + 1)
    for dim in (37, 64):
        optimizer = OptimizerConfig(kind=OptimizerKind.ROWWISE_ADAGRAD, lr=0.05, eps=1e-6)
        config = TableConfig(name="t", dim=dim, seed=7, init_scale=0.1, storage=storage, optimizer=optimizer)
        tables = [EmbeddingTable(config) for _ in levels]
        reference = ref.LowPrecisionReference(storage, "rowwise_adagrad", 0.05, 1e-6, 7, tables[0].init_values)
        rng = np.random.default_rng(dim)
        try:
            for step in range(1, 9):
                keys = rng.integers(0, 40, size=60).astype(np.int64)
                grads = rng.normal(size=(60, dim)).astype(np.float32)
                for level, table in zip(levels, tables, strict=True):
                    native.set_isa_limit(level)
                    table.apply_gradients(keys, grads, step=step)
                reference.step(keys, grads, step)
        finally:
            native.set_isa_limit(2)
        want = np.stack([reference.rows[k] for k in sorted(reference.rows)])
        for table in tables:
            np.testing.assert_array_equal(table.export().encoded, want)


@pytest.mark.parametrize("storage", LOW)
def test_rows_do_not_depend_on_how_keys_are_sharded(storage):
    whole = low_table(storage)
    shards = [low_table(storage) for _ in range(3)]
    for step, keys, grads in pushes(20):
        whole.apply_gradients(keys, grads, step=step)
        for s, shard in enumerate(shards):
            mine = keys % 3 == s
            if mine.any():
                shard.apply_gradients(keys[mine], grads[mine], step=step)
    want = whole.export()
    for shard in shards:
        got = shard.export()
        rows = np.searchsorted(want.keys, got.keys)
        np.testing.assert_array_equal(got.encoded, want.encoded[rows])
        np.testing.assert_array_equal(got.optimizer_state, want.optimizer_state[rows])


@pytest.mark.parametrize("storage", LOW)
def test_snapshots_keep_the_compact_rows_and_resume_exactly(storage, tmp_path):
    uri = str(tmp_path)
    straight, resumed = low_table(storage), low_table(storage)
    snapper = ShardSnapshotter({"t": resumed}, 0)
    for step, keys, grads in pushes(30):
        straight.apply_gradients(keys, grads, step=step)
        if step <= 20:
            resumed.apply_gradients(keys, grads, step=step)
        if step in (10, 20):
            snapper.snapshot(uri, "job", step, "full" if step == 10 else "incremental")
        if step == 20:
            restored = restore(uri, "job")["t"][0]  # full at 10 + incremental at 20
            assert restored.storage == storage and restored.encoded is not None
            np.testing.assert_array_equal(restored.encoded, resumed.export().encoded)
            resumed = low_table(storage)
            resumed.load(restored)
        elif step > 20:
            resumed.apply_gradients(keys, grads, step=step)
    got, want = resumed.export(), straight.export()
    np.testing.assert_array_equal(got.keys, want.keys)
    np.testing.assert_array_equal(got.encoded, want.encoded)
    np.testing.assert_array_equal(got.optimizer_state, want.optimizer_state)
    files = [shard_file(m.parent, "t", 0) for m in tmp_path.rglob("manifest.json")]
    assert files and all("value_encoded" in pq.read_schema(f).names for f in files)


def test_a_float32_state_loads_into_an_int8_table_and_back():
    source = low_table("float32")
    for step, keys, grads in pushes(5):
        source.apply_gradients(keys, grads, step=step)
    int8 = low_table("int8")
    int8.load(source.export())
    state = int8.export()
    span = np.ptp(state.values, axis=1, keepdims=True)
    assert np.all(np.abs(state.values - source.export().values) <= span / 255 * 1.001 + 1e-7)
    back = low_table("float32")
    back.load(state)
    np.testing.assert_array_equal(back.export().values, state.values)


def test_compact_rows_meet_the_memory_targets_at_dim_64_with_rowwise_adagrad():
    widths = {s: EmbeddingTable(TableConfig(name="t", dim=64, storage=s)).width for s in ("float32", "float16", "int8")}
    assert widths == {"float32": 67, "float16": 35, "int8": 21}
    assert widths["int8"] / widths["float32"] <= 0.40 and widths["float16"] / widths["float32"] <= 0.60


def test_bad_storage_is_refused_with_the_field_named():
    with pytest.raises(ValueError, match=r"t\.storage: must be one of"):
        TableConfig(name="t", dim=4, storage="int4").validate()
    with pytest.raises(ValueError, match=r"t\.storage: 'int8' rows need device 'cpu'"):
        TableConfig(name="t", dim=4, storage="int8", device="cuda").validate()
    with pytest.raises(ValueError, match="kernels"):
        EmbeddingTable(TableConfig(name="t", dim=4, storage="float16"), kernels="torch")


@pytest.mark.parametrize("dim", [3, 8, 32, 37])
def test_an_int8_row_with_a_nan_decodes_as_nan_at_every_instruction_set(dim):
    """A NaN (a row an optimizer took past float32's range) was dropped by the SIMD min and max,
    with the finite extreme beside it in its lane: the row came back finite, NaN and extreme wrong.
    Now the row's bias and scale are NaN and it decodes as NaN, as the reference does, the same
    bytes at every instruction set."""
    keys = np.arange(dim, dtype=np.int64)
    values = np.tile(np.linspace(-1, 1, dim, dtype=np.float32), (dim, 1))
    values[np.arange(dim), np.arange(dim)] = np.nan  # row i: the NaN at position i
    encoded = encoded_alike_at_every_instruction_set(Storage.INT8, keys, values)
    decoded = native.decode_words(Storage.INT8, encoded.view(np.float32), dim)
    assert np.isnan(decoded).all()
    with np.errstate(invalid="ignore"):  # the reference casts NaN to its codes
        assert np.isnan(ref.decode("int8", ref.encode("int8", 0, keys, 1, values), dim)).all()


def encoded_alike_at_every_instruction_set(storage: Storage, keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    """values (n, d) encoded (seed 0, stream 1) at each instruction set this CPU has, checked equal
    byte for byte; the bytes (n, 4 * words) uint8."""
    encoded = []
    try:
        for level in range(native.cpu_isa() + 1):
            native.set_isa_limit(level)
            encoded.append(native.encode_words(storage, 0, keys, 1, values).view(np.uint8))
    finally:
        native.set_isa_limit(2)
    for words in encoded[1:]:
        np.testing.assert_array_equal(words, encoded[0])
    return encoded[0]


def test_a_float16_row_keeps_values_near_float32_s_largest_as_the_largest_half_at_every_instruction_set():
    """A value within 2^-10 of FLT_MAX took the rounding draw into the exponent of inf and nan: a
    finite float32 value was stored as nan (found by a review; a float32 snapshot of huge values
    loaded into a float16 table, or a diverging optimizer). Now every value at or past 65504 keeps
    its sign as +-65504, and inf and nan stay themselves, the same bytes at every instruction set."""
    big = np.finfo(np.float32).max
    row = np.array([big, -big, np.nextafter(big, 0), 65504.0, 65519.0, np.inf, -np.inf, 1.0], np.float32)
    values = np.tile(np.concatenate([row, row]), (4, 1))  # 16 wide: the AVX-512 and F16C loops too
    keys = np.arange(4, dtype=np.int64)
    encoded = encoded_alike_at_every_instruction_set(Storage.FLOAT16, keys, values)
    decoded = native.decode_words(Storage.FLOAT16, encoded.view(np.float32), values.shape[1])
    want = np.tile(np.array([65504, -65504, 65504, 65504, 65504, np.inf, -np.inf, 1.0], np.float32), (4, 2))
    np.testing.assert_array_equal(decoded, want)
    np.testing.assert_array_equal(ref.encode("float16", 0, keys, 1, values), encoded)
