"""`python -m raydino.tune tuning/FILE.yaml`: search augmentation scales with Ray Tune, scored by probe AUROC.

Every trial pretrains DINO with one augmentation setting and scores the teacher with a probe on
labelled data.  Every report (each `budget.report_every` epochs and the end) carries `val_auroc`,
the validation AUROC of `evaluation.objective`'s probe: ASHA, the searcher and the choice of the
best trial all see that one number.  The final report adds the `evaluation.kind` probe's test
metrics (never compared) and its own validation AUROC as `final_val_auroc`.
A one-worker trial trains in the trial process; a multi-worker trial runs a `TorchTrainer` inside
the trial and forwards rank 0's reports with `TuneReportCallback`.

Hang guards (Tune with Train inside can wait forever on Ray 2.60): a local Ray runs with the dashboard on and
its State API address pinned (`distributed.cluster.init_ray`), `time_budget_s` bounds the search,
`max_concurrent_trials` fits the cluster for every searcher, and Train's worker start is retried
a bounded number of times.  `--resume` continues a killed search
(`Tuner.restore(..., resume_errored=True)`); finished trials are not rerun.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback

from raydino.cli import EXIT_TRAINING_FAILED, USER_ERRORS, add_storage_arguments, local_folder, storage_overrides, user_error
from raydino.config import Config, ConfigError
from raydino.data import storage as st
from raydino.data.overlap import run_overlap_warning
from raydino.distributed.capacity import check_locality, search_cpus, trial_concurrency
from raydino.distributed.cluster import init_ray, quiet_ray_data
from raydino.distributed.trials import trial_main
from raydino.progress import format_duration
from raydino.runs.storage import RunStorage, ensure_dataset, open_dataset
from raydino.search.report import (
    HEATMAP_KEYS,
    best_config_yaml,
    data_sweep_report,
    format_value,
    paper_report,
    plot_auroc_vs_params,
    plot_presets,
    plot_scale_by_data,
    plot_scale_heatmap,
    summary_markdown,
)
from raydino.search.results import METRIC, STATUSES, best_row, history_table, results_table, safe_name, table_bytes
from raydino.search.spec import SearchSpec, check_space, data_variant_key, data_variants, load_spec, trial_config

DEFAULT_CACHE = Path(".raydino")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m raydino.tune",
        description="Search DINO augmentation scales with Ray Tune, scored by linear-probe AUROC.",
        epilog="exit status (the same for every raydino command): 0 done; 2 bad input (spec, config, data, storage, "
        "or a cluster that can never host a trial); 1 no trial reported val_auroc (every trial failed).",
    )
    p.add_argument("spec", help="search spec YAML, e.g. tuning/smoke.yaml, tuning/aug_scales.yaml, tuning/paper_presets.yaml")
    p.add_argument("--resume", action="store_true", help="continue the experiment of the same name in storage (finished trials are kept)")
    p.add_argument("--storage", help="where the experiment directory goes: a directory, s3:// or gs://bucket/prefix (default: the spec's storage)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a spec field (num_samples=4, budget.epochs=2, name=x) or a pretraining config key (optim.lr=0.001); repeatable",
    )
    p.add_argument("--cache", type=local_folder, default=str(DEFAULT_CACHE), help="local cache for the synthetic data set (default .raydino)")
    p.add_argument("--print-spec", action="store_true", help="print the validated spec and the base trial config, then exit")
    add_storage_arguments(p)  # the same as --set data.s3_endpoint=URL, data.s3_region=R, data.gcs_endpoint=URL
    return p.parse_args(argv)


# ---------------------------------------------------------------- the driver


def trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


HEARTBEAT_S = 60.0  # longest silence of the driver's progress line while trials run
_ACTIVE: dict[str, Any] = {}  # the progress callback Tune actually runs (it may be unpickled on resume)


class SearchProgress(Callback):  # module level: pickled by reference, so `_ACTIVE` is this module's
    """Driver-side progress: trials ended by status, best AUROC so far, elapsed and ETA; trial wall times."""

    def __init__(self, total_trials: int, budget_epochs: int, time_budget_s: float | None, max_failures: int = 0) -> None:
        self.total, self.epochs, self.budget = total_trials, budget_epochs, time_budget_s
        self.started: dict[str, float] = {}
        self.wall: dict[str, float] = {}
        self.last: dict[str, dict[str, Any]] = {}
        self.restarts: dict[str, int] = {}
        self.max_failures = max_failures

    def setup(self, **info: Any) -> None:
        _ACTIVE["progress"] = self
        self.t0, self.printed, self.session_epochs = time.monotonic(), 0.0, 0.0
        self.started = {}

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.started[trial.trial_id] = time.monotonic()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        before = float((self.last.get(trial.trial_id) or {}).get("epoch") or 0)
        self.session_epochs += max(float(result.get("epoch") or 0) - before, 0.0)
        self.last[trial.trial_id] = {k: result.get(k) for k in ("epoch", METRIC, "collapsed", "final")}
        if time.monotonic() - self.printed > 15:
            self._print(trials)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        # A trial's final probe (the paper's: minutes) reports nothing until it ends: say so once a minute.
        if time.monotonic() - self.printed > HEARTBEAT_S:
            self._print(trials)

    def _ended(self, trial: Any, trials: list) -> None:
        if trial.trial_id in self.started:
            self.wall[trial.trial_id] = time.monotonic() - self.started[trial.trial_id]
        self._print(trials)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended(trial, trials)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended(trial, trials)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """A crashed trial Tune restarts (`resources.max_failures`): say so, the run is not stuck."""
        n = self.restarts[trial.trial_id] = self.restarts.get(trial.trial_id, 0) + 1
        why = str(getattr(trial, "error_message", None) or "its process or node was lost").strip().splitlines()
        print(
            f"[raydino.tune] trial {trial.trial_id} crashed ({why[-1][:160] if why else 'lost'}); "
            f"restarting it from its last checkpoint (restart {n} of {self.max_failures})",
            flush=True,
        )

    def _print(self, trials: list) -> None:
        """ETA = epochs still to train (unstarted trials at full budget) / epochs trained per second so far."""
        self.printed = now = time.monotonic()
        elapsed = now - self.t0
        ended = [t for t in trials if str(t.status) in ("TERMINATED", "ERROR")]
        running = sum(str(t.status) == "RUNNING" for t in trials)
        left = sum(self.epochs - float((self.last.get(t.trial_id) or {}).get("epoch") or 0) for t in trials if t not in ended)
        left += max(0, self.total - len(trials)) * self.epochs
        rate = self.session_epochs / max(elapsed, 1e-9)
        eta = left / rate if rate > 0 else math.inf
        if self.budget:
            eta = min(eta, max(self.budget - elapsed, 0.0))
        scored = [(v[METRIC], k) for k, v in self.last.items() if v.get(METRIC) is not None and v.get("final")]
        best = f", best final {METRIC} {max(scored)[0]:.3f} ({max(scored)[1]})" if scored else ""
        print(
            f"[raydino.tune] {len(ended)}/{self.total} trials ended, {running} running{best}; "
            f"elapsed {format_duration(elapsed)}, ETA {format_duration(eta)}",
            flush=True,
        )


def _tune_space(plain: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The spec's plain distributions (`SearchSpec.plain_space`) → Ray Tune's search-space objects."""
    from ray import tune

    out: dict[str, Any] = {}
    for key, p in plain.items():
        if p["kind"] == "uniform":
            out[key] = tune.uniform(p["low"], p["high"])
        elif p["kind"] == "loguniform":
            out[key] = tune.loguniform(p["low"], p["high"])
        elif p["kind"] == "choice":
            out[key] = tune.choice(p["values"])
        else:
            out[key] = tune.grid_search(p["values"])
    return out


def _total_trials(spec: SearchSpec) -> int:
    grid = math.prod(len(p.grid) for p in spec.space.values() if p.kind == "grid")
    return spec.num_samples * grid


def prepare(spec: SearchSpec, cache: Path) -> tuple[Config, dict[str, Any]]:
    """Validate everything and build the trial context before Ray starts (bad input fails in seconds)."""
    base = check_space(spec)
    data_uri = base.data.uri or ensure_dataset(base, cache)
    shards = open_dataset(data_uri, base, check_sizes=True)
    from raydino.data.loader import pretrain_rows

    rows = pretrain_rows(shards)
    # Searched synthetic-data values (lesion size, count): one set per combination, built here, before Ray.
    variants: dict[str, str] = {}
    for values in data_variants(spec) if base.data.uri is None and len(data_variants(spec)) > 1 else []:
        cfg = trial_config(spec, values)
        uri = str(Path(ensure_dataset(cfg, cache)).resolve())
        if pretrain_rows(open_dataset(uri, cfg)) != rows:
            raise ConfigError(f"space: the synthetic set for {values} has a different number of training rows than the base set")
        variants[data_variant_key(values)] = uri
    spe = base.train.steps_per_epoch or rows // (base.train.batch_size * spec.resources.workers)
    if spe < 1:
        raise ConfigError(
            f"data has {rows} training rows, fewer than one global batch (train.batch_size={base.train.batch_size} "
            f"× resources.workers={spec.resources.workers})"
        )
    probe_uri = spec.evaluation.data or base.probe.data or (data_uri if base.data.uri is None else None)
    if probe_uri is None:
        raise ConfigError(
            "evaluation.data: labelled data for the probe is required when data.uri is set "
            "(labelled shards or a RETFound tree; the synthetic set brings its own labels)"
        )
    if "://" not in probe_uri:
        probe_uri = str(Path(probe_uri).resolve())
    if "://" not in data_uri:
        data_uri = str(Path(data_uri).resolve())
    probe_dataset = spec.evaluation.dataset or ("synthetic" if probe_uri == data_uri else None)
    # Every trial reads the probe's labelled set; read its index once here, so that a set that cannot be
    # read (a wrong path, a missing class or split) fails now, not in every trial after Ray has started.
    from raydino.data.labelled import load_labelled

    load_labelled(probe_uri, dataset=probe_dataset, storage_options=st.StorageOptions.from_config(base.data))
    storage = RunStorage.for_config(spec.storage, base)
    ctx = {
        "spec": spec.model_dump(mode="json"),
        "data_uri": data_uri,
        "probe_uri": probe_uri,
        "probe_dataset": probe_dataset,
        "steps_per_epoch": spe,
        "data_variants": variants,
        "storage": storage.to_dict(spec.name),
        "experiment": spec.name,
    }
    return base, ctx


def run_search(spec: SearchSpec, resume: bool = False, cache: Path = DEFAULT_CACHE) -> dict[str, Any]:
    """Run (or resume) the search and write its report; returns the summary dict (also summary.json)."""
    import ray.tune as tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from raydino.core.graphstep import graph_config_problem
    from raydino.core.model import model_config_problems

    _ACTIVE.clear()
    base, ctx = prepare(spec, cache)
    if problem := graph_config_problem(base):  # the trials would each fail at their first graph step
        raise ConfigError(problem)
    if problems := model_config_problems(base):  # ... or at their first step
        raise ConfigError("; ".join(problems))
    leak = run_overlap_warning({"data": {**base.data.model_dump(), "uri": ctx["data_uri"]}}, ctx["probe_uri"])  # stored hashes only
    if leak:
        print(f"[raydino.tune] {leak}", flush=True)
    storage = RunStorage.for_config(spec.storage, base)
    exp_path = storage.location.join(spec.name)
    fs = storage.filesystem if storage.is_remote else None
    exists = storage.exists(spec.name)
    if resume and not exists:
        raise ConfigError(f"--resume: no experiment {spec.name!r} in {storage.uri}")
    if not resume and exists:
        raise ConfigError(f"experiment {storage.location.uri_of(spec.name)} exists: add --resume to continue it, or --set name=NEW")
    storage.check_writable(spec.name)

    budget_epochs = spec.budget.epochs or math.ceil(spec.budget.steps / ctx["steps_per_epoch"])
    init_ray(search_cpus(spec, base, spec.max_concurrent_trials or 1))
    quiet_ray_data()
    check_locality(base, {"storage": storage.uri, "data": ctx["data_uri"], "evaluation.data": ctx["probe_uri"]})
    concurrency = trial_concurrency(spec, base)
    r = spec.resources
    # One-worker trials train in the trial actor; a multi-worker trial's actor only drives its
    # TorchTrainer, whose workers reserve their own resources (Tune refuses an empty request).
    resources = {"cpu": r.cpus_per_worker, "gpu": r.gpus_per_worker} if r.workers == 1 else {"cpu": 0.01}
    trainable = tune.with_resources(tune.with_parameters(trial_main, ctx=ctx), resources)
    total = _total_trials(spec)
    print(
        f"[raydino.tune] {'resuming' if resume else 'starting'} {spec.name}: {total} trials of {budget_epochs} epochs "
        f"({ctx['steps_per_epoch']} steps each), {concurrency} at a time, {r.workers} worker(s) per trial; "
        f"experiment {storage.location.uri_of(spec.name)}",
        flush=True,
    )

    # Tune warns whenever num_to_keep=1 forces a state snapshot; expected here (one checkpoint per report).
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    t0 = time.monotonic()
    if resume:
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_errored=True, storage_filesystem=fs)
    else:
        if spec.searcher.kind == "optuna":
            import optuna
            from ray.tune.search.optuna import OptunaSearch

            sampler = optuna.samplers.TPESampler(
                seed=spec.searcher.seed, **({"n_startup_trials": spec.searcher.n_startup_trials} if spec.searcher.n_startup_trials else {})
            )
            searcher = OptunaSearch(sampler=sampler)
        else:
            from ray.tune.search.basic_variant import BasicVariantGenerator

            # Given explicitly, Tune ignores max_concurrent_trials: the generator must carry the limit.
            searcher = BasicVariantGenerator(random_state=spec.searcher.seed, max_concurrent=concurrency)
        scheduler = (
            ASHAScheduler(time_attr="epoch", max_t=budget_epochs, grace_period=spec.grace_period, reduction_factor=spec.scheduler.reduction_factor)
            if spec.scheduler.kind == "asha"
            else FIFOScheduler()
        )
        tuner = tune.Tuner(
            trainable,
            param_space=_tune_space(spec.plain_space()),
            tune_config=tune.TuneConfig(
                metric=METRIC,
                mode="max",
                search_alg=searcher,
                scheduler=scheduler,
                num_samples=spec.num_samples,
                max_concurrent_trials=concurrency,
                time_budget_s=spec.time_budget_s,
                reuse_actors=r.workers == 1,
                trial_name_creator=trial_dirname,
                trial_dirname_creator=trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=spec.name,
                storage_path=storage.train_storage_path,
                storage_filesystem=fs,
                # A crashed trial (node lost, process killed) restarts from its last checkpoint; a
                # diverged one ends normally (`raydino.search.trial`), so this budget is for crashes only.
                failure_config=tune.FailureConfig(max_failures=r.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                callbacks=[SearchProgress(total, budget_epochs, spec.time_budget_s, r.max_failures)],
                verbose=0,
            ),
        )
    grid = tuner.fit()
    seconds = time.monotonic() - t0
    progress = _ACTIVE.get("progress")
    trials = []
    for result in grid:
        df = result.metrics_dataframe
        history = [] if df is None else [{k: v for k, v in row.items() if not str(k).startswith("config/")} for row in df.to_dict("records")]
        trials.append(
            {
                "trial_id": Path(str(result.path)).name.removeprefix("trial_"),
                "params": dict(result.config or {}),
                "history": history,
                "error": str(result.error) if result.error else None,
                "restarts": progress.restarts.get(Path(str(result.path)).name.removeprefix("trial_"), 0) if progress else 0,
            }
        )
    # A driver killed after Tune made a trial's folder but before it saved the experiment state leaves that
    # trial unknown to the resumed search (which samples another in its place): name such folders.
    known = {f"trial_{t['trial_id']}" for t in trials}
    orphans = sorted(f for f in storage.folders(spec.name) if f.startswith("trial_") and f not in known)
    return write_report(
        spec,
        storage,
        trials,
        ctx["steps_per_epoch"],
        budget_epochs,
        seconds,
        progress.wall if progress else {},
        hit_budget=bool(spec.time_budget_s and seconds >= spec.time_budget_s),
        orphans=orphans,
    )


def write_report(
    spec: SearchSpec,
    storage: RunStorage,
    trials: list[dict[str, Any]],
    steps_per_epoch: int,
    budget_epochs: int,
    seconds: float,
    wall: dict[str, float],
    hit_budget: bool = False,
    orphans: list[str] | None = None,
) -> dict[str, Any]:
    """Tables, best config, plots and summary into the experiment directory (local, s3:// or gs://)."""
    keys = list(spec.space)
    rows = results_table(trials, keys, budget_epochs, wall)
    best = best_row(rows)
    walls = [r for r in rows if r["wall_seconds"] and r["train_seconds"] is not None]
    spent = sum(r["wall_seconds"] for r in walls)
    overhead = (spent - sum(r["train_seconds"] + (r["probe_seconds"] or 0) for r in walls)) / spent if spent else None
    paper = paper_report(rows)
    sweep = data_sweep_report(rows, keys)
    extra = {
        "search time": format_duration(seconds) + (" (stopped by time_budget_s)" if hit_budget else ""),
        "trial overhead (wall − pretraining − probe, over trials timed this session)": f"{overhead:.1%}" if overhead is not None else "–",
    }
    if orphans:
        extra["trial folders not in these results"] = (
            f"{', '.join(orphans)}: started by a driver that was killed before Tune recorded them; the resumed "
            "search ran other trials in their place. They can be deleted."
        )
    files: dict[str, bytes] = {
        "results.csv": table_bytes(rows, "csv"),
        "results.parquet": table_bytes(rows, "parquet"),
        "metrics.csv": table_bytes(history_table(trials), "csv"),
        "metrics.parquet": table_bytes(history_table(trials), "parquet"),
    }
    for t in trials:
        try:
            files[f"trials/{safe_name(t['trial_id'])}.yaml"] = trial_config(spec, t["params"], steps_per_epoch).to_yaml().encode()
        except ConfigError as e:
            files[f"trials/{safe_name(t['trial_id'])}.yaml"] = f"# invalid config: {e}\n".encode()
    if best:
        params = next(t["params"] for t in trials if t["trial_id"] == best["trial_id"])
        files["best.yaml"] = best_config_yaml(spec, params, steps_per_epoch, best).encode()
    with tempfile.TemporaryDirectory() as tmp:
        title = f"{spec.name}: val AUROC by trial"
        for made in (
            plot_auroc_vs_params(rows, keys, Path(tmp) / "auroc_vs_params.png", title),
            plot_scale_heatmap(rows, Path(tmp) / "scale_heatmap.png", spec.name) if all(k in keys for k in HEATMAP_KEYS) else None,
            plot_presets(rows, paper["table"], Path(tmp) / "presets.png", spec.name) if paper else None,
            plot_scale_by_data(rows, sweep, Path(tmp) / "scale_by_data.png", spec.name) if sweep else None,
        ):
            if made:
                files[f"plots/{made.name}"] = made.read_bytes()
    summary = {
        "name": spec.name,
        "experiment": storage.location.uri_of(spec.name),
        "seconds": seconds,
        "hit_time_budget": hit_budget,
        "trial_overhead_fraction": overhead,
        "counts": {s: sum(r["status"] == s for r in rows) for s in STATUSES},
        "orphaned_trial_folders": orphans or [],
        "best": best,
        "rows": rows,
    }
    if paper:
        summary["presets"] = {"table": paper["table"], "paired": paper["paired"]}
        files["presets.md"] = paper["table_md"].encode()
    if sweep:
        summary["scale_by_data"] = {k: sweep[k] for k in ("data_key", "x_key", "table")}
    files["summary.md"] = summary_markdown(spec, rows, best, keys, extra, paper, sweep).encode()
    files["summary.json"] = json.dumps(summary, indent=2, default=str).encode()
    for rel, data in files.items():
        st.write_bytes(storage.location, storage.location.join(spec.name, rel), data)
    counts = ", ".join(f"{n} {s}" for s, n in summary["counts"].items())
    where = storage.location.uri_of(spec.name)
    print(
        f"[raydino.tune] done in {format_duration(seconds)}: {len(rows)} trials ({counts}); trial overhead "
        f"{extra['trial overhead (wall − pretraining − probe, over trials timed this session)']}",
        flush=True,
    )
    if best:
        print(
            f"[raydino.tune] best {best['trial_id']}: val AUROC {best[METRIC]:.3f}, test AUROC "
            f"{format_value(best.get('test_auroc'))}; config {where}/best.yaml",
            flush=True,
        )
    print(f"[raydino.tune] results {where}/results.csv, summary {where}/summary.md", flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        sets = list(args.set) + storage_overrides(args) + ([f"storage={args.storage}"] if args.storage else [])
        spec = load_spec(args.spec, sets)
        if args.print_spec:
            base = check_space(spec).to_yaml()  # validates every trial's config first: nothing is printed before an error
            print(json.dumps(spec.model_dump(mode="json"), indent=2))
            print(base)
            return 0
        summary = run_search(spec, resume=args.resume, cache=Path(args.cache))
    except USER_ERRORS as e:
        return user_error("raydino.tune", e)
    if not summary["best"]:  # every trial failed or collapsed before its first report: nothing was found
        return user_error("raydino.tune", f"no trial reported {METRIC}; the errors are in {summary['experiment']}/summary.md", EXIT_TRAINING_FAILED)
    return 0


if __name__ == "__main__":
    # Run the importable module's main, not __main__'s copy: cloudpickle sends functions and
    # classes from __main__ by value, which would give trials and callbacks private globals.
    from raydino.tune import main as _main

    sys.exit(_main())
