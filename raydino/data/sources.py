"""What to shard: list a source of photographs with labels and splits.

A source is one of

* a folder (searched recursively), local, ``s3://`` or ``gs://``: every file is a candidate, unlabelled,
  split ``train`` unless a labels CSV says otherwise;
* a RETFound-layout tree ``ROOT/{train,val,test}/<class>/<image>``: split and class come from
  the path (detected when the folder's top level holds split folders);
* a CSV file ``path,label[,split]`` (header optional; paths relative to the CSV's folder).

Files that are clearly not photographs (hidden files, ``.csv``/``.json``/``.txt``... beside the
images, files outside the split folders of a RETFound tree) are not silently ignored: they
are returned as `Skipped` entries and end up in the rejects file with their reason.
"""

from __future__ import annotations

import csv
import io
import os
import posixpath
import stat
from dataclasses import dataclass, field

import pyarrow.fs as pafs

from raydino.data import storage
from raydino.data.storage import Location, StorageOptions

# "unlabelled": images only for pretraining (never probed); raydino.data.loader reads it with train.
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "test": "test", "testing": "test", "unlabelled": "unlabelled", "unlabeled": "unlabelled"}  # fmt: skip
SPLIT_ORDER = {"train": 0, "val": 1, "test": 2, "unlabelled": 3}
# Extensions that are certainly not photographs: skipped (and listed) without being opened.
NON_IMAGE_EXTENSIONS = {".csv", ".tsv", ".json", ".jsonl", ".txt", ".md", ".yaml", ".yml", ".xml", ".xls",
                        ".xlsx", ".pdf", ".zip", ".tar", ".gz", ".py", ".ini", ".db", ".parquet"}  # fmt: skip


class SourceError(ValueError):
    """The source cannot be listed at all (missing, empty, malformed CSV)."""


@dataclass(frozen=True)
class SourceItem:
    id: str  # POSIX path relative to the source root: stable across runs, the row id
    path: str  # path on the source filesystem
    label: str | None
    split: str
    size: int
    mtime_ns: int | None


@dataclass(frozen=True)
class Skipped:
    id: str
    reason: str
    kind: str = "skipped"  # "skipped": never opened; "rejected": opened (or looked up) and failed


@dataclass
class SourceListing:
    kind: str  # "folder", "retfound" or "csv"
    root: Location
    items: list[SourceItem] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # what the listing could not tell, said before sharding

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per split and label (label None shown as "")."""
        out: dict[str, dict[str, int]] = {}
        for it in self.items:
            per = out.setdefault(it.split, {})
            per[it.label or ""] = per.get(it.label or "", 0) + 1
        return out


def normalise_split(value: str, where: str) -> str:
    v = value.strip().lower()
    if v in SPLIT_ALIASES:
        return SPLIT_ALIASES[v]
    raise SourceError(f"{where}: split {value!r} is not one of train, val, test, unlabelled (or training/valid/validation/testing)")


def list_source(
    src: str,
    *,
    labels_csv: str | None = None,
    label_column: str = "label",
    options: StorageOptions | None = None,
) -> SourceListing:
    """List ``src`` (folder, RETFound tree or CSV) into items and skipped files."""
    loc = storage.resolve(src, options)
    info = storage.file_info(loc, loc.path)
    if info.type == pafs.FileType.NotFound:
        raise SourceError(f"source {loc.uri} does not exist")
    if info.type == pafs.FileType.File:
        if not loc.path.lower().endswith((".csv", ".txt")):
            raise SourceError(f"source {loc.uri} is a single file; expected a folder, a RETFound-layout tree or a .csv list")
        if labels_csv:
            raise SourceError(f"source {loc.uri} is a file (a CSV list); --labels only applies to a folder source")
        return _list_csv(loc, label_column)
    files, problems = _list_local(loc.path) if loc.scheme == "file" else _list_remote(loc)
    if not files and not problems:
        raise SourceError(f"source {loc.uri} is an empty folder")
    listing = _list_folder(loc, files)
    listing.skipped += problems
    if labels_csv:
        _apply_labels(listing, labels_csv, label_column, options)
    return listing


def _rel(loc: Location, path: str) -> str:
    return posixpath.relpath(path, loc.path) if loc.scheme == "file" else path[len(loc.path) :].lstrip("/")


def _skip_reason(rel: str) -> str | None:
    name = posixpath.basename(rel)
    if any(part.startswith(".") for part in rel.split("/")):
        return "hidden file"
    ext = posixpath.splitext(name)[1].lower()
    if ext in NON_IMAGE_EXTENSIONS:
        return f"not an image ({ext} file)"
    return None


_File = tuple[str, int, "int | None"]  # (path on the filesystem, size, mtime_ns)


def _list_remote(loc: Location) -> tuple[list[_File], list[Skipped]]:
    return [(f.path, int(f.size or 0), f.mtime_ns) for f in storage.list_files(loc)], []


def _list_local(root: str) -> tuple[list[_File], list[Skipped]]:
    """Walk a local tree.  Unlike pyarrow's listing, this sees broken links and special files,
    which must be reported rather than silently left out."""
    files: list[_File] = []
    problems: list[Skipped] = []

    def unreadable_folder(e: OSError) -> None:  # os.walk's default is to skip such a folder silently
        rel = os.path.relpath(e.filename or root, root).replace(os.sep, "/")
        problems.append(Skipped(rel + "/", f"unreadable folder: {e.strerror or type(e).__name__}; its images were not listed", kind="rejected"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable_folder):
        dirnames.sort()
        for name in [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            # Not followed (a link can loop, or list the same images twice), but never left out unsaid.
            rel = os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/")
            problems.append(Skipped(rel + "/", "symbolic link to a folder: not followed; point SRC at the real folder or copy it in"))
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            try:
                st = os.stat(path)
            except OSError as e:
                why = "broken symbolic link" if os.path.islink(path) else e.strerror or type(e).__name__
                problems.append(Skipped(rel, f"unreadable: {why}", kind="rejected"))
                continue
            if not stat.S_ISREG(st.st_mode):
                problems.append(Skipped(rel, "unreadable: not a regular file", kind="rejected"))
                continue
            files.append((path, st.st_size, st.st_mtime_ns))
    return files, problems


def _list_folder(loc: Location, files: list[_File]) -> SourceListing:
    rels = [(_rel(loc, f[0]), f) for f in files]
    top_dirs = {r.split("/", 1)[0] for r, _ in rels if "/" in r}
    split_dirs = {d for d in top_dirs if d.lower() in SPLIT_ALIASES}
    retfound = bool(split_dirs)
    listing = SourceListing(kind="retfound" if retfound else "folder", root=loc)
    for rel, f in rels:
        reason = _skip_reason(rel)
        if reason:
            listing.skipped.append(Skipped(rel, reason))
            continue
        label: str | None = None
        split = "train"
        if retfound:
            parts = rel.split("/")
            if parts[0] not in split_dirs or len(parts) < 2:
                listing.skipped.append(Skipped(rel, "outside the train/val/test folders of a RETFound-layout tree"))
                continue
            split = SPLIT_ALIASES[parts[0].lower()]
            label = parts[1] if len(parts) >= 3 else None
        listing.items.append(SourceItem(rel, f[0], label, split, f[1], f[2]))
    return listing


def _read_csv_rows(loc: Location, path: str, where: str) -> list[list[str]]:
    data = storage.read_bytes(loc, path)
    try:
        text = data.decode("utf-8-sig")  # strict: a replaced character would silently miss its image
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise SourceError(
            f"{where} is not UTF-8 (byte 0x{data[e.start]:02x} on line {line}); save it as UTF-8, e.g. "
            "`iconv -f cp1252 -t utf-8 in.csv > out.csv` or Excel's 'CSV UTF-8' (Windows exports are often cp1252)"
        ) from None
    return [row for row in csv.reader(io.StringIO(text)) if row and any(c.strip() for c in row)]


def _refuse_duplicates(paths: list[tuple[int, str]], where: str) -> None:
    """Each image once: two rows for one path would give it two labels (or splits), one silently lost."""
    rows_of: dict[str, list[int]] = {}
    for lineno, rel in paths:
        rows_of.setdefault(rel, []).append(lineno)
    dups = [(rel, lines) for rel, lines in rows_of.items() if len(lines) > 1]
    if dups:
        shown = "; ".join(f"{rel} (rows {', '.join(map(str, lines))})" for rel, lines in dups[:10])
        more = f"; and {len(dups) - 10} more" if len(dups) > 10 else ""
        raise SourceError(f"{where}: {len(dups)} path(s) listed more than once: {shown}{more}. List each image once")


def _clean_rel(raw: str) -> str:
    """A CSV path in POSIX form without ``./`` or doubled slashes (absolute paths stay absolute)."""
    return posixpath.normpath(raw.strip().replace("\\", "/"))


def _csv_columns(rows: list[list[str]], label_column: str, where: str) -> tuple[list[tuple[int, list[str]]], int, int | None, int | None]:
    """(numbered data rows, path index, label index, split index) for a header-optional CSV."""
    if not rows:
        raise SourceError(f"{where} has no rows")
    header = [c.strip().lower() for c in rows[0]]
    if "path" in header:
        idx_label = header.index(label_column.lower()) if label_column.lower() in header else None
        if idx_label is None and label_column != "label":
            raise SourceError(f"{where}: no column {label_column!r} (columns: {', '.join(rows[0])})")
        idx_split = header.index("split") if "split" in header else None
        return list(enumerate(rows[1:], start=2)), header.index("path"), idx_label, idx_split
    width = len(rows[0])
    if width < 2:
        raise SourceError(f"{where}: expected columns path,label[,split] (a header row naming 'path' is optional)")
    return list(enumerate(rows, start=1)), 0, 1, 2 if width >= 3 else None


def _list_csv(csv_loc: Location, label_column: str) -> SourceListing:
    where = f"CSV {csv_loc.uri}"
    raw_rows = _read_csv_rows(csv_loc, csv_loc.path, where)
    rows, ip, il, isp = _csv_columns(raw_rows, label_column, where)
    root = storage.Location(csv_loc.fs, posixpath.dirname(csv_loc.path), csv_loc.scheme, csv_loc.options)
    listing = SourceListing(kind="csv", root=root)
    other = [c for c in raw_rows[0] if c.strip().lower() not in ("path", "split")]
    if il is None and other:
        # A paths-only CSV is a pretraining list; one with other columns may hold labels under another name.
        listing.warnings.append(
            f"{where} has no {label_column!r} column (columns: {', '.join(raw_rows[0])}): its images are stored "
            "unlabelled; name the label column with --label-column"
        )
    entries: list[tuple[str, str, str | None, str]] = []
    numbered: list[tuple[int, str]] = []
    for lineno, row in rows:
        raw = row[ip].strip() if ip < len(row) else ""
        if not raw:
            raise SourceError(f"{where}, row {lineno}: empty path")
        rel = _clean_rel(raw)
        path = rel if rel.startswith("/") else root.join(rel)
        label = row[il].strip() if il is not None and il < len(row) and row[il].strip() else None
        split = normalise_split(row[isp], f"{where}, row {lineno}") if isp is not None and isp < len(row) and row[isp].strip() else "train"
        numbered.append((lineno, rel))
        entries.append((rel, path, label, split))
    _refuse_duplicates(numbered, where)
    infos = storage.with_retries(
        lambda: csv_loc.fs.get_file_info([p for _, p, _, _ in entries]), what=f"looking up files of {where}", options=csv_loc.options
    )
    for (rel, path, label, split), info in zip(entries, infos):
        if info.type != pafs.FileType.File:
            listing.skipped.append(Skipped(rel, "missing: listed in the CSV but not found", kind="rejected"))
            continue
        listing.items.append(SourceItem(rel, path, label, split, int(info.size or 0), info.mtime_ns))
    return listing


def _apply_labels(listing: SourceListing, labels_csv: str, label_column: str, options: StorageOptions | None) -> None:
    """Labels (and splits) for a folder source from a ``path,label[,split]`` CSV relative to it."""
    loc = storage.resolve(labels_csv, options)
    where = f"labels CSV {loc.uri}"
    raw_rows = _read_csv_rows(loc, loc.path, where)
    rows, ip, il, isp = _csv_columns(raw_rows, label_column, where)
    if il is None:
        raise SourceError(f"{where}: no {label_column!r} column (columns: {', '.join(raw_rows[0])}); --label-column names it")
    _refuse_duplicates([(lineno, _clean_rel(row[ip]) if ip < len(row) else "") for lineno, row in rows], where)
    table: dict[str, tuple[str | None, str | None]] = {}
    for lineno, row in rows:
        rel = _clean_rel(row[ip]) if ip < len(row) else ""
        label = row[il].strip() if il is not None and il < len(row) and row[il].strip() else None
        split = normalise_split(row[isp], f"{where}, row {lineno}") if isp is not None and isp < len(row) and row[isp].strip() else None
        table[rel] = (label, split)
    known = {it.id for it in listing.items}
    new_items = []
    for it in listing.items:
        if it.id in table:
            label, split = table[it.id]
            it = SourceItem(it.id, it.path, label, split or it.split, it.size, it.mtime_ns)
        new_items.append(it)
    listing.items = new_items
    unlisted = sorted(it.id for it in listing.items if it.id not in table)
    if unlisted:
        listing.warnings.append(f"{len(unlisted)} of {len(listing.items)} images are not in {where}: stored unlabelled (e.g. {unlisted[0]})")
    for rel in sorted(set(table) - known):
        listing.skipped.append(Skipped(rel, "missing: listed in the labels CSV but not found", kind="rejected"))
