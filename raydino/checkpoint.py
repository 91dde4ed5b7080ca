"""Complete, atomic checkpoints of a `TrainState`, and loading backbone weights from several formats.

A checkpoint is a directory holding `state.pt` (student, teacher, optimizer, scaler, loss centre,
step, epoch, RNG states, resolved config) and `config.yaml` (the same config, for people).  Files
are written to a temporary name in the same directory and renamed, so a reader never sees half a
checkpoint.  Ray Train copies such a directory to the run's storage (local or s3://).
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from .config import Config, ConfigError, build_config
from .engine import TrainState

STATE_FILE = "state.pt"
FORMAT_VERSION = 1


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def state_to_dict(state: TrainState) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "student": state.student_module.state_dict(),
        "teacher": state.teacher.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scaler": state.scaler.state_dict() if state.scaler is not None else None,
        "loss": state.loss_fn.state_dict(),  # the centre
        "step": state.step,
        "epoch": state.epoch,
        "rng": rng_state(),
        "extra": state.extra,
        "config": state.cfg.to_dict(),
    }


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new, never half
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_checkpoint(state: TrainState, directory: str | os.PathLike) -> Path:
    """Write the complete state into `directory` (created if needed); returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payload = state_to_dict(state)
    _atomic_write(directory / "config.yaml", lambda p: Path(p).write_text(state.cfg.to_yaml()))
    _atomic_write(directory / STATE_FILE, lambda p: torch.save(payload, p))
    return directory


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint directory or its state.pt file onto the CPU."""
    path = Path(path)
    file = path / STATE_FILE if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"no checkpoint at {path} (expected a directory with {STATE_FILE})")
    # weights_only=False: the payload holds numpy RNG state and plain python objects we wrote ourselves.
    return torch.load(file, map_location="cpu", weights_only=False)


def restore_state(state: TrainState, ckpt: dict[str, Any], restore_rng: bool = True) -> None:
    """Load a checkpoint into a freshly built `TrainState` of the same config."""
    state.student_module.load_state_dict(ckpt["student"])
    state.teacher.load_state_dict(ckpt["teacher"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    if state.scaler is not None and ckpt.get("scaler"):
        state.scaler.load_state_dict(ckpt["scaler"])
    state.loss_fn.load_state_dict(ckpt["loss"])
    state.step = int(ckpt["step"])
    state.epoch = int(ckpt["epoch"])
    state.extra = dict(ckpt.get("extra") or {})
    if restore_rng:
        set_rng_state(ckpt["rng"])


def checkpoint_config(ckpt: dict[str, Any]) -> Config:
    return build_config(ckpt["config"], source="checkpoint")


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
        from safetensors.torch import load_file

        return backbone_keys_only(load_file(str(path)))
    obj = load_checkpoint(path) if path.is_dir() else torch.load(path, map_location="cpu", weights_only=False)
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


def read_config_yaml(directory: str | os.PathLike) -> Config:
    return build_config(yaml.safe_load(Path(directory, "config.yaml").read_text()), source=str(directory))
