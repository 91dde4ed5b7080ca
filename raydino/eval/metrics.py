"""The paper's classification metrics from class scores, their seed means and bootstrap intervals.

Metrics follow the paper (Cheng et al., MIDL 2025, and RETFound's `misc_measures`): macro
one-vs-rest AUROC, macro AUPR, sensitivity = mean recall over classes 1..C-1, specificity
likewise, plus accuracy, macro F1 and Cohen's kappa.  Kappa is quadratic-weighted only for an
ordinal task (DR grade: a grade-0 / grade-4 confusion is worse than a grade-0 / grade-1 one);
for nominal classes (JSIEC's conditions, Retina's diseases) no class is "between" two others,
so it is Cohen's unweighted kappa.  Every metrics dict says which (`kappa_weighting`).
Bootstrap 95% intervals resample the test cases within each class (stratified), so every
resample keeps the class counts of the test set.  A metric that is undefined is None with a
reason, never 0.5.

Pure numpy / scikit-learn: no torch, no Ray.  `raydino.eval.probes` produces the scores these score.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from raydino.eval.resampled import resample_counts, resampled_macro_auroc, resampled_metrics
from raydino.progress import LinePrinter, Progress

METRICS = ("auroc", "aupr", "sensitivity", "specificity", "accuracy", "f1", "kappa")
KAPPA_WEIGHTING = {True: "quadratic", False: "none"}  # ordinal task → sklearn's `weights=` name


def kappa_weighting(ordinal: bool) -> str:
    """The kappa weighting of a task: quadratic for an ordinal one, none (Cohen's unweighted) for a nominal one."""
    return KAPPA_WEIGHTING[bool(ordinal)]


def compute_metrics(y_true: Sequence[int], scores: np.ndarray, n_classes: int, ordinal: bool = False) -> dict[str, Any]:
    """The paper's metrics from class scores (N × C); undefined ones are None with a reason.

    auroc: macro one-vs-rest (binary: AUROC of class 1), equal to sklearn's
    `roc_auc_score(y, p, multi_class="ovr", average="macro")` for probabilities.
    aupr: macro over classes of `average_precision_score` (one-vs-rest).
    sensitivity / specificity: mean over classes 1..C-1 of one-vs-rest recall / TN/(TN+FP), as
    RETFound's `misc_measures` (class 0, e.g. "no DR", is the reference class).
    accuracy: fraction correct; f1: macro F1; kappa: Cohen's kappa, quadratic-weighted when
    `ordinal` (class index = severity), unweighted otherwise; `kappa_weighting` names which.
    """
    from sklearn.metrics import average_precision_score, cohen_kappa_score, f1_score, roc_auc_score

    y = np.asarray(y_true, dtype=np.int64)
    s = np.asarray(scores, dtype=np.float64)
    if y.size == 0:
        raise ValueError("compute_metrics: no test cases")
    if not np.isfinite(s).all():
        raise ValueError(f"compute_metrics: {int((~np.isfinite(s)).sum())} non-finite scores (a diverged probe? lower --lr)")
    if s.shape != (len(y), n_classes):
        raise ValueError(f"compute_metrics: scores shape {s.shape}, expected ({len(y)}, {n_classes})")
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"compute_metrics: labels must lie in 0..{n_classes - 1}, got {sorted(set(y.tolist()))}")
    pred = s.argmax(axis=1)
    counts = np.bincount(y, minlength=n_classes)
    absent = [c for c in range(n_classes) if counts[c] == 0]
    undefined: dict[str, str] = {}
    per_auroc, per_ap, per_recall, per_spec = [], [], [], []
    for c in range(n_classes):
        pos, hit = y == c, pred == c
        defined_roc = 0 < counts[c] < len(y)
        per_auroc.append(float(roc_auc_score(pos, s[:, c])) if defined_roc else None)
        per_ap.append(float(average_precision_score(pos, s[:, c])) if counts[c] else None)
        per_recall.append(float((hit & pos).sum() / pos.sum()) if counts[c] else None)
        neg = ~pos
        per_spec.append(float((~hit & neg).sum() / neg.sum()) if neg.any() else None)

    def need(metric: str, values: list, classes: Sequence[int], why: str) -> float | None:
        bad = [c for c in classes if values[c] is None]
        if bad:
            undefined[metric] = f"class(es) {bad} {why}"
            return None
        return float(np.mean([values[c] for c in classes]))

    every, minority = range(n_classes), range(1, n_classes)
    out: dict[str, Any] = {"n": int(len(y))}
    if n_classes == 2:
        out["auroc"] = per_auroc[1]
        if out["auroc"] is None:
            undefined["auroc"] = "the test cases hold only one of the two classes"
    else:
        out["auroc"] = need("auroc", per_auroc, every, "have no test cases (or are all of them)")
    out["aupr"] = need("aupr", per_ap, every, "have no test cases")
    out["sensitivity"] = need("sensitivity", per_recall, minority, "have no test cases")
    out["specificity"] = need("specificity", per_spec, minority, "are every test case (no negatives)")
    out["accuracy"] = float((pred == y).mean())
    if absent:
        out["f1"] = None
        undefined["f1"] = f"class(es) {absent} have no test cases"
    else:
        out["f1"] = float(f1_score(y, pred, labels=list(every), average="macro", zero_division=0))
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        weighting = kappa_weighting(ordinal)
        kappa = cohen_kappa_score(y, pred, labels=list(every), weights=None if weighting == "none" else weighting)
    if np.isfinite(kappa):
        out["kappa"] = float(kappa)
    else:
        out["kappa"] = None
        undefined["kappa"] = "labels and predictions are all one class (chance agreement is 1)"
    out["kappa_weighting"] = weighting
    out["per_class"] = {"auroc": per_auroc, "aupr": per_ap, "recall": per_recall, "specificity": per_spec}
    out["undefined"] = undefined
    return out


def mean_metrics(runs: Sequence[dict[str, Any]]) -> tuple[dict[str, float | None], dict[str, float | None]]:
    """Mean and standard deviation over seeds of each metric (None where any seed leaves it undefined)."""
    mean, std = {}, {}
    for m in METRICS:
        vals = [r[m] for r in runs]
        ok = all(v is not None for v in vals)
        mean[m] = float(np.mean(vals)) if ok else None
        std[m] = float(np.std(vals)) if ok else None
    return mean, std


def stratified_resample(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices of one bootstrap resample drawn with replacement within each class.

    Each class keeps its test count, so a small class (a handful of proliferative-DR cases) is never
    drawn zero times and never voids AUROC / AUPR / F1 for that resample; the interval then reflects
    the variability of the cases, not of the class mix, which the test split fixes anyway.
    """
    parts = [rng.choice(idx, size=len(idx), replace=True) for idx in (np.flatnonzero(y == c) for c in np.unique(y))]
    return np.concatenate(parts)


def bootstrap_intervals(
    y_true: np.ndarray,
    seed_scores: Sequence[np.ndarray],
    n_classes: int,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    progress: LinePrinter = None,
    ordinal: bool = False,
    stratified: bool = True,
) -> dict[str, dict[str, Any]]:
    """Percentile intervals of the seed-mean of each metric, resampling test cases with replacement.

    Resampling is stratified by class by default (`stratified_resample`): every resample has the
    test set's class counts.  Every resample draws one index set and scores every seed's predictions
    on it, so the interval is for the number that is reported (the mean over seeds).  Resamples where
    a metric is undefined (e.g. kappa when one class is predicted for everything) are dropped and
    counted.  `ordinal` picks the kappa weighting, as in `compute_metrics`.
    """
    rng = np.random.default_rng(seed)
    y = np.asarray(y_true)
    values: dict[str, list[float]] = {m: [] for m in METRICS}
    meter = Progress(n_resamples, "bootstrap", unit="resamples", sink=progress, enabled=progress is not None, min_interval_s=15.0)
    weights = kappa_weighting(ordinal)
    for sc in seed_scores:  # the full set once: shape, labels and non-finite scores refused with compute_metrics' message
        compute_metrics(y, sc, n_classes, ordinal)
    # Resamples in blocks scored all at once (`raydino.eval.resampled`, the same numbers as compute_metrics
    # on each): 1,000 resamples x 5 seeds of 89 cases took 79 s one by one, 0.16 s so.  Blocks bound the memory.
    block = max(1, min(n_resamples, 2_000_000 // max(len(y), 1)))
    for start in range(0, n_resamples, block):
        size = min(block, n_resamples - start)
        draws = [stratified_resample(y, rng) if stratified else rng.integers(0, len(y), len(y)) for _ in range(size)]
        counts = resample_counts(np.stack(draws), len(y))
        per_seed = [resampled_metrics(y, sc, counts, n_classes, weights) for sc in seed_scores]
        for m in METRICS:
            # The seed mean, undefined where any seed's is (mean_metrics).
            mean = np.mean([r[m] for r in per_seed], axis=0)
            values[m].extend(float(v) for v in mean[np.isfinite(mean)])
        meter.update(size)
    alpha = (1 - level) / 2
    out = {}
    for m in METRICS:
        v = np.asarray(values[m])
        entry: dict[str, Any] = {"n_resamples": n_resamples, "n_valid": int(len(v)), "level": level, "stratified": stratified}
        if len(v) < max(1, n_resamples // 2):
            entry.update(low=None, high=None, reason=f"undefined in {n_resamples - len(v)} of {n_resamples} resamples")
        else:
            entry.update(low=float(np.quantile(v, alpha)), high=float(np.quantile(v, 1 - alpha)))
        out[m] = entry
    return out


def macro_auroc(y: np.ndarray, scores: np.ndarray, n_classes: int) -> float | None:
    """Macro one-vs-rest AUROC over the classes present with both outcomes (Mann-Whitney U on ranks, ties
    averaged): `compute_metrics`'s `auroc` without the other metrics.  None when no class is defined."""
    from scipy.stats import rankdata

    per = []
    for c in range(n_classes):
        pos = y == c
        n_pos, n_neg = int(pos.sum()), int((~pos).sum())
        if n_pos and n_neg:
            ranks = rankdata(scores[:, c])
            per.append((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    if n_classes == 2 and len(per) == 2:
        return float(per[1])
    return float(np.mean(per)) if per else None


def _per_seed(scores: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
    arr = np.asarray(scores)
    return [arr] if arr.ndim == 2 else [np.asarray(s) for s in scores]


def paired_bootstrap_difference(
    y_true: np.ndarray,
    scores_a: np.ndarray | Sequence[np.ndarray],
    scores_b: np.ndarray | Sequence[np.ndarray],
    n_classes: int,
    metric: str = "auroc",
    n_resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
    ordinal: bool = False,
) -> dict[str, Any]:
    """metric(a) - metric(b) on one test set, with a percentile interval from resampling its cases.

    `scores_a` / `scores_b`: one N x C array, or one per probe seed; then each side's metric is the mean
    over its seeds, as the reported numbers are.  Paired: every resample scores both models on the
    same cases (stratified by class), so what the two share (which cases are hard, the test set's luck)
    cancels and the interval is that of the difference, narrower than two separate intervals suggest.
    """
    y = np.asarray(y_true)
    a, b = (_per_seed(s) for s in (scores_a, scores_b))

    def score(idx: np.ndarray, seeds: list[np.ndarray]) -> float | None:
        if metric == "auroc":  # the same number as compute_metrics, ~50x faster
            values = [macro_auroc(y[idx], s[idx], n_classes) for s in seeds]
        else:
            values = [compute_metrics(y[idx], s[idx], n_classes, ordinal)[metric] for s in seeds]
        return None if any(v is None for v in values) else float(np.mean(values))

    everything = np.arange(len(y))
    full_a, full_b = score(everything, a), score(everything, b)
    diff = None if full_a is None or full_b is None else full_a - full_b
    rng = np.random.default_rng(seed)
    resamples = [stratified_resample(y, rng) for _ in range(n_resamples)]
    if metric == "auroc":
        # All resamples at once (`resampled.resampled_macro_auroc`), the same numbers as one at a time.
        idx = np.stack(resamples) if resamples else np.zeros((0, len(y)), dtype=int)
        ma, mb = (np.mean([resampled_macro_auroc(y, s, idx, n_classes) for s in seeds], axis=0) for seeds in (a, b))
        values = [float(d) for d in ma - mb if np.isfinite(d)]
    else:
        values = []
        for idx in resamples:
            ma, mb = score(idx, a), score(idx, b)
            if ma is not None and mb is not None:
                values.append(ma - mb)
    alpha = (1 - level) / 2
    v = np.asarray(values)
    return {
        "metric": metric, "difference": diff, "level": level, "n_resamples": n_resamples, "n_valid": int(len(v)),
        "low": float(np.quantile(v, alpha)) if len(v) else None, "high": float(np.quantile(v, 1 - alpha)) if len(v) else None,
    }  # fmt: skip


def selection_auroc(metrics: dict[str, Any]) -> float:
    """Model selection score: val macro AUROC, or the mean over the classes where it is defined."""
    if metrics["auroc"] is not None:
        return metrics["auroc"]
    defined = [a for a in metrics["per_class"]["auroc"] if a is not None]
    return float(np.mean(defined)) if defined else float("nan")
