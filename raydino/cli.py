"""How every `python -m raydino.X` ends: the same exit statuses, and a user's mistake reported as one
line on stderr that names the program and what is wrong, never a traceback and never a credential.

The recipes catch `USER_ERRORS` around their work and hand them to `user_error`.  Anything else
(a bug, an interrupted run) keeps its traceback.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from raydino.config import check_endpoint
from raydino.data.shards import ShardError
from raydino.data.storage import StorageError, StorageOptions, redact

EXIT_OK = 0
EXIT_TRAINING_FAILED = 1  # the work failed (Ray Train gave up after run.max_failures, every trial of a search failed)
EXIT_BAD_INPUT = 2  # config, data, storage or cluster cannot work: nothing was done
EXIT_NON_FINITE = 3  # the loss became NaN/inf: stopped, the last good checkpoint is kept
# ConfigError (config.py) and DataError (data/labelled.py) are ValueErrors; StorageError is an
# OSError (a URI that cannot be read or written, a missing bucket, a refused permission); ShardError
# names a shard or manifest that fails its checksum or cannot be read.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, StorageError, ShardError)


def user_error(prog: str, error: BaseException | str, code: int = EXIT_BAD_INPUT) -> int:
    """Print `PROG: error: MESSAGE` (credentials redacted) to stderr; return the exit status."""
    print(f"{prog}: error: {redact(str(error))}", file=sys.stderr)
    return code


def add_storage_arguments(parser: argparse.ArgumentParser, retries: bool = False) -> None:
    """`--s3-endpoint`, `--s3-region`, `--gcs-endpoint` (and `--retries`): how a command reaches
    object storage, the same flags on every command that reads s3:// or gs:// URIs."""
    parser.add_argument(
        "--s3-endpoint", metavar="URL", help="S3-compatible endpoint, http(s)://host[:port] (default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL)"
    )
    parser.add_argument("--s3-region", metavar="REGION", help="S3 region (default: AWS_REGION / AWS_DEFAULT_REGION)")
    parser.add_argument(
        "--gcs-endpoint", metavar="URL", help="GCS emulator or private endpoint, http(s)://host[:port] (default: STORAGE_EMULATOR_HOST, else Google)"
    )
    if retries:
        parser.add_argument("--retries", type=int, default=5, metavar="N", help="attempts per storage operation (default 5)")


def storage_options(args: argparse.Namespace) -> StorageOptions:
    """The `add_storage_arguments` flags as `StorageOptions`; a malformed endpoint raises a ValueError
    naming the flag (credentials never belong in an endpoint, and are never echoed)."""
    for flag in ("s3_endpoint", "gcs_endpoint"):
        try:
            check_endpoint(flag, getattr(args, flag))
        except ValueError as e:
            raise ValueError(f"--{flag.replace('_', '-')}: {e}") from None
    kw = {"max_attempts": args.retries} if getattr(args, "retries", None) is not None else {}
    return StorageOptions(endpoint=args.s3_endpoint, region=args.s3_region, gcs_endpoint=args.gcs_endpoint, **kw)


def storage_overrides(args: argparse.Namespace) -> list[str]:
    """The `add_storage_arguments` flags given, as config overrides (`data.s3_endpoint=URL`, ...) for
    the commands whose config holds them (pretrain, tune); the config then validates them."""
    keys = {"s3_endpoint": "data.s3_endpoint", "s3_region": "data.s3_region", "gcs_endpoint": "data.gcs_endpoint"}
    return [f"{key}={getattr(args, flag)}" for flag, key in keys.items() if getattr(args, flag, None) is not None]


_URI_PREFIX = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]+:/")  # s3://, gs://, http://, and s3:/ as Path() leaves it


def _local_path(value: str, folder: bool) -> Path:
    text = str(value)
    if _URI_PREFIX.match(text):
        raise argparse.ArgumentTypeError(
            f"{redact(text)}: a local path is expected (this output is written on this machine; copy it to object storage afterwards)"
        )
    path = Path(text).expanduser()
    if folder and path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: exists and is not a folder")
    if not folder and path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: is a folder; a file path is expected")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise argparse.ArgumentTypeError(f"{text}: {parent} is a file, not a folder")
    return path


def local_folder(value: str) -> Path:
    """argparse `type=` for an output folder written on this machine: refuses a URI (s3://, gs://: these
    outputs are local files) and a path where a file stands, before any work."""
    return _local_path(value, folder=True)


def local_file(value: str) -> Path:
    """argparse `type=` for an output file written on this machine (see `local_folder`)."""
    return _local_path(value, folder=False)
