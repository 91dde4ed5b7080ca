"""The work of the sharding job: images read and prepared in pool processes, shards written by the parent.

`process_chunk` runs in spawned pool processes, so it takes only picklable arguments and keeps
its storage handles in a per-process cache.  `write_shard` runs in the parent, once every image
of a shard is ready: it writes the Parquet file (atomically) and then the shard's receipt, the
record `raydino.data.shardplan.load_receipt` trusts on a rerun.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import asdict
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from raydino.data import storage
from raydino.data.fov import ImageTransform
from raydino.data.imagebytes import ImageRejected, PreparedImage, prepare_image
from raydino.data.shardplan import PlannedShard, Reject, receipt_path, shard_version
from raydino.data.shards import SCHEMA, SCHEMA_VERSION, TRANSFORM_FIELDS, shard_name
from raydino.data.sources import SourceItem
from raydino.data.storage import Location, StorageError, StorageOptions

_ROW_GROUP_BYTES = 32 * 2**20  # ~32 MB row groups: streaming readers hold one at a time

# ------------------------------------------------------------------ worker side

_worker_locations: dict[tuple[str, StorageOptions], Location] = {}


def _source_location(root_uri: str, options: StorageOptions) -> Location:
    key = (root_uri, options)
    if key not in _worker_locations:
        _worker_locations[key] = storage.resolve(root_uri, options)
    return _worker_locations[key]


def ignore_sigint() -> None:
    """Pool initializer: Ctrl-C reaches the whole process group; the parent alone handles it (and stops the pool)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def process_chunk(
    root_uri: str, options: StorageOptions, paths: list[str], keep_metadata: bool, transform: ImageTransform | None = None
) -> list[PreparedImage | str]:
    """Read and prepare a few images; a string in the result is a rejection reason.

    ``transform``: the field-of-view crop / size cap (`raydino.data.fov`), None for none.

    Transient storage errors propagate (the run stops and can be resumed); per-file problems
    become reasons.  Runs in pool processes, so it only takes picklable arguments.
    """
    loc = _source_location(root_uri, options)
    out: list[PreparedImage | str] = []
    for path in paths:
        try:
            data = storage.read_bytes(loc, path)
        except storage.TransientStorageError:
            raise
        except FileNotFoundError:
            out.append("unreadable: file disappeared after listing")
            continue
        except PermissionError:
            out.append("unreadable: permission denied")
            continue
        except (OSError, StorageError) as e:
            out.append(f"unreadable: {storage.redact(str(e)).splitlines()[0]}")
            continue
        try:
            out.append(prepare_image(data, keep_metadata=keep_metadata, transform=transform))
        except ImageRejected as e:
            out.append(e.reason)
    return out


# ------------------------------------------------------------------ parent side: one shard


def encode_shard(rows: list[tuple[SourceItem, PreparedImage]], dataset: str | None, fingerprint: str) -> bytes:
    """The rows as one Parquet file in memory (`raydino.data.shards.SCHEMA`), stamped with the plan's fingerprint.

    Rows prepared with a field-of-view crop / size cap also get `TRANSFORM_FIELDS` (original size,
    detected circle); without one the file is exactly what it always was.
    """
    schema = SCHEMA
    columns = {
        "id": [it.id for it, _ in rows],
        "image": [p.data for _, p in rows],
        "format": [p.format for _, p in rows],
        "height": [p.height for _, p in rows],
        "width": [p.width for _, p in rows],
        "label": [it.label for it, _ in rows],
        "split": [it.split for it, _ in rows],
        "dataset": [dataset] * len(rows),
        "sha256": [p.sha256 for _, p in rows],
    }
    if any(p.orig_width is not None for _, p in rows):
        schema = pa.schema([*SCHEMA, *TRANSFORM_FIELDS])
        columns["orig_width"] = [p.orig_width for _, p in rows]
        columns["orig_height"] = [p.orig_height for _, p in rows]
        for i, name in enumerate(("fov_cx", "fov_cy", "fov_r")):
            columns[name] = [None if p.fov is None else p.fov[i] for _, p in rows]
    table = pa.table(
        columns,
        schema=schema.with_metadata({"raydino.schema_version": str(SCHEMA_VERSION), "raydino.fingerprint": fingerprint}),
    )
    avg = max(1, sum(len(p.data) for _, p in rows) // len(rows))
    sink = pa.BufferOutputStream()
    pq.write_table(
        table,
        sink,
        row_group_size=max(1, min(len(rows), _ROW_GROUP_BYTES // avg)),
        # Image bytes are already compressed (JPEG/PNG): compressing again costs CPU for nothing.
        compression={c: ("NONE" if c == "image" else "ZSTD") for c in table.column_names},
        use_dictionary=["format", "label", "split", "dataset"],
        write_statistics=["id", "height", "width", "label", "split"],
    )
    return sink.getvalue().to_pybytes()


def write_shard(dest: Location, plan: PlannedShard, results: list[PreparedImage | str], dataset: str | None) -> dict[str, Any]:
    """Write the shard of a plan from its images' results (rejects recorded), then its receipt; returns the receipt."""
    rows = [(it, r) for it, r in zip(plan.items, results) if isinstance(r, PreparedImage)]
    rejects = [asdict(Reject(it.id, "rejected", r)) for it, r in zip(plan.items, results) if isinstance(r, str)]
    receipt: dict[str, Any] = {"fingerprint": plan.fingerprint, "index": plan.index, "entry": None, "rejects": rejects}
    name = shard_name(plan.index)
    if rows:
        data = encode_shard(rows, dataset, plan.fingerprint)
        storage.write_bytes(dest, dest.join(name), data)
        receipt["entry"] = {
            "path": name,
            "rows": len(rows),
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "splits": dict(Counter(it.split for it, _ in rows)),
            "labels": dict(Counter(it.label or "" for it, _ in rows)),
        }
        split_labels: dict[str, Counter[str]] = {}
        for it, _ in rows:
            split_labels.setdefault(it.split, Counter())[it.label or ""] += 1
        receipt["split_labels"] = {k: dict(v) for k, v in split_labels.items()}
        receipt["metadata_stripped"] = sum(1 for _, p in rows if p.removed and p.source_format in ("jpeg", "png"))
        receipt["transcoded"] = sum(1 for _, p in rows if p.format != p.source_format)
        if any(p.orig_width is not None for _, p in rows):
            receipt["transform"] = {
                "fov_found": sum(1 for _, p in rows if p.fov_found is True),
                "fov_not_found": sum(1 for _, p in rows if p.fov_found is False),
                "resized": sum(1 for _, p in rows if p.resized),
                "reencoded": sum(1 for _, p in rows if p.reencoded),
            }
    else:
        storage.delete_file(dest, dest.join(name))  # a stale file from an earlier plan
    if receipt["entry"] is not None:  # what a rerun compares instead of downloading the shard again
        receipt["version"] = shard_version(dest, dest.join(name))
    storage.write_bytes(dest, receipt_path(dest, plan.index), json.dumps(receipt).encode())
    return receipt
