"""One DINO training step, read top to bottom: schedules → forward → loss → backward → clip → step → EMA.

`TrainState` holds everything a step changes; `checkpoint.py` saves and restores exactly that.
The step knows nothing of Ray or of where batches come from: the recipe passes a list of crops
already on the device (uint8, normalised here on the device).

Host syncs.  `train_step(state, crops)` checks the loss and returns floats: one wait for the device
per step.  `train_step(..., defer=True)` (what `loop.fit` calls) never waits: the loss's finiteness
is a flag on the device, a non-finite step is skipped on the device (the fused optimizer's
`found_inf`, a gated centre and EMA; every later step too), the metrics stay 0-d tensors, and the
caller runs `check_finite(state)` (one sync) at log steps and before every checkpoint, which raises
`NonFiniteLossError` naming the first non-finite step.  Without a fused optimizer (or with a
GradScaler) the deferred step checks at once, as the plain one does.
"""

from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from raydino.augment.ops import IMAGENET_MEAN, IMAGENET_STD
from raydino.config import Config
from raydino.core.castcopy import CastWeightsCopy
from raydino.core.loss import DINOLoss, koleo_loss, world_size
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
    # Deferred finite check (device tensors, not checkpointed): the first non-finite step (-1: none
    # yet) and its loss.  Once set, every later deferred step is skipped on the device as well.
    nonfinite_step: torch.Tensor | None = None
    nonfinite_value: torch.Tensor | None = None
    teacher_cast: CastWeightsCopy | None = None  # the teacher's bf16 matmul weights (not checkpointed)

    @property
    def student_module(self) -> MultiCropNetwork:
        return getattr(self.student, "module", self.student)

    @property
    def done(self) -> bool:
        return self.step >= self.schedules.total_steps


def autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """bf16 on CUDA with `train.precision` auto or bf16; on other devices only when bf16 is asked for
    (auto gives fp32 there: CPU bf16 matmuls are slow on most dev machines)."""
    if cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def teacher_for_forward(state: TrainState, dtype: torch.dtype | None) -> nn.Module:
    """The teacher to call under autocast to `dtype`: in eager bf16 steps its copy with the matmul
    weights already in bf16 (`castcopy.py`: the same outputs, ~100 fewer kernels); else the teacher."""
    if dtype is None or state.cfg.train.compile or not state.cfg.train.fewer_launches:
        return state.teacher
    if state.teacher_cast is None or not state.teacher_cast.matches(state.teacher, dtype):
        state.teacher_cast = CastWeightsCopy(state.teacher, dtype)
    return state.teacher_cast.refreshed()


def use_fused_optimizer(cfg: Config, device: torch.device) -> bool:
    """`optim.fused`, or when unset (None): fused on CUDA or for a CUDA-graph step (which needs it, on
    any device), foreach (torch's default) elsewhere."""
    return cfg.optim.fused if cfg.optim.fused is not None else (device.type == "cuda" or cfg.train.cuda_graph)


def make_optimizer(model: nn.Module, cfg: Config, device: torch.device | str = "cpu") -> torch.optim.Optimizer:
    """AdamW (or SGD) over DINO's two parameter groups; lr and weight decay are set every step from the
    schedules.  Build it after the model is on its device: fused kernels need the parameters there."""
    groups = param_groups(model)
    # foreach made explicit: torch's default on CUDA, where the CPU would loop over the tensors in Python
    impl = {"fused": True} if use_fused_optimizer(cfg, torch.device(device)) else {"foreach": True}
    if cfg.optim.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=cfg.optim.sgd_momentum, **impl)
    return torch.optim.AdamW(groups, lr=0.0, **impl)


def compile_networks(student: nn.Module, teacher: nn.Module, **options: Any) -> None:
    """torch.compile the backbone and head of student and teacher in place (`nn.Module.compile`: the
    parameters and state-dict keys stay as they are, so checkpoints and DDP are unaffected).

    One graph per crop resolution (dynamic=False): global and local crops each get their own
    specialised kernels.  The first step of each resolution pays the compile time."""
    options = {"dynamic": False, **options}
    for network in (student, teacher):
        network.backbone.compile(**options)
        network.head.compile(**options)


def uses_cuda_graphs(cfg: Config) -> bool:
    """Whether `train.compile_mode` replays the compiled graphs as CUDA graphs (on CUDA devices)."""
    return cfg.train.compile_mode in ("reduce-overhead", "max-autotune")


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
    if cfg.train.compile:
        compile_networks(student, teacher, mode=cfg.train.compile_mode)
    schedules = build_schedules(cfg, steps_per_epoch, world_size)
    n_crops = 2 + cfg.augment.n_local_crops
    loss_fn = DINOLoss(cfg.model.out_dim, n_crops, schedules.teacher_temp, cfg.loss.student_temp, cfg.loss.center_momentum).to(device)
    return TrainState(cfg, student, teacher, loss_fn, make_optimizer(student, cfg, device), schedules, device)


def sync_batchnorm_supported(device: torch.device) -> bool:
    """Devices on which torch's SyncBatchNorm runs (its forward rejects CPU tensors)."""
    return device.type in ("cuda", "xpu", "hpu")


# Listing a ViT-S/16 DINO network's parameters walks ~300 modules: ~1 ms of Python each time, and a
# step did it four times (clipping, the last-layer freeze, both sides of the EMA), host time that a GPU
# waits for at batch 64 (docs/performance.md).  The networks never gain or lose parameters once built
# (checkpoints load in place), so each network's list is made once.
_PARAMS: weakref.WeakKeyDictionary[nn.Module, list[nn.Parameter]] = weakref.WeakKeyDictionary()
_LAST_LAYER: weakref.WeakKeyDictionary[nn.Module, list[nn.Parameter]] = weakref.WeakKeyDictionary()


def parameter_list(model: nn.Module) -> list[nn.Parameter]:
    """`list(model.parameters())`, made once per network (do not add or remove its parameters after)."""
    params = _PARAMS.get(model)
    if params is None:
        params = _PARAMS[model] = list(model.parameters())
    return params


def clip_gradients(model: nn.Module, clip: float) -> torch.Tensor:
    """DINO clips each parameter tensor separately (not the global norm): grad ×= clip / (‖grad‖ + 1e-6)
    where that is below 1.  On the device, without a host sync; returns the pre-clip norms (1-D tensor)."""
    grads = [p.grad for p in parameter_list(model) if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    norms = torch.stack(torch._foreach_norm(grads, 2.0)).float()
    coefs = (clip / (norms + 1e-6)).clamp_max(1.0)  # 1.0 where DINO leaves the gradient alone: x * 1.0 == x
    torch._foreach_mul_(grads, list(coefs.to(grads[0].dtype).unbind()))
    return norms


def cancel_last_layer_gradients(model: nn.Module) -> None:
    """Freezing the head's last layer during the first epoch(s) avoids an early collapse (DINO)."""
    last = _LAST_LAYER.get(model)
    if last is None:
        last = _LAST_LAYER[model] = [p for name, p in model.named_parameters() if "last_layer" in name]
    for p in last:
        p.grad = None


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float, gate: torch.Tensor | None = None) -> None:
    """teacher ← m · teacher + (1 − m) · student, parameter by parameter.  With `gate` (a 0-d bool
    tensor on the device) the teacher stays as it is where the gate is False, without a host sync."""
    t_params, s_params = parameter_list(teacher), parameter_list(student)  # no_grad: no detach needed
    if gate is None:
        torch._foreach_mul_(t_params, momentum)
        torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)
    else:
        # 0-d device tensors through the foreach `.Tensor` overloads (a tensor passed where a Scalar is
        # expected, as _foreach_lerp_'s weight, would be read with .item(): a host sync).
        m = torch.where(gate, momentum, 1.0).to(t_params[0].dtype)  # 1: a skipped step leaves the teacher alone
        torch._foreach_mul_(t_params, m)
        torch._foreach_add_(t_params, torch._foreach_mul(s_params, 1.0 - m))


_NORMALIZE: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def normalize_on_device(crops: torch.Tensor) -> torch.Tensor:
    """uint8 → float (x/255 − mean)/std, as `augment.ops.normalize`, with its constants made once per
    device: a fresh `torch.tensor(..., device="cuda")` per crop is a host-to-device copy that waits."""
    consts = _NORMALIZE.get(crops.device)
    if consts is None:
        scale = torch.tensor([1.0 / (255.0 * s) for s in IMAGENET_STD]).view(3, 1, 1).to(crops.device)
        shift = torch.tensor([m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(3, 1, 1).to(crops.device)
        consts = _NORMALIZE[crops.device] = (scale, shift)
    scale, shift = consts
    return crops.float().mul_(scale).sub_(shift)


def batch_views(crops: list[torch.Tensor]) -> list[torch.Tensor]:
    """Consecutive crops of one resolution concatenated, then normalised (uint8) once per resolution:
    [2B globals, N·B locals] for DINO's multi-crop, what `MultiCropNetwork` feeds its backbone.

    Concatenating the uint8 crops before normalising moves a quarter of the bytes and launches 2x4
    kernels instead of 10x3 plus the network's own concatenation of the float crops."""
    groups: list[list[torch.Tensor]] = []
    for c in crops:
        if groups and groups[-1][0].shape[1:] == c.shape[1:] and groups[-1][0].dtype == c.dtype:
            groups[-1].append(c)
        else:
            groups.append([c])
    views = [g[0] if len(g) == 1 else torch.cat(g) for g in groups]
    return [normalize_on_device(v) if v.dtype == torch.uint8 else v for v in views]


def supports_deferred_check(state: TrainState) -> bool:
    """The optimizer can skip a step on the device: torch's fused AdamW/SGD take a `found_inf` flag."""
    opt = state.optimizer
    return (
        state.scaler is None
        and getattr(opt, "_step_supports_amp_scaling", False)
        and all(g.get("fused") for g in opt.param_groups)  # a restored state dict may carry fused=False
    )


def check_finite(state: TrainState) -> None:
    """Raise NonFiniteLossError if a deferred step was non-finite (one host sync; every rank agrees)."""
    if state.nonfinite_step is None:
        return
    step = int(state.nonfinite_step)
    if step >= 0:
        raise NonFiniteLossError(step, float(state.nonfinite_value))


def materialize(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics with every 0-d tensor turned into a float, in one device-to-host copy."""
    keys = [k for k, v in metrics.items() if isinstance(v, torch.Tensor)]
    if not keys:
        return dict(metrics)
    values = torch.stack([metrics[k].detach().float().reshape(()) for k in keys]).tolist()
    return {**metrics, **dict(zip(keys, values))}


def multicrop_loss(
    state: TrainState, student: nn.Module, crops: list[torch.Tensor], dtype: torch.dtype | None, temp: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The forward half of a step under autocast to `dtype`: the teacher on the global crops, `student`
    on every crop, the DINO loss (+ KoLeo).  Returns (loss, teacher output, KoLeo term or None)."""
    cfg = state.cfg
    batch = len(crops[0])
    global_views = batch_views(crops[:2])
    views = global_views + batch_views(crops[2:])
    amp = torch.autocast(state.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    teacher = teacher_for_forward(state, dtype)
    with amp:
        with torch.no_grad():
            teacher_out = teacher(global_views)  # the teacher sees only the global crops
        koleo = None
        if cfg.loss.koleo_weight > 0:
            student_out, features = student(views, return_features=True)
            # per global crop, over this worker's batch (as DINOv2)
            koleo = sum(koleo_loss(f) for f in features[: 2 * batch].chunk(2))
        else:
            student_out = student(views)
        loss = state.loss_fn(student_out, teacher_out, state.epoch, update_center=False, temp=temp)
        if koleo is not None:
            loss = loss + cfg.loss.koleo_weight * koleo
    return loss, teacher_out, koleo


def finite_flag(loss: torch.Tensor) -> torch.Tensor:
    """Whether the loss is finite on every rank: a 0-d bool on the device, no host sync."""
    finite = torch.isfinite(loss.detach()).float()
    if world_size() > 1:
        # All ranks must agree: one rank skipping DDP's all-reduce (or its update) would hang or split the rest.
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return finite > 0


def record_nonfinite(state: TrainState, finite: torch.Tensor, loss: torch.Tensor, step: int | torch.Tensor) -> torch.Tensor:
    """Remember the first non-finite step (and its loss) on the device; returns the gate that every
    update of this step obeys: False from that step on (sticky: nothing more is applied)."""
    if state.nonfinite_step is None:
        state.nonfinite_step = torch.full((), -1, dtype=torch.int64, device=loss.device)
        state.nonfinite_value = torch.zeros((), dtype=torch.float32, device=loss.device)
    first_bad = (~finite) & (state.nonfinite_step < 0)
    state.nonfinite_step.copy_(torch.where(first_bad, step, state.nonfinite_step))
    state.nonfinite_value.copy_(torch.where(first_bad, loss.detach().float(), state.nonfinite_value))
    return state.nonfinite_step < 0


def step_unless_skipped(optimizer: torch.optim.Optimizer, gate: torch.Tensor) -> None:
    """The fused optimizer's step, skipped on the device where `gate` is False: the fused kernels' own
    skip (what GradScaler uses), so parameters, moments and step counts stay as they were."""
    optimizer.grad_scale, optimizer.found_inf = None, (~gate).float()
    try:
        optimizer.step()
    finally:
        del optimizer.grad_scale, optimizer.found_inf


def train_step(state: TrainState, crops: list[torch.Tensor], defer: bool = False) -> dict[str, Any]:
    """One optimisation step on a batch of multi-crops (globals first; uint8 or float, on the device).

    Returns floats, after raising NonFiniteLossError if the loss is not finite (the update is not
    applied).  With `defer`, returns 0-d tensors for the loss and statistics and never waits for the
    device (see the module's docstring); the caller must run `check_finite(state)` before it saves.
    """
    cfg = state.cfg
    if cfg.train.compile and uses_cuda_graphs(cfg):
        # A new iteration for CUDA-graph trees: last step's graph outputs (all consumed by now) may be overwritten.
        torch.compiler.cudagraph_mark_step_begin()
    lr, wd, momentum = state.schedules.at(state.step)
    for i, group in enumerate(state.optimizer.param_groups):
        group["lr"] = lr
        if i == 0:  # group 0 carries the decayed weights
            group["weight_decay"] = wd
    deferred = defer and supports_deferred_check(state)

    dtype = autocast_dtype(cfg, state.device)
    loss, teacher_out, koleo = multicrop_loss(state, state.student, crops, dtype)
    finite = finite_flag(loss)
    if deferred:
        gate = record_nonfinite(state, finite, loss, state.step)
    else:
        if not bool(finite):  # the host waits here for the loss
            raise NonFiniteLossError(state.step, float(loss.detach()))
        gate = None
    state.loss_fn.update_center(teacher_out, gate=gate)

    state.optimizer.zero_grad(set_to_none=True)
    if state.scaler is not None:
        state.scaler.scale(loss).backward()
        state.scaler.unscale_(state.optimizer)
    else:
        loss.backward()
    grad_norms = clip_gradients(state.student, cfg.optim.clip_grad) if cfg.optim.clip_grad > 0 else None
    if state.epoch < cfg.optim.freeze_last_layer_epochs and state.step < state.schedules.freeze_last_layer_steps:
        cancel_last_layer_gradients(state.student)
    if state.scaler is not None:
        state.scaler.step(state.optimizer)
        state.scaler.update()
    elif deferred:
        step_unless_skipped(state.optimizer, gate)
    else:
        state.optimizer.step()
    ema_update(state.teacher, state.student_module, momentum, gate=gate)

    state.step += 1
    entropies = state.loss_fn._last_entropies
    max_entropy = math.log(cfg.model.out_dim)
    entropy, marginal = entropies if entropies is not None else (float("nan"), float("nan"))
    metrics = {
        "loss": loss.detach(),
        "lr": lr,
        "weight_decay": wd,
        "momentum": momentum,
        "teacher_temp": state.loss_fn.teacher_temp(state.epoch),
        "teacher_entropy": entropy,
        "teacher_marginal_entropy": marginal,
        "entropy_gap": max_entropy - entropy,
        "grad_norm_max": grad_norms.max() if grad_norms is not None and grad_norms.numel() else 0.0,
        **({"koleo": koleo.detach()} if koleo is not None else {}),
    }
    return metrics if defer else materialize(metrics)


@torch.no_grad()
def forward_loss(state: TrainState, crops: list[torch.Tensor], dtype: torch.dtype | None = None) -> float:
    """The DINO loss of the current weights on `crops` under autocast to `dtype` (None: fp32), changing
    nothing (no centre update, no step): for comparing precisions on the same weights and inputs."""
    global_views = batch_views(crops[:2])
    amp = torch.autocast(state.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    with amp:
        teacher_out = state.teacher(global_views)
        student_out = state.student(global_views + batch_views(crops[2:]))
        loss = state.loss_fn(student_out, teacher_out, state.epoch, update_center=False)
    return float(loss)
