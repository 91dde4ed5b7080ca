"""`python -m raydino.bench shardsize`: what `raydino.shard --fov-crop --max-side N` saves, in bytes and
in augmentation time; one command, one run, ratios against the reference (stored as found) made in
the same run:

1. --images camera-size synthetic fundus JPEGs (--size WxH, default 3000x2000): a
   `raydino.data.fundus.render_fundus` eye drawn at 1024 px, scaled up so that its disc is wider
   than the frame is tall (clipped top and bottom, as many cameras do), centred in a black
   frame, with sensor noise at full resolution, JPEG quality 95;
2. sharded three times with `shard_dataset` (each the best of two fresh runs): as found (the
   default; bytes kept), with ``max_side`` and ``quality``, and with ``fov_crop`` too; shard
   bytes and sharding time of each;
3. each shard set's images through raydino's CPU multi-crop (`MultiCropAugment.augment_batch`,
   what Ray Data runs) and through a plain PIL decode, interleaved over --rounds rounds (best
   kept), images/s per core (CPU time of this process);
4. the downscaling methods on the same JPEGs, against a full decode + Lanczos: full decode +
   ``reduce(k)`` (a box filter by the integer factor) + Lanczos, and libjpeg DCT-scaled decode
   (``draft``) + Lanczos, which `raydino.data.fov.transform_image` uses: ms per image and PSNR.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from raydino.bench.common import time_images
from raydino.progress import Progress

SHARDSIZE_SOURCE_QUALITY = 95


def camera_fundus_jpeg(width: int, height: int, seed: int, quality: int = SHARDSIZE_SOURCE_QUALITY) -> bytes:
    """A width x height JPEG of a synthetic fundus photograph whose disc is clipped top and bottom."""
    from PIL import Image

    from raydino.data.fundus import FundusLabel, render_fundus

    label = FundusLabel(index=seed, dr_grade=seed % 5, glaucoma=0, cup_disc_ratio=0.3, eye="right" if seed % 2 else "left", split="train")
    eye = Image.fromarray(render_fundus(1024, label, seed=seed))
    d = min(width, round(1.15 * height))  # disc radius ~0.52-0.56 of the height: wider than the frame is tall
    eye = eye.resize((d, d), Image.BICUBIC)
    top = (d - height) // 2
    frame = Image.new("RGB", (width, height))
    frame.paste(eye.crop((0, max(0, top), d, max(0, top) + min(d, height))), ((width - d) // 2, max(0, -top)))
    rgb = np.asarray(frame).astype(np.int16)
    rng = np.random.default_rng(seed)
    lit = rgb.max(axis=2, keepdims=True) > 8
    rgb = np.clip(rgb + lit * rng.normal(0, 2.0, rgb.shape).astype(np.int16), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _resize_methods(jpegs: list[bytes], max_side: int) -> list[dict[str, Any]]:
    from PIL import Image

    def target(img: Any) -> tuple[int, int]:
        w, h = img.size
        s = max_side / max(w, h)
        return max(1, round(w * s)), max(1, round(h * s))

    def full(d: bytes) -> Any:
        img = Image.open(io.BytesIO(d))
        return img.convert("RGB").resize(target(img), Image.LANCZOS)

    def reduce(d: bytes) -> Any:
        img = Image.open(io.BytesIO(d)).convert("RGB")
        size = target(img)
        k = max(1, img.size[0] // size[0])
        return (img.reduce(k) if k > 1 else img).resize(size, Image.LANCZOS)

    def draft(d: bytes) -> Any:
        img = Image.open(io.BytesIO(d))
        size = target(img)
        img.draft("RGB", size)
        return img.convert("RGB").resize(size, Image.LANCZOS)

    methods = {
        "full decode + Lanczos": full,
        "full decode + reduce(k) + Lanczos": reduce,
        "DCT-scaled decode (draft) + Lanczos [used]": draft,
    }
    refs = [np.asarray(full(d)) for d in jpegs]
    rows = []
    for name, fn in methods.items():
        fn(jpegs[0])  # warm-up
        c0 = time.process_time()
        outs = [np.asarray(fn(d)) for d in jpegs]
        ms = 1000 * (time.process_time() - c0) / len(jpegs)
        rows.append(
            {
                "method": name,
                "ms_per_image": round(ms, 1),
                "psnr_vs_full_lanczos_db": round(float(np.mean([_psnr(a, b) for a, b in zip(outs, refs)])), 1),
            }
        )
    return rows


def bench_shardsize(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from raydino.augment.cpu import MultiCropAugment
    from raydino.config import AugmentConfig
    from raydino.data.shards import open_shards
    from raydino.data.writer import ShardJobOptions, shard_dataset

    torch.set_num_threads(args.threads)
    width, height = args.size
    progress = Progress(unit="steps", stream=sys.stdout, min_interval_s=0, label="bench shardsize", total=5 + 3 * args.rounds)
    with tempfile.TemporaryDirectory(prefix="raydino-shardsize-") as tmp:
        src = Path(tmp) / "photos"
        src.mkdir()
        for i in range(args.images):
            (src / f"cam-{i:04d}.jpg").write_bytes(camera_fundus_jpeg(width, height, seed=i))
        source_bytes = sum(p.stat().st_size for p in src.iterdir())
        progress.step(f"{args.images} camera-size JPEGs ({source_bytes / 2**20:.1f} MiB)")
        runs = {
            "as found": ShardJobOptions(workers=1, progress=False),
            f"--max-side {args.max_side} --quality {args.quality}": ShardJobOptions(
                workers=1, progress=False, max_side=args.max_side, quality=args.quality
            ),
            f"--fov-crop --max-side {args.max_side} --quality {args.quality}": ShardJobOptions(
                workers=1, progress=False, fov_crop=True, max_side=args.max_side, quality=args.quality
            ),
        }
        sets: dict[str, dict[str, Any]] = {}
        for k, (name, opts) in enumerate(runs.items()):
            elapsed = float("inf")
            for attempt in range(2):  # the best of two fresh runs: the first also pays for imports and caches
                t0 = time.perf_counter()
                summary = shard_dataset(str(src), str(Path(tmp) / f"shards-{k}-{attempt}"), options=opts)
                elapsed = min(elapsed, time.perf_counter() - t0)
            rows = list(open_shards(str(Path(tmp) / f"shards-{k}-1")).iter_rows())
            sets[name] = {
                "images": [r["image"] for r in rows],
                "shard_bytes": summary.bytes,
                "image_bytes": sum(len(r["image"]) for r in rows),
                "shard_s": round(elapsed, 2),
                "size": f"{rows[0]['width']}x{rows[0]['height']}",
                "transform": summary.transform,
            }
            progress.step(f"sharded {name}: {summary.bytes / 2**20:.1f} MiB in {elapsed:.1f} s")
        cfg = AugmentConfig(preset=args.preset)
        aug = MultiCropAugment(cfg, seed=0)
        from PIL import Image

        def pipelines(images: list[bytes]) -> dict[str, Any]:
            return {
                "decode (PIL)": lambda: [np.asarray(Image.open(io.BytesIO(d)).convert("RGB")) for d in images],
                f"multi-crop augment_batch ({aug.backend})": lambda: [
                    aug.augment_batch(images[i : i + args.batch]) for i in range(0, len(images), args.batch)
                ],
            }

        for s in sets.values():
            for fn in pipelines(s["images"][:2]).values():
                fn()  # warm-up
        best: dict[tuple[str, str], float] = {}
        for r in range(args.rounds):
            for name, s in sets.items():
                for pipe, fn in pipelines(s["images"]).items():
                    per_core, _ = time_images(fn, len(s["images"]))
                    best[(name, pipe)] = max(best.get((name, pipe), 0.0), per_core)
                progress.step(f"round {r + 1}/{args.rounds} {name}")
        methods = _resize_methods(next(iter(sets.values()))["images"][: min(6, args.images)], args.max_side)
        progress.step("resize methods")
    ref_name, capped_name = list(sets)[0], list(sets)[-1]
    ref, capped = sets[ref_name], sets[capped_name]
    pipes = list(pipelines([]).keys())
    result = {
        "bench": "shardsize",
        "images": args.images,
        "source": f"{width}x{height} synthetic fundus JPEGs (quality {SHARDSIZE_SOURCE_QUALITY}), disc clipped top and bottom",
        "source_bytes": source_bytes,
        "max_side": args.max_side,
        "quality": args.quality,
        "preset": args.preset,
        "crops": f"2x{cfg.global_crop_size} + {cfg.n_local_crops}x{cfg.local_crop_size}",
        "threads": args.threads,
        "rounds": args.rounds,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip() + f", {os.cpu_count()} cores, torch {torch.__version__}",
        "runs": [
            {
                "shards": name,
                "stored_size": s["size"],
                "shard_bytes": s["shard_bytes"],
                "mib_per_image": round(s["image_bytes"] / len(s["images"]) / 2**20, 3),
                "shard_s": s["shard_s"],
                "transform": s["transform"],
                **{f"{p} img/s/core": round(best[(name, p)], 1) for p in pipes},
                "bytes_vs_as_found": round(s["shard_bytes"] / ref["shard_bytes"], 4),
                "img_s_vs_as_found": {p: round(best[(name, p)] / best[(ref_name, p)], 2) for p in pipes},
            }
            for name, s in sets.items()
        ],
        # the last run (--fov-crop --max-side) against the first (as found)
        "bytes_ratio": round(capped["shard_bytes"] / ref["shard_bytes"], 4),
        "images_per_s_ratio": {p: round(best[(capped_name, p)] / best[(ref_name, p)], 2) for p in pipes},
        "resize_methods": methods,
    }
    _print(result)
    return result


def _print(result: dict[str, Any]) -> None:
    print(
        f"\nraydino bench shardsize: {result['images']} x {result['source']}, preset {result['preset']} ({result['crops']}), "
        f"{result['threads']} thread(s), best of {result['rounds']} rounds; {result['machine']}"
    )
    for r in result["runs"]:
        rates = ", ".join(f"{k.removesuffix(' img/s/core')} {v:.1f}" for k, v in r.items() if k.endswith("img/s/core"))
        print(
            f"  {r['shards']:<42} {r['stored_size']:>9}  {r['mib_per_image']:6.3f} MiB/image  sharded in {r['shard_s']:5.1f} s  img/s/core: {rates}"
        )
    for m in result["resize_methods"]:
        print(f"  resize to {result['max_side']} px: {m['method']:<52} {m['ms_per_image']:7.1f} ms/image  PSNR {m['psnr_vs_full_lanczos_db']:.1f} dB")
    print()
    for r in result["runs"][1:]:
        ratios = ", ".join(f"{k} {v:.2f}x" for k, v in r["img_s_vs_as_found"].items())
        print(f"{r['shards']} / as found: bytes {r['bytes_vs_as_found']:.3f}x, images/s per core: {ratios}")


def plot_shardsize(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    names = [r["shards"] for r in runs]
    fig, axes = plt.subplots(1, 2, figsize=(13, 3.4))
    mib = [r["mib_per_image"] for r in runs]
    colours = ["#999999", "#9ecae1", "#1f77b4"]
    axes[0].barh(names, mib, color=colours[: len(runs)])
    for y, v in enumerate(mib):
        axes[0].text(v, y, f" {v:.2f}", va="center")
    axes[0].set_xlabel("MiB per image in the shards")
    axes[0].set_title(f"bytes: {result['bytes_ratio']:.3f}x")
    pipes = list(result["images_per_s_ratio"])
    ys = np.arange(len(pipes))
    for k, r in enumerate(runs):
        vals = [r[f"{p} img/s/core"] for p in pipes]
        axes[1].barh(ys + 0.27 * k, vals, height=0.27, label=r["shards"], color=colours[k % len(colours)])
    axes[1].set_yticks(ys + 0.27, pipes)
    axes[1].set_xlabel("images / s per core")
    axes[1].set_title("throughput: " + ", ".join(f"{v:.1f}x" for v in result["images_per_s_ratio"].values()))
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(f"{result['images']} x {result['source']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
