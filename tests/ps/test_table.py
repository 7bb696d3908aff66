"""EmbeddingTable semantics: init, dedupe, export/load, admission, eviction, bad input, memory."""

import dataclasses
import time

import numpy as np
import pytest
import torch

from ps.errors import CapacityError
from ps.table.config import (
    AdmissionConfig,
    AdmissionKind,
    EvictionConfig,
    EvictionPolicy,
    Initializer,
    OptimizerConfig,
    OptimizerKind,
    TableConfig,
)
from ps.table.embedding_table import EmbeddingTable
from ps.table.multi import push_tables
from ps.table.row_store import MAX_BLOCK_BYTES

SGD = OptimizerConfig(kind=OptimizerKind.SGD, lr=1.0)


def keys_of(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def make(dim=4, **kwargs) -> EmbeddingTable:
    kwargs.setdefault("optimizer", SGD)
    return EmbeddingTable(TableConfig(name="t", dim=dim, **kwargs))


def mix64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint64)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def reference_uniform_init(seed: int, keys: np.ndarray, dim: int, scale: float) -> np.ndarray:
    """The formula documented in csrc/row_ops.h, in numpy."""
    golden = np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        seed_mix = mix64(np.array([seed], dtype=np.uint64) + golden)[0]
        base = mix64(keys.astype(np.uint64) ^ seed_mix)
        j = np.arange(1, dim + 1, dtype=np.uint64)
        bits = mix64(base[:, None] + j[None, :] * golden)
    u = (bits >> np.uint64(40)).astype(np.float64) / 2**24
    return (scale * (2.0 * u - 1.0)).astype(np.float32)


def test_init_is_a_pure_function_of_seed_and_key():
    keys = np.array([0, 1, -1, 2**63 - 1, -(2**63), 123456789], dtype=np.int64)
    a = make(dim=8, seed=5, init_scale=0.3)
    b = make(dim=8, seed=5, init_scale=0.3)
    b.lookup(keys[::-1])
    b.apply_gradients(keys[3:], np.zeros((3, 8), np.float32))  # other order, rows created
    np.testing.assert_array_equal(a.lookup(keys).numpy(), b.lookup(keys).numpy())
    np.testing.assert_array_equal(a.lookup(keys).numpy(), reference_uniform_init(5, keys, 8, 0.3))
    assert not np.array_equal(make(dim=8, seed=6).lookup(keys).numpy(), a.lookup(keys).numpy())
    assert np.abs(a.lookup(keys).numpy()).max() <= 0.3


def test_normal_and_zeros_initializers():
    keys = np.arange(20000, dtype=np.int64)
    normal = make(dim=8, initializer=Initializer.NORMAL, init_scale=2.0).lookup(keys).numpy()
    assert abs(normal.mean()) < 0.05 and abs(normal.std() - 2.0) < 0.05
    assert not make(dim=8, initializer=Initializer.ZEROS).lookup(keys).numpy().any()


def test_lookup_does_not_create_rows():
    table = make()
    table.lookup(keys_of(1, 2, 3))
    assert table.size == 0


def test_duplicate_keys_are_summed_then_applied_once():
    table = make(dim=2, optimizer=OptimizerConfig(kind=OptimizerKind.ROWWISE_ADAGRAD, lr=0.5))
    other = make(dim=2, optimizer=OptimizerConfig(kind=OptimizerKind.ROWWISE_ADAGRAD, lr=0.5))
    g = np.array([[1.0, 2.0], [3.0, -1.0], [0.5, 0.5]], np.float32)
    table.apply_gradients(keys_of(9, 9, 9), g)
    other.apply_gradients(keys_of(9), g.sum(axis=0, keepdims=True))
    np.testing.assert_array_equal(table.lookup(keys_of(9)).numpy(), other.lookup(keys_of(9)).numpy())
    assert table.export().freq.tolist() == [3]


def test_push_k_times_moves_row_k_steps():
    table = make(dim=3)
    for _ in range(5):
        table.apply_gradients(keys_of(42), np.full((1, 3), 0.25, np.float32))
    np.testing.assert_allclose(
        table.lookup(keys_of(42)).numpy(), table.init_values(keys_of(42)) - 5 * 0.25, atol=1e-6
    )
    assert table.version == 5


@pytest.mark.parametrize("kind", list(OptimizerKind))
def test_export_load_round_trip_continues_identically(kind):
    config = TableConfig(name="t", dim=4, optimizer=OptimizerConfig(kind=kind, lr=0.1), seed=7)
    a, b = EmbeddingTable(config), EmbeddingTable(config)
    rng = np.random.default_rng(0)
    for step in range(1, 6):
        keys = rng.integers(0, 50, 30).astype(np.int64)
        a.apply_gradients(keys, rng.normal(size=(30, 4)).astype(np.float32), step=step)
    state = a.export()
    b.load(state)
    keys = rng.integers(0, 60, 30).astype(np.int64)
    grads = rng.normal(size=(30, 4)).astype(np.float32)
    a.apply_gradients(keys, grads, step=6)
    b.apply_gradients(keys, grads, step=6)
    sa, sb = a.export(), b.export()
    for name in ("keys", "values", "optimizer_state", "freq", "last_step"):
        np.testing.assert_array_equal(getattr(sa, name), getattr(sb, name))
    assert (sa.version, sa.step) == (sb.version, sb.step) == (6, 6)


def test_load_rejects_bad_state_naming_the_field():
    table = make()
    state = make().export()
    state.values = np.zeros((0, 5), np.float32)
    with pytest.raises(ValueError, match="state.values"):
        table.load(state)


def test_export_is_sorted_by_key_and_a_state_with_a_repeated_key_is_refused_unchanged():
    table = make()
    keys = np.array([9, -3, 2**62, 0, 5], dtype=np.int64)
    table.apply_gradients(keys, np.ones((5, 4), np.float32), step=1)
    state = table.export()
    assert state.keys.tolist() == sorted(keys.tolist())
    assert table.export(np.array([5, 9, 5, 77], dtype=np.int64)).keys.tolist() == [5, 9]
    state.keys = state.keys.copy()
    state.keys[1] = state.keys[0]
    other = make()
    with pytest.raises(ValueError, match="state.keys: keys must be unique"):
        other.load(state)
    assert other.size == 0


def test_count_admission():
    table = make(admission=AdmissionConfig(kind=AdmissionKind.COUNT, min_count=3))
    g = np.ones((1, 4), np.float32)
    init = table.init_values(keys_of(5))
    for _ in range(2):
        table.apply_gradients(keys_of(5), g)
        np.testing.assert_array_equal(table.lookup(keys_of(5)).numpy(), init)  # gradients only count
        assert table.size == 0 and table.num_pending == 1
    table.apply_gradients(keys_of(5), g)  # third sighting admits, and this gradient applies
    assert table.size == 1 and table.num_pending == 0 and table.num_admitted == 1
    np.testing.assert_allclose(table.lookup(keys_of(5)).numpy(), init - 1.0, atol=1e-6)
    assert table.export().freq.tolist() == [3]
    table.apply_gradients(keys_of(6, 6, 6), np.ones((3, 4), np.float32))  # 3 sightings in one push
    assert table.size == 2


def test_probability_admission_is_deterministic_and_near_p():
    config = dict(admission=AdmissionConfig(kind=AdmissionKind.PROBABILITY, probability=0.25))
    a, b = make(**config), make(**config)
    keys = np.arange(20000, dtype=np.int64)
    a.apply_gradients(keys, np.zeros((keys.shape[0], 4), np.float32))
    b.apply_gradients(keys[::-1].copy(), np.zeros((keys.shape[0], 4), np.float32))
    assert 0.22 < a.size / keys.shape[0] < 0.28
    np.testing.assert_array_equal(a.export().keys, b.export().keys)
    assert a.num_pending == keys.shape[0] - a.size


@pytest.mark.parametrize("forget", ["ttl_steps", "max_pending"])
def test_a_key_whose_pending_count_was_forgotten_draws_new_coins(forget):
    """Probability admission, p = 0.5, keys seen 20 times each, their counts forgotten between
    sightings (past the TTL, or pushed out of max_pending). The coin was a hash of (seed, key,
    count), so a forgotten count drew the lost coins again: 491 of 1,000 keys were ever admitted
    (each its first coin) where independent coins admit about all. Now the step is in the hash."""
    admission = AdmissionConfig(kind=AdmissionKind.PROBABILITY, probability=0.5)
    if forget == "ttl_steps":
        table = make(admission=admission, eviction=EvictionConfig(ttl_steps=4))
        keys_of_step = [np.arange(1000, dtype=np.int64)] * 20  # every key every 10 steps, TTL 4
        steps = range(10, 210, 10)
    else:
        table = make(admission=dataclasses.replace(admission, max_pending=100))
        keys_of_step = [np.arange(1000, dtype=np.int64)] * 20  # 1,000 keys through a memory of 100
        steps = range(1, 21)
    admitted: set[int] = set()
    for step, keys in zip(steps, keys_of_step, strict=True):
        table.apply_gradients(keys, np.zeros((keys.shape[0], 4), np.float32), step=step)
        admitted.update(table.keys().tolist())  # with the TTL, rows expire between sightings too
    assert len(admitted) > 990, f"{len(admitted)} of 1,000 keys ever admitted in 20 sightings at p = 0.5"


def test_ttl_eviction():
    table = make(eviction=EvictionConfig(ttl_steps=4))
    g = np.ones((1, 4), np.float32)
    table.apply_gradients(keys_of(1), g, step=1)
    table.apply_gradients(keys_of(2), g, step=3)
    evicted = table.evict_expired(step=6)  # key 1 idle for 5 > 4 steps, key 2 for 3
    assert evicted.tolist() == [1]
    assert table.export().keys.tolist() == [2]
    np.testing.assert_array_equal(table.lookup(keys_of(1)).numpy(), table.init_values(keys_of(1)))


def test_ttl_eviction_runs_inside_apply_gradients():
    table = make(eviction=EvictionConfig(ttl_steps=2))
    g = np.ones((1, 4), np.float32)
    table.apply_gradients(keys_of(1), g, step=1)
    result = None
    for step in range(2, 6):
        result = table.apply_gradients(keys_of(2), g, step=step)
        if result.evicted_keys.size:
            break
    assert result is not None and result.evicted_keys.tolist() == [1]
    assert table.num_evicted == 1 and table.export().keys.tolist() == [2]


@pytest.mark.parametrize("multi_table", [False, True], ids=["apply_gradients", "push_tables"])
def test_a_full_table_without_eviction_drops_its_expired_rows_to_take_new_keys(multi_table):
    """capacity + ttl_steps + policy "none": the TTL sweep runs after a push that succeeded, so a
    full table whose every push brought a new key refused them all for good, however long its rows
    had expired. Expired rows now make room first (never the push's own), and a push that would
    still not fit is refused with the table unchanged."""
    table = make(capacity=3, eviction=EvictionConfig(ttl_steps=2))
    other = make()
    _fill(table, {1: [1, 2, 3]})

    def push(keys, step):
        keys = np.array(keys, dtype=np.int64)
        grads = np.ones((keys.shape[0], 4), np.float32)
        if multi_table:  # with a second table: push_tables checks every table's room first (check_room)
            both = np.concatenate([keys, keys])
            offsets = np.array([0, keys.shape[0], 2 * keys.shape[0]])
            return push_tables([other, table], both, offsets, np.ones(both.shape[0] * 4, np.float32), None, step)[1]
        return table.apply_gradients(keys, grads, step=step)

    before = table.export()
    with pytest.raises(CapacityError, match=r"full: 3 rows, 0 of them past ttl_steps 2 \+ 1 new"):
        push([4], 3)  # nothing expired yet at step 3 (rows of step 1 are 2 steps old)
    np.testing.assert_array_equal(table.export().values, before.values)
    assert other.size == 0  # the refused push changed no table
    # 2 and 3 expired and leave; 1, expired too, is the push's own: it starts again from its init
    # (a new row, so touched, not deleted), and its old row is counted evicted.
    result = push([1, 4], 10)
    assert sorted(result.evicted_keys.tolist()) == [2, 3]
    assert sorted(table.export().keys.tolist()) == [1, 4]
    assert table.num_evicted == 3


def test_a_stale_push_does_not_make_a_row_look_older():
    """async training pushes a step older than one already applied: last_step stays at the newest
    (before: it went back to the stale step, and TTL and LRU dropped the row early)."""
    for kernels in ("native", "torch"):
        table = EmbeddingTable(TableConfig(name="t", dim=4, optimizer=SGD, eviction=EvictionConfig(ttl_steps=10)),
                               kernels=kernels)
        g = np.ones((1, 4), np.float32)
        table.apply_gradients(keys_of(7), g, step=100)
        table.apply_gradients(keys_of(7), g, step=95)
        assert table.export().last_step.tolist() == [100], kernels
        assert table.evict_expired(step=106).tolist() == [], kernels
        assert table.evict_expired(step=111).tolist() == [7], kernels
    table = EmbeddingTable(TableConfig(name="t", dim=4, optimizer=SGD))  # the multi-table native call
    push_tables([table], keys_of(7), np.array([0, 1]), np.ones(4, np.float32), None, 100)
    push_tables([table], keys_of(7), np.array([0, 1]), np.ones(4, np.float32), None, 95)
    assert table.export().last_step.tolist() == [100]


def _fill(table: EmbeddingTable, pushes: dict[int, list[int]]) -> None:
    """pushes: step -> keys pushed at that step."""
    for step, keys in sorted(pushes.items()):
        ks = np.array(keys, dtype=np.int64)
        table.apply_gradients(ks, np.zeros((ks.shape[0], 4), np.float32), step=step)


def test_lfu_capacity_eviction_drops_least_frequent():
    table = make(capacity=4, eviction=EvictionConfig(policy=EvictionPolicy.LFU))
    # key 10 is pushed 3 times, 11 twice, 12 once (latest), 13 twice.
    _fill(table, {1: [10, 11, 13], 2: [10, 11, 13], 3: [10], 4: [12]})
    result = table.apply_gradients(keys_of(99), np.zeros((1, 4), np.float32), step=5)
    assert result.evicted_keys.tolist() == [12]  # least frequent, though most recent
    assert sorted(table.export().keys.tolist()) == [10, 11, 13, 99]


def test_lru_capacity_eviction_drops_least_recent():
    table = make(capacity=4, eviction=EvictionConfig(policy=EvictionPolicy.LRU))
    _fill(table, {1: [10, 11, 13], 2: [10, 11, 13], 3: [10], 4: [12]})
    result = table.apply_gradients(keys_of(99), np.zeros((1, 4), np.float32), step=5)
    assert result.evicted_keys.tolist() == [11]  # last pushed at step 2 (ties broken by freq, key)
    assert sorted(table.export().keys.tolist()) == [10, 12, 13, 99]


def test_eviction_never_drops_keys_of_the_current_push():
    table = make(capacity=3, eviction=EvictionConfig(policy=EvictionPolicy.LFU))
    _fill(table, {1: [1, 2, 3]})
    table.apply_gradients(keys_of(1, 4), np.zeros((2, 4), np.float32), step=2)
    assert 1 in table.export().keys.tolist() and 4 in table.export().keys.tolist()
    assert table.size == 3


def test_full_table_without_eviction_refuses_and_is_unchanged():
    table = make(capacity=2)
    _fill(table, {1: [1, 2]})
    before = table.export()
    with pytest.raises(CapacityError, match="full"):
        table.apply_gradients(keys_of(1, 3), np.ones((2, 4), np.float32), step=2)
    after = table.export()
    np.testing.assert_array_equal(before.values, after.values)
    assert table.version == before.version


@pytest.mark.parametrize(
    "keys, grads, error, match",
    [
        (np.array([1, 2], np.int32), np.zeros((2, 4), np.float32), TypeError, "keys: expected dtype int64"),
        (keys_of(1, 2), np.zeros((2, 4), np.float64), TypeError, "grads: expected dtype float32"),
        (keys_of(1, 2), np.zeros((2, 5), np.float32), ValueError, r"grads: expected shape \(2, 4\)"),
        (keys_of(1, 2), np.zeros((3, 4), np.float32), ValueError, "grads: expected shape"),
        (keys_of(1, 2), np.array([[0, 0, 0, 0], [0, np.nan, 0, 0]], np.float32), ValueError, "non-finite"),
        (keys_of(1, 2), np.array([[0, 0, 0, np.inf], [0, 0, 0, 0]], np.float32), ValueError, "non-finite"),
        (keys_of(1), [[0.0] * 4], TypeError, "grads"),
    ],
)
def test_bad_input_raises_and_changes_nothing(keys, grads, error, match):
    table = make()
    _fill(table, {1: [1, 2]})
    before = table.export()
    with pytest.raises(error, match=match):
        table.apply_gradients(keys, grads)
    after = table.export()
    np.testing.assert_array_equal(before.values, after.values)
    np.testing.assert_array_equal(before.freq, after.freq)
    assert table.version == before.version


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(dim=0), r"t\.dim: must be in \[1, 65536\], got 0"),
        (dict(dtype="float16"), r"t\.dtype"),
        (dict(optimizer=OptimizerConfig(kind="rmsprop")), r"t\.optimizer\.kind: must be one of"),
        (dict(optimizer=OptimizerConfig(lr=0.0)), r"t\.optimizer\.lr: must be > 0"),
        (dict(eviction=EvictionConfig(policy=EvictionPolicy.LRU)), r"t\.eviction\.policy: .*capacity"),
        (dict(admission=AdmissionConfig(kind=AdmissionKind.PROBABILITY, probability=1.5)), "probability"),
        (dict(device="tpu"), r"t\.device"),
    ],
)
def test_config_errors_name_the_field(overrides, match):
    config = dict(name="t", dim=4) | overrides
    with pytest.raises((ValueError, TypeError), match=match):
        EmbeddingTable(TableConfig(**config))


def test_memory_overhead_per_row_is_under_32_bytes():
    dim = 16
    table = EmbeddingTable(TableConfig(name="t", dim=dim, optimizer=SGD), block_shift=12)
    rng = np.random.default_rng(0)
    worst = 0.0
    for _ in range(40):
        keys = rng.integers(-(2**63), 2**63 - 1, size=25_000, dtype=np.int64)
        table.apply_gradients(keys, np.zeros((keys.shape[0], dim), np.float32))
        payload = table.size * (table.dim + table.state_width) * 4
        # Rows preallocated in the last, partly filled block are capacity, not per-row overhead.
        unused = (table._store.num_allocated_rows - table._map.num_rows) * table.width * 4
        worst = max(worst, (table.memory_bytes - unused - payload) / table.size)
    assert worst < 32, f"overhead {worst:.1f} bytes per row"



def _no_block_past(rows: int):
    """A RowStore.ensure_rows that cannot allocate past `rows` (MemoryError), as a full machine."""

    def ensure_rows(num_rows: int) -> None:
        if num_rows > rows:
            raise MemoryError("no block")

    return ensure_rows


def test_a_wide_row_takes_a_block_of_its_width_and_a_block_that_cannot_be_had_changes_nothing(monkeypatch):
    """Blocks held 2^16 rows whatever their width: a table of dim 65536 with Adam asked 48 GiB for
    its first row (MemoryError on a 24 GiB machine), and the key, inserted before its block, was
    left without a row: every later lookup of it raised IndexError, every push MemoryError. Now a
    block is at most MAX_BLOCK_BYTES, and a push whose block cannot be had changes nothing."""
    adam = OptimizerConfig(kind=OptimizerKind.ADAM, lr=0.1)
    wide = EmbeddingTable(TableConfig(name="wide", dim=65536, optimizer=adam))
    assert wide._store.block_rows * wide.width * 4 <= MAX_BLOCK_BYTES
    wide.apply_gradients(np.array([7], dtype=np.int64), np.ones((1, 65536), np.float32), step=1)
    assert wide.size == 1 and np.isfinite(wide.read(np.array([7], dtype=np.int64))).all()
    for admission in (AdmissionConfig(), AdmissionConfig(kind=AdmissionKind.COUNT, min_count=1)):
        table = EmbeddingTable(TableConfig(name="t", dim=4, optimizer=SGD, admission=admission), block_shift=2)
        table.apply_gradients(np.arange(4, dtype=np.int64), np.ones((4, 4), np.float32), step=1)
        before = table.read(np.arange(4, dtype=np.int64))
        monkeypatch.setattr(table._store, "ensure_rows", _no_block_past(4))
        with pytest.raises(MemoryError):
            table.apply_gradients(np.arange(2, 6, dtype=np.int64), np.ones((4, 4), np.float32), step=2)
        monkeypatch.undo()
        assert table.size == 4 and table.version == 1
        np.testing.assert_array_equal(table.read(np.arange(4, dtype=np.int64)), before)
        table.apply_gradients(np.arange(2, 6, dtype=np.int64), np.ones((4, 4), np.float32), step=2)
        assert table.size == 6 and np.isfinite(table.read(np.arange(6, dtype=np.int64))).all()



def test_a_multi_table_push_whose_later_table_cannot_have_its_block_changes_no_table(monkeypatch):
    """push_tables applied the tables that need apply_gradients (admission here) first and
    allocated the native tables' rows after: a MemoryError there left the first applied, a push
    half done that a retry with the same push id applied again (a review). Every table's rows are
    now allocated before any changes."""
    admitting = EmbeddingTable(
        TableConfig(name="a", dim=4, optimizer=SGD, admission=AdmissionConfig(kind=AdmissionKind.COUNT, min_count=1)),
        block_shift=2,
    )
    plain = EmbeddingTable(TableConfig(name="b", dim=4, optimizer=SGD), block_shift=2)
    for table in (admitting, plain):
        table.apply_gradients(np.arange(4, dtype=np.int64), np.ones((4, 4), np.float32), step=1)
    before = admitting.read(np.arange(6, dtype=np.int64))
    monkeypatch.setattr(plain._store, "ensure_rows", _no_block_past(4))
    keys = np.concatenate([np.arange(2, 6), np.arange(2, 6)]).astype(np.int64)
    offsets = np.array([0, 4, 8], dtype=np.int64)
    with pytest.raises(MemoryError):
        push_tables([admitting, plain], keys, offsets, np.ones(32, np.float32), None, 2)
    assert (admitting.version, admitting.size, plain.version, plain.size) == (1, 4, 1, 4)
    np.testing.assert_array_equal(admitting.read(np.arange(6, dtype=np.int64)), before)


def test_rows_grow_in_blocks_without_copying():
    table = EmbeddingTable(TableConfig(name="t", dim=4, optimizer=SGD), block_shift=4)
    table.apply_gradients(np.arange(16, dtype=np.int64), np.zeros((16, 4), np.float32))
    first_block = table._store.blocks[0]
    address = first_block.ctypes.data
    table.apply_gradients(np.arange(16, 100, dtype=np.int64), np.ones((84, 4), np.float32))
    assert len(table._store.blocks) == 7
    assert table._store.blocks[0].ctypes.data == address  # the old block was not moved
    np.testing.assert_allclose(
        table.lookup(np.arange(100, dtype=np.int64)).numpy()[16:],
        table.init_values(np.arange(16, 100, dtype=np.int64)) - 1.0,
        atol=1e-6,
    )


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", list(OptimizerKind))
def test_cuda_rows_match_cpu_rows(kind):
    config = dict(name="t", dim=8, optimizer=OptimizerConfig(kind=kind, lr=0.1), seed=2)
    cpu = EmbeddingTable(TableConfig(**config))
    gpu = EmbeddingTable(TableConfig(**config, device="cuda"))
    rng = np.random.default_rng(1)
    for step in range(1, 11):
        keys = rng.integers(0, 100, 64).astype(np.int64)
        grads = rng.normal(size=(64, 8)).astype(np.float32)
        cpu.apply_gradients(keys, grads, step=step)
        gpu.apply_gradients(keys, torch.from_numpy(grads).cuda(), step=step)
    keys = np.arange(100, dtype=np.int64)
    out = gpu.lookup(keys)
    assert out.device.type == "cuda"
    assert (out.cpu() - cpu.lookup(keys)).abs().max() <= 1e-5


def test_change_tracking_and_deltas_rebuild_the_live_table():
    config = TableConfig(
        name="t",
        dim=4,
        capacity=40,
        optimizer=OptimizerConfig(kind=OptimizerKind.ADAGRAD, lr=0.1),
        eviction=EvictionConfig(policy=EvictionPolicy.LRU, ttl_steps=6),
        admission=AdmissionConfig(kind=AdmissionKind.COUNT, min_count=2),
    )
    live = EmbeddingTable(config)
    live.enable_change_tracking()
    rebuilt = EmbeddingTable(config)
    rebuilt.load(live.export())
    rng = np.random.default_rng(5)
    total_deleted = 0
    for step in range(1, 31):
        keys = rng.integers(0, 60, 12).astype(np.int64)
        live.apply_gradients(keys, rng.normal(size=(12, 4)).astype(np.float32), step=step)
        if step % 5 == 0:
            changes = live.take_changes()
            assert np.intersect1d(changes.touched_keys, changes.deleted_keys).size == 0
            total_deleted += changes.deleted_keys.shape[0]
            rebuilt.load_delta(live.export(changes.touched_keys), changes.deleted_keys)
            a, b = live.export(), rebuilt.export()
            for name in ("keys", "values", "optimizer_state", "freq", "last_step", "pending_keys", "pending_counts"):
                np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
            assert (a.version, a.step) == (b.version, b.step)
    assert total_deleted > 0  # evictions happened and travelled as deletions


def test_take_changes_needs_tracking():
    with pytest.raises(ValueError, match="change tracking is off"):
        make().take_changes()


def test_pending_admission_keys_are_capped_oldest_first():
    table = make(admission=AdmissionConfig(kind=AdmissionKind.COUNT, min_count=3, max_pending=10))
    g = np.zeros((1, 4), np.float32)
    for key in range(25):
        table.apply_gradients(keys_of(key), g, step=key + 1)
        if key == 5:
            table.apply_gradients(keys_of(0), g, step=key + 1)  # seen again: still first seen first
    assert table.num_pending == 10 and table.num_pending_dropped == 15
    assert table.export().pending_keys.tolist() == list(range(15, 25))
    # A forgotten key counts afresh; a kept one keeps its count.
    table.apply_gradients(keys_of(0, 0, 24, 24), np.zeros((4, 4), np.float32), step=30)
    assert table.export().keys.tolist() == [24]
    restored = make(admission=AdmissionConfig(kind=AdmissionKind.COUNT, min_count=3, max_pending=4))
    restored.load(table.export())  # a state over the cap keeps the most recently pushed keys
    assert restored.num_pending == 4 and 0 in restored.export().pending_keys.tolist()


def test_evicting_push_into_a_full_2m_row_table_reads_no_whole_table():
    """Capacity eviction and the TTL sweep of a large table sample and window: no pass over it. A
    sampled eviction frees the oldest sixteenth of its 4,096-row sample (at least the rows the push
    needs), so the pushes after it find room without a sample of their own."""
    n = 2_000_000
    table = make(dim=4, capacity=n, eviction=EvictionConfig(policy=EvictionPolicy.LRU, ttl_steps=10_000))
    for part in range(4):
        keys = np.arange(part * n // 4, (part + 1) * n // 4, dtype=np.int64)
        table.apply_gradients(keys, np.zeros((keys.shape[0], 4), np.float32), step=part + 1)
    old = np.arange(0, n // 4, dtype=np.int64)  # step 1: the least recently pushed quarter
    seconds, evicted = [], []
    for i in range(21):
        keys = np.arange(n + 100 * i, n + 100 * (i + 1), dtype=np.int64)
        size = table.size
        start = time.process_time()  # CPU time: a whole-table pass costs it, a busy machine does not
        result = table.apply_gradients(keys, np.zeros((100, 4), np.float32), step=10 + i)
        spent = time.process_time() - start
        count = result.evicted_keys.shape[0]
        if size + 100 <= n:
            assert count == 0  # room left by an earlier eviction: nothing sampled, nothing evicted
        else:
            assert size + 100 - n <= count <= 256  # what the push needs, up to a sixteenth of the sample
            assert count >= 4096 // 16 - 8  # the sixteenth (the sample may repeat a row or two)
            seconds.append(spent)
        evicted.append(count)
        assert n - 256 < table.size <= n and table.size == size + 100 - count
        assert np.isin(result.evicted_keys, old).all()  # sampled, yet from the oldest rows
    assert 5 <= len(seconds) <= 11 and evicted[0] > 0 and evicted[1] == 0, evicted
    assert np.median(seconds) < 0.010, f"median evicting push {np.median(seconds) * 1e3:.1f} ms of CPU"


def test_ttl_sweep_of_a_large_table_evicts_within_passes():
    n = 100_000
    table = make(dim=4, eviction=EvictionConfig(ttl_steps=8))
    keys = np.arange(n, dtype=np.int64)
    table.apply_gradients(keys, np.zeros((n, 4), np.float32), step=1)
    hot = keys[:10]
    step = 2
    while table.size > hot.shape[0] and step < 100:
        table.apply_gradients(hot, np.zeros((10, 4), np.float32), step=step)
        step += 1
    # Expired from step 10 on; a window of 16,384 rows a push reads 100,000 rows in 7 pushes.
    assert table.size == hot.shape[0] and step <= 10 + 2 * 7
    assert table.num_evicted == n - hot.shape[0]


def test_ttl_sweep_of_a_large_table_with_a_long_ttl_reads_a_pass_per_eighth_of_the_ttl():
    """ttl_steps 800: a pass over the rows every 100 steps (as a small table sweeps), so each push
    reads 1,000 of the 100,000 rows, not 16,384: expired rows are still there 20 steps later, and
    all gone within 100."""
    n, ttl = 100_000, 800
    table = make(dim=4, eviction=EvictionConfig(ttl_steps=ttl))
    keys = np.arange(n, dtype=np.int64)
    table.apply_gradients(keys, np.zeros((n, 4), np.float32), step=1)
    hot = keys[:10]
    left = {}
    for step in range(2, 1 + ttl + 102):
        table.apply_gradients(hot, np.zeros((10, 4), np.float32), step=step)
        left[step] = table.size - hot.shape[0]
    assert left[1 + ttl] == n - hot.shape[0]  # not expired before ttl steps have passed
    assert 0 < left[1 + ttl + 20] < n - hot.shape[0]
    assert left[1 + ttl + 101] == 0
    assert table.num_evicted == n - hot.shape[0]


def test_change_tracking_past_its_bound_reports_incomplete_changes():
    table = make()
    table.enable_change_tracking(max_keys=5)
    table.apply_gradients(np.arange(10, dtype=np.int64), np.zeros((10, 4), np.float32))
    changes = table.take_changes()
    assert not changes.complete and changes.touched_keys.size == 0
    table.apply_gradients(keys_of(3, 4), np.zeros((2, 4), np.float32))
    changes = table.take_changes()
    assert changes.complete and changes.touched_keys.tolist() == [3, 4]


def test_a_table_on_a_device_this_machine_lacks_is_refused_naming_it():
    device = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    with pytest.raises(ValueError, match=rf"^t\.device: '{device}' cannot hold rows here: "):
        EmbeddingTable(TableConfig(name="t", dim=4, device=device))


def test_a_delta_that_deletes_one_key_twice_frees_one_row_against_capacity():
    source = make(capacity=4)
    source.apply_gradients(keys_of(3, 4), np.ones((2, 4), np.float32), step=1)
    table = make(capacity=2)
    table.apply_gradients(keys_of(1, 2), np.ones((2, 4), np.float32), step=1)
    with pytest.raises(CapacityError, match="delta grows past capacity 2"):
        table.load_delta(source.export(keys_of(3, 4)), keys_of(1, 1))
    assert sorted(table.export().keys.tolist()) == [1, 2]


def test_a_trained_table_loading_a_state_without_layout_evicts_as_a_fresh_table_would():
    """load() without a layout (a snapshot older than layouts) kept the table's eviction sampler and
    sweep cursors: a table that had trained then evicted other rows than a fresh one loading the
    same state (a primary and its standby, a resumed job, must evict the same rows)."""
    import dataclasses

    from ps.table.config import EvictionConfig, EvictionPolicy

    config = TableConfig(name="t", dim=2, capacity=70_000, eviction=EvictionConfig(policy=EvictionPolicy.LRU))
    rng = np.random.default_rng(0)
    trained = EmbeddingTable(config)
    for step in range(1, 30):  # past the capacity: sampled eviction draws from the table's sampler
        trained.apply_gradients(rng.integers(0, 2**40, 4000), np.zeros((4000, 2), np.float32), step=step)
    assert trained.num_evicted > 0
    state = dataclasses.replace(trained.export(), layout=None)
    fresh = EmbeddingTable(config)
    fresh.load(state)
    trained.load(state)
    for step in range(30, 36):
        keys = rng.integers(0, 2**40, 4000)
        a = trained.apply_gradients(keys, np.zeros((4000, 2), np.float32), step=step)
        b = fresh.apply_gradients(keys, np.zeros((4000, 2), np.float32), step=step)
        np.testing.assert_array_equal(np.sort(a.evicted_keys), np.sort(b.evicted_keys))
    np.testing.assert_array_equal(trained.export().keys, fresh.export().keys)
