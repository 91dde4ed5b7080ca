"""Field-of-view crop and size cap (raydino.data.fov; python -m raydino.shard --fov-crop --max-side N --quality Q)."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raydino.data.fov import FovCircle, ImageTransform, _detection_copy, detect_fov, transform_image
from raydino.data.imagebytes import prepare_image, strip_jpeg_metadata
from raydino.data.shards import SCHEMA, open_shards
from raydino.data.writer import ShardJobOptions, shard_dataset
from raydino.shard import main as shard_main

from helpers.images import jpeg_bytes, png_bytes


def fundus_like(w: int, h: int, cx: float, cy: float, r: float, level: float = 180, clip: float | None = None, seed: int = 0) -> np.ndarray:
    """An orange disc on black (pixel-centre coordinates): texture, vignetting, a dark macula and
    vessels, sensor noise; ``clip``: the camera's mask cuts the disc at |y - cy| > clip."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    d = np.hypot(xx - cx, yy - cy)
    mask = np.clip(r - d + 0.5, 0, 1)
    if clip is not None:
        mask *= np.clip(clip - np.abs(yy - cy) + 0.5, 0, 1)
    tex = 1 + 0.15 * np.sin(xx / 17) * np.cos(yy / 23)
    vig = 1 - 0.5 * np.minimum(d / r, 1) ** 2
    macula = 1 - 0.6 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * (0.12 * r) ** 2))
    vessels = 1 - 0.5 * (np.abs(np.sin((xx - cx) / r * 9 + (yy - cy) / r * 3)) < 0.06)
    base = level * tex * vig * macula * vessels * mask
    img = np.stack([base, 0.5 * base, 0.2 * base], -1) + rng.normal(0, 2, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def detect(data: bytes) -> FovCircle | None:
    with Image.open(io.BytesIO(data)) as im:
        size = im.size
    return detect_fov(*_detection_copy(data, size))


DISCS = {
    # name: (width, height, cx, cy, r, extra)
    "centred": (600, 400, 299.5, 199.5, 185, {}),
    "wider than the frame is tall (clipped by the frame)": (900, 600, 450, 300, 350, {}),
    "clipped by the camera's mask": (900, 600, 449.5, 300, 350, {"clip": 270}),
    "dark (underexposed)": (600, 400, 300, 200, 180, {"level": 22}),
    "off centre": (800, 600, 310.2, 250.7, 200, {}),
    "camera size, clipped": (3000, 2000, 1500, 1000, 1100, {"clip": 960}),
}


@pytest.mark.parametrize("name", list(DISCS))
def test_known_circles_are_recovered_within_two_pixels(name):
    w, h, cx, cy, r, extra = DISCS[name]
    arr = fundus_like(w, h, cx, cy, r, **extra)
    for data in [jpeg_bytes(arr, quality=90)] + ([png_bytes(arr)] if w < 2000 else []):  # PNG-encoding 6 MP: seconds
        fov = detect(data)
        assert fov is not None, name
        tol = 2.0 if w < 2000 else 4.0  # the camera-size one is detected on a 1/8-scale decode
        assert abs(fov.cx - cx) <= tol and abs(fov.cy - cy) <= tol and abs(fov.r - r) <= tol, (name, fov)


@pytest.mark.parametrize(
    "name, arr",
    [
        ("black", np.zeros((400, 600, 3), np.uint8)),
        ("near black", np.random.default_rng(1).integers(0, 4, (400, 600, 3)).astype(np.uint8)),
        ("flat grey", np.full((400, 600, 3), 128, np.uint8)),
        ("uniform noise", np.random.default_rng(2).integers(0, 256, (400, 600, 3)).astype(np.uint8)),
        ("horizontal gradient", np.repeat(np.linspace(0, 255, 600, dtype=np.float32)[None, :, None], 400, 0).repeat(3, 2).astype(np.uint8)),
        ("retina filling the frame", fundus_like(600, 400, 300, 200, 800)),
        ("a small bright square", np.pad(np.full((60, 60, 3), 200, np.uint8), ((170, 170), (270, 270), (0, 0)))),
    ],
)
def test_no_plausible_disc_is_not_found(name, arr):
    assert detect(jpeg_bytes(arr)) is None, name


def _simple_extents(rgb: np.ndarray, row: int, col: int, t: int = 30) -> tuple[float, float, float, float]:
    """Where the disc starts and ends along one row and one column, by a plain threshold."""
    v = rgb.max(axis=2)
    xs, ys = np.flatnonzero(v[row] > t), np.flatnonzero(v[:, col] > t)
    return (xs[0] + xs[-1]) / 2, (xs[-1] - xs[0] + 1) / 2, (ys[0] + ys[-1]) / 2, (ys[-1] - ys[0] + 1) / 2


def test_real_retina_photograph():
    skdata = pytest.importorskip("skimage.data", reason="scikit-image (the test extra) is not installed")
    try:
        rgb = skdata.retina()  # bundled in the scikit-image wheel (skimage/data/retina.jpg): no download
    except Exception as e:  # pragma: no cover - a scikit-image that would have to download it
        pytest.skip(f"skimage.data.retina() is not available offline: {e}")
    h, w = rgb.shape[:2]
    cx, rx, cy, ry = _simple_extents(rgb, h // 2, w // 2)  # independent of the detector
    fov = detect(jpeg_bytes(rgb, quality=95))
    assert fov is not None
    assert abs(fov.cx - cx) <= 4 and abs(fov.cy - cy) <= 4 and abs(fov.r - (rx + ry) / 2) <= 4, (fov, cx, cy, rx, ry)
    # the same photograph in a wider black frame, and clipped top and bottom as a camera would
    framed = np.zeros((h, w + 600, 3), np.uint8)
    framed[:, 450 : 450 + w] = rgb
    f2 = detect(jpeg_bytes(framed, quality=95))
    assert f2 is not None and abs(f2.cx - (fov.cx + 450)) <= 2 and abs(f2.cy - fov.cy) <= 2 and abs(f2.r - fov.r) <= 2
    clipped = framed[250:-250]
    f3 = detect(jpeg_bytes(clipped, quality=95))
    assert f3 is not None and abs(f3.cx - f2.cx) <= 2 and abs(f3.cy - (f2.cy - 250)) <= 2 and abs(f3.r - f2.r) <= 3
    t = transform_image(jpeg_bytes(clipped, quality=95), "jpeg", (clipped.shape[1], clipped.shape[0]), ImageTransform(fov_crop=True))
    assert t.data is not None and t.height == clipped.shape[0] and abs(t.width - 2 * f3.r * 1.02) <= 6  # black sides gone


def test_transform_keeps_bytes_when_nothing_changes_and_carries_orientation():
    full = jpeg_bytes(fundus_like(400, 400, 199.5, 199.5, 199))  # the disc fills the frame: nothing to crop
    t = transform_image(full, "jpeg", (400, 400), ImageTransform(fov_crop=True, max_side=512))
    assert t.data is None and t.fov_found and (t.width, t.height) == (400, 400)

    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: the crop happens in stored pixels, the tag goes along
    src = jpeg_bytes(fundus_like(900, 600, 450, 300, 280), exif=exif.tobytes())
    p = prepare_image(src, transform=ImageTransform(fov_crop=True, max_side=300, quality=80))
    out = Image.open(io.BytesIO(p.data))
    assert out.format == "JPEG" and out.getexif().get(0x0112) == 6 and max(out.size) == 300
    assert (p.orig_width, p.orig_height) == (900, 600) and p.reencoded and p.resized and p.fov_found
    assert "EXIF" in p.removed  # the rest of the EXIF block is still dropped

    grey = prepare_image(png_bytes(fundus_like(500, 300, 250, 150, 140)[..., 0]), transform=ImageTransform(fov_crop=True))
    assert (
        grey.format == "png" and Image.open(io.BytesIO(grey.data)).mode == "L" and grey.width == grey.height and abs(grey.width - 2 * 140 * 1.02) <= 4
    )


def test_options_are_validated():
    for bad in ({"max_side": 63}, {"max_side": 1.5}, {"max_side": True}):
        with pytest.raises(ValueError, match="max_side=.*>= 64"):
            ShardJobOptions(**bad)
    for q in (0, 101, 9.5):
        with pytest.raises(ValueError, match="quality=.*1 to 100"):
            ShardJobOptions(quality=q)
    with pytest.raises(ValueError, match="keep_metadata"):
        ShardJobOptions(keep_metadata=True, fov_crop=True)


@pytest.mark.parametrize(
    "args, words",
    [
        (["--max-side", "32"], "--max-side 32: must be at least 64"),
        (["--quality", "0"], "--quality 0: must be from 1 to 100"),
        (["--quality", "101", "--max-side", "512"], "--quality 101: must be from 1 to 100"),
        (["--keep-metadata", "--fov-crop"], "cannot be combined with --fov-crop or --max-side"),
    ],
)
def test_cli_rejects_bad_values_naming_the_option(tmp_path, capsys, args, words):
    with pytest.raises(SystemExit) as e:
        shard_main([str(tmp_path), str(tmp_path / "d"), *args])
    assert e.value.code == 2 and words in capsys.readouterr().err


# ------------------------------------------------------------------ the sharding job


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fov") / "photos"
    root.mkdir()
    (root / "clipped.jpg").write_bytes(jpeg_bytes(fundus_like(900, 600, 450, 300, 350, clip=270)))
    (root / "dark.jpg").write_bytes(jpeg_bytes(fundus_like(600, 400, 300, 200, 180, level=22)))
    (root / "small.jpg").write_bytes(jpeg_bytes(fundus_like(200, 160, 100, 80, 70)))  # under the cap: only cropped
    (root / "black.jpg").write_bytes(jpeg_bytes(np.zeros((500, 700, 3), np.uint8)))  # no disc: kept uncropped, resized
    (root / "lossless.png").write_bytes(png_bytes(fundus_like(500, 500, 250, 250, 200)))
    buf = io.BytesIO()
    Image.fromarray(fundus_like(640, 480, 320, 240, 200)).save(buf, "TIFF")  # made PNG losslessly first
    (root / "scan.tif").write_bytes(buf.getvalue())
    return root


OPTS = dict(workers=1, progress=False, target_shard_mb=0.05)


def _rows(dest: Path) -> dict[str, dict]:
    return {r["id"]: r for r in open_shards(str(dest)).iter_rows()}


def test_shard_with_fov_crop_and_max_side(photos, tmp_path, capsys):
    dest = tmp_path / "capped"
    assert shard_main([str(photos), str(dest), "--fov-crop", "--max-side", "256", "--quality", "90", "--workers", "1", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "5 cropped to their field of view, 1 with no disc found (kept uncropped)" in out
    assert "5 downscaled to at most 256 px" in out and "6 re-encoded (JPEG quality 90" in out
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["transform"] == {
        "fov_crop": True, "max_side": 256, "quality": 90, "fov_found": 5, "fov_not_found": 1, "resized": 5, "reencoded": 6,
    }  # fmt: skip
    assert manifest["columns"][-5:] == ["orig_width", "orig_height", "fov_cx", "fov_cy", "fov_r"]
    rows = _rows(dest)
    c = rows["clipped.jpg"]
    assert (c["orig_width"], c["orig_height"]) == (900, 600) and c["format"] == "jpeg"
    assert abs(c["fov_cx"] - 450) < 2 and abs(c["fov_cy"] - 300) < 2 and abs(c["fov_r"] - 350) < 2
    assert (c["width"], c["height"]) == (256, 214)  # the disc's square (2r + 2 %) clipped by the frame's height, capped
    b = rows["black.jpg"]
    assert b["fov_r"] is None and (b["width"], b["height"]) == (256, 183) and (b["orig_width"], b["orig_height"]) == (700, 500)
    s = rows["small.jpg"]
    assert max(s["width"], s["height"]) < 160 and s["width"] == s["height"]  # cropped, not upscaled
    assert rows["lossless.png"]["format"] == "png" and rows["scan.tif"]["format"] == "png"
    for r in rows.values():  # the stored size is the size of the stored bytes
        assert Image.open(io.BytesIO(r["image"])).size == (r["width"], r["height"])
        assert max(r["width"], r["height"]) <= 256
    assert shard_main(["--verify", str(dest)]) == 0 and "match the manifest" in capsys.readouterr().out


def test_resume_keeps_same_options_and_rewrites_on_others(photos, tmp_path):
    dest = tmp_path / "resumed"
    first = shard_dataset(str(photos), str(dest), options=ShardJobOptions(**OPTS, fov_crop=True, max_side=256))
    assert first.shards > 1
    again = shard_dataset(str(photos), str(dest), options=ShardJobOptions(**OPTS, fov_crop=True, max_side=256))
    assert again.reused_shards == again.shards == first.shards and again.transform == first.transform
    for other in ({"fov_crop": True, "max_side": 128}, {"fov_crop": True, "max_side": 256, "quality": 70}, {"max_side": 256}, {}):
        run = shard_dataset(str(photos), str(dest), options=ShardJobOptions(**OPTS, **other))
        assert run.reused_shards == 0 and run.written_shards == run.shards, other
        sides = {max(r["width"], r["height"]) for r in _rows(dest).values()}
        assert max(sides) <= other.get("max_side", 900)
    assert open_shards(str(dest)).manifest.transform is None  # the last run had no flags
    assert open_shards(str(dest)).verify()["rows"] == 6


def test_without_flags_shards_are_what_they_always_were(photos, tmp_path):
    plain = tmp_path / "plain"
    shard_dataset(str(photos), str(plain), options=ShardJobOptions(**OPTS))
    rows = _rows(plain)
    for name in ("clipped.jpg", "dark.jpg", "small.jpg", "black.jpg"):
        src = (photos / name).read_bytes()
        assert rows[name]["image"] == strip_jpeg_metadata(src)[0] == src  # bytes as found (PIL writes no metadata)
        assert rows[name]["sha256"] == hashlib.sha256(src).hexdigest()
    assert rows["lossless.png"]["image"] == (photos / "lossless.png").read_bytes()
    ds = open_shards(str(plain))
    assert ds.manifest.transform is None and ds.manifest.columns == [f.name for f in SCHEMA]
    for e in ds.manifest.shards:  # no new columns in the files either
        assert pq.read_schema(plain / e.path).names == [f.name for f in SCHEMA]
    # a capped run turned back into a plain one gives the very same shard files as a fresh plain run
    mixed = tmp_path / "mixed"
    shard_dataset(str(photos), str(mixed), options=ShardJobOptions(**OPTS, fov_crop=True))
    shard_dataset(str(photos), str(mixed), options=ShardJobOptions(**OPTS))
    a = json.loads((plain / "manifest.json").read_text())["shards"]
    b = json.loads((mixed / "manifest.json").read_text())["shards"]
    assert [s["sha256"] for s in a] == [s["sha256"] for s in b]


def test_process_pool_gives_the_same_shards(tmp_path):
    many = tmp_path / "many"  # more than one pool task's worth (16 images), else the job stays in process
    many.mkdir()
    for i in range(20):
        (many / f"{i:02d}.jpg").write_bytes(jpeg_bytes(fundus_like(240, 180, 120 + i, 90, 80, seed=i)))
    opts = dict(OPTS, fov_crop=True, max_side=128)
    shard_dataset(str(many), str(tmp_path / "one"), options=ShardJobOptions(**opts))
    shard_dataset(str(many), str(tmp_path / "pool"), options=ShardJobOptions(**dict(opts, workers=2)))
    a = json.loads((tmp_path / "one" / "manifest.json").read_text())
    b = json.loads((tmp_path / "pool" / "manifest.json").read_text())
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]] and a["transform"] == b["transform"]
