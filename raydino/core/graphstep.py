"""The whole DINO step captured once as a CUDA graph and replayed: one launch per step, not ~1,650.

The paper's batch-64 ViT-S/16 step is host-bound on an H200: the CPU takes as long to launch its
kernels as the GPU takes to run them (docs/performance.md).  torch.compile's CUDA graphs
(`train.compile_mode=reduce-overhead`) cover the networks only; `GraphedStep` captures everything a
deferred `train_step` does -- normalisation, teacher and student forwards, loss, the finite flag,
centre, backward, gradient all-reduce, clipping, weight decay, AdamW and the EMA -- and replays it.

What a graph needs, and how the step provides it:
  * nothing read on the host inside the step: the deferred step already has no sync;
  * every value that changes between steps in device memory, written before each replay: the lr,
    weight decay, teacher momentum and temperature (`fill_`, a launch each, no sync) and the step
    number (counted on the device);
  * static inputs: the crops are copied into the captured buffers;
  * static gradients: every trainable parameter's `.grad` is a view into one flat buffer, zeroed in
    the graph, all-reduced in one NCCL call when torch.distributed runs (DDP's hooks cannot be
    captured this way, so the unwrapped student is used and the all-reduce is done here, averaging as
    DDP does);
  * weight decay outside the fused AdamW (whose weight decay is a constant of the kernel): the
    decoupled decay p <- p (1 - lr wd) applied first, as AdamW does, gated by the finite flag;
  * the same set of updated tensors every step: the head's last layer is frozen in the first epoch by
    dropping its gradients, so a GraphedStep starts after that phase (`train_step` runs it).
The body is `GraphedStep.body`, which also runs without capture (on the CPU in the tests, where it
is checked against `train_step`).  Networks with BatchNorm are refused: their statistics would need
DDP's buffer broadcast.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from raydino.config import Config
from raydino.core.loss import world_size
from raydino.core.model import build_backbone, has_batchnorm
from raydino.core.step import (
    TrainState,
    autocast_dtype,
    clip_gradients,
    ema_update,
    finite_flag,
    multicrop_loss,
    record_nonfinite,
    step_unless_skipped,
    supports_deferred_check,
)


class GraphedStepError(ValueError):
    """The state cannot be stepped as a graph; the message says which setting and why."""


class GraphCaptureError(RuntimeError):
    """Recording the step failed (an op that a CUDA graph cannot hold).  Nothing of that call ran, the
    state's gradients and lr are handed back (`GraphedStep.release`), and eager steps can go on."""


def graph_config_problem(cfg: Config) -> str | None:
    """What the config cannot check itself and a recipe checks before any work: `train.cuda_graph` with a
    BatchNorm backbone (built on the meta device: shapes only, instant).  None when nothing is wrong."""
    if not cfg.train.cuda_graph:
        return None
    with torch.device("meta"):
        if has_batchnorm(build_backbone(cfg.model, img_size=cfg.augment.global_crop_size)):
            return f"train.cuda_graph=true: model.arch={cfg.model.arch!r} has BatchNorm, whose statistics DDP broadcasts outside the step"
    return None


def graph_step_problems(state: TrainState) -> list[str]:
    """Why `state` cannot run as a GraphedStep now (empty: it can)."""
    cfg = state.cfg
    problems = []
    if not supports_deferred_check(state):
        problems.append("needs the fused AdamW/SGD without a GradScaler (optim.fused=true, bf16 or fp32)")
    if cfg.optim.optimizer != "adamw":
        problems.append(f"optim.optimizer={cfg.optim.optimizer!r}: only adamw")
    if cfg.train.compile:
        problems.append("train.compile=true: compiled networks bring their own graphs")
    if cfg.model.head_use_bn:
        problems.append("model.head_use_bn=true: BatchNorm statistics are broadcast by DDP outside the step")
    elif has_batchnorm(state.student_module):
        problems.append(f"model.arch={cfg.model.arch!r} has BatchNorm, whose statistics DDP broadcasts outside the step")
    if state.step < state.schedules.freeze_last_layer_steps:
        problems.append(f"step {state.step} is inside the head's last-layer freeze (until step {state.schedules.freeze_last_layer_steps})")
    return problems


class GraphedStep:
    """`GraphedStep(state, crops)` -> call it with each batch's crops (same shapes) instead of
    `train_step(state, crops, defer=True)`; returns the same metrics (0-d device tensors, copies).

    `capture=False` runs the body eagerly (CPU, tests).  With capture, the first `warmup` calls train
    eagerly on a side stream (CUDA graphs' rule: allocator, cuBLAS workspaces and lazy state settle
    first), the next one captures the step and replays it, and every later call is a replay.  Every
    call is one training step on the crops it is given."""

    def __init__(self, state: TrainState, crops: list[torch.Tensor], capture: bool = True, warmup: int = 3) -> None:
        problems = graph_step_problems(state)
        if capture and warmup < 1:
            problems.append(f"warmup={warmup}: at least one eager step must come before the capture (lazy optimizer state)")
        if problems:
            raise GraphedStepError("the step cannot run as a CUDA graph: " + "; ".join(problems))
        self.state = state
        self.module = state.student_module  # DDP's hooks stay idle: DDP.forward is never called
        self.device = state.device
        self.dtype = autocast_dtype(state.cfg, state.device)
        self.world = world_size()
        self.crops = [c.detach().clone() for c in crops]

        # One flat gradient buffer; each .grad a view of it, so backward accumulates in place, in memory
        # the graph owns, and one all-reduce covers every gradient.
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.flat_grad = torch.zeros(sum(p.numel() for p in self.params), dtype=self.params[0].dtype, device=self.device)
        offset = 0
        for p in self.params:
            p.grad = self.flat_grad[offset : offset + p.numel()].view_as(p)
            offset += p.numel()

        def scalar(value: float) -> torch.Tensor:
            return torch.full((), float(value), dtype=torch.float32, device=self.device)

        self.lr, self.wd, self.momentum, self.teacher_temp = scalar(0), scalar(0), scalar(0), scalar(0)
        self.step_number = torch.full((), state.step, dtype=torch.int64, device=self.device)
        opt = state.optimizer
        self.decayed = [p for p in opt.param_groups[0]["params"] if p.requires_grad]
        for i, group in enumerate(opt.param_groups):
            group["lr"] = self.lr  # read by the fused kernel from device memory at every replay
            if i == 0:
                group["weight_decay"] = 0.0  # applied in `body`, where it can change every step
            if self.device.type == "cuda":
                group["capturable"] = True  # AdamW refuses a capture otherwise (its step counts are on the device)
        if state.nonfinite_step is None:
            state.nonfinite_step = torch.full((), -1, dtype=torch.int64, device=self.device)
            state.nonfinite_value = torch.zeros((), dtype=torch.float32, device=self.device)

        self.capture, self.warmup, self.calls = capture, warmup, 0
        self.graph: Any = None
        self.outputs: dict[str, torch.Tensor] | None = None

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def _run(self) -> dict[str, torch.Tensor]:
        """This call's step: eagerly, on a side stream while warming up, by capture, or by replay."""
        if not self.capture:
            return self.body()
        if self.graph is None:
            current = torch.cuda.current_stream(self.device)
            # One side stream for every warm-up call: waiting for `current` first also orders its memory
            # reuse after the main stream's reads of the last call's outputs.
            side = self.side = getattr(self, "side", None) or torch.cuda.Stream(self.device)
            side.wait_stream(current)
            with torch.cuda.stream(side):
                if self.calls < self.warmup:
                    out = self.body()
                else:
                    self.graph = torch.cuda.CUDAGraph()
                    error: Exception | None = None
                    try:
                        # Records the step without running it.  thread_local: a data-loading thread's CUDA
                        # calls (pinned copies, allocations) meanwhile must not invalidate the capture.
                        with torch.cuda.graph(self.graph, stream=side, capture_error_mode="thread_local"):
                            self.outputs = self.body()
                    except Exception as e:
                        error = e
                    if self.capture_failed_anywhere(error is not None) and error is None:
                        error = RuntimeError("the capture failed on another rank")
                    if error is not None:
                        self.graph, self.outputs = None, None
                        self.release()
                        raise GraphCaptureError(f"capturing the training step as a CUDA graph failed: {type(error).__name__}: {error}") from error
            current.wait_stream(side)
            if self.graph is None:
                return out
        self.graph.replay()
        assert self.outputs is not None
        return self.outputs

    def capture_failed_anywhere(self, failed: bool) -> bool:
        """Whether any rank's capture failed (all ranks must agree: one rank stepping eagerly through DDP
        while another replays its own all-reduce would hang both).  No collective on one rank."""
        if self.world == 1:
            return failed
        flag = torch.full((), float(failed), device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag)

    def release(self) -> None:
        """Hand the state back to `train_step`: gradients unset (no longer views of the flat buffer) and
        the lr a float again; the weight decay is set by every train_step."""
        for p in self.params:
            p.grad = None
        lr = float(self.lr)
        for group in self.state.optimizer.param_groups:
            group["lr"] = lr

    def _set_scalars(self) -> None:
        s = self.state
        lr, wd, momentum = s.schedules.at(s.step)
        self.lr.fill_(lr)
        self.wd.fill_(wd)
        self.momentum.fill_(momentum)
        self.teacher_temp.fill_(s.loss_fn.teacher_temp(s.epoch))

    def __call__(self, crops: list[torch.Tensor]) -> dict[str, Any]:
        if [c.shape for c in crops] != [c.shape for c in self.crops]:
            raise GraphedStepError(f"crop shapes {[tuple(c.shape) for c in crops]} differ from the captured {[tuple(c.shape) for c in self.crops]}")
        for static, c in zip(self.crops, crops):
            static.copy_(c, non_blocking=True)
        self._set_scalars()
        outputs = self._run()
        self.calls += 1
        s = self.state
        lr, wd, momentum = s.schedules.at(s.step)
        s.step += 1
        return {
            **{k: v.clone() for k, v in outputs.items()},  # the graph's outputs are overwritten by the next replay
            "lr": lr,
            "weight_decay": wd,
            "momentum": momentum,
            "teacher_temp": s.loss_fn.teacher_temp(s.epoch),
        }

    def body(self) -> dict[str, torch.Tensor]:
        """One deferred DINO step on `self.crops`, reading every per-step value from device memory."""
        s, cfg = self.state, self.state.cfg
        loss, teacher_out, koleo = multicrop_loss(s, self.module, self.crops, self.dtype, temp=self.teacher_temp)
        gate = record_nonfinite(s, finite_flag(loss), loss, self.step_number)
        s.loss_fn.update_center(teacher_out, gate=gate)

        self.flat_grad.zero_()
        loss.backward()
        if self.world > 1:
            dist.all_reduce(self.flat_grad)
            self.flat_grad.div_(self.world)  # DDP averages
        grad_norms = clip_gradients(self.module, cfg.optim.clip_grad) if cfg.optim.clip_grad > 0 else None
        # AdamW's decoupled weight decay, first, as torch's AdamW applies it; 1 where the step is skipped.
        with torch.no_grad():
            keep = 1.0 - self.lr * self.wd * gate.float()
            torch._foreach_mul_(self.decayed, keep.to(self.decayed[0].dtype))
        step_unless_skipped(s.optimizer, gate)
        ema_update(s.teacher, self.module, self.momentum, gate=gate)
        self.step_number.add_(1)

        entropy, marginal = s.loss_fn._last_entropies
        out = {"loss": loss.detach(), "teacher_entropy": entropy, "teacher_marginal_entropy": marginal}
        out["entropy_gap"] = math.log(cfg.model.out_dim) - entropy
        if grad_norms is not None and grad_norms.numel():
            out["grad_norm_max"] = grad_norms.max()
        if koleo is not None:
            out["koleo"] = koleo.detach()
        return out
