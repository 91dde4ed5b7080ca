"""raydino.probe and the modules split from it: metrics against scikit-learn, the paper's sensitivity,
probes, features, cache, labelled-data checks, checkpoints, and the re-exports that keep old imports working."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from sklearn.metrics import average_precision_score, cohen_kappa_score, f1_score, roc_auc_score

from raydino import backbones, metrics, probe
from raydino.config import ConfigError, load_config
from raydino.data import labelled

COLOURS = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)]


def make_tree(root: Path, per_split=(8, 4, 4), n_classes=3, size=40, seed=0, skip=()) -> Path:
    """A tiny RETFound tree: a coloured disc on a dark background; the colour is the class."""
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "val", "test"), per_split):
        for c in range(n_classes):
            d = root / split / f"grade{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(0 if (split, c) in skip else n):
                im = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 40, 3)))
                r = size * rng.uniform(0.25, 0.4)
                cx, cy = size / 2 + rng.uniform(-3, 3, 2)
                ImageDraw.Draw(im).ellipse([cx - r, cy - r, cx + r, cy + r], fill=COLOURS[c])
                im.save(d / f"{i}.png")
    return root


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
    assert m["kappa"] == pytest.approx(cohen_kappa_score(y, pred, weights="quadratic"))
    assert m["undefined"] == {}

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


def test_random_features_interval_covers_chance():
    rng = np.random.default_rng(0)
    labels = {s: rng.integers(0, 3, n) for s, n in (("train", 150), ("val", 60), ("test", 150))}
    feats = {s: rng.normal(size=(len(y), 16)) for s, y in labels.items()}
    run = probe.fast_probe(feats, labels, 3)
    ci = metrics.bootstrap_intervals(labels["test"], [run.test_scores], 3, n_resamples=200)
    assert ci["auroc"]["low"] < 0.5 < ci["auroc"]["high"]
    assert ci["auroc"]["high"] - ci["auroc"]["low"] > 0.05  # a real interval, not a point
    assert ci["auroc"]["n_valid"] == 200


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
        f = probe.backbone_features(vit, x)
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
        torch.testing.assert_close(probe.backbone_features(cnn, x), cnn(x))
    assert probe.backbone_features(cnn, x).shape == (2, 512)


def test_features_are_cached_per_weights(tmp_path):
    data = labelled.load_labelled(make_tree(tmp_path / "tree", per_split=(3, 2, 2)))
    vit = backbones.new_backbone("vit_tiny_patch16_224", 32)
    vit.train()
    lines: list[str] = []
    first = probe.split_features(vit, data, 32, cache_dir=tmp_path / "cache", progress=lines.append)
    assert vit.training  # the caller's mode is restored
    assert not any("from cache" in s for s in lines)
    lines.clear()
    again = probe.split_features(vit, data, 32, cache_dir=tmp_path / "cache", progress=lines.append)
    assert sum("from cache" in s for s in lines) == 3
    for s in labelled.SPLITS:
        np.testing.assert_array_equal(first[s], again[s])
    with torch.no_grad():
        vit.blocks[-1].mlp.fc2.bias.add_(1.0)
    lines.clear()
    changed = probe.split_features(vit, data, 32, cache_dir=tmp_path / "cache", progress=lines.append)
    assert not any("from cache" in s for s in lines)
    assert not np.allclose(changed["test"], first["test"])


def test_cnn_with_batchnorm_features_are_cached_too(tmp_path):
    """BatchNorm's 0-d `num_batches_tracked` is part of the weights' fingerprint (it once crashed evaluate)."""
    data = labelled.load_labelled(make_tree(tmp_path / "tree", per_split=(3, 2, 2)))
    cnn = backbones.new_backbone("resnet18", 32)
    assert any(v.dim() == 0 for v in cnn.state_dict().values())
    key = probe.backbone_fingerprint(cnn)
    lines: list[str] = []
    first = probe.split_features(cnn, data, 32, cache_dir=tmp_path / "cache", progress=lines.append)
    again = probe.split_features(cnn, data, 32, cache_dir=tmp_path / "cache", progress=lines.append)
    assert sum("from cache" in s for s in lines) == 3
    np.testing.assert_array_equal(first["test"], again["test"])
    with torch.no_grad():
        cnn.bn1.num_batches_tracked.add_(1)
    assert probe.backbone_fingerprint(cnn) != key


# ---------------------------------------------------------------- probes on images


def test_probe_backbone_all_kinds_on_a_tree(tmp_path):
    data = labelled.load_labelled(make_tree(tmp_path / "tree"))
    assert data.classes == ["grade0", "grade1", "grade2"] and len(data.splits["train"]) == 24
    vit = backbones.new_backbone("vit_tiny_patch16_224", 32)
    before = torch.get_rng_state()
    results = {
        kind: probe.probe_backbone(vit, data, kind, [0, 1], image_size=32, n_bootstrap=20, epochs=2, progress=None)
        for kind in ("fast", "knn", "paper")
    }
    assert torch.equal(before, torch.get_rng_state())  # the paper probe forks the RNG
    for kind, r in results.items():
        assert r["feature_dim"] == 4 * 192
        assert 0.0 <= r["mean"]["auroc"] <= 1.0
        assert set(r["ci95"]) == set(metrics.METRICS)
        assert 0.0 <= r["val_mean"]["auroc"] <= 1.0  # the number a search optimises
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
    r = probe.probe_backbone(cnn, data, "paper", [0, 1], image_size=48, n_bootstrap=0, epochs=3, lr=1.0, progress=None)
    losses = [h["loss"] for h in r["per_seed"][0]["history"]]
    assert losses[-1] < losses[0]
    assert r["per_seed"][0]["history"] != r["per_seed"][1]["history"]


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
    from raydino.checkpoint import save_checkpoint
    from raydino.engine import build_train_state

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


# ---------------------------------------------------------------- the split modules


# Every public name raydino.probe offered before metrics, labelled data and backbone loading moved
# out of it: other modules (pretrain, tune) and users import them from raydino.probe.
PROBE_NAMES_BEFORE_SPLIT = """
    C_GRID CROP_PCT DataError FEATURE_VERSION FeatureCache IMAGE_SUFFIXES LabelledData LabelledSplit
    LoadedBackbone METRICS N_LAST_BLOCKS Progress SPLITS SeedRun backbone_features backbone_fingerprint
    bootstrap_intervals check_labelled compute_metrics decode_image decode_split decode_train_images
    eval_transform extract_features fast_probe fetch_checkpoint find_latest_checkpoint frozen knn_auroc
    knn_probe knn_scores load_labelled load_retfound_tree load_shard_data load_teacher_backbone mean_metrics
    new_backbone paper_probe parse_seeds probe_backbone resolve_device selection_auroc split_features train_crops
""".split()


def test_probe_still_offers_every_name_it_had():
    assert sorted(probe.__all__) == sorted(PROBE_NAMES_BEFORE_SPLIT)
    namespace: dict = {}
    exec("from raydino.probe import *", namespace)
    assert set(PROBE_NAMES_BEFORE_SPLIT) <= set(namespace)
    # a moved name is the very object of its new home, not a copy that could drift
    for home in (metrics, labelled, backbones):
        for name in PROBE_NAMES_BEFORE_SPLIT:
            if hasattr(home, name):
                assert getattr(probe, name) is getattr(home, name), (home.__name__, name)
    assert probe.compute_metrics is metrics.compute_metrics and probe.DataError is labelled.DataError


def test_split_modules_import_alone_and_stay_on_their_side_of_the_ray_line():
    code = (
        "import sys, raydino.metrics\n"
        "assert 'torch' not in sys.modules, 'raydino.metrics is numpy/sklearn only'\n"
        "import raydino.data.labelled, raydino.backbones, raydino.probe\n"
        "assert 'ray' not in sys.modules, 'a component imported ray'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
