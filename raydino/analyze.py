"""`python -m raydino.analyze`: how far apart the teacher puts views of one image (the paper's Figure 2).

    python -m raydino.analyze --checkpoint runs/demo --data fundus/messidor2 --preset strong,weak

For each augmentation preset, every image gets `--views` global crops; the frozen teacher
backbone embeds them (its pooled output: the final-norm [CLS] for ViTs, the global pool for
CNNs).  Positive pairs are two views of one image, negative pairs views of two different images.
Written to `--out`: `distances.png` (histograms of Euclidean distances, one panel per preset) and
`analysis.json` (summaries, the silhouette score of the groups of views of each image, and the
probability that a positive pair is closer than a negative one).  Weaker augmentation should
pull positives together; the paper argues that fundus images need exactly that.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.transforms import v2

from raydino.augment.ops import normalize
from raydino.cli import USER_ERRORS, add_storage_arguments, local_folder, user_error
from raydino.cli import storage_options as cli_storage_options
from raydino.config import AUGMENT_PRESETS, AugmentConfig, ConfigError
from raydino.data.labelled import IMAGE_SUFFIXES, DataError, decode_image, load_labelled
from raydino.eval.backbones import add_backbone_arguments, load_teacher_backbone, resolve_device
from raydino.eval.features import frozen
from raydino.eval.report import plot_distance_histograms


def view_maker(aug: AugmentConfig, seed: int = 0) -> tuple[Callable[[torch.Tensor], list[torch.Tensor]], str]:
    """A function image → two global views, and its name: the training augmentation when available."""
    try:
        from raydino.augment.cpu import MultiCropAugment  # exactly what pretraining applies (crop, jitter, blur, ...)

        make = MultiCropAugment(aug.model_copy(update={"n_local_crops": 0}), seed=seed)
        return (lambda img: list(make(img))[:2]), "raydino.augment.cpu.MultiCropAugment (both global crops)"
    except (ImportError, TypeError, AttributeError):
        pass
    # Fallback: the crop and flip of a global view (no colour ops), from torchvision.
    interp = v2.InterpolationMode.BICUBIC if aug.interpolation == "bicubic" else v2.InterpolationMode.BILINEAR
    crop = v2.Compose([
        v2.RandomResizedCrop(aug.global_crop_size, scale=aug.global_crop_scale, ratio=aug.crop_ratio,
                             interpolation=interp, antialias=True),
        v2.RandomHorizontalFlip(aug.flip_p),
    ])  # fmt: skip
    return (lambda img: [crop(img), crop(img)]), "torchvision RandomResizedCrop + flip (fallback)"


def list_images(data: str, split: str, n_images: int, seed: int, storage_options: Any = None) -> list[str | bytes]:
    """Up to n images: a split of a labelled set, or any images in a folder (recursively)."""
    try:
        items = load_labelled(data, storage_options=storage_options).splits[split].items
    except DataError:
        root = Path(data)
        if not root.is_dir():
            raise
        items = sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(items) < 2:
        raise DataError(f"--data {data}: need at least 2 images, found {len(items)}")
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(items), size=min(n_images, len(items)), replace=False)
    return [items[i] for i in sorted(pick)]


def pair_distances(emb: np.ndarray, groups: np.ndarray) -> dict[str, np.ndarray]:
    """Euclidean distances of every same-group pair and of every different-group pair of first views."""
    d = np.sqrt(np.maximum(((emb[:, None, :] - emb[None, :, :]) ** 2).sum(-1), 0.0))
    same = groups[:, None] == groups[None, :]
    upper = np.triu(np.ones_like(same), k=1)
    first = np.zeros(len(groups), dtype=bool)
    first[np.unique(groups, return_index=True)[1]] = True
    return {"positive": d[same & upper], "negative": d[~same & upper & first[:, None] & first[None, :]]}


def summarize(dist: dict[str, np.ndarray], emb: np.ndarray, groups: np.ndarray) -> dict[str, Any]:
    from sklearn.metrics import roc_auc_score, silhouette_score

    pos, neg = dist["positive"], dist["negative"]
    out: dict[str, Any] = {}
    for name, v in (("positive", pos), ("negative", neg)):
        out[name] = {"n": int(len(v)), "mean": float(v.mean()), "median": float(np.median(v)), "std": float(v.std())}
    out["negative_over_positive"] = float(neg.mean() / pos.mean()) if pos.mean() > 0 else None
    # P(a positive pair is closer than a negative pair): the AUROC of "same image" from -distance.
    labels = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    out["p_positive_closer"] = float(roc_auc_score(labels, -np.r_[pos, neg]))
    out["silhouette"] = float(silhouette_score(emb, groups, metric="euclidean"))
    return out


def analyze(
    checkpoint: str,
    data: str,
    presets: list[str] | None = None,
    *,
    out: str | Path | None = None,
    n_images: int = 64,
    views: int = 4,
    split: str = "test",
    arch: str | None = None,
    device: str | None = None,
    seed: int = 0,
    storage_options: Any = None,
    progress: Callable[[str], Any] = print,
) -> dict[str, Any]:
    loaded = load_teacher_backbone(checkpoint, arch=arch, storage_options=storage_options)
    size = loaded.image_size or 224
    base_aug = (loaded.config or {}).get("augment", {})
    presets = presets or [base_aug.get("preset", "strong")]
    bad = [p for p in presets if p not in AUGMENT_PRESETS]
    if bad:
        raise ConfigError(f"--preset {','.join(bad)}: unknown; allowed: {', '.join(AUGMENT_PRESETS)}")
    if views < 2:
        raise ConfigError(f"--views {views}: need at least 2 views per image for positive pairs")
    if n_images < 2:
        raise ConfigError(f"--n-images {n_images}: need at least 2 images for negative pairs")
    dev = resolve_device(device)
    backbone = loaded.backbone.to(dev)
    items = list_images(data, split, n_images, seed, storage_options)
    images = [decode_image(x) for x in items]
    out_dir = Path(out) if out else Path("analysis") / Path(loaded.source).name
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    panels: dict[str, dict[str, np.ndarray]] = {}
    for preset in presets:
        aug = AugmentConfig(preset=preset, global_crop_size=size, local_crop_size=min(size, 96), n_local_crops=0)
        make_views, how = view_maker(aug, seed)
        torch.manual_seed(seed)
        crops, groups = [], []
        for i, img in enumerate(images):
            got: list[torch.Tensor] = []
            while len(got) < views:
                got += make_views(img)
            crops += got[:views]
            groups += [i] * views
        batch = torch.stack(crops)
        with frozen(backbone):
            emb = torch.cat([backbone(normalize(b.to(dev))).float().cpu() for b in batch.split(64)]).numpy()
        g = np.asarray(groups)
        dist = pair_distances(emb, g)
        results[preset] = {"augmentation": how, "global_crop_scale": list(aug.global_crop_scale), **summarize(dist, emb, g)}
        panels[f"{preset} (silhouette {results[preset]['silhouette']:.3f})"] = dist
        r = results[preset]
        progress(
            f"[raydino.analyze] {preset}: positive {r['positive']['mean']:.3f} ± {r['positive']['std']:.3f}, "
            f"negative {r['negative']['mean']:.3f} ± {r['negative']['std']:.3f}, silhouette {r['silhouette']:.3f}, "
            f"P(positive closer) {r['p_positive_closer']:.3f}"
        )
    report = {
        "checkpoint": loaded.source,
        "arch": loaded.arch,
        "step": loaded.step,
        "data": str(data),
        "n_images": len(images),
        "views_per_image": views,
        "image_size": size,
        "embedding": "backbone pooled output (ViT: final-norm [CLS]; CNN: global pool), not L2-normalised",
        "presets": results,
    }
    (out_dir / "analysis.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_distance_histograms(panels, out_dir / "distances.png")
    progress(f"[raydino.analyze] wrote {out_dir / 'analysis.json'} and {out_dir / 'distances.png'}")
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m raydino.analyze", description=__doc__.split("\n\n")[0])
    add_backbone_arguments(p)
    p.add_argument("--data", required=True, help="RETFound tree, labelled shards, or a folder of images")
    p.add_argument("--preset", help="augmentation preset(s), comma-separated: strong, weak, weak_med (default: the checkpoint's)")
    p.add_argument("--out", type=local_folder, help="output directory (default: analysis/<checkpoint name>)")
    p.add_argument("--n-images", type=int, default=64, help="images to sample (default 64)")
    p.add_argument("--views", type=int, default=4, help="augmented views per image (default 4)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="split of a labelled set (default test)")
    p.add_argument("--seed", type=int, default=0)
    add_storage_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        analyze(
            args.checkpoint,
            args.data,
            [s.strip() for s in args.preset.split(",")] if args.preset else None,
            out=args.out,
            n_images=args.n_images,
            views=args.views,
            split=args.split,
            arch=args.arch,
            device=args.device,
            seed=args.seed,
            storage_options=cli_storage_options(args),
        )
    except USER_ERRORS as e:
        return user_error("raydino.analyze", e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
