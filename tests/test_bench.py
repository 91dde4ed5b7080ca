"""`python -m raydino.bench`: every subcommand end to end on tiny inputs (no timing asserted).

One local Ray for the module (conftest's `local_ray`: the train and data benches use an instance
that is already up and leave it running).  Checks the JSON each bench writes, that its ratios are
finite, that the PNG exists, and the pure helpers (data-wait from metrics rows, the ABBA order) on known inputs.
"""

from __future__ import annotations

import json
import math

import pytest

from raydino.bench import __main__ as bench
from raydino.bench.train import data_wait_from_metrics


def _finite(*values: float) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def test_aug(tmp_path, capsys):
    out = tmp_path / "aug.json"
    assert bench.main(["aug", "--images", "4", "--batch", "4", "--rounds", "1", "--size", "128", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    names = [r["pipeline"] for r in result["results"]]
    assert names[0].startswith("decode") and any(n.startswith("reference") for n in names)
    assert any(n.startswith("raydino augment_batch") for n in names)
    assert all(_finite(r["images_per_s_per_core"], r["vs_reference"]) and len(r["rounds_per_core"]) == 1 for r in result["results"])
    assert out.with_suffix(".png").stat().st_size > 1000
    assert "raydino / reference DINO" in capsys.readouterr().out


def test_aug_at_several_sizes_gives_a_table_per_size_and_the_planner_reads_each(tmp_path, capsys):
    from raydino.runs.planning import aug_rates, nearest_aug

    out = tmp_path / "aug.json"
    assert bench.main(["aug", "--images", "4", "--batch", "4", "--rounds", "1", "--size", "96,160", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["sizes"] == [96, 160] and [r["size"] for r in result["by_size"]] == [96, 160]
    assert all(any(row["pipeline"].startswith("reference") for row in r["results"]) for r in result["by_size"])
    printed = capsys.readouterr().out
    assert "  96px" in printed and " 160px" in printed
    assert out.with_suffix(".png").stat().st_size > 1000
    rates = aug_rates([(out, result)], result["crops"])
    assert sorted(r.size for r in rates) == [96, 160]
    assert nearest_aug(rates, 150, tmp_path, result["crops"]).size == 160
    with pytest.raises(SystemExit):
        bench.main(["aug", "--size", "512,32"])
    assert "every size must be >= 64 px" in capsys.readouterr().err


def test_shardsize_caps_the_camera_images_and_reports_both_ratios(tmp_path, capsys):
    out = tmp_path / "shardsize.json"
    argv = ["shardsize", "--images", "2", "--size", "640x480", "--max-side", "128", "--rounds", "1", "--batch", "2", "--json", str(out)]
    assert bench.main(argv) == 0
    result = json.loads(out.read_text())
    as_found, capped, fov = result["runs"]
    assert as_found["stored_size"] == "640x480" and max(int(v) for v in capped["stored_size"].split("x")) == 128
    # 640x480 capped to 128 px stores ~1/25 of the pixels: far fewer bytes, faster augmentation
    assert capped["bytes_vs_as_found"] < 0.5 and fov["bytes_vs_as_found"] < 0.5 and result["bytes_ratio"] == fov["bytes_vs_as_found"]
    assert all(_finite(v) for v in result["images_per_s_ratio"].values())
    assert [m["method"].split(" ")[0] for m in result["resize_methods"]] == ["full", "full", "DCT-scaled"]
    assert all(m["psnr_vs_full_lanczos_db"] > 25 for m in result["resize_methods"][1:])
    assert out.with_suffix(".png").stat().st_size > 1000
    assert "/ as found: bytes" in capsys.readouterr().out


@pytest.mark.slow
def test_train(tmp_path, capsys, local_ray):
    out = tmp_path / "bench"
    assert (
        bench.main(
            [
                "train",
                "--set",
                "model.out_dim=64",
                "--set",
                "model.head_hidden_dim=32",
                "--set",
                "model.head_bottleneck_dim=16",
                "--set",
                "train.batch_size=2",
                "--steps",
                "2",
                "--warmup",
                "1",
                "--rounds",
                "1",
                "--no-smoke",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads((out / "train.json").read_text())
    for key in ("plain_ddp", "ray_train"):
        s = result[key]
        assert len(s["step_s"]) == 2 and _finite(s["median_step_s"], *s["step_s"])
        assert len(s["peak_rss_mb_per_worker"]) == 2 and all(m > 50 for m in s["peak_rss_mb_per_worker"])
    assert _finite(result["ratio_ray_over_ddp"]) and result["order"] == ["ddp", "ray"]
    assert "smoke_data_wait" not in result
    assert (out / "train.png").stat().st_size > 1000
    assert "Ray Train / plain DDP step time" in capsys.readouterr().out


@pytest.mark.slow
def test_checkpoint_stall_sync_vs_async(tmp_path, capsys, local_ray):
    out = tmp_path / "ckpt.json"
    args = ["ckpt", "--config", "smoke", "--checkpoints", "3", "--gap", "0.2", "--rounds", "1", "--json", str(out)]
    assert bench.main(args) == 0
    result = json.loads(out.read_text())
    assert [r["mode"] for r in result["runs"]] == ["sync", "async"]
    for r in result["runs"]:
        assert len(r["stalls_s"]) == 3 and _finite(*r["stalls_s"])
        assert r["checkpoint_bytes"] > 1_000_000  # the DINO state reached storage in both modes
    assert _finite(result["sync"]["median_stall_s"], result["async"]["median_stall_s"], result["ratio_sync_over_async"])
    assert out.with_suffix(".png").stat().st_size > 1000
    assert "synchronous vs" in capsys.readouterr().out


@pytest.mark.slow
def test_data(tmp_path, capsys, local_ray):
    out = tmp_path / "data.json"
    assert (
        bench.main(
            [
                "data",
                "--sizes",
                "40",
                "120",
                "--image-size",
                "32",
                "--batch",
                "8",
                "--rate",
                "400",
                "--interval",
                "0.1",
                "--cache",
                str(tmp_path / "cache"),
                "--json",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert [r["dataset_images"] for r in result["runs"]] == [40, 120]
    for run in result["runs"]:
        assert run["images"] == run["pretrain_rows"] > 0  # one whole epoch was consumed
        assert 0 <= run["data_wait_fraction"] <= 1 and run["peak_total_mb"] > 0 and run["samples"]
        assert run["peak_total_mb"] >= run["peak_object_store_mb"]
    assert _finite(result["peak_ratio_large_over_small"], result["driver_and_store_ratio_large_over_small"], result["unthrottled"]["images_per_s"])
    assert all(r["shards"] >= 1 for r in result["runs"])
    assert out.with_suffix(".png").stat().st_size > 1000
    assert "peak memory, largest / smallest dataset" in capsys.readouterr().out


def test_data_wait_from_metrics_weights_windows_by_length():
    rows = [  # batch 4 x 2 workers = 8 images per step
        {"step": 2, "epoch": 0, "images_per_s": 4.0, "data_wait_fraction": 0.75},  # 16 images in 4 s, 3 s waiting
        {"step": 4, "epoch": 0, "images_per_s": 16.0, "data_wait_fraction": 0.0},  # 1 s, no wait
        {"step": 6, "epoch": 1, "images_per_s": 16.0, "data_wait_fraction": 0.5},  # 1 s, 0.5 s waiting
        {"step": 6, "loss": 1.0},  # a row without timing (ignored)
    ]
    w = data_wait_from_metrics(rows, batch_size=4, workers=2)
    assert w["windows"] == 3 and w["train_seconds"] == pytest.approx(6.0)
    assert w["overall"] == pytest.approx(3.5 / 6.0)
    assert w["after_start"] == pytest.approx(0.5 / 2.0)
    assert w["steady"] == pytest.approx(0.0)  # only step 4's window is not the first of its epoch
    assert data_wait_from_metrics([], 4, 2)["overall"] is None


def test_bad_arguments_name_the_option(capsys):
    with pytest.raises(SystemExit):
        bench.main(["aug", "--images", "0"])
    assert "--images=0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["data", "--sizes", "0"])
    assert "--sizes" in capsys.readouterr().err


def test_bootstrap_bench_scores_the_same_intervals_both_ways(tmp_path, capsys):
    out = tmp_path / "bootstrap.json"
    args = ["bootstrap", "--cases", "40", "--classes", "3", "--seeds", "2", "--resamples", "40", "--reference-resamples", "10", "--rounds", "1"]
    assert bench.main([*args, "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["max_interval_difference"] < 1e-9 and _finite(r["ratio_reference_over_raydino"])
    assert {len(v) for v in r["seconds_per_1000_resamples"].values()} == {1}
    assert out.with_suffix(".png").stat().st_size > 1000
    assert "ratio reference / raydino" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.main(["bootstrap", "--classes", "1"])
    assert "--classes=1" in capsys.readouterr().err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_gpu_bench_without_cuda_says_so(capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.main(["gpu", "--steps", "1"])
    assert exit_.value.code == 2
    assert "no CUDA device is visible here" in capsys.readouterr().err
