"""Leakage guard (raydino.data.overlap, `python -m raydino.shard --overlap`) and duplicates in the manifest."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raydino.data import overlap as ov
from raydino.data.shards import MANIFEST_NAME, open_shards
from raydino.data.synth import generate_dataset
from raydino.data.writer import ShardJobOptions, shard_dataset
from raydino.shard import main as shard_main

SIZE = 128
OPTS = ShardJobOptions(workers=1, progress=False)


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, object]:
    """Pretraining shards (a flat folder of 24 synthetic photographs + 2 exact duplicates of its own)
    and labelled shards (RETFound tree) holding known copies of pretraining images among unrelated ones."""
    tmp = tmp_path_factory.mktemp("overlap")
    gen = tmp / "gen"
    generate_dataset(str(gen / "pre"), 24, SIZE, seed=1, workers=1, progress=False)
    generate_dataset(str(gen / "other"), 18, SIZE, seed=2, workers=1, progress=False)
    pre_files = sorted((gen / "pre").glob("*/*/*.jpg"))
    other_files = sorted((gen / "other").glob("*/*/*.jpg"))

    pre_src = tmp / "pre_src"
    pre_src.mkdir()
    for i, f in enumerate(pre_files):
        shutil.copy(f, pre_src / f"p{i:02d}.jpg")
    # In-dataset duplicates: a byte copy, and a PNG of a JPEG's decoded pixels (other bytes, same pixels).
    shutil.copy(pre_files[0], pre_src / "dup-bytes.jpg")
    (pre_src / "dup-pixels.png").write_bytes(_png(Image.open(pre_files[1]).convert("RGB")))

    def pre(i: int) -> Image.Image:
        return Image.open(pre_src / f"p{i:02d}.jpg").convert("RGB")

    lab_src = tmp / "lab_src"
    planted = {
        # split: [(name, bytes, kind)]
        "train": [("t-exact.png", _png(pre(10)), "exact")],
        "val": [
            ("v-exact-png.png", _png(pre(2)), "exact"),  # same decoded pixels, another container
            ("v-exact-bytes.jpg", (pre_src / "p03.jpg").read_bytes(), "exact"),
            ("v-near-q60.jpg", _jpeg(pre(4), 60), "near"),  # re-encoded: other pixels, same picture
            ("v-near-q40.jpg", _jpeg(pre(5), 40), "near"),
        ],
        "test": [
            ("x-exact.png", _png(pre(6)), "exact"),
            ("x-near-resized.jpg", _jpeg(pre(7).resize((100, 100), Image.Resampling.BICUBIC), 85), "near"),
        ],
    }
    for split, items in planted.items():
        d = lab_src / split / "anodr"
        d.mkdir(parents=True)
        for name, data, _ in items:
            (d / name).write_bytes(data)
    for i, f in enumerate(other_files):  # unrelated photographs, 6 per split
        split = ("train", "val", "test")[i % 3]
        shutil.copy(f, lab_src / split / "anodr" / f"u{i:02d}.jpg")

    pre_dest, lab_dest = tmp / "pre", tmp / "lab"
    pre_summary = shard_dataset(str(pre_src), str(pre_dest), options=OPTS)
    shard_dataset(str(lab_src), str(lab_dest), options=OPTS)
    return {"pre": pre_dest, "lab": lab_dest, "planted": planted, "pre_summary": pre_summary, "tmp": tmp}


EXPECTED = {
    "train": {"images": 7, "exact": 1, "near": 0, "overlap": 1},
    "val": {"images": 10, "exact": 2, "near": 2, "overlap": 4},
    "test": {"images": 8, "exact": 1, "near": 1, "overlap": 2},
}


def test_overlap_counts_per_split_exact_and_near(datasets, tmp_path, capsys):
    out = tmp_path / "report"
    code = shard_main(["--overlap", str(datasets["pre"]), str(datasets["lab"]), "--out", str(out), "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    lines = captured.out.strip().splitlines()
    assert lines[-1] == "7 of 25 labelled images overlap the pretraining data"
    report = json.loads((out / "overlap.json").read_text())
    assert report["by_split"] == EXPECTED
    assert report["overlapping"] == 7 and report["labelled"]["images"] == 25 and report["pretraining"]["images"] == 26
    for split, items in datasets["planted"].items():
        for kind in ("exact", "near"):
            want = {f"{split}/anodr/{name}" for name, _, k in items if k == kind}
            assert set(report["overlaps"][split][kind]) == want, (split, kind)
    # each overlap names the pretraining image(s) it matches
    assert report["overlaps"]["val"]["exact"]["val/anodr/v-exact-png.png"]["pretrain_ids"] == ["p02.jpg"]
    near = report["overlaps"]["val"]["near"]["val/anodr/v-near-q60.jpg"]
    assert near["pretrain_ids"] == ["p04.jpg"] and 0 < near["bits"] <= ov.NEAR_BITS


def test_hashes_are_stored_at_sharding_and_reused(datasets, tmp_path):
    for name in ("pre", "lab"):
        assert (datasets[name] / ov.HASHES_NAME).exists()
    rep = ov.overlap(str(datasets["pre"]), str(datasets["lab"]), progress=False)
    assert rep.hashes == {"pretrain": "stored", "labelled": "stored"}
    # An older dataset without the sidecar: computed once, stored, then reused; the counts do not change.
    copy = tmp_path / "lab-old"
    shutil.copytree(datasets["lab"], copy)
    (copy / ov.HASHES_NAME).unlink()
    first = ov.overlap(str(datasets["pre"]), str(copy), progress=False)
    assert first.hashes["labelled"].startswith("computed, stored") and (copy / ov.HASHES_NAME).exists()
    second = ov.overlap(str(datasets["pre"]), str(copy), progress=False)
    assert second.hashes["labelled"] == "stored" and first.by_split == second.by_split == EXPECTED
    # A sidecar of other shards (re-sharded dataset) is not trusted.
    entries = open_shards(str(copy)).manifest.shards
    assert ov.read_stored_hashes(open_shards(str(copy)).location, entries) is not None
    assert ov.read_stored_hashes(open_shards(str(copy)).location, entries[:0]) is None


def test_bad_uri_is_a_clear_error(datasets, tmp_path, capsys):
    code = shard_main(["--overlap", str(tmp_path / "missing"), str(datasets["lab"]), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert "raydino.shard: error: no manifest.json at" in err and "missing" in err
    with pytest.raises(SystemExit) as e:
        shard_main(["--overlap", str(datasets["lab"])])
    assert e.value.code == 2


def test_manifest_counts_exact_duplicates(datasets, tmp_path):
    manifest = json.loads((datasets["pre"] / MANIFEST_NAME).read_text())
    assert manifest["totals"]["duplicates"] == 2  # the byte copy and the PNG of decoded pixels
    assert datasets["pre_summary"].duplicates == 2 and "2 rows repeat the decoded pixels" in datasets["pre_summary"].text()
    assert json.loads((datasets["lab"] / MANIFEST_NAME).read_text())["totals"]["duplicates"] == 0
    table = pq.read_table(datasets["pre"] / ov.HASHES_NAME)
    assert table.num_rows == 26 and table.column("pixel_sha256").null_count == 0
    # A manifest written before duplicates were counted still opens.
    old = tmp_path / "old"
    shutil.copytree(datasets["pre"], old)
    del manifest["totals"]["duplicates"]
    (old / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert open_shards(str(old)).manifest.totals.duplicates is None


def test_warning_of_evaluate_and_tune_from_a_run_config(datasets, tmp_path):
    pre, lab = str(datasets["pre"]), str(datasets["lab"])
    line = ov.run_overlap_warning({"data": {"uri": pre, "s3_endpoint": None}}, lab)
    assert line == (
        "warning: 7 of 25 labelled images overlap the pretraining data (train 1 (1 exact, 0 near), val 4 (2 exact, 2 near), "
        "test 2 (1 exact, 1 near); `python -m raydino.shard --overlap` lists them)"
    )
    from raydino.config import Config

    cfg = Config.model_validate({"data": {"uri": pre}})  # tune passes its Config
    assert ov.run_overlap_warning(cfg, lab) == line
    assert ov.run_overlap_warning({"data": {"uri": None}}, lab) is None  # synthetic default: unknown here
    assert ov.run_overlap_warning(None, lab) is None  # an exported checkpoint without a run config
    assert ov.run_overlap_warning({"data": {"uri": lab}}, lab) is None  # the probe set is the pretraining set: train only, by design
    assert ov.run_overlap_warning({"data": {"uri": pre}}, str(tmp_path)) is None  # not a sharded dataset
    no_hashes = tmp_path / "lab-nohash"
    shutil.copytree(datasets["lab"], no_hashes)
    (no_hashes / ov.HASHES_NAME).unlink()
    msg = ov.run_overlap_warning({"data": {"uri": pre}}, str(no_hashes))
    assert msg.startswith("warning: overlap of the labelled data with the pretraining data not checked")
    assert f"python -m raydino.shard --overlap {pre} {no_hashes}" in msg
    assert not (no_hashes / ov.HASHES_NAME).exists()  # the warning never hashes


def test_the_commands_storage_flags_win_over_the_runs_for_the_overlap_check():
    from raydino.data.storage import StorageOptions

    run = {"uri": "s3://b/pre", "s3_endpoint": "http://10.0.0.5:9000", "s3_region": "eu-west-2", "gcs_endpoint": None}
    assert ov.overlap_storage_options(run, None) == StorageOptions.from_config(run)
    flags = StorageOptions(endpoint="http://127.0.0.1:9000", max_attempts=2)
    merged = ov.overlap_storage_options(run, flags)
    assert (merged.endpoint, merged.region, merged.gcs_endpoint, merged.max_attempts) == ("http://127.0.0.1:9000", "eu-west-2", None, 2)
    assert ov.overlap_storage_options(run, StorageOptions()).endpoint == "http://10.0.0.5:9000"  # no flag: the run's


def test_pretrain_splits_match_the_loader():
    from raydino.data.loader import PRETRAIN_SPLITS

    assert ov.PRETRAIN_SPLITS == tuple(PRETRAIN_SPLITS)


def test_near_index_matches_brute_force():
    """Multi-index lookup finds what a pairwise scan finds (all pairs within 9 bits by pigeonhole; here all)."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, size=(500, 4), dtype=np.int64).view(np.uint64)
    queries = base[rng.integers(0, len(base), 300)].copy()
    bits = np.unpackbits(queries.view(np.uint8), axis=1)
    for q in range(len(queries)):  # flip 0-24 bits of each query
        flip = rng.choice(ov.HASH_BITS, size=rng.integers(0, 10 if q % 2 else 25), replace=False)
        bits[q, flip] ^= 1
    queries = np.packbits(bits, axis=1).view(np.uint64)
    qi, ii, dist = ov.NearIndex(base).query(queries)
    brute = ov._popcount(queries[:, None, :] ^ base[None, :, :]).sum(-1)
    want = set(zip(*np.nonzero(brute <= ov.NEAR_BITS)))
    got = set(zip(qi.tolist(), ii.tolist()))
    assert got <= want and all(brute[q, i] == d for q, i, d in zip(qi, ii, dist))
    within9 = {p for p in want if brute[p] <= 9}
    assert within9 <= got  # the guarantee
    assert len(got) >= 0.95 * len(want)  # and almost everything else


def test_image_hashes_see_pixels_not_bytes():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 80, 3), dtype=np.uint8))
    jpeg = _jpeg(img, 90)
    decoded = Image.open(io.BytesIO(jpeg)).convert("RGB")
    sha_jpeg, ph_jpeg = ov.image_hashes(jpeg)
    sha_png, ph_png = ov.image_hashes(_png(decoded))
    assert sha_jpeg == sha_png and ph_jpeg == ph_png and len(ph_png) == ov.HASH_BITS // 8
    assert ov.image_hashes(_jpeg(decoded, 50))[0] != sha_jpeg


def test_pool_hashing_equals_in_process(datasets):
    ds = open_shards(str(datasets["lab"]))
    one = ov.compute_hashes(ds.location, ds.manifest.shards, workers=1, progress=False)
    two = ov.compute_hashes(ds.location, ds.manifest.shards, workers=2, progress=False)
    assert one.equals(two) and one.num_rows == 25
