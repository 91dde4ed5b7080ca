"""The augmentation search without Ray: the YAML spec, trial configs, results, plots and reports.

`python -m raydino.tune` (the recipe) reads a spec with `load_spec`, turns `space` into Ray Tune
objects and runs the trials; everything it needs that does not touch Ray lives here, so it is
testable in one process:

- `SearchSpec`: the experiment as declared in `tuning/*.yaml` (validated, errors name the field);
- `trial_config(spec, params)`: the full pretraining `Config` of one trial (also the best-config YAML);
- `trial_status`, `results_table`, `best_row`: one row per trial with its status and AUROC;
- `plot_auroc_vs_params`, `plot_scale_heatmap`, `summary_markdown`: what a person reads;
- `preset_table`, `paired_test`: the paper's Table 3 (mean and 95% interval per metric over seeds)
  and a paired test of two presets over matching seeds.

Search-space keys are config keys (`augment.n_local_crops`), one end of a range-valued key
(`augment.global_crop_scale.min`, `augment.local_crop_scale.max`), or `augment.jitter_strength`
(brightness and contrast jitter together, the knob the paper turns: 0.4 strong, 0.2 weak).
"""

from __future__ import annotations

import difflib
import typing
import io
import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .config import Config, ConfigError, apply_override, load_config, set_dotted

METRIC = "val_auroc"  # the objective probe's validation AUROC: every report carries it, the search maximises it
TEST_METRICS = ("auroc", "aupr", "sensitivity", "specificity", "accuracy", "f1", "kappa")  # probe.METRICS
METRIC_RANGE = {"kappa": (-1.0, 1.0)}  # every other test metric lies in [0, 1]
STATUSES = ("finished", "stopped", "collapsed", "errored")
CONFIG_SECTIONS = tuple(Config.model_fields)
RANGE_ENDS = {"min": 0, "max": 1}
JITTER_STRENGTH = "augment.jitter_strength"
HEATMAP_KEYS = ("augment.global_crop_scale.min", "augment.local_crop_scale.min")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------- the spec


class ParamSpec(_Strict):
    """Exactly one of: `uniform: [low, high]`, `loguniform: [low, high]`, `choice: [...]`, `grid: [...]`."""

    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    choice: list[Any] | None = None
    grid: list[Any] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> ParamSpec:
        given = [k for k in ("uniform", "loguniform", "choice", "grid") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of uniform, loguniform, choice, grid (got {given or 'none'})")
        kind = given[0]
        if kind in ("uniform", "loguniform"):
            low, high = getattr(self, kind)
            if not low < high:
                raise ValueError(f"{kind}: [{low}, {high}] needs low < high")
            if kind == "loguniform" and low <= 0:
                raise ValueError(f"loguniform: low {low} must be > 0")
        elif not getattr(self, kind):
            raise ValueError(f"{kind}: needs at least one value")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("uniform", "loguniform", "choice", "grid") if getattr(self, k) is not None)

    def to_plain(self) -> dict[str, Any]:
        kind = self.kind
        if kind in ("uniform", "loguniform"):
            low, high = getattr(self, kind)
            return {"kind": kind, "low": low, "high": high}
        return {"kind": kind, "values": list(getattr(self, kind))}

    def corners(self) -> list[Any]:
        """The values a config must accept for every draw to be valid: both ends, or every value."""
        kind = self.kind
        return list(getattr(self, kind))


class Budget(_Strict):
    epochs: int | None = Field(None, ge=1)
    steps: int | None = Field(None, ge=1)
    report_every: int = Field(1, ge=1)  # epochs between intermediate AUROC reports (ASHA's signal)

    @model_validator(mode="after")
    def _one_budget(self) -> Budget:
        if (self.epochs is None) == (self.steps is None):
            raise ValueError("give exactly one of budget.epochs or budget.steps")
        return self


class Evaluation(_Strict):
    """How a trial is scored.

    One number drives every choice: `val_auroc` (METRIC) is the validation macro AUROC of the
    `objective` probe, computed the same way at every report, intermediate and final, so ASHA's
    rung comparisons, the searcher's observations (finished or stopped trials alike) and the best
    trial are all ranked by the same quantity.  The `kind` probe runs once, at the end, for the
    reported test metrics (`test_*`) and its own validation AUROC (`final_val_auroc`); when it is
    the same probe as `objective` it is computed once.  Test metrics never rank anything.
    """

    data: str | None = None  # labelled shards or RETFound tree; None: the synthetic set's labels
    dataset: str | None = None  # catalog name (checks the class count) or subfolder of `data`
    # The search objective's probe.  `fast` (logistic regression on frozen features) by default: it is
    # deterministic given the features and cheap enough for every report; kNN is noisier on small
    # validation sets; `paper` (the authors' SGD probe) costs about a pretraining epoch per report.
    objective: Literal["fast", "knn", "paper"] = "fast"
    kind: Literal["fast", "paper", "knn"] = "fast"  # the final probe: test metrics and final_val_auroc
    intermediate: bool = True  # report (and score) every budget.report_every epochs; false: only at the end
    bootstrap: int = Field(200, ge=0)  # test-set resamples for the 95% intervals of the final probe

    @model_validator(mode="before")
    @classmethod
    def _old_intermediate(cls, data: Any) -> Any:
        # Specs written before the objective was one probe said `intermediate: knn|fast|none`.
        old = data.get("intermediate") if isinstance(data, dict) else None
        if isinstance(old, str):
            hint = "intermediate: false" if old == "none" else f"objective: {old}"
            raise ValueError(f"intermediate={old!r}: the between-epoch probe is now the search objective for every report; "
                             f"write `{hint}` (allowed: intermediate true|false, objective fast|knn|paper)")
        return data


class Searcher(_Strict):
    kind: Literal["optuna", "random", "grid"] = "optuna"
    seed: int | None = 0
    n_startup_trials: int | None = Field(None, ge=1)  # TPE's random start (Optuna default 10)


class Scheduler(_Strict):
    kind: Literal["asha", "fifo"] = "asha"
    grace_period: int | None = Field(None, ge=1)  # epochs before a trial can be stopped; default report_every
    reduction_factor: float = Field(2.0, gt=1)


class Resources(_Strict):
    workers: int = Field(1, ge=1)  # 1: pretraining runs in the trial process; >1: a TorchTrainer per trial
    gpus_per_worker: float = Field(0, ge=0)
    cpus_per_worker: float = Field(1, gt=0)
    # Multi-worker trials: attempts (60 s each) to start the Train workers before the trial errors,
    # instead of Ray Train's default of waiting forever for resources that may never appear.
    max_start_attempts: int = Field(10, ge=1)


class SearchSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # the experiment directory under storage
    description: str = ""
    base: str = "demo"  # pretraining config: preset name or YAML path
    overrides: dict[str, Any] | list[str] = {}  # applied to `base` before any trial parameter
    budget: Budget
    space: dict[str, ParamSpec]
    evaluation: Evaluation = Evaluation()
    searcher: Searcher = Searcher()
    scheduler: Scheduler = Scheduler()
    num_samples: int = Field(8, ge=1)  # trials (grid: repeats of the whole grid)
    max_concurrent_trials: int | None = Field(None, ge=1)  # None: what the cluster holds at once
    resources: Resources = Resources()
    time_budget_s: float | None = Field(3600.0, gt=0)  # the whole search; a guard against hangs
    stop_on_collapse: bool = True
    collapse_patience: int = Field(3, ge=1)  # consecutive log lines flagged collapsed
    storage: str = "runs/tune"

    @model_validator(mode="after")
    def _consistent(self) -> SearchSpec:
        if not self.space:
            raise ValueError("space: declare at least one parameter")
        kinds = {k: p.kind for k, p in self.space.items()}
        grid = [k for k, v in kinds.items() if v == "grid"]
        if self.searcher.kind == "optuna" and grid:
            raise ValueError(f"searcher.kind=optuna cannot search grid parameters {grid}; use choice, or searcher.kind grid/random")
        if self.scheduler.kind == "asha" and not self.evaluation.intermediate:
            raise ValueError("scheduler.kind=asha needs intermediate reports: evaluation.intermediate true (or scheduler.kind fifo)")
        if self.searcher.kind == "grid" and len(grid) != len(kinds):
            other = [k for k in kinds if k not in grid]
            raise ValueError(f"searcher.kind=grid needs every parameter as grid; not grid: {other}")
        return self

    def override_list(self) -> list[str]:
        if isinstance(self.overrides, dict):
            return [f"{k}={json.dumps(v)}" for k, v in self.overrides.items()]
        return list(self.overrides)

    def plain_space(self) -> dict[str, dict[str, Any]]:
        return {k: p.to_plain() for k, p in self.space.items()}

    @property
    def grace_period(self) -> int:
        return self.scheduler.grace_period or self.budget.report_every


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid search spec ({source}):"]
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            parent: type[BaseModel] = SearchSpec
            dict_value = False  # the previous part named a dict field: this part is one of its keys
            for part in e["loc"][:-1]:
                if dict_value:
                    dict_value = False
                    continue
                field_info = parent.model_fields.get(str(part))
                ann = field_info.annotation if field_info else None
                if typing.get_origin(ann) is dict:  # e.g. space: dict[str, ParamSpec]
                    ann, dict_value = typing.get_args(ann)[1], True
                parent = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else parent
            names = list(parent.model_fields)
            close = difflib.get_close_matches(str(e["loc"][-1]), names, n=3, cutoff=0.6)
            lines.append(f"  {loc}: unknown key; " + (f"did you mean {', '.join(close)}?" if close else f"allowed: {', '.join(names)}"))
        elif isinstance(e.get("input"), (dict, list)) or e["type"] == "missing":
            lines.append(f"  {loc or 'spec'}: {msg}")
        else:
            lines.append(f"  {loc}={e.get('input')!r}: {msg}")
    return "\n".join(lines)


def parse_spec(data: dict[str, Any], source: str = "spec", sets: list[str] | tuple[str, ...] = ()) -> SearchSpec:
    """Validate a spec mapping after `--set` assignments (config keys go to `overrides`)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a search spec is a mapping, got {type(data).__name__}")
    data = json.loads(json.dumps(data))  # a deep copy we may edit
    for assignment in sets:
        if "=" not in assignment:
            raise ConfigError(f"--set {assignment!r}: expected key=value, e.g. --set num_samples=4 or --set train.epochs=3")
        key, raw = (s.strip() for s in assignment.split("=", 1))
        if key.split(".", 1)[0] in CONFIG_SECTIONS:
            apply_override({}, f"{key}={raw}")  # checks the key exists, with a did-you-mean
            ov = data.get("overrides") or {}
            if isinstance(ov, dict):
                ov = [f"{k}={json.dumps(v)}" for k, v in ov.items()]
            data["overrides"] = [*ov, f"{key}={raw}"]
            continue
        set_dotted(data, key, yaml.safe_load(raw))
    try:
        return SearchSpec.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def load_spec(path: str | Path, sets: list[str] | tuple[str, ...] = ()) -> SearchSpec:
    path = Path(path)
    if not path.is_file():
        shipped = sorted(p.name for p in Path("tuning").glob("*.yaml")) if Path("tuning").is_dir() else []
        hint = f"; shipped specs: {', '.join(f'tuning/{s}' for s in shipped)}" if shipped else ""
        raise ConfigError(f"search spec {str(path)!r} does not exist{hint}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"search spec {str(path)!r} is not valid YAML: {e}") from None
    return parse_spec(data, str(path), sets)


# ---------------------------------------------------------------- trial configs


def base_overrides(spec: SearchSpec, steps_per_epoch: int | None = None) -> list[str]:
    """The spec's overrides plus what the search fixes for every trial: budget, resources, probe."""
    out = spec.override_list()
    if spec.budget.epochs is not None:
        out += [f"train.epochs={spec.budget.epochs}", "train.max_steps=null"]
    else:
        epochs = math.ceil(spec.budget.steps / steps_per_epoch) if steps_per_epoch else 1
        out += [f"train.epochs={epochs}", f"train.max_steps={spec.budget.steps}"]
    r = spec.resources
    out += [f"run.workers={r.workers}", f"run.gpus_per_worker={r.gpus_per_worker}", f"run.cpus_per_worker={r.cpus_per_worker}"]
    out += [f"probe.kind={spec.evaluation.kind}"]
    if spec.evaluation.data:
        out += [f"probe.data={json.dumps(spec.evaluation.data)}"]
    return out


def _range_key(key: str) -> tuple[str, int] | None:
    head, _, end = key.rpartition(".")
    return (head, RANGE_ENDS[end]) if end in RANGE_ENDS and head else None


def param_overrides(params: dict[str, Any], cfg: Config) -> list[str]:
    """`key=value` overrides for one trial's parameters; range ends keep the other end from `cfg`."""
    out: list[str] = []
    ranges: dict[str, list[Any]] = {}
    resolved = cfg.to_dict()
    for key, value in params.items():
        if isinstance(value, np.generic):
            value = value.item()
        if key == JITTER_STRENGTH:
            out += [f"augment.jitter_brightness={json.dumps(value)}", f"augment.jitter_contrast={json.dumps(value)}"]
        elif (rk := _range_key(key)) and _lookup(resolved, rk[0]) is not None:
            head, i = rk
            ranges.setdefault(head, list(_lookup(resolved, head)))[i] = value
        else:
            out.append(f"{key}={json.dumps(value)}")
    out += [f"{head}={json.dumps(v)}" for head, v in ranges.items()]
    return out


def _lookup(d: dict[str, Any], dotted: str) -> Any:
    node: Any = d
    for p in dotted.split("."):
        if not isinstance(node, dict) or p not in node:
            return None
        node = node[p]
    return node if isinstance(node, list) and len(node) == 2 else None


def trial_config(spec: SearchSpec, params: dict[str, Any], steps_per_epoch: int | None = None) -> Config:
    """The complete pretraining config of one trial; `python -m raydino.pretrain --config` accepts its YAML."""
    fixed = base_overrides(spec, steps_per_epoch)
    direct = {k: v for k, v in params.items() if not _range_key(k)}
    # Presets and plain keys first (a preset changes the ranges), then the range ends on top.
    first = load_config(spec.base, fixed + param_overrides(direct, Config()))
    return load_config(spec.base, fixed + param_overrides(params, first))


def check_space(spec: SearchSpec) -> Config:
    """Every corner of the space must give a valid config; returns the base config. Raises ConfigError."""
    base = load_config(spec.base, base_overrides(spec))
    resolved = base.to_dict()
    problems = []
    for key, p in spec.space.items():
        rk = _range_key(key)
        if key != JITTER_STRENGTH and not (rk and _lookup(resolved, rk[0]) is not None):
            try:
                apply_override({}, f"{key}=0")
            except ConfigError:
                known = [f"{k}.{e}" for k in ("augment.global_crop_scale", "augment.local_crop_scale") for e in RANGE_ENDS]
                close = difflib.get_close_matches(key, known + [JITTER_STRENGTH], n=3, cutoff=0.6)
                problems.append(f"space.{key}: not a config key, a range end (KEY.min / KEY.max) or {JITTER_STRENGTH}"
                                + (f"; did you mean {', '.join(close)}?" if close else ""))
                continue
        for value in p.corners():
            try:
                trial_config(spec, {key: value})
            except ConfigError as e:
                problems.append(f"space.{key}={value!r} gives an invalid trial config: {' '.join(str(e).split())}")
    # A min and a max of the same range, searched together, must not cross.
    for key in spec.space:
        rk = _range_key(key)
        if rk and rk[1] == 0 and f"{rk[0]}.max" in spec.space:
            lo_hi = max(spec.space[key].corners(), key=float)
            hi_lo = min(spec.space[f"{rk[0]}.max"].corners(), key=float)
            if float(lo_hi) > float(hi_lo):
                problems.append(f"space.{key} reaches {lo_hi} but space.{rk[0]}.max starts at {hi_lo}: a trial could get min > max")
    if problems:
        raise ConfigError("invalid search space:\n  " + "\n  ".join(problems))
    return base


# ---------------------------------------------------------------- results


def trial_status(history: list[dict[str, Any]], error: str | None, budget_epochs: int) -> tuple[str, str]:
    """(status, reason) of a trial from its reports and error, one of STATUSES."""
    if error:
        lines = [ln.strip() for ln in str(error).strip().splitlines() if ln.strip()]
        reason = next((ln for ln in reversed(lines) if "non-finite" in ln or "loss became" in ln), lines[-1] if lines else "error")
        return "errored", reason[:300]
    if not history:
        return "stopped", "ended before its first report (time budget or scheduler)"
    last = history[-1]
    if last.get("collapsed"):
        return "collapsed", f"teacher output collapsed ({last.get('collapse') or 'collapse'}) by epoch {last.get('epoch')}"
    if last.get("final"):
        return "finished", ""
    return "stopped", f"stopped early at epoch {last.get('epoch')} of {budget_epochs} (scheduler or time budget)"


def results_table(
    trials: list[dict[str, Any]], param_keys: list[str], budget_epochs: int, wall_seconds: dict[str, float] | None = None
) -> list[dict[str, Any]]:
    """One row per trial: id, status, reason, parameters, last val AUROC, test metrics and timings.

    `trials` are plain records `{"trial_id", "params", "history": [report, ...], "error"}`.
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
        for m in TEST_METRICS:
            for suffix in ("", "_low", "_high", "_std"):
                row[f"test_{m}{suffix}"] = _num(last.get(f"test_{m}{suffix}"))
        for k in ("train_seconds", "probe_seconds", "checkpoint_seconds", "setup_seconds"):
            row[k] = _num(last.get(k))
        row["wall_seconds"] = (wall_seconds or {}).get(t["trial_id"])
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
    trial (its value is the same probe at an earlier epoch), never a collapsed or errored one.
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
    return [{k: (json.dumps(r.get(k)) if k in mixed and r.get(k) is not None and not isinstance(r.get(k), str) else r.get(k)) for k in keys} for r in rows]


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


def best_config_yaml(spec: SearchSpec, params: dict[str, Any], steps_per_epoch: int | None, row: dict[str, Any]) -> str:
    """The best trial's full config as a pretraining YAML (a fresh run name; comments say where it came from)."""
    cfg = trial_config(spec, params, steps_per_epoch)
    cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"name": None})})
    head = (f"# Best trial {row['trial_id']} of search {spec.name!r}: val AUROC {_fmt(row[METRIC])}, "
            f"test AUROC {_fmt(row.get('test_auroc'))}\n# params: {json.dumps(params)}\n"
            f"# Run it: python -m raydino.pretrain --config best.yaml  (raise train.epochs for a full run)\n")
    return head + cfg.to_yaml()


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
        for m in TEST_METRICS:
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


def paired_test(
    rows: list[dict[str, Any]], a: str, b: str, group_key: str = "augment.preset", pair_key: str = "train.seed"
) -> dict[str, Any]:
    """`a` against `b` on test metrics, paired by `pair_key` (same seed): paired t-test and Wilcoxon.

    With five seeds the Wilcoxon signed-rank test cannot go below p = 0.0625 (two-sided); the
    t-test assumes roughly normal differences.  Both are reported; neither is a multiple-test correction.
    """
    from scipy import stats

    fin = [r for r in rows if r["status"] == "finished"]
    by = {g: {r.get(pair_key): r for r in fin if r.get(group_key) == g} for g in (a, b)}
    keys = sorted(set(by[a]) & set(by[b]), key=str)
    out: dict[str, Any] = {"a": a, "b": b, "pair_key": pair_key, "pairs": keys, "metrics": {}}
    for m in TEST_METRICS:
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


# ---------------------------------------------------------------- plots and summary


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        tiny_or_huge = v != 0 and not 10 ** -digits <= abs(v) < 1e4
        return f"{v:.{digits}g}" if tiny_or_huge else f"{v:.{digits}f}"
    return str(v)


_STATUS_STYLE = {"finished": ("tab:green", "o"), "stopped": ("tab:orange", "v"), "collapsed": ("tab:red", "x"), "errored": ("black", "s")}


def plot_auroc_vs_params(rows: list[dict[str, Any]], param_keys: list[str], out: Path, title: str) -> Path | None:
    """One panel per searched parameter: val AUROC of each trial, coloured by status."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_scale_heatmap(rows: list[dict[str, Any]], out: Path, title: str, bins: int = 5) -> Path | None:
    """Mean val AUROC over global × local minimum crop scale (binned), with every trial on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gx, lx = HEATMAP_KEYS
    pts = [(r[gx], r[lx], r[METRIC], r["status"]) for r in rows
           if r.get(gx) is not None and r.get(lx) is not None and r[METRIC] is not None]
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
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _md_table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def preset_table_markdown(table: list[dict[str, Any]], group_key: str = "augment.preset") -> str:
    """Mean [95% t-interval over pretraining seeds] and, after ±, the mean std over probe seeds."""
    cols = ["preset", "pretraining seeds", "probe seeds"] + [m.upper() if m in ("auroc", "aupr") else m for m in TEST_METRICS]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for e in table:
        cells = [str(e[group_key]), str(e["n"]), _fmt(e.get("probe_seeds"))]
        for m in TEST_METRICS:
            lo, hi, sd = e.get(f"{m}_low"), e.get(f"{m}_high"), e.get(f"{m}_probe_std")
            cell = f"{_fmt(e[m])} [{_fmt(lo)}, {_fmt(hi)}]" if lo is not None else _fmt(e[m])
            cells.append(cell + (f" ± {_fmt(sd)}" if sd is not None else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_markdown(
    spec: SearchSpec,
    rows: list[dict[str, Any]],
    best: dict[str, Any] | None,
    param_keys: list[str],
    extra: dict[str, Any] | None = None,
    paper: dict[str, Any] | None = None,
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
        out += ["## Best trial", "", f"`{best['trial_id']}`: val AUROC {_fmt(best[METRIC])}; test "
                + ", ".join(f"{m} {_fmt(best.get(f'test_{m}'))} [{_fmt(best.get(f'test_{m}_low'))}, {_fmt(best.get(f'test_{m}_high'))}]"
                            for m in ("auroc", "aupr", "sensitivity")), "",
                "| parameter | value |", "|---|---|"]
        out += [f"| {k} | {_fmt(best.get(k), 4)} |" for k in param_keys]
        out += ["", "Its full configuration is `best.yaml` (`python -m raydino.pretrain --config best.yaml`).", ""]
    else:
        out += ["## Best trial", "", "No trial finished or was stopped with an AUROC.", ""]
    ranked = sorted(rows, key=lambda r: (r["status"] != "finished", -(r[METRIC] if r[METRIC] is not None else -1)))
    out += ["## Trials", "", _md_table(ranked, ["trial_id", "status", *param_keys, METRIC, "test_auroc", "epoch", "reason"]), ""]
    if paper:
        out += ["## Presets (Table 3 shape)", "",
                "Test metrics: mean [95% t-interval over pretraining seeds] ± mean std over probe seeds "
                "(the paper's ± is over probe seeds of one checkpoint).", "", paper["table_md"], ""]
        for test in paper.get("paired", []):
            r = test["metrics"]["auroc"]
            out.append(f"Paired {test['a']} vs {test['b']} over seeds {test['pairs']}: AUROC difference "
                       f"{_fmt(r.get('mean_difference'), 4)}, paired t p = {_fmt(r.get('p_t'))}, Wilcoxon p = {_fmt(r.get('p_wilcoxon'))}")
        out.append("")
    out += ["## Figures", "", "![val AUROC against each parameter](plots/auroc_vs_params.png)", ""]
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


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)
