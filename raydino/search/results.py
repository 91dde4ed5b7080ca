"""The rows of an augmentation search, without Ray: one per trial, the best one, the paper's statistics.

- `trial_status`, `results_table`, `best_row`: one row per trial with its status and AUROC, and the
  trial the search chose; `history_table`: every report (the curves ASHA saw);
- `table_bytes`: rows as CSV or Parquet;
- `preset_table`, `paired_test`: the paper's Table 3 (mean and 95% interval per metric over seeds)
  and a paired test of two presets over matching seeds;
- `scale_by_data`: a searched augmentation value against a searched synthetic-data value (lesion
  size), with the value each data setting's validation AUROC picks.

`METRIC` is the one number that ranks trials; the test metrics (`raydino.eval.metrics.METRICS`,
reported as `test_*`) never rank anything.  What a person reads of these rows is `raydino.search.report`.
"""

from __future__ import annotations

import io
import json
import math
import re
from typing import Any, Literal

import numpy as np

from raydino.eval.metrics import METRICS

METRIC = "val_auroc"  # the objective probe's validation AUROC: every report carries it, the search maximises it
METRIC_RANGE = {"kappa": (-1.0, 1.0)}  # every other test metric lies in [0, 1]
STATUSES = ("finished", "stopped", "collapsed", "diverged", "errored")


def trial_status(history: list[dict[str, Any]], error: str | None, budget_epochs: int) -> tuple[str, str]:
    """(status, reason) of a trial from its reports and error, one of STATUSES."""
    if error:
        lines = [ln.strip() for ln in str(error).strip().splitlines() if ln.strip()]
        reason = next((ln for ln in reversed(lines) if "non-finite" in ln or "loss became" in ln), lines[-1] if lines else "error")
        return "errored", reason[:300]
    if not history:
        return "stopped", "ended before its first report (time budget or scheduler)"
    last = history[-1]
    if last.get("diverged"):
        return "diverged", str(last.get("diverged_reason") or "non-finite loss")[:300]
    if last.get("collapsed"):
        return "collapsed", f"teacher output collapsed ({last.get('collapse') or 'collapse'}) by epoch {last.get('epoch')}"
    if last.get("final"):
        return "finished", ""
    return "stopped", f"stopped early at epoch {last.get('epoch')} of {budget_epochs} (scheduler or time budget)"


def results_table(
    trials: list[dict[str, Any]], param_keys: list[str], budget_epochs: int, wall_seconds: dict[str, float] | None = None
) -> list[dict[str, Any]]:
    """One row per trial: id, status, reason, parameters, last val AUROC, test metrics and timings.

    `trials` are plain records `{"trial_id", "params", "history": [report, ...], "error"[, "restarts"]}`.
    """
    rows = []
    for t in trials:
        history = t.get("history") or []
        status, reason = trial_status(history, t.get("error"), budget_epochs)
        last = history[-1] if history else {}
        row: dict[str, Any] = {"trial_id": t["trial_id"], "status": status, "reason": reason}
        row.update({k: t["params"].get(k) for k in param_keys})
        row[METRIC] = _num(last.get(METRIC))
        row["epoch"] = last.get("epoch")
        row["final_val_auroc"] = _num(last.get("final_val_auroc"))
        row["probe_seeds"] = last.get("probe_seeds")
        for m in METRICS:
            for suffix in ("", "_low", "_high", "_std"):
                row[f"test_{m}{suffix}"] = _num(last.get(f"test_{m}{suffix}"))
        for k in ("train_seconds", "probe_seconds", "checkpoint_seconds", "setup_seconds"):
            row[k] = _num(last.get(k))
        row["wall_seconds"] = (wall_seconds or {}).get(t["trial_id"])
        row["restarts"] = int(t.get("restarts") or 0)  # crashes Tune restarted it from (`resources.max_failures`)
        spent = sum(v for v in (row["train_seconds"], row["probe_seconds"]) if v is not None)
        row["overhead_fraction"] = (row["wall_seconds"] - spent) / row["wall_seconds"] if row["wall_seconds"] and spent else None
        rows.append(row)
    return rows


def history_table(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every report of every trial (the curve ASHA saw), scalars only."""
    out = []
    for t in trials:
        for r in t.get("history") or []:
            out.append({"trial_id": t["trial_id"], **{k: v for k, v in r.items() if isinstance(v, (int, float, str, bool)) or v is None}})
    return out


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def best_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Highest `val_auroc` (the search objective) among finished trials; falls back to the best stopped
    trial (its value is the same probe at an earlier epoch), never a collapsed, diverged or errored one.
    Test metrics play no part."""
    for wanted in ("finished", "stopped"):
        pool = sorted((r for r in rows if r["status"] == wanted and r[METRIC] is not None), key=lambda r: str(r["trial_id"]))
        if pool:
            return max(pool, key=lambda r: r[METRIC])  # ties: the first trial id, whatever order Tune lists them in
    return None


def _column_types_safe(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Columns with mixed types (a choice of 2 and "x") become strings so Parquet can hold them."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    mixed = set()
    for k in keys:
        types = {type(r.get(k)) for r in rows if r.get(k) is not None}
        if len(types - {int, float}) > 0 and len(types) > 1 or (types & {list, dict, tuple}):
            mixed.add(k)

    def cell(k: str, v: Any) -> Any:
        return json.dumps(v) if k in mixed and v is not None and not isinstance(v, str) else v

    return [{k: cell(k, r.get(k)) for k in keys} for r in rows]


def table_bytes(rows: list[dict[str, Any]], fmt: Literal["csv", "parquet"]) -> bytes:
    """CSV or Parquet of a list of rows (pyarrow: same types in both, no pandas needed)."""
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(_column_types_safe(rows)) if rows else pa.table({"trial_id": pa.array([], pa.string())})
    buf = io.BytesIO()
    if fmt == "csv":
        pcsv.write_csv(table, buf)
    else:
        pq.write_table(table, buf)
    return buf.getvalue()


# ---------------------------------------------------------------- the paper's table 3


def preset_table(rows: list[dict[str, Any]], group_key: str = "augment.preset", level: float = 0.95) -> list[dict[str, Any]]:
    """Per preset, the two axes of replication kept apart.

    - over pretraining seeds (one finished trial each): n, and per test metric the mean with a 95%
      t-interval (clipped to the metric's range) -- independent pretrainings;
    - over probe seeds (the paper's replicates: one checkpoint probed with seeds 0-4): `{m}_probe_std`,
      the mean over checkpoints of the std across probe seeds, and `probe_seeds`.  Cheng et al.'s
      Table 3 reports mean ± std over probe seeds of a single pretraining, i.e. only the second axis.
    """
    from scipy import stats

    out = []
    groups: dict[Any, list[dict[str, Any]]] = {}
    for r in rows:
        if r["status"] == "finished":
            groups.setdefault(r.get(group_key), []).append(r)
    for g, members in groups.items():
        entry: dict[str, Any] = {group_key: g, "n": len(members)}
        for m in METRICS:
            v = np.array([r[f"test_{m}"] for r in members if r.get(f"test_{m}") is not None], dtype=float)
            mean = float(v.mean()) if len(v) else None
            half = float(stats.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else None
            lo, hi = METRIC_RANGE.get(m, (0.0, 1.0))  # a t-interval can leave the metric's range: clip it
            entry[m] = mean
            entry[f"{m}_low"] = max(lo, mean - half) if half is not None else None
            entry[f"{m}_high"] = min(hi, mean + half) if half is not None else None
            probe_std = [r[f"test_{m}_std"] for r in members if r.get(f"test_{m}_std") is not None]
            entry[f"{m}_probe_std"] = float(np.mean(probe_std)) if probe_std else None
        seeds = {r.get("probe_seeds") for r in members if r.get("probe_seeds")}
        entry["probe_seeds"] = seeds.pop() if len(seeds) == 1 else (sorted(seeds) or None)
        out.append(entry)
    return out


def paired_test(rows: list[dict[str, Any]], a: str, b: str, group_key: str = "augment.preset", pair_key: str = "train.seed") -> dict[str, Any]:
    """`a` against `b` on test metrics, paired by `pair_key` (same seed): paired t-test and Wilcoxon.

    With five seeds the Wilcoxon signed-rank test cannot go below p = 0.0625 (two-sided); the
    t-test assumes roughly normal differences.  Both are reported; neither is a multiple-test correction.
    """
    from scipy import stats

    fin = [r for r in rows if r["status"] == "finished"]
    by = {g: {r.get(pair_key): r for r in fin if r.get(group_key) == g} for g in (a, b)}
    keys = sorted(set(by[a]) & set(by[b]), key=str)
    out: dict[str, Any] = {"a": a, "b": b, "pair_key": pair_key, "pairs": keys, "metrics": {}}
    for m in METRICS:
        pairs = [(by[a][k].get(f"test_{m}"), by[b][k].get(f"test_{m}")) for k in keys]
        pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
        res: dict[str, Any] = {"n": len(pairs)}
        if len(pairs) >= 2:
            x, y = np.array(pairs, dtype=float).T
            d = x - y
            res["mean_difference"] = float(d.mean())
            if np.allclose(d, d[0]):
                res.update(t=None, p_t=None, note="all differences equal: the t statistic is undefined")
            else:
                t = stats.ttest_rel(x, y)
                res.update(t=float(t.statistic), p_t=float(t.pvalue))
            if np.any(d != 0):
                w = stats.wilcoxon(x, y)
                res.update(wilcoxon=float(w.statistic), p_wilcoxon=float(w.pvalue))
        else:
            res["note"] = f"needs at least 2 seeds run with both {a} and {b}"
        out["metrics"][m] = res
    return out


def scale_by_data(rows: list[dict[str, Any]], data_key: str, x_key: str) -> list[dict[str, Any]]:
    """Per (data value, x value): `preset_table`'s test statistics over seeds, the mean `METRIC`, and
    `best`: whether this x has the highest mean validation AUROC of its data value.

    Data values are compared only within themselves: each is its own synthetic set, with its own
    test split, so levels across data values are not comparable, only where each one peaks.
    """
    fin = [{**r, "_cell": (r.get(data_key), r.get(x_key))} for r in rows if r["status"] == "finished"]
    out = []
    for e in preset_table(fin, "_cell"):
        d, x = e.pop("_cell")
        vals = [r[METRIC] for r in fin if r["_cell"] == (d, x) and r.get(METRIC) is not None]
        out.append({data_key: d, x_key: x, METRIC: float(np.mean(vals)) if vals else None, **e})
    out.sort(key=lambda e: (_num(e[data_key]) or 0.0, _num(e[x_key]) or 0.0))
    for d in {e[data_key] for e in out}:
        cells = [e for e in out if e[data_key] == d and e[METRIC] is not None]
        top = max(cells, key=lambda e: e[METRIC]) if cells else None
        for e in out:
            if e[data_key] == d:
                e["best"] = e is top
    return out


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)
