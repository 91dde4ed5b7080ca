"""The ingest gaps of issue "fundus data at scale", item 5: what a real corpus throws at the sharder.

Unreadable and symlinked sub-folders are reported; a labels CSV that is not UTF-8 or lists an image
twice is an error naming it; a corrupt manifest is named; a rerun trusts finished shards by size and
version (ETag / modification time) instead of re-reading them; 16-bit and float TIFFs are stored as
16-bit PNG when that is exact, quantised with a note for float in [0, 1], rejected otherwise.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raydino.data import storage
from raydino.data.imagebytes import ImageRejected, prepare_image
from raydino.data.shards import ShardError, open_shards
from raydino.data.sources import SourceError, list_source
from raydino.data.synth import generate_dataset
from raydino.data.writer import ShardJobOptions, shard_dataset

OPTS = ShardJobOptions(target_shard_mb=0.01, workers=1, progress=False)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ingest") / "tree"
    generate_dataset(str(root), 24, 40, seed=5, workers=1, progress=False)
    return root


def flat_folder(tree: Path, dest: Path, n: int = 6) -> list[str]:
    dest.mkdir()
    names = []
    for p in sorted(tree.glob("train/*/*.jpg"))[:n]:
        shutil.copy(p, dest / p.name)
        names.append(p.name)
    return names


# ---------------------------------------------------------------- folders


def test_unreadable_and_symlinked_sub_folders_are_reported_not_skipped_silently(tree, tmp_path, monkeypatch):
    src = tmp_path / "src"
    shutil.copytree(tree, src)
    elsewhere = tmp_path / "elsewhere"
    flat_folder(tree, elsewhere, 2)
    os.symlink(elsewhere, src / "train" / "linked")
    locked = src / "train" / "locked"
    locked.mkdir()
    shutil.copy(next(tree.glob("train/*/*.jpg")), locked / "x.jpg")
    if os.geteuid() != 0:
        locked.chmod(0)
    else:  # root reads any folder: make listing this one fail the way a permission error does
        real = os.scandir

        def scandir(path="."):
            if isinstance(path, (str, os.PathLike)) and os.fspath(path) == str(locked):
                raise PermissionError(13, "Permission denied", str(locked))
            return real(path)

        monkeypatch.setattr(os, "scandir", scandir)
    try:
        listing = list_source(str(src))
        reasons = {s.id: s.reason for s in listing.skipped}
        assert "unreadable folder" in reasons["train/locked/"] and "Permission denied" in reasons["train/locked/"]
        assert "symbolic link to a folder: not followed" in reasons["train/linked/"]
        assert not any(it.id.startswith(("train/locked/", "train/linked/")) for it in listing.items)

        summary = shard_dataset(str(src), str(tmp_path / "out"), options=OPTS)
    finally:
        locked.chmod(0o755)
    rejects = (tmp_path / "out" / "rejects.csv").read_text()
    assert "train/locked/" in rejects and "train/linked/" in rejects
    assert summary.rows == len(listing.items)


# ---------------------------------------------------------------- labels CSV


def test_labels_csv_not_utf8_is_an_error_naming_the_file_and_the_encoding(tree, tmp_path):
    names = flat_folder(tree, tmp_path / "flat")
    labels = tmp_path / "labels.csv"
    labels.write_bytes(("path,label\n" + "".join(f"{n},rétinopathie\n" for n in names)).encode("cp1252"))
    with pytest.raises(SourceError, match=r"labels CSV .*labels.csv is not UTF-8 \(byte 0xe9 on line 2\).*iconv -f cp1252"):
        list_source(str(tmp_path / "flat"), labels_csv=str(labels))
    listed = tmp_path / "list.csv"
    listed.write_bytes(("path,label\n" + "".join(f"flat/{n},é\n" for n in names)).encode("latin-1"))
    with pytest.raises(SourceError, match=r"CSV .*list.csv is not UTF-8"):
        list_source(str(listed))
    labels.write_text("path,label\n" + "".join(f"{n},rétinopathie\n" for n in names), encoding="utf-8-sig")  # BOM: fine
    assert {it.label for it in list_source(str(tmp_path / "flat"), labels_csv=str(labels)).items} == {"rétinopathie"}


def test_a_labels_csv_without_its_label_column_is_an_error_and_unlisted_images_are_said(tree, tmp_path):
    names = flat_folder(tree, tmp_path / "flat")
    labels = tmp_path / "labels.csv"
    labels.write_text("path,lbl\n" + "".join(f"{n},a\n" for n in names))
    with pytest.raises(SourceError, match=r"labels CSV .*labels.csv: no 'label' column \(columns: path, lbl\); --label-column names it"):
        list_source(str(tmp_path / "flat"), labels_csv=str(labels))
    labels.write_text("path,label\n" + "".join(f"{n},a\n" for n in names[1:]))  # one image left out
    listing = list_source(str(tmp_path / "flat"), labels_csv=str(labels))
    [warning] = listing.warnings
    assert f"1 of {len(names)} images are not in labels CSV" in warning and "stored unlabelled" in warning
    # a CSV source whose other columns may be labels under another name: stored unlabelled, and said so
    listed = tmp_path / "list.csv"
    listed.write_text("path,grade\n" + "".join(f"flat/{n},a\n" for n in names))
    listing = list_source(str(listed))
    assert {it.label for it in listing.items} == {None} and "no 'label' column (columns: path, grade)" in listing.warnings[0]
    listed.write_text("path\n" + "".join(f"flat/{n}\n" for n in names))  # a list of paths: nothing to say
    assert list_source(str(listed)).warnings == []


def test_duplicate_rows_in_a_labels_csv_are_an_error_listing_them(tree, tmp_path):
    names = flat_folder(tree, tmp_path / "flat")
    labels = tmp_path / "labels.csv"
    rows = [f"{n},a\n" for n in names] + [f"./{names[0]},b\n", f"{names[2]},a\n"]
    labels.write_text("path,label\n" + "".join(rows))
    with pytest.raises(SourceError, match=rf"2 path\(s\) listed more than once: {names[0]} \(rows 2, 8\); {names[2]} \(rows 4, 9\)"):
        list_source(str(tmp_path / "flat"), labels_csv=str(labels))
    listed = tmp_path / "list.csv"
    listed.write_text("path,label\n" + "".join(f"flat/{r}" for r in rows))
    with pytest.raises(SourceError, match=rf"flat/{names[0]} \(rows 2, 8\)"):
        list_source(str(listed))


# ---------------------------------------------------------------- manifest and resume


def test_corrupt_manifest_is_named_and_a_rerun_writes_it_again(tree, tmp_path):
    dest = tmp_path / "out"
    first = shard_dataset(str(tree), str(dest), options=OPTS)
    (dest / "manifest.json").write_bytes((dest / "manifest.json").read_bytes()[:50])  # a crash mid-write
    with pytest.raises(ShardError, match=r"manifest.json is corrupt \(not valid JSON.*rerun the `python -m raydino.shard`"):
        open_shards(str(dest))
    (dest / "manifest.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ShardError, match="manifest.json is corrupt"):
        open_shards(str(dest))
    again = shard_dataset(str(tree), str(dest), options=OPTS)
    assert again.reused_shards == again.shards == first.shards and again.written_shards == 0
    assert open_shards(str(dest)).manifest.totals.rows == first.rows


def test_rerun_trusts_finished_shards_by_version_without_reading_them(tree, tmp_path, monkeypatch):
    dest = tmp_path / "out"
    first = shard_dataset(str(tree), str(dest), options=OPTS)
    assert first.shards >= 3
    receipt = json.loads((dest / "_progress" / "shard-00000.json").read_text())
    assert receipt["version"].startswith("size=")

    reads: list[str] = []
    real = storage.read_bytes
    monkeypatch.setattr(storage, "read_bytes", lambda loc, path: reads.append(path) or real(loc, path))
    again = shard_dataset(str(tree), str(dest), options=OPTS)
    assert again.reused_shards == first.shards
    assert not [p for p in reads if "/shards/" in p], f"a rerun read finished shards again: {reads}"

    # The same size, other bytes, written later (another run, a bad copy): redone, not trusted.
    victim = dest / "shards" / "shard-00001.parquet"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    os.utime(victim, ns=(receipt_ns := os.stat(victim).st_mtime_ns + 10**9, receipt_ns))
    redone = shard_dataset(str(tree), str(dest), options=OPTS)
    assert redone.written_shards == 1 and redone.reused_shards == first.shards - 1
    open_shards(str(dest)).verify(deep=True)

    # A receipt from before versions were recorded: the bytes are checked, as before.
    path = dest / "_progress" / "shard-00002.json"
    old = json.loads(path.read_text())
    old.pop("version")
    path.write_text(json.dumps(old))
    reads.clear()
    assert shard_dataset(str(tree), str(dest), options=OPTS).reused_shards == first.shards
    assert [p for p in reads if p.endswith("shard-00002.parquet")]


# ---------------------------------------------------------------- high bit depth


def tiff(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="TIFF")
    return buf.getvalue()


def decoded(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im)


def test_16_bit_and_exact_32_bit_tiffs_are_stored_losslessly_as_16_bit_png():
    rng = np.random.default_rng(0)
    grey16 = rng.integers(0, 65536, (24, 32), dtype=np.uint16)
    out = prepare_image(tiff(grey16))
    assert out.format == "png" and out.removed == ("re-encoded losslessly to 16-bit PNG",)
    assert np.array_equal(decoded(out.data), grey16)
    big_endian = Image.frombytes("I;16B", (32, 24), grey16.astype(">u2").tobytes())
    buf = io.BytesIO()
    big_endian.save(buf, format="TIFF")
    assert np.array_equal(decoded(prepare_image(buf.getvalue()).data), grey16)
    int32 = grey16.astype(np.int32)
    assert np.array_equal(decoded(prepare_image(tiff(int32)).data), grey16)
    whole_floats = grey16.astype(np.float32)
    out = prepare_image(tiff(whole_floats))
    assert "losslessly" in out.removed[0] and np.array_equal(decoded(out.data), grey16)


def test_float_tiffs_are_quantised_with_a_note_or_rejected_never_clipped():
    rng = np.random.default_rng(1)
    unit = rng.random((24, 32), dtype=np.float32)
    out = prepare_image(tiff(unit))
    assert "quantised to 1/65535: not lossless" in out.removed[0]
    assert np.abs(decoded(out.data) / 65535.0 - unit).max() <= 0.5 / 65535 + 1e-7
    with pytest.raises(ImageRejected, match=r"float pixels span \[-1, 2\.5\]: no 16-bit PNG holds them"):
        prepare_image(tiff(np.array([[-1.0, 2.5]], np.float32)))
    with pytest.raises(ImageRejected, match="NaN or infinity"):
        prepare_image(tiff(np.array([[np.nan, 0.5]], np.float32)))
    with pytest.raises(ImageRejected, match=r"32-bit integer pixels span \[0, 70000\]"):
        prepare_image(tiff(np.array([[0, 70000]], np.int32)))


def test_rejected_high_bit_depth_files_reach_rejects_csv(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "ok.tif").write_bytes(tiff(np.full((16, 16), 40000, np.uint16)))
    (src / "wide.tif").write_bytes(tiff(np.array([[-5.0, 7.0]], np.float32)))
    summary = shard_dataset(str(src), str(tmp_path / "out"), options=OPTS)
    assert summary.rows == 1 and summary.rejected == 1
    rejects = list(csv.DictReader(open(tmp_path / "out" / "rejects.csv")))
    assert [(r["path"], "no 16-bit PNG holds them" in r["reason"]) for r in rejects] == [("wide.tif", True)]


def test_corrupt_manifest_in_the_synthetic_cache_is_rebuilt_not_a_traceback(tmp_path):
    from raydino.data.synth import synthetic_shards

    uri = synthetic_shards(24, 32, 3, cache_root=str(tmp_path), workers=1, progress=False)
    rows = open_shards(uri).manifest.totals.rows
    Path(uri, "manifest.json").write_text('{"format": "raydino-sha')
    assert synthetic_shards(24, 32, 3, cache_root=str(tmp_path), workers=1, progress=False) == uri
    assert open_shards(uri).manifest.totals.rows == rows


def test_16_bit_shards_train_and_evaluate_as_their_full_range_not_clipped_white():
    """A 16-bit greyscale photograph, stored as 16-bit PNG, decodes for augmentation and for the probe
    to value / 257 (Pillow's convert("RGB") alone clips everything above 255 to white)."""
    import torch

    from raydino.augment.decode import decode
    from raydino.data.labelled import decode_image

    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    stored = prepare_image(tiff(ramp)).data
    want = np.rint(ramp / 257.0).astype(np.uint8)
    for got in (decode(stored, 1), decode_image(stored)):
        assert got.dtype == torch.uint8 and tuple(got.shape) == (3, 64, 64)
        np.testing.assert_array_equal(got[0].numpy(), want)
        assert torch.equal(got[0], got[2])
    unit = prepare_image(tiff(np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64))).data  # quantised, then scaled
    assert abs(int(decode(unit, 1)[0, -1, -1]) - 255) <= 1 and int(decode(unit, 1)[0, 0, 0]) == 0
