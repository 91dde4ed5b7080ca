"""The photometric ops of the multi-crop augmentation, batched on float tensors (any device), and the
one normalisation of uint8 crops into model input.

x: float32 [N, 3, H, W] on [0, 255], contiguous, modified in place.  Per-crop factors are numpy
arrays of length N.  Every op below is written as a few whole-tensor passes (in place where it
can): on one CPU core the cost is memory passes and per-call overhead, not arithmetic.  These are
the torch backend of `raydino.augment.cpu` and all of `raydino.augment.device`; the OpenCV
backend (`raydino.augment.opencv`) computes the same functions crop by crop.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as TF

from raydino.augment.params import JITTER_ORDERS, N_BIAS_COEFFS, CropParams
from raydino.config import AugmentConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2, as PIL's convert("L")
TILE_ELEMS = 1 << 20  # floats (4 MB) per group of crops in jitter and blur: cache-sized, few calls


def normalize(crops: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 3, H, W] (any device) -> float32 (x/255 - mean) / std with ImageNet's mean and std.

    The model's input convention, applied where the crops already live (the training device), so
    that uint8 -- a quarter of the bytes -- is what crosses the host-device link.
    """
    if crops.dtype != torch.uint8:
        raise ValueError(f"normalize expects uint8 crops, got dtype {crops.dtype}")
    if crops.dim() < 3 or crops.shape[-3] != 3:
        raise ValueError(f"normalize expects [..., 3, H, W], got shape {tuple(crops.shape)}")
    scale = torch.tensor([1.0 / (255.0 * s) for s in IMAGENET_STD], device=crops.device).view(3, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)], device=crops.device).view(3, 1, 1)
    return crops.float().mul_(scale).sub_(shift)


def _col(v: np.ndarray, x: torch.Tensor) -> torch.Tensor:
    """Per-crop scalars as an [N, 1, 1, 1] tensor on x's device."""
    return torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)).to(x.device).view(-1, 1, 1, 1)


def luma(x: torch.Tensor) -> torch.Tensor:
    """[N, 1, H, W] luma, ITU-R 601-2 (PIL's convert("L"), torchvision's rgb_to_grayscale)."""
    y = torch.mul(x[:, 0:1], GRAY_WEIGHTS[0])  # three plane passes: cheaper than a K=3 matmul
    return y.add_(x[:, 1:2], alpha=GRAY_WEIGHTS[1]).add_(x[:, 2:3], alpha=GRAY_WEIGHTS[2])


def blend_(x: torch.Tensor, weight: np.ndarray, is_saturation: np.ndarray, is_contrast: np.ndarray) -> None:
    """x <- clamp(lerp(x, target, weight), 0, 255) with a per-crop target.

    Brightness, contrast and saturation are all blends (torchvision's and PIL's definitions):
    towards black (weight 1 - b), towards the crop's mean luma (1 - c) and towards the per-pixel
    luma (1 - s).  One form, so crops doing different ops at the same step share one call.
    """
    if is_saturation.any() or is_contrast.any():
        y = luma(x)
        mean = y.mean(dim=(2, 3), keepdim=True)
        target = y.mul_(_col(is_saturation, x)).add_(mean.mul_(_col(is_contrast, x)))
        x.lerp_(target, _col(weight, x))
    else:
        x.mul_(_col(1.0 - weight, x))
    if (weight < 0).any():  # a factor > 1 extrapolates and can leave [0, 255]; a blend cannot
        x.clamp_(0, 255)


_HUE_OFFSETS = torch.tensor([0.0, -2.0, 2.0]).view(1, 3, 1)  # R, G, B sit 0, -2, +2 sextants from red


def adjust_hue_(x: torch.Tensor, shift: np.ndarray) -> None:
    """Rotate the HSV hue by `shift` turns (|shift| <= 0.5), keeping value and saturation.

    Same function as torchvision's adjust_hue (rgb -> hsv -> rgb), rewritten branch-free because
    comparisons, `where` and integer ops are slow on CPU tensors while arithmetic is fast:
      max, min, C = max - min; sign s = +1 if g >= b else -1;
      hue position phi = s * (g + b - r + min - 2 max) / C + 6 * shift   (sextants, red = 0)
      channel = min + C * (2 - clamp(| |phi + o| - 3 |, 1, 2)),  o = 0, -2, +2 for R, G, B
    (the "alternative" HSV->RGB formula; | |t| - 3 | is the 6-periodic wrap, exact for |t| <= 7).
    """
    n, _, h, w = x.shape
    flat = x.view(n, 3, h * w)
    r, g, b = flat.unbind(1)
    vmax, vmin = flat.amax(dim=1), flat.amin(dim=1)
    phi = torch.add(g, b).sub_(r).add_(vmin).sub_(vmax).sub_(vmax)
    chroma = vmax.sub_(vmin).clamp_min_(1e-6)  # grey pixels: phi = 0 and the output is min + ~1e-6
    # sign(g - b) with ties counted as g >= b, from fast ops only (sign_ is ~5x slower than these)
    phi.div_(chroma).mul_(torch.sub(g, b).mul_(1e30).add_(1.0).clamp_(-1.0, 1.0))
    phi.add_(torch.from_numpy(np.asarray(shift, dtype=np.float32) * 6.0).to(x.device).view(n, 1))
    if np.abs(shift).max() > 1 / 6:  # keep |phi + o| <= 7, where the folded wrap below is exact
        phi.sub_(torch.round(phi / 6.0).mul_(6.0))
    t = torch.add(phi.unsqueeze(1), _HUE_OFFSETS.to(x.device))
    t.abs_().sub_(3.0).abs_().clamp_(1.0, 2.0)
    top = vmin.add_(chroma).add_(chroma).unsqueeze(1)  # min + 2C
    torch.addcmul(top, chroma.unsqueeze(1), t, value=-1.0, out=flat)


def jitter_blocks(p: CropParams) -> np.ndarray:
    """Sort key that makes `color_jitter_` cheap: the step (0-3) at which a crop's hue op runs;
    4 for crops without jitter.  Crops must be laid out in ascending key order."""
    hue_step = np.argmax(JITTER_ORDERS[p.jitter_order] == 3, axis=-1)
    return np.where(p.jitter, hue_step, 4)


def color_jitter_(x: torch.Tensor, p: CropParams, skip_hue: bool = False, tile_elems: int = TILE_ELEMS) -> None:
    """torchvision's ColorJitter on every crop with p.jitter, each in its own random op order.

    Step j applies op JITTER_ORDERS[order][j] to every crop.  With crops sorted by
    `jitter_blocks`, the crops whose hue op falls at step j are one contiguous slice, and the
    others (brightness / contrast / saturation) one `blend_` call on each side of it: 4 steps of
    at most 3 calls per tile.  Tiles of ~`tile_elems` floats (4 MB) keep each tile's four steps
    in cache: on one core the jitter is memory-bound, and whole-batch passes would stream from RAM.
    """
    key = jitter_blocks(p)
    if np.any(np.diff(key) < 0):
        raise ValueError("color_jitter_: crops are not laid out in jitter_blocks order")
    n_jit = int(np.sum(key < 4))
    ops = JITTER_ORDERS[p.jitter_order[:n_jit]]  # [n_jit, 4]
    factor = np.stack([p.brightness, p.contrast, p.saturation], axis=1)[:n_jit]
    tile = max(1, tile_elems // max(1, x[0].numel()))
    for t0 in range(0, n_jit, tile):
        t1 = min(n_jit, t0 + tile)
        for step in range(4):
            lo, hi = t0 + np.searchsorted(key[t0:t1], [step, step + 1])
            if hi > lo and not skip_hue:
                adjust_hue_(x[lo:hi], p.hue[lo:hi])
            for a, b in ((t0, lo), (hi, t1)):
                if b > a:
                    o = ops[a:b, step]
                    f = factor[np.arange(a, b), np.minimum(o, 2)]
                    blend_(x[a:b], 1.0 - f, o == 2, o == 1)


def _gaussian_kernels(sigma: np.ndarray, radius: int) -> np.ndarray:
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t[None, :] / sigma[:, None]) ** 2)
    return (k / k.sum(1, keepdims=True)).astype(np.float32)


def gaussian_blur_(x: torch.Tensor, mask: np.ndarray, sigma: np.ndarray, tile_elems: int = TILE_ELEMS) -> None:
    """Gaussian blur of the crops in `mask` with their own sigma: kernel truncated at ceil(3 sigma),
    reflect padding, separable.

    DINO's PIL GaussianBlur(radius=r) approximates a Gaussian of standard deviation r by box
    filters; this is the Gaussian itself.  Crops are grouped by kernel radius (sigma 0.3 costs 3
    taps, not sigma 2's 13); each group is blurred by shift-and-add, one `addcmul` per tap with
    per-crop weights.  Measured in the pipeline, this beats a depthwise convolution (oneDNN wants
    channels-last, and the two layout transposes cost more than the taps).
    """
    n, c, h, w = x.shape
    radius = np.minimum(np.maximum(1, np.ceil(3.0 * sigma)).astype(np.int64), min(h, w) - 1)
    tile = max(1, tile_elems // (c * h * w))  # cache-sized groups, as in color_jitter_
    groups = [
        (int(r), idx[i : i + tile])
        for r in np.unique(radius[mask])
        for idx in [np.flatnonzero(mask & (radius == r))]
        for i in range(0, len(idx), tile)
    ]
    for r, idx in groups:
        tidx = torch.from_numpy(idx).to(x.device)
        k = torch.from_numpy(_gaussian_kernels(sigma[idx], r)).to(x.device).view(len(idx), 1, 1, 1, 2 * r + 1)
        sel = x.index_select(0, tidx)
        padded = TF.pad(sel, (r, r, 0, 0), mode="reflect")  # along W
        rows = torch.mul(padded[..., 0:w], k[..., 0])
        for i in range(1, 2 * r + 1):
            rows.addcmul_(padded[..., i : i + w], k[..., i])
        padded = TF.pad(rows, (0, 0, r, r), mode="reflect")  # along H
        out = torch.mul(padded[..., 0:h, :], k[..., 0], out=sel)
        for i in range(1, 2 * r + 1):
            out.addcmul_(padded[..., i : i + h, :], k[..., i])
        x.index_copy_(0, tidx, out)


def bias_field_maps(coeffs: np.ndarray, h: int, w: int, device: torch.device) -> torch.Tensor:
    """exp(sum_{i+j<=3} c_ij x^i y^j) over the crop, x and y in [-1, 1]: [N, 1, h, w].

    TorchIO's RandomBiasField (order 3) in 2-D, coefficients ~ U(-s, s) with s = `bias_field`:
    a smooth multiplicative illumination change (for s = 0.1, typically within +-20 %).
    """
    ys, xs = torch.linspace(-1, 1, h, device=device), torch.linspace(-1, 1, w, device=device)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    basis = torch.stack([xx**i * yy**j for i in range(4) for j in range(4 - i)]).view(N_BIAS_COEFFS, h * w)
    return torch.exp(torch.as_tensor(coeffs, dtype=torch.float32, device=device) @ basis).view(-1, 1, h, w)


def _subset_(x: torch.Tensor, mask: np.ndarray, fn) -> None:
    """x[mask] = fn(x[mask], idx), without a gather when every crop is selected."""
    idx = np.flatnonzero(mask)
    if len(idx) == len(mask):
        out = fn(x, idx)
        if out is not x:
            x.copy_(out)
    elif len(idx):
        t = torch.from_numpy(idx).to(x.device)
        x.index_copy_(0, t, fn(x.index_select(0, t), idx))


def photometric_(x: torch.Tensor, p: CropParams, cfg: AugmentConfig, is_global2: np.ndarray) -> torch.Tensor:
    """Everything after crop + flip, in DINO's order, on float [N, 3, H, W] in [0, 255], in place.

    Crops must be laid out in `jitter_blocks` order.  The medical artefacts come last, each
    independently per crop: med blur (fixed sigma `med_blur_sigma`, in output pixels), additive
    Gaussian noise (std `noise_std` on [0, 1] intensities, i.e. 255 * std here, then clipped),
    bias field (`bias_field_maps`).
    """
    color_jitter_(x, p, skip_hue=cfg.jitter_hue == 0)
    _subset_(x, p.grayscale, lambda t, i: luma(t).expand_as(t))
    gaussian_blur_(x, p.blur, p.blur_sigma)
    thr = float(cfg.solarize_threshold)  # PIL / torchvision: v >= threshold -> 255 - v
    _subset_(x, p.solarize & is_global2, lambda t, i: torch.where(t >= thr, 255.0 - t, t))
    gaussian_blur_(x, p.med_blur, np.full(len(p.med_blur), max(cfg.med_blur_sigma, 1e-3)))
    if p.noise.any():
        # one stream per (chunk, crop kind): seeded by the chunk's first image and the crop size
        gen = torch.Generator(device=x.device).manual_seed(int(p.noise_seed[0]) ^ (x.shape[-1] * 0x9E3779B1))
        std = 255.0 * cfg.noise_std
        _subset_(x, p.noise, lambda t, i: t.add_(torch.randn(t.shape, generator=gen, device=t.device), alpha=std).clamp_(0, 255))
    _subset_(x, p.bias_field, lambda t, i: t.mul_(bias_field_maps(p.bias_coeffs[i], t.shape[2], t.shape[3], t.device)).clamp_(0, 255))
    return x
