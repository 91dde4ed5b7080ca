"""FLOPs of one DINO training step, counted by torch's own `torch.utils.flop_counter.FlopCounterMode`.

What is counted is what the step computes on its real shapes: the teacher's forward on the two
global crops, the student's forward on every crop (backbone per resolution, head on all), the DINO
loss, and the student's backward.  FlopCounterMode counts matrix products, convolutions and
attention (2 FLOPs per multiply-add; elementwise ops, softmax and norms are not counted, as in every
MFU figure).  The networks are built on the `meta` device by default: shapes only, no memory and no
arithmetic, so the count of the paper's ViT-S/16 step takes a second on any machine.

`achieved / peak` is the model-FLOP utilisation (MFU); `peak_tflops` knows the dense bf16 tensor-core
peaks of common data-centre GPUs.

`KernelOpCounter` counts the other cost of a step, the one a fast GPU exposes: how many ops run a
kernel.  Each is at least one launch from the host, and a step whose launches take longer than the
GPU's work is host-bound (docs/performance.md).  The count does not depend on the device (a CPU
counts what a GPU would launch, up to kernels an op splits into).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from raydino.config import Config
from raydino.core.loss import DINOLoss, koleo_loss
from raydino.core.model import build_student_teacher

# Dense (no 2:4 sparsity) bf16 tensor-core peaks in TFLOP/s, from NVIDIA's data sheets: H100 SXM5 and
# H200 SXM "BF16 Tensor Core 1,979 TFLOPS with sparsity" (989 dense); H100 PCIe 1,513 (756 dense);
# H100 NVL 1,671 (835 dense); A100 "BF16 Tensor Core 312 TFLOPS" (dense); L40S 733 with sparsity
# (366 dense); L4 242 with sparsity (121 dense); A10 125 (dense).  The first name contained in
# torch.cuda.get_device_name() wins, so the more specific names come first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200", 989.0),
    ("H100", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
    ("L40S", 366.0),
    ("L4", 121.0),
    ("A10", 125.0),
)


def peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of a GPU by its name (None when unknown: pass --peak-tflops)."""
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return value
    return None


def step_flops(cfg: Config, batch_size: int | None = None, device: str | torch.device = "meta") -> dict[str, Any]:
    """Count one training step's FLOPs for `cfg` at `batch_size` images per worker (default the config's).

    Returns totals for the whole step and its parts, per step and per image.  The count does not
    depend on precision, on compile or on the optimizer (whose work is elementwise).
    """
    batch = batch_size or cfg.train.batch_size
    device = torch.device(device)
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"pretrained_init": None})})
    with torch.device(device):
        student, teacher = build_student_teacher(cfg)
    student.train()
    teacher.train()
    a = cfg.augment
    sizes = [a.global_crop_size] * 2 + [a.local_crop_size] * a.n_local_crops
    crops = [torch.empty(batch, 3, s, s, device=device) for s in sizes]
    loss_fn = DINOLoss(cfg.model.out_dim, len(sizes), np.array([cfg.loss.teacher_temp]), cfg.loss.student_temp).to(device)
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            teacher_out = teacher(crops[:2])
        teacher_fwd = counter.get_total_flops()
        if cfg.loss.koleo_weight > 0:
            student_out, features = student(crops, return_features=True)
            koleo = sum(koleo_loss(f) for f in features[: 2 * batch].chunk(2))
            loss = loss_fn(student_out, teacher_out, 0, update_center=False) + cfg.loss.koleo_weight * koleo
        else:
            student_out = student(crops)
            loss = loss_fn(student_out, teacher_out, 0, update_center=False)
        student_fwd = counter.get_total_flops() - teacher_fwd
        loss.backward()
        total = counter.get_total_flops()
    return {
        "batch_size": batch,
        "crops": sizes,
        "total": total,
        "per_image": total / batch,
        "teacher_forward": teacher_fwd,
        "student_forward": student_fwd,
        "student_backward": total - teacher_fwd - student_fwd,
        "counted_on": str(device),
    }


# Ops that dispatch but launch nothing: allocation without initialisation and the profiler's markers.
# (`_unsafe_view` is a view that autograd does not track as one.)
NO_KERNEL_OPS = frozenset({"empty", "empty_strided", "new_empty", "new_empty_strided", "empty_like", "lift_fresh", "_unsafe_view"})


class KernelOpCounter(TorchDispatchMode):
    """`with KernelOpCounter() as ops: step()` -> `ops.total`, `ops.by_name` (a Counter).

    Counts the aten ops that reach a kernel, below autograd and autocast (so the backward's ops and
    autocast's casts are in), leaving out views (`is_view`: no data moves) and `NO_KERNEL_OPS`."""

    def __init__(self) -> None:
        super().__init__()
        self.by_name: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        if not func.is_view and func.namespace != "profiler" and name not in NO_KERNEL_OPS:
            self.by_name[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.by_name.values())


def achieved_tflops(flops_per_step: float, seconds_per_step: float) -> float:
    return flops_per_step / seconds_per_step / 1e12
