"""Stochastic depth with every block's masks drawn in one go: timm's DropPath, fewer kernel launches.

timm's `DropPath` draws its per-sample mask where it runs: `new_empty → bernoulli_ → div_ → mul`,
three kernels per residual branch, 66 per ViT-S/16 forward (22 branches), 132 per DINO step (the
student sees the global and the local crops).  On a GPU the step waits for its ~2,500 launches (host
bound at batch 64: docs/performance.md), so here one forward draws the masks of all its branches at
once (a Bernoulli and a division over an n_branches x batch matrix, cast once to the branches'
dtype) and each branch only multiplies: 2-3 kernels + 22 per forward.

The distribution is timm's exactly: each sample's branch i dropped with probability p_i, independently
across samples, branches and forwards; kept ones scaled by 1/(1 - p_i).  Only the random stream
differs (the draws come in another order).  `batch_drop_paths` swaps the modules in place; there are
no weights, so state dicts and checkpoints do not change.
"""

from __future__ import annotations

import torch
from timm.layers import DropPath
from torch import nn


class DropPathMasks:
    """The masks of one network's branches for its current forward, drawn at the first branch."""

    def __init__(self, drop_probs: list[float]) -> None:
        self.keep = torch.tensor([1.0 - p for p in drop_probs], dtype=torch.float32)
        self._keep_on: dict[torch.device, torch.Tensor] = {}  # copied to each device once, not per step
        self.masks: torch.Tensor | None = None

    def reset(self, *_: object) -> None:
        """A forward pre-hook of the network: the next branch draws fresh masks."""
        self.masks = None

    def mask(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if self.masks is None or self.masks.shape[1] != len(x) or self.masks.device != x.device:
            keep = self._keep_on.get(x.device)
            if keep is None:
                keep = self._keep_on[x.device] = self.keep.to(x.device).unsqueeze(1)
            draws = torch.bernoulli(keep.expand(-1, len(x))).div_(keep)  # 0 or 1/keep, as timm's scale_by_keep
            self.masks = draws.to(x.dtype)  # the branch's dtype (bf16 under autocast), as timm's new_empty
        return self.masks[index].view((len(x),) + (1,) * (x.ndim - 1))


class BatchedDropPath(nn.Module):
    """timm's DropPath over masks from a shared `DropPathMasks` (identity in eval mode or at p = 0)."""

    def __init__(self, drop_prob: float, index: int, masks: DropPathMasks) -> None:
        super().__init__()
        self.drop_prob = drop_prob
        self.index = index
        self._masks = [masks]  # in a list: a plain attribute, not a registered child module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        return x * self._masks[0].mask(self.index, x)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}, index={self.index}"


def batch_drop_paths(network: nn.Module) -> int:
    """Replace every timm DropPath of `network` (scaling kept samples, timm's default) by a
    BatchedDropPath drawing from one shared DropPathMasks, reset by a forward pre-hook on `network`.
    Returns how many were replaced (0: the network is left as it was)."""
    found = [(name, m) for name, m in network.named_modules() if isinstance(m, DropPath) and m.scale_by_keep]
    if not found:
        return 0
    masks = DropPathMasks([m.drop_prob for _, m in found])
    for index, (name, m) in enumerate(found):
        parent_name, _, child = name.rpartition(".")
        parent = network.get_submodule(parent_name) if parent_name else network
        batched = BatchedDropPath(m.drop_prob, index, masks)
        batched.train(m.training)
        setattr(parent, child, batched)
    network.register_forward_pre_hook(masks.reset)
    return len(found)
