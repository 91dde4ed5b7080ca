"""``python -m raydino.shard SRC DEST``: photographs -> verified Parquet shards + manifest.

SRC is a folder (recursive), a RETFound-layout tree (``{train,val,test}/<class>/``) or a CSV
of ``path,label[,split]``; DEST a local path, ``file://``, ``s3://bucket/prefix`` or ``gs://bucket/prefix``.  Rerunning
the same command after an interruption keeps the finished shards and does the rest.

Exit status: 0 done (also when some files were rejected: see DEST/rejects.csv), 1 no file
could be read, 2 bad arguments, missing source, or storage that cannot be reached or written.

``python -m raydino.shard --verify DEST`` checks an existing dataset against its manifest.
``python -m raydino.shard --list-datasets`` prints the catalog of the paper's datasets.
``python -m raydino.shard --overlap PRETRAIN LABELLED [--out DIR]`` counts the labelled images (per
split) that are also in the pretraining data (`raydino.data.overlap`); its last line is
``N of M labelled images overlap the pretraining data``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from raydino.cli import USER_ERRORS, add_storage_arguments, local_folder, user_error
from raydino.cli import storage_options as cli_storage_options
from raydino.data import catalog
from raydino.data.fov import DEFAULT_QUALITY, MIN_MAX_SIDE
from raydino.data.overlap import overlap
from raydino.data.shards import open_shards
from raydino.data.storage import StorageOptions
from raydino.data.writer import NothingReadableError, ShardingError, ShardJobOptions, shard_dataset


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m raydino.shard",
        usage="python -m raydino.shard SRC DEST [options] | --verify DEST | --overlap PRETRAIN LABELLED | --list-datasets",
        description="Shard fundus photographs into Parquet + manifest.json (local, s3:// or gs://).",
        epilog="Exit status: 0 done (rejects listed in DEST/rejects.csv), 1 nothing readable, 2 error.",
    )
    p.add_argument("paths", nargs="*", metavar="PATH", help="SRC (folder, RETFound tree or CSV) and DEST (path, s3:// or gs://)")
    p.add_argument("--labels", metavar="CSV", help="path,label[,split] CSV for a folder SRC (paths relative to SRC)")
    p.add_argument("--label-column", default="label", help="CSV column holding the label (default: label)")
    p.add_argument("--dataset", metavar="NAME", help="dataset name stored in every row; a catalog name "
                   f"({', '.join(catalog.names())}) also checks the tree against the paper's classes and splits")  # fmt: skip
    p.add_argument("--target-shard-mb", type=float, default=256.0, metavar="M", help="shard size in MB (default 256)")
    p.add_argument("--keep-metadata", action="store_true", help="keep EXIF/XMP/comments/PNG text (default: stripped)")
    p.add_argument("--fov-crop", action="store_true", help="crop each image to its circular field of view (+2%% margin); "
                   "images with no disc found are kept uncropped and counted")  # fmt: skip
    p.add_argument("--max-side", type=int, default=None, metavar="N",
                   help=f"downscale images whose longer side exceeds N px (N >= {MIN_MAX_SIDE}; default: keep the size)")  # fmt: skip
    p.add_argument("--quality", type=int, default=DEFAULT_QUALITY, metavar="Q",
                   help=f"JPEG quality 1-100 of images that --fov-crop/--max-side re-encode (default {DEFAULT_QUALITY})")  # fmt: skip
    p.add_argument(
        "--shuffle-seed",
        type=int,
        default=0,
        metavar="K",
        help="rows are stored in a random order drawn from K, within each split (default 0; recorded in the manifest)",
    )
    p.add_argument("--no-shuffle", action="store_true", help="store rows in source order (split, then path) instead")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores for jobs big enough to pay for them; 1: no pool)")
    add_storage_arguments(p, retries=True)
    p.add_argument("--verify", action="store_true", help="only verify the dataset at DEST against its manifest")
    p.add_argument("--shallow", action="store_true", help="with --verify: shard checksums only, not every image's")
    p.add_argument("--overlap", action="store_true", help="PRETRAIN LABELLED: count labelled images (per split) that are also in "
                   "the pretraining data, exactly (decoded pixels) or nearly (pHash); hashes are kept in each dataset's hashes.parquet")  # fmt: skip
    p.add_argument("--out", type=local_folder, metavar="DIR", help="with --overlap: also write DIR/overlap.json (the overlapping ids per split)")
    p.add_argument("--list-datasets", action="store_true", help="print the catalog of the paper's datasets and exit")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    return p


def _print_catalog() -> None:
    for info in catalog.CATALOG.values():
        splits = "/".join(str(info.splits[s]) for s in ("train", "val", "test")) if info.splits else "?"
        flag = "" if info.splits_verified else "  (split sizes unverified)"
        scale = "ordinal: quadratic kappa" if info.ordinal else "nominal: unweighted kappa"
        print(f"{info.name:16s} {info.title:16s} {len(info.classes):2d} classes, {info.total:5d} images, "
              f"train/val/test {splits}{flag}\n{'':16s} {info.task} ({scale})")  # fmt: skip


def _overlap(parser: argparse.ArgumentParser, args: argparse.Namespace, storage_options: StorageOptions) -> int:
    if len(args.paths) != 2:
        parser.error("--overlap takes two datasets: PRETRAIN LABELLED (both shard directories with a manifest.json)")
    report = overlap(args.paths[0], args.paths[1], options=storage_options, workers=args.workers, progress=not args.quiet)
    print(report.text())
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "overlap.json").write_text(json.dumps(report.to_json(), indent=2) + "\n")
        print(f"wrote {out / 'overlap.json'}")
    print(report.last_line())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list_datasets:
        _print_catalog()
        return 0
    if args.retries < 1:
        parser.error(f"--retries {args.retries}: need at least 1")
    if args.max_side is not None and args.max_side < MIN_MAX_SIDE:
        parser.error(f"--max-side {args.max_side}: must be at least {MIN_MAX_SIDE} (pixels of the longer side)")
    if not 1 <= args.quality <= 100:
        parser.error(f"--quality {args.quality}: must be from 1 to 100 (JPEG quality)")
    if args.keep_metadata and (args.fov_crop or args.max_side is not None):
        parser.error("--keep-metadata stores files exactly as found; it cannot be combined with --fov-crop or --max-side, which re-encode")
    try:
        storage_options = cli_storage_options(args)
        if args.overlap:
            return _overlap(parser, args, storage_options)
        if args.verify:
            if len(args.paths) != 1:
                parser.error("--verify takes one path: DEST")
            shards = open_shards(args.paths[0], storage_options)
            counts = shards.verify(deep=not args.shallow)
            print(f"ok: {counts['rows']} rows in {counts['shards']} shards at {shards.uri} match the manifest")
            return 0
        if len(args.paths) != 2:
            parser.error("expected SRC DEST (or --verify DEST)")
        src, dest = args.paths
        opts = ShardJobOptions(
            target_shard_mb=args.target_shard_mb, keep_metadata=args.keep_metadata, dataset=args.dataset,
            label_column=args.label_column, workers=args.workers, progress=not args.quiet,
            shuffle_seed=None if args.no_shuffle else args.shuffle_seed,
            fov_crop=args.fov_crop, max_side=args.max_side, quality=args.quality,
        )  # fmt: skip
        summary = shard_dataset(
            src, dest, labels_csv=args.labels, options=opts, storage_options=storage_options,
            on_warning=lambda w: print(f"warning: {w}", file=sys.stderr, flush=True),
        )  # fmt: skip
    except NothingReadableError as e:  # before ValueError/OSError: the one failure with its own status
        return user_error("raydino.shard", e, code=1)
    except (*USER_ERRORS, ShardingError) as e:  # bad options, SourceError, a missing --labels file, storage, shards
        return user_error("raydino.shard", e)
    except KeyboardInterrupt:
        print("\ninterrupted: finished shards are kept; rerun the same command to resume", file=sys.stderr)
        return 130
    print(summary.text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
