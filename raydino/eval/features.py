"""Frozen-backbone features: what a probe sees of an image, computed once and cached.

The paper's protocol (Cheng et al., MIDL 2025; the DINO and RETFound evaluation code): the teacher
backbone is frozen; a ViT's feature is the concatenated [CLS] token of its last 4 blocks, each passed
through the final LayerNorm (what DINO's `eval_linear.py` does with `get_intermediate_layers`; here
timm's `forward_intermediates(..., norm=True)`), a CNN's is its global-pooled output.

- `extract_features` / `split_features`: centre-crop (evaluation view) features of a split, or of
  train, val and test, read from / written to a `FeatureCache` keyed by the exact weights;
- `train_crops`, `TrainViews`: the paper probe's training view, random crops of the decoded
  full-resolution image (the paper probe computes their features batch by batch).

Features are float32 unless bf16 autocast is asked for (`feature_precision`); the cache key holds
the device type and the dtype, so features of the two never mix.  The probes that use these
features are in `raydino.eval.probes`.  No Ray here.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.transforms import v2

from raydino.augment.ops import normalize
from raydino.core.model import is_vit
from raydino.data.labelled import CROP_PCT, SPLITS, DecodedImages, LabelledData, LabelledSplit, decode_image, eval_transform
from raydino.progress import LinePrinter, Progress

N_LAST_BLOCKS = 4
FEATURE_VERSION = 2  # bump when the feature definition changes (invalidates caches); 2: fp32 by default
FEATURE_DTYPES = ("fp32", "bf16")


@contextlib.contextmanager
def frozen(backbone: nn.Module):
    """Eval mode and no grad for the duration; the caller's mode is restored (the teacher may be training)."""
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            yield backbone
    finally:
        backbone.train(was_training)


def backbone_features(backbone: nn.Module, x: torch.Tensor, n_last_blocks: int = N_LAST_BLOCKS) -> torch.Tensor:
    """ViT: [CLS] of the last n blocks, each through the final norm, concatenated; CNN: pooled output."""
    if is_vit(backbone) and hasattr(backbone, "forward_intermediates"):
        n = min(n_last_blocks, len(backbone.blocks))
        outs = backbone.forward_intermediates(x, indices=n, norm=True, return_prefix_tokens=True, output_fmt="NLC", intermediates_only=True)
        return torch.cat([prefix[:, 0] for _, prefix in outs], dim=-1)
    return backbone(x)


@contextlib.contextmanager
def feature_precision(device: torch.device, dtype: str = "fp32"):
    """The precision features are computed in: "fp32" (the protocol) or "bf16" (autocast, when asked).

    fp32 means IEEE float32: on CUDA, TF32 matmuls and convolutions (cuDNN allows TF32 convolutions
    by default) are switched off for the duration and restored after.  bf16 roughly doubles GPU
    extraction speed; the features are cast back to float32 either way.
    """
    if dtype not in FEATURE_DTYPES:
        raise ValueError(f"feature dtype {dtype!r}: allowed {', '.join(FEATURE_DTYPES)}")
    if dtype == "bf16":
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
        return
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def extract_features(
    backbone: nn.Module,
    images: LabelledSplit | torch.Tensor,
    image_size: int,
    batch_size: int = 64,
    crop_pct: float = CROP_PCT,
    num_workers: int | None = None,
    progress: LinePrinter = print,
    label: str = "features",
    dtype: str = "fp32",
) -> np.ndarray:
    """Frozen features (float32, N × D) on the backbone's device; `images` is a split or uint8 NCHW.

    `dtype` "bf16" computes them under bf16 autocast (see `feature_precision`).
    """
    device = next(backbone.parameters()).device
    if isinstance(images, torch.Tensor):
        batches = images.split(batch_size)
        total = len(images)
    else:
        if num_workers is None:  # decoding is the bottleneck in front of a GPU; on CPU it competes
            num_workers = min(8, os.cpu_count() or 1) if device.type == "cuda" else 0
        batches = torch.utils.data.DataLoader(
            DecodedImages(images.items, eval_transform(image_size, crop_pct), images.ids),
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=device.type == "cuda",
            generator=torch.Generator(),  # its own: iterating must not draw from the caller's RNG
        )
        total = len(images)
    meter = Progress(total, label, unit="images", sink=progress, enabled=progress is not None, min_interval_s=10.0)
    out = []
    with frozen(backbone), feature_precision(device, dtype):
        for batch in batches:
            x = normalize(batch.to(device, non_blocking=True))
            out.append(backbone_features(backbone, x).float().cpu())
            meter.update(len(batch))
    return torch.cat(out).numpy()


def backbone_fingerprint(backbone: nn.Module) -> str:
    """Hash of every weight: features cached under it can only belong to these exact weights."""
    h = hashlib.sha1(type(backbone).__name__.encode())
    for k, v in backbone.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # 0-d too (BN counters)
    return h.hexdigest()[:16]


class FeatureCache:
    """`DIR/<key>/<split>.npz` with features, labels and ids; a second probe reads instead of extracting."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)

    @staticmethod
    def key(backbone_fp: str, data: LabelledData, image_size: int, crop_pct: float, *, device_type: str, dtype: str) -> str:
        """Weights, data, view, and where and in what precision the features were computed: fp32 and bf16
        features (or CPU and CUDA ones, whose kernels differ) are never read for one another."""
        raw = f"{backbone_fp}|{data.fingerprint()}|{image_size}|{crop_pct}|{N_LAST_BLOCKS}|{device_type}|{dtype}|v{FEATURE_VERSION}"
        return hashlib.sha1(raw.encode()).hexdigest()[:16]

    def load(self, key: str, split: str) -> np.ndarray | None:
        path = self.directory / key / f"{split}.npz"
        if not path.exists():
            return None
        with np.load(path) as z:
            return z["features"]

    def save(self, key: str, split: str, features: np.ndarray, data: LabelledData) -> Path:
        path = self.directory / key / f"{split}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        s = data.splits[split]
        np.savez(tmp, features=features, labels=s.labels, ids=np.asarray(s.ids))
        os.replace(tmp, path)  # never a half-written cache file
        return path


def split_features(
    backbone: nn.Module,
    data: LabelledData,
    image_size: int,
    *,
    batch_size: int = 64,
    crop_pct: float = CROP_PCT,
    cache_dir: str | os.PathLike | None = None,
    progress: LinePrinter = print,
    dtype: str = "fp32",
) -> dict[str, np.ndarray]:
    """Features of train, val and test, read from / written to `cache_dir` when given."""
    cache = FeatureCache(cache_dir) if cache_dir else None
    device_type = next(backbone.parameters()).device.type
    key = cache.key(backbone_fingerprint(backbone), data, image_size, crop_pct, device_type=device_type, dtype=dtype) if cache else ""
    out = {}
    for s in SPLITS:
        feats = cache.load(key, s) if cache else None
        if feats is not None and len(feats) == len(data.splits[s]):
            if progress:
                progress(f"features {s}: {len(feats)} from cache {cache.directory / key}")
        else:
            feats = extract_features(
                backbone,
                data.splits[s],
                image_size,
                batch_size,
                crop_pct,
                progress=progress,
                label=f"features {s}",
                dtype=dtype,
            )
            if cache:
                cache.save(key, s, feats, data)
        out[s] = feats
    return out


# ---------------------------------------------------------------- the paper probe's training view


_INTERPOLATION = {"bilinear": v2.InterpolationMode.BILINEAR, "bicubic": v2.InterpolationMode.BICUBIC}


def train_crops(image_size: int, scale: tuple[float, float], interpolation: str, flip: bool, ratio: tuple[float, float]) -> v2.Transform:
    """The paper probe's training view, applied to the decoded full-resolution image.

    With `raydino.eval.probes.PAPER`'s settings, the authors' `RandomResizedCrop(224)` with torchvision's
    defaults: a box of 8-100 % of the image's area (aspect 3/4-4/3) resized to `image_size`, bilinear
    (antialiased, as PIL resizes); no horizontal flip (DINO's own eval_linear flips, the authors' does not).
    """
    if interpolation not in _INTERPOLATION:
        raise ValueError(f"interpolation {interpolation!r}: allowed {', '.join(_INTERPOLATION)}")
    steps: list[v2.Transform] = [
        v2.RandomResizedCrop(image_size, scale=scale, ratio=ratio, interpolation=_INTERPOLATION[interpolation], antialias=True)
    ]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps)


class TrainViews(torch.utils.data.Dataset):
    """(training view, label) pairs: each image decoded at full resolution when it is drawn, then cropped.

    Nothing decoded is kept between epochs, so memory stays that of the encoded items (file paths,
    or the bytes of labelled shards) however large the photographs; in a DataLoader the decoding
    and cropping run in its workers.  `images` may also hold decoded uint8 CHW tensors.
    """

    def __init__(
        self, images: Sequence[str | bytes | torch.Tensor], labels: np.ndarray, transform: v2.Transform, ids: Sequence[str] | None = None
    ) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} training images but {len(labels)} labels")
        self.images, self.labels, self.transform, self.ids = images, np.asarray(labels), transform, ids

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        item = self.images[i]
        image = item if isinstance(item, torch.Tensor) else decode_image(item, self.ids[i] if self.ids else None)
        return self.transform(image), int(self.labels[i])


def decode_train_images(split: LabelledSplit) -> DecodedImages:
    """The training split as full-resolution images, decoded on access (random crops are cut from these)."""
    return DecodedImages(split.items, None, split.ids)
