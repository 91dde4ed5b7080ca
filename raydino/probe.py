"""Downstream evaluation of a frozen backbone: labelled data, features, probes, metrics.

The paper's protocol (Cheng et al., MIDL 2025; the DINO and RETFound evaluation code): the teacher
backbone is frozen; a ViT's feature is the concatenated [CLS] token of its last 4 blocks, each passed
through the final LayerNorm (what DINO's `eval_linear.py` does with `get_intermediate_layers`; here
timm's `forward_intermediates(..., norm=True)`), a CNN's is its global-pooled output.  A linear
classifier is trained on them, chosen on validation macro AUROC and reported on test.

Three probes share one result format:
- `fast`: scikit-learn logistic regression on standardised cached features (C chosen on val AUROC).
- `paper`: a linear layer trained with SGD on features of random training crops (DINO's recipe).
- `knn`: k = 20, T = 0.07 cosine-similarity weighted voting (DINO's `eval_knn.py`) with class scores.

Metrics follow the paper: macro one-vs-rest AUROC, macro AUPR, sensitivity = mean recall over
classes 1..C-1, specificity likewise, plus accuracy, macro F1 and quadratic kappa; bootstrap 95%
intervals resample the test cases.  A metric that is undefined is None with a reason, never 0.5.

No Ray here: recipes (`evaluate`, `pretrain`, `tune`) call these functions.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pydantic import ValidationError
from torch import nn
from torchvision.transforms import v2

from .checkpoint import (
    STATE_FILE,
    checkpoint_config,
    load_backbone_state,
    load_checkpoint,
    read_backbone_weights,
    teacher_backbone_state,
)
from .config import ConfigError, ModelConfig
from .engine import normalize
from .model import build_backbone, is_vit

Progress = Callable[[str], None] | None
SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
CROP_PCT = 224 / 256  # DINO / RETFound evaluation: resize to size/0.875, centre-crop size
N_LAST_BLOCKS = 4
C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
FEATURE_VERSION = 1  # bump when the feature definition changes (invalidates caches)


class DataError(ValueError):
    """A labelled data set that cannot be evaluated, phrased for the person who made it."""


# ---------------------------------------------------------------- labelled data


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

    @property
    def n_classes(self) -> int:
        return len(self.classes)

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


def load_retfound_tree(root: str | os.PathLike, name: str | None = None) -> LabelledData:
    """`ROOT/{train,val,test}/<class>/<image>`; class names sort into indices (grade 0 first)."""
    root = Path(root)
    missing = [s for s in SPLITS if not (root / s).is_dir()]
    if missing:
        found = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        raise DataError(
            f"{root}: not a RETFound-layout tree; split folder(s) {missing} missing "
            f"(found {found}); expected ROOT/train|val|test/<class>/<image>"
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
        from .data.shards import open_shards
    except ImportError as e:  # the data layer is optional for RETFound trees
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


def load_labelled(uri_or_dir: str | os.PathLike, dataset: str | None = None, storage_options: Any = None) -> LabelledData:
    """A RETFound tree (`--data ROOT`, or `ROOT/NAME` with `--dataset NAME`) or labelled shards.

    A `dataset` the catalog knows (MESSIDOR-2, IDRiD, APTOS-2019, PAPILA, JSIEC, Retina) must have
    its class count; differences in split sizes come back as warnings.
    """
    src = str(uri_or_dir)
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
    if not dataset:
        return data
    from .data import catalog  # local import: RETFound trees need none of the data layer

    info = catalog.find(dataset)
    if info is not None:
        if len(info.classes) != data.n_classes:
            raise DataError(f"--dataset {dataset}: {info.title} has {len(info.classes)} classes, {src} has {data.classes}")
        counts = {s: dict(zip(data.classes, np.bincount(data.splits[s].labels, minlength=data.n_classes).tolist())) for s in SPLITS}
        data.warnings += catalog.check_counts(info, counts)
    return data


def check_labelled(data: LabelledData) -> list[str]:
    """Raise on data a probe cannot use; return warnings for data that leaves some metrics undefined."""
    for s in SPLITS:
        if len(data.splits[s]) == 0:
            raise DataError(f"{data.source}: the {s} split has no images")
    counts = {s: np.bincount(data.splits[s].labels, minlength=data.n_classes) for s in SPLITS}
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


def decode_image(item: str | bytes) -> torch.Tensor:
    """An image file or encoded bytes → uint8 RGB CHW tensor."""
    with Image.open(io.BytesIO(item) if isinstance(item, bytes) else item) as im:
        return v2.functional.pil_to_tensor(im.convert("RGB"))


def eval_transform(image_size: int, crop_pct: float = CROP_PCT) -> v2.Transform:
    """Resize the short side to size/crop_pct (bicubic), centre-crop size: the evaluation view."""
    return v2.Compose([
        v2.Resize(int(round(image_size / crop_pct)), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.CenterCrop(image_size),
    ])


class _Images(torch.utils.data.Dataset):
    def __init__(self, items: Sequence[str | bytes], transform: Callable | None) -> None:
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> torch.Tensor:
        img = decode_image(self.items[i])
        return self.transform(img) if self.transform else img


def decode_split(split: LabelledSplit, image_size: int, crop_pct: float = CROP_PCT) -> torch.Tensor:
    """All of a split's evaluation views as one uint8 NCHW tensor (for repeated kNN during training)."""
    tf = eval_transform(image_size, crop_pct)
    return torch.stack([tf(decode_image(x)) for x in split.items])


# ---------------------------------------------------------------- checkpoints


@dataclass
class LoadedBackbone:
    """A frozen backbone and where it came from."""

    backbone: nn.Module
    arch: str
    image_size: int | None  # the grid the ViT was built for (pretraining's global crop size)
    source: str  # the resolved checkpoint directory or file, or "random"
    step: int | None = None
    epoch: int | None = None
    config: dict[str, Any] | None = None  # the resolved pretraining config when known


def _checkpoint_step(directory: Path) -> int:
    # mmap: reads the pickled scalars without pulling every tensor into memory.
    state = torch.load(directory / STATE_FILE, map_location="cpu", mmap=True, weights_only=False)
    return int(state.get("step", -1))


def find_latest_checkpoint(path: str | os.PathLike) -> Path:
    """A run directory → its checkpoint with the highest step (then the newest name); a checkpoint
    directory or its state.pt → that directory; any other file → itself."""
    p = Path(path)
    if p.is_file():
        return p.parent if p.name == STATE_FILE else p
    if (p / STATE_FILE).is_file():
        return p
    if not p.is_dir():
        raise FileNotFoundError(f"--checkpoint {path}: no such file or directory")
    found = sorted(d for d in p.iterdir() if (d / STATE_FILE).is_file())
    if not found:
        raise FileNotFoundError(
            f"--checkpoint {path}: no checkpoint inside (expected {STATE_FILE} in it or in its checkpoint_* folders)"
        )
    return max(found, key=lambda d: (_checkpoint_step(d), d.name))


def fetch_checkpoint(uri: str, storage_options: Any = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """An s3:// run (its latest `checkpoint_*`) or checkpoint, copied once into a local cache.

    Latest = the greatest folder name: pretraining names them `checkpoint_<step, 8 digits>`.
    The cache is `$RAYDINO_CACHE/checkpoints` (default ~/.cache/raydino/checkpoints).
    """
    from .data import storage as st  # local import: local checkpoints need none of the data layer

    loc = st.resolve(uri, storage_options)
    files = st.list_files(loc)
    rel = [f.path[len(loc.path) :].strip("/") for f in files]
    dirs = sorted({r.rpartition("/")[0] for r in rel if r.rpartition("/")[2] == STATE_FILE})
    dirs = [d for d in dirs if "/" not in d]  # the checkpoint itself ("") or its direct children
    if not dirs:
        raise FileNotFoundError(f"--checkpoint {st.display_uri(uri)}: no {STATE_FILE} in it or in its checkpoint_* folders")
    chosen = "" if "" in dirs else dirs[-1]
    root = Path(cache_dir or Path(os.environ.get("RAYDINO_CACHE", "~/.cache/raydino")).expanduser() / "checkpoints")
    local = root / hashlib.sha1(st.display_uri(uri).encode()).hexdigest()[:12] / (chosen or Path(loc.path).name)
    for info, r in zip(files, rel):
        if chosen and not r.startswith(chosen + "/"):
            continue
        if not chosen and "/" in r:
            continue
        target = local / (r[len(chosen) + 1 :] if chosen else r)
        if target.exists() and target.stat().st_size == info.size:
            continue  # fetched before
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".part")
        tmp.write_bytes(st.read_bytes(loc, info.path))
        os.replace(tmp, target)
    return local


def new_backbone(arch: str, image_size: int | None = None) -> nn.Module:
    """A timm backbone as pretraining builds it (no classifier; ViTs with dynamic image size)."""
    try:
        model_cfg = ModelConfig(arch=arch, drop_path_rate=0.0)
    except ValidationError as e:
        raise ConfigError(f"--arch {arch}: {e.errors()[0]['msg'].removeprefix('Value error, ')}") from None
    return build_backbone(model_cfg, img_size=image_size)


def load_teacher_backbone(
    source: str | os.PathLike, arch: str | None = None, image_size: int | None = None, seed: int = 0
) -> LoadedBackbone:
    """The frozen teacher backbone of a run / checkpoint / exported safetensors / DINO file, or
    `source="random"` for a randomly initialised `arch` (the baseline); always on the CPU, eval mode."""
    if str(source) == "random":
        if not arch:
            raise ConfigError("--checkpoint random needs --arch NAME (the architecture to initialise)")
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            backbone = new_backbone(arch, image_size)
        return LoadedBackbone(backbone.eval(), arch, image_size, "random")
    remote = "://" in str(source) and not str(source).startswith("file://")
    path = fetch_checkpoint(str(source)) if remote else find_latest_checkpoint(str(source).removeprefix("file://"))
    if path.is_dir():
        ckpt = load_checkpoint(path)
        cfg = checkpoint_config(ckpt)
        own_arch = cfg.model.arch
        img = cfg.augment.global_crop_size
        backbone = new_backbone(arch or own_arch, img)
        what = f"checkpoint {path} (trained as model.arch={own_arch})"
        if arch and arch != own_arch:
            what += f" loaded as --arch {arch}"
        load_backbone_state(backbone, teacher_backbone_state(ckpt), what)
        return LoadedBackbone(backbone.eval(), arch or own_arch, img, str(path), ckpt.get("step"), ckpt.get("epoch"), cfg.to_dict())
    sidecar = path.with_suffix(".json")
    meta = json.loads(sidecar.read_text()) if path.suffix == ".safetensors" and sidecar.exists() else {}
    if arch and meta.get("arch") and arch != meta["arch"]:
        raise ConfigError(f"--arch {arch}: {path} was exported from {meta['arch']} (see {sidecar.name})")
    arch = arch or meta.get("arch")
    if not arch:
        raise ConfigError(f"--checkpoint {path}: a weights file without a raydino sidecar needs --arch NAME")
    img = meta.get("img_size") or image_size
    backbone = new_backbone(arch, img)
    load_backbone_state(backbone, read_backbone_weights(path), f"{path} as {arch}")
    return LoadedBackbone(backbone.eval(), arch, img, str(path), meta.get("step"), meta.get("epoch"), meta.get("config"))


# ---------------------------------------------------------------- features


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible here; use --device cpu")
    return device


@contextlib.contextmanager
def frozen(backbone: nn.Module):
    """Eval mode and no grad for the duration; the caller's mode is restored (the teacher may be training)."""
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            yield backbone
    finally:
        backbone.train(was_training)


def backbone_features(backbone: nn.Module, x: torch.Tensor, n_last_blocks: int = N_LAST_BLOCKS) -> torch.Tensor:
    """ViT: [CLS] of the last n blocks, each through the final norm, concatenated; CNN: pooled output."""
    if is_vit(backbone) and hasattr(backbone, "forward_intermediates"):
        n = min(n_last_blocks, len(backbone.blocks))
        outs = backbone.forward_intermediates(
            x, indices=n, norm=True, return_prefix_tokens=True, output_fmt="NLC", intermediates_only=True
        )
        return torch.cat([prefix[:, 0] for _, prefix in outs], dim=-1)
    return backbone(x)


def _amp(device: torch.device):
    # bf16 on CUDA roughly doubles extraction speed; the probe's inputs are cast back to float32.
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class _Meter:
    """Progress lines with rate and ETA, at most every `every` seconds (and at the end)."""

    def __init__(self, label: str, total: int, progress: Progress, every: float = 10.0, unit: str = "images") -> None:
        self.label, self.total, self.progress, self.every, self.unit = label, total, progress, every, unit
        self.start = self.last = time.perf_counter()

    def update(self, done: int) -> None:
        now = time.perf_counter()
        if self.progress is None or (now - self.last < self.every and done < self.total):
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        self.progress(f"{self.label}: {done}/{self.total} {self.unit}, {rate:.1f}/s, ETA {eta:.0f}s")


def extract_features(
    backbone: nn.Module,
    images: LabelledSplit | torch.Tensor,
    image_size: int,
    batch_size: int = 64,
    crop_pct: float = CROP_PCT,
    num_workers: int | None = None,
    progress: Progress = print,
    label: str = "features",
) -> np.ndarray:
    """Frozen features (float32, N × D) on the backbone's device; `images` is a split or uint8 NCHW."""
    device = next(backbone.parameters()).device
    if isinstance(images, torch.Tensor):
        batches = images.split(batch_size)
        total = len(images)
    else:
        if num_workers is None:  # decoding is the bottleneck in front of a GPU; on CPU it competes
            num_workers = min(8, os.cpu_count() or 1) if device.type == "cuda" else 0
        batches = torch.utils.data.DataLoader(
            _Images(images.items, eval_transform(image_size, crop_pct)),
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=device.type == "cuda",
            generator=torch.Generator(),  # its own: iterating must not draw from the caller's RNG
        )
        total = len(images)
    meter = _Meter(label, total, progress)
    out, done = [], 0
    with frozen(backbone), _amp(device):
        for batch in batches:
            x = normalize(batch.to(device, non_blocking=True))
            out.append(backbone_features(backbone, x).float().cpu())
            done += len(batch)
            meter.update(done)
    return torch.cat(out).numpy()


def backbone_fingerprint(backbone: nn.Module) -> str:
    """Hash of every weight: features cached under it can only belong to these exact weights."""
    h = hashlib.sha1(type(backbone).__name__.encode())
    for k, v in backbone.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class FeatureCache:
    """`DIR/<key>/<split>.npz` with features, labels and ids; a second probe reads instead of extracting."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)

    @staticmethod
    def key(backbone_fp: str, data: LabelledData, image_size: int, crop_pct: float) -> str:
        raw = f"{backbone_fp}|{data.fingerprint()}|{image_size}|{crop_pct}|{N_LAST_BLOCKS}|v{FEATURE_VERSION}"
        return hashlib.sha1(raw.encode()).hexdigest()[:16]

    def load(self, key: str, split: str) -> np.ndarray | None:
        path = self.directory / key / f"{split}.npz"
        if not path.exists():
            return None
        with np.load(path) as z:
            return z["features"]

    def save(self, key: str, split: str, features: np.ndarray, data: LabelledData) -> Path:
        path = self.directory / key / f"{split}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        s = data.splits[split]
        np.savez(tmp, features=features, labels=s.labels, ids=np.asarray(s.ids))
        os.replace(tmp, path)  # never a half-written cache file
        return path


def split_features(
    backbone: nn.Module,
    data: LabelledData,
    image_size: int,
    *,
    batch_size: int = 64,
    crop_pct: float = CROP_PCT,
    cache_dir: str | os.PathLike | None = None,
    progress: Progress = print,
) -> dict[str, np.ndarray]:
    """Features of train, val and test, read from / written to `cache_dir` when given."""
    cache = FeatureCache(cache_dir) if cache_dir else None
    key = cache.key(backbone_fingerprint(backbone), data, image_size, crop_pct) if cache else ""
    out = {}
    for s in SPLITS:
        feats = cache.load(key, s) if cache else None
        if feats is not None and len(feats) == len(data.splits[s]):
            if progress:
                progress(f"features {s}: {len(feats)} from cache {cache.directory / key}")
        else:
            feats = extract_features(
                backbone, data.splits[s], image_size, batch_size, crop_pct, progress=progress, label=f"features {s}"
            )
            if cache:
                cache.save(key, s, feats, data)
        out[s] = feats
    return out


# ---------------------------------------------------------------- metrics

METRICS = ("auroc", "aupr", "sensitivity", "specificity", "accuracy", "f1", "kappa")


def compute_metrics(y_true: Sequence[int], scores: np.ndarray, n_classes: int) -> dict[str, Any]:
    """The paper's metrics from class scores (N × C); undefined ones are None with a reason.

    auroc: macro one-vs-rest (binary: AUROC of class 1), equal to sklearn's
    `roc_auc_score(y, p, multi_class="ovr", average="macro")` for probabilities.
    aupr: macro over classes of `average_precision_score` (one-vs-rest).
    sensitivity / specificity: mean over classes 1..C-1 of one-vs-rest recall / TN/(TN+FP), as
    RETFound's `misc_measures` (class 0, e.g. "no DR", is the reference class).
    accuracy: fraction correct; f1: macro F1; kappa: quadratic-weighted Cohen's kappa.
    """
    from sklearn.metrics import average_precision_score, cohen_kappa_score, f1_score, roc_auc_score

    y = np.asarray(y_true, dtype=np.int64)
    s = np.asarray(scores, dtype=np.float64)
    if y.size == 0:
        raise ValueError("compute_metrics: no test cases")
    if s.shape != (len(y), n_classes):
        raise ValueError(f"compute_metrics: scores shape {s.shape}, expected ({len(y)}, {n_classes})")
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"compute_metrics: labels must lie in 0..{n_classes - 1}, got {sorted(set(y.tolist()))}")
    pred = s.argmax(axis=1)
    counts = np.bincount(y, minlength=n_classes)
    absent = [c for c in range(n_classes) if counts[c] == 0]
    undefined: dict[str, str] = {}
    per_auroc, per_ap, per_recall, per_spec = [], [], [], []
    for c in range(n_classes):
        pos, hit = y == c, pred == c
        defined_roc = 0 < counts[c] < len(y)
        per_auroc.append(float(roc_auc_score(pos, s[:, c])) if defined_roc else None)
        per_ap.append(float(average_precision_score(pos, s[:, c])) if counts[c] else None)
        per_recall.append(float((hit & pos).sum() / pos.sum()) if counts[c] else None)
        neg = ~pos
        per_spec.append(float((~hit & neg).sum() / neg.sum()) if neg.any() else None)

    def need(metric: str, values: list, classes: Sequence[int], why: str) -> float | None:
        bad = [c for c in classes if values[c] is None]
        if bad:
            undefined[metric] = f"class(es) {bad} {why}"
            return None
        return float(np.mean([values[c] for c in classes]))

    every, minority = range(n_classes), range(1, n_classes)
    out: dict[str, Any] = {"n": int(len(y))}
    if n_classes == 2:
        out["auroc"] = per_auroc[1]
        if out["auroc"] is None:
            undefined["auroc"] = "the test cases hold only one of the two classes"
    else:
        out["auroc"] = need("auroc", per_auroc, every, "have no test cases (or are all of them)")
    out["aupr"] = need("aupr", per_ap, every, "have no test cases")
    out["sensitivity"] = need("sensitivity", per_recall, minority, "have no test cases")
    out["specificity"] = need("specificity", per_spec, minority, "are every test case (no negatives)")
    out["accuracy"] = float((pred == y).mean())
    if absent:
        out["f1"] = None
        undefined["f1"] = f"class(es) {absent} have no test cases"
    else:
        out["f1"] = float(f1_score(y, pred, labels=list(every), average="macro", zero_division=0))
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        kappa = cohen_kappa_score(y, pred, labels=list(every), weights="quadratic")
    if np.isfinite(kappa):
        out["kappa"] = float(kappa)
    else:
        out["kappa"] = None
        undefined["kappa"] = "labels and predictions are all one class (chance agreement is 1)"
    out["per_class"] = {"auroc": per_auroc, "aupr": per_ap, "recall": per_recall, "specificity": per_spec}
    out["undefined"] = undefined
    return out


def mean_metrics(runs: Sequence[dict[str, Any]]) -> tuple[dict[str, float | None], dict[str, float | None]]:
    """Mean and standard deviation over seeds of each metric (None where any seed leaves it undefined)."""
    mean, std = {}, {}
    for m in METRICS:
        vals = [r[m] for r in runs]
        ok = all(v is not None for v in vals)
        mean[m] = float(np.mean(vals)) if ok else None
        std[m] = float(np.std(vals)) if ok else None
    return mean, std


def bootstrap_intervals(
    y_true: np.ndarray,
    seed_scores: Sequence[np.ndarray],
    n_classes: int,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    progress: Progress = None,
) -> dict[str, dict[str, Any]]:
    """Percentile intervals of the seed-mean of each metric, resampling test cases with replacement.

    Every resample draws one index set and scores every seed's predictions on it, so the interval
    is for the number that is reported (the mean over seeds).  Resamples where a metric is
    undefined (a class drawn zero times) are dropped and counted.
    """
    rng = np.random.default_rng(seed)
    y = np.asarray(y_true)
    values: dict[str, list[float]] = {m: [] for m in METRICS}
    meter = _Meter("bootstrap", n_resamples, progress, every=15.0, unit="resamples")
    for b in range(n_resamples):
        idx = rng.integers(0, len(y), len(y))
        runs = [compute_metrics(y[idx], sc[idx], n_classes) for sc in seed_scores]
        mean, _ = mean_metrics(runs)
        for m in METRICS:
            if mean[m] is not None:
                values[m].append(mean[m])
        meter.update(b + 1)
    alpha = (1 - level) / 2
    out = {}
    for m in METRICS:
        v = np.asarray(values[m])
        entry: dict[str, Any] = {"n_resamples": n_resamples, "n_valid": int(len(v)), "level": level}
        if len(v) < max(1, n_resamples // 2):
            entry.update(low=None, high=None, reason=f"undefined in {n_resamples - len(v)} of {n_resamples} resamples")
        else:
            entry.update(low=float(np.quantile(v, alpha)), high=float(np.quantile(v, 1 - alpha)))
        out[m] = entry
    return out


def selection_auroc(metrics: dict[str, Any]) -> float:
    """Model selection score: val macro AUROC, or the mean over the classes where it is defined."""
    if metrics["auroc"] is not None:
        return metrics["auroc"]
    defined = [a for a in metrics["per_class"]["auroc"] if a is not None]
    return float(np.mean(defined)) if defined else float("nan")


# ---------------------------------------------------------------- probes


@dataclass
class SeedRun:
    seed: int
    val: dict[str, Any]
    test: dict[str, Any]
    test_scores: np.ndarray
    selected: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)


def fast_probe(
    feats: dict[str, np.ndarray], labels: dict[str, np.ndarray], n_classes: int, c_grid: Sequence[float] = C_GRID
) -> SeedRun:
    """Logistic regression on standardised features; C chosen on validation macro AUROC."""
    from threadpoolctl import threadpool_limits  # installed with scikit-learn

    # One BLAS thread: L-BFGS makes many small matrix products, and multi-threaded BLAS spins
    # while waiting; on a busy 2-core machine that took 56 s instead of 0.6 s (420 × 768 features).
    with threadpool_limits(limits=1, user_api="blas"):
        return _logistic_path(feats, labels, n_classes, c_grid)


def _logistic_path(
    feats: dict[str, np.ndarray], labels: dict[str, np.ndarray], n_classes: int, c_grid: Sequence[float]
) -> SeedRun:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(feats["train"])
    x = {s: scaler.transform(feats[s]) for s in SPLITS}
    best: tuple[float, float, Any, dict] | None = None
    history = []
    # The regularisation path from strong to weak, each fit starting at the previous solution
    # (warm start): weak regularisation alone needs several times more L-BFGS iterations.
    clf = LogisticRegression(max_iter=1000, warm_start=True)
    for c in sorted(c_grid):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            clf.set_params(C=c).fit(x["train"], labels["train"])
        val = compute_metrics(labels["val"], _class_scores(clf, x["val"], n_classes), n_classes)
        score = selection_auroc(val)
        converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        history.append({"C": c, "val_auroc": score, "converged": converged})
        if best is None or score > best[0]:  # ties keep the stronger regularisation (earlier in the path)
            best = (score, c, copy.deepcopy(clf), val)
    assert best is not None
    _, c, clf, val = best
    test_scores = _class_scores(clf, x["test"], n_classes)
    return SeedRun(0, val, compute_metrics(labels["test"], test_scores, n_classes), test_scores, {"C": c}, history)


def _class_scores(clf: Any, x: np.ndarray, n_classes: int) -> np.ndarray:
    out = np.zeros((len(x), n_classes))
    out[:, clf.classes_] = clf.predict_proba(x)
    return out


def knn_scores(
    train_x: np.ndarray, train_y: np.ndarray, query_x: np.ndarray, n_classes: int, k: int = 20, temperature: float = 0.07
) -> np.ndarray:
    """DINO's weighted kNN: cosine similarity, top-k neighbours vote exp(sim / T); scores sum to 1."""
    train = nn.functional.normalize(torch.as_tensor(train_x, dtype=torch.float32), dim=1)
    query = nn.functional.normalize(torch.as_tensor(query_x, dtype=torch.float32), dim=1)
    labels = torch.as_tensor(train_y, dtype=torch.int64)
    k = min(k, len(train))
    out = []
    for chunk in query.split(1024):  # bounded memory for large banks
        sim, idx = (chunk @ train.T).topk(k, dim=1)
        weights = (sim / temperature).exp()
        votes = torch.zeros(len(chunk), n_classes).scatter_add_(1, labels[idx], weights)
        out.append(votes / votes.sum(dim=1, keepdim=True))
    return torch.cat(out).numpy().astype(np.float64)


def knn_probe(
    feats: dict[str, np.ndarray], labels: dict[str, np.ndarray], n_classes: int, k: int = 20, temperature: float = 0.07
) -> SeedRun:
    val = knn_scores(feats["train"], labels["train"], feats["val"], n_classes, k, temperature)
    test = knn_scores(feats["train"], labels["train"], feats["test"], n_classes, k, temperature)
    return SeedRun(
        0,
        compute_metrics(labels["val"], val, n_classes),
        compute_metrics(labels["test"], test, n_classes),
        test,
        {"k": min(k, len(labels["train"])), "temperature": temperature},
    )


def train_crops(image_size: int) -> v2.Transform:
    """DINO eval_linear's training view: RandomResizedCrop (scale 0.08–1, bicubic) + horizontal flip."""
    return v2.Compose([
        v2.RandomResizedCrop(image_size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(),
    ])


def paper_probe(
    backbone: nn.Module,
    train_images: Sequence[torch.Tensor],
    feats: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    n_classes: int,
    seed: int,
    image_size: int,
    epochs: int = 90,
    lr: float = 0.1,
    batch_size: int = 64,
    progress: Progress = print,
) -> SeedRun:
    """A linear layer on frozen features of fresh random training crops each epoch.

    SGD (momentum 0.9, no weight decay), lr = `lr` × batch/256 (linear scaling, as DINO and
    RETFound), cosine to 0 over the epochs, no batch norm; the epoch with the best validation
    AUROC (val: centre-crop features) is kept and reported on test.
    """
    device = next(backbone.parameters()).device
    dim = feats["val"].shape[1]
    crop = train_crops(image_size)
    y_train = torch.as_tensor(labels["train"], dtype=torch.int64)
    val_x = torch.as_tensor(feats["val"], dtype=torch.float32, device=device)
    test_x = torch.as_tensor(feats["test"], dtype=torch.float32, device=device)
    history: list[dict[str, float]] = []
    # fork_rng: the probe's crops and init must not move the caller's (e.g. pretraining's) RNG.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        head = nn.Linear(dim, n_classes).to(device)
        nn.init.normal_(head.weight, std=0.01)  # DINO's LinearClassifier init
        nn.init.zeros_(head.bias)
        opt = torch.optim.SGD(head.parameters(), lr=lr * batch_size / 256, momentum=0.9, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs, eta_min=0.0)
        best: tuple[float, int, dict, dict] | None = None
        start = time.perf_counter()
        for epoch in range(epochs):
            order = torch.randperm(len(train_images))
            head.train()
            total_loss = 0.0
            for i in range(0, len(order), batch_size):
                idx = order[i : i + batch_size]
                x = torch.stack([crop(train_images[j]) for j in idx.tolist()]).to(device)
                with frozen(backbone), _amp(device):
                    f = backbone_features(backbone, normalize(x)).float()
                loss = nn.functional.cross_entropy(head(f), y_train[idx].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total_loss += float(loss.detach()) * len(idx)
            sched.step()
            head.eval()
            with torch.no_grad():
                val_scores = head(val_x).softmax(dim=1).double().cpu().numpy()
            val = compute_metrics(labels["val"], val_scores, n_classes)
            score = selection_auroc(val)
            history.append({"epoch": epoch, "loss": total_loss / len(order), "val_auroc": score})
            if best is None or score > best[0]:
                best = (score, epoch, copy.deepcopy(head.state_dict()), val)
            if progress:
                elapsed = time.perf_counter() - start
                eta = elapsed / (epoch + 1) * (epochs - epoch - 1)
                progress(
                    f"paper probe seed {seed}: epoch {epoch + 1}/{epochs} loss {total_loss / len(order):.4f} "
                    f"val AUROC {score:.4f} ETA {eta:.0f}s"
                )
    assert best is not None
    head.load_state_dict(best[2])
    with torch.no_grad():
        test_scores = head(test_x).softmax(dim=1).double().cpu().numpy()
    test = compute_metrics(labels["test"], test_scores, n_classes)
    return SeedRun(seed, best[3], test, test_scores, {"best_epoch": best[1], "epochs": epochs}, history)


def decode_train_images(split: LabelledSplit, image_size: int, crop_pct: float = CROP_PCT) -> list[torch.Tensor]:
    """Training images decoded once, short side resized to size/crop_pct; random crops come per epoch."""
    resize = v2.Resize(int(round(image_size / crop_pct)), interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
    return [resize(decode_image(x)) for x in split.items]


def parse_seeds(text: str | Sequence[int]) -> list[int]:
    """'0-4' → [0,1,2,3,4]; '0,3,7' and '0-2,9' work too; a list passes through."""
    if not isinstance(text, str):
        return [int(s) for s in text]
    seeds: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part[1:]:
                lo, hi = part.split("-", 1) if not part.startswith("-") else (part, "")
                lo_i, hi_i = int(lo), int(hi)
                if hi_i < lo_i:
                    raise ValueError
                seeds += range(lo_i, hi_i + 1)
            elif part:
                seeds.append(int(part))
    except ValueError:
        raise ValueError(f"--seeds {text!r}: expected a range like 0-4, a list like 0,1,2, or both (0-2,7)") from None
    if not seeds:
        raise ValueError(f"--seeds {text!r}: no seeds given")
    return list(dict.fromkeys(seeds))


def probe_backbone(
    backbone: nn.Module,
    data: LabelledData,
    kind: str = "fast",
    seeds: Sequence[int] = (0,),
    *,
    image_size: int,
    batch_size: int = 64,
    crop_pct: float = CROP_PCT,
    cache_dir: str | os.PathLike | None = None,
    n_bootstrap: int = 1000,
    epochs: int = 90,
    lr: float = 0.1,
    knn_k: int = 20,
    knn_temperature: float = 0.07,
    c_grid: Sequence[float] = C_GRID,
    feats: dict[str, np.ndarray] | None = None,
    return_scores: bool = False,
    progress: Progress = print,
) -> dict[str, Any]:
    """One probe of a frozen backbone on a labelled set: per-seed, mean, std and bootstrap intervals.

    The backbone stays on its device and in its mode.  `fast` and `knn` are deterministic given the
    features, so they run once whatever `seeds` says (the JSON says so).  `feats` skips extraction.
    """
    if kind not in ("fast", "paper", "knn"):
        raise ValueError(f"probe kind {kind!r}: allowed fast, paper, knn")
    if feats is None:
        feats = split_features(
            backbone, data, image_size, batch_size=batch_size, crop_pct=crop_pct, cache_dir=cache_dir, progress=progress
        )
    labels = {s: data.splits[s].labels for s in SPLITS}
    n = data.n_classes
    started = time.perf_counter()
    if kind == "fast":
        runs = [fast_probe(feats, labels, n, c_grid)]
    elif kind == "knn":
        runs = [knn_probe(feats, labels, n, knn_k, knn_temperature)]
    else:
        train_images = decode_train_images(data.splits["train"], image_size, crop_pct)
        runs = [
            paper_probe(backbone, train_images, feats, labels, n, s, image_size, epochs, lr, batch_size, progress)
            for s in seeds
        ]
    deterministic = kind != "paper"
    if deterministic:
        runs[0].seed = int(seeds[0]) if len(seeds) else 0
    mean, std = mean_metrics([r.test for r in runs])
    val_mean, _ = mean_metrics([r.val for r in runs])  # what a search should optimise (test stays unseen)
    result: dict[str, Any] = {
        "kind": kind,
        "dataset": data.name,
        "classes": data.classes,
        "n": {s: len(data.splits[s]) for s in SPLITS},
        "class_counts": {s: np.bincount(labels[s], minlength=n).tolist() for s in SPLITS},
        "image_size": image_size,
        "feature_dim": int(feats["train"].shape[1]),
        "seeds": [r.seed for r in runs],
        "deterministic": deterministic,
        "per_seed": [
            {"seed": r.seed, "selected": r.selected, "val": r.val, "test": r.test, "history": r.history} for r in runs
        ],
        "mean": mean,
        "std": std,
        "val_mean": val_mean,
        "undefined": {m: runs[0].test["undefined"][m] for m in METRICS if mean[m] is None and m in runs[0].test["undefined"]},
        "warnings": list(data.warnings),
        "probe_seconds": round(time.perf_counter() - started, 2),
    }
    if deterministic and len(seeds) > 1:
        result["warnings"].append(f"{kind} probe is deterministic given the features: ran once for seeds {list(seeds)}")
    if n_bootstrap > 0:
        result["ci95"] = bootstrap_intervals(labels["test"], [r.test_scores for r in runs], n, n_bootstrap, progress=progress)
    if return_scores:
        result["scores"] = {"y_true": labels["test"], "per_seed": [r.test_scores for r in runs]}
    return result


def knn_auroc(
    backbone: nn.Module,
    data: LabelledData,
    image_size: int,
    split: str = "val",
    k: int = 20,
    temperature: float = 0.07,
    batch_size: int = 64,
    images: dict[str, torch.Tensor] | None = None,
    progress: Progress = None,
) -> float:
    """The cheap signal between epochs: kNN macro AUROC on `split` (NaN if undefined there).

    `images` (from `decode_split` per split) avoids decoding again at every call.
    """
    feats = {}
    for s in ("train", split):
        src = images[s] if images and s in images else data.splits[s]
        feats[s] = extract_features(backbone, src, image_size, batch_size, progress=progress, label=f"knn {s}")
    scores = knn_scores(feats["train"], data.splits["train"].labels, feats[split], data.n_classes, k, temperature)
    metrics = compute_metrics(data.splits[split].labels, scores, data.n_classes)
    return float(metrics["auroc"]) if metrics["auroc"] is not None else math.nan
