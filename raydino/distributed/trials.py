"""A search trial on Ray: the Tune function trainable and the Ray Train loop of a multi-worker trial.

A one-worker trial trains in the trial process on the Ray Data stream and reports straight to Tune;
a multi-worker trial runs a `TorchTrainer` inside the trial and forwards rank 0's reports with
`TuneReportCallback`.  The trial's work itself (loop, probes, reports) is `raydino.search.trial`.
"""

from __future__ import annotations

import time
from typing import Any

from raydino.config import Config, build_config
from raydino.distributed.cluster import quiet_ray_data
from raydino.distributed.trainer import torch_trainer, worker_seed, worker_state
from raydino.runs.storage import RunStorage, open_dataset
from raydino.search.spec import SearchSpec, trial_config, trial_data
from raydino.search.trial import TrialEvaluator, train_and_report


def _run_in_process(cfg: Config, spec: SearchSpec, ctx: dict[str, Any]) -> None:
    """One-worker trial: pretraining in this trial process, reports straight to Tune.

    It reads the same Ray Data stream as `python -m raydino.pretrain` (shard order reshuffled
    every epoch, crops made by Ray Data tasks, seeded shuffle buffer), iterated here instead of
    split across Train workers.  Its data tasks run on this node inside the trial's own CPU
    reservation (`build_pretrain_dataset(in_process=True)`): concurrent trials may hold every CPU.
    """
    import ray.tune
    import torch

    from raydino.core.checkpoint import load_checkpoint, restore_state
    from raydino.core.step import build_train_state
    from raydino.distributed.streaming import build_pretrain_dataset, worker_epoch_batches

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
    stream = build_pretrain_dataset(cfg, shards, in_process=True).iterator()
    batches = worker_epoch_batches(cfg, stream, device, seed=cfg.train.seed, rank=0, epoch_rows=ctx["steps_per_epoch"] * cfg.train.batch_size)
    timers = state.extra.setdefault("tune_timers", {"train": 0.0, "probe": 0.0, "checkpoint": 0.0})
    timers["train"] += time.perf_counter() - t0
    t = time.perf_counter()
    evaluator = TrialEvaluator(cfg, ctx)
    timers["probe"] += time.perf_counter() - t

    def report(metrics: dict[str, Any], ckpt_dir: str | None) -> None:
        ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None)

    train_and_report(state, spec, batches, report, evaluator)


def _worker_loop(conf: dict[str, Any]) -> None:
    """Ray Train worker of a multi-worker trial: DDP DINO on the streamed crops, rank 0 evaluates."""
    import ray.train
    import torch
    import torch.distributed as dist

    from raydino.distributed.streaming import worker_epoch_batches

    cfg, ctx = build_config(conf["config"]), conf["ctx"]
    spec = SearchSpec.model_validate(ctx["spec"])
    t0 = time.perf_counter()
    state, rank, world, device, _ = worker_state(cfg, ctx["steps_per_epoch"])
    state.extra.setdefault("tune_timers", {"train": 0.0, "probe": 0.0, "checkpoint": 0.0})["train"] += time.perf_counter() - t0
    epoch_batches = worker_epoch_batches(
        cfg,
        ray.train.get_dataset_shard("train"),
        device,
        seed=worker_seed(cfg, rank, state.step),
        rank=rank,
        epoch_rows=ctx["steps_per_epoch"] * cfg.train.batch_size,
    )

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

    train_and_report(state, spec, epoch_batches, report, evaluator, agree, rank, world)


def _run_with_trainer(cfg: Config, spec: SearchSpec, ctx: dict[str, Any], trial_id: str) -> None:
    """Multi-worker trial: a TorchTrainer inside the trial, rank 0's reports forwarded to Tune."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from raydino.distributed.streaming import build_pretrain_dataset

    quiet_ray_data()  # the dataset is built here, in the trial process: its progress bars would flood the driver
    storage = RunStorage.from_dict(ctx["storage"])
    shards = open_dataset(ctx["data_uri"], cfg)
    trainer = torch_trainer(
        _worker_loop,
        {"config": cfg.to_dict(), "ctx": ctx},
        cfg.run,
        # A name fixed by the trial id: a resumed trial resumes its Train run from its checkpoint.
        name=f"trial_{trial_id}",
        storage_path=f"{storage.train_storage_path}/{ctx['experiment']}/train",
        storage_filesystem=storage.filesystem if storage.is_remote else None,
        keep_checkpoints=1,
        max_failures=0,
        start_attempts=spec.resources.max_start_attempts,
        dataset=build_pretrain_dataset(cfg, shards),
        data_cfg=cfg,
        callbacks=[TuneReportCallback()],
    )
    trainer.fit()


def trial_main(params: dict[str, Any], ctx: dict[str, Any]) -> None:
    """The Tune function trainable: build this trial's config, pretrain, probe, report."""
    import logging

    import ray.tune

    # One line per persisted checkpoint from every trial drowns the driver's progress lines.
    for name in ("ray.train._internal.storage", "ray.train.v2._internal.execution.storage"):
        logging.getLogger(name).setLevel(logging.WARNING)
    spec = SearchSpec.model_validate(ctx["spec"])
    cfg = trial_config(spec, params, ctx["steps_per_epoch"])
    ctx = trial_data(ctx, params)  # a searched lesion size or count: this trial's own synthetic set
    trial_id = ray.tune.get_context().get_trial_id()
    cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"name": f"{spec.name}-{trial_id}"})})
    if cfg.run.workers == 1:
        _run_in_process(cfg, spec, ctx)
    else:
        _run_with_trainer(cfg, spec, ctx, trial_id)
