"""Backbone weights from a raydino checkpoint, an official DINO checkpoint or a safetensors file.

One rule for keys in every format (`backbone_keys_only`), a ViT position embedding resampled to the
backbone's grid, and a strict load whose error names the keys that do not fit.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raydino.config import ConfigError
from raydino.core.checkpoint import CheckpointReadError, load_checkpoint, read_weights_file


def teacher_backbone_state(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The teacher's backbone weights with timm's own key names (the head is dropped)."""
    prefix = "backbone."
    return {k[len(prefix) :]: v for k, v in ckpt["teacher"].items() if k.startswith(prefix)}


def backbone_keys_only(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DDP's `module.` dropped; where keys say `backbone.` (DINO's and raydino's student/teacher), the
    backbone's weights alone, without it (a DINO head beside them is left out).  Same for every format."""
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if any(k.startswith("backbone.") for k in sd):
        sd = {k[len("backbone.") :]: v for k, v in sd.items() if k.startswith("backbone.")}
    return sd


def read_backbone_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Backbone weights from a safetensors file, a raydino checkpoint or an official DINO checkpoint."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"model.init={str(path)!r}: file does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return backbone_keys_only(load_file(str(path)))
        except SafetensorError as e:
            raise CheckpointReadError(f"{path}: not a readable safetensors file ({e})") from None
    obj = load_checkpoint(path) if path.is_dir() else read_weights_file(path)
    if isinstance(obj, dict) and "teacher" in obj:  # raydino or official DINO (teacher preferred)
        sd = obj["teacher"]
    elif isinstance(obj, dict) and "student" in obj:
        sd = obj["student"]
    elif isinstance(obj, dict) and "state_dict" in obj:
        sd = obj["state_dict"]
    else:
        sd = obj
    return backbone_keys_only(sd)  # DINO's checkpoints prefix keys with module.backbone. / module.head.


def fit_pos_embed(sd: dict[str, torch.Tensor], backbone: nn.Module) -> dict[str, torch.Tensor]:
    """Resample a ViT's absolute position embedding to the backbone's grid (e.g. 224 px weights → 64 px)."""
    own = backbone.state_dict().get("pos_embed")
    theirs = sd.get("pos_embed")
    if own is None or theirs is None or own.shape == theirs.shape or own.shape[-1] != theirs.shape[-1]:
        return sd
    from timm.layers import resample_abs_pos_embed

    n_prefix = 0 if getattr(backbone, "no_embed_class", False) else getattr(backbone, "num_prefix_tokens", 1)
    grid = backbone.patch_embed.grid_size
    out = dict(sd)
    out["pos_embed"] = resample_abs_pos_embed(theirs, list(grid), num_prefix_tokens=n_prefix)
    return out


def load_backbone_state(backbone: nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    """Strict load with a message naming the keys when the weights are another architecture's."""
    sd = {k: v for k, v in sd.items() if not k.startswith(("head.", "fc.", "classifier."))}
    sd = fit_pos_embed(sd, backbone)
    own = backbone.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shape = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in sd if k in own and own[k].shape != sd[k].shape]
    if missing or unexpected or shape:
        raise ConfigError(
            f"{what}: the weights do not fit this architecture: {len(missing)} missing keys {missing[:3]}, "
            f"{len(unexpected)} unexpected {unexpected[:3]}, {len(shape)} shape mismatches {shape[:2]}"
        )
    backbone.load_state_dict(sd)


def load_backbone_weights(backbone: nn.Module, path: str | os.PathLike) -> None:
    """Load weights from a file into a timm backbone (pos_embed resampled to its grid)."""
    load_backbone_state(backbone, read_backbone_weights(path), f"model.init={str(path)!r}")
