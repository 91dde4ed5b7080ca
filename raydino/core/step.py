"""One DINO training step, read top to bottom: schedules → forward → loss → backward → clip → step → EMA.

`TrainState` holds everything a step changes; `checkpoint.py` saves and restores exactly that.
The step knows nothing of Ray or of where batches come from: the recipe passes a list of crops
already on the device (uint8, normalised here on the device).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from raydino.augment.ops import normalize
from raydino.config import Config
from raydino.core.loss import DINOLoss, koleo_loss
from raydino.core.model import MultiCropNetwork, build_student_teacher, has_batchnorm
from raydino.core.schedule import Schedules, build_schedules, param_groups


class NonFiniteLossError(RuntimeError):
    def __init__(self, step: int, value: float) -> None:
        super().__init__(f"loss became {value} at step {step}; stopping (the last good checkpoint is kept)")
        self.step = step
        self.value = value

    def __reduce__(self):  # picklable across Ray processes (the default passes only the message)
        return (type(self), (self.step, self.value))


@dataclass
class TrainState:
    cfg: Config
    student: nn.Module  # possibly wrapped in DistributedDataParallel
    teacher: MultiCropNetwork
    loss_fn: DINOLoss
    optimizer: torch.optim.Optimizer
    schedules: Schedules
    device: torch.device
    scaler: torch.amp.GradScaler | None = None
    step: int = 0
    epoch: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # recipe bookkeeping saved with checkpoints

    @property
    def student_module(self) -> MultiCropNetwork:
        return getattr(self.student, "module", self.student)

    @property
    def done(self) -> bool:
        return self.step >= self.schedules.total_steps


def autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """bf16 on CUDA (auto or bf16), fp32 on CPU: CPU bf16 matmuls are slow on most dev machines."""
    if device.type != "cuda":
        return None
    if cfg.train.precision in ("auto", "bf16"):
        return torch.bfloat16
    return None


def make_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    groups = param_groups(model)
    if cfg.optim.optimizer == "sgd":
        # lr and weight decay are overwritten every step from the schedules
        return torch.optim.SGD(groups, lr=0.0, momentum=cfg.optim.sgd_momentum)
    return torch.optim.AdamW(groups, lr=0.0)


def build_train_state(cfg: Config, steps_per_epoch: int, world_size: int = 1, device: torch.device | str = "cpu") -> TrainState:
    """Fresh student/teacher/loss/optimizer for `cfg`.  The recipe wraps `student` in DDP afterwards."""
    device = torch.device(device)
    torch.manual_seed(cfg.train.seed)
    student, teacher = build_student_teacher(cfg)
    if world_size > 1 and cfg.model.sync_batchnorm and has_batchnorm(student):
        if sync_batchnorm_supported(device):
            # BN statistics over the global batch, as DINO's ResNet recipe; needs torch.distributed up.
            student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
            teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
        else:
            # torch's SyncBatchNorm raises in its first forward on CPU tensors; per-worker statistics
            # (DINO's own fallback without SyncBN) keep a CPU run alive instead of failing every worker.
            warnings.warn(
                f"model.sync_batchnorm=true is ignored on {device.type}: torch's SyncBatchNorm needs a GPU; "
                "BatchNorm layers use per-worker batch statistics",
                stacklevel=2,
            )
    student.to(device)
    teacher.to(device)
    schedules = build_schedules(cfg, steps_per_epoch, world_size)
    n_crops = 2 + cfg.augment.n_local_crops
    loss_fn = DINOLoss(cfg.model.out_dim, n_crops, schedules.teacher_temp, cfg.loss.student_temp, cfg.loss.center_momentum).to(device)
    return TrainState(cfg, student, teacher, loss_fn, make_optimizer(student, cfg), schedules, device)


def sync_batchnorm_supported(device: torch.device) -> bool:
    """Devices on which torch's SyncBatchNorm runs (its forward rejects CPU tensors)."""
    return device.type in ("cuda", "xpu", "hpu")


def clip_gradients(model: nn.Module, clip: float) -> list[float]:
    """DINO clips each parameter tensor separately (not the global norm); returns the pre-clip norms."""
    norms = []
    for p in model.parameters():
        if p.grad is None:
            continue
        n = p.grad.detach().norm(2)
        norms.append(float(n))
        coef = clip / (n + 1e-6)
        if coef < 1:
            p.grad.mul_(coef)
    return norms


def cancel_last_layer_gradients(model: nn.Module) -> None:
    """Freezing the head's last layer during the first epoch(s) avoids an early collapse (DINO)."""
    for name, p in model.named_parameters():
        if "last_layer" in name:
            p.grad = None


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher ← m · teacher + (1 − m) · student, parameter by parameter."""
    t_params = list(teacher.parameters())
    s_params = [p.detach() for p in student.parameters()]
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)


def train_step(state: TrainState, crops: list[torch.Tensor]) -> dict[str, float]:
    """One optimisation step on a batch of multi-crops (globals first; uint8 or float, on the device)."""
    cfg = state.cfg
    lr, wd, momentum = state.schedules.at(state.step)
    for i, group in enumerate(state.optimizer.param_groups):
        group["lr"] = lr
        if i == 0:  # group 0 carries the decayed weights
            group["weight_decay"] = wd

    crops = [normalize(c) if c.dtype == torch.uint8 else c for c in crops]
    dtype = autocast_dtype(cfg, state.device)
    amp = torch.autocast(state.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    with amp:
        with torch.no_grad():
            teacher_out = state.teacher(crops[:2])  # the teacher sees only the global crops
        koleo = None
        if cfg.loss.koleo_weight > 0:
            student_out, features = state.student(crops, return_features=True)
            # per global crop, over this worker's batch (as DINOv2)
            koleo = sum(koleo_loss(f) for f in features[: 2 * len(crops[0])].chunk(2))
            loss = state.loss_fn(student_out, teacher_out, state.epoch) + cfg.loss.koleo_weight * koleo
        else:
            student_out = state.student(crops)
            loss = state.loss_fn(student_out, teacher_out, state.epoch)

    value = float(loss.detach())
    finite = torch.tensor(1.0 if math.isfinite(value) else 0.0, device=loss.device)
    if dist.is_available() and dist.is_initialized():
        # All ranks must agree before backward: one rank skipping DDP's all-reduce would hang the rest.
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if finite.item() == 0.0:
        raise NonFiniteLossError(state.step, value)

    state.optimizer.zero_grad(set_to_none=True)
    if state.scaler is not None:
        state.scaler.scale(loss).backward()
        state.scaler.unscale_(state.optimizer)
    else:
        loss.backward()
    grad_norms = clip_gradients(state.student, cfg.optim.clip_grad) if cfg.optim.clip_grad > 0 else []
    if state.epoch < cfg.optim.freeze_last_layer_epochs and state.step < state.schedules.freeze_last_layer_steps:
        cancel_last_layer_gradients(state.student)
    if state.scaler is not None:
        state.scaler.step(state.optimizer)
        state.scaler.update()
    else:
        state.optimizer.step()
    ema_update(state.teacher, state.student_module, momentum)

    state.step += 1
    stats = state.loss_fn.last_stats
    return {
        "loss": value,
        "lr": lr,
        "weight_decay": wd,
        "momentum": momentum,
        "teacher_temp": state.loss_fn.teacher_temp(state.epoch),
        "teacher_entropy": stats.entropy if stats else float("nan"),
        "teacher_marginal_entropy": stats.marginal_entropy if stats else float("nan"),
        "entropy_gap": stats.distance_to_uniform if stats else float("nan"),
        "grad_norm_max": max(grad_norms) if grad_norms else 0.0,
        **({"koleo": float(koleo.detach())} if koleo is not None else {}),
    }
