"""Synthetic data: determinism, the rank split, a held-out split, a learnable signal, Zipf skew."""

import json
import threading
from dataclasses import replace

import numpy as np
import pytest

from tests.worker.reference_features import assert_batches_equal
from worker.batch import Batch
from worker.data_options import SyntheticConfig
from worker.metrics import auc
from worker.synthetic import Split, SyntheticData, SyntheticReader

SMALL = SyntheticConfig(num_dense=4, num_sparse=6, num_keys=1000, global_batch_size=64, num_batches=6, seed=11)


def test_deterministic_given_seed_rank_world_and_batch_index():
    a = list(SyntheticReader(SMALL, rank=1, world_size=2))
    b = list(SyntheticReader(SMALL, rank=1, world_size=2))
    assert len(a) == 6 and all(len(batch) == 32 for batch in a)
    for x, y in zip(a, b, strict=True):
        assert_batches_equal(x, y)
    assert_batches_equal(SyntheticReader(SMALL, rank=1, world_size=2).batch(4), a[4])
    other_seed = SyntheticReader(replace(SMALL, seed=12), rank=1, world_size=2).batch(0)
    assert not np.array_equal(other_seed.sparse, a[0].sparse)
    assert not np.array_equal(a[0].sparse, a[1].sparse)


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_together_give_the_single_process_global_batches(world_size):
    single = list(SyntheticReader(SMALL))
    ranks = [list(SyntheticReader(SMALL, rank=r, world_size=world_size)) for r in range(world_size)]
    for t, whole in enumerate(single):
        parts = [ranks[r][t] for r in range(world_size)]
        assert all(len(p) == 64 // world_size for p in parts)
        assert_batches_equal(Batch.cat(parts), whole)


def test_eval_split_is_held_out_and_deterministic():
    data = SyntheticData(SMALL)
    train = [data.global_batch(t, Split.TRAIN) for t in range(SMALL.num_batches)]
    evals = list(SyntheticReader(SMALL, split="eval"))
    assert len(evals) == SMALL.num_eval_batches
    assert_batches_equal(evals[0], data.global_batch(0, Split.EVAL))
    for e in evals:
        for t in train:
            assert not np.array_equal(e.dense.numpy(), t.dense.numpy())
    with pytest.raises(ValueError, match="index"):
        data.global_batch(SMALL.num_eval_batches, Split.EVAL)


def test_planted_signal_is_there():
    config = SyntheticConfig(num_dense=4, num_sparse=8, num_keys=1000, global_batch_size=4096, num_batches=1, seed=3)
    data = SyntheticData(config)
    batch = data.global_batch(0)
    labels = batch.labels.numpy()
    logits = data.true_logits(batch.dense.numpy(), batch.sparse)
    assert 0.3 < labels.mean() < 0.7
    assert auc(labels, logits) > 0.85
    assert np.std(data.key_weights(batch.sparse).sum(axis=1)) == pytest.approx(config.signal_std, rel=0.15)
    # The labels follow the planted model: mean label per logit bin tracks sigmoid(logit).
    bins = np.digitize(logits, [-2.0, 0.0, 2.0])
    for b in range(4):
        mask = bins == b
        assert labels[mask].mean() == pytest.approx((1 / (1 + np.exp(-logits[mask]))).mean(), abs=0.06)


def test_no_signal_when_signal_is_off():
    config = SyntheticConfig(
        num_dense=4, num_sparse=8, num_keys=1000, global_batch_size=4096, signal_std=0, dense_scale=0, seed=3
    )
    data = SyntheticData(config)
    batch = data.global_batch(0)
    sparse_logit = SyntheticData(replace(config, signal_std=3.0)).true_logits(batch.dense.numpy(), batch.sparse)
    assert abs(auc(batch.labels.numpy(), sparse_logit) - 0.5) < 0.05


def test_zipf_skew():
    skewed = SyntheticData(SyntheticConfig(num_sparse=2, num_keys=1000, global_batch_size=8192, zipf_alpha=1.05))
    uniform = SyntheticData(SyntheticConfig(num_sparse=2, num_keys=1000, global_batch_size=8192, zipf_alpha=0.0))
    harmonic = (np.arange(1, 1001) ** -1.05).sum()
    for data, expected_top in ((skewed, 1 / harmonic), (uniform, 1 / 1000)):
        column = data.global_batch(0).sparse[:, 0]
        _, counts = np.unique(column, return_counts=True)
        assert counts.max() / column.shape[0] == pytest.approx(expected_top, rel=0.3, abs=0.003)
    skewed_keys = skewed.global_batch(0).sparse
    assert np.intersect1d(skewed_keys[:, 0], skewed_keys[:, 1]).size == 0  # features do not share keys


def test_state_and_restore():
    reader = SyntheticReader(SMALL, rank=0, world_size=2)
    iterator = iter(reader)
    for _ in range(4):
        next(iterator)
    state = json.loads(json.dumps(reader.state()))
    assert state == {"split": "train", "num_batches": 4}
    rest = list(iterator)
    resumed = SyntheticReader(SMALL, rank=0, world_size=2)
    resumed.restore(state)
    again = list(resumed)
    assert len(again) == len(rest) == 2
    for a, b in zip(again, rest, strict=True):
        assert_batches_equal(a, b)
    with pytest.raises(ValueError, match="state.split"):
        SyntheticReader(SMALL, split=Split.EVAL).restore(state)
    with pytest.raises(ValueError, match="state.num_batches"):
        resumed.restore({"split": "train", "num_batches": 99})


def test_prefetched_reader_yields_the_same_batches_and_its_position_follows_the_consumer():
    plain = list(SyntheticReader(SMALL, rank=1, world_size=2))
    reader = SyntheticReader(SMALL, rank=1, world_size=2, prefetch_batches=2)
    iterator = iter(reader)
    first = next(iterator)
    made_ahead = [t for t in threading.enumerate() if t.name == "synthetic-prefetch"]
    assert made_ahead, "prefetch_batches=2 makes batches on a thread of its own"
    assert reader.state()["num_batches"] == 1  # the batches made ahead are not yielded yet
    rest = list(iterator)
    for a, b in zip([first, *rest], plain, strict=True):
        assert_batches_equal(a, b)
    assert reader.state()["num_batches"] == 6
    made_ahead[0].join(timeout=10)
    assert not made_ahead[0].is_alive()

    resumed = SyntheticReader(SMALL, rank=1, world_size=2, prefetch_batches=2)
    resumed.restore({"split": "train", "num_batches": 4})
    for a, b in zip(resumed, plain[4:], strict=True):
        assert_batches_equal(a, b)
    with pytest.raises(ValueError, match="prefetch_batches: must be an int >= 0, got -1"):
        SyntheticReader(SMALL, prefetch_batches=-1)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="num_keys"):
        SyntheticConfig(num_keys=0)
    with pytest.raises(ValueError, match="zipf_alpha"):
        SyntheticConfig(zipf_alpha=float("nan"))
    with pytest.raises(ValueError, match="global_batch_size"):
        SyntheticReader(SyntheticConfig(global_batch_size=10), rank=0, world_size=4)
    with pytest.raises(ValueError, match="split"):
        SyntheticReader(SMALL, split="test")
    with pytest.raises(ValueError, match=r"rows: must satisfy 0 <= start <= stop <= 64, got \[8, 65\)"):
        SyntheticData(SMALL).global_batch(0, start=8, stop=65)
