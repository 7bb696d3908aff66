"""AUC and log loss against brute force and known values."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.metrics import auc, logloss, logloss_from_logits


def brute_force_auc(labels, scores) -> float:
    positives = [s for y, s in zip(labels, scores, strict=True) if y == 1]
    negatives = [s for y, s in zip(labels, scores, strict=True) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 1), st.integers(-3, 3)), min_size=2, max_size=40).filter(
        lambda pairs: len({y for y, _ in pairs}) == 2
    ),
    st.booleans(),
)
def test_auc_matches_pairwise_brute_force_with_ties(pairs, as_float):
    labels = [y for y, _ in pairs]
    scores = [s / 7 if as_float else s for _, s in pairs]
    assert auc(np.array(labels), np.array(scores, dtype=np.float64)) == pytest.approx(brute_force_auc(labels, scores))


def test_auc_known_values():
    assert auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert auc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == 0.0
    assert auc([1, 0, 1, 0, 1], [0.5] * 5) == 0.5
    assert auc(torch.tensor([0.0, 1.0, 1.0]), torch.tensor([0.2, 0.1, 0.9], requires_grad=True)) == pytest.approx(0.5)


def test_auc_on_a_large_sample_is_fast_and_matches_a_sampled_estimate():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=200_000)
    scores = rng.normal(size=labels.shape[0]) + labels  # separation 1 sigma: AUC = Phi(1 / sqrt 2)
    expected = 0.5 * (1 + math.erf(0.5))
    assert auc(labels, scores) == pytest.approx(expected, abs=0.005)


def test_auc_errors():
    with pytest.raises(ValueError, match="both classes"):
        auc([1, 1], [0.2, 0.3])
    with pytest.raises(ValueError, match="labels, scores"):
        auc([0, 1], [0.2])
    with pytest.raises(ValueError, match="labels: must be 0 or 1"):
        auc([0, 2], [0.2, 0.3])
    with pytest.raises(ValueError, match="scores: must be finite"):
        auc([0, 1], [0.2, float("nan")])


def test_logloss_takes_click_probabilities_as_labels():
    """The readers take labels in [0, 1] (click probabilities), and the log loss is defined for
    them; it refused them, and the job's evaluation ended it before its model was written."""
    assert logloss_from_logits([0.5], [0.0]) == pytest.approx(math.log(2))
    assert logloss([0.25, 1.0], [0.5, 0.5]) == pytest.approx(math.log(2))
    with pytest.raises(ValueError, match=r"labels: must be in \[0, 1\]"):
        logloss_from_logits([1.5], [0.0])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.floats(-30, 30)), min_size=1, max_size=30))
def test_logloss_matches_the_definition(pairs):
    labels = [y for y, _ in pairs]
    logits = [z for _, z in pairs]
    probabilities = [1 / (1 + math.exp(-z)) for z in logits]
    expected = -sum(math.log(sigmoid_of(y, z)) for y, z in pairs) / len(pairs)
    assert logloss_from_logits(labels, logits) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    clipped = [min(max(p, 1e-7), 1 - 1e-7) for p in probabilities]
    by_hand = -sum(y * math.log(p) + (1 - y) * math.log(1 - p) for y, p in zip(labels, clipped, strict=True))
    assert logloss(labels, probabilities) == pytest.approx(by_hand / len(pairs), rel=1e-6)


def sigmoid_of(label: int, logit: float) -> float:
    """P(label | logit), without overflow for either sign."""
    z = logit if label == 1 else -logit
    return 1 / (1 + math.exp(-z)) if z >= 0 else math.exp(z) / (1 + math.exp(z))


def test_logloss_known_values():
    assert logloss([0, 1], [0.5, 0.5]) == pytest.approx(math.log(2))
    assert logloss([1], [0.0]) == pytest.approx(-math.log(1e-7))
    assert logloss_from_logits([1, 0], [1000.0, -1000.0]) == pytest.approx(0.0, abs=1e-12)
    assert logloss_from_logits([0], [1000.0]) == pytest.approx(1000.0)
    with pytest.raises(ValueError, match="probabilities: must be in"):
        logloss([1], [1.5])
    with pytest.raises(ValueError, match="eps"):
        logloss([1], [0.5], eps=0)
