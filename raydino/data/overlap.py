"""Leakage guard: labelled images that are also in the pretraining data, and duplicates inside a dataset.

Every row of a sharded dataset gets two hashes of its *decoded* pixels (EXIF orientation applied,
as training and evaluation see them):

* ``pixel_sha256``: sha256 of the size and the RGB bytes.  Equal means the same pixels, whatever
  the container: a PNG holding a JPEG's decoded pixels matches the JPEG, which a hash of the
  stored bytes would miss.
* ``phash``: a 256-bit perceptual hash, ``imagehash.phash(hash_size=16)`` (signs of the 16x16
  lowest DCT frequencies of a 64x64 grey thumbnail).  A copy re-encoded at another JPEG quality,
  or resized, has other pixels but nearly the same pHash.  ``imagehash`` rather than a
  hand-written dHash: it is the maintained reference implementation, and costs one small package
  (PyWavelets) on top of numpy, scipy and Pillow, which raydino already needs; pHash (DCT) is
  also steadier under re-encoding than dHash.  256 bits, not the usual 64: every fundus
  photograph is a bright disc on black with an optic disc, so their 64-bit pHashes crowd
  together (two unrelated synthetic photographs 4 bits apart among 300, while a resized copy
  could be 6 bits away); at 256 bits the vessels count, and the two populations separate.

The hashes live in ``DATASET/hashes.parquet`` (``id, split, label, pixel_sha256, phash``),
stamped with a fingerprint of the manifest's shard checksums: a sidecar whose fingerprint differs
(the dataset was re-sharded) is recomputed.  The sharder writes it right after the shards (so the
manifest can count ``duplicates`` and ``--overlap`` on a fresh dataset costs nothing); datasets
sharded before it get it on the first ``--overlap`` (written into the dataset when the storage
allows, kept in memory otherwise).  Hashing streams one shard at a time through a process pool
(bounded work in flight), with a progress line.

Near-duplicate search is multi-index hashing, not a pairwise loop: the bits are split into
``len(_BAND_BITS)`` bands of 24 bits (a fixed random permutation of bit positions, so that the
bits every fundus photograph shares do not fill one band); each band of the labelled hashes is
sorted once, every pretraining hash is looked up band by band (numpy ``searchsorted``) and only
those candidates get a popcount.  Two hashes at most 9 bits apart always share a band
(pigeonhole: 10 bands); up to ``NEAR_BITS`` apart they do unless every band holds a differing bit.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image, ImageOps

from raydino.data import storage
from raydino.data.shards import ShardEntry, ShardError, check_shard_bytes, load_manifest, open_shards
from raydino.data.storage import Location, StorageError, StorageOptions
from raydino.progress import Progress

HASHES_NAME = "hashes.parquet"
HASHES_VERSION = 1  # bump when image_hashes changes: older sidecars are then recomputed
# The splits pretraining reads (raydino.data.loader.PRETRAIN_SPLITS; not imported, which would pull
# in torch and the augmentation for a hashing job; tests/test_data_overlap.py checks they agree).
PRETRAIN_SPLITS = ("train", "unlabelled")
# A near duplicate: pHashes at most 24 of 256 bits apart.  Measured on 300 raydino.synth
# photographs (256 px) and 1,050 copies of 150 of them: JPEG re-encoded at quality 75 / 50 / 30
# moved the 256-bit pHash by at most 8 / 10 / 16 bits, resized to 100-512 px by at most 10; the
# closest two *unrelated* photographs (same generator: same disc, vessels, black surround) were
# 38 bits apart (0.1 % of pairs within 50).  24 sits between the two, with room on both sides.
NEAR_BITS = 24
HASH_BITS = 256
# 10 bands of 24 bits from a fixed permutation of the 256 bit positions (16 bits left out of the
# bands, never out of the distance).  On the measurement above: every one of the 1,050 copies
# shared a band with its original; 0.05 % of unrelated pairs did (the candidates to popcount).
_BAND_BITS = np.random.default_rng(0).permutation(HASH_BITS)[: 10 * 24].reshape(10, 24)
_CHUNK = 32  # images per pool task
HASH_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("label", pa.string()),
        pa.field("pixel_sha256", pa.string()),  # null: the image could not be decoded
        pa.field("phash", pa.binary(HASH_BITS // 8)),  # the 256-bit pHash, 32 bytes (row-major DCT signs)
    ]
)


class OverlapError(RuntimeError):
    """The overlap cannot be computed (a dataset cannot be read); the message says which."""


# ------------------------------------------------------------------ hashing one image


def image_hashes(data: bytes) -> tuple[str, bytes]:
    """(sha256 of the decoded, upright RGB pixels, 256-bit pHash as 32 bytes) of encoded image bytes."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        rgb = im if im.mode == "RGB" else im.convert("RGB")  # a JPEG decodes to RGB: no copy
    ImageOps.exif_transpose(rgb, in_place=True)  # what the decoders of training and evaluation produce
    h = hashlib.sha256(f"{rgb.width}x{rgb.height}\n".encode())
    h.update(rgb.tobytes())
    # pHash: a box-filter reduce to >= 128 px first (cheap; at 128 rather than 64 px a resized copy
    # lands closer to its original), then imagehash's Lanczos to 64x64 + DCT.
    grey = rgb.convert("L")
    factor = min(grey.width, grey.height) // 128
    if factor > 1:
        grey = grey.reduce(factor)
    import imagehash  # imports scipy: only in processes that hash

    return h.hexdigest(), np.packbits(imagehash.phash(grey, hash_size=16).hash.flatten()).tobytes()


def hash_images(images: Sequence[bytes]) -> list[tuple[str | None, bytes | None]]:
    """`image_hashes` of each; (None, None) for bytes that do not decode (a pool task)."""
    out: list[tuple[str | None, bytes | None]] = []
    for data in images:
        try:
            out.append(image_hashes(data))
        except Exception:  # noqa: BLE001 - shards hold validated images; a failure is reported as unhashed
            out.append((None, None))
    return out


def _ignore_sigint() -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


# ------------------------------------------------------------------ the sidecar


def shards_fingerprint(entries: Sequence[ShardEntry]) -> str:
    """Identifies the shards the hashes were computed from (their paths and checksums)."""
    return hashlib.sha256(json.dumps([[e.path, e.sha256] for e in entries]).encode()).hexdigest()


@dataclass
class DatasetHashes:
    uri: str
    table: pa.Table  # HASH_SCHEMA
    source: str  # "stored" (read from the sidecar), "computed and stored", "computed (not stored: ...)"
    seconds: float = 0.0

    @property
    def duplicates(self) -> int:
        """Rows whose decoded pixels equal an earlier row's."""
        sums = self.table.column("pixel_sha256").drop_null()
        return len(sums) - len(pc.unique(sums))

    @property
    def unhashed(self) -> int:
        return self.table.column("pixel_sha256").null_count


def read_stored_hashes(loc: Location, entries: Sequence[ShardEntry]) -> pa.Table | None:
    """The sidecar's table when it exists and matches these shards; None otherwise."""
    path = loc.join(HASHES_NAME)
    if not storage.exists(loc, path):
        return None
    try:
        pf = pq.ParquetFile(pa.BufferReader(storage.read_bytes(loc, path)))
        meta = pf.schema_arrow.metadata or {}
        if meta.get(b"raydino.hashes_version") != str(HASHES_VERSION).encode():
            return None
        if meta.get(b"raydino.shards_fingerprint") != shards_fingerprint(entries).encode():
            return None
        table = pf.read()
    except (OSError, pa.ArrowInvalid):
        return None
    return table.select(HASH_SCHEMA.names).cast(HASH_SCHEMA)


def _shard_batches(loc: Location, entries: Sequence[ShardEntry]) -> Iterator[pa.RecordBatch]:
    """id, image, split, label in batches of _CHUNK, one verified shard in memory at a time."""
    for entry in entries:
        where = loc.uri_of(entry.path)
        path = loc.join(entry.path)
        if not storage.exists(loc, path):
            raise ShardError(f"shard {where} listed in the manifest is missing")
        pf = check_shard_bytes(entry, storage.read_bytes(loc, path), where)
        yield from pf.iter_batches(batch_size=_CHUNK, columns=["id", "image", "split", "label"])


def compute_hashes(
    loc: Location,
    entries: Sequence[ShardEntry],
    *,
    workers: int | None = None,
    progress: bool = True,
    label: str = "hash",
) -> pa.Table:
    """Hash every row of these shards (streaming: one shard and a few chunks in memory at a time).

    ``workers`` None: all cores when there are enough rows to pay for starting them (~1-2 s).
    """
    total = sum(e.rows for e in entries)
    if workers is None:  # a full decode is ~1 ms per 256 px JPEG, ~8 ms at 1024 px: a pool pays off from ~64 MB
        workers = (os.cpu_count() or 1) if sum(e.bytes for e in entries) > 64 * 2**20 else 1
    bar = Progress(total, label, unit="images", enabled=progress)
    tables: list[pa.Table] = []

    def _collect(batch: pa.RecordBatch, hashes: list[tuple[str | None, bytes | None]]) -> None:
        tables.append(
            pa.table(
                {
                    "id": batch.column("id"),
                    "split": batch.column("split"),
                    "label": batch.column("label"),
                    "pixel_sha256": pa.array([h[0] for h in hashes], pa.string()),
                    "phash": pa.array([h[1] for h in hashes], HASH_SCHEMA.field("phash").type),
                },
                schema=HASH_SCHEMA,
            )
        )
        bar.update(batch.num_rows)

    try:
        if workers <= 1:
            for batch in _shard_batches(loc, entries):
                _collect(batch, hash_images(batch.column("image").to_pylist()))
        else:
            ctx = multiprocessing.get_context("spawn")  # as the sharder: the AWS SDK's threads do not survive a fork
            in_flight: deque[tuple[pa.RecordBatch, Future]] = deque()
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_ignore_sigint) as pool:
                try:
                    for batch in _shard_batches(loc, entries):
                        fut = pool.submit(hash_images, batch.column("image").to_pylist())
                        in_flight.append((batch.drop_columns(["image"]), fut))
                        while len(in_flight) >= workers * 3:
                            b, f = in_flight.popleft()
                            _collect(b, f.result())
                    while in_flight:
                        b, f = in_flight.popleft()
                        _collect(b, f.result())
                except BaseException:
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise
    finally:
        bar.close()
    return pa.concat_tables(tables) if tables else HASH_SCHEMA.empty_table()


def write_hashes(loc: Location, entries: Sequence[ShardEntry], table: pa.Table) -> None:
    """Write the sidecar (all or nothing, `storage.write_bytes`) stamped with the shards' fingerprint."""
    meta = {"raydino.hashes_version": str(HASHES_VERSION), "raydino.shards_fingerprint": shards_fingerprint(entries)}
    sink = pa.BufferOutputStream()
    pq.write_table(table.replace_schema_metadata(meta), sink, compression="zstd")
    storage.write_bytes(loc, loc.join(HASHES_NAME), sink.getvalue().to_pybytes())


def dataset_hashes(
    loc: Location,
    entries: Sequence[ShardEntry],
    *,
    workers: int | None = None,
    progress: bool = True,
    store: bool = True,
    label: str = "hash",
) -> DatasetHashes:
    """The stored hashes when they match the shards, else computed (and stored when ``store`` and the storage allows)."""
    t0 = time.monotonic()
    table = read_stored_hashes(loc, entries)
    if table is not None:
        return DatasetHashes(loc.uri, table, "stored", time.monotonic() - t0)
    table = compute_hashes(loc, entries, workers=workers, progress=progress, label=label)
    source = "computed"
    if store:
        try:
            write_hashes(loc, entries, table)
            source = f"computed, stored in {loc.uri_of(HASHES_NAME)}"
        except (OSError, StorageError) as e:  # a read-only bucket: the overlap is still right, only not cached
            source = f"computed, not stored ({storage.redact(str(e)).splitlines()[0]})"
    return DatasetHashes(loc.uri, table, source, time.monotonic() - t0)


# ------------------------------------------------------------------ matching


def _popcount(x: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(x)
    return np.unpackbits(x.view(np.uint8).reshape(*x.shape, 8), axis=-1).sum(axis=-1)


def _words(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A column of 32-byte pHashes (no nulls) -> uint64 array [n, 4]."""
    raw = b"".join(column.to_pylist())
    return np.frombuffer(raw, np.uint64).reshape(-1, HASH_BITS // 64) if raw else np.zeros((0, HASH_BITS // 64), np.uint64)


def _band_keys(words: np.ndarray) -> np.ndarray:
    """uint64 [n, 4] hashes -> their band keys, int64 [n, bands] (24 bits each)."""
    bits = np.unpackbits(words.view(np.uint8).reshape(len(words), -1), axis=1)
    band = bits[:, _BAND_BITS]  # [n, bands, 24]
    packed = np.packbits(band, axis=2).astype(np.int64)  # [n, bands, 3]
    return (packed[:, :, 0] << 16) | (packed[:, :, 1] << 8) | packed[:, :, 2]


class NearIndex:
    """Multi-index hashing over 256-bit hashes: `query` finds the indexed hashes within NEAR_BITS."""

    def __init__(self, words: np.ndarray) -> None:
        self.words = words
        keys = _band_keys(words)
        self.bands = []
        for b in range(keys.shape[1]):
            order = np.argsort(keys[:, b], kind="stable")
            self.bands.append((keys[order, b], order))

    def query(self, words: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(query index, indexed index, distance) of every pair within NEAR_BITS found (each pair once)."""
        keys = _band_keys(words)
        qi_all, ii_all = [], []
        for b, (sorted_keys, order) in enumerate(self.bands):
            lo = np.searchsorted(sorted_keys, keys[:, b], "left")
            cnt = np.searchsorted(sorted_keys, keys[:, b], "right") - lo
            hit = np.nonzero(cnt)[0]
            if not len(hit):
                continue
            reps = cnt[hit]
            qi = np.repeat(hit, reps)
            offset = np.arange(len(qi)) - np.repeat(np.cumsum(reps) - reps, reps)
            ii = order[np.repeat(lo[hit], reps) + offset]
            close = _popcount(words[qi] ^ self.words[ii]).sum(axis=1) <= NEAR_BITS
            qi_all.append(qi[close])
            ii_all.append(ii[close])
        if not qi_all:
            empty = np.zeros(0, np.int64)
            return empty, empty, empty
        pairs = np.unique(np.stack([np.concatenate(qi_all), np.concatenate(ii_all)], axis=1), axis=0)
        dist = _popcount(words[pairs[:, 0]] ^ self.words[pairs[:, 1]]).sum(axis=1).astype(np.int64)
        return pairs[:, 0], pairs[:, 1], dist


@dataclass
class OverlapReport:
    pretrain_uri: str
    labelled_uri: str
    pretrain_splits: tuple[str, ...]
    pretrain_rows: int
    labelled_rows: int
    # per split: {"images", "exact", "near", "overlap"}
    by_split: dict[str, dict[str, int]]
    # per split: labelled id -> {"kind": "exact"|"near", "bits": int, "pretrain_ids": [...]} (a few)
    matches: dict[str, dict[str, dict[str, Any]]]
    hashes: dict[str, str] = field(default_factory=dict)  # where each side's hashes came from
    seconds: float = 0.0

    @property
    def overlapping(self) -> int:
        return sum(s["overlap"] for s in self.by_split.values())

    def last_line(self) -> str:
        return f"{self.overlapping} of {self.labelled_rows} labelled images overlap the pretraining data"

    def split_summary(self) -> str:
        """``val 2 (1 exact, 1 near), test 0`` for the splits that have rows."""
        return ", ".join(
            f"{s} {c['overlap']}" + (f" ({c['exact']} exact, {c['near']} near)" if c["overlap"] else "") for s, c in self.by_split.items()
        )

    def text(self) -> str:
        lines = [
            f"pretraining: {self.pretrain_uri} ({'+'.join(self.pretrain_splits)}: {self.pretrain_rows} images; "
            f"hashes {self.hashes.get('pretrain', '?')})",
            f"labelled:    {self.labelled_uri} ({self.labelled_rows} images; hashes {self.hashes.get('labelled', '?')})",
            f"  {'split':10s} {'images':>8s} {'exact':>7s} {'near':>7s} {'overlap':>8s}",
        ]
        for s, c in self.by_split.items():
            lines.append(f"  {s:10s} {c['images']:8d} {c['exact']:7d} {c['near']:7d} {c['overlap']:8d}")
        lines.append(f"  exact: same decoded pixels (sha256); near: pHash within {NEAR_BITS} of {HASH_BITS} bits (re-encoded, resized)")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "pretraining": {"uri": self.pretrain_uri, "splits": list(self.pretrain_splits), "images": self.pretrain_rows},
            "labelled": {"uri": self.labelled_uri, "images": self.labelled_rows},
            "near_bits": NEAR_BITS,
            "hash_bits": HASH_BITS,
            "overlapping": self.overlapping,
            "by_split": self.by_split,
            "overlaps": {
                s: {kind: {i: m for i, m in sorted(ms.items()) if m["kind"] == kind} for kind in ("exact", "near")} for s, ms in self.matches.items()
            },
            "hashes": self.hashes,
            "seconds": round(self.seconds, 2),
        }


_EXAMPLES = 3  # pretraining ids kept per overlapping labelled image


def match_hashes(pretrain: Iterator[pa.Table] | pa.Table, labelled: pa.Table) -> tuple[dict[int, dict[str, Any]], int]:
    """Labelled row index -> {"kind", "bits", "pretrain_ids"} for every labelled row found in `pretrain`
    (streamed in tables: memory is the labelled index plus one pretraining batch); also the pretraining rows seen."""
    lab_sha = labelled.column("pixel_sha256")
    valid = np.asarray(pc.is_valid(labelled.column("phash")).to_numpy(zero_copy_only=False))
    lab_rows = np.nonzero(valid)[0]
    index = NearIndex(_words(labelled.column("phash").take(pa.array(lab_rows)))) if len(lab_rows) else None
    by_sha: dict[str, list[int]] = {}
    for i, s in enumerate(lab_sha.to_pylist()):
        if s is not None:
            by_sha.setdefault(s, []).append(i)
    sha_set = pa.array(list(by_sha), pa.string())
    found: dict[int, dict[str, Any]] = {}
    seen = 0

    def _add(li: int, kind: str, bits: int, pid: str) -> None:
        m = found.get(li)
        if m is None or (m["kind"] == "near" and (kind == "exact" or bits < m["bits"])):
            examples = m["pretrain_ids"] if m is not None and m["kind"] == kind else []
            m = found[li] = {"kind": kind, "bits": bits, "pretrain_ids": examples}
        if m["kind"] == kind and m["bits"] == bits and len(m["pretrain_ids"]) < _EXAMPLES and pid not in m["pretrain_ids"]:
            m["pretrain_ids"].append(pid)

    for table in [pretrain] if isinstance(pretrain, pa.Table) else pretrain:
        seen += table.num_rows
        ids = table.column("id")
        exact_rows = np.nonzero(pc.fill_null(pc.is_in(table.column("pixel_sha256"), value_set=sha_set), False).to_numpy(zero_copy_only=False))[0]
        sums = table.column("pixel_sha256")
        for r in exact_rows:
            for li in by_sha[sums[int(r)].as_py()]:
                _add(li, "exact", 0, ids[int(r)].as_py())
        if index is None:
            continue
        ph = table.column("phash")
        ok = np.nonzero(pc.is_valid(ph).to_numpy(zero_copy_only=False))[0]
        if not len(ok):
            continue
        qi, ii, dist = index.query(_words(ph.take(pa.array(ok))))
        for q, i, d in zip(qi.tolist(), ii.tolist(), dist.tolist()):
            li = int(lab_rows[i])
            if li in found and found[li]["kind"] == "exact":
                continue
            _add(li, "near", int(d), ids[int(ok[q])].as_py())
    return found, seen


def _pretrain_tables(table: pa.Table, splits: Sequence[str], rows: int = 65536) -> Iterator[pa.Table]:
    mask = pc.is_in(table.column("split"), value_set=pa.array(list(splits), pa.string()))
    kept = table.filter(mask)
    for start in range(0, kept.num_rows, rows):
        yield kept.slice(start, rows)


def _split_order(split: str) -> tuple[int, str]:
    return ({"train": 0, "val": 1, "test": 2, "unlabelled": 3}.get(split, 9), split)


def overlap(
    pretrain_uri: str,
    labelled_uri: str,
    *,
    options: StorageOptions | None = None,
    workers: int | None = None,
    progress: bool = True,
    store: bool = True,
    pretrain_splits: Sequence[str] = PRETRAIN_SPLITS,
) -> OverlapReport:
    """How many labelled images (per split) are in the pretraining splits of ``pretrain_uri``, exactly or nearly.

    Raises ShardError / StorageError when a dataset cannot be opened or read.
    """
    t0 = time.monotonic()
    pre = open_shards(pretrain_uri, options)
    lab = open_shards(labelled_uri, options)
    lab_hashes = dataset_hashes(lab.location, lab.manifest.shards, workers=workers, progress=progress, store=store, label="hash labelled")
    same = pre.location.uri == lab.location.uri
    pre_hashes = lab_hashes if same else dataset_hashes(
        pre.location, pre.manifest.shards, workers=workers, progress=progress, store=store, label="hash pretraining"
    )  # fmt: skip
    found, seen = match_hashes(_pretrain_tables(pre_hashes.table, pretrain_splits), lab_hashes.table)
    return _report(
        pre.uri,
        lab.uri,
        tuple(pretrain_splits),
        seen,
        lab_hashes.table,
        found,
        {"pretrain": pre_hashes.source, "labelled": lab_hashes.source},
        time.monotonic() - t0,
    )


def _report(
    pre_uri: str,
    lab_uri: str,
    splits: tuple[str, ...],
    seen: int,
    lab: pa.Table,
    found: dict[int, dict[str, Any]],
    sources: dict[str, str],
    seconds: float,
) -> OverlapReport:
    lab_ids = lab.column("id").to_pylist()
    lab_splits = lab.column("split").to_pylist()
    by_split: dict[str, dict[str, int]] = {}
    for s in sorted(set(lab_splits), key=_split_order):
        by_split[s] = {"images": lab_splits.count(s), "exact": 0, "near": 0, "overlap": 0}
    matches: dict[str, dict[str, dict[str, Any]]] = {s: {} for s in by_split}
    for li, m in found.items():
        s = lab_splits[li]
        by_split[s][m["kind"]] += 1
        by_split[s]["overlap"] += 1
        matches[s][lab_ids[li]] = m
    return OverlapReport(pre_uri, lab_uri, splits, seen, lab.num_rows, by_split, matches, sources, seconds)


# ------------------------------------------------------------------ the warning of evaluate / tune


def overlap_warning(pretrain_uri: str | None, labelled_uri: str | None, options: StorageOptions | None = None) -> str | None:
    """A one-line warning for `raydino.evaluate` / `raydino.tune`, from *stored* hashes only (cheap).

    ``warning: N of M labelled images overlap the pretraining data (train 0, val 2 (2 exact, 0 near), test 0; ...)``
    when some do; a line saying how to check when the pretraining hashes are not stored; None when
    there is nothing to say: no overlap, the pretraining data not a sharded dataset or not reachable,
    the labelled data neither a dataset nor a local RETFound folder (whose images are hashed here),
    or the labelled set *is* the pretraining set and only its train split overlaps (the
    synthetic default: pretraining reads train, the probe measures on val and test).
    """
    if not pretrain_uri or not labelled_uri:
        return None
    try:
        pre = storage.resolve(pretrain_uri, options)
        pre_manifest = load_manifest(pre)
        lab = storage.resolve(labelled_uri, options)
    except (ShardError, StorageError, OSError, ValueError):
        return None  # the pretraining data is not a raydino dataset, or unreachable from here
    try:
        lab_table = read_stored_hashes(lab, load_manifest(lab).shards)
    except (ShardError, StorageError, OSError, ValueError):
        lab_table = _tree_hashes(lab)  # a RETFound folder (the usual downstream set): hashed here
        if lab_table is None:
            return None
    pre_table = lab_table if pre.uri == lab.uri else read_stored_hashes(pre, pre_manifest.shards)
    if lab_table is None or pre_table is None:
        return (
            f"warning: overlap of the labelled data with the pretraining data not checked (no stored hashes); "
            f"run `python -m raydino.shard --overlap {storage.display_uri(pretrain_uri)} {storage.display_uri(labelled_uri)}`"
        )
    found, seen = match_hashes(_pretrain_tables(pre_table, PRETRAIN_SPLITS), lab_table)
    report = _report(pre.uri, lab.uri, PRETRAIN_SPLITS, seen, lab_table, found, {}, 0.0)
    if not report.overlapping or (pre.uri == lab.uri and report.overlapping == report.by_split.get("train", {}).get("overlap", 0)):
        return None
    return f"warning: {report.last_line()} ({report.split_summary()}; `python -m raydino.shard --overlap` lists them)"


def _tree_hashes(loc: Location) -> pa.Table | None:
    """Hashes of a local RETFound tree's images (a downstream set: thousands of images, ~1-8 ms each,
    so hashing them here is affordable), or None when `loc` is not one."""
    from raydino.data.labelled import DataError, load_retfound_tree  # local: the sharder needs none of it

    if loc.scheme != "file" or not os.path.isdir(os.path.join(loc.path, "train")):
        return None
    try:
        data = load_retfound_tree(loc.path, None)
    except (DataError, OSError):
        return None
    rows: dict[str, list[Any]] = {name: [] for name in HASH_SCHEMA.names}
    for split in data.splits.values():
        images = []
        for item in split.items:
            with open(item, "rb") as f:
                images.append(f.read())
        for rid, label, (sha, phash) in zip(split.ids, split.labels.tolist(), hash_images(images)):
            for name, value in zip(HASH_SCHEMA.names, (rid, split.name, data.classes[label], sha, phash)):
                rows[name].append(value)
    return pa.table(rows, schema=HASH_SCHEMA)


def run_overlap_warning(run_config: Any, labelled_uri: str | None, options: StorageOptions | None = None) -> str | None:
    """`overlap_warning` for a run's config (a `raydino.config.Config` or the dict a checkpoint saved):
    its ``data.uri`` (None: the synthetic default, not checked) against ``labelled_uri``.  `options`
    are the calling command's (its `--s3-endpoint` etc.): where they set an endpoint or region, it wins
    over the one the run was trained with (`overlap_storage_options`)."""
    cfg = run_config.model_dump() if hasattr(run_config, "model_dump") else dict(run_config or {})
    data = cfg.get("data") or {}
    return overlap_warning(data.get("uri"), labelled_uri, overlap_storage_options(data, options))


def overlap_storage_options(run_data: dict[str, Any], options: StorageOptions | None) -> StorageOptions:
    """The run's `data` section's storage settings, overridden by those `options` sets: a run trained
    against one endpoint may be evaluated from a machine that reaches the same bucket by another."""
    run = StorageOptions.from_config(run_data)
    if options is None:
        return run
    return replace(
        options,
        endpoint=options.endpoint or run.endpoint,
        region=options.region or run.region,
        gcs_endpoint=options.gcs_endpoint or run.gcs_endpoint,
    )
