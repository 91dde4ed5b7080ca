"""`python -m raydino.bench bootstrap`: 95 % bootstrap intervals scored in blocks vs one resample at a time.

`raydino.eval.metrics.bootstrap_intervals` (the intervals of `raydino.evaluate --protocol paper` and of
searches with a bootstrap) against the loop it replaced: the same stratified resamples, each scored
for every probe seed by `compute_metrics` (scikit-learn's metrics, one call per resample and seed).
The scores are synthetic, `--cases` test cases of `--classes` graded classes from `--seeds` probes;
both sides are given the same draws and must give the same intervals (checked to 1e-9 on the
reference's resamples), so only the time differs.  The reference is slow, so it scores
`--reference-resamples` of them and both are reported per 1,000 resamples.  Rounds alternate the two
(ABBA); the fastest round of each is kept.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from raydino.eval import metrics


def synthetic_scores(cases: int, classes: int, seeds: int, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """Labels with every class present and one softmax score matrix per probe seed, informative but noisy."""
    rng = np.random.default_rng(seed)
    y = np.concatenate([np.arange(classes), rng.integers(0, classes, max(0, cases - classes))])
    out = []
    for _ in range(seeds):
        logits = 1.5 * np.eye(classes)[y] + rng.normal(size=(len(y), classes))
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        out.append(e / e.sum(axis=1, keepdims=True))
    return y, out


def reference_intervals(
    y: np.ndarray, seed_scores: list[np.ndarray], classes: int, n_resamples: int, seed: int = 0
) -> dict[str, tuple[float, float]]:
    """The loop `bootstrap_intervals` replaced: each resample scored by `compute_metrics`, seed by seed."""
    rng = np.random.default_rng(seed)  # bootstrap_intervals' draws: the same resamples in the same order
    values: dict[str, list[float]] = {m: [] for m in metrics.METRICS}
    for _ in range(n_resamples):
        i = metrics.stratified_resample(y, rng)
        mean, _ = metrics.mean_metrics([metrics.compute_metrics(y[i], s[i], classes, True) for s in seed_scores])
        for m in metrics.METRICS:
            if mean[m] is not None:
                values[m].append(mean[m])
    return {m: (float(np.quantile(v, 0.025)), float(np.quantile(v, 0.975))) for m, v in values.items() if v}


def bench_bootstrap(args: Any) -> dict[str, Any]:
    from raydino.progress import Progress

    y, seeds = synthetic_scores(args.cases, args.classes, args.seeds)
    progress = Progress(2 * args.rounds + 1, "bench bootstrap", unit="runs", min_interval_s=0)
    # The same intervals, on the reference's resamples: the comparison is of one computation, done two ways.
    ours = metrics.bootstrap_intervals(y, seeds, args.classes, n_resamples=args.reference_resamples, ordinal=True)
    ref = reference_intervals(y, seeds, args.classes, args.reference_resamples)
    # Metrics undefined in most resamples (e.g. kappa on a tiny --cases) have no interval on raydino's side.
    both = [m for m in ref if ours[m]["low"] is not None]
    if not both:
        raise RuntimeError(f"no metric has an interval on --cases {args.cases}, --classes {args.classes}: give more cases")
    max_diff = max(abs(ours[m][k] - ref[m][j]) for m in both for j, k in enumerate(("low", "high")))
    if max_diff > 1e-9:
        raise RuntimeError(
            f"bootstrap_intervals and the one-by-one loop disagree by {max_diff:.3g}: the speed-up would not be of the same computation"
        )
    progress.step(f"same intervals on {args.reference_resamples} resamples (max difference {max_diff:.1e})")
    times: dict[str, list[float]] = {"raydino": [], "reference": []}
    for r in range(args.rounds):
        for side in ("raydino", "reference") if r % 2 == 0 else ("reference", "raydino"):
            t0 = time.perf_counter()
            if side == "raydino":
                metrics.bootstrap_intervals(y, seeds, args.classes, n_resamples=args.resamples, ordinal=True)
                per_1000 = (time.perf_counter() - t0) * 1000 / args.resamples
            else:
                reference_intervals(y, seeds, args.classes, args.reference_resamples)
                per_1000 = (time.perf_counter() - t0) * 1000 / args.reference_resamples
            times[side].append(per_1000)
            progress.step(f"round {r + 1} {side}: {per_1000:.2f} s per 1000 resamples")
    best = {side: min(t) for side, t in times.items()}
    result = {
        "bench": "bootstrap",
        "cases": args.cases,
        "classes": args.classes,
        "seeds": args.seeds,
        "resamples": args.resamples,
        "reference_resamples": args.reference_resamples,
        "max_interval_difference": max_diff,
        "seconds_per_1000_resamples": times,
        "best_seconds_per_1000_resamples": best,
        "ratio_reference_over_raydino": best["reference"] / best["raydino"],
    }
    print(
        f"\nraydino bench bootstrap: {args.cases} cases, {args.classes} classes, {args.seeds} probe seeds, stratified resamples\n"
        f"  raydino bootstrap_intervals   {best['raydino']:8.2f} s per 1000 resamples (best of {args.rounds})\n"
        f"  one by one (compute_metrics)  {best['reference']:8.2f} s per 1000 resamples (best of {args.rounds})\n"
        f"  ratio reference / raydino: {result['ratio_reference_over_raydino']:.0f}x, the same intervals (max difference {max_diff:.1e})",
        flush=True,
    )
    return result


def plot_bootstrap(r: dict[str, Any], path: Path) -> None:
    from raydino.eval.report import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 3.0))
    sides = ["reference", "raydino"]
    values = [r["best_seconds_per_1000_resamples"][s] for s in sides]
    ax.barh(["one by one\n(compute_metrics)", "raydino\nbootstrap_intervals"], values, color=["tab:red", "tab:blue"])
    ax.set_xscale("log")
    ax.set_xlim(min(values) / 2, max(values) * 5)  # room for the labels
    ax.set_xlabel("seconds per 1000 resamples (log)")
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.2f} s", va="center", fontsize=8)
    ax.set_title(f"bootstrap intervals, {r['cases']} cases x {r['seeds']} seeds ({r['ratio_reference_over_raydino']:.0f}x)", fontsize=10)
    save_figure(plt, fig, path)
