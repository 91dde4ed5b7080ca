"""``python -m raydino.synth OUT --n N --size S --seed K``: write synthetic fundus photographs.

Writes ``OUT/{train,val,test}/<class>/*.jpg`` (RETFound layout), ``OUT/labels.csv`` (both
tasks: DR grade and glaucoma class), ``OUT/synth.json`` (parameters, counts, speed) and, with
``--preview``, ``OUT/preview.png``.  The generator itself is `raydino.data.synth`.
"""

from __future__ import annotations

import argparse
import sys

from raydino.cli import local_folder, user_error
from raydino.data.fundus import LesionScale
from raydino.data.synth import TASKS, generate_dataset


def _fractions(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--splits {text!r}: expected three numbers like 0.7,0.15,0.15") from None
    if len(parts) != 3 or min(parts) < 0 or abs(sum(parts) - 1) > 1e-6 or parts[0] == 0:
        raise argparse.ArgumentTypeError(f"--splits {text!r}: need train,val,test fractions >= 0 summing to 1, with train > 0")
    return parts  # type: ignore[return-value]


MAX_SIZE = 4096  # a rendered image is side^2 x 3 bytes several times over while it is drawn


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m raydino.synth", description=__doc__.split("\n")[0].strip("`: "))
    p.add_argument("out", type=local_folder, help="output folder (created; a local path)")
    p.add_argument("--n", type=int, default=1000, help="number of images (default 1000)")
    p.add_argument("--size", type=int, default=256, help=f"image side in pixels (default 256; 16 to {MAX_SIZE})")
    p.add_argument("--seed", type=int, default=0, help="random seed: same seed, same images (default 0)")
    p.add_argument("--format", choices=("jpeg", "png"), default="jpeg", help="image encoding (default jpeg)")
    p.add_argument("--task", choices=tuple(TASKS), default="dr", help="which label names the class folders (default dr)")
    p.add_argument("--splits", type=_fractions, default=(0.7, 0.15, 0.15), help="train,val,test fractions (default 0.7,0.15,0.15)")
    p.add_argument(
        "--lesion-size", type=float, default=1.0, help="DR lesions' radius, times the default drawing (default 1; 3 makes them visible at 128 px)"
    )
    p.add_argument("--lesion-count", type=float, default=1.0, help="DR lesions per image, times the default counts (default 1)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores from ~200 images at 256 px)")
    p.add_argument("--preview", action="store_true", help="also write preview.png, a contact sheet per grade")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.n < 1:
        return user_error("raydino.synth", f"--n {args.n}: need at least 1 image")
    if not 16 <= args.size <= MAX_SIZE:
        return user_error("raydino.synth", f"--size {args.size}: from 16 to {MAX_SIZE} px (a 12 MP camera's longer side is ~4,000)")
    if args.workers is not None and args.workers < 1:
        return user_error("raydino.synth", f"--workers {args.workers}: need at least 1")
    try:
        lesions = LesionScale(args.lesion_size, args.lesion_count)
        s = generate_dataset(
            args.out, args.n, args.size, args.seed, fmt=args.format, task=args.task, split_fractions=args.splits,
            lesions=lesions, workers=args.workers, preview=args.preview, progress=not args.quiet,
        )  # fmt: skip
    except (FileExistsError, ValueError) as e:
        return user_error("raydino.synth", e)
    print(
        f"{s.n} synthetic fundus images ({s.size} px, {s.format}, seed {s.seed}"
        + ("" if lesions.is_default else f", lesions {s.lesion_size:g}x size, {s.lesion_count:g}x count")
        + f") in {s.out}: "
        f"{s.elapsed_s:.1f} s, {s.images_per_s:.0f} images/s on {s.workers} processes"
    )
    print(f"  splits {s.by_split}; DR grades {s.by_dr_grade}; glaucoma {s.by_glaucoma}")
    print(f"  labels: {s.out}/labels.csv" + (f"; preview: {s.out}/preview.png" if args.preview else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
