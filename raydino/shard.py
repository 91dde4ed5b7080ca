"""``python -m raydino.shard SRC DEST``: photographs -> verified Parquet shards + manifest.

SRC is a folder (recursive), a RETFound-layout tree (``{train,val,test}/<class>/``) or a CSV
of ``path,label[,split]``; DEST a local path, ``file://`` or ``s3://bucket/prefix``.  Rerunning
the same command after an interruption keeps the finished shards and does the rest.

Exit status: 0 done (also when some files were rejected: see DEST/rejects.csv), 1 no file
could be read, 2 bad arguments, missing source, or storage that cannot be reached or written.

``python -m raydino.shard --verify DEST`` checks an existing dataset against its manifest.
``python -m raydino.shard --list-datasets`` prints the catalog of the paper's datasets.
"""

from __future__ import annotations

import argparse
import sys

from raydino.cli import user_error
from raydino.data import catalog
from raydino.data.shards import ShardError, open_shards
from raydino.data.storage import StorageError, StorageOptions
from raydino.data.writer import NothingReadableError, ShardingError, ShardJobOptions, shard_dataset


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m raydino.shard",
        usage="python -m raydino.shard SRC DEST [options] | --verify DEST | --list-datasets",
        description="Shard fundus photographs into Parquet + manifest.json (local or s3://).",
        epilog="Exit status: 0 done (rejects listed in DEST/rejects.csv), 1 nothing readable, 2 error.",
    )
    p.add_argument("paths", nargs="*", metavar="PATH", help="SRC (folder, RETFound tree or CSV) and DEST (path or s3://)")
    p.add_argument("--labels", metavar="CSV", help="path,label[,split] CSV for a folder SRC (paths relative to SRC)")
    p.add_argument("--label-column", default="label", help="CSV column holding the label (default: label)")
    p.add_argument("--dataset", metavar="NAME", help="dataset name stored in every row; a catalog name "
                   f"({', '.join(catalog.names())}) also checks the tree against the paper's classes and splits")  # fmt: skip
    p.add_argument("--target-shard-mb", type=float, default=256.0, metavar="M", help="shard size in MB (default 256)")
    p.add_argument("--keep-metadata", action="store_true", help="keep EXIF/XMP/comments/PNG text (default: stripped)")
    p.add_argument(
        "--shuffle-seed",
        type=int,
        default=0,
        metavar="K",
        help="rows are stored in a random order drawn from K, within each split (default 0; recorded in the manifest)",
    )
    p.add_argument("--no-shuffle", action="store_true", help="store rows in source order (split, then path) instead")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores for jobs big enough to pay for them; 1: no pool)")
    p.add_argument("--s3-endpoint", metavar="URL", help="S3-compatible endpoint (default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL)")
    p.add_argument("--s3-region", metavar="REGION", help="S3 region (default: AWS_REGION / AWS_DEFAULT_REGION)")
    p.add_argument("--retries", type=int, default=5, metavar="N", help="attempts per storage operation (default 5)")
    p.add_argument("--verify", action="store_true", help="only verify the dataset at DEST against its manifest")
    p.add_argument("--shallow", action="store_true", help="with --verify: shard checksums only, not every image's")
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list_datasets:
        _print_catalog()
        return 0
    if args.retries < 1:
        parser.error(f"--retries {args.retries}: need at least 1")
    storage_options = StorageOptions(endpoint=args.s3_endpoint, region=args.s3_region, max_attempts=args.retries)
    try:
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
        )  # fmt: skip
        summary = shard_dataset(
            src, dest, labels_csv=args.labels, options=opts, storage_options=storage_options,
            on_warning=lambda w: print(f"warning: {w}", file=sys.stderr, flush=True),
        )  # fmt: skip
    except NothingReadableError as e:  # before ValueError/OSError: the one failure with its own status
        return user_error("raydino.shard", e, code=1)
    except (ValueError, ShardingError, StorageError, ShardError) as e:  # bad options, SourceError, storage, shards
        return user_error("raydino.shard", e)
    except KeyboardInterrupt:
        print("\ninterrupted: finished shards are kept; rerun the same command to resume", file=sys.stderr)
        return 130
    print(summary.text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
