"""Write a source of photographs as verified Parquet shards plus a manifest, resumably.

The pipeline, and why it is shaped this way:

1. List the source (`sources.list_source`) and order it: by split, then in a seeded random
   order (``shuffle_seed``; a hash of seed and id, so the order does not depend on how the
   source was listed).  The same source and seed always give the same shard plan: shard *k*
   holds the same files on every run.  Shuffled, because a RETFound tree lists its images class
   by class: in source order every shard, and so every training batch read from it, would hold
   one class (DINO's centre and BatchNorm statistics would be biased by it).
2. Plan shards by the source files' sizes (``target_shard_mb``), one split per shard (so a
   reader of the train split reads only train shards).  Each shard gets a
   fingerprint of its members (id, size, mtime, label, split) and of the options.
3. Resume: a shard whose receipt (``_progress/shard-k.json``) has the same fingerprint and whose
   file still matches the receipt's size and sha256 is kept; everything else is redone.
4. A process pool (spawned, not forked: the AWS SDK's threads do not survive a fork) reads,
   validates and strips the images; the parent assembles each shard in order, writes it
   (atomically) and then its receipt.  Work in flight is bounded, so memory stays around one
   shard plus a few chunks whatever the dataset size.
5. ``rejects.csv`` and finally ``manifest.json`` are written from the receipts; the manifest
   appears last, so a DEST with a manifest is always complete.

Errors: unreadable/corrupt files are rejected with a reason (never fatal, never silent); an
unreachable source or destination is fatal after retries (`storage.with_retries`), with a
message that says which shard and that rerunning resumes.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import multiprocessing
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from raydino.data import catalog, storage
from raydino.data.imagebytes import ImageRejected, PreparedImage, prepare_image
from raydino.data.progress import Progress
from raydino.data.shards import (
    MANIFEST_NAME,
    PROGRESS_DIR,
    REJECTS_NAME,
    SCHEMA,
    SCHEMA_VERSION,
    SHARDS_DIR,
    Manifest,
    ShardEntry,
    ShardError,
    Totals,
    check_shard_bytes,
    shard_name,
)
from raydino.data.sources import SPLIT_ORDER, SourceItem, SourceListing, list_source
from raydino.data.storage import Location, StorageError, StorageOptions

_ROW_GROUP_BYTES = 32 * 2**20  # ~32 MB row groups: streaming readers hold one at a time
_CHUNK_ITEMS = 16  # images per pool task: amortises process hand-off, keeps results small
_CHUNK_BYTES = 32 * 2**20


class ShardingError(RuntimeError):
    """The run cannot finish (destination or source unreachable, nothing readable)."""


class NothingReadableError(ShardingError):
    """Every source file was rejected or skipped."""


@dataclass
class ShardJobOptions:
    target_shard_mb: float = 256.0
    keep_metadata: bool = False
    dataset: str | None = None  # the rows' dataset column; a catalog name also checks the tree
    label_column: str = "label"
    workers: int | None = None  # None: all cores when the job is big enough to pay for them; 1: in this process
    progress: bool = True
    # Rows are stored in a random order drawn from this seed (within each split); None keeps the
    # source order (split, then id).  Part of every shard's fingerprint: a rerun with another seed
    # rewrites the shards instead of mixing two orders.
    shuffle_seed: int | None = 0

    def __post_init__(self) -> None:
        if not (self.target_shard_mb > 0):
            raise ValueError(f"target_shard_mb={self.target_shard_mb}: must be > 0 (megabytes per shard)")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers={self.workers}: must be >= 1 (or None for all cores)")
        if self.shuffle_seed is not None and (isinstance(self.shuffle_seed, bool) or not isinstance(self.shuffle_seed, int)):
            raise ValueError(f"shuffle_seed={self.shuffle_seed!r}: must be an integer (or None to keep the source order)")


@dataclass
class Reject:
    id: str
    kind: str  # "rejected" or "skipped"
    reason: str


@dataclass
class ShardSummary:
    dest: str
    rows: int
    shards: int
    bytes: int
    by_split: dict[str, int]
    rejected: int
    skipped: int
    reused_shards: int
    written_shards: int
    elapsed_s: float
    warnings: list[str] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)

    def text(self) -> str:
        splits = ", ".join(f"{k} {v}" for k, v in self.by_split.items())
        lines = [
            f"{self.rows} images in {self.shards} shards ({self.bytes / 2**20:.1f} MiB) at {self.dest} [{splits}]",
            f"  {self.written_shards} shards written, {self.reused_shards} kept from an earlier run, "
            f"{self.elapsed_s:.1f} s",
        ]
        if self.rejected or self.skipped:
            lines.append(
                f"  {self.rejected} files rejected, {self.skipped} skipped; reasons in {self.dest.rstrip('/')}/{REJECTS_NAME}"
            )
            for reason, n in Counter(r.reason for r in self.rejects).most_common(5):
                lines.append(f"    {n} x {reason}")
        return "\n".join(lines)


@dataclass
class _Planned:
    index: int
    items: list[SourceItem]
    fingerprint: str


# ------------------------------------------------------------------ worker side

_worker_locations: dict[tuple[str, StorageOptions], Location] = {}


def _source_location(root_uri: str, options: StorageOptions) -> Location:
    key = (root_uri, options)
    if key not in _worker_locations:
        _worker_locations[key] = storage.resolve(root_uri, options)
    return _worker_locations[key]


def _ignore_sigint() -> None:
    # Ctrl-C reaches the whole process group; the parent alone handles it (and stops the pool).
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _process_chunk(
    root_uri: str, options: StorageOptions, paths: list[str], keep_metadata: bool
) -> list[PreparedImage | str]:
    """Read and prepare a few images; a string in the result is a rejection reason.

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
            out.append(prepare_image(data, keep_metadata=keep_metadata))
        except ImageRejected as e:
            out.append(e.reason)
    return out


# ------------------------------------------------------------------ planning


def row_order(opts: ShardJobOptions) -> dict[str, Any]:
    """How rows are ordered in the shards (recorded in the manifest as ``row_order``)."""
    return {"shuffled": opts.shuffle_seed is not None, "seed": opts.shuffle_seed}


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


def _plan(items: list[SourceItem], target_bytes: float, opts: ShardJobOptions) -> list[_Planned]:
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
    settings: dict[str, Any] = {"schema": SCHEMA_VERSION, "keep_metadata": opts.keep_metadata, "dataset": opts.dataset}
    if opts.shuffle_seed is not None:
        # Only when shuffled: unshuffled plans keep the fingerprints (and receipts) of earlier raydino versions.
        settings["row_order"] = row_order(opts)
    planned = []
    for i, members in enumerate(shards):
        h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
        for it in members:
            h.update(json.dumps([it.id, it.size, it.mtime_ns, it.label, it.split]).encode())
        planned.append(_Planned(i, members, h.hexdigest()))
    return planned


def _receipt_path(dest: Location, index: int) -> str:
    return dest.join(PROGRESS_DIR, f"shard-{index:05d}.json")


def _load_receipt(dest: Location, plan: _Planned) -> dict[str, Any] | None:
    """The receipt of an earlier run for this shard, if its shard file is intact."""
    path = _receipt_path(dest, plan.index)
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
    if not storage.exists(dest, shard_path):
        return None
    try:
        check_shard_bytes(ShardEntry(**entry), storage.read_bytes(dest, shard_path), dest.uri_of(entry["path"]))
    except ShardError:
        return None
    return receipt


# ------------------------------------------------------------------ writing one shard


def _encode_shard(rows: list[tuple[SourceItem, PreparedImage]], dataset: str | None, fingerprint: str) -> bytes:
    table = pa.table(
        {
            "id": [it.id for it, _ in rows],
            "image": [p.data for _, p in rows],
            "format": [p.format for _, p in rows],
            "height": [p.height for _, p in rows],
            "width": [p.width for _, p in rows],
            "label": [it.label for it, _ in rows],
            "split": [it.split for it, _ in rows],
            "dataset": [dataset] * len(rows),
            "sha256": [p.sha256 for _, p in rows],
        },
        schema=SCHEMA.with_metadata({"raydino.schema_version": str(SCHEMA_VERSION), "raydino.fingerprint": fingerprint}),
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


def _write_shard(
    dest: Location,
    plan: _Planned,
    results: list[PreparedImage | str],
    opts: ShardJobOptions,
) -> dict[str, Any]:
    rows = [(it, r) for it, r in zip(plan.items, results) if isinstance(r, PreparedImage)]
    rejects = [asdict(Reject(it.id, "rejected", r)) for it, r in zip(plan.items, results) if isinstance(r, str)]
    receipt: dict[str, Any] = {"fingerprint": plan.fingerprint, "index": plan.index, "entry": None, "rejects": rejects}
    name = shard_name(plan.index)
    if rows:
        data = _encode_shard(rows, opts.dataset, plan.fingerprint)
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
    else:
        storage.delete_file(dest, dest.join(name))  # a stale file from an earlier plan
    storage.write_bytes(dest, _receipt_path(dest, plan.index), json.dumps(receipt).encode())
    return receipt


# ------------------------------------------------------------------ the job


def _chunks(pending: list[_Planned]) -> Iterable[tuple[int, list[SourceItem]]]:
    for plan in pending:
        chunk: list[SourceItem] = []
        size = 0
        for it in plan.items:
            if chunk and (len(chunk) >= _CHUNK_ITEMS or size + it.size > _CHUNK_BYTES):
                yield plan.index, chunk
                chunk, size = [], 0
            chunk.append(it)
            size += it.size
        if chunk:
            yield plan.index, chunk


def _default_workers(listing: SourceListing, pending: list[_Planned]) -> int:
    """All cores when the work outweighs starting them (~1-2 s to spawn and import).

    Local JPEGs are validated and written at roughly 50-100 MB/s per core, so a pool pays off from
    about a hundred MB; object-store reads wait on the network, so there it pays off much sooner.
    """
    items = sum(len(p.items) for p in pending)
    size = sum(it.size for p in pending for it in p.items)
    big = size > 128 * 2**20 if listing.root.scheme == "file" else items > 64
    return (os.cpu_count() or 1) if big else 1


def _run_pending(
    listing: SourceListing,
    dest: Location,
    pending: list[_Planned],
    opts: ShardJobOptions,
    progress: Progress,
    on_written: Callable[[dict[str, Any]], None],
) -> None:
    """Process the pending shards in order, writing each as soon as its images are ready."""
    root_uri = listing.root.uri
    src_opts = listing.root.options
    workers = opts.workers or _default_workers(listing, pending)
    by_index = {p.index: p for p in pending}
    collected: dict[int, list[PreparedImage | str]] = {p.index: [] for p in pending}

    def _finish_chunk(index: int, results: list[PreparedImage | str]) -> None:
        collected[index].extend(results)
        plan = by_index[index]
        if len(collected[index]) == len(plan.items):
            try:
                receipt = _write_shard(dest, plan, collected.pop(index), opts)
            except storage.TransientStorageError as e:
                raise ShardingError(f"{e}. Finished shards are kept; rerun the same command to resume.") from None
            except (OSError, StorageError) as e:
                raise ShardingError(
                    f"could not write {dest.uri_of(shard_name(index))}: {storage.redact(str(e)).splitlines()[0]}. "
                    f"Finished shards are kept; rerun the same command to resume."
                ) from None
            on_written(receipt)
        progress.update(len(results))

    chunks = _chunks(pending)
    if workers == 1 or sum(len(p.items) for p in pending) <= _CHUNK_ITEMS:
        for index, chunk in chunks:
            _finish_chunk(index, _process_chunk(root_uri, src_opts, [c.path for c in chunk], opts.keep_metadata))
        return
    ctx = multiprocessing.get_context("spawn")
    in_flight: deque[tuple[int, Future]] = deque()
    window = workers * 3
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_ignore_sigint) as pool:
        try:
            for index, chunk in chunks:
                in_flight.append(
                    (index, pool.submit(_process_chunk, root_uri, src_opts, [c.path for c in chunk], opts.keep_metadata))
                )
                while len(in_flight) >= window:
                    i, fut = in_flight.popleft()
                    _finish_chunk(i, fut.result())
            while in_flight:
                i, fut = in_flight.popleft()
                _finish_chunk(i, fut.result())
        except BrokenProcessPool as e:
            raise ShardingError(
                f"a worker process died ({e}). Workers are spawned, so a script that calls shard_dataset "
                "needs an `if __name__ == '__main__':` guard; or pass workers=1 to stay in one process."
            ) from None
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def shard_dataset(
    src: str,
    dest: str,
    *,
    labels_csv: str | None = None,
    options: ShardJobOptions | None = None,
    storage_options: StorageOptions | None = None,
    on_shard_written: Callable[[int, dict[str, Any]], None] | None = None,
    on_warning: Callable[[str], None] | None = None,
) -> ShardSummary:
    """Shard ``src`` (folder, RETFound tree or CSV; local or s3://) into ``dest``.

    Returns a summary; raises ShardingError when the destination cannot be written, the
    source cannot be read, or not a single image was readable.  ``on_shard_written(index,
    receipt)`` is called after each newly written shard (progress hooks, tests);
    ``on_warning`` receives catalog mismatches as soon as they are known (before sharding).
    """
    opts = options or ShardJobOptions()
    t0 = time.monotonic()
    dest_loc = storage.resolve(dest, storage_options)
    try:
        storage.check_writable(dest_loc)
    except StorageError as e:
        raise ShardingError(str(e)) from None
    listing = list_source(src, labels_csv=labels_csv, label_column=opts.label_column, options=storage_options)
    if opts.dataset is None:
        name = listing.root.path.rstrip("/").rsplit("/", 1)[-1]  # the folder (of the CSV) names the set
        opts = replace(opts, dataset=name or None)

    warnings: list[str] = []
    info = catalog.find(opts.dataset)
    if info is not None:
        opts = replace(opts, dataset=info.name)
        warnings = catalog.check_counts(info, listing.counts())
        for w in warnings:
            if on_warning:
                on_warning(w)

    items = order_items(listing.items, opts.shuffle_seed)
    plan = _plan(items, opts.target_shard_mb * 2**20, opts)
    storage.delete_file(dest_loc, dest_loc.join(MANIFEST_NAME))  # DEST is incomplete from here on

    receipts: dict[int, dict[str, Any]] = {}
    for p in plan:
        r = _load_receipt(dest_loc, p)
        if r is not None:
            receipts[p.index] = r
    reused = len(receipts)
    pending = [p for p in plan if p.index not in receipts]

    progress = Progress(len(items), "shard", unit="images", enabled=opts.progress)
    if reused:
        progress.update(sum(len(p.items) for p in plan if p.index in receipts), note=f"{reused} shards kept")

    def _on_written(receipt: dict[str, Any]) -> None:
        receipts[receipt["index"]] = receipt
        progress.note = f"{len(receipts)}/{len(plan)} shards"
        if on_shard_written:
            on_shard_written(receipt["index"], receipt)

    try:
        _run_pending(listing, dest_loc, pending, opts, progress, _on_written)
    except storage.TransientStorageError as e:
        raise ShardingError(f"{e}. Finished shards are kept; rerun the same command to resume.") from None
    finally:
        progress.close()

    rejects = [Reject(s.id, s.kind, s.reason) for s in listing.skipped]
    for p in plan:
        rejects += [Reject(**r) for r in receipts[p.index]["rejects"]]
    _write_rejects(dest_loc, rejects)
    entries = [ShardEntry(**receipts[p.index]["entry"]) for p in plan if receipts[p.index]["entry"]]
    n_rejected = sum(1 for r in rejects if r.kind == "rejected")
    n_skipped = len(rejects) - n_rejected
    _remove_stale(dest_loc, len(plan))
    if not entries:
        raise NothingReadableError(
            f"none of the {len(items) + len(listing.skipped)} files in {listing.root.uri} could be used "
            f"({n_rejected} rejected, {n_skipped} skipped); reasons in {dest_loc.uri_of(REJECTS_NAME)}"
        )
    manifest = _manifest(listing, entries, receipts, opts, n_rejected, n_skipped, src)
    storage.write_bytes(dest_loc, dest_loc.join(MANIFEST_NAME), manifest.to_json().encode())
    t = manifest.totals
    return ShardSummary(
        dest=dest_loc.uri,
        rows=t.rows,
        shards=t.shards,
        bytes=t.bytes,
        by_split=t.by_split,
        rejected=n_rejected,
        skipped=n_skipped,
        reused_shards=reused,
        written_shards=len(pending),
        elapsed_s=time.monotonic() - t0,
        warnings=warnings,
        rejects=rejects,
    )


def _manifest(
    listing: SourceListing,
    entries: list[ShardEntry],
    receipts: dict[int, dict[str, Any]],
    opts: ShardJobOptions,
    n_rejected: int,
    n_skipped: int,
    src: str,
) -> Manifest:
    by_split: Counter[str] = Counter()
    by_label: Counter[str] = Counter()
    by_split_label: dict[str, Counter[str]] = {}
    for e in entries:
        by_split.update(e.splits)
        by_label.update(e.labels)
    for r in receipts.values():
        for split, labels in r.get("split_labels", {}).items():
            by_split_label.setdefault(split, Counter()).update(labels)
    sort_split = lambda d: dict(sorted(d.items(), key=lambda kv: (SPLIT_ORDER.get(kv[0], 9), kv[0])))  # noqa: E731
    return Manifest(
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        source=storage.display_uri(src) if "://" in src else os.path.abspath(src),
        source_kind=listing.kind,
        dataset=opts.dataset,
        classes=sorted(k for k in by_label if k),
        row_order=row_order(opts),
        options={
            "target_shard_mb": opts.target_shard_mb,
            "keep_metadata": opts.keep_metadata,
            "label_column": opts.label_column,
            "metadata_stripped": sum(r.get("metadata_stripped", 0) for r in receipts.values()),
            "transcoded_to_png": sum(r.get("transcoded", 0) for r in receipts.values()),
        },
        shards=entries,
        totals=Totals(
            rows=sum(e.rows for e in entries),
            bytes=sum(e.bytes for e in entries),
            shards=len(entries),
            by_split=sort_split(by_split),
            by_label=dict(sorted(by_label.items())),
            by_split_label={k: dict(sorted(v.items())) for k, v in sort_split(by_split_label).items()},
            rejected=n_rejected,
            skipped=n_skipped,
            source_files=len(listing.items) + len(listing.skipped),
        ),
    )


def _write_rejects(dest: Location, rejects: list[Reject]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "kind", "reason"])
    for r in sorted(rejects, key=lambda r: r.id):
        w.writerow([r.id, r.kind, r.reason])
    storage.write_bytes(dest, dest.join(REJECTS_NAME), buf.getvalue().encode())


def _remove_stale(dest: Location, n_planned: int) -> None:
    """Delete shard files and receipts of an earlier, larger plan (and crash leftovers)."""
    wanted = {dest.join(shard_name(i)) for i in range(n_planned)} | {_receipt_path(dest, i) for i in range(n_planned)}
    for sub in (SHARDS_DIR, PROGRESS_DIR):
        for info in storage.list_files(dest, dest.join(sub)):
            if info.path not in wanted:
                storage.delete_file(dest, info.path)
