"""`python -m raydino.tune tuning/FILE.yaml`: search augmentation scales with Ray Tune, scored by probe AUROC.

Every trial pretrains DINO with one augmentation setting and scores the teacher with a probe on
labelled data.  Every report (each `budget.report_every` epochs and the end) carries `val_auroc`,
the validation AUROC of `evaluation.objective`'s probe: ASHA, the searcher and the choice of the
best trial all see that one number.  The final report adds the `evaluation.kind` probe's test
metrics (never compared) and its own validation AUROC as `final_val_auroc`.  A one-worker trial trains in the trial process; a multi-worker trial runs a
`TorchTrainer` inside the trial and forwards rank 0's reports with `TuneReportCallback`.

Hang guards (see RAY_NOTES "Tune with Train inside"): a local Ray runs with the dashboard on and
its State API address pinned (`start_local_ray`), `time_budget_s` bounds the search,
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
from collections import deque
from pathlib import Path
from typing import Any, Callable

from ray.tune import Callback

from . import search
from .config import Config, ConfigError, build_config
from .data import storage as st
from .run_storage import RunStorage, ensure_dataset, open_dataset
from .search import METRIC, SearchSpec
from .tracking import format_duration

DEFAULT_CACHE = Path(".raydino")
_SECRET_ENV = {"AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECURITY_TOKEN"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m raydino.tune", description="Search DINO augmentation scales with Ray Tune, scored by linear-probe AUROC.")
    p.add_argument("spec", help="search spec YAML, e.g. tuning/smoke.yaml, tuning/aug_scales.yaml, tuning/paper_presets.yaml")
    p.add_argument("--resume", action="store_true", help="continue the experiment of the same name in storage (finished trials are kept)")
    p.add_argument("--storage", help="where the experiment directory goes: a directory or s3://bucket/prefix (default: the spec's storage)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec field (num_samples=4, budget.epochs=2, name=x) or a pretraining config key (optim.lr=0.001); repeatable")
    p.add_argument("--cache", default=str(DEFAULT_CACHE), help="local cache for the synthetic data set (default .raydino)")
    p.add_argument("--print-spec", action="store_true", help="print the validated spec and the base trial config, then exit")
    return p.parse_args(argv)


# ---------------------------------------------------------------- the trial


class _Collapsed(Exception):
    """Raised from the loop's hook to end a trial whose teacher collapsed (after it reported)."""


class TrialEvaluator:
    """Probe data decoded once per trial; kNN between epochs, the configured probe at the end."""

    def __init__(self, cfg: Config, ctx: dict[str, Any]) -> None:
        from .probe import SPLITS, decode_split, load_labelled

        self.cfg, self.evaluation = cfg, search.Evaluation.model_validate(ctx["spec"]["evaluation"])
        opts = st.StorageOptions(endpoint=cfg.data.s3_endpoint, region=cfg.data.s3_region)
        self.data = load_labelled(ctx["probe_uri"], dataset=ctx["probe_dataset"], storage_options=opts)
        self.size = cfg.probe.image_size or cfg.augment.global_crop_size
        self.images = {s: decode_split(self.data.splits[s], self.size) for s in SPLITS}

    def _features(self, backbone: Any, splits: tuple[str, ...]) -> dict[str, Any]:
        from .probe import extract_features

        p = self.cfg.probe
        return {s: extract_features(backbone, self.images[s], self.size, p.batch_size, progress=None, dtype=p.feature_dtype) for s in splits}

    def _probe(self, backbone: Any, feats: dict[str, Any], kind: str, bootstrap: int) -> dict[str, Any]:
        from .probe import probe_backbone

        return probe_backbone(backbone, self.data, kind, image_size=self.size, n_bootstrap=bootstrap, feats=feats,
                              progress=None, **self.cfg.probe.probe_kwargs())

    def evaluate(self, backbone: Any, final: bool) -> dict[str, Any]:
        """Metrics of the frozen backbone.

        Every call: `val_auroc` (METRIC), the objective probe's validation AUROC, the same probe at
        every report.  Final call also: the `kind` probe's `final_val_auroc` and `test_*` (mean over
        probe seeds, 95% bootstrap interval, std over probe seeds).  The test split's features are
        only extracted for the final call, and nothing computed on them is compared by the search.
        """
        was_training = backbone.training
        backbone.eval()
        try:
            ev = self.evaluation
            feats = self._features(backbone, ("train", "val", "test"))
            same = ev.kind == ev.objective  # then the final probe is the objective's own run, computed once
            objective = self._probe(backbone, feats, ev.objective, ev.bootstrap if final and same else 0)
            out: dict[str, Any] = {METRIC: self._val(objective)}
            if not final:
                return out
            result = objective if same else self._probe(backbone, feats, ev.kind, ev.bootstrap)
            out["final_val_auroc"] = self._val(result)
            out["probe_seeds"] = len(result["per_seed"])
            for m in search.TEST_METRICS:
                out[f"test_{m}"] = result["mean"].get(m)
                out[f"test_{m}_std"] = (result.get("std") or {}).get(m)
                ci = (result.get("ci95") or {}).get(m) or {}
                out[f"test_{m}_low"], out[f"test_{m}_high"] = ci.get("low"), ci.get("high")
            return out
        finally:
            backbone.train(was_training)

    @staticmethod
    def _val(result: dict[str, Any]) -> float:
        """Validation AUROC averaged over probe seeds (the mean over defined classes where a class is absent)."""
        from .probe import selection_auroc

        return float(sum(selection_auroc(r["val"]) for r in result["per_seed"]) / len(result["per_seed"]))


def train_and_report(
    state: Any,
    spec: SearchSpec,
    epoch_batches: Callable[[int], Any],
    report: Callable[[dict[str, Any], str | None], None],
    evaluator: TrialEvaluator | None,
    agree: Callable[[bool], bool] = bool,
    rank: int = 0,
    world: int = 1,
) -> str:
    """Run the DINO loop and report at every `report_every`-th epoch end, at a collapse and at the end.

    Every rank calls `report` equally often (Ray Train's report is a barrier); only rank 0 has an
    evaluator and writes the checkpoint.  Returns "finished" or "collapsed".  Timers live in
    `state.extra` so they survive a resume.
    """
    from .checkpoint import save_checkpoint
    from .trainer import LoopHooks, fit

    timers = state.extra.setdefault("tune_timers", {"train": 0.0, "probe": 0.0, "checkpoint": 0.0})
    recent: deque[str | None] = deque(maxlen=spec.collapse_patience)
    mark = [time.perf_counter()]

    def on_log(s: Any, metrics: dict[str, Any]) -> None:
        recent.append(metrics.get("collapse"))

    def on_checkpoint(s: Any, metrics: dict[str, Any], epoch_end: bool) -> None:
        if not epoch_end:
            return
        now = time.perf_counter()
        timers["train"] += now - mark[0]
        collapsed = agree(spec.stop_on_collapse and len(recent) == recent.maxlen and all(recent))
        due = s.epoch % spec.budget.report_every == 0 and spec.evaluation.intermediate
        if not (collapsed or s.done or due):
            mark[0] = time.perf_counter()
            return
        final = s.done and not collapsed
        out: dict[str, Any] = {
            "epoch": s.epoch, "step": s.step, "loss": metrics.get("loss"),
            "teacher_entropy": metrics.get("teacher_entropy"), "entropy_gap": metrics.get("entropy_gap"),
            "collapse": next((c for c in reversed(recent) if c), "") if collapsed else "",
            "collapsed": int(collapsed), "final": int(final),
        }
        if evaluator is not None:
            t = time.perf_counter()
            out.update(evaluator.evaluate(s.teacher.backbone, final))
            timers["probe"] += time.perf_counter() - t
        t = time.perf_counter()
        out.update(train_seconds=timers["train"], probe_seconds=timers["probe"], checkpoint_seconds=timers["checkpoint"])
        with tempfile.TemporaryDirectory() as tmp:
            ckpt_dir = None
            if rank == 0:
                save_checkpoint(s, tmp)
                ckpt_dir = tmp
            report(out, ckpt_dir)
        timers["checkpoint"] += time.perf_counter() - t
        mark[0] = time.perf_counter()
        if collapsed:
            raise _Collapsed()

    try:
        fit(state, epoch_batches, LoopHooks(on_log, on_checkpoint), world_size=world)
    except _Collapsed:
        return "collapsed"
    return "finished"


def _non_finite(e: BaseException) -> RuntimeError:
    return RuntimeError(f"non-finite loss: {e}")


def _run_in_process(cfg: Config, spec: SearchSpec, ctx: dict[str, Any]) -> None:
    """One-worker trial: pretraining in this trial process, reports straight to Tune.

    It reads the same Ray Data stream as `python -m raydino.pretrain` (shard order reshuffled
    every epoch, crops made by Ray Data tasks, seeded shuffle buffer), iterated here instead of
    split across Train workers.  Its data tasks run on this node inside the trial's own CPU
    reservation (`build_pretrain_dataset(in_process=True)`): concurrent trials may hold every CPU.
    """
    import logging

    import ray.tune
    import torch

    from .checkpoint import load_checkpoint, restore_state
    from .engine import NonFiniteLossError, build_train_state
    from .pretrain import quiet_ray_data
    from .streaming import build_pretrain_dataset, worker_epoch_batches

    t0 = time.perf_counter()
    torch.set_num_threads(cfg.train.threads or max(1, int(cfg.run.cpus_per_worker)))
    device = torch.device("cuda" if cfg.run.gpus_per_worker > 0 and torch.cuda.is_available() else "cpu")
    state = build_train_state(cfg, ctx["steps_per_epoch"], 1, device)
    resumed = ray.tune.get_checkpoint()
    if resumed:
        with resumed.as_directory() as d:
            restore_state(state, load_checkpoint(d), restore_rng=False)
    shards = open_dataset(ctx["data_uri"], cfg)
    # Built and run in the trial process: its progress bars and start/finish lines, every epoch of
    # every trial, would flood the driver.
    quiet_ray_data()
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    stream = build_pretrain_dataset(cfg, shards, in_process=True).iterator()
    batches = worker_epoch_batches(cfg, stream, device, seed=cfg.train.seed, rank=0,
                                   epoch_rows=ctx["steps_per_epoch"] * cfg.train.batch_size)
    timers = state.extra.setdefault("tune_timers", {"train": 0.0, "probe": 0.0, "checkpoint": 0.0})
    timers["train"] += time.perf_counter() - t0
    t = time.perf_counter()
    evaluator = TrialEvaluator(cfg, ctx)
    timers["probe"] += time.perf_counter() - t

    def report(metrics: dict[str, Any], ckpt_dir: str | None) -> None:
        ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None)

    try:
        train_and_report(state, spec, batches, report, evaluator)
    except NonFiniteLossError as e:
        raise _non_finite(e) from None


def _worker_loop(conf: dict[str, Any]) -> None:
    """Ray Train worker of a multi-worker trial: DDP DINO on the streamed crops, rank 0 evaluates."""
    import ray.train
    import torch
    import torch.distributed as dist

    from .engine import NonFiniteLossError
    from .pretrain import worker_seed, worker_state
    from .streaming import worker_epoch_batches

    cfg, ctx = build_config(conf["config"]), conf["ctx"]
    spec = SearchSpec.model_validate(ctx["spec"])
    t0 = time.perf_counter()
    state, rank, world, device, _ = worker_state(cfg, ctx["steps_per_epoch"])
    state.extra.setdefault("tune_timers", {"train": 0.0, "probe": 0.0, "checkpoint": 0.0})["train"] += time.perf_counter() - t0
    epoch_batches = worker_epoch_batches(cfg, ray.train.get_dataset_shard("train"), device,
                                         seed=worker_seed(cfg, rank, state.step), rank=rank,
                                         epoch_rows=ctx["steps_per_epoch"] * cfg.train.batch_size)

    evaluator = None
    if rank == 0:
        t = time.perf_counter()
        evaluator = TrialEvaluator(cfg, ctx)
        state.extra["tune_timers"]["probe"] += time.perf_counter() - t

    def report(metrics: dict[str, Any], ckpt_dir: str | None) -> None:
        ckpt = ray.train.Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"checkpoint_{state.step:08d}")

    def agree(flag: bool) -> bool:
        # Rank 0's collapse verdict for every rank: all must stop (and report) together.
        if world == 1:
            return bool(flag)
        t = torch.tensor([int(bool(flag))], device=device if device.type == "cuda" else "cpu")
        dist.broadcast(t, 0)
        return bool(t.item())

    try:
        train_and_report(state, spec, epoch_batches, report, evaluator, agree, rank, world)
    except NonFiniteLossError as e:
        # Re-raised as a plain RuntimeError: NonFiniteLossError(step, value) does not survive
        # pickling across Ray processes (it would arrive as a TypeError about its arguments).
        raise _non_finite(e) from None


def _run_with_trainer(cfg: Config, spec: SearchSpec, ctx: dict[str, Any], trial_id: str) -> None:
    """Multi-worker trial: a TorchTrainer inside the trial, rank 0's reports forwarded to Tune."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from .pretrain import quiet_ray_data
    from .streaming import build_pretrain_dataset, data_execution_options

    quiet_ray_data()  # the dataset is built here, in the trial process: its progress bars would flood the driver
    storage = RunStorage.from_dict(ctx["storage"])
    shards = open_dataset(ctx["data_uri"], cfg)
    gpus = cfg.run.gpus_per_worker
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"config": cfg.to_dict(), "ctx": ctx},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.run.workers, use_gpu=gpus > 0,
            resources_per_worker={"CPU": cfg.run.cpus_per_worker, **({"GPU": gpus} if gpus else {})},
        ),
        torch_config=TorchConfig(backend="nccl" if gpus > 0 else "gloo"),
        run_config=ray.train.RunConfig(
            # A name fixed by the trial id: a resumed trial resumes its Train run from its checkpoint.
            name=f"trial_{trial_id}",
            storage_path=f"{storage.train_storage_path}/{ctx['experiment']}/train",
            storage_filesystem=storage.filesystem if storage.is_remote else None,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            failure_config=ray.train.FailureConfig(max_failures=0, controller_failure_limit=spec.resources.max_start_attempts),
            callbacks=[TuneReportCallback()],
        ),
        datasets={"train": build_pretrain_dataset(cfg, shards)},
        dataset_config=ray.train.DataConfig(execution_options=data_execution_options(cfg)),
    )
    try:
        trainer.fit()
    except Exception as e:
        reason = next((ln.strip() for ln in str(e).splitlines() if "non-finite loss" in ln), None)
        if reason:  # one line for the results table instead of Train's whole worker traceback
            raise RuntimeError(reason[reason.index("non-finite loss"):]) from None
        raise


def trial_main(params: dict[str, Any], ctx: dict[str, Any]) -> None:
    """The Tune function trainable: build this trial's config, pretrain, probe, report."""
    import logging

    import ray.tune

    # One line per persisted checkpoint from every trial drowns the driver's progress lines.
    for name in ("ray.train._internal.storage", "ray.train.v2._internal.execution.storage"):
        logging.getLogger(name).setLevel(logging.WARNING)
    spec = SearchSpec.model_validate(ctx["spec"])
    cfg = search.trial_config(spec, params, ctx["steps_per_epoch"])
    trial_id = ray.tune.get_context().get_trial_id()
    cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"name": f"{spec.name}-{trial_id}"})})
    if cfg.run.workers == 1:
        _run_in_process(cfg, spec, ctx)
    else:
        _run_with_trainer(cfg, spec, ctx, trial_id)


# ---------------------------------------------------------------- the driver


def trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


_ACTIVE: dict[str, Any] = {}  # the progress callback Tune actually runs (it may be unpickled on resume)


class SearchProgress(Callback):  # module level: pickled by reference, so `_ACTIVE` is this module's
    """Driver-side progress: trials ended by status, best AUROC so far, elapsed and ETA; trial wall times."""

    def __init__(self, total_trials: int, budget_epochs: int, time_budget_s: float | None) -> None:
        self.total, self.epochs, self.budget = total_trials, budget_epochs, time_budget_s
        self.started: dict[str, float] = {}
        self.wall: dict[str, float] = {}
        self.last: dict[str, dict[str, Any]] = {}

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

    def _ended(self, trial: Any, trials: list) -> None:
        if trial.trial_id in self.started:
            self.wall[trial.trial_id] = time.monotonic() - self.started[trial.trial_id]
        self._print(trials)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended(trial, trials)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended(trial, trials)

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
        print(f"[raydino.tune] {len(ended)}/{self.total} trials ended, {running} running{best}; "
              f"elapsed {format_duration(elapsed)}, ETA {format_duration(eta)}", flush=True)


def _tune_space(plain: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """search.py's plain distributions → Ray Tune's search-space objects."""
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


def trial_cpus(spec: SearchSpec, base: Config) -> float:
    """Logical CPUs one trial occupies: its workers, plus Ray Data's augmentation actors and one read
    token for a multi-worker trial (without that token the read tasks wait forever)."""
    r = spec.resources
    if r.workers == 1:
        return r.cpus_per_worker
    return r.workers * r.cpus_per_worker + (base.data.augment_concurrency or 1) * base.data.augment_cpus + 1


def start_local_ray(num_cpus: int, env_vars: dict[str, str] | None = None) -> None:
    """A local Ray with the dashboard on, its State API pinned for every process of this cluster.

    Ray Train frees a stopped trial's worker placement group from a cleaner actor that asks the
    State API; with no address it scans the machine for Ray instances and fails when it finds
    two (parallel test runs, a second search), and the leaked group starves later trials.
    `RAY_API_SERVER_ADDRESS` (inherited by the raylet and its workers) names this dashboard.
    """
    import socket

    import ray

    with socket.socket() as s:  # a free port for the dashboard, chosen before Ray starts
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    api = f"http://127.0.0.1:{port}"
    env = {**(env_vars or {}), "RAY_API_SERVER_ADDRESS": api}
    before = os.environ.get("RAY_API_SERVER_ADDRESS")
    os.environ["RAY_API_SERVER_ADDRESS"] = api  # inherited by the raylet Ray starts now
    try:
        # num_workers_soft_limit: Ray keeps only as many idle worker processes as CPUs; when trials hold
        # every CPU, the data tasks' workers were killed between epochs and every epoch paid ~4 s of
        # torch imports to start new ones (measured on 2 cores: smoke search 72 s -> 31-42 s with 8).
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
                 runtime_env={"env_vars": env}, log_to_driver=True,
                 _system_config={"num_workers_soft_limit": max(8, 2 * num_cpus)})
    finally:
        # Not left behind in this process: a later Ray started here must not point at this dashboard.
        if before is None:
            os.environ.pop("RAY_API_SERVER_ADDRESS", None)
        else:
            os.environ["RAY_API_SERVER_ADDRESS"] = before


def init_ray(spec: SearchSpec, base: Config, concurrency: int) -> None:
    """Join RAY_ADDRESS's cluster, or start a local Ray (dashboard on: the hang guard)."""
    import ray

    if ray.is_initialized():
        return
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_") and k not in _SECRET_ENV}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env={"env_vars": env} if env else None, log_to_driver=True)
        return
    start_local_ray(max(os.cpu_count() or 1, int(math.ceil(trial_cpus(spec, base) * concurrency))), env)


def _concurrency(spec: SearchSpec, base: Config) -> int:
    """max_concurrent_trials, or what the cluster holds now (GPUs first: they are what trials wait for)."""
    import ray

    from .pretrain import autoscaled_fit_problems, autoscaler_node_groups, autoscaler_present

    if spec.max_concurrent_trials:
        return spec.max_concurrent_trials
    r = spec.resources
    have = ray.cluster_resources()
    if r.gpus_per_worker > 0:
        fit = int(have.get("GPU", 0) // (r.workers * r.gpus_per_worker))
    else:
        fit = int(have.get("CPU", 0) // trial_cpus(spec, base))
    if fit < 1:
        if autoscaler_present():
            groups = autoscaler_node_groups()
            one_trial = base.model_copy(update={"run": base.run.model_copy(update={
                "workers": r.workers, "cpus_per_worker": r.cpus_per_worker, "gpus_per_worker": r.gpus_per_worker})})
            problems = autoscaled_fit_problems(one_trial, groups) if groups else []
            if problems:
                raise ConfigError("resources: the cluster's autoscaler can never add nodes for one trial:\n  "
                                  + "\n  ".join(problems))
            return 1
        raise ConfigError(f"resources: a trial needs {r.workers} worker(s) × {r.cpus_per_worker:g} CPU × {r.gpus_per_worker:g} GPU "
                          f"but the cluster has {have.get('CPU', 0):g} CPU and {have.get('GPU', 0):g} GPU and no autoscaler")
    return fit


def prepare(spec: SearchSpec, cache: Path) -> tuple[Config, dict[str, Any]]:
    """Validate everything and build the trial context before Ray starts (bad input fails in seconds)."""
    base = search.check_space(spec)
    data_uri = base.data.uri or ensure_dataset(base, cache)
    shards = open_dataset(data_uri, base)
    from .data.loader import pretrain_rows

    rows = pretrain_rows(shards)
    spe = base.train.steps_per_epoch or rows // (base.train.batch_size * spec.resources.workers)
    if spe < 1:
        raise ConfigError(f"data has {rows} training rows, fewer than one global batch (train.batch_size={base.train.batch_size} "
                          f"× resources.workers={spec.resources.workers})")
    probe_uri = spec.evaluation.data or base.probe.data or (data_uri if base.data.uri is None else None)
    if probe_uri is None:
        raise ConfigError("evaluation.data: labelled data for the probe is required when data.uri is set "
                          "(labelled shards or a RETFound tree; the synthetic set brings its own labels)")
    if "://" not in probe_uri:
        probe_uri = str(Path(probe_uri).resolve())
    if "://" not in data_uri:
        data_uri = str(Path(data_uri).resolve())
    storage = RunStorage.open(spec.storage, base.data.s3_endpoint, base.data.s3_region)
    ctx = {"spec": spec.model_dump(mode="json"), "data_uri": data_uri, "probe_uri": probe_uri,
           "probe_dataset": spec.evaluation.dataset or ("synthetic" if probe_uri == data_uri else None),
           "steps_per_epoch": spe, "storage": storage.to_dict(spec.name), "experiment": spec.name}
    return base, ctx


def run_search(spec: SearchSpec, resume: bool = False, cache: Path = DEFAULT_CACHE) -> dict[str, Any]:
    """Run (or resume) the search and write its report; returns the summary dict (also summary.json)."""
    import ray.tune as tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    _ACTIVE.clear()
    base, ctx = prepare(spec, cache)
    storage = RunStorage.open(spec.storage, base.data.s3_endpoint, base.data.s3_region)
    exp_path = storage.location.join(spec.name)
    fs = storage.filesystem if storage.is_remote else None
    exists = storage.exists(spec.name)
    if resume and not exists:
        raise ConfigError(f"--resume: no experiment {spec.name!r} in {storage.uri}")
    if not resume and exists:
        raise ConfigError(f"experiment {storage.location.uri_of(spec.name)} exists: add --resume to continue it, or --set name=NEW")
    storage.check_writable(spec.name)

    budget_epochs = spec.budget.epochs or math.ceil(spec.budget.steps / ctx["steps_per_epoch"])
    init_ray(spec, base, spec.max_concurrent_trials or 1)
    from .pretrain import quiet_ray_data

    quiet_ray_data()
    concurrency = _concurrency(spec, base)
    r = spec.resources
    # One-worker trials train in the trial actor; a multi-worker trial's actor only drives its
    # TorchTrainer, whose workers reserve their own resources (Tune refuses an empty request).
    resources = {"cpu": r.cpus_per_worker, "gpu": r.gpus_per_worker} if r.workers == 1 else {"cpu": 0.01}
    trainable = tune.with_resources(tune.with_parameters(trial_main, ctx=ctx), resources)
    total = _total_trials(spec)
    print(f"[raydino.tune] {'resuming' if resume else 'starting'} {spec.name}: {total} trials of {budget_epochs} epochs "
          f"({ctx['steps_per_epoch']} steps each), {concurrency} at a time, {r.workers} worker(s) per trial; "
          f"experiment {storage.location.uri_of(spec.name)}", flush=True)

    # Tune warns whenever num_to_keep=1 forces a state snapshot; expected here (one checkpoint per report).
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    t0 = time.monotonic()
    if resume:
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_errored=True, storage_filesystem=fs)
    else:
        if spec.searcher.kind == "optuna":
            import optuna
            from ray.tune.search.optuna import OptunaSearch

            sampler = optuna.samplers.TPESampler(seed=spec.searcher.seed, **({"n_startup_trials": spec.searcher.n_startup_trials} if spec.searcher.n_startup_trials else {}))
            searcher = OptunaSearch(sampler=sampler)
        else:
            from ray.tune.search.basic_variant import BasicVariantGenerator

            # Given explicitly, Tune ignores max_concurrent_trials: the generator must carry the limit.
            searcher = BasicVariantGenerator(random_state=spec.searcher.seed, max_concurrent=concurrency)
        scheduler = (ASHAScheduler(time_attr="epoch", max_t=budget_epochs, grace_period=spec.grace_period,
                                   reduction_factor=spec.scheduler.reduction_factor)
                     if spec.scheduler.kind == "asha" else FIFOScheduler())
        tuner = tune.Tuner(
            trainable,
            param_space=_tune_space(spec.plain_space()),
            tune_config=tune.TuneConfig(
                metric=METRIC, mode="max", search_alg=searcher, scheduler=scheduler, num_samples=spec.num_samples,
                max_concurrent_trials=concurrency, time_budget_s=spec.time_budget_s, reuse_actors=r.workers == 1,
                trial_name_creator=trial_dirname, trial_dirname_creator=trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=spec.name, storage_path=storage.train_storage_path, storage_filesystem=fs,
                failure_config=tune.FailureConfig(max_failures=0),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                callbacks=[SearchProgress(total, budget_epochs, spec.time_budget_s)], verbose=0,
            ),
        )
    grid = tuner.fit()
    seconds = time.monotonic() - t0
    progress = _ACTIVE.get("progress")
    trials = []
    for result in grid:
        df = result.metrics_dataframe
        history = [] if df is None else [{k: v for k, v in row.items() if not str(k).startswith("config/")} for row in df.to_dict("records")]
        trials.append({"trial_id": Path(str(result.path)).name.removeprefix("trial_"), "params": dict(result.config or {}),
                       "history": history, "error": str(result.error) if result.error else None})
    # A driver killed after Tune made a trial's folder but before it saved the experiment state leaves that
    # trial unknown to the resumed search (which samples another in its place): name such folders.
    known = {f"trial_{t['trial_id']}" for t in trials}
    orphans = sorted(f for f in storage.folders(spec.name) if f.startswith("trial_") and f not in known)
    return write_report(spec, storage, trials, ctx["steps_per_epoch"], budget_epochs, seconds,
                        progress.wall if progress else {}, hit_budget=bool(spec.time_budget_s and seconds >= spec.time_budget_s),
                        orphans=orphans)


def write_report(spec: SearchSpec, storage: RunStorage, trials: list[dict[str, Any]], steps_per_epoch: int,
                 budget_epochs: int, seconds: float, wall: dict[str, float], hit_budget: bool = False,
                 orphans: list[str] | None = None) -> dict[str, Any]:
    """Tables, best config, plots and summary into the experiment directory (local or s3://)."""
    keys = list(spec.space)
    rows = search.results_table(trials, keys, budget_epochs, wall)
    best = search.best_row(rows)
    walls = [r for r in rows if r["wall_seconds"] and r["train_seconds"] is not None]
    spent = sum(r["wall_seconds"] for r in walls)
    overhead = (spent - sum(r["train_seconds"] + (r["probe_seconds"] or 0) for r in walls)) / spent if spent else None
    paper = search.paper_report(rows)
    extra = {"search time": format_duration(seconds) + (" (stopped by time_budget_s)" if hit_budget else ""),
             "trial overhead (wall − pretraining − probe, over trials timed this session)": f"{overhead:.1%}" if overhead is not None else "–"}
    if orphans:
        extra["trial folders not in these results"] = (
            f"{', '.join(orphans)}: started by a driver that was killed before Tune recorded them; the resumed "
            "search ran other trials in their place. They can be deleted.")
    files: dict[str, bytes] = {
        "results.csv": search.table_bytes(rows, "csv"), "results.parquet": search.table_bytes(rows, "parquet"),
        "metrics.csv": search.table_bytes(search.history_table(trials), "csv"),
        "metrics.parquet": search.table_bytes(search.history_table(trials), "parquet"),
    }
    for t in trials:
        try:
            files[f"trials/{search.safe_name(t['trial_id'])}.yaml"] = search.trial_config(spec, t["params"], steps_per_epoch).to_yaml().encode()
        except ConfigError as e:
            files[f"trials/{search.safe_name(t['trial_id'])}.yaml"] = f"# invalid config: {e}\n".encode()
    if best:
        params = next(t["params"] for t in trials if t["trial_id"] == best["trial_id"])
        files["best.yaml"] = search.best_config_yaml(spec, params, steps_per_epoch, best).encode()
    with tempfile.TemporaryDirectory() as tmp:
        title = f"{spec.name}: val AUROC by trial"
        for made in (search.plot_auroc_vs_params(rows, keys, Path(tmp) / "auroc_vs_params.png", title),
                     search.plot_scale_heatmap(rows, Path(tmp) / "scale_heatmap.png", spec.name) if all(k in keys for k in search.HEATMAP_KEYS) else None):
            if made:
                files[f"plots/{made.name}"] = made.read_bytes()
    summary = {"name": spec.name, "experiment": storage.location.uri_of(spec.name), "seconds": seconds, "hit_time_budget": hit_budget,
               "trial_overhead_fraction": overhead, "counts": {s: sum(r["status"] == s for r in rows) for s in search.STATUSES},
               "orphaned_trial_folders": orphans or [],
               "best": best, "rows": rows}
    if paper:
        summary["presets"] = {"table": paper["table"], "paired": paper["paired"]}
        files["presets.md"] = paper["table_md"].encode()
    files["summary.md"] = search.summary_markdown(spec, rows, best, keys, extra, paper).encode()
    files["summary.json"] = json.dumps(summary, indent=2, default=str).encode()
    for rel, data in files.items():
        st.write_bytes(storage.location, storage.location.join(spec.name, rel), data)
    counts = ", ".join(f"{n} {s}" for s, n in summary["counts"].items())
    where = storage.location.uri_of(spec.name)
    print(f"[raydino.tune] done in {format_duration(seconds)}: {len(rows)} trials ({counts}); trial overhead "
          f"{extra['trial overhead (wall − pretraining − probe, over trials timed this session)']}", flush=True)
    if best:
        print(f"[raydino.tune] best {best['trial_id']}: val AUROC {best[METRIC]:.3f}, test AUROC "
              f"{search._fmt(best.get('test_auroc'))}; config {where}/best.yaml", flush=True)
    print(f"[raydino.tune] results {where}/results.csv, summary {where}/summary.md", flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        sets = list(args.set) + ([f"storage={args.storage}"] if args.storage else [])
        spec = search.load_spec(args.spec, sets)
        if args.print_spec:
            print(json.dumps(spec.model_dump(mode="json"), indent=2))
            print(search.check_space(spec).to_yaml())
            return 0
        run_search(spec, resume=args.resume, cache=Path(args.cache))
    except ConfigError as e:
        print(f"raydino.tune: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    # Run the importable module's main, not __main__'s copy: cloudpickle sends functions and
    # classes from __main__ by value, which would give trials and callbacks private globals.
    from raydino.tune import main as _main

    sys.exit(_main())
