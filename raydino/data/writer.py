"""Write a source of photographs as verified Parquet shards plus a manifest, resumably.

The pipeline, and why it is shaped this way (planning and receipts in `raydino.data.shardplan`,
reading, preparing and writing in `raydino.data.shardwork`):

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

import multiprocessing
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

from raydino.data import catalog, storage
from raydino.data.fov import DEFAULT_QUALITY, ImageTransform, check_transform
from raydino.data.imagebytes import PreparedImage
from raydino.data.overlap import HASHES_NAME, dataset_hashes
from raydino.data.shardplan import PlannedShard, Reject, load_receipt, order_items, plan_shards, remove_stale, row_order, write_rejects
from raydino.data.shards import MANIFEST_NAME, REJECTS_NAME, SCHEMA, TRANSFORM_FIELDS, Manifest, ShardEntry, Totals, shard_name
from raydino.data.shardwork import ignore_sigint, process_chunk, write_shard
from raydino.data.sources import SPLIT_ORDER, SourceItem, SourceListing, list_source
from raydino.data.storage import Location, StorageError, StorageOptions
from raydino.progress import Progress

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
    # Pixels (`raydino.data.fov`): crop each image to its circular field of view, cap the longer side
    # at max_side px, re-encode changed JPEGs at quality.  Off by default (bytes kept as found);
    # part of the fingerprint when on, like shuffle_seed.
    fov_crop: bool = False
    max_side: int | None = None
    quality: int = DEFAULT_QUALITY

    def transform(self) -> ImageTransform | None:
        t = ImageTransform(self.fov_crop, self.max_side, self.quality)
        return t if t.active else None

    def __post_init__(self) -> None:
        if not (self.target_shard_mb > 0):
            raise ValueError(f"target_shard_mb={self.target_shard_mb}: must be > 0 (megabytes per shard)")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers={self.workers}: must be >= 1 (or None for all cores)")
        if self.shuffle_seed is not None and (isinstance(self.shuffle_seed, bool) or not isinstance(self.shuffle_seed, int)):
            raise ValueError(f"shuffle_seed={self.shuffle_seed!r}: must be an integer (or None to keep the source order)")
        check_transform(self.max_side, self.quality)
        if self.keep_metadata and self.transform() is not None:
            raise ValueError("keep_metadata stores files exactly as found; it cannot be combined with fov_crop or max_side, which re-encode")


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
    duplicates: int | None = None  # rows repeating another row's decoded pixels
    transform: dict[str, Any] | None = None  # the manifest's: settings and counts of the fov crop / size cap

    def text(self) -> str:
        splits = ", ".join(f"{k} {v}" for k, v in self.by_split.items())
        lines = [
            f"{self.rows} images in {self.shards} shards ({self.bytes / 2**20:.1f} MiB) at {self.dest} [{splits}]",
            f"  {self.written_shards} shards written, {self.reused_shards} kept from an earlier run, {self.elapsed_s:.1f} s",
        ]
        if self.duplicates:
            lines.append(
                f"  {self.duplicates} rows repeat the decoded pixels of another row (exact duplicates; see {self.dest.rstrip('/')}/{HASHES_NAME})"
            )
        if self.transform:
            t = self.transform
            parts = []
            if t.get("fov_crop"):
                parts.append(f"{t['fov_found']} cropped to their field of view, {t['fov_not_found']} with no disc found (kept uncropped)")
            if t.get("max_side"):
                parts.append(f"{t['resized']} downscaled to at most {t['max_side']} px")
            lines.append(f"  {'; '.join(parts)}; {t['reencoded']} re-encoded (JPEG quality {t['quality']}, PNG for lossless sources)")
        if self.rejected or self.skipped:
            lines.append(f"  {self.rejected} files rejected, {self.skipped} skipped; reasons in {self.dest.rstrip('/')}/{REJECTS_NAME}")
            for reason, n in Counter(r.reason for r in self.rejects).most_common(5):
                lines.append(f"    {n} x {reason}")
        return "\n".join(lines)


# ------------------------------------------------------------------ the job


def _chunks(pending: list[PlannedShard]) -> Iterable[tuple[int, list[SourceItem]]]:
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


def _default_workers(listing: SourceListing, pending: list[PlannedShard]) -> int:
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
    pending: list[PlannedShard],
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
    transform = opts.transform()

    def _finish_chunk(index: int, results: list[PreparedImage | str]) -> None:
        collected[index].extend(results)
        plan = by_index[index]
        if len(collected[index]) == len(plan.items):
            try:
                receipt = write_shard(dest, plan, collected.pop(index), opts.dataset)
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
            _finish_chunk(index, process_chunk(root_uri, src_opts, [c.path for c in chunk], opts.keep_metadata, transform))
        return
    ctx = multiprocessing.get_context("spawn")
    in_flight: deque[tuple[int, Future]] = deque()
    window = workers * 3
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=ignore_sigint) as pool:
        try:
            for index, chunk in chunks:
                in_flight.append((index, pool.submit(process_chunk, root_uri, src_opts, [c.path for c in chunk], opts.keep_metadata, transform)))
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
    """Shard ``src`` (folder, RETFound tree or CSV; local, s3:// or gs://) into ``dest``.

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
    src_dir, dest_dir = listing.root.path.rstrip("/"), dest_loc.path.rstrip("/")
    if listing.kind != "csv" and listing.root.scheme == dest_loc.scheme and (dest_dir + "/").startswith(src_dir + "/"):
        # a folder source is listed recursively: the next run over it would list these shards as images
        raise ShardingError(f"DEST {dest} is SRC {src} or inside it: write the shards to a folder outside the photographs")
    if opts.dataset is None:
        name = listing.root.path.rstrip("/").rsplit("/", 1)[-1]  # the folder (of the CSV) names the set
        opts = replace(opts, dataset=name or None)

    warnings: list[str] = list(listing.warnings)
    info = catalog.find(opts.dataset)
    if info is not None:
        opts = replace(opts, dataset=info.name)
        warnings += catalog.check_counts(info, listing.counts())
    for w in warnings:
        if on_warning:
            on_warning(w)

    items = order_items(listing.items, opts.shuffle_seed)
    transform = opts.transform()
    plan = plan_shards(
        items, opts.target_shard_mb * 2**20, keep_metadata=opts.keep_metadata, dataset=opts.dataset, shuffle_seed=opts.shuffle_seed,
        transform=transform.settings() if transform else None,
    )  # fmt: skip
    storage.delete_file(dest_loc, dest_loc.join(MANIFEST_NAME))  # DEST is incomplete from here on

    receipts: dict[int, dict[str, Any]] = {}
    for p in plan:
        r = load_receipt(dest_loc, p)
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
    write_rejects(dest_loc, rejects)
    entries = [ShardEntry(**receipts[p.index]["entry"]) for p in plan if receipts[p.index]["entry"]]
    n_rejected = sum(1 for r in rejects if r.kind == "rejected")
    n_skipped = len(rejects) - n_rejected
    remove_stale(dest_loc, len(plan))
    if not entries:
        raise NothingReadableError(
            f"none of the {len(items) + len(listing.skipped)} files in {listing.root.uri} could be used "
            f"({n_rejected} rejected, {n_skipped} skipped); reasons in {dest_loc.uri_of(REJECTS_NAME)}"
        )
    manifest = _manifest(listing, entries, receipts, opts, n_rejected, n_skipped, src)
    # Hashes of the decoded pixels (hashes.parquet, reused when the shards did not change): the
    # manifest's duplicate count, and what `--overlap` compares.  Costs a full decode per image.
    manifest.totals.duplicates = dataset_hashes(dest_loc, entries, workers=opts.workers, progress=opts.progress).duplicates
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
        duplicates=manifest.totals.duplicates,
        transform=manifest.transform,
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
    transform = opts.transform()
    counts: Counter[str] = Counter()
    for r in receipts.values():
        counts.update(r.get("transform", {}))
    keys = ("fov_found", "fov_not_found", "resized", "reencoded")
    extra = {"transform": {**transform.settings(), **{k: counts[k] for k in keys}}} if transform else {}
    sort_split = lambda d: dict(sorted(d.items(), key=lambda kv: (SPLIT_ORDER.get(kv[0], 9), kv[0])))  # noqa: E731
    return Manifest(
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        source=storage.display_uri(src) if "://" in src else os.path.abspath(src),
        source_kind=listing.kind,
        dataset=opts.dataset,
        classes=sorted(k for k in by_label if k),
        row_order=row_order(opts.shuffle_seed),
        options={
            "target_shard_mb": opts.target_shard_mb,
            "keep_metadata": opts.keep_metadata,
            "label_column": opts.label_column,
            "metadata_stripped": sum(r.get("metadata_stripped", 0) for r in receipts.values()),
            "transcoded_to_png": sum(r.get("transcoded", 0) for r in receipts.values()),
        },
        columns=[f.name for f in SCHEMA] + ([f.name for f in TRANSFORM_FIELDS] if transform else []),
        shards=entries,
        **extra,
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
