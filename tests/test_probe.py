"""Frozen-backbone evaluation (raydino.eval, raydino.data.labelled): metrics against scikit-learn, the paper's
sensitivity, probes, features, cache, labelled-data checks, checkpoints, and one home per name (no re-export facades)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from sklearn.metrics import average_precision_score, cohen_kappa_score, f1_score, roc_auc_score
from torch import nn
from torchvision.transforms import v2

from raydino.config import ConfigError, ProbeConfig, load_config
from raydino.data import labelled
from raydino.eval import backbones, features, metrics
from raydino.eval import probes as probe

from helpers.images import make_tree, write_tree


def probs(rng, n, c):
    p = rng.random((n, c)) ** 3
    return p / p.sum(1, keepdims=True)


# ---------------------------------------------------------------- metrics


def test_metrics_equal_sklearn_multiclass_and_binary():
    rng = np.random.default_rng(1)
    y = np.r_[np.arange(5), rng.integers(0, 5, 195)]
    p = probs(rng, 200, 5)
    p[:20] = p[0]  # ties in the scores
    m = metrics.compute_metrics(y, p, 5)
    pred = p.argmax(1)
    assert m["auroc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"), abs=1e-12)
    assert m["aupr"] == pytest.approx(np.mean([average_precision_score(y == c, p[:, c]) for c in range(5)]), abs=1e-12)
    assert m["accuracy"] == pytest.approx((pred == y).mean())
    assert m["f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["kappa"] == pytest.approx(cohen_kappa_score(y, pred))  # nominal by default: unweighted
    assert m["kappa_weighting"] == "none"
    assert m["undefined"] == {}
    q = metrics.compute_metrics(y, p, 5, ordinal=True)
    assert q["kappa"] == pytest.approx(cohen_kappa_score(y, pred, weights="quadratic"))
    assert q["kappa_weighting"] == "quadratic"
    assert {k: v for k, v in q.items() if "kappa" not in k} == {k: v for k, v in m.items() if "kappa" not in k}

    yb = rng.integers(0, 2, 100)
    pb = probs(rng, 100, 2)
    mb = metrics.compute_metrics(yb, pb, 2)
    assert mb["auroc"] == pytest.approx(roc_auc_score(yb, pb[:, 1]), abs=1e-12)
    assert mb["sensitivity"] == pytest.approx(((pb.argmax(1) == 1) & (yb == 1)).sum() / (yb == 1).sum())


def test_sensitivity_and_specificity_follow_the_paper():
    # class 0 is never recalled; the paper's sensitivity ignores class 0, macro recall would not.
    y = np.array([0, 0, 1, 1, 2, 2, 2, 2])
    pred = np.array([1, 2, 1, 1, 2, 2, 0, 0])
    scores = np.eye(3)[pred]
    m = metrics.compute_metrics(y, scores, 3)
    assert m["per_class"]["recall"] == [0.0, 1.0, 0.5]
    assert m["sensitivity"] == pytest.approx((1.0 + 0.5) / 2)  # not (0 + 1 + 0.5) / 3
    # specificity of class 1: negatives {0,0,2,2,2,2}, one predicted 1 → 5/6; of class 2: negatives
    # {0,0,1,1}, one predicted 2 → 3/4.
    assert m["specificity"] == pytest.approx((5 / 6 + 3 / 4) / 2)


def test_undefined_metrics_are_none_with_a_reason():
    y = np.array([0, 0, 1, 1, 0, 1])  # class 2 absent from the test set
    rng = np.random.default_rng(0)
    m = metrics.compute_metrics(y, probs(rng, 6, 3), 3)
    for key in ("auroc", "aupr", "sensitivity", "f1"):
        assert m[key] is None
        assert "[2]" in m["undefined"][key]
    assert m["accuracy"] is not None and m["specificity"] is not None
    one = metrics.compute_metrics(np.zeros(5, int), probs(rng, 5, 2), 2)  # only one class at all
    assert one["auroc"] is None and "one of the two classes" in one["undefined"]["auroc"]
    with pytest.raises(ValueError, match="labels must lie"):
        metrics.compute_metrics([0, 3], probs(rng, 2, 3), 3)
    diverged = probs(rng, 6, 3)
    diverged[2, 1] = np.nan
    with pytest.raises(ValueError, match="1 non-finite scores"):
        metrics.compute_metrics(y, diverged, 3)


def test_separable_features_give_auroc_one_for_every_probe():
    rng = np.random.default_rng(0)
    labels = {s: np.repeat(np.arange(4), n) for s, n in (("train", 20), ("val", 8), ("test", 10))}
    feats = {s: np.eye(4)[y] * 5 + rng.normal(0, 0.1, (len(y), 4)) for s, y in labels.items()}
    for run in (probe.fast_probe(feats, labels, 4), probe.knn_probe(feats, labels, 4, k=5)):
        assert run.test["auroc"] == 1.0 and run.test["accuracy"] == 1.0
    ci = metrics.bootstrap_intervals(labels["test"], [run.test_scores], 4, n_resamples=50)
    assert ci["auroc"]["low"] == ci["auroc"]["high"] == 1.0


def test_kappa_is_quadratic_only_for_ordinal_tasks():
    # grade 0 mistaken for grade 4 costs more than for grade 1 under quadratic weights, not without them
    y = np.array([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    near, far = y.copy(), y.copy()
    near[0], far[0] = 1, 4
    k = {
        (name, o): metrics.compute_metrics(y, np.eye(5)[pred], 5, ordinal=o)["kappa"]
        for name, pred in (("near", near), ("far", far))
        for o in (False, True)
    }
    assert k[("near", False)] == pytest.approx(k[("far", False)])
    assert k[("near", True)] > k[("far", True)]
    # which tasks are ordinal: the catalog, RETFound folder names, or the caller; else nominal
    assert labelled.resolve_ordinal(["a", "b"], "MESSIDOR-2") == (True, "catalog entry MESSIDOR-2")
    assert labelled.resolve_ordinal(["a", "b", "c"], "Glaucoma_fundus")[0] is True
    assert labelled.resolve_ordinal(["a", "b", "c", "d"], "Retina")[0] is False
    assert labelled.resolve_ordinal(["a", "b"], "JSIEC")[0] is False
    from raydino.data.synth import DR_CLASSES, GLAUCOMA_CLASSES

    for synthetic in (DR_CLASSES, GLAUCOMA_CLASSES):  # the synthetic tasks use RETFound's folder names
        ordinal, why = labelled.resolve_ordinal(list(synthetic), "synthetic")
        assert ordinal and "class folders are those of catalog entry" in why
    assert labelled.resolve_ordinal(["cat", "dog"], "mine") == (False, "no catalog entry: nominal unless --ordinal is given")
    assert labelled.resolve_ordinal(["cat", "dog"], None, ordinal=True) == (True, "given (--ordinal)")
    assert labelled.resolve_ordinal(list(DR_CLASSES), "APTOS-2019", ordinal=False)[0] is False


def test_bootstrap_is_stratified_by_class():
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(60, int), np.ones(38, int), np.full(2, 2)]  # a class of two test cases
    idx = metrics.stratified_resample(y, rng)
    assert np.array_equal(np.bincount(y[idx], minlength=3), [60, 38, 2])
    assert len(set(idx.tolist())) < len(y)  # drawn with replacement
    scores = probs(rng, 100, 3)
    strat = metrics.bootstrap_intervals(y, [scores], 3, n_resamples=100)
    plain = metrics.bootstrap_intervals(y, [scores], 3, n_resamples=100, stratified=False)
    assert strat["auroc"]["stratified"] and strat["auroc"]["n_valid"] == 100  # the small class is always there
    assert plain["auroc"]["n_valid"] < 100  # (98/100)^100: about one resample in eight lacks it
    assert strat["kappa"]["low"] is not None


def test_random_features_interval_covers_chance():
    rng = np.random.default_rng(0)
    labels = {s: rng.integers(0, 3, n) for s, n in (("train", 150), ("val", 60), ("test", 150))}
    feats = {s: rng.normal(size=(len(y), 16)) for s, y in labels.items()}
    run = probe.fast_probe(feats, labels, 3)
    ci = metrics.bootstrap_intervals(labels["test"], [run.test_scores], 3, n_resamples=200)
    assert ci["auroc"]["low"] < 0.5 < ci["auroc"]["high"]
    assert ci["auroc"]["high"] - ci["auroc"]["low"] > 0.05  # a real interval, not a point
    assert ci["auroc"]["n_valid"] == 200


def test_fast_probe_in_the_training_rows_span_is_the_same_classifier():
    """More features than training images (raw pixels): fitting on the row-space coordinates gives the
    full fit's validation path, chosen C and test scores (the representer theorem), not an approximation."""
    rng = np.random.default_rng(1)
    labels = {s: rng.integers(0, 3, n) for s, n in (("train", 40), ("val", 30), ("test", 30))}
    signal = rng.normal(size=(3, 300))
    feats = {s: signal[y] * 0.12 + rng.normal(size=(len(y), 300)) for s, y in labels.items()}
    feats["train"][:, 7] = 2.0  # a constant column: standardised to zero, no direction of its own
    full = probe.fast_probe(feats, labels, 3, row_space=False)
    span = probe.fast_probe(feats, labels, 3)
    assert span.selected == full.selected
    assert [h["val_auroc"] for h in span.history] == pytest.approx([h["val_auroc"] for h in full.history], abs=1e-3)
    assert span.selected["C"] != min(probe.C_GRID)  # a path that chose, not the first C by default
    assert np.abs(span.test_scores - full.test_scores).max() < 1e-3
    assert span.test["auroc"] > 0.7  # a classifier that learned the signal, not two equal chance ones
    basis = probe._row_space_basis(np.vstack([np.eye(3, 5), np.eye(3, 5)]))  # rank 3 from 6 rows
    assert basis.shape == (3, 5) and np.allclose(basis @ basis.T, np.eye(3))


def test_knn_scores_are_weighted_votes():
    train = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]])
    ytr = np.array([0, 1, 1])
    q = np.array([[1.0, 0.05]])
    s = probe.knn_scores(train, ytr, q, 2, k=2, temperature=0.5)
    sims = (train / np.linalg.norm(train, axis=1, keepdims=True)) @ (q[0] / np.linalg.norm(q[0]))
    top = np.argsort(-sims)[:2]  # the two nearest: rows 0 and 2
    w = np.exp(sims[top] / 0.5)
    expected = np.array([w[ytr[top] == 0].sum(), w[ytr[top] == 1].sum()]) / w.sum()
    np.testing.assert_allclose(s[0], expected, rtol=1e-6)


def test_parse_seeds():
    assert probe.parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert probe.parse_seeds("0-2,7,1") == [0, 1, 2, 7]
    for bad in ("4-1", "a", ""):
        with pytest.raises(ValueError, match="--seeds"):
            probe.parse_seeds(bad)


# ---------------------------------------------------------------- features


def test_vit_features_are_the_normed_cls_of_the_last_four_blocks():
    torch.manual_seed(0)
    vit = backbones.new_backbone("vit_tiny_patch16_224", 32).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        f = features.backbone_features(vit, x)
        h = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
        cls = []
        for i, blk in enumerate(vit.blocks):
            h = blk(h)
            if i >= len(vit.blocks) - 4:
                cls.append(vit.norm(h)[:, 0])
        pooled = vit(x)
    assert f.shape == (2, 4 * 192)
    torch.testing.assert_close(f, torch.cat(cls, dim=1))
    torch.testing.assert_close(f[:, -192:], pooled)  # the last block's part is the usual [CLS] feature


def test_cnn_features_are_the_global_pool():
    cnn = backbones.new_backbone("resnet18").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(features.backbone_features(cnn, x), cnn(x))
    assert features.backbone_features(cnn, x).shape == (2, 512)


def test_the_eval_view_is_resize_then_centre_crop():
    img = torch.randint(0, 256, (3, 150, 200), dtype=torch.uint8)
    for size, short in ((64, 73), (224, 256)):  # 224 / 0.875 = 256; 64 / 0.875 = 73.1
        resized = v2.functional.resize(img, [short], interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
        assert resized.shape[-2] == short
        expected = v2.functional.center_crop(resized, [size, size])
        assert torch.equal(labelled.eval_transform(size)(img), expected)


def test_feature_cache_key_holds_device_and_dtype(tmp_path):
    data = labelled.load_labelled(make_tree(tmp_path / "tree", per_split=(2, 1, 1)))
    keys = {
        (d, t): features.FeatureCache.key("fp", data, 32, 0.875, device_type=d, dtype=t) for d in ("cpu", "cuda") for t in features.FEATURE_DTYPES
    }
    assert len(set(keys.values())) == 4
    vit = backbones.new_backbone("vit_tiny_patch16_224", 32)
    lines: list[str] = []
    fp32 = features.split_features(vit, data, 32, cache_dir=tmp_path / "cache", progress=lines.append)
    bf16 = features.split_features(vit, data, 32, cache_dir=tmp_path / "cache", progress=lines.append, dtype="bf16")
    assert not any("from cache" in s for s in lines)  # bf16 never reads the fp32 features
    assert fp32["test"].dtype == bf16["test"].dtype == np.float32
    assert not np.array_equal(fp32["test"], bf16["test"])
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_features_are_cached_per_weights(tmp_path):
    data = labelled.load_labelled(make_tree(tmp_path / "tree", per_split=(3, 2, 2)))
    vit = backbones.new_backbone("vit_tiny_patch16_224", 32)
    vit.train()
    lines: list[str] = []
    first = features.split_features(vit, data, 32, cache_dir=tmp_path / "cache", progress=lines.append)
    assert vit.training  # the caller's mode is restored
    assert not any("from cache" in s for s in lines)
    lines.clear()
    again = features.split_features(vit, data, 32, cache_dir=tmp_path / "cache", progress=lines.append)
    assert sum("from cache" in s for s in lines) == 3
    for s in labelled.SPLITS:
        np.testing.assert_array_equal(first[s], again[s])
    with torch.no_grad():
        vit.blocks[-1].mlp.fc2.bias.add_(1.0)
    lines.clear()
    changed = features.split_features(vit, data, 32, cache_dir=tmp_path / "cache", progress=lines.append)
    assert not any("from cache" in s for s in lines)
    assert not np.allclose(changed["test"], first["test"])


def test_cnn_with_batchnorm_features_are_cached_too(tmp_path):
    """BatchNorm's 0-d `num_batches_tracked` is part of the weights' fingerprint (it once crashed evaluate)."""
    data = labelled.load_labelled(make_tree(tmp_path / "tree", per_split=(3, 2, 2)))
    cnn = backbones.new_backbone("resnet18", 32)
    assert any(v.dim() == 0 for v in cnn.state_dict().values())
    key = features.backbone_fingerprint(cnn)
    lines: list[str] = []
    first = features.split_features(cnn, data, 32, cache_dir=tmp_path / "cache", progress=lines.append)
    again = features.split_features(cnn, data, 32, cache_dir=tmp_path / "cache", progress=lines.append)
    assert sum("from cache" in s for s in lines) == 3
    np.testing.assert_array_equal(first["test"], again["test"])
    with torch.no_grad():
        cnn.bn1.num_batches_tracked.add_(1)
    assert features.backbone_fingerprint(cnn) != key


# ---------------------------------------------------------------- probes on images


def test_probe_backbone_all_kinds_on_a_tree(tmp_path):
    data = labelled.load_labelled(make_tree(tmp_path / "tree"))
    assert data.classes == ["grade0", "grade1", "grade2"] and len(data.splits["train"]) == 24
    assert not data.ordinal  # a set the catalog does not know is nominal
    vit = backbones.new_backbone("vit_tiny_patch16_224", 32)
    before = torch.get_rng_state()
    results = {
        kind: probe.probe_backbone(vit, data, kind, [0, 1], image_size=32, n_bootstrap=20, epochs=2, progress=None)
        for kind in ("fast", "knn", "paper")
    }
    assert torch.equal(before, torch.get_rng_state())  # the paper probe forks the RNG
    for r in results.values():
        assert r["feature_dim"] == 4 * 192
        assert 0.0 <= r["mean"]["auroc"] <= 1.0
        assert set(r["ci95"]) == set(metrics.METRICS)
        assert 0.0 <= r["val_mean"]["auroc"] <= 1.0  # the number a search optimises
        assert r["kappa_weighting"] == "none" and r["feature_dtype"] == "fp32"
    assert results["fast"]["deterministic"] and len(results["fast"]["per_seed"]) == 1
    paper = results["paper"]
    assert paper["seeds"] == [0, 1] and not paper["deterministic"]
    for run in paper["per_seed"]:
        hist = run["history"]
        assert len(hist) == 2
        best = max(range(2), key=lambda e: (hist[e]["val_auroc"], -e))
        assert run["selected"]["best_epoch"] == best
    # coloured discs are separable even for a random ViT: the kNN signal sees it
    assert probe.knn_auroc(vit, data, 32) > 0.9


def test_paper_probe_learns_and_seeds_differ(tmp_path):
    data = labelled.load_labelled(make_tree(tmp_path / "tree", per_split=(6, 3, 3)))
    cnn = backbones.new_backbone("resnet18")
    r = probe.probe_backbone(cnn, data, "paper", [0, 1], image_size=48, n_bootstrap=0, epochs=3, lr=1.0, train_batch_size=64, progress=None)
    losses = [h["loss"] for h in r["per_seed"][0]["history"]]
    assert losses[-1] < losses[0]
    assert r["per_seed"][0]["history"] != r["per_seed"][1]["history"]


# ---------------------------------------------------------------- the paper probe is the authors' protocol


def test_paper_probe_defaults_are_the_authors_protocol():
    # eval.sh: --batch_size_per_gpu 16 --epochs 50 --seed 0..4; eval_finetune.py: --lr 0.001 (per 256),
    # SGD momentum 0.9, weight_decay 0, N(0, 0.01) init, RandomResizedCrop(224) defaults, no flip.
    proto = probe.PAPER
    assert (proto.epochs, proto.lr, proto.batch_size, proto.momentum, proto.weight_decay, proto.init_std) == (50, 0.001, 16, 0.9, 0.0, 0.01)
    assert proto.sgd_lr == pytest.approx(0.001 * 16 / 256)
    assert (proto.crop_scale, proto.interpolation, proto.flip) == ((0.08, 1.0), "bilinear", False)
    assert proto.crop_ratio == pytest.approx((3 / 4, 4 / 3))
    assert proto.seeds == (0, 1, 2, 3, 4) and probe.default_seeds("paper") == [0, 1, 2, 3, 4]
    assert probe.default_seeds("fast") == probe.default_seeds("knn") == [0]
    cfg = ProbeConfig()
    assert (cfg.epochs, cfg.lr, cfg.train_batch_size, cfg.train_crop_scale, cfg.train_interpolation, cfg.train_flip) == (
        proto.epochs,
        proto.lr,
        proto.batch_size,
        proto.crop_scale,
        proto.interpolation,
        proto.flip,
    )
    assert cfg.seeds is None and cfg.feature_dtype == "fp32" and cfg.batch_size == 64  # extraction batch apart
    import inspect

    defaults = {k: v.default for k, v in inspect.signature(probe.probe_backbone).parameters.items()}
    assert {k: defaults[k] for k in cfg.probe_kwargs()} == cfg.probe_kwargs()
    crop = features.train_crops(224, proto.crop_scale, proto.interpolation, proto.flip, proto.crop_ratio)
    steps = crop.transforms
    assert len(steps) == 1 and isinstance(steps[0], v2.RandomResizedCrop)  # no flip
    assert steps[0].interpolation == v2.InterpolationMode.BILINEAR and tuple(steps[0].scale) == (0.08, 1.0)
    assert steps[0].size == [224, 224] or tuple(steps[0].size) == (224, 224)
    with pytest.raises(ConfigError, match="probe.train_crop_scale"):
        load_config("smoke", ["probe.train_crop_scale=[0.5,0.1]"])


class Recorder(nn.Module):
    """A stand-in backbone: features are the mean of each channel; every input batch is kept."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))  # a parameter tells the probe the device
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return x.mean(dim=(2, 3))


def _unnormalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    return (x * std + mean) * 255


def _big_images(root: Path, draw, n: int = 3, size: int = 512) -> labelled.LabelledData:
    write_tree(root, {split: {f"class{c}": n for c in range(2)} for split in labelled.SPLITS}, lambda *_: draw(size))
    return labelled.load_labelled(root)


def _paper_with_recorder(data, image_size: int, **protocol) -> Recorder:
    rec = Recorder()
    labels = {s: data.splits[s].labels for s in labelled.SPLITS}
    feats = {s: np.zeros((len(data.splits[s]), 3), np.float32) for s in ("val", "test")}
    probe.paper_probe(rec, data.splits["train"], feats, labels, 2, 0, image_size, probe.PaperProtocol(epochs=2, **protocol), progress=None)
    return rec


def test_training_crops_come_from_the_full_resolution_image(tmp_path):
    def halves(size: int) -> Image.Image:  # red left half, blue right half
        im = Image.new("RGB", (size, size), (0, 0, 255))
        ImageDraw.Draw(im).rectangle([0, 0, size // 2 - 1, size - 1], fill=(255, 0, 0))
        return im

    data = _big_images(tmp_path / "halves", halves)
    # scale 1.0 on a square image: each crop is the whole image (both halves), never mirrored (no flip)
    crops = _unnormalize(torch.cat(_paper_with_recorder(data, 32, crop_scale=(1.0, 1.0)).seen))
    assert len(crops) == 2 * 6 and crops.shape[-1] == 32
    red_left = crops[:, 0, :, :14].mean(dim=(1, 2)) - crops[:, 2, :, :14].mean(dim=(1, 2))
    blue_right = crops[:, 2, :, 18:].mean(dim=(1, 2)) - crops[:, 0, :, 18:].mean(dim=(1, 2))
    assert (red_left > 200).all() and (blue_right > 200).all()
    # a small crop keeps the detail of the photograph: a 4-px checkerboard cut at ~64 px of 512 and
    # resized to 32 is still a checkerboard; cut from a 37-px resize (what the probe once did) it is grey

    def checker(size: int) -> Image.Image:
        cells = (np.indices((size, size)) // 4).sum(axis=0) % 2
        return Image.fromarray(np.repeat((cells * 255).astype(np.uint8)[..., None], 3, axis=2))

    data = _big_images(tmp_path / "checker", checker)
    crops = _unnormalize(torch.cat(_paper_with_recorder(data, 32, crop_scale=(1 / 64, 1 / 64)).seen))
    assert crops.std(dim=(1, 2, 3)).min() > 60  # a grey crop would be ~0


def test_paper_probe_optimiser_and_schedule(tmp_path, monkeypatch):
    data = labelled.load_labelled(make_tree(tmp_path / "tree", per_split=(6, 2, 2), n_classes=2))
    made: list[dict] = []
    sgd = torch.optim.SGD

    def spy(params, **kw):
        made.append(kw)
        return sgd(params, **kw)

    monkeypatch.setattr(torch.optim, "SGD", spy)
    r = probe.probe_backbone(Recorder(), data, "paper", [3], image_size=32, n_bootstrap=0, epochs=4, progress=None)
    assert made == [{"lr": 0.001 * 16 / 256, "momentum": 0.9, "weight_decay": 0.0}]
    lrs = [h["lr"] for h in r["per_seed"][0]["history"]]
    base = 0.001 * 16 / 256
    assert lrs == pytest.approx([base * (1 + np.cos(np.pi * e / 4)) / 2 for e in range(4)])  # cosine to 0, per epoch
    assert r["protocol"]["sgd_lr"] == pytest.approx(base) and r["protocol"]["batch_size"] == 16
    assert r["protocol"]["seeds"] == (3,)  # the seeds this run used


def test_the_best_validation_epoch_is_the_one_tested(tmp_path, monkeypatch):
    """Test = val here, so the test scores must be the best epoch's val scores, not the last epoch's."""
    data = labelled.load_labelled(make_tree(tmp_path / "tree", per_split=(8, 4, 4), n_classes=2))
    rec = Recorder()
    feats = features.split_features(rec, data, 32, progress=None)
    feats["test"] = feats["val"]
    labels = {s: data.splits[s].labels for s in labelled.SPLITS}
    labels["test"] = labels["val"]
    scored: list[np.ndarray] = []
    real = metrics.compute_metrics

    def spy(y, scores, n, ordinal=False):
        scored.append(np.array(scores))
        return real(y, scores, n, ordinal)

    monkeypatch.setattr(probe, "compute_metrics", spy)
    run = probe.paper_probe(rec, data.splits["train"], feats, labels, 2, 0, 32, probe.PaperProtocol(epochs=4, lr=16.0), progress=None)
    val_auroc = [h["val_auroc"] for h in run.history]
    best = run.selected["best_epoch"]
    assert best == int(np.argmax(val_auroc))  # the first of equal maxima: a later tie does not replace it
    assert val_auroc[0] == 1.0 and best == 0  # separable from epoch 0 on: ties keep epoch 0
    assert len(scored) == 4 + 1
    np.testing.assert_array_equal(run.test_scores, scored[best])
    assert not np.allclose(run.test_scores, scored[3])  # the head went on changing after the best epoch
    assert run.val["auroc"] == val_auroc[best] == run.test["auroc"]


def test_five_seeds_on_one_checkpoint_give_mean_and_std(tmp_path):
    data = labelled.load_labelled(make_tree(tmp_path / "tree", per_split=(4, 2, 2)))
    vit = backbones.new_backbone("vit_tiny_patch16_224", 32)
    r = probe.probe_backbone(vit, data, "paper", image_size=32, n_bootstrap=0, epochs=1, progress=None)
    assert r["seeds"] == [0, 1, 2, 3, 4] and len(r["per_seed"]) == 5  # no seeds given: eval.sh's five
    for m in ("auroc", "aupr", "accuracy"):
        vals = [s["test"][m] for s in r["per_seed"]]
        assert r["mean"][m] == pytest.approx(np.mean(vals)) and r["std"][m] == pytest.approx(np.std(vals))
    assert r["std"]["auroc"] > 0  # the seeds differ (init, crops, order)
    assert not any("deterministic" in w for w in r["warnings"])
    fast = probe.probe_backbone(vit, data, "fast", image_size=32, n_bootstrap=0, progress=None)
    assert fast["seeds"] == [0] and not any("deterministic" in w for w in fast["warnings"])


# ---------------------------------------------------------------- bad data


def test_classes_that_disagree_between_splits(tmp_path):
    root = make_tree(tmp_path / "tree", per_split=(2, 1, 1))
    (root / "test" / "grade9").mkdir()
    with pytest.raises(labelled.DataError, match=r"test disagree with train.*not in train: \['grade9'\]"):
        labelled.load_labelled(root)


def test_a_class_without_training_examples(tmp_path):
    root = make_tree(tmp_path / "tree", per_split=(2, 1, 1), skip={("train", 1)})
    with pytest.raises(labelled.DataError, match=r"\['grade1'\] have no examples in the train split"):
        labelled.load_labelled(root)


def test_a_class_without_test_examples_warns(tmp_path):
    data = labelled.load_labelled(make_tree(tmp_path / "tree", per_split=(2, 1, 1), skip={("test", 2)}))
    assert any("['grade2'] have no examples in the test split" in w for w in data.warnings)


def test_not_a_dataset(tmp_path):
    with pytest.raises(labelled.DataError, match="neither a RETFound-layout tree"):
        labelled.load_labelled(tmp_path)


def test_labelled_shards_read_like_the_tree(tmp_path):
    writer = pytest.importorskip("raydino.data.writer")
    root = make_tree(tmp_path / "tree", per_split=(2, 1, 1))
    writer.shard_dataset(str(root), str(tmp_path / "shards"), options=writer.ShardJobOptions(workers=1, progress=False))
    tree, shards = labelled.load_labelled(root), labelled.load_labelled(tmp_path / "shards")
    assert shards.classes == tree.classes
    for s in labelled.SPLITS:
        assert sorted(zip(shards.splits[s].ids, shards.splits[s].labels)) == sorted(zip(tree.splits[s].ids, tree.splits[s].labels))

    bad = make_tree(tmp_path / "bad", per_split=(2, 1, 1))
    extra = bad / "test" / "grade7"
    extra.mkdir()
    Image.new("RGB", (40, 40)).save(extra / "x.png")
    writer.shard_dataset(str(bad), str(tmp_path / "bad_shards"), options=writer.ShardJobOptions(workers=1, progress=False))
    with pytest.raises(labelled.DataError, match=r"\['grade7'\] appear in test but never in train"):
        labelled.load_labelled(tmp_path / "bad_shards")


# ---------------------------------------------------------------- checkpoints


def _save_ckpt(directory: Path, step: int, overrides=()):
    from raydino.core.checkpoint import save_checkpoint
    from raydino.core.step import build_train_state

    state = build_train_state(load_config("smoke", list(overrides)), steps_per_epoch=2)
    state.step = step
    return save_checkpoint(state, directory)


def test_latest_checkpoint_is_the_highest_step(tmp_path):
    _save_ckpt(tmp_path / "run" / "checkpoint_b", step=3)
    _save_ckpt(tmp_path / "run" / "checkpoint_a", step=9)
    assert backbones.find_latest_checkpoint(tmp_path / "run").name == "checkpoint_a"
    assert backbones.find_latest_checkpoint(tmp_path / "run" / "checkpoint_b" / "state.pt").name == "checkpoint_b"
    loaded = backbones.load_teacher_backbone(tmp_path / "run")
    assert (loaded.arch, loaded.step, loaded.image_size) == ("vit_tiny_patch16_224", 9, 32)
    with pytest.raises(FileNotFoundError, match="no checkpoint inside"):
        backbones.find_latest_checkpoint(tmp_path)


def test_checkpoint_of_another_architecture(tmp_path):
    ckpt = _save_ckpt(tmp_path / "ckpt", step=1)
    with pytest.raises(ConfigError, match=r"trained as model.arch=vit_tiny_patch16_224\) loaded as --arch resnet18.*missing keys"):
        backbones.load_teacher_backbone(ckpt, arch="resnet18")
    with pytest.raises(ConfigError, match="unknown timm backbone"):
        backbones.load_teacher_backbone("random", arch="vit_tinyy_patch16_224")


# ---------------------------------------------------------------- one home per name


RAYDINO = Path(__file__).resolve().parents[1] / "raydino"

# Where each name that raydino.eval.probes once re-exported is defined now; importers use these homes.
HOMES = {
    "eval/features.py": "FEATURE_DTYPES FEATURE_VERSION FeatureCache N_LAST_BLOCKS TrainViews backbone_features "
    "backbone_fingerprint decode_train_images extract_features feature_precision frozen split_features train_crops",
    "eval/probes.py": "C_GRID PAPER PaperProtocol SeedRun default_seeds fast_probe knn_auroc knn_probe knn_scores paper_probe "
    "parse_seeds probe_backbone",
    "eval/metrics.py": "METRICS bootstrap_intervals compute_metrics mean_metrics selection_auroc",
    "data/labelled.py": "CROP_PCT DataError IMAGE_SUFFIXES LabelledData LabelledSplit SPLITS check_labelled decode_image "
    "decode_split eval_transform load_labelled load_retfound_tree load_shard_data",
    "eval/backbones.py": "LoadedBackbone fetch_checkpoint find_latest_checkpoint load_teacher_backbone new_backbone resolve_device",
}


def _module_level(path: Path) -> tuple[set[str], list[str], set[str]]:
    """(names a module defines at top level, modules it star-imports, names its `__all__` lists)."""
    import ast

    defined: set[str] = set()
    stars: list[str] = []
    exported: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = {t.id for t in targets if isinstance(t, ast.Name)}
            defined |= names - {"__all__"}
            if "__all__" in names and node.value is not None:
                exported |= {e.value for e in getattr(node.value, "elts", []) if isinstance(e, ast.Constant)}
        elif isinstance(node, ast.ImportFrom) and any(a.name == "*" for a in node.names):
            stars.append(node.module or ".")
    return defined, stars, exported


@pytest.mark.parametrize("path", sorted(RAYDINO.rglob("*.py")), ids=lambda p: str(p.relative_to(RAYDINO)))
def test_no_module_re_exports_another_modules_names(path):
    # A facade (an `__all__` naming imported names, a lazy `__getattr__` serving them, a star import)
    # gives a name two homes; importers must use the module that defines it.
    defined, stars, exported = _module_level(path)
    assert not stars, f"{path.name}: `from {stars[0]} import *` re-exports another module's names"
    assert exported <= defined, f"{path.name}: __all__ lists {sorted(exported - defined)}, which are defined elsewhere: import them from there"


def test_the_names_probes_once_re_exported_are_defined_in_their_homes():
    for home, names in HOMES.items():
        defined, _, _ = _module_level(RAYDINO / home)
        assert set(names.split()) <= defined, (home, sorted(set(names.split()) - defined))


def test_every_import_of_a_raydino_name_names_the_module_that_defines_it():
    import ast

    repo = RAYDINO.parent
    wrong = []
    for path in sorted([*RAYDINO.rglob("*.py"), *(repo / "tests").rglob("*.py"), *(repo / "tools").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "raydino"):
                continue
            base = repo / node.module.replace(".", "/")
            source = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
            defined, _, _ = _module_level(source)
            for alias in node.names:
                submodule = (base / alias.name).is_dir() or (base / f"{alias.name}.py").is_file()
                if not submodule and alias.name not in defined:
                    wrong.append(f"{path.relative_to(repo)}:{node.lineno} from {node.module} import {alias.name}")
    assert not wrong, "imported from a module that does not define them:\n" + "\n".join(wrong)


def test_split_modules_import_alone_and_stay_on_their_side_of_the_ray_line():
    code = (
        "import sys, raydino.eval.metrics\n"
        "assert 'torch' not in sys.modules, 'raydino.eval.metrics is numpy/sklearn only'\n"
        "import raydino.data.labelled, raydino.eval.backbones, raydino.eval.features, raydino.eval.probes\n"
        "assert 'ray' not in sys.modules, 'a component imported ray'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
