"""Parquet shards + ``manifest.json``: the format, and a reader that verifies what it reads.

Layout of a sharded dataset (a local folder or an ``s3://`` / ``gs://`` prefix)::

    DEST/manifest.json          schema version, shards (rows, bytes, sha256), totals, source
    DEST/rejects.csv            every source file that did not become a row, with the reason
    DEST/shards/shard-00000.parquet ...
    DEST/_progress/shard-00000.json   receipts of finished shards (resuming an interrupted run)

One row per photograph, columns `SCHEMA`: the encoded bytes exactly as stored (metadata
removed, pixels untouched), their format and size, label, split, dataset and the sha256 of the
bytes.  Training reads the shards with Ray Data (`ShardSet.shard_paths` +
`ShardSet.location.fs`); everything else can use `ShardSet.iter_rows`, which holds one shard
in memory at a time and checks it against the manifest before yielding anything from it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, ValidationError

from raydino.data import storage
from raydino.data.storage import Location, StorageOptions

SCHEMA_VERSION = 1
FORMAT_NAME = "raydino-shards"
MANIFEST_NAME = "manifest.json"
REJECTS_NAME = "rejects.csv"
SHARDS_DIR = "shards"
PROGRESS_DIR = "_progress"

SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),  # path relative to the source root
        pa.field("image", pa.binary(), nullable=False),  # encoded bytes as stored in the shard
        pa.field("format", pa.string(), nullable=False),  # "jpeg", "png", ...
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("label", pa.string()),  # class name; null for unlabelled images
        pa.field("split", pa.string(), nullable=False),  # "train", "val", "test" or "unlabelled"
        pa.field("dataset", pa.string()),
        pa.field("sha256", pa.string(), nullable=False),  # of ``image``
    ]
)

# Only in shards written with `--fov-crop` / `--max-side` (manifest `transform` set): the size as
# found, and the field of view detected (original pixels; null when not found or not looked for).
TRANSFORM_FIELDS = [
    pa.field("orig_width", pa.int32()),
    pa.field("orig_height", pa.int32()),
    pa.field("fov_cx", pa.float32()),
    pa.field("fov_cy", pa.float32()),
    pa.field("fov_r", pa.float32()),
]


class ShardError(RuntimeError):
    """A shard (or the manifest) disagrees with what was promised; the message names it."""


def shard_name(index: int) -> str:
    return f"{SHARDS_DIR}/shard-{index:05d}.parquet"


# ------------------------------------------------------------------ manifest


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow")


class ShardEntry(_Model):
    path: str  # relative to the dataset root
    rows: int
    bytes: int
    sha256: str
    splits: dict[str, int] = {}
    labels: dict[str, int] = {}


class Totals(_Model):
    rows: int
    bytes: int
    shards: int
    by_split: dict[str, int] = {}
    by_label: dict[str, int] = {}
    by_split_label: dict[str, dict[str, int]] = {}
    rejected: int = 0  # files that were opened (or looked up) and failed
    skipped: int = 0  # files never opened (not images by name, hidden, outside split folders)
    source_files: int = 0  # everything the source listed
    # Rows whose decoded pixels equal an earlier row's (exact duplicates, from hashes.parquet:
    # raydino.data.overlap); None in manifests written before raydino counted them.
    duplicates: int | None = None


class Manifest(_Model):
    format: str = FORMAT_NAME
    schema_version: int = SCHEMA_VERSION
    created: str
    source: str
    source_kind: str
    dataset: str | None = None
    classes: list[str] = []
    # {"shuffled": bool, "seed": int | None}: how rows are ordered in the shards.  None: written by a
    # raydino that stored rows in source order (class by class for a RETFound tree): reshard it.
    row_order: dict[str, Any] | None = None
    columns: list[str] = [f.name for f in SCHEMA]
    options: dict[str, Any] = {}
    # {"fov_crop", "max_side", "quality", "fov_found", "fov_not_found", "resized", "reencoded"} when
    # the images were cropped to their field of view and/or capped in size; None: stored as found.
    transform: dict[str, Any] | None = None
    shards: list[ShardEntry]
    totals: Totals
    rejects_file: str = REJECTS_NAME

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=False) + "\n"


def load_manifest(loc: Location) -> Manifest:
    """Read and validate ``manifest.json`` at ``loc``."""
    path = loc.join(MANIFEST_NAME)
    if not storage.exists(loc, path):
        raise ShardError(f"no {MANIFEST_NAME} at {loc.uri} (is this the DEST of `python -m raydino.shard`?)")
    try:
        data = json.loads(storage.read_bytes(loc, path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:  # truncated by a crash, or overwritten with binary
        raise ShardError(
            f"{loc.uri_of(MANIFEST_NAME)} is corrupt (not valid JSON: {e}); rerun the `python -m raydino.shard` "
            "command that made this dataset: finished shards are kept and the manifest is written again"
        ) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise ShardError(f"{loc.uri_of(MANIFEST_NAME)} is not a raydino shard manifest")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ShardError(
            f"{loc.uri_of(MANIFEST_NAME)}: schema_version {version!r} is not supported "
            f"(this raydino reads version {SCHEMA_VERSION}); re-shard with this version"
        )
    try:
        return Manifest.model_validate(data)
    except ValidationError as e:
        raise ShardError(f"{loc.uri_of(MANIFEST_NAME)} is malformed: {e}") from None


# ------------------------------------------------------------------ verification


def check_shard_bytes(entry: ShardEntry, data: bytes, where: str) -> pq.ParquetFile:
    """Size, checksum and row count of one shard against its manifest entry."""
    if len(data) != entry.bytes:
        raise ShardError(f"shard {where}: size {len(data)} bytes, manifest says {entry.bytes}")
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry.sha256:
        raise ShardError(f"shard {where}: sha256 {digest[:16]}… does not match the manifest's {entry.sha256[:16]}… (corrupted)")
    try:
        pf = pq.ParquetFile(pa.BufferReader(data))
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad shard
        raise ShardError(f"shard {where}: not a readable Parquet file ({e})") from None
    if pf.metadata.num_rows != entry.rows:
        raise ShardError(f"shard {where}: {pf.metadata.num_rows} rows, manifest says {entry.rows}")
    missing = {f.name for f in SCHEMA} - set(pf.schema_arrow.names)
    if missing:
        raise ShardError(f"shard {where}: missing columns {sorted(missing)}")
    return pf


class ShardSet:
    """A sharded dataset: its manifest, its shard files, verified reading."""

    def __init__(self, uri: str, options: StorageOptions | None = None):
        self.location = storage.resolve(uri, options)
        self.manifest = load_manifest(self.location)

    def __len__(self) -> int:
        return self.manifest.totals.rows

    def __repr__(self) -> str:
        t = self.manifest.totals
        return f"ShardSet({self.location.uri!r}, rows={t.rows}, shards={t.shards}, splits={t.by_split})"

    @property
    def uri(self) -> str:
        return self.location.uri

    @property
    def rows_shuffled(self) -> bool:
        """Whether the writer stored the rows in a random order (False: source order, e.g. class by class)."""
        return bool((self.manifest.row_order or {}).get("shuffled"))

    def entries(self, split: str | None = None) -> list[ShardEntry]:
        """Manifest entries of the shards holding rows of ``split`` (all shards when None)."""
        if split is not None and split not in self.manifest.totals.by_split:
            raise ShardError(f"{self.uri}: no rows with split {split!r} (splits: {sorted(self.manifest.totals.by_split)})")
        return [e for e in self.manifest.shards if split is None or e.splits.get(split, 0) > 0]

    def shard_paths(self, split: str | None = None) -> list[str]:
        """Paths on ``self.location.fs`` (for ``ray.data.read_parquet(paths, filesystem=fs)``).

        Shards written by raydino hold one split each, so these shards hold ``split`` only.
        """
        return [self.location.join(e.path) for e in self.entries(split)]

    def shard_uris(self, split: str | None = None) -> list[str]:
        return [self.location.uri_of(e.path) for e in self.entries(split)]

    def rows(self, split: str | None = None) -> int:
        return self.manifest.totals.rows if split is None else self.manifest.totals.by_split.get(split, 0)

    def read_shard(self, entry: ShardEntry, verify: bool = True) -> pq.ParquetFile:
        """One shard, in memory, checked against the manifest (size, sha256, row count)."""
        path = self.location.join(entry.path)
        where = self.location.uri_of(entry.path)
        if not storage.exists(self.location, path):
            raise ShardError(f"shard {where} listed in the manifest is missing")
        data = storage.read_bytes(self.location, path)
        if verify:
            return check_shard_bytes(entry, data, where)
        return pq.ParquetFile(pa.BufferReader(data))

    def check_sizes(self, splits: Sequence[str] | None = None) -> None:
        """Every shard of ``splits`` (None: all) present at its manifest size: one listing of the shard
        folder, no bytes read, so a run can ask it before it starts.  A missing, truncated or rewritten
        shard raises ShardError naming it (`verify` checks every byte)."""
        entries = self.manifest.shards if splits is None else [e for s in splits if self.rows(s) for e in self.entries(s)]
        found = {i.path: i.size for i in storage.list_files(self.location, self.location.join(SHARDS_DIR))}
        for entry in {e.path: e for e in entries}.values():
            size = found.get(self.location.join(entry.path))
            where = self.location.uri_of(entry.path)
            if size is None:
                raise ShardError(f"shard {where} listed in the manifest is missing")
            if size != entry.bytes:
                raise ShardError(
                    f"shard {where}: size {size} bytes, manifest says {entry.bytes} (truncated or rewritten; "
                    f"`python -m raydino.shard --verify {self.uri}` checks every shard)"
                )

    def verify(self, deep: bool = True) -> dict[str, int]:
        """Check every shard; raise ShardError naming the first bad one.

        ``deep`` also re-hashes every image against its row's sha256 (reads all bytes).
        Returns counts of what was checked.
        """
        rows = 0
        for entry in self.manifest.shards:
            pf = self.read_shard(entry, verify=True)
            if deep:
                for batch in pf.iter_batches(columns=["id", "image", "sha256"]):
                    _check_rows(batch, self.location.uri_of(entry.path))
            rows += entry.rows
        if rows != self.manifest.totals.rows:
            raise ShardError(f"{self.uri}: shards hold {rows} rows, manifest totals say {self.manifest.totals.rows}")
        return {"shards": len(self.manifest.shards), "rows": rows}

    def iter_batches(
        self,
        split: str | None = None,
        columns: list[str] | None = None,
        batch_size: int = 256,
        verify: bool = True,
    ) -> Iterator[pa.RecordBatch]:
        """Record batches, shard by shard (one shard in memory at a time)."""
        allowed = list(dict.fromkeys([f.name for f in SCHEMA] + list(self.manifest.columns)))
        cols = list(columns) if columns else allowed
        unknown = set(cols) - set(allowed)
        if unknown:
            raise ValueError(f"columns {sorted(unknown)} are not shard columns (allowed: {allowed})")
        read_cols = list(dict.fromkeys(cols + (["split"] if split else []) + (["id", "image", "sha256"] if verify else [])))
        for entry in self.entries(split):
            where = self.location.uri_of(entry.path)
            pf = self.read_shard(entry, verify=verify)
            for batch in pf.iter_batches(batch_size=batch_size, columns=read_cols):
                if verify:
                    _check_rows(batch, where)
                if split is not None:
                    batch = batch.filter(pc.equal(batch.column("split"), split))
                if batch.num_rows:
                    yield batch.select(cols)

    def iter_rows(self, split: str | None = None, columns: list[str] | None = None, verify: bool = True) -> Iterator[dict[str, Any]]:
        """Rows as dicts, shard by shard; a shard that disagrees with the manifest raises ShardError."""
        for batch in self.iter_batches(split=split, columns=columns, verify=verify):
            yield from batch.to_pylist()


def _check_rows(batch: pa.RecordBatch, where: str) -> None:
    ids = batch.column("id").to_pylist()
    images = batch.column("image")
    sums = batch.column("sha256").to_pylist()
    for i, (row_id, expected) in enumerate(zip(ids, sums)):
        if hashlib.sha256(images[i].as_py()).hexdigest() != expected:
            raise ShardError(f"shard {where}: image bytes of row {row_id!r} do not match its sha256")


def open_shards(uri: str, options: StorageOptions | None = None) -> ShardSet:
    """Open a sharded dataset (local folder, ``file://``, ``s3://`` or ``gs://``) by its manifest."""
    return ShardSet(uri, options)
