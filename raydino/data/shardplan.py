"""The sharding job's bookkeeping: which files each shard holds, and what an earlier run finished.

A plan is deterministic (same source, options and seed: shard *k* holds the same files on every
run) and every shard carries a fingerprint of its members and of the options, so that a rerun
keeps exactly the shards whose receipt (``_progress/shard-k.json``) still matches its plan and its
file on storage (same size and ETag or modification time, looked up, not downloaded), and redoes
the rest.  `raydino.data.writer` drives the job.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from raydino.data import storage
from raydino.data.shards import PROGRESS_DIR, REJECTS_NAME, SCHEMA_VERSION, SHARDS_DIR, ShardEntry, ShardError, check_shard_bytes, shard_name
from raydino.data.sources import SPLIT_ORDER, SourceItem
from raydino.data.storage import Location


@dataclass
class Reject:
    id: str
    kind: str  # "rejected" or "skipped"
    reason: str


@dataclass
class PlannedShard:
    index: int
    items: list[SourceItem]
    fingerprint: str


def row_order(shuffle_seed: int | None) -> dict[str, Any]:
    """How rows are ordered in the shards (recorded in the manifest as ``row_order``)."""
    return {"shuffled": shuffle_seed is not None, "seed": shuffle_seed}


def order_items(items: list[SourceItem], shuffle_seed: int | None) -> list[SourceItem]:
    """Splits in their usual order; within a split, a random order seeded by ``shuffle_seed``.

    The key is a hash of (seed, id), not a permutation of the listing: the same files get the
    same order however the source lists them (local or S3 listings, a CSV in any order).
    """

    def key(it: SourceItem) -> tuple[Any, ...]:
        split = (SPLIT_ORDER.get(it.split, 9), it.split)
        if shuffle_seed is None:
            return (*split, it.id)
        return (*split, hashlib.blake2b(f"{shuffle_seed}\0{it.id}".encode(), digest_size=8).digest(), it.id)

    return sorted(items, key=key)


def plan_shards(
    items: list[SourceItem],
    target_bytes: float,
    *,
    keep_metadata: bool,
    dataset: str | None,
    shuffle_seed: int | None,
    transform: dict[str, Any] | None = None,
) -> list[PlannedShard]:
    """Cut the ordered items into shards of about `target_bytes`, each with its fingerprint."""
    shards: list[list[SourceItem]] = []
    current: list[SourceItem] = []
    size = 0
    for it in items:
        # A shard never mixes splits: readers of one split (Ray Data) then read only its shards.
        if current and (size + it.size > target_bytes or it.split != current[-1].split):
            shards.append(current)
            current, size = [], 0
        current.append(it)
        size += it.size
    if current:
        shards.append(current)
    settings: dict[str, Any] = {"schema": SCHEMA_VERSION, "keep_metadata": keep_metadata, "dataset": dataset}
    if shuffle_seed is not None:
        # Only when shuffled: unshuffled plans keep the fingerprints (and receipts) of earlier raydino versions.
        settings["row_order"] = row_order(shuffle_seed)
    if transform:
        # --fov-crop / --max-side / --quality change the stored pixels: a rerun with others rewrites.
        settings["transform"] = transform
    planned = []
    for i, members in enumerate(shards):
        h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
        for it in members:
            h.update(json.dumps([it.id, it.size, it.mtime_ns, it.label, it.split]).encode())
        planned.append(PlannedShard(i, members, h.hexdigest()))
    return planned


def receipt_path(dest: Location, index: int) -> str:
    return dest.join(PROGRESS_DIR, f"shard-{index:05d}.json")


def load_receipt(dest: Location, plan: PlannedShard) -> dict[str, Any] | None:
    """The receipt of an earlier run for this shard, if its shard file is intact."""
    path = receipt_path(dest, plan.index)
    if not storage.exists(dest, path):
        return None
    try:
        receipt = json.loads(storage.read_bytes(dest, path))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if receipt.get("fingerprint") != plan.fingerprint:
        return None
    entry = receipt.get("entry")
    if entry is None:  # every file of this shard was rejected: nothing to verify
        return receipt
    shard_path = dest.join(entry["path"])
    if receipt.get("version"):
        # Trusted without reading it: the object is the one this receipt's run wrote (same size and
        # ETag / modification time).  Re-hashing every finished shard on S3 cost a full download per
        # resume; `python -m raydino.shard --verify DEST` still checks every byte.
        return receipt if shard_version(dest, shard_path) == receipt["version"] else None
    if not storage.exists(dest, shard_path):
        return None
    try:  # a receipt from before versions were recorded: check the bytes
        check_shard_bytes(ShardEntry(**entry), storage.read_bytes(dest, shard_path), dest.uri_of(entry["path"]))
    except ShardError:
        return None
    return receipt


_S3_CLIENTS: dict[tuple[str | None, str | None], Any] = {}


def shard_version(dest: Location, path: str) -> str | None:
    """What identifies one stored object without reading it: size plus S3's ETag (a digest of the
    content), elsewhere size plus modification time; None if the object is missing."""
    if dest.scheme == "s3":
        from botocore.exceptions import ClientError

        key = (dest.options.resolved_endpoint(), dest.options.resolved_region())
        client = _S3_CLIENTS.get(key) or _S3_CLIENTS.setdefault(key, storage.s3_client(dest.options))
        bucket, _, name = path.partition("/")
        try:
            head = storage.with_retries(lambda: client.head_object(Bucket=bucket, Key=name), what=f"looking up s3://{path}", options=dest.options)
        except ClientError:  # 404 (gone) or 403: not the object the receipt recorded
            return None
        return f"size={head['ContentLength']} etag={head['ETag'].strip(chr(34))}"
    info = storage.file_info(dest, path)
    if info.type != pafs.FileType.File:
        return None
    return f"size={info.size} mtime_ns={info.mtime_ns}"


def write_rejects(dest: Location, rejects: list[Reject]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "kind", "reason"])
    for r in sorted(rejects, key=lambda r: r.id):
        w.writerow([r.id, r.kind, r.reason])
    storage.write_bytes(dest, dest.join(REJECTS_NAME), buf.getvalue().encode())


def remove_stale(dest: Location, n_planned: int) -> None:
    """Delete shard files and receipts of an earlier, larger plan (and crash leftovers)."""
    wanted = {dest.join(shard_name(i)) for i in range(n_planned)} | {receipt_path(dest, i) for i in range(n_planned)}
    for sub in (SHARDS_DIR, PROGRESS_DIR):
        for info in storage.list_files(dest, dest.join(sub)):
            if info.path not in wanted:
                storage.delete_file(dest, info.path)
