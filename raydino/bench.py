"""`python -m raydino.bench {aug,train,data,all}`: the performance record (issue 8).

    python -m raydino.bench aug   [--images 300] [--size 512] [--threads 1] [--preset strong] [--batch 32] [--rounds 3]
    python -m raydino.bench train [--config demo] [--workers 2] [--steps 30] [--warmup 5] [--rounds 2] [--no-smoke]
    python -m raydino.bench data  [--config demo] [--sizes 1000 20000] [--image-size 96] [--rate 1000]
    python -m raydino.bench all   [--out DIR]
    python -m raydino.bench gpu   [--config vits16-paper] [--steps 20] [--warmup 5]   (needs CUDA, not Ray)

Every subcommand prints progress with an ETA and ends with its ratio line; `--out DIR` writes
DIR/<bench>.json and a PNG beside it (`--json FILE` for one subcommand: FILE and FILE's .png).

`aug` measures images/s per core, all on the same input (a JPEG of scikit-image's `retina`, a
real fundus photograph, at --size px), interleaved over --rounds rounds (best round kept):

  1. decode only (PIL and torchvision.io) -- the ceiling for any pipeline that decodes once;
  2. a reference pipeline written here from DINO's published recipe (DataAugmentationDINO:
     PIL + torchvision transforms, PIL GaussianBlur, ToTensor + Normalize);
  3. lightly's DINOTransform with the same parameters, when `lightly` is importable;
  4. raydino's CPU pipeline: one image per call, and `augment_batch` (what Ray Data runs) with the
     OpenCV backend and with the batched torch backend;
  5. raydino's batched device pipeline on CPU, and on CUDA when a GPU is visible.

"Per core" = images / CPU seconds of this process (`time.process_time`), so a busy machine
(other processes sharing the cores) distorts the ratios less; wall-clock rates are printed
beside them.  `train` (raydino.bench_train), `data` (raydino.bench_data) and `gpu` (raydino.bench_gpu) have their
own docs.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np


# ------------------------------------------------------------------ input image


def fundus_jpeg(size: int, quality: int = 90) -> tuple[bytes, str]:
    """A size x size JPEG of a colour fundus photograph and a note on where it came from."""
    from PIL import Image

    try:
        from skimage import data as skdata

        rgb = skdata.retina()  # ships with scikit-image (no download)
        source = "scikit-image data.retina() (real fundus photograph, 1411 px)"
    except Exception as e:  # pragma: no cover - depends on the installed scikit-image
        rgb = _synthetic_fundus(1024)
        source = f"synthetic fundus drawn by the bench (scikit-image retina unavailable: {e})"
    img = Image.fromarray(rgb).convert("RGB").resize((size, size), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue(), f"{source}, resized to {size} px, JPEG quality {quality}"


def _synthetic_fundus(size: int) -> np.ndarray:
    """Orange disc on black with a bright optic disc and dark vessels: enough texture for timing."""
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    r = np.hypot(xx, yy)
    disc = (r < 0.45).astype(np.float32) * (1.0 - 0.6 * r)
    optic = np.exp(-((xx - 0.2) ** 2 + yy**2) / 0.003)
    vessels = 0.3 * (np.abs(np.sin(12 * np.arctan2(yy, xx - 0.2) + 8 * r)) < 0.08)
    base = np.clip(disc - vessels * disc + optic, 0, 1)
    rgb = np.stack([base * 0.95, base * 0.45 + optic * 0.4, base * 0.15 + optic * 0.2], -1)
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


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
        flip_and_color = T.Compose([
            T.RandomHorizontalFlip(p=cfg.flip_p),
            T.RandomApply([T.ColorJitter(cfg.jitter_brightness, cfg.jitter_contrast, cfg.jitter_saturation,
                                         cfg.jitter_hue)], p=cfg.jitter_p),
            T.RandomGrayscale(p=cfg.grayscale_p),
        ])
        normalize = T.Compose([T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])

        def crop(size: int, scale: tuple[float, float]) -> Any:
            return T.RandomResizedCrop(size, scale=scale, ratio=cfg.crop_ratio, interpolation=interp)

        self.global1 = T.Compose([crop(cfg.global_crop_size, cfg.global_crop_scale), flip_and_color,
                                  _PILBlur(cfg.blur_p_global1, cfg.blur_sigma), normalize])
        self.global2 = T.Compose([crop(cfg.global_crop_size, cfg.global_crop_scale), flip_and_color,
                                  _PILBlur(cfg.blur_p_global2, cfg.blur_sigma),
                                  _PILSolarize(cfg.solarize_p_global2, cfg.solarize_threshold), normalize])
        self.local = T.Compose([crop(cfg.local_crop_size, cfg.local_crop_scale), flip_and_color,
                                _PILBlur(cfg.blur_p_local, cfg.blur_sigma), normalize])

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
            d: dict[str, Any] = {"kind": kind, "top": top, "left": left, "height": h, "width": w,
                                 "flip": bool(torch.rand(1) < cfg.flip_p), "jitter": not bool(cfg.jitter_p < torch.rand(1))}
            if d["jitter"]:
                order, b, c, s, hue = T.ColorJitter.get_params(
                    *(None if v == 0 else (max(0.0, 1 - v), 1 + v) for v in
                      (cfg.jitter_brightness, cfg.jitter_contrast, cfg.jitter_saturation)),
                    None if cfg.jitter_hue == 0 else (-cfg.jitter_hue, cfg.jitter_hue))
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
        global_crop_size=cfg.global_crop_size, global_crop_scale=cfg.global_crop_scale,
        local_crop_size=cfg.local_crop_size, local_crop_scale=cfg.local_crop_scale,
        n_local_views=cfg.n_local_crops, hf_prob=cfg.flip_p, cj_prob=cfg.jitter_p, cj_strength=1.0,
        cj_bright=cfg.jitter_brightness, cj_contrast=cfg.jitter_contrast, cj_sat=cfg.jitter_saturation,
        cj_hue=cfg.jitter_hue, random_gray_scale=cfg.grayscale_p,
        gaussian_blur=(cfg.blur_p_global1, cfg.blur_p_global2, cfg.blur_p_local), sigmas=cfg.blur_sigma,
        solarization_prob=cfg.solarize_p_global2,
    )
    import lightly

    return (lambda data: t(Image.open(io.BytesIO(data)).convert("RGB"))), f"lightly {lightly.__version__}"


# ------------------------------------------------------------------ aug


def _time(fn: Callable[[], Any], n_images: int) -> tuple[float, float]:
    """(images per CPU second, images per wall second) of running fn once over n_images."""
    c0, w0 = time.process_time(), time.perf_counter()
    fn()
    c1, w1 = time.process_time(), time.perf_counter()
    return n_images / max(c1 - c0, 1e-9), n_images / max(w1 - w0, 1e-9)


def _pipelines(cfg: Any, data: bytes, n: int, batch: int, notes: list[str]) -> dict[str, Callable[[], Any]]:
    import torch
    from PIL import Image
    from torchvision.io import decode_jpeg

    from .augment import MultiCropAugment
    from .augment_gpu import DeviceMultiCropAugment

    items = [data] * n
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    ref = ReferenceDINOAugment(cfg)
    ours = MultiCropAugment(cfg, seed=0)
    batched = MultiCropAugment(cfg, seed=0, backend="torch")
    out: dict[str, Callable[[], Any]] = {
        "decode only (PIL)": lambda: [np.asarray(Image.open(io.BytesIO(d)).convert("RGB")) for d in items],
        "decode only (torchvision)": lambda: [decode_jpeg(raw) for _ in items],
        "reference DINO (PIL + torchvision)": lambda: [ref(d) for d in items],
    }
    lightly_fn, note = lightly_transform(cfg)
    notes.append(note)
    if lightly_fn is not None:
        out["lightly DINOTransform"] = lambda: [lightly_fn(d) for d in items]
    out["raydino, one image per call"] = lambda: [ours(d) for d in items]
    out[f"raydino augment_batch, {ours.backend} backend (batch {batch})"] = \
        lambda: [ours.augment_batch(items[i:i + batch]) for i in range(0, n, batch)]
    if ours.backend != "torch":
        out[f"raydino augment_batch, torch backend (batch {batch})"] = \
            lambda: [batched.augment_batch(items[i:i + batch]) for i in range(0, n, batch)]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        aug = DeviceMultiCropAugment(cfg, device=dev, seed=0)

        def run(aug: DeviceMultiCropAugment = aug, dev: str = dev) -> None:
            for i in range(0, n, batch):
                aug.augment_batch(items[i:i + batch])
            if dev == "cuda":
                torch.cuda.synchronize()

        name = f"raydino device pipeline on {dev}" + (f" ({torch.cuda.get_device_name()})" if dev == "cuda" else "")
        out[f"{name} (batch {batch})"] = run
    return out


def bench_aug(args: argparse.Namespace) -> dict[str, Any]:
    import platform
    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision.io")
    import torch

    from .config import AugmentConfig

    torch.set_num_threads(args.threads)
    cfg = AugmentConfig(preset=args.preset)
    data, source = fundus_jpeg(args.size)
    notes = [f"input: {source}"]
    for fn in _pipelines(cfg, data, min(args.batch, args.images), args.batch, []).values():
        fn()  # warm-up: imports, allocator, first-call costs
    pipelines = _pipelines(cfg, data, args.images, args.batch, notes)
    best: dict[str, tuple[float, float]] = {name: (0.0, 0.0) for name in pipelines}
    every: dict[str, list[float]] = {name: [] for name in pipelines}
    progress = Progress("bench aug", args.rounds * len(pipelines))
    for r in range(args.rounds):
        for name, fn in pipelines.items():
            per_core, wall = _time(fn, args.images)
            every[name].append(round(per_core, 1))
            if per_core > best[name][0]:
                best[name] = (per_core, wall)
            progress.step(f"round {r + 1}/{args.rounds} {name}: {per_core:.0f} img/s per core ({wall:.0f} wall)")
    ref = best["reference DINO (PIL + torchvision)"][0]
    rows = [{"pipeline": k, "images_per_s_per_core": round(v[0], 1), "images_per_s_wall": round(v[1], 1),
             "vs_reference": round(v[0] / ref, 2), "rounds_per_core": every[k]} for k, v in best.items()]
    result = {
        "bench": "aug", "preset": args.preset, "images": args.images, "size": args.size, "threads": args.threads,
        "batch": args.batch, "rounds": args.rounds,
        "crops": f"2x{cfg.global_crop_size} + {cfg.n_local_crops}x{cfg.local_crop_size}",
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip() + f", torch {torch.__version__}",
        "cpu_count": __import__("os").cpu_count(), "notes": notes, "results": rows,
    }
    _print_table(result)
    return result


def _print_table(result: dict[str, Any]) -> None:
    print(f"\nraydino bench aug: preset {result['preset']}, {result['crops']} crops, {result['size']} px JPEG, "
          f"{result['threads']} thread(s), {result['images']} images x best of {result['rounds']} rounds")
    for note in result["notes"]:
        print(f"  note: {note}")
    w = max(len(r["pipeline"]) for r in result["results"])
    print(f"  {'pipeline':<{w}}  {'img/s/core':>10}  {'img/s wall':>10}  {'vs ref':>7}")
    for r in result["results"]:
        print(f"  {r['pipeline']:<{w}}  {r['images_per_s_per_core']:>10.0f}  {r['images_per_s_wall']:>10.0f}  "
              f"{r['vs_reference']:>6.2f}x")
    ref = next(r for r in result["results"] if r["pipeline"].startswith("reference"))
    ours = [r for r in result["results"] if r["pipeline"].startswith("raydino") and "device" not in r["pipeline"]]
    best = max(ours, key=lambda r: r["images_per_s_per_core"])
    ratios = [a / b for a, b in zip(best["rounds_per_core"], ref["rounds_per_core"])]
    print(f"\nraydino / reference DINO: {best['vs_reference']:.2f}x per core "
          f"({best['images_per_s_per_core']:.0f} vs {ref['images_per_s_per_core']:.0f} img/s, {best['pipeline']}; "
          f"round by round {min(ratios):.2f}x-{max(ratios):.2f}x)")


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


# ------------------------------------------------------------------ shared: progress, CLI


class Progress:
    """`[bench NAME] i/N message  ETA s` lines, the ETA from the mean time per finished item."""

    def __init__(self, name: str, total: int) -> None:
        self.name, self.total, self.done, self.t0 = name, max(total, 1), 0, time.perf_counter()

    def step(self, message: str) -> None:
        self.done += 1
        eta = (time.perf_counter() - self.t0) / self.done * max(self.total - self.done, 0)
        print(f"[{self.name}] {self.done}/{self.total} {message}  ETA {eta:.0f}s", flush=True)


def _add_aug_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", type=int, default=300, help="images per pipeline per round (default 300)")
    p.add_argument("--size", type=int, default=512, help="side of the input JPEG in px (default 512)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: per core)")
    p.add_argument("--preset", default="strong", choices=["strong", "weak", "weak_med"])
    p.add_argument("--batch", type=int, default=32, help="images per augment_batch call (default 32)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best is kept (default 3)")


def _add_train_args(p: argparse.ArgumentParser, prefix: str = "") -> None:
    p.add_argument(f"--{prefix}config", default="demo", help="config of the timed model and batch (default demo)")
    p.add_argument(f"--{prefix}set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument(f"--{prefix}workers", type=int, default=2, help="DDP workers in both runs (default 2)")
    p.add_argument(f"--{prefix}threads", type=int, default=1, help="torch threads (and CPUs) per worker (default 1)")
    p.add_argument(f"--{prefix}steps", type=int, default=30, help="timed steps per run (default 30)")
    p.add_argument(f"--{prefix}warmup", type=int, default=5, help="untimed steps first (default 5)")
    p.add_argument(f"--{prefix}rounds", type=int, default=2, help="runs of each, in ABBA order (default 2)")
    p.add_argument(f"--{prefix}smoke", action=argparse.BooleanOptionalAction, default=True,
                   help="also pretrain the smoke config from the Ray Data stream and report its data-wait (default on)")
    p.add_argument(f"--{prefix}smoke-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override for the smoke run (repeatable)")


def _add_data_args(p: argparse.ArgumentParser, prefix: str = "") -> None:
    p.add_argument(f"--{prefix}config", default="demo", help="config whose augmentation and data settings stream (default demo)")
    p.add_argument(f"--{prefix}set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument(f"--{prefix}sizes", type=int, nargs="+", default=[1000, 20000], help="dataset sizes (default 1000 20000)")
    p.add_argument(f"--{prefix}image-size", type=int, default=96, help="side of the synthetic images (default 96)")
    p.add_argument(f"--{prefix}shard-mb", type=float, default=1.0,
                   help="target shard size in MB: a bigger set has more shards, not bigger ones (default 1)")
    p.add_argument(f"--{prefix}batch", type=int, default=32, help="images per trainer batch (default 32)")
    p.add_argument(f"--{prefix}rate", type=float, default=1000.0,
                   help="stand-in trainer's consumption in images/s; 0 = as fast as the stream delivers (default 1000)")
    p.add_argument(f"--{prefix}interval", type=float, default=0.25, help="memory sampling period in s (default 0.25)")
    p.add_argument(f"--{prefix}target-block-mb", type=float, default=0.0,
                   help="Ray Data's target_max_block_size for the run in MB (default 0: Ray's own, 128 MB)")


def _add_gpu_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="vits16-paper", help="config of the timed model and batch (default vits16-paper)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per precision (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    p.add_argument("--aug-images", type=int, default=1024, help="images through the GPU augmentation (default 1024)")
    p.add_argument("--cpu-images", type=int, default=64, help="images through each CPU pipeline (default 64)")


def _sub_args(args: argparse.Namespace, prefix: str) -> argparse.Namespace:
    """The `all` subcommand's --train-x / --data-x options as a plain namespace for one bench."""
    sub = {k[len(prefix):]: v for k, v in vars(args).items() if k.startswith(prefix)}
    return argparse.Namespace(**sub, cache=args.cache)


def _write(result: dict[str, Any], path: Path, plot: Callable[[dict[str, Any], Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    plot(result, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}", flush=True)


def main(argv: list[str] | None = None) -> int:
    from .bench_data import bench_data, plot_data
    from .bench_gpu import bench_gpu, plot_gpu
    from .bench_train import bench_train, plot_train

    parser = argparse.ArgumentParser(prog="python -m raydino.bench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    parsers = {
        "aug": sub.add_parser("aug", help="multi-crop augmentation throughput (images/s per core) vs DINO's pipeline"),
        "train": sub.add_parser("train", help="Ray Train step time vs a plain PyTorch DDP loop; smoke data-wait"),
        "data": sub.add_parser("data", help="Ray Data stream: peak memory for two dataset sizes, images/s, data-wait"),
        "all": sub.add_parser("all", help="aug, train and data (options of train/data prefixed --train-/--data-)"),
        "gpu": sub.add_parser("gpu", help="one CUDA GPU: bf16 vs fp32 DINO steps under DDP/NCCL, GPU augmentation"),
    }
    _add_gpu_args(parsers["gpu"])
    _add_aug_args(parsers["aug"])
    _add_train_args(parsers["train"])
    _add_data_args(parsers["data"])
    _add_aug_args(parsers["all"])
    _add_train_args(parsers["all"], "train-")
    _add_data_args(parsers["all"], "data-")
    for p in parsers.values():
        p.add_argument("--out", type=Path, default=None, help="write DIR/<bench>.json and .png here")
        p.add_argument("--json", type=Path, default=None, help="write results to this file and a PNG beside it")
        p.add_argument("--cache", default=".raydino", help="cache of synthetic datasets (default .raydino)")
    args = parser.parse_args(argv)
    positive = ("images", "size", "threads", "batch", "rounds", "workers", "steps", "shard_mb", "interval")
    for name, value in vars(args).items():
        option = f"--{name.replace('_', '-')}={value}"
        if name.endswith("sizes") and min(value) < 1:
            parser.error(f"{option}: every dataset size must be >= 1")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if name.endswith(positive) and value <= 0:
            parser.error(f"{option}: must be > 0")
        if value < 0:
            parser.error(f"{option}: must be >= 0")

    def target(bench: str) -> Path | None:
        if args.out is not None:
            return args.out / f"{bench}.json"
        if args.json is not None:
            return args.json if args.cmd != "all" else args.json.with_name(f"{args.json.stem}-{bench}{args.json.suffix}")
        return None

    runs = {
        "aug": (lambda: bench_aug(args), _plot),
        "train": (lambda: bench_train(args if args.cmd == "train" else _sub_args(args, "train_")), plot_train),
        "data": (lambda: bench_data(args if args.cmd == "data" else _sub_args(args, "data_")), plot_data),
        "gpu": (lambda: bench_gpu(args), plot_gpu),
    }
    for bench in (["aug", "train", "data"] if args.cmd == "all" else [args.cmd]):
        run, plot = runs[bench]
        result = run()
        path = target(bench)
        if path is not None:
            _write(result, path, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
