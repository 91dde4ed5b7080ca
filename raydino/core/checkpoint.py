"""Complete, atomic checkpoints of a `TrainState` (backbone weights in other formats: `core.weights`).

A checkpoint is a directory holding `state.pt` (student, teacher, optimizer, scaler, loss centre,
step, epoch, RNG states, resolved config) and `config.yaml` (the same config, for people).  Files
are written to a temporary name in the same directory and renamed, so a reader never sees half a
checkpoint.  Ray Train copies such a directory to the run's storage (local, s3:// or gs://).
"""

from __future__ import annotations

import os
import pickle
import random
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import yaml

from raydino.config import Config, build_config

if TYPE_CHECKING:  # step imports model, which imports weights, which reads checkpoints: no import cycle
    from raydino.core.step import TrainState

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
        "optimizer": portable_optimizer_state(state.optimizer),
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


class CheckpointReadError(ValueError):
    """A checkpoint or weights file that cannot be read (truncated, not a torch/safetensors file)."""


def read_weights_file(file: str | os.PathLike, mmap: bool = False) -> Any:
    """`torch.load` of a checkpoint or weights file onto the CPU; a file it cannot read raises
    CheckpointReadError naming it, not torch's or pickle's own error."""
    try:
        # weights_only=False: raydino's payload holds numpy RNG state and plain python objects it wrote
        # itself, and official DINO checkpoints hold an argparse Namespace.
        return torch.load(file, map_location="cpu", weights_only=False, mmap=mmap)
    except (RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointReadError(f"{file}: not a readable checkpoint or weights file, truncated or of another format ({first})") from None


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint directory or its state.pt file onto the CPU."""
    path = Path(path)
    file = path / STATE_FILE if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"no checkpoint at {path} (expected a directory with {STATE_FILE})")
    return read_weights_file(file)


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


def read_config_yaml(directory: str | os.PathLike) -> Config:
    return build_config(yaml.safe_load(Path(directory, "config.yaml").read_text()), source=str(directory))


def portable_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state dict with its group settings as a plain step sets them: a CUDA-graph step
    (core/graphstep.py) keeps the lr in device memory and asks for a capturable AdamW, which a run
    resumed on another device or without the graph must not inherit (lr and weight decay are set
    again from the schedules at every step either way)."""
    sd = optimizer.state_dict()
    for group in sd["param_groups"]:
        if isinstance(group.get("lr"), torch.Tensor):
            group["lr"] = float(group["lr"])
        if "capturable" in group:
            group["capturable"] = False
    return sd
