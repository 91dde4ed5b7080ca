"""Backbones from timm, the DINO projection head, and the multi-crop student/teacher pair.

The backbone is any `timm.create_model` name with its classifier removed (`num_classes=0`), so
its forward returns the pooled feature ([CLS] for ViTs, global average pool for CNNs).  ViTs
are built with timm's dynamic image size so one network takes both the global and the local
crop resolution (position embeddings are interpolated on the fly).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import timm
import torch
from timm.layers import DropPath
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from raydino.config import Config, ModelConfig
from raydino.core.droppath import BatchedDropPath, batch_drop_paths
from raydino.core.weights import load_backbone_weights


def is_vit(backbone: nn.Module) -> bool:
    """True for transformer backbones with a patch embedding and a block list (timm ViT family)."""
    return hasattr(backbone, "patch_embed") and hasattr(backbone, "blocks")


def has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def model_config_problems(cfg: Config) -> list[str]:
    """What the workers would fail on, found now (the backbone built on the meta device: shapes only,
    instant): a crop or probe size a ViT's patches do not tile, and a `model.init` file that is not there."""
    from pathlib import Path

    problems = []
    with torch.device("meta"):
        backbone = build_backbone(cfg.model, img_size=cfg.augment.global_crop_size)
    patch = getattr(getattr(backbone, "patch_embed", None), "patch_size", None)
    patch = patch[0] if isinstance(patch, Sequence) else patch
    sizes = {"augment.global_crop_size": cfg.augment.global_crop_size, "augment.local_crop_size": cfg.augment.local_crop_size}
    if cfg.probe.image_size:
        sizes["probe.image_size"] = cfg.probe.image_size
    for field, size in sizes.items():
        if patch and size % patch:
            fits = ", ".join(str(patch * k) for k in (size // patch, size // patch + 1) if k > 0)
            problems.append(f"{field}={size}: not a multiple of {cfg.model.arch}'s {patch} px patches (e.g. {fits})")
    init = cfg.model.pretrained_init
    if init and not Path(init).exists():
        problems.append(f"model.init={init!r}: file does not exist (a local path on every node)")
    return problems


def build_backbone(cfg: ModelConfig, img_size: int | None = None) -> nn.Module:
    """A timm backbone without classifier.  `img_size` sets a ViT's native grid (dynamic size on)."""
    kwargs: dict = {"pretrained": False, "num_classes": 0, "drop_path_rate": cfg.drop_path_rate}
    try:
        extra = {"dynamic_img_size": True} | ({"img_size": img_size} if img_size else {})
        return timm.create_model(cfg.arch, **kwargs, **extra)
    except TypeError:
        # CNNs (ResNet, ConvNeXt, ...) take any input size and reject the ViT-only arguments.
        return timm.create_model(cfg.arch, **kwargs)


class DINOHead(nn.Module):
    """MLP projection head: layers → L2-normalised bottleneck → weight-normalised linear to out_dim.

    With `norm_last_layer` the weight-norm gain is frozen at 1, which DINO found stabilises training.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        use_bn: bool = False,
        norm_last_layer: bool = True,
        fp32_last_layer: bool = False,
    ) -> None:
        super().__init__()
        # Under autocast, compute the out_dim logits (and their gradients) in fp32: a bf16 logit carries
        # ~3 significant digits, and the loss divides logits by temperatures of 0.1 and 0.04.
        self.fp32_last_layer = fp32_last_layer
        layers: list[nn.Module] = []
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        for i in range(len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:  # no activation after the bottleneck projection
                if use_bn:
                    layers.append(nn.BatchNorm1d(dims[i + 1]))
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        gain = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            gain.fill_(1.0)
        gain.requires_grad = not norm_last_layer

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        x = nn.functional.normalize(x, dim=-1, p=2)
        if self.fp32_last_layer and x.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return self.last_layer(x.float())
        return self.last_layer(x)


class MultiCropNetwork(nn.Module):
    """Backbone + head over a list of crops.

    Crops of the same resolution are concatenated and go through the backbone in one forward
    (two forwards for 2 global + N local crops); the head then runs once on all features.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: Sequence[torch.Tensor], return_features: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Head outputs of every crop, in crop order; with `return_features`, also the backbone's features."""
        feats = []
        start = 0
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            # one tensor already holds its resolution's crops (`step.batch_views`): no copy
            x = crops[start] if end - start == 1 else torch.cat(list(crops[start:end]))
            feats.append(self.backbone(x))
            start = end
        features = torch.cat(feats)
        out = self.head(features)
        return (out, features) if return_features else out


def build_student_teacher(cfg: Config) -> tuple[MultiCropNetwork, MultiCropNetwork]:
    """Student and teacher start identical; the teacher never receives gradients (EMA only)."""
    backbone = build_backbone(cfg.model, img_size=cfg.augment.global_crop_size)
    m = cfg.model
    head = DINOHead(
        backbone.num_features,
        m.out_dim,
        m.head_hidden_dim,
        m.head_bottleneck_dim,
        m.head_layers,
        m.head_use_bn,
        m.norm_last_layer,
        fp32_last_layer=cfg.train.fp32_head_logits,
    )
    if cfg.train.fewer_launches and not cfg.train.compile:
        # Eager steps launch a kernel per op and wait for the launches on a GPU: the stochastic-depth
        # masks of a forward are drawn in one go (droppath.py).  Compiled graphs fuse timm's own.
        batch_drop_paths(backbone)
    student = MultiCropNetwork(backbone, head)
    if m.pretrained_init:
        load_backbone_weights(student.backbone, m.pretrained_init)
    teacher = copy.deepcopy(student)
    disable_stochastic_depth(teacher)
    for p in teacher.parameters():
        p.requires_grad = False
    return student, teacher


def fused_attention(network: nn.Module) -> bool | None:
    """True when every attention layer of a timm ViT calls F.scaled_dot_product_attention (timm's
    `fused_attn`, on by default unless TIMM_FUSED_ATTN=0 or export mode); None for a network without
    timm attention layers (CNNs)."""
    flags = [m.fused_attn for m in network.modules() if hasattr(m, "fused_attn") and hasattr(m, "qkv")]
    return all(flags) if flags else None


def disable_stochastic_depth(network: nn.Module) -> None:
    """Turn every DropPath into the identity, in place.

    DINO builds its teacher without stochastic depth (only the student gets `drop_path_rate`);
    the teacher runs in train mode, so a copied DropPath would randomly drop residual branches
    of the teacher and add noise to its targets.  DropPath has no weights: the state dicts of
    student and teacher stay identical, and the EMA pairs parameters exactly as before.
    """
    for module in network.modules():
        if isinstance(module, (DropPath, BatchedDropPath)):
            module.drop_prob = 0.0


def log_uniform_entropy(out_dim: int) -> float:
    """ln(K): the entropy of a uniform distribution over the K head outputs (collapse reference)."""
    return math.log(out_dim)
