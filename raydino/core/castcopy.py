"""The teacher's matmul weights kept in bf16 between steps, instead of cast in every forward.

Under autocast every Linear and Conv casts its fp32 weight and bias to bf16 each time it runs: one
kernel per tensor.  The student's casts are cached across its two forwards (autocast caches leaf
tensors that require grad), but the teacher's parameters do not require grad, so its forward
launches ~100 cast kernels per step for ViT-S/16: host time on a GPU that waits for its launches
(docs/performance.md).  `CastWeightsCopy` holds those weights in bf16 and refreshes them from the
fp32 teacher (which the EMA updates) with one multi-tensor copy per step.

It is exact: copy_ and autocast round fp32 to bf16 the same way, so the copy's forward gives the
teacher's autocast outputs bit for bit.  Every other parameter and every buffer (LayerNorm, position
embedding, BatchNorm statistics) is the teacher's own tensor, shared, not copied: BatchNorm running
statistics updated by the copy's forward are the teacher's.  Weight-normalised layers (the DINO
head's last layer) compute their weight in fp32 in each forward and are left to autocast.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize

CAST_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # what autocast runs in bf16, weights and bias


class CastWeightsCopy:
    """`CastWeightsCopy(teacher, torch.bfloat16).refreshed()` -> a module to call instead of `teacher`
    under autocast to that dtype.  Only for forwards without gradients (the teacher's)."""

    def __init__(self, network: nn.Module, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.network = network
        self.module = copy.deepcopy(network)
        self.sources: list[torch.Tensor] = []
        self.casts: list[torch.Tensor] = []
        originals = dict(network.named_modules())
        for name, mod in self.module.named_modules():
            orig = originals[name]
            cast_here = isinstance(mod, CAST_MODULES) and not parametrize.is_parametrized(mod)
            for pname, p in list(mod._parameters.items()):
                src = orig._parameters[pname]
                if p is None or src is None:
                    continue
                if cast_here and src.is_floating_point():
                    cast = nn.Parameter(src.detach().to(dtype), requires_grad=False)
                    mod._parameters[pname] = cast
                    self.sources.append(src)
                    self.casts.append(cast)
                else:
                    mod._parameters[pname] = src  # shared with the network: nothing to refresh
            for bname in list(mod._buffers):
                mod._buffers[bname] = orig._buffers[bname]  # BatchNorm statistics stay the network's

    def refreshed(self) -> nn.Module:
        """The copy, its casts made equal to the network's current weights (one foreach copy)."""
        with torch.no_grad():
            torch._foreach_copy_(self.casts, [s.detach() for s in self.sources])
        if self.module.training != self.network.training:
            self.module.train(self.network.training)
        return self.module

    def matches(self, network: nn.Module, dtype: torch.dtype) -> bool:
        return network is self.network and dtype == self.dtype
