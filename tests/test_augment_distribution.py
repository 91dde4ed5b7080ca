"""Same augmentation, proven: raydino's random draws against DINO's reference pipeline.

Many draws from raydino (`sample_params`) and from the PIL/torchvision reference written in
`raydino.bench.aug` (`ReferenceDINOAugment.draw`, the reference's own get_params / torch.rand /
random calls) are compared with two-sample tests: Kolmogorov-Smirnov for crop area fraction,
aspect ratio, jitter factors and blur sigma per crop kind; Fisher's exact test for the flip,
jitter, grayscale, blur and solarize rates; chi-square for the jitter op order.  The negative
checks show the same tests reject when a preset's numbers are not honoured (weak vs strong,
a changed blur probability, a changed flip probability).
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from scipy import stats

from raydino.augment.cpu import MultiCropAugment
from raydino.augment.params import JITTER_ORDERS
from raydino.bench.aug import ReferenceDINOAugment
from raydino.config import AugmentConfig

N_IMAGES = 2000
H = W = 512
SAME, DIFFERENT = 1e-3, 1e-6  # p-value thresholds: accept "same" above, "different" below


def raydino_draws(cfg: AugmentConfig, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    p = MultiCropAugment(cfg).sample_params([(H, W)] * N_IMAGES, generator=seed)
    kinds = {"global1": [0], "global2": [1], "local": list(range(2, 2 + cfg.n_local_crops))}
    out = {}
    for kind, cols in kinds.items():
        jit = p.jitter[:, cols].ravel()
        order = p.jitter_order[:, cols].ravel()[jit]
        out[kind] = {
            "area": p.area_fraction[:, cols].ravel(),
            "ratio": p.aspect_ratio[:, cols].ravel(),
            "flip": p.flip[:, cols].ravel(),
            "jitter": jit,
            "grayscale": p.grayscale[:, cols].ravel(),
            "blur": p.blur[:, cols].ravel(),
            "blur_sigma": p.blur_sigma[:, cols].ravel()[p.blur[:, cols].ravel()],
            "solarize": p.solarize[:, cols].ravel(),
            "brightness": p.brightness[:, cols].ravel()[jit],
            "contrast": p.contrast[:, cols].ravel()[jit],
            "saturation": p.saturation[:, cols].ravel()[jit],
            "hue": p.hue[:, cols].ravel()[jit],
            "order": np.array([tuple(o) for o in JITTER_ORDERS[order]], dtype=np.int64).reshape(-1, 4),
        }
    return out


def reference_draws(cfg: AugmentConfig, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    torch.manual_seed(seed)
    random.seed(seed)
    ref = ReferenceDINOAugment(cfg)
    rows: dict[str, list[dict]] = {"global1": [], "global2": [], "local": []}
    for _ in range(N_IMAGES):
        for d in ref.draw(H, W):
            rows[d["kind"]].append(d)
    out = {}
    for kind, rs in rows.items():
        jit = [r for r in rs if r["jitter"]]
        out[kind] = {
            "area": np.array([r["height"] * r["width"] / (H * W) for r in rs]),
            "ratio": np.array([r["width"] / r["height"] for r in rs]),
            "flip": np.array([r["flip"] for r in rs]),
            "jitter": np.array([r["jitter"] for r in rs]),
            "grayscale": np.array([r["grayscale"] for r in rs]),
            "blur": np.array([r["blur"] for r in rs]),
            "blur_sigma": np.array([r["blur_sigma"] for r in rs if r["blur"]]),
            "solarize": np.array([r.get("solarize", False) for r in rs]),
            "brightness": np.array([r["brightness"] for r in jit]),
            "contrast": np.array([r["contrast"] for r in jit]),
            "saturation": np.array([r["saturation"] for r in jit]),
            "hue": np.array([r["hue"] for r in jit]),
            "order": np.array([r["order"] for r in jit], dtype=np.int64).reshape(-1, 4),
        }
    return out


CONTINUOUS = ("area", "ratio", "brightness", "contrast", "saturation", "hue", "blur_sigma")
RATES = ("flip", "jitter", "grayscale", "blur", "solarize")


def compare(a: dict, b: dict) -> dict[str, float]:
    """p-values of every two-sample test, keyed 'kind/statistic'."""
    pvals = {}
    for kind in a:
        x, y = a[kind], b[kind]
        for name in CONTINUOUS:
            if len(x[name]) > 20 and len(y[name]) > 20:
                pvals[f"{kind}/{name}"] = stats.ks_2samp(x[name], y[name]).pvalue
        for name in RATES:
            table = [[x[name].sum(), (~x[name]).sum()], [y[name].sum(), (~y[name]).sum()]]
            pvals[f"{kind}/{name}"] = stats.fisher_exact(table).pvalue
        perm_ids = lambda o: (o * np.array([64, 16, 4, 1])).sum(1)  # noqa: E731 - an order as one integer
        ids = np.union1d(perm_ids(x["order"]), perm_ids(y["order"]))
        counts = [[int((perm_ids(z["order"]) == i).sum()) for i in ids] for z in (x, y)]
        pvals[f"{kind}/order"] = stats.chi2_contingency(counts).pvalue
    return pvals


@pytest.fixture(scope="module")
def reference_strong():
    return reference_draws(AugmentConfig(preset="strong"), seed=1)


@pytest.fixture(scope="module")
def reference_weak():
    return reference_draws(AugmentConfig(preset="weak"), seed=2)


def test_strong_matches_dinos_reference(reference_strong):
    pvals = compare(raydino_draws(AugmentConfig(preset="strong"), seed=3), reference_strong)
    assert len(pvals) >= 3 * 12
    bad = {k: v for k, v in pvals.items() if v < SAME}
    assert not bad, bad


def test_weak_matches_the_reference_built_with_weak_numbers(reference_weak):
    pvals = compare(raydino_draws(AugmentConfig(preset="weak"), seed=4), reference_weak)
    bad = {k: v for k, v in pvals.items() if v < SAME}
    assert not bad, bad


def test_weak_against_strong_is_detected(reference_strong):
    pvals = compare(raydino_draws(AugmentConfig(preset="weak"), seed=5), reference_strong)
    for stat in ("global1/area", "global2/area", "local/area", "local/brightness", "local/contrast"):
        assert pvals[stat] < DIFFERENT, (stat, pvals[stat])
    assert pvals["local/saturation"] > SAME  # weak keeps DINO's saturation and hue
    assert pvals["local/hue"] > SAME


@pytest.mark.parametrize(
    "override, detected",
    [
        ({"blur_p_local": 0.4}, "local/blur"),
        ({"flip_p": 0.45}, "local/flip"),
        ({"solarize_p_global2": 0.1}, "global2/solarize"),
        ({"grayscale_p": 0.25}, "local/grayscale"),
        ({"local_crop_scale": (0.05, 0.35)}, "local/area"),
        ({"crop_ratio": (0.7, 1.4)}, "local/ratio"),
    ],
)
def test_a_changed_number_is_detected(reference_strong, override, detected):
    pvals = compare(raydino_draws(AugmentConfig(preset="strong", **override), seed=6), reference_strong)
    assert pvals[detected] < DIFFERENT, (detected, pvals[detected])
