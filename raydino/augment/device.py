"""The multi-crop augmentation batched on a torch device (`augment.device: cuda`).

Where a GPU node has few CPU cores, the photometric work can move to the GPU: images are decoded
on the CPU (once, JPEG draft mode as in `raydino.augment.cpu`), sent to the device as uint8, and
everything else runs there for the whole batch at once -- crop + antialiased bicubic resize per
crop, flip, colour jitter, grayscale, blur, solarize and the medical artefacts, with the very same
random draws (`sample_params`) and photometric functions as the CPU pipeline.  It also runs with
device="cpu" (that is how the tests cover it on machines without a GPU).

Output contract is the CPU pipeline's: uint8 crops (on the device), unless `normalize=True`,
which returns float32 crops normalised with ImageNet mean/std, ready for the model.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from raydino.augment.cpu import MultiCropAugment
from raydino.augment.decode import ImageInput, draft_scales
from raydino.augment.ops import normalize, photometric_
from raydino.augment.params import CropParams
from raydino.config import AugmentConfig


class DeviceMultiCropAugment(MultiCropAugment):
    """`MultiCropAugment` whose crops and photometric ops run on `device`, one batch at a time.

    >>> aug = DeviceMultiCropAugment(AugmentConfig(), device="cuda")
    >>> crops = aug.augment_tensors(list_of_jpeg_bytes)   # {"global_0": uint8 [B, 3, S, S] on cuda, ...}
    """

    def __init__(
        self, cfg: AugmentConfig | None = None, device: str | torch.device = "cuda", seed: int | None = None, normalize: bool = False
    ) -> None:
        super().__init__(cfg, seed=seed, backend="torch")  # its own batched _run; the torch ops run on `device`
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"augment.device={self.device.type!r}: CUDA is not available here (allowed: 'cpu', 'cuda')")
        self.normalize = normalize

    def augment_batch(self, images: Sequence[ImageInput], generator: torch.Generator | int | None = None) -> dict[str, np.ndarray]:
        """Same contract as the CPU pipeline: host numpy arrays (uint8, or float32 when normalize)."""
        return {k: v.cpu().numpy() for k, v in self.augment_tensors(images, generator).items()}

    def augment_tensors(
        self, images: Sequence[ImageInput], generator: torch.Generator | int | None = None, params: CropParams | None = None
    ) -> dict[str, torch.Tensor]:
        out = super().augment_tensors(images, generator, params)
        if not len(images):  # keep the empty batch's dtype and device consistent with full ones
            out = {k: (normalize(v) if self.normalize else v).to(self.device) for k, v in out.items()}
        return out

    def _run(self, images: list, p: CropParams) -> dict[str, torch.Tensor]:
        B = len(images)
        chunk = range(0, B)
        # The whole batch is one chunk: a GPU wants big kernels; its memory holds B * ~2 MB easily.
        layouts = [self._layout(p, chunk, name, crops, size) for name, size, crops in self.kinds]
        layouts = [(bb, kk, slot, torch.empty(x.shape, dtype=torch.float32, device=self.device)) for bb, kk, slot, x in layouts]
        drafts = draft_scales(p, self.out_size).tolist()
        for b in range(B):
            img, sy, sx = self._decoded(images[b], p, b, drafts)
            img = img.to(self.device, non_blocking=True)
            if self.device.type != "cpu":
                img = img.float()  # CUDA's antialiased bicubic resize takes float input
            for (_, _, slot, x), (_, size, crops) in zip(layouts, self.kinds):
                for k in crops:
                    x[slot[b, k]].copy_(self._crop(img, p, b, k, size, sy, sx))
        out: dict[str, torch.Tensor] = {}
        for (bb, kk, slot, x), (name, _, crops) in zip(layouts, self.kinds):
            photometric_(x.clamp_(0, 255), p.select(bb, kk), self.cfg, is_global2=(kk == 1))
            x = x.round_().to(torch.uint8)
            if self.normalize:
                x = normalize(x)
            flat = torch.from_numpy(np.concatenate([slot[:, k] for k in crops])).to(self.device)
            stacked = x[flat].view(len(crops), B, *x.shape[1:])  # back to (crop, image) order
            for i, k in enumerate(crops):
                out[f"global_{k}" if name == "global" else f"local_{k - 2}"] = stacked[i]
        return out


def build_augment(cfg: AugmentConfig, seed: int | None = None, device: str | torch.device | None = None) -> MultiCropAugment:
    """The pipeline `cfg.device` selects: CPU (`MultiCropAugment`) or batched on CUDA."""
    dev = torch.device(device) if device is not None else torch.device(cfg.device)
    if dev.type == "cpu" and device is None:
        return MultiCropAugment(cfg, seed=seed)
    return DeviceMultiCropAugment(cfg, device=dev, seed=seed)
