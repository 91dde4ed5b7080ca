"""Sharding to a local folder and reading back (raydino.data.writer / shards, python -m raydino.shard)."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raydino.data.shards import ShardError, open_shards
from raydino.data.synth import generate_dataset
from raydino.data.writer import NothingReadableError, ShardingError, ShardJobOptions, shard_dataset

from helpers.images import jpeg_bytes
from helpers.recipes import run_recipe

SECRET = "PATIENT Jane Roe ID 4711"
N_IMAGES = 40


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A RETFound-layout synthetic tree with bad files mixed in."""
    root = tmp_path_factory.mktemp("src") / "tree"
    generate_dataset(str(root), N_IMAGES, 48, seed=11, workers=1, progress=False)
    some_jpeg = next(root.glob("train/anodr/*.jpg")).read_bytes()
    (root / "train/anodr/empty.jpg").write_bytes(b"")
    (root / "train/anodr/truncated.jpg").write_bytes(some_jpeg[: len(some_jpeg) // 2])
    (root / "train/bmilddr/notes.jpg").write_text("not a photograph")
    os.symlink(root / "does-not-exist.jpg", root / "val/anodr/broken-link.jpg")
    (root / "train/.DS_Store").write_bytes(b"\0\0\0\1Bud1")
    return root


@pytest.fixture(scope="module")
def sharded(source, tmp_path_factory) -> tuple[Path, object]:
    dest = tmp_path_factory.mktemp("dest") / "shards"
    summary = shard_dataset(str(source), str(dest), options=ShardJobOptions(target_shard_mb=0.03, workers=2, progress=False))
    return dest, summary


def _expected(source: Path) -> dict[str, tuple[bytes, str, str]]:
    rows = csv.DictReader(open(source / "labels.csv"))
    return {r["path"]: ((source / r["path"]).read_bytes(), r["label"], r["split"]) for r in rows}


def test_round_trip_bytes_labels_splits(source, sharded):
    dest, summary = sharded
    assert summary.shards > 2 and summary.rows == N_IMAGES
    ds = open_shards(str(dest))
    got = {r["id"]: r for r in ds.iter_rows()}
    expected = _expected(source)
    assert set(got) == set(expected)  # nothing missing, nothing extra, no duplicates
    for rid, (data, label, split) in expected.items():
        row = got[rid]
        assert row["image"] == data  # synthetic JPEGs carry no metadata: bytes are identical
        assert (row["label"], row["split"], row["format"]) == (label, split, "jpeg")
        assert (row["height"], row["width"]) == Image.open(io.BytesIO(data)).size[::-1]
    assert ds.verify(deep=True) == {"shards": summary.shards, "rows": N_IMAGES}
    m = ds.manifest
    assert m.totals.by_split == {s: sum(1 for v in expected.values() if v[2] == s) for s in ("train", "val", "test")}
    assert sum(m.totals.by_label.values()) == N_IMAGES and m.source_kind == "retfound"


def test_bad_files_are_listed_with_reasons_not_dropped(sharded):
    dest, summary = sharded
    rejects = {r["path"]: r for r in csv.DictReader(open(dest / "rejects.csv"))}
    assert "empty" in rejects["train/anodr/empty.jpg"]["reason"]
    assert "truncated" in rejects["train/anodr/truncated.jpg"]["reason"]
    assert "not an image" in rejects["train/bmilddr/notes.jpg"]["reason"]
    assert "broken symbolic link" in rejects["val/anodr/broken-link.jpg"]["reason"]
    assert rejects["train/.DS_Store"]["kind"] == "skipped"
    m = json.loads((dest / "manifest.json").read_text())
    assert m["totals"]["rejected"] == 4 and summary.rejected == 4
    assert m["totals"]["source_files"] == m["totals"]["rows"] + m["totals"]["rejected"] + m["totals"]["skipped"]


def test_split_filter_and_columns(sharded):
    dest, _ = sharded
    ds = open_shards(str(dest))
    val = list(ds.iter_rows(split="val", columns=["id", "label"]))
    assert val and all(set(r) == {"id", "label"} for r in val)
    assert len(val) == ds.rows("val") and all(r["id"].startswith("val/") for r in val)
    assert all(set(e.splits) == {"val"} for e in ds.entries("val"))  # one split per shard
    assert set(ds.shard_paths("test")).isdisjoint(ds.shard_paths("train"))
    with pytest.raises(ShardError, match="no rows with split 'holdout'"):
        ds.entries("holdout")


def test_pool_and_single_process_give_identical_shards(source, sharded, tmp_path):
    dest, _ = sharded
    inline = tmp_path / "inline"
    shard_dataset(str(source), str(inline), options=ShardJobOptions(target_shard_mb=0.03, workers=1, progress=False))
    a = json.loads((dest / "manifest.json").read_text())["shards"]
    b = json.loads((inline / "manifest.json").read_text())["shards"]
    assert [s["sha256"] for s in a] == [s["sha256"] for s in b]


def test_corrupted_or_inconsistent_shards_are_named(sharded, tmp_path):
    dest, _ = sharded
    bad = tmp_path / "bad"
    shutil.copytree(dest, bad)
    victim = bad / "shards/shard-00001.parquet"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    victim.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="shard-00001.parquet.*sha256"):
        list(open_shards(str(bad)).iter_rows())
    with pytest.raises(ShardError, match="shard-00001"):
        open_shards(str(bad)).verify()

    shutil.copy(dest / "shards/shard-00001.parquet", victim)  # repaired ...
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["shards"][0]["rows"] += 1  # ... but the manifest now lies about shard 0
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="shard-00000.parquet: .* rows, manifest says"):
        open_shards(str(bad)).verify(deep=False)

    (bad / "manifest.json").write_text(json.dumps({**manifest, "shards": manifest["shards"][1:] + manifest["shards"][:1]}))
    os.remove(bad / "shards/shard-00002.parquet")
    with pytest.raises(ShardError, match="shard-00002.parquet listed in the manifest is missing"):
        open_shards(str(bad)).verify(deep=False)
    with pytest.raises(ShardError, match="no manifest.json"):
        open_shards(str(tmp_path))


def test_resume_keeps_finished_shards_and_redoes_the_rest(source, tmp_path):
    dest = tmp_path / "resumed"
    opts = ShardJobOptions(target_shard_mb=0.03, workers=1, progress=False)

    def interrupt_after_two(index: int, receipt: dict) -> None:
        if index == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        shard_dataset(str(source), str(dest), options=opts, on_shard_written=interrupt_after_two)
    assert not (dest / "manifest.json").exists()  # an interrupted DEST is never mistaken for a complete one
    first = (dest / "shards/shard-00000.parquet").read_bytes()
    victim = dest / "shards/shard-00001.parquet"
    victim.write_bytes(victim.read_bytes()[:-10])  # a damaged "finished" shard must be redone

    summary = shard_dataset(str(source), str(dest), options=opts)
    assert summary.reused_shards == 1 and summary.written_shards == summary.shards - 1
    assert (dest / "shards/shard-00000.parquet").read_bytes() == first
    ids = [r["id"] for r in open_shards(str(dest)).iter_rows(columns=["id"])]
    assert len(ids) == len(set(ids)) == N_IMAGES
    again = shard_dataset(str(source), str(dest), options=opts)  # a finished DEST: nothing to do
    assert again.written_shards == 0 and again.reused_shards == again.shards

    assert summary.shards > 3
    fewer = shard_dataset(str(source), str(dest), options=ShardJobOptions(target_shard_mb=10, workers=1, progress=False))
    assert fewer.shards == 3  # one per split
    assert sorted(os.listdir(dest / "shards")) == [f"shard-0000{i}.parquet" for i in range(3)]  # stale ones removed


def test_metadata_is_stripped_unless_kept(tmp_path):
    src = tmp_path / "exif"
    src.mkdir()
    arr = (np.random.default_rng(1).random((40, 40, 3)) * 255).astype(np.uint8)
    exif = Image.Exif()
    exif[0x010E] = SECRET
    original = jpeg_bytes(arr, quality=75, exif=exif.tobytes(), comment=SECRET.encode())  # PIL's default quality
    (src / "a.jpg").write_bytes(original)
    for keep in (False, True):
        dest = tmp_path / f"out-{keep}"
        shard_dataset(str(src), str(dest), options=ShardJobOptions(keep_metadata=keep, workers=1, progress=False))
        row = next(open_shards(str(dest)).iter_rows())
        assert (SECRET.encode() in row["image"]) is keep
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(row["image"]))), np.asarray(Image.open(io.BytesIO(original))))
        assert (row["label"], row["split"]) == (None, "train")  # a plain folder: unlabelled, train


def test_csv_source_and_labels_csv(source, tmp_path):
    listing = tmp_path / "list.csv"
    rows = list(csv.DictReader(open(source / "labels.csv")))[:6]
    with open(listing, "w") as f:
        f.write("path,label,split\n")
        for r in rows:
            f.write(f"{source / r['path']},{r['glaucoma_class']},{r['split']}\n")
        f.write(f"{source}/train/anodr/missing.jpg,anormal,train\n")
    summary = shard_dataset(str(listing), str(tmp_path / "from-csv"), options=ShardJobOptions(workers=1, progress=False))
    assert summary.rows == 6 and summary.rejected == 1
    got = {r["id"]: r["label"] for r in open_shards(str(tmp_path / "from-csv")).iter_rows(columns=["id", "label"])}
    assert sorted(got.values()) == sorted(r["glaucoma_class"] for r in rows)

    # A flat folder plus a labels CSV (paths relative to the folder), choosing the label column.
    flat = tmp_path / "flat"
    flat.mkdir()
    for r in rows:
        shutil.copy(source / r["path"], flat / Path(r["path"]).name)
    with open(tmp_path / "labels.csv", "w") as f:
        f.write("path,dr_class,split\n" + "".join(f"{Path(r['path']).name},{r['dr_class']},{r['split']}\n" for r in rows))
    summary = shard_dataset(
        str(flat), str(tmp_path / "flat-out"), labels_csv=str(tmp_path / "labels.csv"),
        options=ShardJobOptions(label_column="dr_class", workers=1, progress=False),
    )  # fmt: skip
    ds = open_shards(str(tmp_path / "flat-out"))
    assert {r["id"]: (r["label"], r["split"]) for r in ds.iter_rows(columns=["id", "label", "split"])} == {
        Path(r["path"]).name: (r["dr_class"], r["split"]) for r in rows
    }


def test_errors_nothing_readable_and_unwritable(tmp_path):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.jpg").write_text("nope")
    with pytest.raises(NothingReadableError, match="none of the 1 files"):
        shard_dataset(str(junk), str(tmp_path / "o"), options=ShardJobOptions(workers=1, progress=False))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ShardingError, match="not writable"):
        shard_dataset(str(junk), str(tmp_path / "file" / "dest"), options=ShardJobOptions(workers=1, progress=False))
    with pytest.raises(ValueError, match="target_shard_mb=0"):
        ShardJobOptions(target_shard_mb=0)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return run_recipe("shard", *args, timeout=120)


def test_cli_exit_codes_and_summary(source, sharded, tmp_path):
    ok = _cli(str(source), str(tmp_path / "cli"), "--workers", "1", "--target-shard-mb", "1")
    assert ok.returncode == 0, ok.stderr
    assert f"{N_IMAGES} images in" in ok.stdout and "4 files rejected" in ok.stdout and "ETA" in ok.stderr
    assert _cli("--verify", str(sharded[0])).returncode == 0
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    none = _cli(str(junk), str(tmp_path / "none"), "--quiet")
    assert none.returncode == 1 and "could be used" in none.stderr
    (tmp_path / "f").write_text("x")
    unwritable = _cli(str(junk), str(tmp_path / "f" / "d"))
    assert unwritable.returncode == 2 and "not writable" in unwritable.stderr
    missing = _cli(str(tmp_path / "nowhere"), str(tmp_path / "d2"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    assert _cli("--verify", str(tmp_path)).returncode == 2


def _ids(dest: Path) -> list[str]:
    return [r["id"] for r in open_shards(str(dest)).iter_rows(columns=["id"])]


def test_rows_are_stored_in_a_seeded_random_order_within_each_split(source, sharded, tmp_path):
    # A RETFound tree lists its images class by class: in that order every shard would hold one class.
    dest, _ = sharded
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["row_order"] == {"shuffled": True, "seed": 0} and open_shards(str(dest)).rows_shuffled
    ids = _ids(dest)
    splits = [i.split("/")[0] for i in ids]
    assert splits == sorted(splits, key=["train", "val", "test"].index)  # splits stay apart, in their order
    train = [i for i in ids if i.startswith("train/")]
    assert sorted(train) != train  # not in path (= class) order
    classes = [i.split("/")[1] for i in train]
    runs = 1 + sum(a != b for a, b in zip(classes, classes[1:]))
    assert runs > 2 * len(set(classes))  # classes interleave; in path order there is one run per class

    opts = dict(target_shard_mb=0.03, workers=1, progress=False)
    shard_dataset(str(source), str(tmp_path / "seed1"), options=ShardJobOptions(**opts, shuffle_seed=1))
    assert sorted(_ids(tmp_path / "seed1")) == sorted(ids) and _ids(tmp_path / "seed1") != ids
    shard_dataset(str(source), str(tmp_path / "plain"), options=ShardJobOptions(**opts, shuffle_seed=None))
    plain = json.loads((tmp_path / "plain" / "manifest.json").read_text())
    assert plain["row_order"] == {"shuffled": False, "seed": None}
    assert _ids(tmp_path / "plain") == sorted(ids, key=lambda i: (["train", "val", "test"].index(i.split("/")[0]), i))
    with pytest.raises(ValueError, match="shuffle_seed="):
        ShardJobOptions(shuffle_seed="0")


def test_resume_with_another_seed_rewrites_instead_of_mixing(source, tmp_path):
    dest = tmp_path / "reseeded"
    opts = dict(target_shard_mb=0.03, workers=1, progress=False)
    first = shard_dataset(str(source), str(dest), options=ShardJobOptions(**opts, shuffle_seed=0))
    again = shard_dataset(str(source), str(dest), options=ShardJobOptions(**opts, shuffle_seed=0))
    assert again.reused_shards == again.shards == first.shards  # same seed: every shard kept

    other = shard_dataset(str(source), str(dest), options=ShardJobOptions(**opts, shuffle_seed=7))
    assert other.reused_shards == 0 and other.written_shards == other.shards  # nothing of seed 0 kept
    fresh = tmp_path / "fresh7"
    shard_dataset(str(source), str(fresh), options=ShardJobOptions(**opts, shuffle_seed=7))
    assert _ids(dest) == _ids(fresh)
    assert json.loads((dest / "manifest.json").read_text())["row_order"] == {"shuffled": True, "seed": 7}
    a = json.loads((dest / "manifest.json").read_text())["shards"]
    b = json.loads((fresh / "manifest.json").read_text())["shards"]
    assert [s["sha256"] for s in a] == [s["sha256"] for s in b]  # byte-identical to a fresh run with that seed


def test_cli_shuffle_seed_is_recorded(source, tmp_path):
    for args, expected in ((["--shuffle-seed", "5"], {"shuffled": True, "seed": 5}), (["--no-shuffle"], {"shuffled": False, "seed": None})):
        dest = tmp_path / "-".join(args)
        run = _cli(str(source), str(dest), "--workers", "1", "--quiet", *args)
        assert run.returncode == 0, run.stderr
        assert json.loads((dest / "manifest.json").read_text())["row_order"] == expected
