"""Per-iteration schedules (DINO): lr with linear warm-up then cosine, weight decay and teacher momentum cosine.

Every schedule is a plain numpy array indexed by the global step, so a resumed run reads the same
value at the same step, whatever the number of restarts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import nn

from raydino.config import Config
from raydino.core.loss import teacher_temperature_schedule


def cosine_schedule(base: float, final: float, total_steps: int, warmup_steps: int = 0, warmup_start: float = 0.0) -> np.ndarray:
    """`warmup_steps` linear from warmup_start to base, then half-cosine from base to final."""
    warmup_steps = min(warmup_steps, total_steps)
    warm = np.linspace(warmup_start, base, warmup_steps, endpoint=False) if warmup_steps else np.array([])
    n = total_steps - warmup_steps
    t = np.arange(n)
    cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * t / max(n, 1)))
    return np.concatenate([warm, cos]).astype(np.float64)


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """DINO's linear scaling rule: the configured lr is for a global batch of 256."""
    return base_lr * global_batch / 256.0


@dataclass
class Schedules:
    lr: np.ndarray
    weight_decay: np.ndarray
    momentum: np.ndarray
    teacher_temp: np.ndarray  # per epoch
    steps_per_epoch: int
    total_steps: int
    # The head's last layer gets no update before this step (DINO: the first epoch).  Held in
    # steps because a step budget (`train.max_steps`) may end the run inside that first epoch.
    freeze_last_layer_steps: int

    def at(self, step: int) -> tuple[float, float, float]:
        i = min(step, self.total_steps - 1)
        return float(self.lr[i]), float(self.weight_decay[i]), float(self.momentum[i])


def build_schedules(cfg: Config, steps_per_epoch: int, world_size: int) -> Schedules:
    epochs = cfg.train.epochs
    total = max(steps_per_epoch * epochs, 1)
    budget = cfg.train.max_steps is not None and cfg.train.max_steps < total
    if budget:
        # A step budget shortens the run: the cosines (lr, weight decay, teacher momentum) are
        # compressed to end inside it; warm-up and last-layer freezing keep their length in real
        # epochs but take at most half the budget, so that the budget never ends in either.
        total = cfg.train.max_steps
        epochs = max(1, -(-total // steps_per_epoch))
    warmup = int(round(cfg.optim.warmup_epochs * steps_per_epoch))
    freeze = cfg.optim.freeze_last_layer_epochs * steps_per_epoch
    if budget:
        warmup, freeze = min(warmup, total // 2), min(freeze, total // 2)
    global_batch = cfg.train.batch_size * world_size
    lr = cosine_schedule(scaled_lr(cfg.optim.lr, global_batch), cfg.optim.min_lr, total, warmup)
    wd = cosine_schedule(cfg.optim.weight_decay, cfg.optim.weight_decay_end, total)
    mom = cosine_schedule(cfg.optim.momentum_teacher, 1.0, total)
    temps = teacher_temperature_schedule(cfg.loss.warmup_teacher_temp, cfg.loss.teacher_temp, cfg.loss.warmup_teacher_temp_epochs, epochs)
    return Schedules(lr, wd, mom, temps, steps_per_epoch, total, freeze)


def param_groups(model: nn.Module) -> list[dict]:
    """Two groups: weights with decay, and biases / norm gains (1-D tensors) without (DINO's rule)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
