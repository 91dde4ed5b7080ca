"""`python -m raydino.bench {aug,train,data,gpu,all}`: the performance record.

    python -m raydino.bench aug   [--images 300] [--size 512] [--threads 1] [--preset strong] [--batch 32] [--rounds 3]
    python -m raydino.bench train [--config demo] [--workers 2] [--steps 30] [--warmup 5] [--rounds 2] [--no-smoke]
    python -m raydino.bench data  [--config demo] [--sizes 1000 20000] [--image-size 96] [--rate 1000]
    python -m raydino.bench all   [--out DIR]
    python -m raydino.bench gpu   [--config vits16-paper] [--steps 20] [--warmup 5] [--rows ...] [--device cpu]   (CUDA, not Ray)
    python -m raydino.bench ckpt  [--config demo] [--workers 1] [--checkpoints 5] [--gap 2] [--rounds 2] [--storage URI]
    python -m raydino.bench shardsize [--images 16] [--size 3000x2000] [--max-side 1024] [--quality 95] [--rounds 2]
    python -m raydino.bench bootstrap [--cases 200] [--classes 5] [--seeds 5] [--resamples 1000] [--reference-resamples 50]

Every subcommand prints progress with an ETA and ends with its ratio line; `--out DIR` writes
DIR/<bench>.json and a PNG beside it (`--json FILE` for one subcommand: FILE and FILE's .png).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from raydino.cli import USER_ERRORS, local_file, local_folder, user_error


def _add_aug_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", type=int, default=300, help="images per pipeline per round (default 300)")
    p.add_argument(
        "--size",
        type=_sizes,
        default=[512],
        metavar="PX[,PX...]",
        help="side(s) of the input JPEG in px, e.g. 512,1024,2048: one table per size, then the ratios side by side (default 512)",
    )
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
    p.add_argument(
        f"--{prefix}smoke",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also pretrain the smoke config from the Ray Data stream and report its data-wait (default on)",
    )
    p.add_argument(f"--{prefix}smoke-set", action="append", default=[], metavar="KEY=VALUE", help="override for the smoke run (repeatable)")


def _add_data_args(p: argparse.ArgumentParser, prefix: str = "") -> None:
    p.add_argument(f"--{prefix}config", default="demo", help="config whose augmentation and data settings stream (default demo)")
    p.add_argument(f"--{prefix}set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument(f"--{prefix}sizes", type=int, nargs="+", default=[1000, 20000], help="dataset sizes (default 1000 20000)")
    p.add_argument(f"--{prefix}image-size", type=int, default=96, help="side of the synthetic images (default 96)")
    p.add_argument(
        f"--{prefix}shard-mb", type=float, default=1.0, help="target shard size in MB: a bigger set has more shards, not bigger ones (default 1)"
    )
    p.add_argument(f"--{prefix}batch", type=int, default=32, help="images per trainer batch (default 32)")
    p.add_argument(
        f"--{prefix}rate",
        type=float,
        default=1000.0,
        help="stand-in trainer's consumption in images/s; 0 = as fast as the stream delivers (default 1000)",
    )
    p.add_argument(f"--{prefix}interval", type=float, default=0.25, help="memory sampling period in s (default 0.25)")
    p.add_argument(
        f"--{prefix}target-block-mb",
        type=float,
        default=0.0,
        help="Ray Data's target_max_block_size for the run in MB (default 0: Ray's own, 128 MB)",
    )


def _add_gpu_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="vits16-paper", help="config of the timed model and batch (default vits16-paper)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per precision (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    p.add_argument("--aug-images", type=int, default=1024, help="images through the GPU augmentation (default 1024)")
    p.add_argument("--cpu-images", type=int, default=64, help="images through each CPU pipeline (default 64)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a dry run of the rows, no NCCL, no augmentation (default cuda)")
    p.add_argument(
        "--rows",
        nargs="+",
        default=None,
        choices=[
            "baseline",
            "fused_adamw",
            "deferred_check",
            "fewer_launches",
            "fp32_head_logits",
            "compile",
            "compile_cudagraphs",
            "cuda_graph",
            "batch_x2",
            "fp32",
            "reference",
        ],
        help="timed rows (default all; each ablation row includes the changes of the rows above it)",
    )
    p.add_argument("--peak-tflops", type=float, default=None, help="the GPU's peak for MFU (default: dense bf16 by GPU name)")
    p.add_argument("--no-augment", action="store_true", help="leave out the augmentation timing")


def _add_ckpt_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="demo", help="config whose DINO state is checkpointed (default demo)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers (default 1)")
    p.add_argument("--checkpoints", type=int, default=5, help="checkpoints per run, the first not counted (default 5)")
    p.add_argument("--gap", type=float, default=2.0, help="seconds of stand-in training between checkpoints (default 2)")
    p.add_argument("--rounds", type=int, default=2, help="ABBA rounds of a synchronous and an asynchronous run (default 2)")
    p.add_argument("--storage", default=None, help="where checkpoints go: a directory, s3:// or gs://bucket/prefix (default a temporary directory)")


def _add_bootstrap_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cases", type=int, default=200, help="test cases (default 200)")
    p.add_argument("--classes", type=int, default=5, help="graded classes, >= 2 (default 5, as DR grades)")
    p.add_argument("--seeds", type=int, default=5, help="probe seeds scored per resample (default 5, the paper probe's)")
    p.add_argument("--resamples", type=int, default=1000, help="resamples of raydino's bootstrap_intervals (default 1000)")
    p.add_argument("--reference-resamples", type=int, default=50, help="resamples of the one-by-one loop (default 50: it is slow)")
    p.add_argument("--rounds", type=int, default=2, help="ABBA rounds; the fastest of each side is kept (default 2)")


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected pixel sizes separated by commas, e.g. 512,1024,2048") from None
    if not sizes or min(sizes) < 64:
        raise argparse.ArgumentTypeError(f"{text!r}: every size must be >= 64 px")
    return sizes


def _wxh(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected WIDTHxHEIGHT, e.g. 3000x2000") from None
    if min(w, h) < 64:
        raise argparse.ArgumentTypeError(f"{text!r}: width and height must be >= 64")
    return w, h


def _add_shardsize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", type=int, default=16, help="camera-size JPEGs made and sharded (default 16)")
    p.add_argument("--size", type=_wxh, default=(3000, 2000), metavar="WxH", help="their size (default 3000x2000)")
    p.add_argument("--max-side", type=int, default=1024, help="raydino.shard --max-side of the capped run (default 1024; >= 64)")
    p.add_argument("--quality", type=int, default=95, help="raydino.shard --quality of the capped run (default 95; 1-100)")
    p.add_argument("--preset", default="strong", choices=["strong", "weak", "weak_med"])
    p.add_argument("--batch", type=int, default=8, help="images per augment_batch call (default 8)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: per core)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the best is kept (default 2)")


def _sub_args(args: argparse.Namespace, prefix: str) -> argparse.Namespace:
    """The `all` subcommand's --train-x / --data-x options as a plain namespace for one bench."""
    sub = {k[len(prefix) :]: v for k, v in vars(args).items() if k.startswith(prefix)}
    return argparse.Namespace(**sub, cache=args.cache)


def _write(result: dict[str, Any], path: Path, plot: Callable[[dict[str, Any], Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    plot(result, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with every count checked (sizes >= 1, counts > 0, nothing negative)."""
    parser = argparse.ArgumentParser(prog="python -m raydino.bench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    parsers = {
        "aug": sub.add_parser("aug", help="multi-crop augmentation throughput (images/s per core) vs DINO's pipeline"),
        "train": sub.add_parser("train", help="Ray Train step time vs a plain PyTorch DDP loop; smoke data-wait"),
        "data": sub.add_parser("data", help="Ray Data stream: peak memory for two dataset sizes, images/s, data-wait"),
        "all": sub.add_parser("all", help="aug, train and data (options of train/data prefixed --train-/--data-)"),
        "gpu": sub.add_parser("gpu", help="one CUDA GPU: bf16 vs fp32 DINO steps under DDP/NCCL, GPU augmentation"),
        "ckpt": sub.add_parser("ckpt", help="how long a checkpoint holds training back: synchronous vs asynchronous upload"),
        "shardsize": sub.add_parser("shardsize", help="raydino.shard --fov-crop --max-side vs as found: shard bytes, augmentation images/s"),
        "bootstrap": sub.add_parser("bootstrap", help="95 %% bootstrap intervals in blocks vs scored one resample at a time"),
    }
    _add_bootstrap_args(parsers["bootstrap"])
    _add_shardsize_args(parsers["shardsize"])
    _add_ckpt_args(parsers["ckpt"])
    _add_gpu_args(parsers["gpu"])
    _add_aug_args(parsers["aug"])
    _add_train_args(parsers["train"])
    _add_data_args(parsers["data"])
    _add_aug_args(parsers["all"])
    _add_train_args(parsers["all"], "train-")
    _add_data_args(parsers["all"], "data-")
    for p in parsers.values():
        p.add_argument("--out", type=local_folder, default=None, help="write DIR/<bench>.json and .png here")
        p.add_argument("--json", type=local_file, default=None, help="write results to this file and a PNG beside it")
        p.add_argument("--cache", type=local_folder, default=".raydino", help="cache of synthetic datasets (default .raydino)")
    args = parser.parse_args(argv)
    positive = (
        "images",
        "size",
        "threads",
        "batch",
        "rounds",
        "workers",
        "steps",
        "shard_mb",
        "interval",
        "checkpoints",
        "cases",
        "seeds",
        "resamples",
    )
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
    if args.cmd == "bootstrap" and not 2 <= args.classes <= args.cases:
        parser.error(f"--classes={args.classes}: must be from 2 to --cases ({args.cases})")
    if args.cmd == "shardsize" and args.max_side < 64:
        parser.error(f"--max-side={args.max_side}: must be >= 64")
    if args.cmd == "shardsize" and not 1 <= args.quality <= 100:
        parser.error(f"--quality={args.quality}: must be from 1 to 100")
    return args


def main(argv: list[str] | None = None) -> int:
    from raydino.bench.aug import bench_aug, plot_aug
    from raydino.bench.bootstrap import bench_bootstrap, plot_bootstrap
    from raydino.bench.checkpoint import bench_checkpoint, plot_checkpoint
    from raydino.bench.data import bench_data, plot_data
    from raydino.bench.gpu import bench_gpu
    from raydino.bench.gpu_report import plot_gpu
    from raydino.bench.shardsize import bench_shardsize, plot_shardsize
    from raydino.bench.train import bench_train, plot_train

    args = parse_args(argv)

    def target(bench: str) -> Path | None:
        if args.out is not None:
            return args.out / f"{bench}.json"
        if args.json is not None:
            return args.json if args.cmd != "all" else args.json.with_name(f"{args.json.stem}-{bench}{args.json.suffix}")
        return None

    runs = {
        "aug": (lambda: bench_aug(args), plot_aug),
        "train": (lambda: bench_train(args if args.cmd == "train" else _sub_args(args, "train_")), plot_train),
        "data": (lambda: bench_data(args if args.cmd == "data" else _sub_args(args, "data_")), plot_data),
        "gpu": (lambda: bench_gpu(args), plot_gpu),
        "ckpt": (lambda: bench_checkpoint(args), plot_checkpoint),
        "shardsize": (lambda: bench_shardsize(args), plot_shardsize),
        "bootstrap": (lambda: bench_bootstrap(args), plot_bootstrap),
    }
    for bench in ["aug", "train", "data"] if args.cmd == "all" else [args.cmd]:
        run, plot = runs[bench]
        try:
            result = run()
        except USER_ERRORS as e:  # a config, data or storage mistake: one line, exit 2
            return user_error(f"raydino.bench {bench}", e)
        path = target(bench)
        if path is not None:
            _write(result, path, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
