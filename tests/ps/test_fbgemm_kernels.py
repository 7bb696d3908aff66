"""kernels = "fbgemm": fbgemm's table-batched fused optimizers give the rows and optimizer state of
our C++ kernels, for one table and for a group of tables of two dims in one push."""

import numpy as np
import pytest
import torch

from ps.table import embedding_table, fbgemm_kernels, multi
from ps.table.config import Kernels, OptimizerConfig, OptimizerKind, TableConfig
from ps.table.embedding_table import EmbeddingTable

FUSED = {
    OptimizerKind.SGD: OptimizerConfig(kind=OptimizerKind.SGD, lr=0.1),
    OptimizerKind.ADAGRAD: OptimizerConfig(kind=OptimizerKind.ADAGRAD, lr=0.1, eps=1e-6, initial_accumulator=0.1),
    OptimizerKind.ROWWISE_ADAGRAD: OptimizerConfig(kind=OptimizerKind.ROWWISE_ADAGRAD, lr=0.1, eps=1e-6),
}


def _configs(kind: OptimizerKind, device: str = "cpu") -> list[TableConfig]:
    # Two dims: the push runs as two fbgemm calls, one per group of tables with the same dim.
    return [
        TableConfig(name=f"t{i}", dim=dim, seed=i, init_scale=0.1, optimizer=FUSED[kind], device=device)
        for i, dim in enumerate((8, 8, 4))
    ]


def _push_steps(groups: list[list[EmbeddingTable]], steps: int = 8) -> None:
    rng = np.random.default_rng(5)
    dims = [t.dim for t in groups[0]]
    for step in range(1, steps + 1):
        # Repeated keys within a table, keys shared between tables, counts > 1.
        keys = [rng.integers(-40, 40, size=int(rng.integers(1, 60))).astype(np.int64) for _ in dims]
        offsets = np.zeros(len(dims) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([k.shape[0] for k in keys])
        flat_keys = np.concatenate(keys)
        grads = np.concatenate([rng.normal(size=k.shape[0] * d) for k, d in zip(keys, dims, strict=True)])
        counts = rng.integers(1, 4, size=flat_keys.shape[0]).astype(np.int64)
        for tables in groups:
            multi.push_tables(tables, flat_keys, offsets, grads.astype(np.float32), counts, step)


def _assert_same_tables(a: EmbeddingTable, b: EmbeddingTable) -> None:
    sa, sb = a.export(), b.export()
    assert np.array_equal(sa.keys, sb.keys)
    assert np.abs(sa.values - sb.values).max() <= 1e-6
    # Accumulators grow past 10, where float32 steps by ~1e-6: relative, for the state.
    assert np.allclose(sa.optimizer_state, sb.optimizer_state, rtol=1e-6, atol=1e-6)
    assert np.array_equal(sa.freq, sb.freq) and np.array_equal(sa.last_step, sb.last_step)
    assert (sa.version, sa.step) == (sb.version, sb.step)


@pytest.mark.parametrize("kind", list(FUSED))
def test_fbgemm_group_push_matches_native(kind):
    native = [EmbeddingTable(c, kernels="native") for c in _configs(kind)]
    fbgemm = [EmbeddingTable(c, kernels="fbgemm") for c in _configs(kind)]
    assert {t.kernels for t in fbgemm} == {Kernels.FBGEMM}
    _push_steps([native, fbgemm])
    for a, b in zip(native, fbgemm, strict=True):
        _assert_same_tables(a, b)
        assert np.abs(a.export().values - a.init_values(a.export().keys)).max() > 1e-3  # the rows moved


def test_pushes_of_fewer_tables_reuse_one_scratch_per_group_and_match_native(monkeypatch):
    """A scratch was kept per (group, number of tables): pushes whose tables varied held about T / 2
    times the documented memory, never freed. One per group now, the missing tables empty bags."""
    configs = [
        TableConfig(name=f"s{i}", dim=8, seed=i, init_scale=0.1, optimizer=FUSED[OptimizerKind.ADAGRAD])
        for i in range(4)
    ]
    native = [EmbeddingTable(c, kernels="native") for c in configs]
    fbgemm = [EmbeddingTable(c, kernels="fbgemm") for c in configs]
    kernels = fbgemm_kernels.FbgemmKernels()
    monkeypatch.setattr(fbgemm_kernels, "KERNELS", kernels)  # this test's own scratches, apart from other tests'
    rng = np.random.default_rng(9)
    for step, subset in enumerate(([0, 1, 2, 3], [1], [0, 2], [3, 1, 2], [2]), start=1):
        keys = [rng.integers(0, 50, size=30).astype(np.int64) for _ in subset]
        offsets = np.zeros(len(subset) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([k.shape[0] for k in keys])
        grads = rng.normal(size=offsets[-1] * 8).astype(np.float32)
        for tables in (native, fbgemm):
            multi.push_tables([tables[i] for i in subset], np.concatenate(keys), offsets, grads, None, step)
    assert len(kernels._scratch) == 1 and next(iter(kernels._scratch.values())).num_tables == 4
    for a, b in zip(native, fbgemm, strict=True):
        _assert_same_tables(a, b)


def test_fbgemm_single_table_apply_matches_native():
    config = TableConfig(name="t", dim=16, seed=1, optimizer=FUSED[OptimizerKind.ROWWISE_ADAGRAD], kernels="fbgemm")
    native = EmbeddingTable(config, kernels="native")
    fbgemm = EmbeddingTable(config)
    rng = np.random.default_rng(2)
    for step in range(1, 6):
        keys = rng.integers(0, 3000, size=2000).astype(np.int64)  # > the scratch's first 1,024 rows
        grads = rng.normal(size=(2000, 16)).astype(np.float32)
        native.apply_gradients(keys, grads, step=step)
        fbgemm.apply_gradients(keys, grads, step=step)
    _assert_same_tables(native, fbgemm)


def test_fbgemm_kernels_refuse_what_they_cannot_run():
    with pytest.raises(ValueError, match=r"t\.kernels: fbgemm fuses sgd, adagrad, rowwise_adagrad .* not 'adam'"):
        TableConfig(name="t", dim=4, optimizer=OptimizerConfig(kind=OptimizerKind.ADAM), kernels="fbgemm").validate()
    with pytest.raises(ValueError, match=r"t\.kernels: 'fbgemm' has no float16 rows"):
        EmbeddingTable(TableConfig(name="t", dim=4, storage="float16"), kernels="fbgemm")
    with pytest.raises(ValueError, match=r"t\.kernels: must be one of"):
        TableConfig(name="t", dim=4, kernels="cudnn").validate()
    assert EmbeddingTable(TableConfig(name="t", dim=4)).kernels == Kernels.NATIVE  # CPU keeps our C++


def test_cuda_tables_without_fbgemm_run_on_torch_ops_and_say_why(monkeypatch, caplog):
    monkeypatch.setattr(fbgemm_kernels, "unavailable_reason", lambda: "fbgemm_gpu is not importable (test)")
    embedding_table._warn_torch_fallback.cache_clear()
    configs = [TableConfig(name=f"t{i}", dim=4, device="cuda:0", optimizer=FUSED[OptimizerKind.SGD]) for i in range(3)]
    with caplog.at_level("WARNING", logger="ps.table.embedding_table"):
        assert {embedding_table._resolve_kernels(c) for c in configs} == {Kernels.TORCH}
    assert [r.getMessage() for r in caplog.records] == [
        "tables on cuda:0: fbgemm_gpu is not importable (test); their fused updates run on torch ops instead (slower)"
    ]  # once for the three tables
    embedding_table._warn_torch_fallback.cache_clear()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", list(FUSED))
def test_cuda_tables_default_to_fbgemm_and_match_native(kind):
    cpu = [EmbeddingTable(c) for c in _configs(kind)]
    assert (reason := fbgemm_kernels.unavailable_reason()) is None, f"a CUDA host needs embps[cuda]: {reason}"
    cuda = [EmbeddingTable(c) for c in _configs(kind, device="cuda")]
    assert {t.kernels for t in cuda} == {Kernels.FBGEMM}
    _push_steps([cpu, cuda])
    for a, b in zip(cpu, cuda, strict=True):
        _assert_same_tables(a, b)
