"""Labelled downstream data for a probe: RETFound trees or labelled shards, checked, plus image decoding.

A labelled set has exactly three splits (train, val, test) and a class order shared by all of
them.  Two sources read into the same `LabelledData`:

- a RETFound-layout tree `ROOT/{train,val,test}/<class>/<image>` (class names sort into indices,
  so grade 0 comes first), items are file paths;
- labelled Parquet shards written by `python -m raydino.shard`, items are encoded image bytes.

Data a probe cannot use (a class without training images, splits that disagree on classes)
raises `DataError` naming the split and the classes; data that only leaves some metrics
undefined (a class absent from val or test) comes back as warnings.

The image helpers decode either kind of item and make the evaluation view (DINO / RETFound:
resize the short side to size / 0.875, centre-crop size).  No Ray here.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms import v2

from raydino.augment.decode import as_rgb
from raydino.config import check_storage_uri, safe_uri

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
CROP_PCT = 224 / 256  # DINO / RETFound evaluation: resize to size/0.875, centre-crop size


class DataError(ValueError):
    """A labelled data set that cannot be evaluated, phrased for the person who made it."""


@dataclass
class LabelledSplit:
    name: str
    items: list[str | bytes]  # image file paths, or encoded image bytes (shards)
    labels: np.ndarray  # int class indices into LabelledData.classes
    ids: list[str]

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class LabelledData:
    name: str
    classes: list[str]
    splits: dict[str, LabelledSplit]
    source: str
    warnings: list[str] = field(default_factory=list)
    # Whether the class index is a severity scale (quadratic-weighted kappa) or nominal (unweighted),
    # and why (`resolve_ordinal`).  Loaders leave it nominal; `load_labelled` decides.
    ordinal: bool = False
    ordinal_source: str = "not decided (nominal)"

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def class_counts(self, split: str) -> np.ndarray:
        """Examples per class in `split`, zeros included (classes absent from it count 0)."""
        return np.bincount(self.splits[split].labels, minlength=self.n_classes)

    def fingerprint(self) -> str:
        """Changes when any image, label or class changes (keys the feature cache)."""
        h = hashlib.sha1(repr(self.classes).encode())
        for split in SPLITS:
            s = self.splits[split]
            for item, label, ident in zip(s.items, s.labels, s.ids):
                if isinstance(item, bytes):
                    h.update(hashlib.sha1(item).digest())
                else:
                    st = os.stat(item)
                    h.update(f"{item}|{st.st_size}|{st.st_mtime_ns}".encode())
                h.update(f"|{split}|{ident}|{int(label)}\n".encode())
        return h.hexdigest()[:16]


# ---------------------------------------------------------------- reading and checking


def load_retfound_tree(root: str | os.PathLike, name: str | None = None) -> LabelledData:
    """`ROOT/{train,val,test}/<class>/<image>`; class names sort into indices (grade 0 first)."""
    root = Path(root)
    missing = [s for s in SPLITS if not (root / s).is_dir()]
    if missing:
        found = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        raise DataError(
            f"{root}: not a RETFound-layout tree; split folder(s) {missing} missing (found {found}); expected ROOT/train|val|test/<class>/<image>"
        )
    per_split = {s: sorted(p.name for p in (root / s).iterdir() if p.is_dir()) for s in SPLITS}
    classes = per_split["train"]
    for s in ("val", "test"):
        if per_split[s] != classes:
            only_train = sorted(set(classes) - set(per_split[s]))
            extra = sorted(set(per_split[s]) - set(classes))
            raise DataError(
                f"{root}: the class folders of {s} disagree with train: missing in {s}: {only_train}, "
                f"not in train: {extra}; every split needs the same class folders"
            )
    if not classes:
        raise DataError(f"{root}/train holds no class folders")
    splits = {}
    for s in SPLITS:
        items, labels, ids = [], [], []
        for ci, cname in enumerate(classes):
            for p in sorted((root / s / cname).rglob("*")):
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
                    items.append(str(p))
                    labels.append(ci)
                    ids.append(p.relative_to(root).as_posix())  # as the shard writer names rows
        splits[s] = LabelledSplit(s, items, np.asarray(labels, dtype=np.int64), ids)
    data = LabelledData(name or root.name, classes, splits, str(root))
    data.warnings = check_labelled(data)
    return data


def load_shard_data(uri: str, name: str | None = None, storage_options: Any = None) -> LabelledData:
    """Labelled Parquet shards written by `python -m raydino.shard` (rows with id, image, label, split)."""
    try:
        from raydino.data.shards import open_shards  # local import: RETFound trees need no pyarrow
    except ImportError as e:
        raise DataError(f"{uri}: reading shards needs raydino.data.shards ({e})") from None
    try:
        shard_set = open_shards(uri, storage_options)
    except (OSError, RuntimeError) as e:  # ShardError / StorageError: say which --data failed
        raise DataError(f"--data {uri}: {e}") from None
    rows: dict[str, list[tuple[str, bytes, str]]] = {s: [] for s in SPLITS}
    other: set[str] = set()
    for row in shard_set.iter_rows(columns=["id", "image", "label", "split"]):
        if row["label"] is None:
            raise DataError(f"{uri}: row {row['id']!r} has no label; a probe needs labelled shards")
        if row["split"] in rows:
            rows[row["split"]].append((row["id"], row["image"], row["label"]))
        else:
            other.add(str(row["split"]))
    missing = [s for s in SPLITS if not rows[s]]
    if missing:
        raise DataError(f"{uri}: no rows in split(s) {missing} (other split values seen: {sorted(other)})")
    # Class order: the manifest's (RETFound names sort into label order), else the sorted train labels.
    seen = {s: {r[2] for r in rows[s]} for s in SPLITS}
    classes = list(shard_set.manifest.classes) or sorted(seen["train"])
    for s in SPLITS:
        unknown = sorted(seen[s] - set(classes))
        if unknown:
            raise DataError(f"{uri}: label(s) {unknown} in {s} are not among the classes {classes}")
    for s in ("val", "test"):
        unseen = sorted(seen[s] - seen["train"])
        if unseen:
            raise DataError(f"{uri}: label(s) {unseen} appear in {s} but never in train; train has {sorted(seen['train'])}")
    index = {c: i for i, c in enumerate(classes)}
    splits = {
        s: LabelledSplit(
            s,
            [r[1] for r in rows[s]],
            np.asarray([index[r[2]] for r in rows[s]], dtype=np.int64),
            [r[0] for r in rows[s]],
        )
        for s in SPLITS
    }
    data = LabelledData(name or shard_set.manifest.dataset or Path(uri.rstrip("/")).name, classes, splits, uri)
    data.warnings = check_labelled(data)
    return data


def load_labelled(
    uri_or_dir: str | os.PathLike,
    dataset: str | None = None,
    storage_options: Any = None,
    ordinal: bool | None = None,
) -> LabelledData:
    """A RETFound tree (`--data ROOT`, or `ROOT/NAME` with `--dataset NAME`) or labelled shards.

    A `dataset` the catalog knows (MESSIDOR-2, IDRiD, APTOS-2019, PAPILA, Glaucoma_fundus, JSIEC,
    Retina) must have its class count; differences in split sizes come back as warnings.
    `ordinal` (None: decide, see `resolve_ordinal`) says whether the classes are a severity scale.
    """
    src = str(uri_or_dir)
    try:  # a malformed URI (s3:/b, gs://, http://...) says what is wrong with it, not "no such directory"
        check_storage_uri("--data", src)
    except ValueError as e:
        raise DataError(f"--data {safe_uri(src)}: {e}") from None
    if "://" not in src or src.startswith("file://"):
        root = Path(src.removeprefix("file://"))
        if dataset and (root / dataset).is_dir():
            root = root / dataset
        if not root.exists():
            raise DataError(f"--data {src}: no such directory")
        if (root / "train").is_dir():
            data = load_retfound_tree(root, dataset)
        elif (root / "manifest.json").is_file():
            data = load_shard_data(str(root), dataset, storage_options)
        else:
            raise DataError(
                f"--data {src}: neither a RETFound-layout tree (ROOT/train|val|test/<class>/<image>) "
                "nor labelled shards (a folder with manifest.json from `python -m raydino.shard`)"
            )
    else:
        data = load_shard_data(src, dataset, storage_options)
    from raydino.data import catalog  # local import: sources and shards need none of the catalog

    info = catalog.find(dataset)
    if info is not None:
        if len(info.classes) != data.n_classes:
            raise DataError(f"--dataset {dataset}: {info.title} has {len(info.classes)} classes, {src} has {data.classes}")
        counts = {s: dict(zip(data.classes, data.class_counts(s).tolist())) for s in SPLITS}
        data.warnings += catalog.check_counts(info, counts)
    data.ordinal, data.ordinal_source = resolve_ordinal(data.classes, dataset, ordinal)
    return data


def resolve_ordinal(classes: Sequence[str], dataset: str | None = None, ordinal: bool | None = None) -> tuple[bool, str]:
    """Whether a labelled set's classes are a severity scale, and why (for the report).

    In order: the caller's word (`--ordinal` / `--nominal`); the catalog entry named by `dataset`;
    the catalog entry whose RETFound class folders are exactly `classes` (a copy of APTOS-2019 without
    `--dataset`, or the synthetic DR and glaucoma sets, which use RETFound's folder names); else
    nominal, the safe reading: unweighted kappa assumes nothing about the class order.
    """
    from raydino.data import catalog

    if ordinal is not None:
        return bool(ordinal), "given (--ordinal)" if ordinal else "given (--nominal)"
    info = catalog.find(dataset)
    if info is not None:
        return info.ordinal, f"catalog entry {info.title}"
    info = catalog.find_by_classes(classes)
    if info is not None:
        return info.ordinal, f"class folders are those of catalog entry {info.title}"
    return False, "no catalog entry: nominal unless --ordinal is given"


def check_labelled(data: LabelledData) -> list[str]:
    """Raise on data a probe cannot use; return warnings for data that leaves some metrics undefined."""
    for s in SPLITS:
        if len(data.splits[s]) == 0:
            raise DataError(f"{data.source}: the {s} split has no images")
    counts = {s: data.class_counts(s) for s in SPLITS}
    empty_train = [data.classes[c] for c in range(data.n_classes) if counts["train"][c] == 0]
    if empty_train:
        raise DataError(f"{data.source}: class(es) {empty_train} have no examples in the train split")
    if data.n_classes < 2:
        raise DataError(f"{data.source}: a probe needs at least 2 classes, found {data.classes}")
    out = []
    for s in ("val", "test"):
        empty = [data.classes[c] for c in range(data.n_classes) if counts[s][c] == 0]
        if empty:
            out.append(f"class(es) {empty} have no examples in the {s} split: metrics that need them are undefined")
    return out


# ---------------------------------------------------------------- images


def decode_image(item: str | bytes, name: str | None = None) -> torch.Tensor:
    """An image file or encoded bytes → uint8 RGB CHW tensor; a file that cannot be decoded is a
    DataError naming it (`name`, else the path), not PIL's message about an anonymous buffer."""
    try:
        with Image.open(io.BytesIO(item) if isinstance(item, bytes) else item) as im:
            rgb = as_rgb(im)  # 16-bit greyscale scaled, not clipped
            ImageOps.exif_transpose(rgb, in_place=True)  # EXIF orientation, as training's decoder applies it
            return v2.functional.pil_to_tensor(rgb)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        what = name or (item if isinstance(item, str) else f"{len(item)} encoded bytes")
        raise DataError(f"image {what} cannot be decoded ({e}); remove or replace it") from None


def resize_short_side(image_size: int, crop_pct: float = CROP_PCT) -> v2.Transform:
    """Resize the short side to size/crop_pct (bicubic): the step before the centre or random crop."""
    return v2.Resize(int(round(image_size / crop_pct)), interpolation=v2.InterpolationMode.BICUBIC, antialias=True)


def eval_transform(image_size: int, crop_pct: float = CROP_PCT) -> v2.Transform:
    """Resize the short side to size/crop_pct (bicubic), centre-crop size: the evaluation view."""
    return v2.Compose([resize_short_side(image_size, crop_pct), v2.CenterCrop(image_size)])


class DecodedImages(torch.utils.data.Dataset):
    """Items (paths or bytes) decoded, and transformed when a transform is given, for a DataLoader."""

    def __init__(self, items: Sequence[str | bytes], transform: Callable | None, ids: Sequence[str] | None = None) -> None:
        self.items, self.transform, self.ids = items, transform, ids

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> torch.Tensor:
        img = decode_image(self.items[i], self.ids[i] if self.ids is not None else None)
        return self.transform(img) if self.transform else img


def decode_split(split: LabelledSplit, image_size: int, crop_pct: float = CROP_PCT) -> torch.Tensor:
    """All of a split's evaluation views as one uint8 NCHW tensor (for repeated kNN during training)."""
    tf = eval_transform(image_size, crop_pct)
    return torch.stack([tf(decode_image(x, name)) for x, name in zip(split.items, split.ids)])
