"""Pretraining's evidence: the paired pretrained-vs-random difference, the raw-pixel baseline, and the
epoch-end probe that shows learning during a run (raydino.eval.metrics, .compare, .monitor)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from raydino.data import labelled
from raydino.eval import backbones, compare, metrics, monitor
from raydino.runs.tracking import RunTracker, plot_loss, read_metrics

from helpers.images import make_tree


def _scores(rng, y, n_classes, signal):
    s = rng.random((len(y), n_classes)) + signal * np.eye(n_classes)[y]
    return s / s.sum(1, keepdims=True)


@pytest.mark.parametrize("n_classes", [2, 3, 5])
def test_macro_auroc_is_compute_metrics_auroc(n_classes):
    rng = np.random.default_rng(n_classes)
    y = rng.integers(0, n_classes, 150)
    for signal in (0.0, 0.4):
        s = _scores(rng, y, n_classes, signal)
        assert metrics.macro_auroc(y, s, n_classes) == pytest.approx(metrics.compute_metrics(y, s, n_classes)["auroc"], abs=1e-12)


@pytest.mark.parametrize(("n_classes", "ordinal", "stratified"), [(2, False, True), (3, False, False), (5, True, True), (5, False, False)])
def test_all_resamples_at_once_score_as_compute_metrics_on_each(n_classes, ordinal, stratified):
    """The bootstrap scores its resamples in blocks (`raydino.eval.resampled`): every metric the same as
    scikit-learn's through compute_metrics on each resample alone, ties included (scores rounded to 1
    decimal), undefined ones (a class drawn zero times in a plain resample, kappa of one class) NaN."""
    from raydino.eval import resampled

    rng = np.random.default_rng(n_classes)
    y = rng.integers(0, n_classes, 60)
    y[:3] = n_classes - 1  # a rare class: plain resamples sometimes miss it
    y[3:] = np.where(y[3:] == n_classes - 1, 0, y[3:])
    s = np.round(_scores(rng, y, n_classes, 0.3), 1)
    idx = np.stack([metrics.stratified_resample(y, rng) if stratified else rng.integers(0, len(y), len(y)) for _ in range(40)])
    idx[0] = 0  # one resample of a single case: most metrics undefined
    got = resampled.resampled_metrics(y, s, resampled.resample_counts(idx, len(y)), n_classes, metrics.kappa_weighting(ordinal))
    for r, i in enumerate(idx):
        want = metrics.compute_metrics(y[i], s[i], n_classes, ordinal)
        for m in metrics.METRICS:
            expected = np.nan if want[m] is None else want[m]
            np.testing.assert_allclose(got[m][r], expected, atol=1e-12, err_msg=f"{m}, resample {r}")
    macro = resampled.resampled_macro_auroc(y, s, idx, n_classes)
    np.testing.assert_allclose(macro, [np.nan if (v := metrics.macro_auroc(y[i], s[i], n_classes)) is None else v for i in idx], atol=1e-12)


def test_bootstrap_intervals_are_those_of_the_resamples_scored_one_by_one():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 80)
    seeds = [_scores(rng, y, 4, 0.4), _scores(rng, y, 4, 0.2)]
    ci = metrics.bootstrap_intervals(y, seeds, 4, n_resamples=60, ordinal=True)
    draw = np.random.default_rng(0)  # bootstrap_intervals' default seed: the same resamples
    loop = {m: [] for m in metrics.METRICS}
    for _ in range(60):
        i = metrics.stratified_resample(y, draw)
        mean, _ = metrics.mean_metrics([metrics.compute_metrics(y[i], sc[i], 4, True) for sc in seeds])
        for m in metrics.METRICS:
            if mean[m] is not None:
                loop[m].append(mean[m])
    bad = seeds[1].copy()
    bad[5, 2] = np.nan  # a diverged probe: refused by name, as compute_metrics does, not scored as NaN intervals
    with pytest.raises(ValueError, match="1 non-finite scores"):
        metrics.bootstrap_intervals(y, [seeds[0], bad], 4, n_resamples=10)
    for m in metrics.METRICS:
        assert ci[m]["n_valid"] == len(loop[m])
        assert (ci[m]["low"], ci[m]["high"]) == pytest.approx((np.quantile(loop[m], 0.025), np.quantile(loop[m], 0.975)), abs=1e-12), m


def test_paired_difference_finds_a_real_gap_and_none_where_there_is_none():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    good, chance = _scores(rng, y, 3, 0.5), _scores(rng, y, 3, 0.0)
    d = metrics.paired_bootstrap_difference(y, good, chance, 3, n_resamples=500)
    expected = metrics.compute_metrics(y, good, 3)["auroc"] - metrics.compute_metrics(y, chance, 3)["auroc"]
    assert d["difference"] == pytest.approx(expected) and d["low"] > 0 and d["low"] < d["difference"] < d["high"]
    same = metrics.paired_bootstrap_difference(y, good, good, 3, n_resamples=200)
    assert same["difference"] == 0 and same["low"] == 0 and same["high"] == 0  # paired: identical models never differ
    loop = []  # the same resamples scored one at a time
    rng_loop = np.random.default_rng(0)
    for _ in range(500):
        i = metrics.stratified_resample(y, rng_loop)
        loop.append(metrics.macro_auroc(y[i], good[i], 3) - metrics.macro_auroc(y[i], chance[i], 3))
    assert (d["low"], d["high"]) == pytest.approx((np.quantile(loop, 0.025), np.quantile(loop, 0.975)), abs=1e-12)
    flipped = metrics.paired_bootstrap_difference(y, chance, good, 3, n_resamples=500)
    assert flipped["high"] < 0
    # Per-seed scores: each side is the mean over its seeds, as reported
    seeds_a, seeds_b = [good, _scores(rng, y, 3, 0.3)], [chance, _scores(rng, y, 3, 0.1)]
    per_seed = metrics.paired_bootstrap_difference(y, seeds_a, seeds_b, 3, n_resamples=100)
    auroc = lambda s: metrics.compute_metrics(y, s, 3)["auroc"]  # noqa: E731
    assert per_seed["difference"] == pytest.approx(np.mean([auroc(s) for s in seeds_a]) - np.mean([auroc(s) for s in seeds_b]))


def test_compare_backbones_probes_three_inputs_on_one_test_set(tmp_path):
    data = labelled.load_labelled(make_tree(tmp_path / "tree", per_split=(8, 4, 4), n_classes=2))
    torch.manual_seed(0)
    a, b = backbones.new_backbone("vit_tiny_patch16_224", 32).eval(), backbones.new_backbone("vit_tiny_patch16_224", 32).eval()
    result = compare.compare_backbones(a, b, data, 32, n_resamples=200)
    assert set(result["rows"]) == {"pretrained", "random_init", "raw_pixels"}
    assert all(0 <= row["auroc"] <= 1 for row in result["rows"].values())
    assert result["rows"]["raw_pixels"]["auroc"] > 0.9  # the class is the disc's colour: pixels see it
    d = result["difference"]
    assert d["difference"] == pytest.approx(result["rows"]["pretrained"]["auroc"] - result["rows"]["random_init"]["auroc"])
    line = compare.comparison_line(result)
    assert re.fullmatch(
        r"test AUROC \d\.\d{3} pretrained vs \d\.\d{3} random init, difference [+-]\d\.\d{3} "
        r"\[95% CI [+-]\d\.\d{3}, [+-]\d\.\d{3}\] \(paired bootstrap\)", line), line  # fmt: skip
    assert compare.pixel_features(torch.zeros(3, 3, 8, 8, dtype=torch.uint8)).shape == (3, 192)


def test_monitor_scores_val_and_never_reads_test(tmp_path):
    root = make_tree(tmp_path / "tree", per_split=(6, 3, 3), n_classes=2)
    for f in (root / "test").rglob("*.png"):
        f.write_bytes(b"not an image")  # decoding the test split would fail
    data = labelled.load_labelled(root)
    vit = backbones.new_backbone("vit_tiny_patch16_224", 32).eval()
    for kind in ("fast", "knn"):
        m = monitor.ProbeMonitor(data, 32, kind)
        value, seconds = m.val_auroc(vit)
        assert 0 <= value <= 1 and seconds >= 0 and m.n_val == 6
        assert set(m.last_seconds) == {"features", "fit"} and sum(m.last_seconds.values()) == pytest.approx(seconds, abs=0.01)
    with pytest.raises(ValueError, match="probe.monitor='paper'"):
        monitor.ProbeMonitor(data, 32, "paper")


def test_background_probe_fits_beside_training_and_hands_back_each_probe_in_order(tmp_path, monkeypatch):
    import threading

    root = make_tree(tmp_path / "tree", per_split=(6, 3, 3), n_classes=2)
    data = labelled.load_labelled(root)
    vit = backbones.new_backbone("vit_tiny_patch16_224", 32).eval()
    m = monitor.ProbeMonitor(data, 32, "fast")
    expected, _ = m.val_auroc(vit)
    before = m.features(vit)["val"]
    release, fitted_on, fitted_feats = threading.Event(), [], []
    score = monitor.ProbeMonitor.score

    def held_score(self, feats):
        fitted_on.append(threading.current_thread() is not threading.main_thread())
        fitted_feats.append(feats["val"])
        assert release.wait(30)  # the fit waits until the test lets it go
        return score(self, feats)

    monkeypatch.setattr(monitor.ProbeMonitor, "score", held_score)
    probes = monitor.BackgroundProbe(m)
    try:
        probes.submit(vit, step=0, epoch=0)  # returns once the features are taken, the fit still held
        torch.manual_seed(0)
        with torch.no_grad():
            for p in vit.parameters():
                p.add_(torch.randn_like(p))  # training goes on: the next probe sees other weights, this one keeps its features
        probes.submit(vit, step=10, epoch=1)
        assert probes.finished() == []
        release.set()
        done = probes.finished(wait=True)
    finally:
        probes.close()
    assert [(step, epoch) for step, epoch, _ in done] == [(0, 0), (10, 1)] and probes.finished() == []
    assert fitted_on == [True, True]
    first = done[0][2]
    assert first["probe_val_auroc"] == pytest.approx(expected) and first["probe_kind"] == "fast" and first["probe_n_val"] == 6
    assert first["probe_seconds"] == pytest.approx(first["probe_features_seconds"] + first["probe_fit_seconds"], abs=0.02)
    # each probe fitted the features of the weights it was submitted with
    assert np.array_equal(fitted_feats[0], before) and not np.allclose(fitted_feats[1], before)


def test_epoch_probe_is_logged_printed_and_plotted(tmp_path):
    lines: list[str] = []
    tracker = RunTracker(tmp_path, total_steps=20, total_epochs=2, printer=lines.append)
    for step in (5, 10):
        tracker.log(step, 0, {"loss": 8.0 - step / 10, "teacher_entropy": 3.0})
    tracker.log_probe(10, 1, {"probe_val_auroc": 0.61, "probe_kind": "fast", "probe_n_val": 9, "probe_seconds": 1.2})
    tracker.log_probe(
        20,
        2,
        {
            "probe_val_auroc": 0.62,
            "probe_kind": "fast",
            "probe_n_val": 9,
            "probe_seconds": 42.0,
            "probe_features_seconds": 40.2,
            "probe_fit_seconds": 1.8,
        },
    )
    tracker.close()
    assert "[raydino] epoch 1/2 done: teacher's val AUROC 0.610 (fast probe, 9 val images, 1s)" in lines
    assert lines[-1].endswith("(fast probe, 9 val images, 42s: features 40s, fit 2s)"), lines[-1]
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert rows[-2]["probe_val_auroc"] == 0.61 and rows[-2]["epoch"] == 1 and rows[-1]["probe_fit_seconds"] == 1.8
    png = plot_loss(tmp_path / "metrics.jsonl", tmp_path / "loss.png")
    assert png is not None and png.stat().st_size > 1000
