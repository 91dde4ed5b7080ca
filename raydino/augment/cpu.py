"""DINO multi-crop augmentation on uint8 tensors, fast on one CPU core.

Semantics are DINO's `DataAugmentationDINO` (and the paper's medical artefacts), parameter for
parameter; every knob is a field of `raydino.config.AugmentConfig`:

    2 global crops   RandomResizedCrop(global_crop_size, global_crop_scale, ratio), bicubic
    n local crops    RandomResizedCrop(local_crop_size, local_crop_scale, ratio), bicubic
    every crop       flip (flip_p) -> ColorJitter(b, c, s, h) in a random order (jitter_p)
                     -> grayscale (grayscale_p) -> Gaussian blur, sigma ~ U(blur_sigma), with
                     p = blur_p_global1 / blur_p_global2 / blur_p_local -> solarize (global 2 only)
                     -> medical artefacts (med blur, Gaussian noise, bias field; see `ops.photometric_`)

Output: uint8 CHW crops, globals first.  Normalisation happens later on the training device
(`raydino.augment.ops.normalize`).

Why it is faster (DINO's PIL pipeline manages ~65 images/s per core; see docs/augment.md):
  * every random number of a batch is drawn up front, vectorised, in numpy (`raydino.augment.params`);
  * the image is decoded once (JPEG draft mode when every crop allows it, `raydino.augment.decode`);
  * each crop is cut as a view and resized on uint8 with torch's native antialiased bicubic kernel
    (a channels-last view: the kernel's own layout, ~25 % faster; the resize writes straight into
    a reused HWC buffer for the fused backend);
  * photometric ops, three interchangeable backends (same draws, outputs within +-1 grey level):
    - "fused" (the CPU default when Numba is installed, `raydino.augment.fused`): every op of
      every crop of one kind of one image in a single compiled call, planar float32, nothing
      returning to Python between ops;
    - "opencv" (`raydino.augment.opencv`): crop by crop, all ops of a crop back to back on a
      float32 HWC crop that stays in L2, each op one SIMD library call;
    - "torch" (the fallback, and the device pipeline's ops; `raydino.augment.ops`): crops of one
      kind stacked and every op batched in float32 on [0, 255]; crops laid out by the step at which
      their hue op runs (`jitter_blocks`), so each of the 4 jitter steps is at most 3 calls whatever
      the mix of random orders; the blur a separable, radius-grouped Gaussian (shift-and-add).
Photometric ops keep float precision between steps (torchvision/PIL round to uint8 after every
op); the parameter distributions are identical to DINO's, which tests/test_augment_distribution.py
checks against a PIL/torchvision reference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import fields
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as TF

from raydino.augment.decode import ImageInput, as_bytes, decode, draft_scales, image_size, to_chw_uint8
from raydino.augment.ops import bias_field_maps, jitter_blocks, photometric_
from raydino.augment.params import JITTER_ORDERS, CropParams, sample_params
from raydino.config import AugmentConfig

try:  # the fastest CPU backend: every photometric op of a crop kind in one compiled call
    from raydino.augment import fused as _fused

    _FUSED_ERROR = ""
except ImportError as _e:  # pragma: no cover - depends on the environment
    _fused, _FUSED_ERROR = None, f"{type(_e).__name__}: {_e}"

try:  # the OpenCV backend; without either, the batched torch backend does the same ops
    from raydino.augment import opencv as _cv

    _CV_ERROR = ""
except ImportError as _e:  # pragma: no cover - depends on the environment
    _cv, _CV_ERROR = None, f"{type(_e).__name__}: {_e}"

BACKENDS = ("auto", "fused", "opencv", "torch")
_RESIZE_AA = {"bicubic": torch._C._nn._upsample_bicubic2d_aa, "bilinear": torch._C._nn._upsample_bilinear2d_aa}


def available_backends() -> list[str]:
    """The CPU backends this environment can run, fastest first ("auto" picks the first)."""
    return [name for name, module in (("fused", _fused), ("opencv", _cv), ("torch", torch)) if module is not None]


def crop_shapes(cfg: AugmentConfig) -> dict[str, tuple[int, int, int]]:
    """Crop name -> (C, H, W) of what `augment_batch` emits per image (globals first)."""
    shapes = {f"global_{i}": (3, cfg.global_crop_size, cfg.global_crop_size) for i in range(2)}
    shapes.update({f"local_{i}": (3, cfg.local_crop_size, cfg.local_crop_size) for i in range(cfg.n_local_crops)})
    return shapes


class MultiCropAugment:
    """DINO multi-crop augmentation built from an `AugmentConfig`; never imports Ray.

    >>> aug = MultiCropAugment(AugmentConfig(preset="weak"), seed=0)
    >>> crops = aug(image)            # list of uint8 [3, S, S]: global_0, global_1, local_0, ...
    >>> batch = aug.augment_batch(list_of_jpeg_bytes)   # {"global_0": uint8 [B, 3, S, S], ...}

    Randomness comes from a numpy Generator seeded by `seed` (None: fresh entropy); every call may
    pass its own `generator` (an int seed or a torch.Generator) for reproducible draws.
    """

    def __init__(self, cfg: AugmentConfig | None = None, seed: int | None = None, chunk_images: int = 32, backend: str = "auto") -> None:
        self.cfg = cfg if cfg is not None else AugmentConfig()
        if chunk_images < 1:
            raise ValueError(f"chunk_images={chunk_images}: must be >= 1")
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}: allowed {list(BACKENDS)}")
        if backend == "fused" and _fused is None:
            raise ValueError(f"backend='fused': Numba is not importable ({_FUSED_ERROR}); pip install numba, or use backend='opencv' or 'torch'")
        if backend == "opencv" and _cv is None:
            raise ValueError(f"backend='opencv': OpenCV is not importable ({_CV_ERROR}); pip install opencv-python-headless, or use backend='torch'")
        # "fused": one compiled call per crop kind and image (raydino.augment.fused), the fastest CPU
        # path; "opencv": per-crop SIMD library calls (raydino.augment.opencv); "torch": the batched
        # ops of raydino.augment.ops (the device pipeline's, and the fallback without either).
        self.backend = available_backends()[0] if backend == "auto" else backend
        # The torch backend runs photometric ops on the crops of `chunk_images` images at a time
        # (~2 MB of float crops per image): per-call overhead, not memory, limits small batches.
        self.chunk_images = chunk_images
        self._buffers: dict[str, torch.Tensor] = {}
        self.group_bytes = 8 << 20  # the fused backend's decoded pixels per phase (`_group_size`)
        self._workspace = _cv.CropWorkspace() if _cv is not None else None
        self.rng = np.random.default_rng(seed)
        self.mode = self.cfg.interpolation
        self.kinds = [("global", self.cfg.global_crop_size, [0, 1])]
        if self.cfg.n_local_crops > 0:
            self.kinds.append(("local", self.cfg.local_crop_size, list(range(2, 2 + self.cfg.n_local_crops))))
        self.out_size = np.array([self.cfg.global_crop_size] * 2 + [self.cfg.local_crop_size] * self.cfg.n_local_crops)

    def crop_shapes(self) -> dict[str, tuple[int, int, int]]:
        return crop_shapes(self.cfg)

    def _rng_for(self, generator: torch.Generator | int | None) -> np.random.Generator:
        if generator is None:
            return self.rng
        if isinstance(generator, torch.Generator):
            return np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))
        return np.random.default_rng(int(generator))

    def sample_params(self, sizes: Sequence[tuple[int, int]], generator: torch.Generator | int | None = None) -> CropParams:
        """The random draws a batch of images of these (height, width) would get."""
        return sample_params(self.cfg, sizes, self._rng_for(generator))

    def __call__(self, image: ImageInput, generator: torch.Generator | int | None = None) -> list[torch.Tensor]:
        """One image (uint8 CHW tensor, HWC array or encoded bytes) -> list of uint8 crops, globals first."""
        out = self.augment_tensors([image], generator)
        return [out[k][0] for k in crop_shapes(self.cfg)]

    def augment_bytes(self, data: bytes, generator: torch.Generator | int | None = None) -> list[torch.Tensor]:
        """Encoded image (JPEG: draft-mode reduced decode when every crop allows it) -> crops."""
        if as_bytes(data) is None:
            raise TypeError(f"augment_bytes expects encoded bytes, got {type(data).__name__}")
        return self(data, generator)

    def augment_batch(self, images: Sequence[ImageInput], generator: torch.Generator | int | None = None) -> dict[str, np.ndarray]:
        """Images -> {"global_0": uint8 [B, 3, Sg, Sg], "global_1": ..., "local_0": [B, 3, Sl, Sl], ...}."""
        return {k: v.numpy() for k, v in self.augment_tensors(images, generator).items()}

    def augment_tensors(
        self, images: Sequence[ImageInput], generator: torch.Generator | int | None = None, params: CropParams | None = None
    ) -> dict[str, torch.Tensor]:
        """As `augment_batch` but returns torch tensors; `params` replays given draws (tests, debugging)."""
        images = list(images)
        if not images:  # e.g. a Ray Data batch whose rows were all filtered out
            return {k: torch.empty((0, *shape), dtype=torch.uint8) for k, shape in crop_shapes(self.cfg).items()}
        sizes = [image_size(im) for im in images]
        if params is None:
            params = self.sample_params(sizes, generator)
        return self._run(images, params)

    # -- internals

    def _run(self, images: list, p: CropParams) -> dict[str, torch.Tensor]:
        run = {"fused": self._run_fused, "opencv": self._run_per_crop, "torch": self._run_batched}[self.backend]
        return run(images, p)

    def _run_fused(self, images: list, p: CropParams) -> dict[str, torch.Tensor]:
        """Numba backend: images in groups; per group every image is decoded, then every crop of
        every image resized into reused HWC buffers, then one compiled call per crop kind and image
        does every photometric op and writes the uint8 CHW output.

        Why phases: decoding a few images back to back, then resizing them, then the photometric
        calls, keeps each stage's code and tables in cache (libjpeg's, torch's resize kernel's,
        Numba's); interleaving them image by image measured 5-10 % slower at 512 px (docs/performance.md).
        At 512 px a fifth of the OpenCV backend's time was Python between its calls, so the loop
        only reads Python lists and reuses views made once per batch.
        """
        cfg, B, K = self.cfg, len(images), 2 + self.cfg.n_local_crops
        out = {name: np.empty((len(crops), B, 3, size, size), dtype=np.uint8) for name, size, crops in self.kinds}
        order = JITTER_ORDERS[p.jitter_order]  # [B, K, 4]
        factors = np.stack([p.brightness, p.contrast, p.saturation, p.hue], axis=-1)
        solarize = p.solarize & (np.arange(K) == 1)  # DINO solarizes global crop 2 only
        flags = [
            np.ascontiguousarray(a)
            for a in (p.flip, p.jitter, order, factors, p.grayscale, p.blur, p.blur_sigma, solarize, p.med_blur, p.noise, p.bias_field)
        ]
        no_noise, no_bias = np.zeros((K, 1, 1, 3), np.float32), np.zeros((K, 1, 1), np.float32)
        scalars = (float(cfg.solarize_threshold), float(cfg.med_blur_sigma), 255.0 * float(cfg.noise_std), cfg.jitter_hue == 0)
        boxes = np.stack([p.top, p.left, p.height, p.width], axis=-1).tolist()  # [B][K][4] Python ints
        medical = p.noise.any() or p.bias_field.any()
        resize = _RESIZE_AA[self.mode]
        drafts = draft_scales(p, self.out_size).tolist()
        group = self._group_size(p, drafts)
        kinds = []
        for name, size, crops in self.kinds:  # HWC crop buffers of a group, numpy views, a [1, 3, S, S] view per crop
            hwc = self._buffer(f"{name}_hwc", (group, len(crops), size, size, 3), torch.uint8)
            views = [[hwc[g, i].permute(2, 0, 1).unsqueeze(0) for i in range(len(crops))] for g in range(group)]
            kinds.append((name, size, crops, hwc.numpy(), views))
        for start in range(0, B, group):
            decoded = [self._decoded(images[b], p, b, drafts) for b in range(start, min(B, start + group))]
            for g, (img, sy, sx) in enumerate(decoded):  # every resize of the group
                b = start + g
                full = sy == 1.0 and sx == 1.0 and img.stride(0) == 1  # boxes index img directly
                if full:
                    _, sh, sw = img.stride()
                    base, bstride = img.storage_offset(), sh * img.shape[1]
                for _, size, crops, _, views in kinds:
                    for i, k in enumerate(crops):
                        t, left, h, w = boxes[b][k]
                        if full:  # _box_view inlined: this loop runs ten times per image
                            box = torch.as_strided(img, (1, 3, h, w), (bstride, 1, sh, sw), base + t * sh + left * sw)
                        else:
                            box = self._box_view(img, (t, left, h, w), sy, sx)
                        resize(box, (size, size), False, out=views[g][i])
            decoded = None  # the decoded images are no longer needed: free them before the float work
            for g in range(min(group, B - start)):
                b = start + g
                for name, size, crops, hwc, _ in kinds:
                    noise_maps, bias_maps = no_noise, no_bias
                    if medical and p.noise[b, crops].any():  # the OpenCV backend's streams: one per (image, crop)
                        noise_maps = np.stack(
                            [np.random.default_rng((p.noise_seed[b], k)).standard_normal((size, size, 3), dtype=np.float32) for k in crops]
                        )
                    if medical and p.bias_field[b, crops].any():
                        bias_maps = bias_field_maps(p.bias_coeffs[b, crops], size, size, torch.device("cpu"))[:, 0].numpy()
                    _fused.photometric_kind(hwc[g], out[name], b, crops[0], *flags, noise_maps, bias_maps, *scalars)
        names = {"global": [f"global_{i}" for i in range(2)], "local": [f"local_{i}" for i in range(self.cfg.n_local_crops)]}
        return {key: torch.from_numpy(out[name][i]) for name, _, _ in self.kinds for i, key in enumerate(names[name])}

    def _group_size(self, p: CropParams, drafts: list[int]) -> int:
        """Images per decode/resize/photometric phase of the fused backend: up to 8, fewer when the
        decoded images are large, so that a group's decoded pixels stay under ~8 MB (camera-size
        photographs decode to 10-36 MB each; one at a time is then as fast)."""
        largest = max(3 * (int(h) // d) * (int(w) // d) for h, w, d in zip(p.image_height, p.image_width, drafts))  # draft-decoded size
        return max(1, min(8, self.group_bytes // max(largest, 1)))

    def _run_per_crop(self, images: list, p: CropParams) -> dict[str, torch.Tensor]:
        """OpenCV backend: image by image, crop by crop, every op of a crop while it sits in cache."""
        B = len(images)
        out = {name: np.empty((len(crops), B, 3, size, size), dtype=np.uint8) for name, size, crops in self.kinds}
        slots = [(name, size, k, i) for name, size, crops in self.kinds for i, k in enumerate(crops)]
        # Every draw as nested Python lists: per-crop reads are then list lookups, not numpy scalar
        # boxing (~40 reads per crop; Python overhead is a tenth of the per-crop cost here).
        q = SimpleNamespace(**{f.name: getattr(p, f.name).tolist() for f in fields(p)}, order=JITTER_ORDERS[p.jitter_order].tolist())
        drafts = draft_scales(p, self.out_size).tolist()
        for b in range(B):
            img, sy, sx = self._decoded(images[b], p, b, drafts)
            for name, size, k, i in slots:
                box = (q.top[b][k], q.left[b][k], q.height[b][k], q.width[b][k])
                crop = self._resize_box(img, box, size, sy, sx)[0].permute(1, 2, 0).numpy()
                self._photometric_crop(crop, q, b, k, list(out[name][i, b]))
        names = {"global": [f"global_{i}" for i in range(2)], "local": [f"local_{i}" for i in range(self.cfg.n_local_crops)]}
        return {key: torch.from_numpy(out[name][i]) for name, _, _ in self.kinds for i, key in enumerate(names[name])}

    def _photometric_crop(self, crop: np.ndarray, q: SimpleNamespace, b: int, k: int, planes: list[np.ndarray]) -> None:
        """Flip and DINO's photometric ops, in DINO's order, on one uint8 HWC crop; result -> CHW planes.

        q holds the draws of `CropParams` as nested lists (q.flip[b][k], ...) plus q.order[b][k],
        the crop's jitter op order.
        """
        cfg, ws, size = self.cfg, self._workspace, crop.shape[0]
        if not crop.flags.c_contiguous:  # OpenCV wants interleaved HWC (the channels-last resize gives it)
            crop = np.ascontiguousarray(crop)
        if q.flip[b][k]:
            crop = _cv.cv2.flip(crop, 1, dst=ws.get("flip", size, np.uint8))
        jitter, gray, blur, med_blur, noise, bias = (
            q.jitter[b][k],
            q.grayscale[b][k],
            q.blur[b][k],
            q.med_blur[b][k],
            q.noise[b][k],
            q.bias_field[b][k],
        )
        solarize = q.solarize[b][k] and k == 1  # DINO solarizes global crop 2 only
        if not (jitter or gray or blur or solarize or med_blur or noise or bias):
            _cv.cv2.split(crop, planes)  # nothing photometric: the resized crop is the output
            return
        x = ws.get("x", size)
        np.copyto(x, crop)  # uint8 -> float32 on [0, 255], once per crop
        if jitter:
            factors = (q.brightness[b][k], q.contrast[b][k], q.saturation[b][k])
            for op in q.order[b][k]:
                if op == 3:
                    if q.hue[b][k] != 0:  # jitter_hue = 0: torchvision skips the op
                        _cv.hue_(x, q.hue[b][k], ws.get("hsv", size))
                elif factors[op] != 1:
                    _cv.JITTER_FNS[op](x, factors[op])
        if gray:
            _cv.grayscale_(x)
        if blur:
            x = _cv.gaussian_blur(x, q.blur_sigma[b][k], ws.other(x))
        if solarize:
            _cv.solarize_(x, float(cfg.solarize_threshold))
        if med_blur:
            x = _cv.gaussian_blur(x, max(cfg.med_blur_sigma, 1e-3), ws.other(x))
        if noise:
            # one stream per (image, crop), seeded by the image's draw: independent of batch composition
            noise = np.random.default_rng((q.noise_seed[b], k)).standard_normal(x.shape, dtype=np.float32)
            np.clip(np.add(x, noise * np.float32(255.0 * cfg.noise_std), out=x), 0, 255, out=x)
        if bias:
            field = bias_field_maps(np.array([q.bias_coeffs[b][k]]), size, size, torch.device("cpu"))[0, 0].numpy()
            np.clip(np.multiply(x, field[:, :, None], out=x), 0, 255, out=x)
        _cv.to_uint8_planes(x, ws.get("u8", size, np.uint8), planes)

    def _run_batched(self, images: list, p: CropParams) -> dict[str, torch.Tensor]:
        """torch backend: crops stacked per kind, photometric ops batched over chunks of images."""
        B = len(images)
        out = {name: torch.empty((len(crops), B, 3, size, size), dtype=torch.uint8) for name, size, crops in self.kinds}
        drafts = draft_scales(p, self.out_size).tolist()
        for start in range(0, B, self.chunk_images):
            chunk = range(start, min(B, start + self.chunk_images))
            layouts = [self._layout(p, chunk, name, crops, size) for name, size, crops in self.kinds]
            for b in chunk:
                img, sy, sx = self._decoded(images[b], p, b, drafts)
                for (_, _, slot, x), (_, size, crops) in zip(layouts, self.kinds):
                    for k in crops:  # uint8 crop -> its float slot (the conversion is this copy)
                        x[slot[b - start, k]].copy_(self._crop(img, p, b, k, size, sy, sx))
            for (bb, kk, _, x), (name, _, crops) in zip(layouts, self.kinds):
                photometric_(x, p.select(bb, kk), self.cfg, is_global2=(kk == 1))
                # values lie in [0, 255]: +0.5, then the truncating cast rounds.  Via int32: torch's
                # float->uint8 cast is not vectorised on CPU, float->int32->uint8 is (2x faster).
                xi = self._buffer("int", x.shape, torch.int32).copy_(x.add_(0.5))
                for i, (b, k) in enumerate(zip(bb, kk)):
                    out[name][k - crops[0], b].copy_(xi[i])
        names = {"global": [f"global_{i}" for i in range(2)], "local": [f"local_{i}" for i in range(self.cfg.n_local_crops)]}
        return {key: out[name][i] for name, _, _ in self.kinds for i, key in enumerate(names[name])}

    def _layout(self, p: CropParams, chunk: range, name: str, crops: list[int], size: int):
        """Slots of one crop kind for a chunk of images, in `jitter_blocks` order, and their float buffer."""
        bb = np.repeat(np.array(list(chunk)), len(crops))
        kk = np.tile(np.array(crops), len(chunk))
        order = np.argsort(jitter_blocks(p.select(bb, kk)), kind="stable")
        bb, kk = bb[order], kk[order]
        slot = np.empty((len(chunk), 2 + self.cfg.n_local_crops), dtype=np.int64)
        slot[bb - chunk.start, kk] = np.arange(len(bb))
        return bb, kk, slot, self._buffer(f"{name}_float", (len(bb), 3, size, size), torch.float32)

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A reused work buffer: fresh multi-MB allocations cost a page fault per 4 kB on first touch."""
        n = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype:
            buf = self._buffers[name] = torch.empty(n, dtype=dtype)
        return buf[:n].view(shape)

    def _decoded(self, item: ImageInput, p: CropParams, b: int, drafts: list[int]) -> tuple[torch.Tensor, float, float]:
        """Image b as uint8 [3, H', W'] (encoded: decoded at 1/drafts[b], see `draft_scales`) and its scale of full size."""
        data = as_bytes(item)
        img = decode(data, drafts[b]) if data is not None else to_chw_uint8(item)
        return img, img.shape[1] / int(p.image_height[b]), img.shape[2] / int(p.image_width[b])

    def _crop(self, img: torch.Tensor, p: CropParams, b: int, k: int, size: int, sy: float, sx: float) -> torch.Tensor:
        """Crop box -> one antialiased resize on uint8 (torch's native kernel) -> flip: uint8 [3, S, S]."""
        box = (int(p.top[b, k]), int(p.left[b, k]), int(p.height[b, k]), int(p.width[b, k]))
        crop = self._resize_box(img, box, size, sy, sx)[0]
        return crop.flip(-1) if p.flip[b, k] else crop

    def _resize_box(self, img: torch.Tensor, box: tuple[int, int, int, int], size: int, sy: float, sx: float) -> torch.Tensor:
        """The crop box resized to size x size: uint8 [1, 3, S, S], channels-last (HWC memory) when img
        is, as decoded images are: the layout the uint8 kernel computes in (25-30 % faster)."""
        return TF.interpolate(self._box_view(img, box, sy, sx), size=(size, size), mode=self.mode, antialias=True, align_corners=False)

    @staticmethod
    def _box_view(img: torch.Tensor, box: tuple[int, int, int, int], sy: float, sx: float) -> torch.Tensor:
        """The crop box (top, left, height, width) of the full-size image as a [1, 3, h, w] view of
        img (decoded at sy, sx of full size); channels-last strides when img has them."""
        t, left, h, w = box
        if sy != 1.0 or sx != 1.0:  # draft-decoded: the box in reduced coordinates (sub-pixel rounding)
            t, left = min(round(t * sy), img.shape[1] - 1), min(round(left * sx), img.shape[2] - 1)
            h, w = max(1, min(round(h * sy), img.shape[1] - t)), max(1, min(round(w * sx), img.shape[2] - left))
        if img.stride(0) == 1:  # HWC memory: a batch stride of a whole image, or torch takes the box for NCHW
            sc, sh, sw = img.stride()
            return torch.as_strided(img, (1, 3, h, w), (sh * img.shape[1], sc, sh, sw), img.storage_offset() + t * sh + left * sw)
        return img[:, t : t + h, left : left + w].unsqueeze(0)
