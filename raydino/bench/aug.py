"""`python -m raydino.bench aug`: multi-crop augmentation throughput, raydino vs DINO's published pipeline.

`aug` measures images/s per core, all on the same input (a JPEG of scikit-image's `retina`, a
real fundus photograph, at --size px), interleaved over --rounds rounds (best round kept):

  1. decode only (PIL, torchvision.io, and raydino's `decode`: simplejpeg when installed) -- the
     ceiling for any pipeline that decodes once;
  2. a reference pipeline written here from DINO's published recipe (DataAugmentationDINO:
     PIL + torchvision transforms, PIL GaussianBlur, ToTensor + Normalize);
  3. lightly's DINOTransform with the same parameters, when `lightly` is importable;
  4. raydino's CPU pipeline: one image per call, and `augment_batch` with every installed backend
     (`raydino.augment.cpu.available_backends`: the default, what Ray Data runs, first);
  5. raydino's batched device pipeline on CPU, and on CUDA when a GPU is visible.

"Per core" = images / CPU seconds of this process (`time.process_time`), so a busy machine
(other processes sharing the cores) distorts the ratios less; wall-clock rates are printed
beside them.  `train`, `data`, `gpu` and `shardsize` (raydino.bench.<name>) have their own docs.
"""

from __future__ import annotations

import argparse
import io
import platform
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from raydino.bench.common import fundus_jpeg, time_images
from raydino.progress import Progress

# ------------------------------------------------------------------ the reference: DINO's published recipe


class ReferenceDINOAugment:
    """DINO's `DataAugmentationDINO` (facebookresearch/dino, main_dino.py), written from the paper's
    recipe with PIL and torchvision: RandomResizedCrop (bicubic), flip, RandomApply(ColorJitter,
    p=jitter_p), RandomGrayscale, PIL GaussianBlur(radius ~ U(blur_sigma)) with p per crop kind,
    PIL solarize on global 2, ToTensor + Normalize.  Numbers come from an AugmentConfig.

    `sample_only=True` draws the same random decisions without touching pixels (the distribution
    test compares these draws with raydino's).
    """

    def __init__(self, cfg: Any) -> None:
        from PIL import Image
        from torchvision import transforms as T

        self.cfg = cfg
        interp = Image.BICUBIC if cfg.interpolation == "bicubic" else Image.BILINEAR
        flip_and_color = T.Compose(
            [
                T.RandomHorizontalFlip(p=cfg.flip_p),
                T.RandomApply([T.ColorJitter(cfg.jitter_brightness, cfg.jitter_contrast, cfg.jitter_saturation, cfg.jitter_hue)], p=cfg.jitter_p),
                T.RandomGrayscale(p=cfg.grayscale_p),
            ]
        )
        normalize = T.Compose([T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])

        def crop(size: int, scale: tuple[float, float]) -> Any:
            return T.RandomResizedCrop(size, scale=scale, ratio=cfg.crop_ratio, interpolation=interp)

        self.global1 = T.Compose(
            [crop(cfg.global_crop_size, cfg.global_crop_scale), flip_and_color, _PILBlur(cfg.blur_p_global1, cfg.blur_sigma), normalize]
        )
        self.global2 = T.Compose(
            [
                crop(cfg.global_crop_size, cfg.global_crop_scale),
                flip_and_color,
                _PILBlur(cfg.blur_p_global2, cfg.blur_sigma),
                _PILSolarize(cfg.solarize_p_global2, cfg.solarize_threshold),
                normalize,
            ]
        )
        self.local = T.Compose(
            [crop(cfg.local_crop_size, cfg.local_crop_scale), flip_and_color, _PILBlur(cfg.blur_p_local, cfg.blur_sigma), normalize]
        )

    def __call__(self, data: bytes) -> list[Any]:
        from PIL import Image

        image = Image.open(io.BytesIO(data)).convert("RGB")
        return [self.global1(image), self.global2(image)] + [self.local(image) for _ in range(self.cfg.n_local_crops)]

    def draw(self, height: int, width: int) -> list[dict[str, Any]]:
        """The random decisions one call makes for a height x width image, without pixels.

        Mirrors the forward passes above call for call, in the same order and with the same
        generators: RandomResizedCrop.get_params, torch.rand for flip / RandomApply / grayscale,
        ColorJitter.get_params, Python's random for blur and solarize.
        """
        import torch
        from torchvision import transforms as T

        cfg, shape_only = self.cfg, torch.empty((3, height, width), dtype=torch.uint8)
        kinds = [("global1", cfg.global_crop_scale, cfg.blur_p_global1), ("global2", cfg.global_crop_scale, cfg.blur_p_global2)]
        kinds += [("local", cfg.local_crop_scale, cfg.blur_p_local)] * cfg.n_local_crops
        out = []
        for kind, scale, blur_p in kinds:
            top, left, h, w = T.RandomResizedCrop.get_params(shape_only, list(scale), list(cfg.crop_ratio))
            d: dict[str, Any] = {
                "kind": kind,
                "top": top,
                "left": left,
                "height": h,
                "width": w,
                "flip": bool(torch.rand(1) < cfg.flip_p),
                "jitter": not bool(cfg.jitter_p < torch.rand(1)),
            }
            if d["jitter"]:
                order, b, c, s, hue = T.ColorJitter.get_params(
                    *(None if v == 0 else (max(0.0, 1 - v), 1 + v) for v in (cfg.jitter_brightness, cfg.jitter_contrast, cfg.jitter_saturation)),
                    None if cfg.jitter_hue == 0 else (-cfg.jitter_hue, cfg.jitter_hue),
                )
                d.update(order=tuple(int(i) for i in order), brightness=b, contrast=c, saturation=s, hue=hue)
            d["grayscale"] = bool(torch.rand(1) < cfg.grayscale_p)
            d["blur"] = random.random() <= blur_p
            if d["blur"]:
                d["blur_sigma"] = random.uniform(*cfg.blur_sigma)
            if kind == "global2":
                d["solarize"] = random.random() < cfg.solarize_p_global2
            out.append(d)
        return out


class _PILBlur:
    """DINO's GaussianBlur: PIL ImageFilter.GaussianBlur(radius ~ U(lo, hi)) with probability p."""

    def __init__(self, p: float, sigma: tuple[float, float]) -> None:
        self.p, self.sigma = p, sigma

    def __call__(self, img: Any) -> Any:
        from PIL import ImageFilter

        if random.random() <= self.p:
            return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))
        return img


class _PILSolarize:
    """DINO's Solarization: PIL ImageOps.solarize with probability p."""

    def __init__(self, p: float, threshold: int) -> None:
        self.p, self.threshold = p, threshold

    def __call__(self, img: Any) -> Any:
        from PIL import ImageOps

        return ImageOps.solarize(img, self.threshold) if random.random() < self.p else img


def lightly_transform(cfg: Any) -> tuple[Callable[[bytes], Any] | None, str]:
    """lightly's DINOTransform with the config's numbers, or None and the reason."""
    try:
        from lightly.transforms.dino_transform import DINOTransform
    except Exception as e:  # optional: the `bench` extra
        return None, f"lightly not importable ({type(e).__name__}: {e}); install the bench extra to measure it"
    from PIL import Image

    # lightly multiplies each jitter strength by cj_strength; strength 1 passes the numbers through
    t = DINOTransform(
        global_crop_size=cfg.global_crop_size,
        global_crop_scale=cfg.global_crop_scale,
        local_crop_size=cfg.local_crop_size,
        local_crop_scale=cfg.local_crop_scale,
        n_local_views=cfg.n_local_crops,
        hf_prob=cfg.flip_p,
        cj_prob=cfg.jitter_p,
        cj_strength=1.0,
        cj_bright=cfg.jitter_brightness,
        cj_contrast=cfg.jitter_contrast,
        cj_sat=cfg.jitter_saturation,
        cj_hue=cfg.jitter_hue,
        random_gray_scale=cfg.grayscale_p,
        gaussian_blur=(cfg.blur_p_global1, cfg.blur_p_global2, cfg.blur_p_local),
        sigmas=cfg.blur_sigma,
        solarization_prob=cfg.solarize_p_global2,
    )
    import lightly

    return (lambda data: t(Image.open(io.BytesIO(data)).convert("RGB"))), f"lightly {lightly.__version__}"


# ------------------------------------------------------------------ aug


def _pipelines(cfg: Any, data: bytes, n: int, batch: int, notes: list[str]) -> dict[str, Callable[[], Any]]:
    import torch
    from PIL import Image
    from torchvision.io import decode_jpeg

    from raydino.augment.cpu import MultiCropAugment, available_backends
    from raydino.augment.decode import decode
    from raydino.augment.device import DeviceMultiCropAugment

    items = [data] * n
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    ref = ReferenceDINOAugment(cfg)
    ours = MultiCropAugment(cfg, seed=0)
    out: dict[str, Callable[[], Any]] = {
        "decode only (PIL)": lambda: [np.asarray(Image.open(io.BytesIO(d)).convert("RGB")) for d in items],
        "decode only (torchvision)": lambda: [decode_jpeg(raw) for _ in items],
        "decode only (raydino.augment.decode)": lambda: [decode(d, 1) for d in items],
        "reference DINO (PIL + torchvision)": lambda: [ref(d) for d in items],
    }
    lightly_fn, note = lightly_transform(cfg)
    notes.append(note)
    if lightly_fn is not None:
        out["lightly DINOTransform"] = lambda: [lightly_fn(d) for d in items]
    out["raydino, one image per call"] = lambda: [ours(d) for d in items]
    # the default backend (what Ray Data runs) first, then every other one installed, same draws
    others = [MultiCropAugment(cfg, seed=0, backend=b) for b in available_backends() if b != ours.backend]
    for aug in [ours, *others]:
        out[f"raydino augment_batch, {aug.backend} backend (batch {batch})"] = lambda aug=aug: [
            aug.augment_batch(items[i : i + batch]) for i in range(0, n, batch)
        ]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        aug = DeviceMultiCropAugment(cfg, device=dev, seed=0)

        def run(aug: DeviceMultiCropAugment = aug, dev: str = dev) -> None:
            for i in range(0, n, batch):
                aug.augment_batch(items[i : i + batch])
            if dev == "cuda":
                torch.cuda.synchronize()

        name = f"raydino device pipeline on {dev}" + (f" ({torch.cuda.get_device_name()})" if dev == "cuda" else "")
        out[f"{name} (batch {batch})"] = run
    return out


def bench_aug(args: argparse.Namespace) -> dict[str, Any]:
    """One size (`--size 512`): that size's table.  Several (`--size 512,1024,2048`): a table per size,
    then the ratios side by side; the JSON holds every size's result under ``by_size``."""
    sizes = args.size if isinstance(args.size, list) else [args.size]
    if len(sizes) == 1:
        return _bench_aug_one(args, sizes[0])
    by_size = [_bench_aug_one(args, size) for size in sizes]
    result = {k: v for k, v in by_size[0].items() if k not in ("size", "results", "notes")}
    result.update(sizes=sizes, by_size=by_size)
    print(f"\nraydino bench aug, per CPU core, {result['crops']} crops, preset {result['preset']}:")
    print(f"  {'size':>6}  {'raydino img/s':>13}  {'reference img/s':>15}  {'ratio':>6}")
    for r in by_size:
        ours, ref = _headline(r)
        print(f"  {r['size']:>4}px  {ours['images_per_s_per_core']:>13.1f}  {ref['images_per_s_per_core']:>15.1f}  {ours['vs_reference']:>5.2f}x")
    return result


def _headline(result: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(raydino's best augment_batch row, the reference row) of one size's result."""
    rows = result["results"]
    ref = next(r for r in rows if r["pipeline"].startswith("reference DINO"))
    ours = max((r for r in rows if r["pipeline"].startswith("raydino augment_batch")), key=lambda r: r["images_per_s_per_core"])
    return ours, ref


def _bench_aug_one(args: argparse.Namespace, size: int) -> dict[str, Any]:
    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision.io")
    import torch

    from raydino.config import AugmentConfig

    torch.set_num_threads(args.threads)
    cfg = AugmentConfig(preset=args.preset)
    data, source = fundus_jpeg(size)
    notes = [f"input: {source}"]
    for fn in _pipelines(cfg, data, min(args.batch, args.images), args.batch, []).values():
        fn()  # warm-up: imports, allocator, first-call costs
    pipelines = _pipelines(cfg, data, args.images, args.batch, notes)
    best: dict[str, tuple[float, float]] = {name: (0.0, 0.0) for name in pipelines}
    every: dict[str, list[float]] = {name: [] for name in pipelines}
    progress = Progress(unit="runs", stream=sys.stdout, min_interval_s=0, label=f"bench aug {size}px", total=args.rounds * len(pipelines))
    for r in range(args.rounds):
        for name, fn in pipelines.items():
            per_core, wall = time_images(fn, args.images)
            every[name].append(round(per_core, 1))
            if per_core > best[name][0]:
                best[name] = (per_core, wall)
            progress.step(f"round {r + 1}/{args.rounds} {name}: {per_core:.0f} img/s per core ({wall:.0f} wall)")
    ref = best["reference DINO (PIL + torchvision)"][0]
    rows = [
        {
            "pipeline": k,
            "images_per_s_per_core": round(v[0], 1),
            "images_per_s_wall": round(v[1], 1),
            "vs_reference": round(v[0] / ref, 2),
            "rounds_per_core": every[k],
        }
        for k, v in best.items()
    ]
    result = {
        "bench": "aug",
        "preset": args.preset,
        "images": args.images,
        "size": size,
        "threads": args.threads,
        "batch": args.batch,
        "rounds": args.rounds,
        "crops": f"2x{cfg.global_crop_size} + {cfg.n_local_crops}x{cfg.local_crop_size}",
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip() + f", torch {torch.__version__}",
        "cpu_count": __import__("os").cpu_count(),
        "notes": notes,
        "results": rows,
    }
    _print_table(result)
    return result


def _print_table(result: dict[str, Any]) -> None:
    print(
        f"\nraydino bench aug: preset {result['preset']}, {result['crops']} crops, {result['size']} px JPEG, "
        f"{result['threads']} thread(s), {result['images']} images x best of {result['rounds']} rounds"
    )
    for note in result["notes"]:
        print(f"  note: {note}")
    w = max(len(r["pipeline"]) for r in result["results"])
    print(f"  {'pipeline':<{w}}  {'img/s/core':>10}  {'img/s wall':>10}  {'vs ref':>7}")
    for r in result["results"]:
        print(f"  {r['pipeline']:<{w}}  {r['images_per_s_per_core']:>10.0f}  {r['images_per_s_wall']:>10.0f}  {r['vs_reference']:>6.2f}x")
    ref = next(r for r in result["results"] if r["pipeline"].startswith("reference"))
    ours = [r for r in result["results"] if r["pipeline"].startswith("raydino") and "device" not in r["pipeline"]]
    best = max(ours, key=lambda r: r["images_per_s_per_core"])
    ratios = [a / b for a, b in zip(best["rounds_per_core"], ref["rounds_per_core"])]
    print(
        f"\nraydino / reference DINO: {best['vs_reference']:.2f}x per core "
        f"({best['images_per_s_per_core']:.0f} vs {ref['images_per_s_per_core']:.0f} img/s, {best['pipeline']}; "
        f"round by round {min(ratios):.2f}x-{max(ratios):.2f}x)"
    )


def plot_aug(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "by_size" in result:  # several sizes: raydino over the reference, per size
        heads = [_headline(r) for r in result["by_size"]]
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.bar([f"{s} px" for s in result["sizes"]], [o["vs_reference"] for o, _ in heads], color="#1f77b4")
        for x, (o, ref) in enumerate(heads):
            ax.text(
                x,
                o["vs_reference"],
                f"{o['vs_reference']:.1f}x\n{o['images_per_s_per_core']:.0f} vs {ref['images_per_s_per_core']:.0f}",
                ha="center",
                va="bottom",
            )
        ax.set_ylabel("raydino / DINO reference (images per CPU second)")
        ax.set_title(f"multi-crop augmentation by source size, preset {result['preset']}, {result['crops']}")
        ax.margins(y=0.2)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return
    rows = result["results"]
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(rows) + 1.5))
    names = [r["pipeline"] for r in rows][::-1]
    vals = [r["images_per_s_per_core"] for r in rows][::-1]
    colors = ["#999999" if n.startswith("decode") else "#1f77b4" if n.startswith("raydino") else "#d62728" for n in names]
    ax.barh(names, vals, color=colors)
    for y, v in enumerate(vals):
        ax.text(v, y, f" {v:.0f}", va="center")
    ax.set_xlabel("images / s per core (CPU time)")
    ax.set_title(f"multi-crop augmentation, preset {result['preset']}, {result['crops']}, {result['size']} px JPEG")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
