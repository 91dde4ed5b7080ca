"""The paper's metrics for many bootstrap resamples of one test set at once.

`metrics.compute_metrics` scores one resample through scikit-learn: ~16 ms for 350 cases and 5 classes,
so the paper protocol's 1,000 resamples x 5 probe seeds took 80 s per backbone.  Here a resample is
a row of counts (how often each test case was drawn) and every metric is a handful of array
operations over all rows:

* AUROC and AUPR: the cases are sorted by score once per class; each row's positive and negative
  weight is summed at every distinct score (ties share a threshold, as scikit-learn's curves do),
  giving the Mann-Whitney AUROC (ties count one half) and average precision, sum of recall gain x
  precision at each threshold (`average_precision_score`).  Counting a case twice is the same as
  weighting it 2, so these are exactly the figures of the duplicated cases.
* sensitivity, specificity, accuracy, F1 and kappa depend only on each case's predicted class, so
  one confusion matrix per row (each case's count added to its true/predicted bin) gives them all.

Written by hand, not with scikit-learn, because scikit-learn scores one resample per call; the
numbers are the same to ~1e-12 (tests/test_eval_compare.py compares every metric, ties included).
Inputs are not checked here: `metrics.bootstrap_intervals` checks them with `compute_metrics` first.
Pure numpy, no torch, no Ray.
"""

from __future__ import annotations

import numpy as np


def resample_counts(idx: np.ndarray, n: int) -> np.ndarray:
    """(R x n) how often each of the n test cases is drawn in each of the R resamples (rows of `idx`)."""
    idx = np.asarray(idx)
    rows = np.repeat(np.arange(len(idx)), idx.shape[1])
    return np.bincount(rows * n + idx.ravel(), minlength=len(idx) * n).reshape(len(idx), n)


def _cumulative_at_thresholds(score: np.ndarray, pos: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positive and negative weight scoring at or above each distinct score, highest score first (R x G each)."""
    order = np.argsort(-score, kind="stable")
    s = score[order]
    last_of_tie = np.flatnonzero(np.append(s[1:] != s[:-1], True))
    w = counts[:, order]
    tp = np.cumsum(w * pos[order], axis=1)[:, last_of_tie]
    fp = np.cumsum(w * ~pos[order], axis=1)[:, last_of_tie]
    return tp, fp


def _auroc_aupr(tp: np.ndarray, fp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: Mann-Whitney AUROC and average precision from `_cumulative_at_thresholds` (NaN where undefined)."""
    p, n = tp[:, -1].astype(float), fp[:, -1].astype(float)
    gain_tp = np.diff(tp, axis=1, prepend=0)
    gain_fp = np.diff(fp, axis=1, prepend=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        # Each positive beats the negatives scored below its threshold, and ties with half of those at it.
        auroc = (gain_tp * (n[:, None] - fp) + 0.5 * gain_tp * gain_fp).sum(axis=1) / (p * n)
        precision = np.divide(tp, tp + fp, out=np.zeros(tp.shape), where=(tp + fp) > 0)
        aupr = (gain_tp * precision).sum(axis=1) / p
    auroc[(p == 0) | (n == 0)] = np.nan  # (aupr is 0/0 = NaN already where p == 0)
    return auroc, aupr


def per_class_auroc_aupr(y: np.ndarray, scores: np.ndarray, counts: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(R x C) one-vs-rest AUROC and AUPR of each class in each resample, NaN where undefined."""
    auroc, aupr = np.full((len(counts), n_classes), np.nan), np.full((len(counts), n_classes), np.nan)
    for c in range(n_classes):
        auroc[:, c], aupr[:, c] = _auroc_aupr(*_cumulative_at_thresholds(scores[:, c], y == c, counts))
    return auroc, aupr


def resampled_macro_auroc(y: np.ndarray, scores: np.ndarray, idx: np.ndarray, n_classes: int) -> np.ndarray:
    """`metrics.macro_auroc(y[i], scores[i], n_classes)` for every row i of `idx`: the mean over the classes
    defined in that resample (binary: class 1's), NaN where none is."""
    auroc, _ = per_class_auroc_aupr(np.asarray(y), np.asarray(scores, dtype=np.float64), resample_counts(idx, len(y)), n_classes)
    if n_classes == 2:
        return np.where(np.isnan(auroc).any(axis=1), np.nan, auroc[:, 1])
    defined = ~np.isnan(auroc)
    with np.errstate(invalid="ignore"):
        return np.where(defined.any(axis=1), np.nansum(auroc, axis=1) / defined.sum(axis=1), np.nan)


def resampled_metrics(y: np.ndarray, scores: np.ndarray, counts: np.ndarray, n_classes: int, kappa_weights: str) -> dict[str, np.ndarray]:
    """`metrics.compute_metrics`' seven figures for every resample (rows of `counts`), NaN where it says None.

    `kappa_weights`: "none" (Cohen's) or "quadratic" (ordinal), as `metrics.kappa_weighting`."""
    y = np.asarray(y)
    s = np.asarray(scores, dtype=np.float64)
    c_ = n_classes
    total = counts.sum(axis=1).astype(float)
    # One confusion matrix per resample, [true, predicted]: each case's count added to its (row, cell) bin
    # (a one-hot matrix of cells would take n x C^2 memory: 39 classes, 50,000 cases, 600 MB).
    cell = y * c_ + s.argmax(axis=1)
    bins = (np.arange(len(counts))[:, None] * c_ * c_ + cell[None, :]).ravel()
    conf = np.bincount(bins, weights=counts.ravel(), minlength=len(counts) * c_ * c_).reshape(len(counts), c_, c_)
    true_n, pred_n, hits = conf.sum(axis=2), conf.sum(axis=1), np.diagonal(conf, axis1=1, axis2=2)
    absent = true_n == 0
    everyone = true_n == total[:, None]
    auroc, aupr = per_class_auroc_aupr(y, s, counts, c_)
    nan = np.full(len(counts), np.nan)
    out: dict[str, np.ndarray] = {}
    out["auroc"] = auroc[:, 1] if c_ == 2 else np.where(np.isnan(auroc).any(axis=1), nan, auroc.mean(axis=1))
    out["aupr"] = np.where(absent.any(axis=1), nan, np.nan_to_num(aupr).mean(axis=1))
    minority = slice(1, c_)
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = hits / true_n
        specificity = (total[:, None] - true_n - pred_n + hits) / (total[:, None] - true_n)
        out["sensitivity"] = np.where(absent[:, minority].any(axis=1), nan, np.nan_to_num(recall[:, minority]).mean(axis=1))
        out["specificity"] = np.where(everyone[:, minority].any(axis=1), nan, np.nan_to_num(specificity[:, minority]).mean(axis=1))
        out["accuracy"] = hits.sum(axis=1) / total
        # F1 = 2TP / (2TP + FP + FN) = 2TP / (true + predicted); 0 where a class is neither (zero_division=0).
        f1 = np.divide(2.0 * hits, true_n + pred_n, out=np.zeros(hits.shape), where=(true_n + pred_n) > 0)
        out["f1"] = np.where(absent.any(axis=1), nan, f1.mean(axis=1))
        i, j = np.indices((c_, c_))
        w = (i - j) ** 2.0 if kappa_weights == "quadratic" else (i != j).astype(float)
        expected = true_n[:, :, None] * pred_n[:, None, :] / total[:, None, None]
        out["kappa"] = 1.0 - (w * conf).sum(axis=(1, 2)) / (w * expected).sum(axis=(1, 2))
    out["kappa"][~np.isfinite(out["kappa"])] = np.nan
    return out
