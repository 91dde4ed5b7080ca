"""raydino.augment.cpu: presets, crop geometry, contract, determinism, photometric ops vs torchvision."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image

from raydino.augment import decode as decode_module
from raydino.augment.cpu import MultiCropAugment, crop_shapes
from raydino.augment.decode import draft_scales, image_size
from raydino.augment.device import DeviceMultiCropAugment, build_augment
from raydino.augment.ops import adjust_hue_, bias_field_maps, blend_, gaussian_blur_, luma, normalize
from raydino.augment.params import JITTER_ORDERS
from raydino.config import AugmentConfig, ConfigError, load_config

from helpers.images import jpeg_bytes

try:
    from raydino.augment import opencv as augment_cv
except ImportError:  # OpenCV missing: the torch backend is the CPU pipeline, its tests still run
    augment_cv = None
needs_cv = pytest.mark.skipif(augment_cv is None, reason="OpenCV (opencv-python-headless) not installed")
try:
    from raydino.augment import fused as augment_fused
except ImportError:  # Numba missing: the OpenCV or torch backend is the CPU pipeline
    augment_fused = None
needs_numba = pytest.mark.skipif(augment_fused is None, reason="Numba not installed")
BACKENDS = [pytest.param("fused", marks=needs_numba), pytest.param("opencv", marks=needs_cv), "torch"]


def _fundus(size: int, seed: int = 0) -> np.ndarray:
    """A small fundus-like HWC uint8 image: orange disc, bright optic disc, texture."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    r = np.hypot(xx, yy)
    base = (r < 0.45) * (1 - 0.6 * r) + np.exp(-((xx - 0.2) ** 2 + yy**2) / 0.003)
    rgb = np.stack([base * 0.9, base * 0.45, base * 0.15], -1) + rng.normal(0, 0.03, (size, size, 3))
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def jpeg256() -> bytes:
    return jpeg_bytes(_fundus(256))


# ------------------------------------------------------------------ presets and geometry


def test_presets_carry_the_papers_numbers():
    strong, weak, med = (AugmentConfig(preset=p) for p in ("strong", "weak", "weak_med"))
    assert (strong.global_crop_scale, strong.local_crop_scale) == ((0.4, 1.0), (0.05, 0.4))
    assert (strong.jitter_brightness, strong.jitter_contrast) == (0.4, 0.4)
    for cfg in (weak, med):
        assert (cfg.global_crop_scale, cfg.local_crop_scale) == ((0.5, 1.0), (0.2, 0.5))
        assert (cfg.jitter_brightness, cfg.jitter_contrast) == (0.2, 0.2)
    assert (med.med_blur_sigma, med.noise_std, med.bias_field) == (0.1, 0.1, 0.1)
    assert (med.med_blur_p, med.noise_p, med.bias_field_p) == (0.5, 0.5, 0.5)
    assert (weak.noise_p, weak.bias_field_p, weak.med_blur_p) == (0.0, 0.0, 0.0)
    for cfg in (strong, weak, med):  # DINO's defaults everywhere else
        assert (cfg.global_crop_size, cfg.local_crop_size, cfg.n_local_crops) == (224, 96, 8)
        assert (cfg.flip_p, cfg.jitter_p, cfg.jitter_saturation, cfg.jitter_hue, cfg.grayscale_p) == (0.5, 0.8, 0.2, 0.1, 0.2)
        assert (cfg.blur_p_global1, cfg.blur_p_global2, cfg.blur_p_local, cfg.blur_sigma) == (1.0, 0.1, 0.5, (0.1, 2.0))
        assert cfg.solarize_p_global2 == 0.2 and cfg.interpolation == "bicubic"


def test_bad_scales_are_rejected_with_the_field_name():
    with pytest.raises(ConfigError, match="global_crop_scale"):
        load_config("smoke", ["augment.global_crop_scale=[0.9, 0.2]"])
    with pytest.raises(ConfigError, match="local_crop_scale"):
        load_config("smoke", ["augment.local_crop_scale=[0.0, 0.4]"])
    with pytest.raises(ConfigError, match="n_local_crops"):
        load_config("smoke", ["augment.n_local_crops=-1"])


def _expected_area(scale: tuple[float, float], ratio=(3 / 4, 4 / 3), side: int = 512) -> float:
    """E[area fraction] of torchvision's RandomResizedCrop on a square image: a try (s, r) is kept
    when w = sqrt(s r) and h = sqrt(s / r) both fit, i.e. s * max(r, 1/r) <= 1; later tries redo
    the draw, so the kept area is s conditioned on fitting (the centre-crop fallback is ~never hit
    for these ranges).  Numerical integration over s ~ U(scale), log r ~ U(log ratio)."""
    s = np.linspace(*scale, 2001)
    lr = np.linspace(math.log(ratio[0]), math.log(ratio[1]), 2001)
    S, R = np.meshgrid(s, np.exp(lr), indexing="ij")
    fits = S * np.maximum(R, 1 / R) <= 1 + 1e-12
    return float((S * fits).sum() / fits.sum())


@pytest.mark.parametrize("preset", ["strong", "weak"])
def test_crop_area_fractions_over_2000_draws(preset):
    cfg = AugmentConfig(preset=preset)
    p = MultiCropAugment(cfg).sample_params([(512, 512)] * 2000, generator=0)
    assert p.fallback.mean() < 1e-3  # torchvision's centre-crop fallback: rare for these ranges
    area, ok = p.area_fraction, ~p.fallback
    for kind, cols, (lo, hi) in (("global", [0, 1], cfg.global_crop_scale), ("local", list(range(2, 10)), cfg.local_crop_scale)):
        a = area[:, cols][ok[:, cols]]
        # w and h are rounded to whole pixels: at most half a pixel on each side of the target
        slack = (2 * 0.5 * 512 * math.sqrt(hi * 4 / 3) + 0.25) / 512**2
        assert a.min() >= lo - slack and a.max() <= hi + slack, (kind, a.min(), a.max())
        expected = _expected_area((lo, hi))
        sem = a.std() / math.sqrt(a.size)
        assert abs(a.mean() - expected) < 5 * sem + 1e-3, (kind, a.mean(), expected)
        assert abs(a.mean() - expected) < abs(a.mean() - (lo + hi) / 2) or kind == "local"  # the bias is real
        ratio = p.aspect_ratio[:, cols][ok[:, cols]]
        assert ratio.min() >= 0.74 and ratio.max() <= 1.35
        assert abs(np.log(ratio).mean()) < 0.01  # log-uniform, symmetric around 1


def test_fallback_is_torchvisions_centre_crop():
    cfg = AugmentConfig(global_crop_scale=(1.0, 1.0))  # every try fails on a 2:1 image with r in [3/4, 4/3]
    p = MultiCropAugment(cfg).sample_params([(100, 200)], generator=0)
    assert p.fallback[0, 0] and (p.height[0, 0], p.width[0, 0]) == (100, 133)
    assert (p.top[0, 0], p.left[0, 0]) == (0, (200 - 133) // 2)


# ------------------------------------------------------------------ contract


def test_outputs_shapes_dtypes_and_input_kinds(jpeg256):
    cfg = AugmentConfig(global_crop_size=64, local_crop_size=32, n_local_crops=3)
    aug = MultiCropAugment(cfg, seed=0)
    arr = _fundus(200)
    for item in (
        jpeg256,
        np.frombuffer(jpeg256, np.uint8),
        arr,
        torch.from_numpy(arr).permute(2, 0, 1),
        torch.from_numpy(arr).permute(2, 0, 1).contiguous(),
        arr[:, :, 0],
    ):
        crops = aug(item)
        assert [tuple(c.shape) for c in crops] == [(3, 64, 64)] * 2 + [(3, 32, 32)] * 3
        assert all(c.dtype == torch.uint8 for c in crops)
    batch = aug.augment_batch([jpeg256, arr, jpeg256])
    assert list(batch) == list(crop_shapes(cfg)) == ["global_0", "global_1", "local_0", "local_1", "local_2"]
    for k, (c, h, w) in crop_shapes(cfg).items():
        assert isinstance(batch[k], np.ndarray) and batch[k].dtype == np.uint8 and batch[k].shape == (3, c, h, w)
    assert batch["global_0"].std() > 5  # real content, not a blank buffer


def test_equal_sizes_and_no_local_crops(jpeg256):
    same = MultiCropAugment(AugmentConfig(global_crop_size=48, local_crop_size=48, n_local_crops=2), seed=1)
    out = same.augment_batch([jpeg256] * 3)
    assert not np.array_equal(out["global_0"], out["local_0"])  # separate buffers per crop kind
    none = MultiCropAugment(AugmentConfig(global_crop_size=32, local_crop_size=16, n_local_crops=0), seed=1)
    assert list(none.augment_batch([jpeg256])) == ["global_0", "global_1"]
    empty = same.augment_batch([])  # a Ray Data batch whose rows were all filtered out
    assert {k: v.shape for k, v in empty.items()} == {k: (0, *s) for k, s in crop_shapes(same.cfg).items()}


def test_bad_inputs_name_what_is_allowed():
    aug = MultiCropAugment(AugmentConfig(global_crop_size=32, local_crop_size=16, n_local_crops=1))
    with pytest.raises(TypeError, match="encoded bytes"):
        aug([1, 2, 3])
    with pytest.raises(ValueError, match="uint8"):
        aug(torch.rand(3, 40, 40))
    with pytest.raises(ValueError, match="channels"):
        aug(torch.zeros(5, 40, 40, dtype=torch.uint8))
    with pytest.raises(ValueError, match="chunk_images"):
        MultiCropAugment(chunk_images=0)
    with pytest.raises(ValueError, match="uint8"):
        normalize(torch.rand(3, 4, 4))


def test_determinism_with_seed_and_generator(jpeg256):
    cfg = AugmentConfig(preset="weak_med", global_crop_size=64, local_crop_size=32, n_local_crops=2)
    a = MultiCropAugment(cfg, seed=7).augment_batch([jpeg256] * 4)
    b = MultiCropAugment(cfg, seed=7).augment_batch([jpeg256] * 4)
    c = MultiCropAugment(cfg, seed=8).augment_batch([jpeg256] * 4)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not all(np.array_equal(a[k], c[k]) for k in a)
    aug = MultiCropAugment(cfg)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert all(torch.equal(x, y) for x, y in zip(aug(jpeg256, generator=g1), aug(jpeg256, generator=g2)))
    assert all(torch.equal(x, y) for x, y in zip(aug(jpeg256, generator=5), aug(jpeg256, generator=5)))


# ------------------------------------------------------------------ photometric ops against torchvision


@pytest.fixture(scope="module")
def crops_float() -> torch.Tensor:
    x = torch.from_numpy(_fundus(48, seed=3)).permute(2, 0, 1).float()
    x = torch.stack([x, x.flip(-1), x.roll(7, -1), torch.rand(3, 48, 48) * 255, x, x])
    x[:, :, :4] = 30.0  # grey rows
    x[:, 0, 4:6], x[:, 1:, 4:6] = 255.0, 0.0  # pure red, g == b ties
    return x.contiguous()


def _per_crop(fn, crops: torch.Tensor, *args) -> torch.Tensor:
    """Apply an augment_cv op to each crop (CHW float tensor -> HWC array -> back)."""
    out = []
    for i in range(crops.shape[0]):
        x = np.ascontiguousarray(crops[i].permute(1, 2, 0).numpy())
        r = fn(x, *(a[i] if isinstance(a, np.ndarray) else a for a in args))
        out.append(torch.from_numpy(r if r is not None else x).permute(2, 0, 1))
    return torch.stack(out)


def test_hue_matches_torchvision(crops_float):
    shift = np.array([-0.5, -0.1, 0.0, 0.05, 0.1, 0.45])
    y = crops_float.clone()
    adjust_hue_(y, shift)
    ref = torch.stack([F.adjust_hue(crops_float[i] / 255, float(shift[i])) for i in range(6)]) * 255
    assert (y - ref).abs().max() < 0.01
    if augment_cv is not None:  # OpenCV's hexcone HSV: the same function, float32 rounding only
        hsv = np.empty((48, 48, 3), np.float32)
        y = _per_crop(lambda x, s: augment_cv.hue_(x, float(s), hsv), crops_float, shift)
        assert (y - ref).abs().max() < 0.01
    if augment_fused is not None:  # every third of a turn (a channel permutation) and its rest
        for s in (-0.5, -0.45, -0.3, -1 / 6, -0.1, 0.0, 0.05, 0.17, 0.2, 1 / 3, 0.4, 0.5):
            x = crops_float[3].reshape(3, -1).numpy().copy()
            augment_fused._hue_(x, s)
            want = F.adjust_hue(crops_float[3] / 255, s) * 255
            assert (torch.from_numpy(x).reshape(3, 48, 48) - want).abs().max() < 0.01, s


def test_blends_match_torchvision_brightness_contrast_saturation(crops_float):
    factor = np.array([0.6, 1.4, 0.8, 1.2, 1.0, 0.5])
    fns = [F.adjust_saturation, F.adjust_contrast, F.adjust_brightness, F.adjust_saturation, F.adjust_contrast, F.adjust_brightness]
    op = np.array([2, 1, 0, 2, 1, 0])  # saturation, contrast, brightness
    y = crops_float.clone()
    blend_(y, 1 - factor, op == 2, op == 1)
    ref = torch.stack([fns[i](crops_float[i] / 255, float(factor[i])).clamp(0, 1) for i in range(6)]) * 255
    assert (y - ref).abs().max() < 0.05  # luma weights 0.299 vs torchvision's 0.2989
    assert (luma(crops_float) - F.rgb_to_grayscale(crops_float / 255) * 255).abs().max() < 0.05
    if augment_cv is not None:
        y = _per_crop(lambda x, f, o: augment_cv.JITTER_FNS[o](x, float(f)), crops_float, factor, op)
        assert (y - ref).abs().max() < 0.05
        gray = _per_crop(augment_cv.grayscale_, crops_float)
        assert (gray - F.rgb_to_grayscale(crops_float / 255, 3) * 255).abs().max() < 0.05


def test_blur_matches_torchvision_gaussian_blur(crops_float):
    sigma = np.array([0.1, 0.5, 1.0, 1.7, 2.0, 0.3])
    mask = np.array([True, True, True, True, False, True])
    y = crops_float.clone()
    gaussian_blur_(y, mask, sigma)
    for i in range(6):
        r = max(1, math.ceil(3 * sigma[i]))
        ref = F.gaussian_blur(crops_float[i], [2 * r + 1] * 2, [float(sigma[i])] * 2) if mask[i] else crops_float[i]
        assert (y[i] - ref).abs().max() < 1e-3, i
        if augment_cv is not None and mask[i]:
            assert augment_cv.blur_radius(sigma[i], 48) == r
            z = _per_crop(lambda x: augment_cv.gaussian_blur(x, float(sigma[i]), np.empty_like(x)), crops_float[i : i + 1])
            assert (z[0] - ref).abs().max() < 1e-3, i


@pytest.mark.parametrize("backend", BACKENDS)
def test_pipeline_replays_dinos_order_of_ops(backend):
    """End to end: one crop per jitter order, pixels compared with torchvision ops applied in the
    sampled order to the same crop box (uint8 tensors, bicubic antialias, float ops)."""
    cfg = AugmentConfig(
        n_local_crops=0, global_crop_size=40, grayscale_p=0.0, blur_p_global1=0.0, blur_p_global2=0.0, solarize_p_global2=0.0, jitter_p=1.0
    )
    img = torch.from_numpy(_fundus(120, seed=5)).permute(2, 0, 1).contiguous()
    aug = MultiCropAugment(cfg, backend=backend)
    p = aug.sample_params([(120, 120)] * 24, generator=0)
    p.jitter_order[:, 0] = np.arange(24)  # every order once
    out = aug.augment_tensors([img] * 24, params=p)["global_0"]
    for b in range(24):
        top, left, h, w = (int(v[b, 0]) for v in (p.top, p.left, p.height, p.width))
        x = F.resized_crop(img, top, left, h, w, [40, 40], interpolation=F.InterpolationMode.BICUBIC, antialias=True)
        x = (F.horizontal_flip(x) if p.flip[b, 0] else x).float() / 255
        for op in JITTER_ORDERS[p.jitter_order[b, 0]]:
            x = [
                lambda v: F.adjust_brightness(v, p.brightness[b, 0]),
                lambda v: F.adjust_contrast(v, p.contrast[b, 0]),
                lambda v: F.adjust_saturation(v, p.saturation[b, 0]),
                lambda v: F.adjust_hue(v, p.hue[b, 0]),
            ][op](x)
        diff = (out[b].float() - (x * 255).round()).abs()
        assert diff.max() <= 2 and diff.mean() < 0.1, (b, diff.max(), diff.mean())


@pytest.mark.parametrize("backend", BACKENDS)
def test_solarize_grayscale_and_medical_artefacts(backend):
    plain = dict(
        n_local_crops=1,
        global_crop_size=32,
        local_crop_size=32,
        jitter_p=0,
        blur_p_global1=0,
        blur_p_global2=0,
        blur_p_local=0,
        grayscale_p=0,
        flip_p=0,
        global_crop_scale=(1.0, 1.0),
        local_crop_scale=(1.0, 1.0),
    )
    cfg = AugmentConfig(**plain)
    img = torch.from_numpy(_fundus(32, seed=1)).permute(2, 0, 1).contiguous()
    aug = MultiCropAugment(cfg, backend=backend)
    p = aug.sample_params([(32, 32)], generator=0)
    p.solarize[:] = True
    out = {k: v[0] for k, v in aug.augment_tensors([img], params=p).items()}
    assert torch.equal(out["global_0"], img) and torch.equal(out["local_0"], img)  # solarize: global 2 only
    assert torch.equal(out["global_1"], torch.where(img >= 128, 255 - img, img))
    p.solarize[:], p.grayscale[:] = False, True
    g = aug.augment_tensors([img], params=p)["global_0"][0]
    assert torch.equal(g[0], g[1]) and torch.equal(g[1], g[2])
    med = AugmentConfig(preset="weak_med", **plain)
    m = MultiCropAugment(med, backend=backend)
    p = m.sample_params([(32, 32)] * 200, generator=1)
    noisy = m.augment_tensors([img] * 200, params=p)["global_0"].float()
    change = (noisy - img.float()).abs().mean(dim=(1, 2, 3)).numpy()
    applied = p.noise[:, 0] | p.bias_field[:, 0]
    assert np.array_equal(change > 0, applied)  # med blur at sigma 0.1 leaves pixels alone
    assert (change[p.noise[:, 0]] > 5).all()  # noise std 0.1 on [0, 1] = 25.5 grey levels
    assert 0.65 < applied.mean() < 0.85  # 1 - 0.5 * 0.5
    field = bias_field_maps(np.full((1, 10), 0.1), 16, 16, torch.device("cpu"))
    assert field.min() >= math.exp(-1.0) - 1e-4 and abs(field.max() - math.exp(1.0)) < 1e-3  # all 10 terms at +0.1


def test_normalize_matches_torchvision():
    u8 = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    ref = F.normalize(u8.float() / 255, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert torch.allclose(normalize(u8), ref, atol=1e-5)


# ------------------------------------------------------------------ decode at reduced size; device pipeline


def test_jpeg_draft_decode_keeps_the_crops():
    big = jpeg_bytes(_fundus(1600, seed=2), quality=95)
    cfg = AugmentConfig(
        preset="weak",
        global_crop_size=64,
        local_crop_size=32,
        n_local_crops=2,
        jitter_p=0,
        blur_p_global1=0,
        blur_p_global2=0,
        blur_p_local=0,
        grayscale_p=0,
        solarize_p_global2=0,
    )
    aug = MultiCropAugment(cfg)
    p = aug.sample_params([(1600, 1600)] * 4, generator=0)
    assert (draft_scales(p, aug.out_size) >= 4).all()  # 1600 px, >= 0.5 area -> 1/4 or 1/8
    fast = aug.augment_tensors([big] * 4, params=p)
    full = torch.from_numpy(np.array(Image.open(io.BytesIO(big)).convert("RGB"))).permute(2, 0, 1)
    slow = aug.augment_tensors([full] * 4, params=p)
    for k in fast:
        mse = ((fast[k].float() - slow[k].float()) ** 2).mean()
        assert 10 * math.log10(255**2 / mse) > 30, k  # PSNR > 30 dB: the same crops


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
@pytest.mark.parametrize("options", [{}, {"progressive": True}, {"subsampling": 0}, {"restart_marker_blocks": 1}])
def test_image_size_reads_the_jpeg_frame_header(mode, options):
    """`image_size` parses a JPEG's frame header itself (Pillow's open cost ~20 us an image); it
    must agree with Pillow on every kind of JPEG, with or without EXIF, and for other formats."""
    im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (37, 53, 3), dtype=np.uint8)).convert(mode)
    for exif in (b"", _exif(6)):
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=80, exif=exif, **options)
        data = buf.getvalue()
        with Image.open(io.BytesIO(data)) as ref:
            want = (ref.width, ref.height) if exif else (ref.height, ref.width)  # orientation 6 turns it by 90 degrees
        assert image_size(data) == want == ((53, 37) if exif else (37, 53))
    png = io.BytesIO()
    im.convert("RGB").save(png, "PNG")
    assert image_size(png.getvalue()) == (37, 53)
    truncated = data[: data.index(b"\xff\xc0") if b"\xff\xc0" in data else data.index(b"\xff\xc2")]  # cut before the frame header
    with pytest.raises(OSError):  # no frame header: Pillow is asked, and says it cannot read it
        image_size(truncated)


@pytest.mark.parametrize("draft", [1, 2, 4, 8])
def test_jpeg_decoders_give_pillows_pixels(draft, monkeypatch):
    """`decode` (simplejpeg when installed, else torchvision or Pillow) gives Pillow's pixels at full
    size and in draft mode, on every kind of JPEG, sizes that are no multiple of the factor included;
    a JPEG simplejpeg refuses (CMYK) falls back to the other decoders."""
    rgb = _fundus(300, seed=5)[:, :269]  # 300 x 269
    for mode, options in [("RGB", {}), ("RGB", {"subsampling": 0}), ("RGB", {"progressive": True}), ("L", {}), ("CMYK", {})]:
        buf = io.BytesIO()
        Image.fromarray(rgb).convert(mode).save(buf, "JPEG", quality=85, **options)
        data = buf.getvalue()
        with Image.open(io.BytesIO(data)) as im:
            if draft > 1:
                im.draft("RGB", (im.width // draft, im.height // draft))
            want = np.asarray(im.convert("RGB"))
        assert want.shape[:2] == (-(-300 // draft), -(-269 // draft))
        for fast in (True, False):
            if not fast:
                monkeypatch.setattr(decode_module, "simplejpeg", None)
            got = decode_module.decode(data, draft).permute(1, 2, 0).numpy()
            if mode == "CMYK" and draft == 1:  # torchvision's CMYK conversion, not Pillow's: the same image within a few levels
                assert got.shape == want.shape and np.abs(got.astype(int) - want).mean() < 3, (mode, options, fast)
            else:
                assert np.array_equal(got, want), (mode, options, fast)
            monkeypatch.undo()


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def _agree(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    for k in a:
        diff = (a[k].int() - b[k].int()).abs()
        assert diff.max() <= 1 and diff.float().mean() < 1e-3, (k, diff.max(), diff.float().mean())


@needs_cv
@pytest.mark.parametrize("preset", ["strong", "weak_med"])
def test_opencv_and_torch_backends_agree(jpeg256, preset):
    """Same draws, same crops: the two CPU backends differ by float rounding only (+-1 grey level).
    The Gaussian noise is drawn per crop (opencv) or per batch (torch), so it is off here."""
    cfg = AugmentConfig(preset=preset, global_crop_size=64, local_crop_size=32, n_local_crops=4, noise_p=0.0)
    fast, batched = MultiCropAugment(cfg, backend="opencv"), MultiCropAugment(cfg, backend="torch")
    p = fast.sample_params([(256, 256)] * 24, generator=2)
    _agree(fast.augment_tensors([jpeg256] * 24, params=p), batched.augment_tensors([jpeg256] * 24, params=p))
    with pytest.raises(ValueError, match="backend='gpu'.*allowed"):
        MultiCropAugment(cfg, backend="gpu")


@needs_numba
@needs_cv
@pytest.mark.parametrize("preset", ["strong", "weak", "weak_med"])
def test_fused_backend_matches_opencv_and_torch(jpeg256, preset):
    """The Numba backend computes the same functions as the OpenCV one, with the same per-crop
    noise streams (so here the noise stays on) and the same blur kernels (sigma up to 2: up to 13
    taps, the reflect border), +-1 grey level; and matches the batched torch backend without noise.
    Every kind of input: JPEG bytes, an HWC array, a greyscale one (a stride-0 channel view), an
    RGBA tensor (a channel slice), and a JPEG decoded in draft mode (boxes in reduced coordinates)."""
    cfg = AugmentConfig(preset=preset, global_crop_size=64, local_crop_size=32, n_local_crops=4)
    fused, cv = MultiCropAugment(cfg, backend="fused"), MultiCropAugment(cfg, backend="opencv")
    assert MultiCropAugment(cfg).backend == "fused"  # auto picks the fastest installed backend
    arr = _fundus(256, seed=3)
    rgba = torch.from_numpy(np.concatenate([arr, np.full((256, 256, 1), 255, np.uint8)], -1)).permute(2, 0, 1)
    inputs = [jpeg256] * 12 + [arr] * 4 + [arr[:, :, 1].copy()] * 4 + [rgba] * 4
    p = fused.sample_params([(256, 256)] * 24, generator=5)
    assert p.flip.any() and p.blur.any() and (p.blur_sigma[p.blur] > 1.7).any()
    a = fused.augment_tensors(inputs, params=p)
    _agree(a, cv.augment_tensors(inputs, params=p))
    one_by_one = MultiCropAugment(cfg, backend="fused")
    one_by_one.group_bytes = 1  # groups of one image: the phases must not change a pixel
    b = one_by_one.augment_tensors(inputs[:11], params=p.select(np.arange(11), slice(None)))
    assert all(torch.equal(a[k][:11], b[k]) for k in a)
    if preset != "weak_med":
        _agree(a, MultiCropAugment(cfg, backend="torch").augment_tensors(inputs, params=p))
    big = jpeg_bytes(_fundus(1024, seed=4), quality=90)
    small = AugmentConfig(preset=preset, global_crop_size=48, local_crop_size=24, n_local_crops=2, global_crop_scale=(0.5, 1.0))
    f2, c2 = MultiCropAugment(small, backend="fused"), MultiCropAugment(small, backend="opencv")
    p = f2.sample_params([(1024, 1024)] * 4, generator=6)
    assert (draft_scales(p, f2.out_size) >= 2).all()
    _agree(f2.augment_tensors([big] * 4, params=p), c2.augment_tensors([big] * 4, params=p))


def test_device_pipeline_on_cpu_matches_and_normalizes(jpeg256):
    cfg = AugmentConfig(preset="weak_med", global_crop_size=48, local_crop_size=24, n_local_crops=3)
    cpu, dev = MultiCropAugment(cfg, backend="torch"), DeviceMultiCropAugment(cfg, device="cpu")
    p = cpu.sample_params([(256, 256)] * 6, generator=4)
    a, b = cpu.augment_tensors([jpeg256] * 6, params=p), dev.augment_tensors([jpeg256] * 6, params=p)
    for k in a:
        assert a[k].shape == b[k].shape and b[k].dtype == torch.uint8
        assert (a[k].int() - b[k].int()).abs().max() <= 1
    norm = DeviceMultiCropAugment(cfg, device="cpu", normalize=True).augment_tensors([jpeg256] * 6, params=p)
    assert norm["global_0"].dtype == torch.float32
    assert torch.allclose(norm["global_0"], normalize(b["global_0"]), atol=1e-5)
    assert isinstance(build_augment(cfg), MultiCropAugment) and not isinstance(build_augment(cfg), DeviceMultiCropAugment)
    assert isinstance(build_augment(cfg, device="cpu"), DeviceMultiCropAugment)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="augment.device"):
            DeviceMultiCropAugment(cfg, device="cuda")
