"""What a person reads of an augmentation search: plots, the summary page, Table 3 and `best.yaml`.

Pure presentation of `raydino.search.results` rows; headless matplotlib and markdown tables are
`raydino.eval.report`'s, shared with the evaluation reports.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from raydino.eval.metrics import METRICS
from raydino.eval.report import markdown_grid, pyplot, save_figure
from raydino.search.results import METRIC, STATUSES, paired_test, preset_table, scale_by_data
from raydino.search.spec import SYNTHETIC_DATA_KEYS, SearchSpec, trial_config

HEATMAP_KEYS = ("augment.global_crop_scale.min", "augment.local_crop_scale.min")


def format_value(v: Any, digits: int = 3) -> str:
    """A table cell: `digits` decimals, or significant digits when tiny or huge; None and NaN are a dash."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        tiny_or_huge = v != 0 and not 10**-digits <= abs(v) < 1e4
        return f"{v:.{digits}g}" if tiny_or_huge else f"{v:.{digits}f}"
    return str(v)


_STATUS_STYLE = {
    "finished": ("tab:green", "o"),
    "stopped": ("tab:orange", "v"),
    "collapsed": ("tab:red", "x"),
    "diverged": ("tab:purple", "D"),
    "errored": ("black", "s"),
}


def plot_auroc_vs_params(rows: list[dict[str, Any]], param_keys: list[str], out: Path, title: str) -> Path | None:
    """One panel per searched parameter: val AUROC of each trial, coloured by status."""
    plt = pyplot()
    plotted = [r for r in rows if r[METRIC] is not None]
    if not plotted or not param_keys:
        return None
    n = len(param_keys)
    cols = min(n, 3)
    fig, axes = plt.subplots(math.ceil(n / cols), cols, figsize=(4.2 * cols, 3.4 * math.ceil(n / cols)), squeeze=False)
    for ax, key in zip(axes.flat, param_keys):
        values = [r.get(key) for r in plotted]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        cats = sorted({json.dumps(v) for v in values}) if not numeric else []
        for status, (colour, marker) in _STATUS_STYLE.items():
            pts = [(r.get(key), r[METRIC]) for r in plotted if r["status"] == status]
            if pts:
                xs = [x if numeric else cats.index(json.dumps(x)) for x, _ in pts]
                ax.scatter(xs, [y for _, y in pts], c=colour, marker=marker, label=status, alpha=0.8)
        if not numeric:
            ax.set_xticks(range(len(cats)), [c.strip('"') for c in cats], rotation=30)
        ax.set_xlabel(key)
        ax.set_ylabel("val AUROC")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(title + "  (stopped / collapsed: last intermediate value)", fontsize=10)
    return save_figure(plt, fig, out)


def plot_scale_heatmap(rows: list[dict[str, Any]], out: Path, title: str, bins: int = 5) -> Path | None:
    """Mean val AUROC over global × local minimum crop scale (binned), with every trial on top."""
    plt = pyplot()
    gx, lx = HEATMAP_KEYS
    pts = [(r[gx], r[lx], r[METRIC], r["status"]) for r in rows if r.get(gx) is not None and r.get(lx) is not None and r[METRIC] is not None]
    if len(pts) < 2:
        return None
    x, y, z = (np.array([p[i] for p in pts], dtype=float) for i in range(3))
    # Edges padded by half a bin so trials at the extremes sit inside a cell, not on the frame.
    xp, yp = (max(np.ptp(v), 1e-3) / (2 * bins) for v in (x, y))
    xe = np.linspace(x.min() - xp, x.max() + xp, bins + 1)
    ye = np.linspace(y.min() - yp, y.max() + yp, bins + 1)
    total, _, _ = np.histogram2d(x, y, bins=(xe, ye), weights=z)
    count, _, _ = np.histogram2d(x, y, bins=(xe, ye))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    fig, ax = plt.subplots(figsize=(5.6, 4.6))
    mesh = ax.pcolormesh(xe, ye, mean.T, cmap="viridis", shading="flat")
    fig.colorbar(mesh, ax=ax, label="mean val AUROC (bin)")
    for status, (colour, marker) in _STATUS_STYLE.items():
        sel = [p for p in pts if p[3] == status]
        if sel:
            face = colour if marker == "x" else "white"  # unfilled markers take no edge colour
            ax.scatter([p[0] for p in sel], [p[1] for p in sel], c=face, edgecolors=colour if marker != "x" else None, marker=marker, label=status)
    ax.set_xlabel("global crop scale min")
    ax.set_ylabel("local crop scale min")
    ax.legend(fontsize=8, loc="best")
    ax.set_title(title, fontsize=10)
    return save_figure(plt, fig, out)


def plot_presets(rows: list[dict[str, Any]], table: list[dict[str, Any]], out: Path, title: str, group_key: str = "augment.preset") -> Path | None:
    """Table 3 as a figure: per preset, each pretraining seed's test AUROC / AUPR (dots, the seed
    written beside), the mean and its 95% t-interval over seeds (bar), for every metric the table has."""
    plt = pyplot()
    finished = [r for r in rows if r["status"] == "finished"]
    shown = [m for m in ("auroc", "aupr") if any(r.get(f"test_{m}") is not None for r in finished)]
    if not table or not shown:
        return None
    order = [e[group_key] for e in table]
    fig, axes = plt.subplots(1, len(shown), figsize=(4.4 * len(shown), 3.8), squeeze=False)
    for ax, m in zip(axes.flat, shown):
        for i, e in enumerate(table):
            pts = [(r.get("train.seed"), r[f"test_{m}"]) for r in finished if r.get(group_key) == e[group_key] and r.get(f"test_{m}") is not None]
            xs = i + np.linspace(-0.12, 0.12, len(pts)) if len(pts) > 1 else np.full(len(pts), float(i))
            ax.scatter(xs, [v for _, v in pts], s=22, color="tab:blue", alpha=0.7, zorder=3)
            for x, (seed, v) in zip(xs, pts):
                ax.annotate(str(seed), (x, v), xytext=(3, 0), textcoords="offset points", fontsize=6, color="0.4")
            if e.get(m) is not None:
                lo, hi = e.get(f"{m}_low"), e.get(f"{m}_high")
                err = [[e[m] - lo], [hi - e[m]]] if lo is not None and hi is not None else None
                ax.errorbar([i + 0.3], [e[m]], yerr=err, fmt="D", color="black", capsize=4, zorder=4)
        ax.set_xticks(range(len(order)), [str(g) for g in order])
        ax.set_xlim(-0.5, len(order) - 0.3)
        ax.set_ylabel(f"test {m.upper()}")
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"{title}: dots = pretraining seeds, diamond = mean with 95% t-interval", fontsize=9)
    return save_figure(plt, fig, out)


def data_sweep_report(rows: list[dict[str, Any]], param_keys: list[str], pair_key: str = "train.seed") -> dict[str, Any] | None:
    """How the best value of one augmentation parameter moves with one searched synthetic-data value.

    Made when the space is exactly one data key, one numeric augmentation key and optionally the seed.
    """
    data = [k for k in param_keys if k in SYNTHETIC_DATA_KEYS]
    other = [k for k in param_keys if k not in SYNTHETIC_DATA_KEYS and k != pair_key]
    if len(data) != 1 or len(other) != 1:
        return None
    data_key, x_key = data[0], other[0]
    fin = [r for r in rows if r["status"] == "finished"]
    if not fin or not all(isinstance(r.get(x_key), (int, float)) and not isinstance(r.get(x_key), bool) for r in fin):
        return None
    table = scale_by_data(rows, data_key, x_key)
    cols = [data_key, x_key, "seeds", "val AUROC (mean)", "test AUROC [95% t-interval]", "test AUPR", "picked by val"]
    cells = [
        [
            format_value(e[data_key]),
            format_value(e[x_key]),
            str(e["n"]),
            format_value(e[METRIC]),
            f"{format_value(e['auroc'])} [{format_value(e.get('auroc_low'))}, {format_value(e.get('auroc_high'))}]",
            format_value(e.get("aupr")),
            "**best**" if e["best"] else "",
        ]
        for e in table
    ]
    return {"data_key": data_key, "x_key": x_key, "table": table, "table_md": markdown_grid(cols, cells)}


def plot_scale_by_data(rows: list[dict[str, Any]], sweep: dict[str, Any], out: Path, title: str) -> Path | None:
    """Val and test AUROC against the augmentation value, one line per data value (mean over seeds,
    95% t-interval on test, every seed a faint dot); a star marks the value each line's val AUROC picks."""
    plt = pyplot()
    d_key, x_key, table = sweep["data_key"], sweep["x_key"], sweep["table"]
    finished = [r for r in rows if r["status"] == "finished"]
    groups = sorted({e[d_key] for e in table}, key=float)
    if not groups:
        return None
    colours = plt.get_cmap("viridis")(np.linspace(0.0, 0.85, len(groups)))
    fig, axes = plt.subplots(1, 3, figsize=(14.0, 4.0))
    for colour, g in zip(colours, groups):
        cells = [e for e in table if e[d_key] == g]
        xs = [e[x_key] for e in cells]
        for ax, m in ((axes[0], METRIC), (axes[1], "test_auroc")):
            pts = [(r[x_key], r[m]) for r in finished if r.get(d_key) == g and r.get(m) is not None]
            ax.scatter([x for x, _ in pts], [y for _, y in pts], s=10, color=colour, alpha=0.35)
        axes[0].plot(xs, [e[METRIC] for e in cells], "-o", color=colour, label=f"{g:g}")
        lo = [e["auroc"] - e["auroc_low"] if e.get("auroc_low") is not None else 0 for e in cells]
        hi = [e["auroc_high"] - e["auroc"] if e.get("auroc_high") is not None else 0 for e in cells]
        axes[1].errorbar(xs, [e["auroc"] for e in cells], yerr=[lo, hi], fmt="-o", color=colour, capsize=3)
        best = next((e for e in cells if e["best"]), None)
        if best is not None:
            axes[0].plot([best[x_key]], [best[METRIC]], "*", ms=15, color=colour, markeredgecolor="black")
            axes[2].plot([g], [best[x_key]], "*", ms=15, color=colour, markeredgecolor="black", zorder=3)
    axes[0].set_ylabel("val AUROC (objective; mean over seeds)")
    axes[1].set_ylabel("test AUROC (mean, 95% t-interval)")
    axes[0].legend(title=d_key.rsplit(".", 1)[-1], fontsize=8)
    for ax in axes[:2]:
        ax.set_xlabel(x_key)
        ax.grid(alpha=0.3)
    picked = [(e[d_key], e[x_key]) for e in table if e["best"]]
    picked.sort(key=lambda p: float(p[0]))
    axes[2].plot([p[0] for p in picked], [p[1] for p in picked], "-", color="0.6", zorder=1)
    axes[2].set_xlabel(d_key)
    axes[2].set_ylabel(f"{x_key.removeprefix('augment.')} picked by val AUROC")
    axes[2].grid(alpha=0.3)
    fig.suptitle(f"{title}: each {d_key.rsplit('.', 1)[-1]} is its own synthetic set; compare where lines peak, not their levels", fontsize=9)
    return save_figure(plt, fig, out)


def preset_table_markdown(table: list[dict[str, Any]], group_key: str = "augment.preset") -> str:
    """Mean [95% t-interval over pretraining seeds] and, after ±, the mean std over probe seeds."""
    cols = ["preset", "pretraining seeds", "probe seeds"] + [m.upper() if m in ("auroc", "aupr") else m for m in METRICS]
    rows: list[list[str]] = []
    for e in table:
        cells = [str(e[group_key]), str(e["n"]), format_value(e.get("probe_seeds"))]
        for m in METRICS:
            lo, hi, sd = e.get(f"{m}_low"), e.get(f"{m}_high"), e.get(f"{m}_probe_std")
            cell = f"{format_value(e[m])} [{format_value(lo)}, {format_value(hi)}]" if lo is not None else format_value(e[m])
            cells.append(cell + (f" ± {format_value(sd)}" if sd is not None else ""))
        rows.append(cells)
    return markdown_grid(cols, rows)


def summary_markdown(
    spec: SearchSpec,
    rows: list[dict[str, Any]],
    best: dict[str, Any] | None,
    param_keys: list[str],
    extra: dict[str, Any] | None = None,
    paper: dict[str, Any] | None = None,
    sweep: dict[str, Any] | None = None,
) -> str:
    """The experiment on one page: what ran, how trials ended, the best, and the figures."""
    extra = extra or {}
    counts = Counter(r["status"] for r in rows)
    out = [f"# Augmentation search `{spec.name}`", ""]
    if spec.description:
        out += [spec.description.strip(), ""]
    budget = f"{spec.budget.epochs} epochs" if spec.budget.epochs else f"{spec.budget.steps} steps"
    out += [
        f"- base config `{spec.base}`, budget {budget} per trial, report every {spec.budget.report_every} epoch(s)",
        f"- searcher {spec.searcher.kind}, scheduler {spec.scheduler.kind}, {len(rows)} trials "
        f"({', '.join(f'{counts.get(s, 0)} {s}' for s in STATUSES)})",
        f"- objective: `{METRIC}` = validation macro AUROC of the `{spec.evaluation.objective}` probe at every report "
        f"({'every ' + str(spec.budget.report_every) + ' epoch(s) and ' if spec.evaluation.intermediate else ''}at the end); "
        f"test metrics: the `{spec.evaluation.kind}` probe at the end, never used to choose",
        f"- resources per trial: {spec.resources.workers} worker(s) × {spec.resources.gpus_per_worker:g} GPU × "
        f"{spec.resources.cpus_per_worker:g} CPU",
    ]
    for k, v in extra.items():
        out.append(f"- {k}: {v}")
    out.append("")
    if best:
        tests = ", ".join(
            f"{m} {format_value(best.get(f'test_{m}'))} [{format_value(best.get(f'test_{m}_low'))}, {format_value(best.get(f'test_{m}_high'))}]"
            for m in ("auroc", "aupr", "sensitivity")
        )
        out += [
            "## Best trial",
            "",
            f"`{best['trial_id']}`: val AUROC {format_value(best[METRIC])}; test {tests}",
            "",
            markdown_grid(["parameter", "value"], [[k, format_value(best.get(k), 4)] for k in param_keys]),
        ]
        out += ["", "Its full configuration is `best.yaml` (`python -m raydino.pretrain --config best.yaml`).", ""]
    else:
        out += ["## Best trial", "", "No trial finished or was stopped with an AUROC.", ""]
    ranked = sorted(rows, key=lambda r: (r["status"] != "finished", -(r[METRIC] if r[METRIC] is not None else -1)))
    cols = ["trial_id", "status", *param_keys, METRIC, "test_auroc", "epoch", "reason"]
    out += ["## Trials", "", markdown_grid(cols, [[format_value(r.get(c)) for c in cols] for r in ranked]), ""]
    if paper:
        out += [
            "## Presets (Table 3 shape)",
            "",
            "Test metrics: mean [95% t-interval over pretraining seeds] ± mean std over probe seeds "
            "(the paper's ± is over probe seeds of one checkpoint).",
            "",
            paper["table_md"],
            "",
        ]
        for test in paper.get("paired", []):
            r = test["metrics"]["auroc"]
            out.append(
                f"Paired {test['a']} vs {test['b']} over seeds {test['pairs']}: AUROC difference "
                f"{format_value(r.get('mean_difference'), 4)}, paired t p = {format_value(r.get('p_t'))}, "
                f"Wilcoxon p = {format_value(r.get('p_wilcoxon'))}"
            )
        out.append("")
    if sweep:
        out += [
            f"## {sweep['x_key']} against {sweep['data_key']}",
            "",
            f"Each {sweep['data_key']} value is its own synthetic set with its own test split: compare rows within "
            f"one value (where its validation AUROC peaks), not levels across values.  The best trial above "
            f"compares across them and is only one trial.",
            "",
            sweep["table_md"],
            "",
        ]
    out += ["## Figures", "", "![val AUROC against each parameter](plots/auroc_vs_params.png)", ""]
    if sweep:
        out += [f"![{sweep['x_key']} against {sweep['data_key']}](plots/scale_by_data.png)", ""]
    if paper:
        out += ["![test AUROC and AUPR per preset over pretraining seeds](plots/presets.png)", ""]
    if all(k in param_keys for k in HEATMAP_KEYS):
        out += ["![global × local minimum crop scale](plots/scale_heatmap.png)", ""]
    return "\n".join(out)


def paper_report(rows: list[dict[str, Any]], group_key: str = "augment.preset", pair_key: str = "train.seed") -> dict[str, Any] | None:
    """Table 3 and the paired weak-vs-strong (and weak_med-vs-strong) tests, when presets were searched."""
    presets = {r.get(group_key) for r in rows if r.get(group_key) is not None}
    if len(presets) < 2:
        return None
    table = preset_table(rows, group_key)
    paired = [paired_test(rows, a, "strong", group_key, pair_key) for a in ("weak", "weak_med") if {a, "strong"} <= presets]
    return {"table": table, "table_md": preset_table_markdown(table, group_key), "paired": paired}


def best_config_yaml(spec: SearchSpec, params: dict[str, Any], steps_per_epoch: int | None, row: dict[str, Any]) -> str:
    """The best trial's full config as a pretraining YAML (a fresh run name; comments say where it came from)."""
    cfg = trial_config(spec, params, steps_per_epoch)
    cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"name": None})})
    head = (
        f"# Best trial {row['trial_id']} of search {spec.name!r}: val AUROC {format_value(row[METRIC])}, "
        f"test AUROC {format_value(row.get('test_auroc'))}\n# params: {json.dumps(params)}\n"
        f"# Run it: python -m raydino.pretrain --config best.yaml  (raise train.epochs for a full run)\n"
    )
    return head + cfg.to_yaml()
