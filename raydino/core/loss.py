"""DINO loss: cross-entropy between the sharpened, centred teacher and the student, with collapse stats.

For every pair (teacher view of global crop i, student view of crop j ≠ i):
    loss_ij = mean_batch( sum_k  -softmax((t_i - c) / τ_t)_k · log_softmax(s_j / τ_s)_k )
and the loss is the mean over all such pairs.  The centre c is an EMA of the teacher's mean output,
all-reduced over workers when torch.distributed runs, so that every rank centres identically.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def teacher_temperature_schedule(warmup_temp: float, final_temp: float, warmup_epochs: int, total_epochs: int) -> np.ndarray:
    """Per-epoch teacher temperature: linear warm-up, then constant (DINO's schedule)."""
    warm = np.linspace(warmup_temp, final_temp, warmup_epochs) if warmup_epochs else np.array([])
    rest = np.full(max(total_epochs - warmup_epochs, 0), final_temp)
    return np.concatenate([warm, rest]) if total_epochs else np.array([final_temp])


@dataclass
class CollapseStats:
    """Entropy of the teacher's (centred, sharpened) output distribution.

    `entropy` is the mean per-sample entropy, `marginal_entropy` the entropy of the batch-mean
    distribution.  Uniform collapse: every sample ≈ uniform, entropy → ln K.  One-hot collapse:
    every sample puts its mass on the same dimension, so even the batch mean is near one-hot.
    """

    entropy: float
    marginal_entropy: float
    max_entropy: float

    @property
    def distance_to_uniform(self) -> float:
        return self.max_entropy - self.entropy

    @property
    def collapse(self) -> str | None:
        if self.entropy >= 0.98 * self.max_entropy:
            return "uniform"
        if self.marginal_entropy <= 0.02 * self.max_entropy:
            return "one-hot"
        return None


class DINOLoss(nn.Module):
    def __init__(
        self,
        out_dim: int,
        n_crops: int,
        teacher_temps: np.ndarray,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
    ) -> None:
        super().__init__()
        self.n_crops = n_crops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.teacher_temps = teacher_temps
        self.register_buffer("center", torch.zeros(1, out_dim))
        # The last step's entropies as 0-d device tensors: turned into a CollapseStats (one host sync)
        # only when `last_stats` is read, at log steps, so a step itself never waits for the device.
        self._last_entropies: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def last_stats(self) -> CollapseStats | None:
        if self._last_entropies is None:
            return None
        entropy, marginal = torch.stack(self._last_entropies).tolist()
        return CollapseStats(entropy, marginal, math.log(self.center.shape[-1]))

    def teacher_temp(self, epoch: int) -> float:
        return float(self.teacher_temps[min(epoch, len(self.teacher_temps) - 1)])

    def forward(
        self, student_out: torch.Tensor, teacher_out: torch.Tensor, epoch: int, update_center: bool = True, temp: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The loss with the current centre; then the centre moves (unless `update_center` is False: the
        caller then calls `update_center` itself, e.g. gated on the loss being finite).  `temp`: the
        teacher temperature as a device tensor (a CUDA graph's step), instead of the epoch's float."""
        student_out = student_out.float()
        teacher_out = teacher_out.float()
        batch = len(teacher_out) // 2
        student_logp = F.log_softmax(student_out / self.student_temp, dim=-1).view(self.n_crops, batch, -1)
        temp = self.teacher_temp(epoch) if temp is None else temp
        teacher_p = F.softmax((teacher_out - self.center) / temp, dim=-1).detach()
        q = teacher_p.view(2, batch, -1)

        # Every (teacher view, student view) pair at once instead of a loop over the pairs: the loop's
        # ~90 small ops forward and as many backward are host time on a GPU that waits for launches.
        #   sum_{i, v != i} <q_i, logp_v> = <q_0 + q_1, sum_v logp_v> - sum_i <q_i, logp_i>
        all_pairs = (q.sum(0) * student_logp.sum(0)).sum()
        same_view = (q * student_logp[:2]).sum()
        n_terms = 2 * (self.n_crops - 1)  # a view is never compared with itself
        total = -(all_pairs - same_view) / batch
        self._last_entropies = entropy_tensors(teacher_p)
        if update_center:
            self.update_center(teacher_out)
        return total / n_terms

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor, gate: torch.Tensor | None = None) -> None:
        """centre ← m · centre + (1 − m) · batch mean (over all workers).  With `gate` (a 0-d bool
        tensor), the centre keeps its value where the gate is False, decided on the device."""
        batch_sum = teacher_out.detach().float().sum(dim=0, keepdim=True)
        if world_size() > 1:
            # the sum and the count in one all-reduce (one launch, not two); new_full fills on the device,
            # where torch.tensor(..., device=cuda) would copy from the host and wait for it
            packed = torch.cat([batch_sum, batch_sum.new_full((1, 1), float(len(teacher_out)))], dim=1)
            dist.all_reduce(packed)
            batch_center = packed[:, :-1] / packed[:, -1:]
        else:
            batch_center = batch_sum / len(teacher_out)
        new = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)
        self.center.copy_(new if gate is None else torch.where(gate, new, self.center))


def world_size() -> int:
    """Ranks in the torch.distributed group, 1 without one.  A one-rank group (one GPU under Ray Train)
    skips its collectives: each is a launch, with nothing to reduce."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def entropy_tensors(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean per-sample entropy and entropy of the batch mean, as 0-d tensors on the probs' device."""
    probs = probs.float().clamp_min(1e-12)
    entropy = -(probs * probs.log()).sum(-1).mean()
    mean_p = probs.mean(0)
    marginal = -(mean_p * mean_p.log()).sum()
    return entropy, marginal


def collapse_stats(probs: torch.Tensor) -> CollapseStats:
    entropy, marginal = entropy_tensors(probs)
    return CollapseStats(float(entropy), float(marginal), math.log(probs.shape[-1]))


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Kozachenko-Leonenko entropy estimator (DINOv2's KoLeo regulariser): -mean log(nearest-neighbour distance).

    On L2-normalised features of one batch it pushes each image away from its nearest neighbour, so
    the features spread over the sphere instead of collapsing onto a few directions.  Hand-written:
    three lines of torch, no library has it as a function.
    """
    x = F.normalize(features.float(), dim=-1, eps=eps)
    sim = x @ x.T
    sim.fill_diagonal_(-2.0)  # never one's own neighbour (cosine >= -1 elsewhere)
    nearest = (2 - 2 * sim.max(dim=1).values).clamp_min(0).sqrt()  # Euclidean distance on the unit sphere
    return -torch.log(nearest + eps).mean()
