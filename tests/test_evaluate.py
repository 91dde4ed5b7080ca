"""raydino.evaluate and raydino.analyze end to end on a tiny RETFound tree and a smoke checkpoint."""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from raydino import analyze, evaluate, export
from raydino.config import load_config
from raydino.core.checkpoint import save_checkpoint
from raydino.core.step import build_train_state

from helpers import images

# Centred discs, six training images per class unless a test asks otherwise.
make_tree = partial(images.make_tree, per_split=(6, 3, 3), jitter=0)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("run")
    state = build_train_state(load_config("smoke"), steps_per_epoch=2)
    state.step = 4
    save_checkpoint(state, root / "checkpoint_00000004")
    return root


@pytest.mark.slow  # every probe, two seeds, a random baseline: ~10 s
def test_evaluate_end_to_end_with_random_baseline(tmp_path, run_dir, capsys):
    tree = make_tree(tmp_path / "tree")
    out = tmp_path / "eval"
    args = ["--checkpoint", str(run_dir), "--data", str(tree), "--out", str(out), "--bootstrap", "30"]
    rc = evaluate.main(args + ["--probe", "all", "--seeds", "0-1", "--epochs", "2", "--baseline", "random"])
    assert rc == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["meta"]["step"] == 4 and report["meta"]["image_size"] == 32  # smoke's global crop size
    assert report["meta"]["feature_dtype"] == "fp32" and report["meta"]["kappa_weighting"] == "none"
    assert "nominal" in report["meta"]["ordinal_source"]
    expected = {"fast", "knn", "paper", "fast (random init)", "knn (random init)", "paper (random init)"}
    assert set(report["results"]) == expected
    for r in report["results"].values():
        assert 0 <= r["mean"]["auroc"] <= 1 and r["ci95"]["auroc"]["n_resamples"] == 30
        assert r["classes"] == ["grade0", "grade1", "grade2"] and r["class_counts"]["test"] == [3, 3, 3]
    assert report["results"]["paper"]["seeds"] == [0, 1]
    md = (out / "metrics.md").read_text()
    assert "| paper (random init) | 2 |" in md and "AUROC" in md and "Kappa (unweighted)" in md
    assert (out / "roc.png").read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "| fast | 1 (deterministic) |" in printed and "ETA" in printed
    # Pretrained minus random init, paired on the same test cases, for every probe.
    for kind in ("fast", "knn", "paper"):
        d = report["differences"][kind]
        gap = report["results"][kind]["mean"]["auroc"] - report["results"][f"{kind} (random init)"]["mean"]["auroc"]
        assert d["difference"] == pytest.approx(gap, abs=1e-9) and d["low"] <= d["difference"] <= d["high"]
        assert f"[raydino.evaluate] {kind} probe: test AUROC" in printed
    assert printed.count("(paired bootstrap)") == 3

    assert evaluate.main(args + ["--probe", "knn"]) == 0  # the second probe reads the cached features
    assert capsys.readouterr().out.count("from cache") == 3


def test_paper_probe_is_the_authors_protocol_whatever_the_checkpoint_saved(tmp_path, capsys):
    """No --seeds: five; lr, batch and view are the protocol's even when the checkpoint saved other values."""
    run = tmp_path / "run"
    overrides = ["probe.lr=0.1", "probe.epochs=90", "probe.train_batch_size=64", "probe.train_flip=true", "probe.knn_k=3"]
    state = build_train_state(load_config("smoke", overrides), steps_per_epoch=2)
    save_checkpoint(state, run / "checkpoint_00000001")
    tree = make_tree(tmp_path / "tree", per_split=(3, 2, 2))
    out = tmp_path / "eval"
    argv = ["--checkpoint", str(run), "--data", str(tree), "--out", str(out), "--bootstrap", "0", "--probe", "paper", "--epochs", "1"]
    assert evaluate.main(argv) == 0
    report = json.loads((out / "metrics.json").read_text())
    r = report["results"]["paper"]
    assert r["seeds"] == [0, 1, 2, 3, 4] and report["meta"]["seeds"] == {"paper": [0, 1, 2, 3, 4]}
    assert set(r["std"]) == set(r["mean"]) and r["std"]["auroc"] is not None
    proto = r["protocol"]
    assert (proto["lr"], proto["batch_size"], proto["epochs"], proto["flip"], proto["interpolation"]) == (0.001, 16, 1, False, "bilinear")
    assert proto["sgd_lr"] == pytest.approx(0.001 * 16 / 256) and list(proto["crop_scale"]) == [0.08, 1.0]
    assert report["meta"]["probe_config"]["knn_k"] == 3  # not protocol: taken from the checkpoint
    assert "Protocol: epochs 1, lr 0.001, batch_size 16" in (out / "metrics.md").read_text()


@pytest.mark.slow  # six evaluations: ~7 s
def test_kappa_weighting_and_feature_dtype_options(tmp_path, run_dir, capsys):
    tree = make_tree(tmp_path / "tree", per_split=(3, 2, 2))
    out = tmp_path / "eval"
    base = ["--checkpoint", str(run_dir), "--data", str(tree), "--out", str(out), "--bootstrap", "10", "--probe", "knn"]

    def meta_and_knn(extra):
        assert evaluate.main(base + extra) == 0, capsys.readouterr().err
        report = json.loads((out / "metrics.json").read_text())
        return report["meta"], report["results"]["knn"]

    meta, r = meta_and_knn(["--ordinal"])
    assert meta["kappa_weighting"] == r["kappa_weighting"] == "quadratic"
    assert r["per_seed"][0]["test"]["kappa_weighting"] == "quadratic"
    assert meta["ordinal_source"] == "given (--ordinal)" and r["ci95"]["kappa"]["stratified"]
    assert "Kappa (quadratic)" in (out / "metrics.md").read_text()
    # a catalog name decides by itself: Glaucoma_fundus is a severity scale (normal < early < advanced)
    meta, r = meta_and_knn(["--dataset", "Glaucoma_fundus"])
    assert r["kappa_weighting"] == "quadratic" and meta["ordinal_source"] == "catalog entry Glaucoma_fundus"
    meta, r = meta_and_knn(["--dataset", "Glaucoma_fundus", "--nominal"])
    assert r["kappa_weighting"] == "none"
    capsys.readouterr()
    # bf16 features are cached apart from fp32 ones: neither reads the other's
    meta, _ = meta_and_knn(["--feature-dtype", "bf16"])
    assert meta["feature_dtype"] == "bf16"
    assert "from cache" not in capsys.readouterr().out
    meta_and_knn(["--feature-dtype", "bf16"])
    assert capsys.readouterr().out.count("from cache") == 3
    with pytest.raises(SystemExit):
        evaluate.parse_args(base + ["--ordinal", "--nominal"])


def test_an_exported_backbone_has_the_same_features(tmp_path, run_dir, capsys):
    tree = make_tree(tmp_path / "tree", per_split=(2, 1, 1))
    file = tmp_path / "backbone.safetensors"
    export.export_backbone(str(run_dir), file, verify=False)
    base = ["--data", str(tree), "--out", str(tmp_path / "eval"), "--bootstrap", "0", "--probe", "knn"]
    assert evaluate.main(["--checkpoint", str(run_dir)] + base) == 0
    capsys.readouterr()
    assert evaluate.main(["--checkpoint", str(file)] + base) == 0  # arch and size from the sidecar
    assert capsys.readouterr().out.count("from cache") == 3  # the cache key hashes every weight


def test_undefined_metric_is_reported_not_faked(tmp_path, run_dir, capsys):
    tree = make_tree(tmp_path / "tree", skip={("test", 2)})
    out = tmp_path / "eval"
    rc = evaluate.main(["--checkpoint", str(run_dir), "--data", str(tree), "--out", str(out), "--bootstrap", "20"])
    assert rc == 0
    r = json.loads((out / "metrics.json").read_text())["results"]["fast"]
    assert r["mean"]["auroc"] is None and "[2]" in r["undefined"]["auroc"]
    assert r["mean"]["accuracy"] is not None
    assert any("grade2" in w for w in r["warnings"])
    assert r["ci95"]["auroc"]["low"] is None and "undefined" in r["ci95"]["auroc"]["reason"]
    assert "undefined metrics" in capsys.readouterr().err
    assert "n/a" in (out / "metrics.md").read_text()


def test_bad_inputs_get_clear_messages(tmp_path, run_dir, capsys):
    tree = make_tree(tmp_path / "tree", per_split=(2, 1, 1))
    base = ["--data", str(tree), "--out", str(tmp_path / "o"), "--bootstrap", "0"]
    cases = [
        (["--checkpoint", str(run_dir), "--arch", "resnet18"], "loaded as --arch resnet18"),
        (["--checkpoint", "random"], "needs --arch"),
        (["--checkpoint", str(tmp_path / "nowhere")], "no such file or directory"),
        (["--checkpoint", str(run_dir), "--seeds", "3-1"], "--seeds '3-1'"),
        (["--checkpoint", str(run_dir), "--lr", "0"], "--lr 0.0: Input should be greater than 0"),
        (["--checkpoint", str(run_dir), "--knn-temperature", "-1"], "--knn-temperature -1.0"),
        (["--checkpoint", str(run_dir), "--train-batch-size", "0"], "--train-batch-size 0: Input should be greater"),
        (["--checkpoint", str(run_dir), "--train-crop-scale", "0.9,0.1"], "--train-crop-scale"),
        (["--checkpoint", str(run_dir), "--s3-endpoint", "http://key:hunter2@127.0.0.1:9000"], "--s3-endpoint: expected http(s)://host[:port]"),
        (["--checkpoint", str(run_dir), "--gcs-endpoint", "ftp://127.0.0.1"], "--gcs-endpoint: expected http(s)://host[:port]"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--checkpoint", str(run_dir), "--device", "cuda"], "no CUDA device"))
    for extra, message in cases:
        assert evaluate.main(extra + base) == 2, extra
        err = capsys.readouterr().err
        assert message in err and "hunter2" not in err
    broken = sorted((tree / "test").rglob("*.png"))[0]
    broken.write_bytes(broken.read_bytes()[:40])  # a truncated file in the tree
    assert evaluate.main(["--checkpoint", str(run_dir)] + base) == 2
    err = capsys.readouterr().err
    assert "raydino.evaluate: error: image" in err and broken.name in err and "cannot be decoded" in err
    broken.unlink()
    (tree / "val" / "grade5").mkdir()
    assert evaluate.main(["--checkpoint", str(run_dir)] + base) == 2
    assert "class folders of val disagree with train" in capsys.readouterr().err


def test_pair_distances_and_summary():
    emb = np.array([[0.0, 0], [0, 1], [10, 0], [10, 1], [0, 10], [1, 10]])
    groups = np.array([0, 0, 1, 1, 2, 2])
    d = analyze.pair_distances(emb, groups)
    np.testing.assert_allclose(sorted(d["positive"]), [1, 1, 1])
    np.testing.assert_allclose(sorted(d["negative"]), sorted([10, 10, np.sqrt(200)]))
    s = analyze.summarize(d, emb, groups)
    assert s["p_positive_closer"] == 1.0 and s["silhouette"] > 0.8


def test_analyze_cli(tmp_path, run_dir, capsys):
    tree = make_tree(tmp_path / "tree", per_split=(2, 1, 2))
    out = tmp_path / "an"
    args = ["--checkpoint", str(run_dir), "--data", str(tree), "--preset", "strong,weak", "--views", "3", "--out", str(out)]
    assert analyze.main(args) == 0
    report = json.loads((out / "analysis.json").read_text())
    assert report["n_images"] == 6 and set(report["presets"]) == {"strong", "weak"}
    for p in report["presets"].values():
        assert p["positive"]["n"] == 6 * 3 and p["negative"]["n"] == 15
        assert -1 <= p["silhouette"] <= 1
    assert report["presets"]["weak"]["global_crop_scale"] == [0.5, 1.0]
    assert "MultiCropAugment" in report["presets"]["weak"]["augmentation"]  # the training augmentation itself
    assert (out / "distances.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert analyze.main(args[:4] + ["--preset", "medium", "--out", str(out)]) == 2
    assert "raydino.analyze: error: --preset medium: unknown; allowed: strong, weak, weak_med" in capsys.readouterr().err
    assert analyze.main(args[:4] + ["--n-images", "1", "--out", str(out)]) == 2
    assert "--n-images 1: need at least 2 images" in capsys.readouterr().err


@pytest.mark.slow
def test_checkpoint_from_s3(tmp_path, run_dir, monkeypatch, capsys):
    pytest.importorskip("moto.server")
    from raydino.data.storage import StorageOptions, s3_client

    from helpers.s3 import SECRET, loopback_bucket

    monkeypatch.setenv("RAYDINO_CACHE", str(tmp_path / "cache"))
    with loopback_bucket("ckpts") as server:  # dummy credentials in os.environ; AWS_ENDPOINT_URL restored after
        os.environ["AWS_ENDPOINT_URL"] = server.endpoint
        client = s3_client(StorageOptions())
        for f in (run_dir / "checkpoint_00000004").iterdir():
            client.put_object(Bucket="ckpts", Key=f"runs/r1/checkpoint_00000004/{f.name}", Body=f.read_bytes())
        # an older checkpoint that cannot be loaded: choosing it would fail the run below
        client.put_object(Bucket="ckpts", Key="runs/r1/checkpoint_00000002/state.pt", Body=b"not a checkpoint")
        tree = make_tree(tmp_path / "tree", per_split=(2, 1, 1))
        out = tmp_path / "eval"
        argv = ["--checkpoint", "s3://ckpts/runs/r1", "--data", str(tree), "--out", str(out), "--bootstrap", "0"]
        assert evaluate.main(argv) == 0
        meta = json.loads((out / "metrics.json").read_text())["meta"]
        assert meta["step"] == 4 and meta["checkpoint"].endswith("checkpoint_00000004")
        assert Path(meta["checkpoint"]).is_relative_to(tmp_path / "cache")
        captured = capsys.readouterr()
        assert SECRET not in captured.out + captured.err + (out / "metrics.json").read_text()

        # Without the environment variable the flag says where S3 is: evaluate and export, a fresh cache.
        del os.environ["AWS_ENDPOINT_URL"]
        monkeypatch.setenv("RAYDINO_CACHE", str(tmp_path / "cache2"))
        flagged = ["--checkpoint", "s3://ckpts/runs/r1", "--data", str(tree), "--out", str(tmp_path / "eval2"), "--bootstrap", "0"]
        assert evaluate.main([*flagged, "--s3-endpoint", server.endpoint]) == 0
        assert json.loads((tmp_path / "eval2" / "metrics.json").read_text())["meta"]["step"] == 4
        exported = tmp_path / "backbone.safetensors"
        assert export.main(["s3://ckpts/runs/r1", "--out", str(exported), "--no-verify", "--s3-endpoint", server.endpoint]) == 0
        assert exported.exists() and json.loads(exported.with_suffix(".json").read_text())["step"] == 4


def test_evaluate_warns_when_labelled_images_are_in_the_checkpoints_pretraining_data(tmp_path, capsys):
    """The checkpoint's config names its pretraining shards; two test, one val and four train images of the
    labelled set are among them: evaluate says so, with the count `python -m raydino.shard --overlap` gives."""
    import shutil

    from raydino.data.synth import generate_dataset
    from raydino.data.writer import ShardJobOptions, shard_dataset

    tree = tmp_path / "tree"  # synthetic fundus photographs: no two alike (make_tree's discs are near copies)
    generate_dataset(str(tree), 60, 64, seed=3, workers=1, progress=False)
    total = len(list(tree.glob("*/*/*.jpg")))
    labelled = tmp_path / "labelled-shards"
    shard_dataset(str(tree), str(labelled), options=ShardJobOptions(workers=1, progress=False))
    leaked = sorted(tree.glob("test/*/*.jpg"))[:2] + sorted(tree.glob("val/*/*.jpg"))[:1]
    pool = tmp_path / "pool"
    pool.mkdir()
    for i, p in enumerate(leaked + sorted(tree.glob("train/*/*.jpg"))[:4]):
        shutil.copy(p, pool / f"{i}.jpg")
    pretrain = tmp_path / "pretrain-shards"
    shard_dataset(str(pool), str(pretrain), options=ShardJobOptions(workers=1, progress=False))

    run = tmp_path / "run"
    state = build_train_state(load_config("smoke", [f"data.uri={pretrain}"]), steps_per_epoch=2)
    save_checkpoint(state, run / "checkpoint_00000000")
    args = ["--checkpoint", str(run), "--data", str(labelled), "--out", str(tmp_path / "eval"), "--probe", "fast", "--bootstrap", "0"]
    for data in (labelled, tree):  # labelled shards (stored hashes), and the RETFound folder itself (hashed here)
        args[3] = str(data)
        assert evaluate.main(args) == 0
        printed = capsys.readouterr()
        line = next((ln for ln in (printed.out + printed.err).splitlines() if "overlap the pretraining data" in ln), "")
        assert f"warning: 7 of {total} labelled images overlap the pretraining data" in line, printed.out[-2000:] + printed.err[-2000:]
        assert "test 2 (2 exact, 0 near)" in line
