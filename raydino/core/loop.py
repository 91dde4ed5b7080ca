"""The training loop, free of Ray: epochs of batches → `train_step`, with logging and checkpoint hooks.

The pretraining recipe runs it inside each Ray Train worker (hooks call `ray.train.report`); a
one-worker Tune trial runs it in the trial process.  Reading order: `fit` is the whole loop.

The loop never makes the host wait for the device between log steps: it runs `train_step(...,
defer=True)`, reads the loss and statistics (one device-to-host copy) and checks the loss's
finiteness (`check_finite`) only at log steps and before every checkpoint hook.  A non-finite loss
is never applied (the step skips it on the device) and stops the loop at the latest at the next log
step, with the number of the step where it happened; no checkpoint hook runs after it.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from raydino.core.graphstep import GraphCaptureError, GraphedStep
from raydino.core.loss import CollapseStats
from raydino.core.model import log_uniform_entropy
from raydino.core.step import TrainState, check_finite, materialize, train_step

Batch = Sequence[torch.Tensor]  # crops, globals first, each [B, 3, S, S] uint8


@dataclass
class LoopHooks:
    """Called by `fit`.  Every hook runs on every rank (Ray's report is a barrier)."""

    on_log: Callable[[TrainState, dict[str, Any]], None] = lambda state, metrics: None
    on_checkpoint: Callable[[TrainState, dict[str, Any], bool], None] = lambda state, metrics, epoch_end: None


@dataclass
class LoopSummary:
    steps: int
    epochs: int
    first_loss: float | None = None
    last_loss: float | None = None
    collapse: str | None = None
    images: int = 0
    seconds: float = 0.0
    data_wait_seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)


def epoch_end_step(state: TrainState) -> int:
    """The step that ends the epoch `state` is in (the schedule's last step for a short last epoch)."""
    return min((state.epoch + 1) * state.schedules.steps_per_epoch, state.schedules.total_steps)


def checkpoint_follows(state: TrainState) -> bool:
    """Whether `fit` calls `on_checkpoint` after the step just trained (every `checkpoint_every` steps
    and at each epoch's end).  A hook that would save a checkpoint of its own at this step (the
    pretraining recipe's just-in-time save on a preemption notice) asks this first: a second save
    under the same step's name would clash with the first."""
    return state.step % state.cfg.train.checkpoint_every == 0 or state.step == epoch_end_step(state)


def fit(
    state: TrainState,
    epoch_batches: Callable[[int], Iterable[Batch]],
    hooks: LoopHooks | None = None,
    world_size: int = 1,
) -> LoopSummary:
    """Train until the schedule's last step; resumes from `state.step` / `state.epoch` as restored.

    `epoch_batches(epoch)` returns that epoch's batches; the loop stops an epoch after
    `steps_per_epoch` steps so every rank takes the same number of steps (and of reports).
    """
    hooks = hooks or LoopHooks()
    cfg = state.cfg
    spe = state.schedules.steps_per_epoch
    summary = LoopSummary(steps=state.step, epochs=state.epoch)
    max_entropy = log_uniform_entropy(cfg.model.out_dim)
    window: dict[str, float] = {"images": 0, "wait": 0.0, "t0": time.perf_counter()}
    t_start = time.perf_counter()
    first_loss = None  # a 0-d tensor until the first log step reads it
    state.student.train()
    state.teacher.train()
    # train.cuda_graph: the step as a CUDA graph once the last-layer freeze is over; False after a failed capture
    graphed: GraphedStep | bool | None = None

    while not state.done:
        end_step = epoch_end_step(state)
        # After a mid-epoch resume the epoch's first batches were trained before the checkpoint: pass
        # over them (the epoch's order is seeded by seed, epoch and rank) and train its tail, instead of
        # training its head twice and never its tail.
        skip = max(0, state.step - state.epoch * spe)
        t_wait = time.perf_counter()
        for batch in epoch_batches(state.epoch):
            if skip:
                skip -= 1
                continue
            if state.step >= end_step:
                # Drain instead of break: a Ray Data streaming split expects every rank to finish
                # its epoch (this happens when rows don't divide evenly into global batches).
                continue
            crops = [c.to(state.device, non_blocking=True) for c in batch]
            wait = time.perf_counter() - t_wait
            if graphed is None and cfg.train.cuda_graph and state.step >= state.schedules.freeze_last_layer_steps:
                graphed = GraphedStep(state, crops, capture=state.device.type == "cuda")  # raises naming what stands in its way
            # device tensors: no host sync here
            try:
                metrics = graphed(crops) if graphed else train_step(state, crops, defer=True)
            except GraphCaptureError as e:
                # Nothing of the step ran: train it, and the rest of the run, eagerly rather than stop.
                warnings.warn(f"{e}; this run goes on with eager steps (train.cuda_graph has no effect)", RuntimeWarning, stacklevel=1)
                graphed = False
                metrics = train_step(state, crops, defer=True)
            n_images = crops[0].shape[0] * world_size
            window["images"] += n_images
            window["wait"] += wait
            summary.images += n_images
            summary.data_wait_seconds += wait
            if first_loss is None:
                first_loss = metrics["loss"]
            log_step = state.step % cfg.train.log_every == 0 or state.step == end_step
            checkpoint_step = state.step % cfg.train.checkpoint_every == 0 and state.step < end_step
            if log_step or checkpoint_step:
                check_finite(state)  # raises NonFiniteLossError naming the first non-finite step
                metrics = materialize(metrics)
                if summary.first_loss is None:
                    summary.first_loss = float(first_loss)
                summary.last_loss = metrics["loss"]

            if log_step:
                elapsed = time.perf_counter() - window["t0"]
                nan = float("nan")
                stats = CollapseStats(metrics.get("teacher_entropy", nan), metrics.get("teacher_marginal_entropy", nan), max_entropy)
                metrics.update(
                    step=state.step,
                    epoch=state.epoch,
                    images_per_s=window["images"] / max(elapsed, 1e-9),
                    data_wait_fraction=window["wait"] / max(elapsed, 1e-9),
                    max_entropy=max_entropy,
                    collapse=stats.collapse,
                )
                summary.history.append(dict(metrics))
                hooks.on_log(state, metrics)
                window = {"images": 0, "wait": 0.0, "t0": time.perf_counter()}
            if checkpoint_step:
                hooks.on_checkpoint(state, {"loss": metrics["loss"], "step": state.step, "epoch": state.epoch}, False)
            t_wait = time.perf_counter()
        if state.step < end_step:
            raise RuntimeError(
                f"epoch {state.epoch} ended after step {state.step} but {end_step} was planned: the data "
                f"stream gave fewer batches than steps_per_epoch={spe} (too few rows for the global batch?)"
            )
        state.epoch += 1
        last = summary.history[-1] if summary.history else {}
        hooks.on_checkpoint(state, {"loss": summary.last_loss, "step": state.step, "epoch": state.epoch, **_scalars(last)}, True)

    summary.steps, summary.epochs = state.step, state.epoch
    summary.seconds = time.perf_counter() - t_start
    # Collapse is judged on the end of training: early DINO steps pass through near-uniform outputs.
    tail = summary.history[-3:]
    if tail and all(h.get("collapse") for h in tail):
        summary.collapse = tail[-1]["collapse"]
    return summary


def _scalars(d: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in d.items() if isinstance(v, (int, float)) and k not in ("step", "epoch")}
