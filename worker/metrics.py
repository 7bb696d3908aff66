"""Evaluation metrics on numpy arrays: exact ROC AUC and log loss."""

from __future__ import annotations

import numpy as np


def _as_array(values: object, name: str) -> np.ndarray:
    if hasattr(values, "detach") and hasattr(values, "cpu"):  # torch.Tensor
        values = values.detach().cpu().numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name}: expected shape (n,), got {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name}: must be finite, found NaN or inf")
    return array


def _labels_and(labels: object, other: object, other_name: str, binary: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """binary: labels must be 0 or 1 (AUC); else in [0, 1] (log loss of click probabilities)."""
    y = _as_array(labels, "labels")
    x = _as_array(other, other_name)
    if y.shape != x.shape:
        raise ValueError(f"labels, {other_name}: must have the same shape (n,), got {y.shape} and {x.shape}")
    if binary and not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels: must be 0 or 1")
    if not binary and ((y < 0) | (y > 1)).any():
        raise ValueError("labels: must be in [0, 1]")
    return y, x


def auc(labels: object, scores: object) -> float:
    """ROC AUC: labels (n,) in {0, 1}, scores (n,) float -> P(score_pos > score_neg) + P(tie) / 2.

    Exact, via the Mann-Whitney U statistic with average ranks for tied scores; O(n log n).
    Raises ValueError when labels hold only one class (AUC is undefined then).
    """
    y, s = _labels_and(labels, scores, "scores")
    num_pos = int(y.sum())
    num_neg = y.shape[0] - num_pos
    if num_pos == 0 or num_neg == 0:
        raise ValueError(f"labels: AUC needs both classes, got {num_pos} positive and {num_neg} negative")
    order = np.argsort(s, kind="stable")
    sorted_scores = s[order]
    # Average 1-based rank of each group of equal scores.
    starts = np.flatnonzero(np.concatenate([[True], sorted_scores[1:] != sorted_scores[:-1]]))
    ends = np.concatenate([starts[1:], [s.shape[0]]])
    group_rank = (starts + 1 + ends) / 2.0
    ranks = np.repeat(group_rank, ends - starts)
    rank_sum_pos = ranks[y[order] == 1.0].sum()
    u = rank_sum_pos - num_pos * (num_pos + 1) / 2.0
    return float(u / (num_pos * num_neg))


def logloss(labels: object, probabilities: object, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy: labels (n,) in [0, 1] (0 or 1, or click probabilities, as the
    readers take them), probabilities (n,) in [0, 1] -> float.

    Probabilities are clipped to [eps, 1 - eps] so a confident mistake costs -log(eps), not inf.
    """
    if not 0 < eps < 0.5:
        raise ValueError(f"eps: must be in (0, 0.5), got {eps}")
    y, p = _labels_and(labels, probabilities, "probabilities", binary=False)
    if y.shape[0] == 0:
        raise ValueError("labels: need at least one sample")
    if ((p < 0) | (p > 1)).any():
        raise ValueError("probabilities: must be in [0, 1]")
    p = np.clip(p, eps, 1 - eps)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def logloss_from_logits(labels: object, logits: object) -> float:
    """Mean binary cross-entropy from logits, computed stably: labels (n,) in [0, 1], logits (n,) -> float.

    Per sample: max(z, 0) - z * y + log(1 + exp(-|z|)), which equals -log sigmoid(z) for y = 1
    and -log(1 - sigmoid(z)) for y = 0, with no overflow for large |z|.
    """
    y, z = _labels_and(labels, logits, "logits", binary=False)
    if y.shape[0] == 0:
        raise ValueError("labels: need at least one sample")
    return float(np.mean(np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))))
