"""Synthetic fundus photographs (raydino.data.synth, python -m raydino.synth)."""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raydino.data import synth
from raydino.data.fundus import DEFAULT_LESIONS, FundusLabel, LesionScale, render_fundus
from raydino.data.synth import DR_CLASSES, generate_dataset, sample_labels

from helpers.recipes import run_recipe


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.jpg"))}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "ds"
    generate_dataset(str(out), 60, 64, seed=3, workers=1, preview=True, progress=False)
    return out


def test_layout_labels_and_summary(dataset):
    rows = list(csv.DictReader(open(dataset / "labels.csv")))
    assert len(rows) == 60
    for r in rows:
        split, cls, name = r["path"].split("/")
        assert split == r["split"] in ("train", "val", "test")
        assert cls == r["label"] == DR_CLASSES[int(r["dr_grade"])]
        assert (dataset / r["path"]).is_file()
        assert r["eye"] in ("left", "right")
        lo, hi = synth.CDR_RANGES[int(r["glaucoma"])]
        assert lo <= float(r["cup_disc_ratio"]) <= hi
    # Every grade in every split, even for a small set (probes need all classes everywhere).
    seen = {(r["split"], r["dr_grade"]) for r in rows}
    assert seen == {(s, str(g)) for s in ("train", "val", "test") for g in range(5)}
    summary = json.loads((dataset / "synth.json").read_text())
    assert summary["n"] == 60 and sum(summary["by_split"].values()) == 60
    with Image.open(dataset / "preview.png") as im:
        assert im.width > 5 * 64 and im.height >= 5 * 64


def test_grade_imbalance_follows_the_prior():
    labels = sample_labels(2000, seed=0)
    counts = np.bincount([lab.dr_grade for lab in labels], minlength=5) / 2000
    assert np.allclose(counts, synth.DR_PRIOR, atol=0.002)
    assert counts[0] > counts[2] > counts[1] > counts[3]  # no DR dominates, severe is rarest
    splits = np.array([lab.split for lab in labels])
    assert abs((splits == "train").mean() - 0.7) < 0.01


def test_same_seed_same_bytes_whatever_the_worker_count(tmp_path, dataset):
    again = tmp_path / "again"
    generate_dataset(str(again), 60, 64, seed=3, workers=2, progress=False)
    assert _digests(again) == _digests(dataset)
    other = tmp_path / "other"
    generate_dataset(str(other), 20, 64, seed=4, workers=1, progress=False)
    assert set(_digests(other).values()).isdisjoint(_digests(dataset).values())


def test_lesions_are_small_and_only_where_the_grade_says():
    base = FundusLabel(index=5, dr_grade=0, glaucoma=0, cup_disc_ratio=0.3, eye="right", split="train")
    healthy = render_fundus(256, base, seed=1).astype(int)
    assert np.array_equal(healthy, render_fundus(256, base, seed=1))  # deterministic
    changed = []
    for grade in (1, 3):
        diseased = render_fundus(256, replace(base, dr_grade=grade), seed=1).astype(int)
        changed.append(int((np.abs(diseased - healthy).sum(axis=2) > 30).sum()))
    assert 0 < changed[0] < 150  # mild: a few microaneurysms, a handful of pixels at 256 px
    assert changed[1] > 3 * changed[0]  # severe: many haemorrhages
    assert changed[1] < 0.15 * 256 * 256  # lesions are still small: crops can miss them


def _lesion_pixels(label: FundusLabel, lesions: LesionScale = DEFAULT_LESIONS, size: int = 128) -> int:
    healthy = render_fundus(size, replace(label, dr_grade=0), seed=1).astype(int)
    return int((np.abs(render_fundus(size, label, seed=1, lesions=lesions).astype(int) - healthy).sum(axis=2) > 30).sum())


def test_lesion_size_and_count_scale_the_lesions_and_nothing_else():
    label = FundusLabel(index=7, dr_grade=3, glaucoma=0, cup_disc_ratio=0.3, eye="right", split="train")
    assert np.array_equal(render_fundus(128, label, seed=1, lesions=LesionScale(1, 1)), render_fundus(128, label, seed=1))
    default, bigger, more = _lesion_pixels(label), _lesion_pixels(label, LesionScale(size=3)), _lesion_pixels(label, LesionScale(count=3))
    assert bigger > 3 * default and more > 1.5 * default  # area grows ~size^2, ~count
    healthy = replace(label, dr_grade=0)
    assert np.array_equal(render_fundus(128, healthy, seed=1, lesions=LesionScale(3, 3)), render_fundus(128, healthy, seed=1))
    mild = replace(label, dr_grade=1)  # a grade keeps at least one lesion of each kind it draws, however few
    assert _lesion_pixels(mild, LesionScale(count=0.01)) > 0
    for bad in (0, -1.0, float("nan"), "2"):
        with pytest.raises(ValueError, match="lesion size"):
            LesionScale(size=bad)  # type: ignore[arg-type]


def test_lesion_scale_reaches_the_files_the_summary_and_the_cache_key(tmp_path):
    s = generate_dataset(str(tmp_path / "big"), 12, 64, seed=0, workers=1, progress=False, lesions=LesionScale(2.5, 2))
    assert (s.lesion_size, s.lesion_count) == (2.5, 2)
    assert json.loads((tmp_path / "big" / "synth.json").read_text())["lesion_size"] == 2.5
    plain = synth.synthetic_shards(12, 32, seed=0, cache_root=str(tmp_path / "c"), workers=1, progress=False)
    scaled = synth.synthetic_shards(12, 32, seed=0, cache_root=str(tmp_path / "c"), workers=1, progress=False, lesions=LesionScale(3))
    assert plain != scaled and "lesions3x1" in scaled and "lesions" not in plain  # default sets keep their old key
    from raydino.data.shards import open_shards

    big_test = synth.synthetic_shards(40, 32, seed=0, cache_root=str(tmp_path / "c"), workers=1, progress=False, split_fractions=(0.3, 0.1, 0.6))
    shards = open_shards(big_test)
    assert "splits0.3-0.1-0.6" in big_test and shards.rows("test") > shards.rows("train") + shards.rows("val")
    ok = run_recipe("synth", str(tmp_path / "cli"), "--n", "6", "--size", "32", "--lesion-size", "3", "--quiet", "--workers", "1")
    assert ok.returncode == 0 and "lesions 3x size" in ok.stdout, ok.stderr
    bad = run_recipe("synth", str(tmp_path / "bad"), "--n", "6", "--lesion-count", "0")
    assert bad.returncode == 2 and "lesion count=0" in bad.stderr, bad.stderr


def test_glaucoma_cup_and_left_eye_mirror():
    base = FundusLabel(index=2, dr_grade=0, glaucoma=0, cup_disc_ratio=0.25, eye="right", split="train")
    small = render_fundus(128, base, seed=0).astype(int)
    large = render_fundus(128, replace(base, glaucoma=2, cup_disc_ratio=0.8), seed=0).astype(int)
    bright = lambda img: int((img.sum(axis=2) > small.sum(axis=2).max() * 0.9).sum())  # noqa: E731
    assert bright(large) > bright(small)  # a larger pale cup
    left = render_fundus(128, replace(base, eye="left"), seed=0)
    assert np.array_equal(left, small[:, ::-1].astype(np.uint8))
    # The disc sits on the right half for a right eye (nasal side as photographed).
    disc_col = np.unravel_index(np.argmax(small.sum(axis=2)), small.shape[:2])[1]
    assert disc_col > 64


def test_cli_writes_png_and_rejects_bad_arguments(tmp_path):
    run = lambda *a: run_recipe("synth", *a)  # noqa: E731
    ok = run(str(tmp_path / "p"), "--n", "8", "--size", "32", "--format", "png", "--task", "glaucoma", "--quiet", "--workers", "1")
    assert ok.returncode == 0, ok.stderr
    files = sorted((tmp_path / "p").rglob("*.png"))
    assert len(files) == 8 and {f.parent.name for f in files} <= set(synth.GLAUCOMA_CLASSES)
    bad = run(str(tmp_path / "q"), "--n", "0")
    assert bad.returncode == 2 and "--n 0" in bad.stderr
    bad = run(str(tmp_path / "q"), "--splits", "0.5,0.6,0.1")
    assert bad.returncode == 2 and "--splits" in bad.stderr


def test_synthetic_shards_are_built_once_and_cached(tmp_path):
    from raydino.data.shards import open_shards

    uri = synth.synthetic_shards(24, 32, seed=0, cache_root=str(tmp_path), workers=1, progress=False)
    ds = open_shards(uri)
    assert len(ds) == 24 and len(ds.manifest.shards) >= 2 and ds.manifest.dataset == "synthetic"
    stamp = (Path(uri) / "manifest.json").stat().st_mtime_ns
    assert synth.synthetic_shards(24, 32, seed=0, cache_root=str(tmp_path), workers=1, progress=False) == uri
    assert (Path(uri) / "manifest.json").stat().st_mtime_ns == stamp
    assert synth.synthetic_shards(24, 32, seed=1, cache_root=str(tmp_path), workers=1, progress=False) != uri


def test_an_interrupted_cache_build_is_started_again(tmp_path):
    """Images written, synth.json (written last) not: the state a Ctrl-C during generation leaves."""
    from raydino.data.shards import open_shards

    first = synth.synthetic_shards(12, 32, seed=2, cache_root=str(tmp_path / "a"), workers=1, progress=False)
    images = tmp_path / "b" / Path(first).parent.name / "images"
    (images / "train" / "anodr").mkdir(parents=True)
    (images / "train" / "anodr" / "half-written.jpg").write_bytes(b"\xff\xd8 cut off")
    uri = synth.synthetic_shards(12, 32, seed=2, cache_root=str(tmp_path / "b"), workers=1, progress=False)
    assert len(open_shards(uri)) == 12 and not (images / "train" / "anodr" / "half-written.jpg").exists()


def test_rerun_replaces_an_earlier_set_but_never_foreign_files(tmp_path):
    out = tmp_path / "ds"
    generate_dataset(str(out), 30, 32, seed=0, workers=1, progress=False)
    generate_dataset(str(out), 12, 32, seed=0, workers=1, progress=False)
    assert len(list(out.rglob("*.jpg"))) == 12  # no stale images from the larger set
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "patient.jpg").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="not empty"):
        generate_dataset(str(foreign), 5, 32, workers=1, progress=False)
    assert (foreign / "patient.jpg").exists()


def test_synthetic_shards_carry_the_task_asked_for_and_cache_each_apart(tmp_path):
    from raydino.data.labelled import load_labelled

    dr = synth.synthetic_shards(30, 32, seed=1, cache_root=str(tmp_path), workers=1, progress=False)
    glaucoma = synth.synthetic_shards(30, 32, seed=1, cache_root=str(tmp_path), workers=1, progress=False, task="glaucoma")
    assert dr != glaucoma
    assert load_labelled(dr, dataset="synthetic").classes == list(synth.TASKS["dr"])
    assert load_labelled(glaucoma, dataset="synthetic").classes == list(synth.TASKS["glaucoma"])
