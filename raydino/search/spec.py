"""The augmentation search's spec, without Ray: what `tuning/*.yaml` declares, and each trial's config.

`python -m raydino.tune` (the recipe) reads a spec with `load_spec`, turns `space` into Ray Tune
objects and runs the trials; everything it needs that does not touch Ray lives in `raydino.search`,
so it is testable in one process.  Here:

- `SearchSpec`: the experiment as declared (validated, errors name the field), with its `Budget`,
  `Evaluation` (how a trial is scored), `Searcher`, `Scheduler` and `Resources`;
- `trial_config(spec, params)`: the full pretraining `Config` of one trial; `check_space` tries every
  corner of the space before anything runs.

The rows of finished trials are `raydino.search.results`; plots, tables and the summary are
`raydino.search.report`.

Search-space keys are config keys (`augment.n_local_crops`), one end of a range-valued key
(`augment.global_crop_scale.min`, `augment.local_crop_scale.max`), or `augment.jitter_strength`
(brightness and contrast jitter together, the knob the paper turns: 0.4 strong, 0.2 weak).
On the embedded synthetic set, `data.synthetic_lesion_size` and `data.synthetic_lesion_count` may be
searched too (grid or choice): the recipe builds one synthetic set per value before any trial, and each
trial pretrains and is probed on its own (`data_variants`, `trial_data`), which is how one asks
how the best crop scale moves with lesion size.
"""

from __future__ import annotations

import difflib
import json
import math
import typing
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from raydino.config import Config, ConfigError, NameAndStorage, NoBoolNumbers, apply_override, check_storage_uri, load_config, safe_uri, set_dotted

CONFIG_SECTIONS = tuple(Config.model_fields)
RANGE_ENDS = {"min": 0, "max": 1}
JITTER_STRENGTH = "augment.jitter_strength"
# Data settings a search may vary: they change what the synthetic images show, not how many there are,
# so every variant has the same splits and steps per epoch.
SYNTHETIC_DATA_KEYS = ("data.synthetic_lesion_size", "data.synthetic_lesion_count")


class _Strict(NoBoolNumbers):
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

    @field_validator("data")
    @classmethod
    def _data_uri(cls, v: str | None, info: Any) -> str | None:
        return check_storage_uri(info.field_name, v)

    @model_validator(mode="before")
    @classmethod
    def _old_intermediate(cls, data: Any) -> Any:
        # Specs written before the objective was one probe said `intermediate: knn|fast|none`.
        old = data.get("intermediate") if isinstance(data, dict) else None
        if isinstance(old, str):
            hint = "intermediate: false" if old == "none" else f"objective: {old}"
            raise ValueError(
                f"intermediate={old!r}: the between-epoch probe is now the search objective for every report; "
                f"write `{hint}` (allowed: intermediate true|false, objective fast|knn|paper)"
            )
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
    # Restarts of a crashed trial (its node lost, its process killed) from its last checkpoint before
    # it counts as errored: Tune's FailureConfig.max_failures.  A diverged trial (non-finite loss)
    # ends normally with status "diverged" and is never retried: rerunning it would diverge again.
    max_failures: int = Field(3, ge=0)


class SearchSpec(_Strict, NameAndStorage):
    name: str  # the experiment directory under storage
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
            value = e.get("input")
            if isinstance(value, str) and "://" in value:
                value = safe_uri(value)  # a URI's credentials are never echoed
            lines.append(f"  {loc}={value!r}: {msg}")
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
    if path.is_dir():
        raise ConfigError(f"search spec {str(path)!r} is a folder: give a spec file, e.g. tuning/smoke.yaml")
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
        if key in SYNTHETIC_DATA_KEYS:
            if base.data.uri is not None or spec.evaluation.data:
                problems.append(f"space.{key}: only the embedded synthetic set can vary (data.uri and evaluation.data must be unset)")
                continue
            if p.kind not in ("grid", "choice"):
                problems.append(f"space.{key}: {p.kind} is not allowed here; use grid or choice (one synthetic set is built per value)")
                continue
        elif key.startswith("data."):
            # The search streams data sets built before any trial from the base config: a trial's own
            # value of any other data.* key would be ignored, and the trials would not differ as they claim.
            problems.append(
                f"space.{key}: data settings cannot be searched (only {', '.join(SYNTHETIC_DATA_KEYS)} on the synthetic "
                f"set); run one search per value instead, e.g. --set {key}=VALUE"
            )
            continue
        rk = _range_key(key)
        if key != JITTER_STRENGTH and not (rk and _lookup(resolved, rk[0]) is not None):
            try:
                apply_override({}, f"{key}=0")
            except ConfigError:
                known = [f"{k}.{e}" for k in ("augment.global_crop_scale", "augment.local_crop_scale") for e in RANGE_ENDS]
                close = difflib.get_close_matches(key, known + [JITTER_STRENGTH], n=3, cutoff=0.6)
                problems.append(
                    f"space.{key}: not a config key, a range end (KEY.min / KEY.max) or {JITTER_STRENGTH}"
                    + (f"; did you mean {', '.join(close)}?" if close else "")
                )
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


# ---------------------------------------------------------------- searched synthetic data


def data_variants(spec: SearchSpec) -> list[dict[str, Any]]:
    """Every combination of the searched synthetic-data values (`[{}]` when none is searched)."""
    import itertools

    keys = [k for k in spec.space if k in SYNTHETIC_DATA_KEYS]
    values = [spec.space[k].corners() for k in keys]
    return [dict(zip(keys, combo)) for combo in itertools.product(*values)]


def data_variant_key(params: dict[str, Any]) -> str:
    """The name of a trial's synthetic set among `data_variants`: its searched data values, as JSON."""
    picked = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in params.items() if k in SYNTHETIC_DATA_KEYS}
    return json.dumps(dict(sorted(picked.items())))


def trial_data(ctx: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """The trial context with `data_uri` and `probe_uri` of the trial's own synthetic set, if searched."""
    uris = ctx.get("data_variants") or {}
    key = data_variant_key(params)
    if key not in uris:
        return ctx
    same_probe = ctx["probe_uri"] == ctx["data_uri"]
    return {**ctx, "data_uri": uris[key], "probe_uri": uris[key] if same_probe else ctx["probe_uri"]}
