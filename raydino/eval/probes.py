"""The three probes of a frozen backbone, one result format: `probe_backbone` runs one of them.

A linear classifier is trained on frozen features (`raydino.eval.features`), chosen on validation
macro AUROC and reported on test (the paper's protocol, Cheng et al., MIDL 2025):

- `fast`: scikit-learn logistic regression on standardised cached features (C chosen on val AUROC).
- `paper`: the authors' evaluation exactly (their `eval.sh` running `eval_finetune.py`, which is DINO's
  `eval_linear.py`): a linear layer trained with SGD on features of random training crops cut from
  the full-resolution images, the epoch with the best validation AUROC tested, seeds 0-4
  (`PaperProtocol` holds every number and where it comes from).
- `knn`: k = 20, T = 0.07 cosine-similarity weighted voting (DINO's `eval_knn.py`) with class scores;
  `knn_auroc` is its cheap validation AUROC between pretraining epochs.

Metrics, seed means and bootstrap intervals are `raydino.eval.metrics`; labelled sets are
`raydino.data.labelled`.  No Ray here: recipes (`evaluate`, `pretrain`, `tune`) call these functions.
"""

from __future__ import annotations

import copy
import math
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.transforms import v2

from raydino.augment.ops import normalize
from raydino.data.labelled import CROP_PCT, SPLITS, LabelledData, LabelledSplit
from raydino.eval.features import (
    FEATURE_DTYPES,
    TrainViews,
    backbone_features,
    extract_features,
    feature_precision,
    frozen,
    split_features,
    train_crops,
)
from raydino.eval.metrics import METRICS, bootstrap_intervals, compute_metrics, kappa_weighting, mean_metrics, selection_auroc
from raydino.progress import LinePrinter

C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)


@dataclass(frozen=True)
class PaperProtocol:
    """The `paper` probe's settings.  The defaults are the authors' evaluation, number by number.

    Sources: the authors' `eval.sh` (`--batch_size_per_gpu 16 --epochs 50 --seed 0..4`, one
    checkpoint), their `eval_finetune.py` (DINO's `eval_linear.py` with their training view), and
    the defaults of both: lr 0.001 (eval_finetune's `--lr` default, not set by eval.sh) scaled by
    batch / 256; SGD momentum 0.9, weight decay 0; `CosineAnnealingLR(epochs, eta_min=0)` stepped per
    epoch; `LinearClassifier` weights N(0, 0.01), bias 0; training view `RandomResizedCrop(224)` with
    torchvision's defaults (scale 0.08-1, ratio 3/4-4/3, bilinear) on the decoded full-resolution
    image and no flip; validation every epoch, the epoch with the highest validation macro AUROC is
    kept (a strictly higher AUROC replaces it: ties keep the earlier epoch) and tested.
    """

    epochs: int = 50
    lr: float = 0.001  # per 256 images (linear scaling rule)
    batch_size: int = 16
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "bilinear"  # torchvision's RandomResizedCrop default
    flip: bool = False  # DINO's eval_linear flips; the authors' eval_finetune does not
    momentum: float = 0.9
    weight_decay: float = 0.0
    init_std: float = 0.01
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)

    @property
    def sgd_lr(self) -> float:
        """The optimiser's peak learning rate: lr × batch / 256."""
        return self.lr * self.batch_size / 256

    def describe(self) -> dict[str, Any]:
        return {**{k: getattr(self, k) for k in self.__dataclass_fields__}, "sgd_lr": self.sgd_lr}


PAPER = PaperProtocol()


def default_seeds(kind: str) -> list[int]:
    """Seeds when none are given: the paper probe's five (eval.sh), one for the deterministic probes."""
    return list(PAPER.seeds) if kind == "paper" else [0]


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
    feats: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    n_classes: int,
    c_grid: Sequence[float] = C_GRID,
    ordinal: bool = False,
    row_space: bool = True,
) -> SeedRun:
    """Logistic regression on standardised features; C chosen on validation macro AUROC.

    With many more features than training images (over ROW_SPACE_RATIO times: raw pixels, 49,152
    per 128 px image), `row_space` fits in the training rows' span instead, the same classifier at a
    fraction of the cost (`_row_space_basis`)."""
    from threadpoolctl import threadpool_limits  # installed with scikit-learn

    # One BLAS thread: L-BFGS makes many small matrix products, and multi-threaded BLAS spins
    # while waiting; on a busy 2-core machine that took 56 s instead of 0.6 s (420 × 768 features).
    with threadpool_limits(limits=1, user_api="blas"):
        return _logistic_path(feats, labels, n_classes, c_grid, ordinal, row_space)


# Backbone features (768-2048 per image) on a few hundred training images cost the same either way
# (420 x 768: 0.9 vs 1.1 s) and keep the full-space fit and its figures exactly; raw pixels gain 10x.
ROW_SPACE_RATIO = 4


def _row_space_basis(x_train: np.ndarray) -> np.ndarray:
    """Orthonormal rows spanning the training rows (rank x d), from a thin SVD.

    Why this loses nothing: with an L2 penalty and an unpenalised intercept, the gradient of the
    logistic loss is a combination of training rows, so the optimal weights lie in their span
    (the representer theorem), W = A B for the basis B.  Then ||W|| = ||A||, and W x = A (B x) on
    any split: the fit on the coordinates B x is the same problem in rank (<= n) instead of d
    dimensions.  Computed from the n x n Gram matrix (one matrix product, 4-5x cheaper than a thin
    SVD of n x d); directions of a tiny eigenvalue (below 1e-10 of the largest) are dropped."""
    x = np.asarray(x_train, dtype=np.float64)
    eigval, eigvec = np.linalg.eigh(x @ x.T)  # X X^T = U diag(s^2) U^T
    keep = eigval > eigval.max(initial=0.0) * 1e-10
    return (eigvec[:, keep] / np.sqrt(eigval[keep])).T @ x  # rows: V^T = diag(1/s) U^T X


def _logistic_path(
    feats: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    n_classes: int,
    c_grid: Sequence[float],
    ordinal: bool = False,
    row_space: bool = True,
) -> SeedRun:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(feats["train"])
    x = {s: scaler.transform(feats[s]) for s in SPLITS}
    if row_space and x["train"].shape[1] > ROW_SPACE_RATIO * x["train"].shape[0]:
        basis = _row_space_basis(x["train"])
        x = {s: v @ basis.T for s, v in x.items()}
    best: tuple[float, float, Any, dict] | None = None
    history = []
    # The regularisation path from strong to weak, each fit starting at the previous solution
    # (warm start): weak regularisation alone needs several times more L-BFGS iterations.
    clf = LogisticRegression(max_iter=1000, warm_start=True)
    for c in sorted(c_grid):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            clf.set_params(C=c).fit(x["train"], labels["train"])
        val = compute_metrics(labels["val"], _class_scores(clf, x["val"], n_classes), n_classes, ordinal)
        score = selection_auroc(val)
        converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        history.append({"C": c, "val_auroc": score, "converged": converged})
        if best is None or score > best[0]:  # ties keep the stronger regularisation (earlier in the path)
            best = (score, c, copy.deepcopy(clf), val)
    assert best is not None
    _, c, clf, val = best
    test_scores = _class_scores(clf, x["test"], n_classes)
    test = compute_metrics(labels["test"], test_scores, n_classes, ordinal)
    return SeedRun(0, val, test, test_scores, {"C": c}, history)


def _class_scores(clf: Any, x: np.ndarray, n_classes: int) -> np.ndarray:
    out = np.zeros((len(x), n_classes))
    out[:, clf.classes_] = clf.predict_proba(x)
    return out


def knn_scores(train_x: np.ndarray, train_y: np.ndarray, query_x: np.ndarray, n_classes: int, k: int = 20, temperature: float = 0.07) -> np.ndarray:
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
    feats: dict[str, np.ndarray], labels: dict[str, np.ndarray], n_classes: int, k: int = 20, temperature: float = 0.07, ordinal: bool = False
) -> SeedRun:
    val = knn_scores(feats["train"], labels["train"], feats["val"], n_classes, k, temperature)
    test = knn_scores(feats["train"], labels["train"], feats["test"], n_classes, k, temperature)
    return SeedRun(
        0,
        compute_metrics(labels["val"], val, n_classes, ordinal),
        compute_metrics(labels["test"], test, n_classes, ordinal),
        test,
        {"k": min(k, len(labels["train"])), "temperature": temperature},
    )


def paper_probe(
    backbone: nn.Module,
    train_images: LabelledSplit | Sequence[str | bytes | torch.Tensor],
    feats: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    n_classes: int,
    seed: int,
    image_size: int,
    protocol: PaperProtocol = PAPER,
    *,
    feature_dtype: str = "fp32",
    ordinal: bool = False,
    num_workers: int | None = None,
    progress: LinePrinter = print,
) -> SeedRun:
    """A linear layer on frozen features of fresh random training crops each epoch (`PaperProtocol`).

    `train_images` is the training split (decoded on the fly) or its images; `feats["val"]` and
    `feats["test"]` are the centre-crop features of the other splits.  SGD (momentum 0.9, no weight
    decay) at lr × batch / 256, cosine to 0 over the epochs (stepped per epoch), no batch norm; every
    epoch is validated and the epoch with the best validation macro AUROC is reported on test.
    """
    device = next(backbone.parameters()).device
    dim = feats["val"].shape[1]
    if isinstance(train_images, LabelledSplit):
        train_images = TrainViews(train_images.items, labels["train"], _crops(image_size, protocol), train_images.ids)
    else:
        train_images = TrainViews(train_images, labels["train"], _crops(image_size, protocol))
    if num_workers is None:  # full-resolution decoding each epoch: the bottleneck in front of a GPU
        num_workers = min(8, os.cpu_count() or 1) if device.type == "cuda" else 0
    val_x = torch.as_tensor(feats["val"], dtype=torch.float32, device=device)
    test_x = torch.as_tensor(feats["test"], dtype=torch.float32, device=device)
    history: list[dict[str, float]] = []
    n_train = len(train_images)
    # fork_rng: the probe's crops and init must not move the caller's (e.g. pretraining's) RNG.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        head = nn.Linear(dim, n_classes).to(device)
        nn.init.normal_(head.weight, std=protocol.init_std)  # DINO's LinearClassifier init
        nn.init.zeros_(head.bias)
        opt = torch.optim.SGD(head.parameters(), lr=protocol.sgd_lr, momentum=protocol.momentum, weight_decay=protocol.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, protocol.epochs, eta_min=0.0)
        loader = torch.utils.data.DataLoader(
            train_images,
            batch_size=protocol.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(seed),  # its own: the order and worker seeds follow `seed`
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            pin_memory=device.type == "cuda",
        )
        best: tuple[float, int, dict, dict] | None = None
        start = time.perf_counter()
        for epoch in range(protocol.epochs):
            head.train()
            total_loss = 0.0
            lr_epoch = opt.param_groups[0]["lr"]
            for x, y in loader:
                with frozen(backbone), feature_precision(device, feature_dtype):
                    f = backbone_features(backbone, normalize(x.to(device, non_blocking=True))).float()
                loss = nn.functional.cross_entropy(head(f), y.to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total_loss += float(loss.detach()) * len(y)
            sched.step()
            head.eval()
            with torch.no_grad():
                val_scores = head(val_x).softmax(dim=1).double().cpu().numpy()
            val = compute_metrics(labels["val"], val_scores, n_classes, ordinal)
            score = selection_auroc(val)
            history.append({"epoch": epoch, "lr": lr_epoch, "loss": total_loss / n_train, "val_auroc": score})
            if best is None or score > best[0]:  # strictly higher: ties keep the earlier epoch (as the authors')
                best = (score, epoch, copy.deepcopy(head.state_dict()), val)
            if progress:
                elapsed = time.perf_counter() - start
                eta = elapsed / (epoch + 1) * (protocol.epochs - epoch - 1)
                progress(
                    f"paper probe seed {seed}: epoch {epoch + 1}/{protocol.epochs} loss {total_loss / n_train:.4f} "
                    f"val AUROC {score:.4f} ETA {eta:.0f}s"
                )
        del loader  # ends persistent workers now, not at garbage collection
    assert best is not None
    head.load_state_dict(best[2])
    with torch.no_grad():
        test_scores = head(test_x).softmax(dim=1).double().cpu().numpy()
    test = compute_metrics(labels["test"], test_scores, n_classes, ordinal)
    return SeedRun(seed, best[3], test, test_scores, {"best_epoch": best[1], "epochs": protocol.epochs}, history)


def _crops(image_size: int, protocol: PaperProtocol) -> v2.Transform:
    return train_crops(image_size, protocol.crop_scale, protocol.interpolation, protocol.flip, protocol.crop_ratio)


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
    seeds: Sequence[int] | None = None,
    *,
    image_size: int,
    batch_size: int = 64,
    crop_pct: float = CROP_PCT,
    cache_dir: str | os.PathLike | None = None,
    n_bootstrap: int = 1000,
    epochs: int = PAPER.epochs,
    lr: float = PAPER.lr,
    train_batch_size: int = PAPER.batch_size,
    train_crop_scale: tuple[float, float] = PAPER.crop_scale,
    train_interpolation: str = PAPER.interpolation,
    train_flip: bool = PAPER.flip,
    feature_dtype: str = "fp32",
    knn_k: int = 20,
    knn_temperature: float = 0.07,
    c_grid: Sequence[float] = C_GRID,
    feats: dict[str, np.ndarray] | None = None,
    ordinal: bool | None = None,
    num_workers: int | None = None,
    return_scores: bool = False,
    progress: LinePrinter = print,
) -> dict[str, Any]:
    """One probe of a frozen backbone on a labelled set: per-seed, mean, std and bootstrap intervals.

    The backbone stays on its device and in its mode.  `seeds` None: the paper probe's five (0-4,
    the authors' eval.sh), one seed for `fast` and `knn`, which are deterministic given the features
    and run once whatever `seeds` says (the JSON says so).  `batch_size` is the feature-extraction
    batch; `train_batch_size`, `epochs`, `lr` and the `train_*` view are the paper probe's (defaults:
    `PaperProtocol`).  `feats` skips extraction (then they should be of `feature_dtype`).  `ordinal`
    None takes `data.ordinal` (quadratic- or un-weighted kappa).  `ProbeConfig.probe_kwargs()` gives
    every keyword a config sets.
    """
    if kind not in ("fast", "paper", "knn"):
        raise ValueError(f"probe kind {kind!r}: allowed fast, paper, knn")
    seeds_given = seeds is not None
    seeds = list(seeds) if seeds is not None else default_seeds(kind)
    if not seeds:
        raise ValueError("seeds: at least one seed is needed (e.g. --seeds 0)")
    if feature_dtype not in FEATURE_DTYPES:
        raise ValueError(f"feature dtype {feature_dtype!r}: allowed {', '.join(FEATURE_DTYPES)}")
    ordinal = data.ordinal if ordinal is None else bool(ordinal)
    protocol = PaperProtocol(
        epochs=epochs,
        lr=lr,
        batch_size=train_batch_size,
        crop_scale=tuple(train_crop_scale),
        interpolation=train_interpolation,
        flip=train_flip,
        seeds=tuple(seeds),
    )
    if feats is None:
        feats = split_features(
            backbone, data, image_size, batch_size=batch_size, crop_pct=crop_pct, cache_dir=cache_dir, progress=progress, dtype=feature_dtype
        )
    labels = {s: data.splits[s].labels for s in SPLITS}
    n = data.n_classes
    started = time.perf_counter()
    if kind == "fast":
        runs = [fast_probe(feats, labels, n, c_grid, ordinal)]
    elif kind == "knn":
        runs = [knn_probe(feats, labels, n, knn_k, knn_temperature, ordinal)]
    else:
        opts = {"feature_dtype": feature_dtype, "ordinal": ordinal, "num_workers": num_workers, "progress": progress}
        runs = [paper_probe(backbone, data.splits["train"], feats, labels, n, s, image_size, protocol, **opts) for s in seeds]
    deterministic = kind != "paper"
    if deterministic:
        runs[0].seed = int(seeds[0])
    mean, std = mean_metrics([r.test for r in runs])
    val_mean, _ = mean_metrics([r.val for r in runs])  # what a search should optimise (test stays unseen)
    result: dict[str, Any] = {
        "kind": kind,
        "dataset": data.name,
        "classes": data.classes,
        "n": {s: len(data.splits[s]) for s in SPLITS},
        "class_counts": {s: data.class_counts(s).tolist() for s in SPLITS},
        "image_size": image_size,
        "crop_pct": crop_pct,
        "feature_dim": int(feats["train"].shape[1]),
        "feature_dtype": feature_dtype,
        "kappa_weighting": kappa_weighting(ordinal),
        "ordinal_source": data.ordinal_source if ordinal == data.ordinal else "given by the caller",
        "seeds": [r.seed for r in runs],
        "deterministic": deterministic,
        "per_seed": [{"seed": r.seed, "selected": r.selected, "val": r.val, "test": r.test, "history": r.history} for r in runs],
        "mean": mean,
        "std": std,  # population standard deviation over seeds (numpy's ddof=0)
        "val_mean": val_mean,
        # A metric can be undefined in one seed only (kappa with one predicted class): the first reason found.
        "undefined": {
            m: next((r.test["undefined"][m] for r in runs if m in r.test["undefined"]), "undefined in some seed") for m in METRICS if mean[m] is None
        },
        "warnings": list(data.warnings),
        "probe_seconds": round(time.perf_counter() - started, 2),
    }
    if kind == "paper":
        result["protocol"] = protocol.describe()
    elif kind == "fast":
        result["protocol"] = {"c_grid": list(c_grid)}
    else:
        result["protocol"] = {"k": min(knn_k, len(labels["train"])), "temperature": knn_temperature}
    if deterministic and seeds_given and len(seeds) > 1:
        result["warnings"].append(f"{kind} probe is deterministic given the features: ran once for seeds {list(seeds)}")
    if n_bootstrap > 0:
        result["ci95"] = bootstrap_intervals(labels["test"], [r.test_scores for r in runs], n, n_bootstrap, progress=progress, ordinal=ordinal)
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
    progress: LinePrinter = None,
    feature_dtype: str = "fp32",
) -> float:
    """The cheap signal between epochs: kNN macro AUROC on `split` (NaN if undefined there).

    `images` (from `decode_split` per split) avoids decoding again at every call.
    """
    feats = {}
    for s in ("train", split):
        src = images[s] if images and s in images else data.splits[s]
        feats[s] = extract_features(backbone, src, image_size, batch_size, progress=progress, label=f"knn {s}", dtype=feature_dtype)
    scores = knn_scores(feats["train"], data.splits["train"].labels, feats[split], data.n_classes, k, temperature)
    metrics = compute_metrics(data.splits[split].labels, scores, data.n_classes)
    return float(metrics["auroc"]) if metrics["auroc"] is not None else math.nan
