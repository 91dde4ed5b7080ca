"""Frozen teacher backbones for evaluation: find or fetch a checkpoint, build the timm model, load it.

One function, `load_teacher_backbone`, reads every source a user may name with `--checkpoint`:

- a run directory (its checkpoint with the highest step), a checkpoint directory or its `state.pt`;
- an `s3://` or `gs://` run or checkpoint, copied once into `$RAYDINO_CACHE/checkpoints`;
- an exported `.safetensors` (arch and image size from its `.json` sidecar), or an official
  DINO `.pth` (with `--arch`);
- `random`: a randomly initialised `--arch`, the baseline a pretrained backbone is compared with.

The teacher, not the student, is what DINO evaluates.  `add_backbone_arguments` gives the
recipes that load one (evaluate, analyze, export) the same `--checkpoint` / `--arch` / `--device`
options.  No Ray here.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from raydino.config import ConfigError, ModelConfig
from raydino.core.checkpoint import STATE_FILE, checkpoint_config, load_checkpoint, read_weights_file
from raydino.core.model import build_backbone
from raydino.core.weights import load_backbone_state, read_backbone_weights, teacher_backbone_state

CHECKPOINT_HELP = (
    "run dir (its latest checkpoint), checkpoint dir or state.pt, s3:// or gs:// run or checkpoint, "
    "exported backbone .safetensors, official DINO .pth (with --arch), or 'random' (with --arch)"
)


@dataclass
class LoadedBackbone:
    """A frozen backbone and where it came from."""

    backbone: nn.Module
    arch: str
    image_size: int | None  # the grid the ViT was built for (pretraining's global crop size)
    source: str  # the resolved checkpoint directory or file, or "random"
    step: int | None = None
    epoch: int | None = None
    config: dict[str, Any] | None = None  # the resolved pretraining config when known


def add_backbone_arguments(parser: argparse.ArgumentParser, *, positional: bool = False, device: bool = True) -> None:
    """`--checkpoint` (or a positional CHECKPOINT), `--arch` and, with `device`, `--device`."""
    if positional:
        parser.add_argument("checkpoint", help=CHECKPOINT_HELP)
    else:
        parser.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    parser.add_argument("--arch", help="timm architecture: needed for 'random' and weights files without a raydino config; must match a checkpoint's")
    if device:
        parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when visible, else cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`None` → CUDA when visible, else CPU; asking for CUDA where there is none is an error."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible here; use --device cpu")
    return device


def _checkpoint_step(directory: Path) -> int:
    # mmap: reads the pickled scalars without pulling every tensor into memory.
    state = read_weights_file(directory / STATE_FILE, mmap=True)
    return int(state.get("step", -1)) if isinstance(state, dict) else -1


def find_latest_checkpoint(path: str | os.PathLike) -> Path:
    """A run directory → its checkpoint with the highest step (then the newest name); a checkpoint
    directory or its state.pt → that directory; any other file → itself."""
    p = Path(path)
    if p.is_file():
        return p.parent if p.name == STATE_FILE else p
    if (p / STATE_FILE).is_file():
        return p
    if not p.is_dir():
        raise FileNotFoundError(f"--checkpoint {path}: no such file or directory")
    found = sorted(d for d in p.iterdir() if (d / STATE_FILE).is_file())
    if not found:
        raise FileNotFoundError(f"--checkpoint {path}: no checkpoint inside (expected {STATE_FILE} in it or in its checkpoint_* folders)")
    return max(found, key=lambda d: (_checkpoint_step(d), d.name))


def fetch_checkpoint(uri: str, storage_options: Any = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """An s3:// or gs:// run (its latest `checkpoint_*`) or checkpoint, copied once into a local cache.

    Latest = the greatest folder name: pretraining names them `checkpoint_<step, 8 digits>`.
    The cache is `$RAYDINO_CACHE/checkpoints` (default ~/.cache/raydino/checkpoints).
    """
    from raydino.data import storage as st  # local import: local checkpoints need none of the data layer

    loc = st.resolve(uri, storage_options)
    files = st.list_files(loc)
    rel = [f.path[len(loc.path) :].strip("/") for f in files]
    dirs = sorted({r.rpartition("/")[0] for r in rel if r.rpartition("/")[2] == STATE_FILE})
    dirs = [d for d in dirs if "/" not in d]  # the checkpoint itself ("") or its direct children
    if not dirs:
        raise FileNotFoundError(f"--checkpoint {st.display_uri(uri)}: no {STATE_FILE} in it or in its checkpoint_* folders")
    chosen = "" if "" in dirs else dirs[-1]
    root = Path(cache_dir or Path(os.environ.get("RAYDINO_CACHE", "~/.cache/raydino")).expanduser() / "checkpoints")
    local = root / hashlib.sha1(st.display_uri(uri).encode()).hexdigest()[:12] / (chosen or Path(loc.path).name)
    for info, r in zip(files, rel):
        if chosen and not r.startswith(chosen + "/"):
            continue
        if not chosen and "/" in r:
            continue
        target = local / (r[len(chosen) + 1 :] if chosen else r)
        if target.exists() and target.stat().st_size == info.size:
            continue  # fetched before
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".part")
        tmp.write_bytes(st.read_bytes(loc, info.path))
        os.replace(tmp, target)
    return local


def new_backbone(arch: str, image_size: int | None = None) -> nn.Module:
    """A timm backbone as pretraining builds it (no classifier; ViTs with dynamic image size)."""
    try:
        model_cfg = ModelConfig(arch=arch, drop_path_rate=0.0)
    except ValidationError as e:
        raise ConfigError(f"--arch {arch}: {e.errors()[0]['msg'].removeprefix('Value error, ')}") from None
    return build_backbone(model_cfg, img_size=image_size)


def load_teacher_backbone(
    source: str | os.PathLike, arch: str | None = None, image_size: int | None = None, seed: int = 0, storage_options: Any = None
) -> LoadedBackbone:
    """The frozen teacher backbone of a run / checkpoint / exported safetensors / DINO file, or
    `source="random"` for a randomly initialised `arch` (the baseline); always on the CPU, eval mode.
    `storage_options` (`raydino.data.storage.StorageOptions`) reach an s3:// or gs:// source."""
    if str(source) == "random":
        if not arch:
            raise ConfigError("--checkpoint random needs --arch NAME (the architecture to initialise)")
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            backbone = new_backbone(arch, image_size)
        return LoadedBackbone(backbone.eval(), arch, image_size, "random")
    remote = "://" in str(source) and not str(source).startswith("file://")
    path = fetch_checkpoint(str(source), storage_options) if remote else find_latest_checkpoint(str(source).removeprefix("file://"))
    if path.is_dir():
        ckpt = load_checkpoint(path)
        cfg = checkpoint_config(ckpt)
        own_arch = cfg.model.arch
        img = cfg.augment.global_crop_size
        backbone = new_backbone(arch or own_arch, img)
        what = f"checkpoint {path} (trained as model.arch={own_arch})"
        if arch and arch != own_arch:
            what += f" loaded as --arch {arch}"
        load_backbone_state(backbone, teacher_backbone_state(ckpt), what)
        return LoadedBackbone(backbone.eval(), arch or own_arch, img, str(path), ckpt.get("step"), ckpt.get("epoch"), cfg.to_dict())
    sidecar = path.with_suffix(".json")
    meta = json.loads(sidecar.read_text()) if path.suffix == ".safetensors" and sidecar.exists() else {}
    if arch and meta.get("arch") and arch != meta["arch"]:
        raise ConfigError(f"--arch {arch}: {path} was exported from {meta['arch']} (see {sidecar.name})")
    arch = arch or meta.get("arch")
    if not arch:
        raise ConfigError(f"--checkpoint {path}: a weights file without a raydino sidecar needs --arch NAME")
    img = meta.get("img_size") or image_size
    backbone = new_backbone(arch, img)
    load_backbone_state(backbone, read_backbone_weights(path), f"{path} as {arch}")
    return LoadedBackbone(backbone.eval(), arch, img, str(path), meta.get("step"), meta.get("epoch"), meta.get("config"))
