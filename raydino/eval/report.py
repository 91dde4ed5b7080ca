"""Human-readable views of evaluation results: markdown tables and PNG plots.

Pure presentation: every number comes from `raydino.eval.probes` results (dicts as written to
metrics.json; metric names from `raydino.eval.metrics`).  matplotlib runs headless (Agg).
`markdown_grid`, `pyplot` and `save_figure` are the one copy of those chores; the search's
report (`raydino.search.report`) uses them too.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from raydino.eval.metrics import METRICS

METRIC_TITLES = {
    "auroc": "AUROC",
    "aupr": "AUPR",
    "sensitivity": "Sens.",
    "specificity": "Spec.",
    "accuracy": "Acc.",
    "f1": "F1",
    "kappa": "Kappa",
}
KAPPA_TITLES = {"quadratic": "Kappa (quadratic)", "none": "Kappa (unweighted)"}


def _titles(results: dict[str, dict[str, Any]]) -> list[str]:
    """Column titles; kappa's names its weighting (results of one data set share it; "mixed" otherwise)."""
    weightings = {r.get("kappa_weighting") for r in results.values()}
    kappa = KAPPA_TITLES.get(next(iter(weightings)), "Kappa") if len(weightings) == 1 else "Kappa (mixed weightings)"
    return [kappa if m == "kappa" else METRIC_TITLES[m] for m in METRICS]


def pyplot() -> Any:
    """matplotlib.pyplot on the headless Agg backend (a driver or trial may have no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(plt: Any, fig: Any, path: str | Path) -> Path:
    """Lay out, write the PNG and free the figure (pyplot keeps every open figure alive otherwise)."""
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown_grid(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A markdown table of cells already formatted as text."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(mean: float | None, ci: dict[str, Any] | None) -> str:
    if mean is None:
        return "n/a"
    if ci and ci.get("low") is not None:
        return f"{mean:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]"
    return f"{mean:.3f}"


def markdown_table(results: dict[str, dict[str, Any]]) -> str:
    """One row per named result (e.g. "fast", "knn", "fast (random init)"): mean [95% CI] per metric."""
    rows = []
    for name, r in results.items():
        ci = r.get("ci95", {})
        seeds = "1 (deterministic)" if r.get("deterministic") else str(len(r["seeds"]))
        rows.append([name, seeds, *(_cell(r["mean"][m], ci.get(m)) for m in METRICS)])
    return markdown_grid(["probe", "seeds", *_titles(results)], rows)


def per_class_table(result: dict[str, Any]) -> str:
    """Test AUROC / AUPR / recall / specificity per class, averaged over seeds."""
    classes = result["classes"]
    rows = []
    counts = result.get("class_counts", {}).get("test")
    for c, name in enumerate(classes):
        row = []
        for key in ("auroc", "aupr", "recall", "specificity"):
            vals = [s["test"]["per_class"][key][c] for s in result["per_seed"]]
            row.append("n/a" if any(v is None for v in vals) else f"{np.mean(vals):.3f}")
        n = str(counts[c]) if counts else "?"
        rows.append([name, n, *row])
    return markdown_grid(["class", "n test", "AUROC", "AUPR", "recall", "specificity"], rows)


def markdown_report(title: str, meta: dict[str, Any], results: dict[str, dict[str, Any]]) -> str:
    out = [f"# {title}", ""]
    out += [f"- {k}: {v}" for k, v in meta.items()]
    out += ["", "Test metrics, mean over seeds [bootstrap 95% interval over test cases, resampled within each class].", "", markdown_table(results)]
    for name, r in results.items():
        out += ["", f"## {name}: per class", "", per_class_table(r)]
        if r.get("protocol"):
            out += ["", "Protocol: " + ", ".join(f"{k} {v}" for k, v in r["protocol"].items())]
        if r.get("undefined"):
            out += ["", "Undefined: " + "; ".join(f"{m}: {why}" for m, why in r["undefined"].items())]
        for w in r.get("warnings", []):
            out += ["", f"Warning: {w}"]
    return "\n".join(out) + "\n"


def plot_roc(curves: dict[str, tuple[np.ndarray, Sequence[np.ndarray]]], classes: Sequence[str], path: str | Path) -> Path:
    """One panel per result; per-class one-vs-rest ROC of the seed-averaged test scores."""
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = pyplot()
    n = max(1, len(curves))
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 4.2 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, (name, (y, seed_scores)) in zip(axes.flat, curves.items()):
        scores = np.mean(np.stack(seed_scores), axis=0)
        for c, cname in enumerate(classes):
            pos = np.asarray(y) == c
            if pos.all() or not pos.any():
                ax.plot([], [], label=f"{cname}: undefined (no {'negatives' if pos.all() else 'positives'})")
                continue
            fpr, tpr, _ = roc_curve(pos, scores[:, c])
            ax.plot(fpr, tpr, lw=1.5, label=f"{cname} (AUC {roc_auc_score(pos, scores[:, c]):.3f})")
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        ax.set(title=name, xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01))
        ax.legend(fontsize=7, loc="lower right")
    return save_figure(plt, fig, path)


def plot_distance_histograms(panels: dict[str, dict[str, np.ndarray]], path: str | Path) -> Path:
    """The paper's Figure 2: positive-pair vs negative-pair embedding distances, one panel per preset."""
    plt = pyplot()
    n = max(1, len(panels))
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.6), squeeze=False)
    for ax, (name, d) in zip(axes[0], panels.items()):
        hi = float(max(d["positive"].max(initial=0), d["negative"].max(initial=0))) or 1.0
        bins = np.linspace(0, hi * 1.02, 40)
        ax.hist(d["positive"], bins=bins, alpha=0.6, density=True, label="positive (same image)")
        ax.hist(d["negative"], bins=bins, alpha=0.6, density=True, label="negative (different images)")
        ax.set(title=name, xlabel="Euclidean distance", ylabel="density")
        ax.legend(fontsize=7)
    return save_figure(plt, fig, path)
