"""The TorchTrainer factory every recipe uses, and what each Ray Train worker does first.

One place decides how raydino's config becomes Ray Train's: workers and their CPUs/GPUs, gloo on CPU
and NCCL on GPU, checkpoints kept, failure budgets, where runs are stored, the dataset's execution
options.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from raydino.config import Config, RunConfig
from raydino.distributed.capacity import START_TIMEOUT_ENV
from raydino.distributed.cluster import hide_report_dumps

# Ray Train 2.60's controller takes at most one report per worker from each poll of its workers, and polls every
# RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (Ray's default 2 s).  A run that reports more often than that (each
# checkpoint and epoch end) built a queue: the smoke run with a checkpoint every 2 steps had its checkpoints
# registered up to 16 s after training ended, the driver waited for them, and a restart after a lost node
# resumed from an older checkpoint than the newest written.  At 0.5 s that run ends 2.7 s after its last step
# (71 s instead of 93 s, 2 cores).  A poll is one small actor call per worker; one that takes longer than the
# interval carries over to the next (Ray declares a worker dead only after RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S,
# 10 min), so a busy worker is not failed sooner.  A value the user exported wins.
TRAIN_POLL_ENV, TRAIN_POLL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"


def torch_trainer(
    loop: Callable[[dict[str, Any]], None],
    loop_config: dict[str, Any],
    run: RunConfig,
    *,
    name: str,
    storage_path: str,
    storage_filesystem: Any = None,
    keep_checkpoints: int | None = None,
    max_failures: int = 0,
    max_preemptions: int = -1,
    start_attempts: int = -1,
    start_timeout_s: float | None = None,
    label_selector: dict[str, str] | None = None,
    dataset: Any = None,
    data_cfg: Config | None = None,
    callbacks: Sequence[Any] = (),
) -> Any:
    """A `TorchTrainer` running `loop(loop_config)` on `run.workers` workers of `run.cpus_per_worker` CPU
    and `run.gpus_per_worker` GPU each (gloo on CPU, NCCL on GPU).

    `max_failures` counts worker and node failures, `max_preemptions` (-1: no limit) spot reclaims that Ray
    saw announced (a node drained for preemption), kept apart so that preemptions never use up the budget
    for real failures; `start_attempts` is Ray Train's `controller_failure_limit` (worker-group start
    timeouts over the run; -1: no limit) and `start_timeout_s` the length of one (None: Ray's 60 s);
    `dataset` becomes the "train" dataset, with `data_cfg`'s execution options (Train replaces a
    dataset's own, which would drop `data.node_labels`).
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from raydino.distributed.streaming import data_execution_options

    gpus = run.gpus_per_worker
    os.environ.setdefault(TRAIN_POLL_ENV, TRAIN_POLL_S)  # handed to the controller like the start timeout below
    if start_timeout_s is not None:
        # Read by the driver when the run starts and handed to Train's controller (Ray's ENV_VARS_TO_PROPAGATE).
        os.environ[START_TIMEOUT_ENV] = f"{start_timeout_s:g}"
    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=run.workers,
            use_gpu=gpus > 0,
            resources_per_worker={"CPU": run.cpus_per_worker, **({"GPU": gpus} if gpus else {})},
            label_selector=label_selector,
        ),
        torch_config=TorchConfig(backend="nccl" if gpus > 0 else "gloo"),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep_checkpoints),
            failure_config=ray.train.FailureConfig(
                max_failures=max_failures, max_preemption_failures=max_preemptions, controller_failure_limit=start_attempts
            ),
            callbacks=list(callbacks) or None,
        ),
        datasets={"train": dataset} if dataset is not None else None,
        dataset_config=ray.train.DataConfig(execution_options=data_execution_options(data_cfg)) if data_cfg is not None else None,
    )


def worker_state(cfg: Config, steps_per_epoch: int) -> tuple[Any, int, int, Any, bool]:
    """On a Ray Train worker: the DINO state on this worker's device (student in DDP when there are
    several workers), restored from Ray Train's latest checkpoint if there is one.

    Returns (state, rank, world size, device, whether it was restored).
    """
    import ray.train
    import ray.train.torch
    import torch
    from torch.nn.parallel import DistributedDataParallel

    from raydino.core.checkpoint import load_checkpoint, restore_state
    from raydino.core.step import build_train_state

    hide_report_dumps()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.train.threads or max(1, int(cfg.run.cpus_per_worker)))
    device = ray.train.torch.get_device()
    state = build_train_state(cfg, steps_per_epoch, world, device)
    if world > 1:
        state.student = DistributedDataParallel(state.student, device_ids=[device] if device.type == "cuda" else None)
    resumed = ray.train.get_checkpoint()
    if resumed:
        with resumed.as_directory() as d:
            restore_state(state, load_checkpoint(d), restore_rng=False)
    return state, rank, world, device, resumed is not None


def worker_seed(cfg: Config, rank: int, step: int) -> int:
    """A seed of its own per rank and per (re)start, so a replaced worker does not replay its crops."""
    return cfg.train.seed * 1_000_003 + rank * 10_007 + step


def report_checkpoint(state: Any, metrics: dict[str, Any], rank: int, asynchronous: bool, before_report: Callable[[], None] | None = None) -> float:
    """On a Ray Train worker: rank 0 saves the DINO state and every rank reports it (a barrier); returns
    the seconds this worker was held back from training.

    `asynchronous`: Ray Train's ASYNC upload mode, the checkpoint travels to storage in the background
    and Ray deletes the local folder once it is uploaded; SYNC: report() returns after the upload.
    `before_report` runs on rank 0 after the save (e.g. uploading the logs beside the checkpoint).
    """
    import shutil
    import tempfile
    import time

    import ray.train

    from raydino.core.checkpoint import save_checkpoint

    mode = ray.train.CheckpointUploadMode.ASYNC if asynchronous else ray.train.CheckpointUploadMode.SYNC
    t0 = time.perf_counter()
    # Not a context manager: an ASYNC upload reads the folder after report() returns.
    tmp = tempfile.mkdtemp(prefix="raydino-ckpt-")
    ckpt = None
    if rank == 0:
        save_checkpoint(state, tmp)
        ckpt = ray.train.Checkpoint.from_directory(tmp)
        if before_report is not None:
            before_report()
    ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"checkpoint_{state.step:08d}", checkpoint_upload_mode=mode)
    if ckpt is None or not asynchronous:
        shutil.rmtree(tmp, ignore_errors=True)
    return time.perf_counter() - t0
