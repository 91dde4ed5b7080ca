"""`python -m raydino.evaluate`: the paper's downstream evaluation of a pretrained teacher.

    python -m raydino.evaluate --checkpoint runs/demo --data fundus/messidor2 --dataset MESSIDOR-2 \\
        --probe all --seeds 0-4 --baseline random

Loads the frozen teacher backbone (a run directory → its latest checkpoint, a checkpoint
directory, an exported `.safetensors`, an official DINO file with `--arch`, or `random`), reads
a labelled set (RETFound tree or labelled shards), extracts features once (cached under
`OUT/features/`), runs the requested probes and writes `metrics.json`, `metrics.md` and `roc.png`
to `--out`.  No Ray: evaluation is one process (GPU when present).

`--probe paper` is the authors' evaluation by default (their eval.sh + eval_finetune.py, DINO's
eval_linear: batch 16, lr 0.001 per 256, 50 epochs, seeds 0-4, no flip, bilinear crops from the
full-resolution image; `raydino.eval.probes.PaperProtocol`).  Those settings come from this command's
options, never from the checkpoint's saved `probe` section: a checkpoint written before the
protocol was fixed carries lr 0.1 / 90 epochs / batch 64, which are not the paper's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from raydino.cli import USER_ERRORS, add_storage_arguments, local_folder, user_error
from raydino.cli import storage_options as cli_storage_options
from raydino.config import ConfigError, ProbeConfig
from raydino.data.labelled import CROP_PCT, load_labelled
from raydino.data.overlap import run_overlap_warning
from raydino.eval.backbones import LoadedBackbone, add_backbone_arguments, load_teacher_backbone, resolve_device
from raydino.eval.compare import difference_line
from raydino.eval.features import FEATURE_DTYPES
from raydino.eval.metrics import paired_bootstrap_difference
from raydino.eval.probes import C_GRID, default_seeds, parse_seeds, probe_backbone
from raydino.eval.report import markdown_report, markdown_table, plot_roc

PROBES = ("fast", "knn", "paper")
# What `evaluate` takes from the checkpoint's saved `probe` section: the image size (pretraining's
# choice, e.g. 64 px on CPU), the extraction batch and kNN settings.  The paper probe's protocol and
# the feature precision are this command's (defaults: the authors'), so an old checkpoint's
# saved lr 0.1 / 90 epochs / batch 64 never silently replaces them.
INHERITED_PROBE_FIELDS = ("image_size", "batch_size", "knn_k", "knn_temperature")


def _scale(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected two numbers LO,HI like 0.08,1") from None
    return lo, hi


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m raydino.evaluate", description=__doc__.split("\n\n")[0])
    add_backbone_arguments(p)
    p.add_argument("--data", required=True, help="RETFound tree ROOT/{train,val,test}/<class>/<image>, or labelled shards (dir, s3:// or gs://)")
    p.add_argument("--dataset", help="dataset name (report title; ROOT/NAME is used when it exists; catalog names are checked)")
    p.add_argument(
        "--seeds", help="probe seeds: 0-4, 0,1,2 or 0-2,7 (default: paper 0-4 as the authors' eval.sh; fast and knn are deterministic and run once)"
    )
    p.add_argument("--probe", default="fast", choices=[*PROBES, "all"], help="which probe(s) (default fast)")
    p.add_argument("--out", type=local_folder, help="output directory (default: eval/<checkpoint name>-<dataset>)")
    p.add_argument("--image-size", type=int, help="probe image size (default: probe.image_size, else augment.global_crop_size)")
    p.add_argument("--batch-size", type=int, help="feature-extraction batch (default: probe.batch_size = 64)")
    p.add_argument("--train-batch-size", type=int, help="paper probe training batch (default: probe.train_batch_size = 16)")
    p.add_argument(
        "--baseline", choices=["none", "random"], default="none", help="also probe a randomly initialised backbone of the same architecture"
    )
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the test set for 95%% intervals (0: none)")
    p.add_argument("--epochs", type=int, help="paper probe epochs (default: probe.epochs = 50)")
    p.add_argument("--lr", type=float, help="paper probe lr per 256 images, scaled by train batch/256 (default: probe.lr = 0.001)")
    p.add_argument("--train-crop-scale", type=_scale, metavar="LO,HI", help="paper probe RandomResizedCrop scale (default 0.08,1)")
    p.add_argument("--train-interpolation", choices=["bilinear", "bicubic"], help="paper probe crop resize (default bilinear)")
    p.add_argument(
        "--train-flip", action="store_true", default=None, help="paper probe: add a horizontal flip (DINO's eval_linear; not the authors')"
    )
    p.add_argument("--feature-dtype", choices=FEATURE_DTYPES, help="feature precision (default fp32; bf16: autocast, faster on a GPU)")
    kappa = p.add_mutually_exclusive_group()
    kappa.add_argument(
        "--ordinal",
        dest="ordinal",
        action="store_true",
        default=None,
        help="the classes are a severity scale: quadratic-weighted kappa (default: from the catalog)",
    )
    kappa.add_argument(
        "--nominal",
        dest="ordinal",
        action="store_false",
        help="the classes are unordered: Cohen's unweighted kappa (default for sets the catalog does not know)",
    )
    p.add_argument("--knn-k", type=int, help="kNN neighbours (default: probe.knn_k = 20)")
    p.add_argument("--knn-temperature", type=float, help="kNN temperature (default: probe.knn_temperature = 0.07)")
    p.add_argument("--crop-pct", type=float, default=CROP_PCT, help="evaluation view: resize to size/crop_pct, centre-crop (default 0.875)")
    add_storage_arguments(p)
    args = p.parse_args(argv)
    if not 0 < args.crop_pct <= 1:
        p.error(f"--crop-pct {args.crop_pct}: must lie in (0, 1]")
    if args.bootstrap < 0:
        p.error(f"--bootstrap {args.bootstrap}: must be 0 (none) or a positive number of resamples")
    return args


def probe_overrides(base: ProbeConfig | None = None, **given: Any) -> ProbeConfig:
    """`base` (default: ProbeConfig()) with the options given on the command line (None: not given),
    checked by ProbeConfig's rules; an error names the option as typed (`--lr 0.0: ...`)."""
    given = {k: v for k, v in given.items() if v is not None}
    try:
        return ProbeConfig.model_validate({**(base or ProbeConfig()).model_dump(), **given})
    except ValidationError as e:
        raise ConfigError(
            "; ".join(f"--{str(err['loc'][0]).replace('_', '-')} {err['input']!r}: {err['msg'].removeprefix('Value error, ')}" for err in e.errors())
        ) from None


def _probe_config(loaded: LoadedBackbone, progress: Callable[[str], Any]) -> ProbeConfig:
    """ProbeConfig() with the checkpoint's INHERITED_PROBE_FIELDS."""
    saved = (loaded.config or {}).get("probe") or {}
    try:
        return ProbeConfig.model_validate({k: saved[k] for k in INHERITED_PROBE_FIELDS if k in saved})
    except ValidationError as e:  # an older or foreign sidecar: the defaults are the paper's anyway
        progress(f"[raydino.evaluate] warning: the checkpoint's probe settings are not valid here ({e.error_count()} problems); using the defaults")
        return ProbeConfig()


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def evaluate(
    checkpoint: str,
    data_uri: str,
    *,
    dataset: str | None = None,
    kinds: tuple[str, ...] = ("fast",),
    seeds: list[int] | None = None,
    out: str | Path | None = None,
    image_size: int | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    arch: str | None = None,
    baseline: str = "none",
    n_bootstrap: int = 1000,
    epochs: int | None = None,
    lr: float | None = None,
    train_batch_size: int | None = None,
    train_crop_scale: tuple[float, float] | None = None,
    train_interpolation: str | None = None,
    train_flip: bool | None = None,
    feature_dtype: str | None = None,
    knn_k: int | None = None,
    knn_temperature: float | None = None,
    crop_pct: float = CROP_PCT,
    ordinal: bool | None = None,
    storage_options: Any = None,
    progress: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Probe a checkpoint (and optionally a random baseline) on a labelled set; writes the report files.

    `seeds` None: each probe's default (paper 0-4, fast / knn 0).  Options left None take ProbeConfig's
    defaults (the paper's protocol), and image size, extraction batch and kNN settings the checkpoint's.
    """
    given = dict(
        image_size=image_size,
        batch_size=batch_size,
        epochs=epochs,
        lr=lr,
        train_batch_size=train_batch_size,
        train_crop_scale=train_crop_scale,
        train_interpolation=train_interpolation,
        train_flip=train_flip,
        feature_dtype=feature_dtype,
        knn_k=knn_k,
        knn_temperature=knn_temperature,
    )
    # The probe options are ProbeConfig fields, checked by its rules before anything is loaded.
    probe_overrides(**given)
    dev = resolve_device(device)
    loaded = load_teacher_backbone(checkpoint, arch=arch, storage_options=storage_options)
    pcfg = probe_overrides(_probe_config(loaded, progress), **given)
    size = pcfg.image_size or loaded.image_size or 224
    data = load_labelled(data_uri, dataset, storage_options=storage_options, ordinal=ordinal)
    name = data.name
    out_dir = Path(out) if out else Path("eval") / f"{Path(loaded.source).name}-{name}"
    out_dir.mkdir(parents=True, exist_ok=True)
    progress(
        f"[raydino.evaluate] {loaded.arch} from {loaded.source} (step {loaded.step}); {name}: "
        f"{data.n_classes} classes {data.classes}, train/val/test {[len(data.splits[s]) for s in ('train', 'val', 'test')]}; "
        f"image size {size}, device {dev}, {pcfg.feature_dtype} features; kappa "
        f"{'quadratic-weighted (ordinal)' if data.ordinal else 'unweighted (nominal)'}: {data.ordinal_source}"
    )
    for w in data.warnings:
        progress(f"[raydino.evaluate] warning: {w}")
    leak = run_overlap_warning(loaded.config, str(data_uri), storage_options)  # labelled images in the pretraining data (stored hashes only)
    if leak:
        progress(f"[raydino.evaluate] {leak}")
    backbones: dict[str, LoadedBackbone] = {"": loaded}
    if baseline == "random":
        backbones["random init"] = load_teacher_backbone("random", arch=loaded.arch, image_size=loaded.image_size)
    results: dict[str, dict[str, Any]] = {}
    curves: dict[str, tuple[np.ndarray, list[np.ndarray]]] = {}
    started = time.perf_counter()
    for label, lb in backbones.items():
        lb.backbone.to(dev)
        for kind in kinds:
            key = kind if not label else f"{kind} ({label})"
            progress(f"[raydino.evaluate] probe {key}")
            r = probe_backbone(
                lb.backbone,
                data,
                kind,
                image_size=size,
                crop_pct=crop_pct,
                cache_dir=out_dir / "features",
                n_bootstrap=n_bootstrap,
                c_grid=C_GRID,
                return_scores=True,
                progress=progress,
                **{**pcfg.probe_kwargs(), "seeds": seeds},
            )
            scores = r.pop("scores")
            curves[key] = (scores["y_true"], scores["per_seed"])
            results[key] = r
        lb.backbone.cpu()
    meta = {
        "checkpoint": loaded.source,
        "arch": loaded.arch,
        "step": loaded.step,
        "epoch": loaded.epoch,
        "dataset": name,
        "data": str(data_uri),
        "classes": data.classes,
        "image_size": size,
        "crop_pct": crop_pct,
        "device": str(dev),
        "feature_dtype": pcfg.feature_dtype,
        "kappa_weighting": "quadratic" if data.ordinal else "none",
        "ordinal_source": data.ordinal_source,
        "bootstrap": {"n_resamples": n_bootstrap, "stratified_by_class": True},
        "seeds": {k: list(seeds) if seeds is not None else default_seeds(k) for k in kinds},
        "probe_config": pcfg.model_dump(exclude={"kind", "data"}),
        "seconds": round(time.perf_counter() - started, 1),
    }
    report = {"meta": meta, "results": results, "pretraining_config": loaded.config}
    if baseline == "random":
        # Pretrained minus random init on the same test cases, each probe's seed-mean scores: the paired interval.
        report["differences"] = {}
        for kind in kinds:
            y, ours = curves[kind]
            _, theirs = curves[f"{kind} (random init)"]
            d = paired_bootstrap_difference(y, ours, theirs, data.n_classes, "auroc", n_bootstrap or 2000)
            report["differences"][kind] = d
            line = difference_line(results[kind]["mean"]["auroc"], results[f"{kind} (random init)"]["mean"]["auroc"], d)
            progress(f"[raydino.evaluate] {kind} probe: {line}")
    (out_dir / "metrics.json").write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    (out_dir / "metrics.md").write_text(markdown_report(f"raydino evaluation: {name}", meta, results))
    plot_roc(curves, data.classes, out_dir / "roc.png")
    progress("\n" + markdown_table(results) + "\n")
    progress(f"[raydino.evaluate] wrote {out_dir / 'metrics.json'}, {out_dir / 'metrics.md'}, {out_dir / 'roc.png'}")
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = evaluate(
            args.checkpoint,
            args.data,
            dataset=args.dataset,
            kinds=PROBES if args.probe == "all" else (args.probe,),
            seeds=parse_seeds(args.seeds) if args.seeds is not None else None,
            out=args.out,
            image_size=args.image_size,
            batch_size=args.batch_size,
            device=args.device,
            arch=args.arch,
            baseline=args.baseline,
            n_bootstrap=args.bootstrap,
            epochs=args.epochs,
            lr=args.lr,
            train_batch_size=args.train_batch_size,
            train_crop_scale=args.train_crop_scale,
            train_interpolation=args.train_interpolation,
            train_flip=args.train_flip,
            feature_dtype=args.feature_dtype,
            ordinal=args.ordinal,
            knn_k=args.knn_k,
            knn_temperature=args.knn_temperature,
            crop_pct=args.crop_pct,
            storage_options=cli_storage_options(args),
        )
    except USER_ERRORS as e:
        return user_error("raydino.evaluate", e)
    undefined = {k: r["undefined"] for k, r in report["results"].items() if r["undefined"]}
    for k, u in undefined.items():
        print(f"raydino.evaluate: {k}: undefined metrics: {u}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
