"""`python -m raydino.plan`: the capacity and cost plan, checked against the repository's own bench JSON.

Every expected number is computed here from the JSON files (docs/gpu/gpu.json, docs/gpu/aug-h200.json)
and the cluster files (cluster/*.yaml, cluster/kuberay/raycluster.yaml), never written in: re-measuring
moves the plan and these tests with it.  Fast: no Ray, no torch, no subprocess.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import yaml

from raydino import plan
from raydino.runs import planning

ROOT = Path(__file__).resolve().parents[1]
GPU_JSON = ROOT / "docs/gpu/gpu.json"
AUG_JSON = ROOT / "docs/gpu/aug-h200.json"
IMAGES, EPOCHS = 1_400_000, 100
LAST = re.compile(r"^GPU-hours: ([\d,.]+) \((\d+) x (\S+), (.+) wall\)$")


@pytest.fixture(autouse=True)
def _no_png(request, monkeypatch):
    """matplotlib costs seconds: only the test that checks the PNG draws it."""
    if request.node.name != "test_plan_from_the_repository_bench_files":
        monkeypatch.setattr(plan, "plot_plan", lambda result, path: path.write_bytes(b""))


def _train_rate(path: Path = GPU_JSON) -> float:
    return json.loads(path.read_text())["training"]["bf16"]["images_per_s"]


def _aug_rate(path: Path = AUG_JSON) -> float:
    rows = json.loads(path.read_text())["results"]
    return next(r["images_per_s_per_core"] for p in planning.AUG_PIPELINES for r in rows if r["pipeline"].startswith(p))


def _run(capsys, *argv: str, out: Path | None = None) -> tuple[int, str, str, dict | None]:
    args = ["--images", str(IMAGES), "--epochs", str(EPOCHS), "--config", "vits16-paper", *argv]
    if out is not None:
        args += ["--json", str(out)]
    rc = plan.main(args)
    o, e = capsys.readouterr()
    return rc, o, e, (json.loads(out.read_text()) if out is not None and out.exists() else None)


def _bench_copy(tmp_path: Path) -> Path:
    d = tmp_path / "bench"
    d.mkdir()
    shutil.copy(GPU_JSON, d / "gpu.json")
    shutil.copy(AUG_JSON, d / "aug.json")
    return d


def _edit(path: Path, fn) -> None:
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc))


def _mix(result: dict, name: str) -> dict:
    return next(m for m in result["clusters"] if m["cluster"].endswith(name))


def test_plan_from_the_repository_bench_files(tmp_path, capsys):
    rc, out, err, r = _run(capsys, "--gpus", "8", out=tmp_path / "plan.json")
    assert rc == 0, err
    rate, aug = _train_rate(), _aug_rate()
    # GPU-hours: images x epochs / measured rate / 3600, over the default scaling efficiency 0.9.
    ideal = IMAGES * EPOCHS / rate / 3600
    assert r["gpu_hours_at_measured_rate"] == pytest.approx(ideal)
    assert r["gpu_hours"] == pytest.approx(ideal / 0.9)
    assert r["wall_hours"] == pytest.approx(ideal / 0.9 / 8)
    assert r["training"]["source"].endswith("gpu.json: training.bf16.images_per_s")
    # Cores per GPU: training images/s per GPU over augmentation images/s per core, rounded up.
    assert r["cores_per_gpu"] == math.ceil(rate / aug)
    assert r["cores_total"] == 8 * math.ceil(rate / aug)
    assert r["augmentation"]["size"] == json.loads(AUG_JSON.read_text())["size"]
    # Node mix from the cluster files: ceil(8 / GPUs per node) GPU nodes; the data pipeline is pinned to
    # cpu-data nodes by the preset's data.node_labels, so all the cores come from those.
    aws = yaml.safe_load((ROOT / "cluster/aws.yaml").read_text())["available_node_types"]
    m = _mix(r, "aws.yaml")
    assert m["gpu_type"] == "gpu-train" and m["gpu_nodes"] == math.ceil(8 / aws["gpu-train"]["resources"]["GPU"])
    assert m["data_type"] == "cpu-data" and m["data_nodes"] == math.ceil(r["cores_total"] / aws["cpu-data"]["resources"]["CPU"])
    kube = yaml.safe_load((ROOT / "cluster/kuberay/raycluster.yaml").read_text())["spec"]["workerGroupSpecs"]
    cpu_pod = next(g for g in kube if g["groupName"] == "cpu-data")["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"]
    assert _mix(r, "raycluster.yaml")["data_nodes"] == math.ceil(r["cores_total"] / float(cpu_pod))
    assert _mix(r, "gcp.yaml")["gpu_nodes"] == 1
    # The last line, and the PNG beside the JSON.
    last = out.strip().splitlines()[-1]
    match = LAST.match(last)
    assert match, last
    assert float(match[1].replace(",", "")) == round(ideal / 0.9, 1) and match[2] == "8" and match[3] == "H200"
    assert match[4] == planning.format_wall(ideal / 0.9 / 8)
    assert (tmp_path / "plan.png").stat().st_size > 1000
    # The measured GPU is not the cluster files' A100: the plan says so.
    assert "A100 40GB, not the measured H200" in out


def test_efficiency_and_default_gpus(capsys, tmp_path):
    rc, out, _, r = _run(capsys, "--efficiency", "1", out=tmp_path / "p.json")
    assert rc == 0
    assert r["gpus"] == 8  # vits16-paper: run.workers 8 x run.gpus_per_worker 1
    assert r["gpu_hours"] == pytest.approx(IMAGES * EPOCHS / _train_rate() / 3600)


def test_user_bench_dir_changes_the_result(tmp_path, capsys):
    d = _bench_copy(tmp_path)
    _edit(d / "gpu.json", lambda j: j["training"]["bf16"].update(images_per_s=2 * j["training"]["bf16"]["images_per_s"], median_step_s=0.04))
    _edit(d / "aug.json", lambda j: [r.update(images_per_s_per_core=100.0) for r in j["results"] if r["pipeline"].startswith(planning.AUG_PIPELINES)])
    rc, out, err, r = _run(capsys, "--bench", str(d), "--gpus", "8", "--efficiency", "1", out=tmp_path / "p.json")
    assert rc == 0, err
    assert r["gpu_hours"] == pytest.approx(IMAGES * EPOCHS / (2 * _train_rate()) / 3600)
    assert r["cores_per_gpu"] == math.ceil(2 * _train_rate() / 100.0)
    assert str(d / "gpu.json") in r["training"]["source"] or r["training"]["source"].endswith("bench/gpu.json: training.bf16.images_per_s")


def test_the_default_backends_row_is_read_before_the_older_one(tmp_path, capsys):
    """A bench file with both rows: the fused backend's (what Ray Data runs now) is the rate used;
    a file with only the OpenCV row (written before the fused backend) still plans."""
    d = _bench_copy(tmp_path)

    def add_fused(j: dict) -> None:
        cv = next(r for r in j["results"] if r["pipeline"].startswith(planning.AUG_PIPELINES[1]))
        j["results"].append(cv | {"pipeline": "raydino augment_batch, fused backend (batch 32)", "images_per_s_per_core": 50.0})

    _edit(d / "aug.json", add_fused)
    rc, _, err, r = _run(capsys, "--bench", str(d), "--gpus", "8", out=tmp_path / "p.json")
    assert rc == 0, err
    assert r["cores_per_gpu"] == math.ceil(_train_rate() / 50.0) and "fused backend" in r["augmentation"]["source"]


def test_nearest_measured_image_size_is_used_and_named(tmp_path, capsys):
    d = _bench_copy(tmp_path)
    big = json.loads(AUG_JSON.read_text())
    big["size"] = 1024
    for row in big["results"]:
        row["images_per_s_per_core"] = row["images_per_s_per_core"] / 3
    (d / "aug-1024.json").write_text(json.dumps(big))
    rc, out, _, r = _run(capsys, "--bench", str(d), "--image-size", "1100", out=tmp_path / "p.json")
    assert rc == 0
    assert r["augmentation"]["size"] == 1024 and re.search(
        r'\("(' + "|".join(planning.AUG_PIPELINES) + r') \(batch 32\)"\)$', r["augmentation"]["source"]
    )
    assert r["cores_per_gpu"] == math.ceil(_train_rate() / (_aug_rate() / 3))
    assert "measured at 1024 px, the nearest to --image-size 1100" in out
    rc, out, _, r = _run(capsys, "--bench", str(d), "--image-size", "600", out=tmp_path / "q.json")
    assert r["augmentation"]["size"] == 512


def test_without_an_aug_file_the_gpu_bench_cpu_rate_is_used(tmp_path, capsys):
    d = _bench_copy(tmp_path)
    (d / "aug.json").unlink()
    rc, _, _, r = _run(capsys, "--bench", str(d), out=tmp_path / "p.json")
    assert rc == 0
    rate = json.loads(GPU_JSON.read_text())["augmentation"]["raydino_cpu_images_per_s_per_core"]
    assert r["augmentation"]["images_per_s_per_core"] == pytest.approx(rate)
    assert r["augmentation"]["source"].endswith("augmentation.raydino_cpu_images_per_s_per_core")


def test_without_node_labels_the_gpu_nodes_spare_cpus_count(tmp_path, capsys):
    d = _bench_copy(tmp_path)
    _edit(d / "gpu.json", lambda j: j.update(overrides=["data.node_labels=null"]))
    rc, out, err, r = _run(capsys, "--bench", str(d), "--set", "data.node_labels=null", "--gpus", "8", out=tmp_path / "p.json")
    assert rc == 0, err
    aws = yaml.safe_load((ROOT / "cluster/aws.yaml").read_text())["available_node_types"]
    m = _mix(r, "aws.yaml")
    spare = aws["gpu-train"]["resources"]["CPU"] - 8 * 8  # vits16-paper: 8 workers x run.cpus_per_worker 8
    assert m["spare_cpus_on_gpu_nodes"] == spare
    assert m["data_nodes"] == math.ceil(max(0, r["cores_total"] - spare) / aws["cpu-data"]["resources"]["CPU"])


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda j: j.update(config="demo"), ["--config vits16-paper", "config 'demo'", "python -m raydino.bench gpu --config vits16-paper"]),
        (lambda j: j.update(overrides=["train.batch_size=32"]), ["--config vits16-paper", "--set train.batch_size=32", "no GPU measurement"]),
        (lambda j: j.update(batch_size=32), ["gpu.json measured config 'vits16-paper' at batch 32", "measure it again"]),
        (lambda j: j["training"]["bf16"].update(images_per_s=float("nan")), ["no valid training.bf16.images_per_s"]),
    ],
)
def test_a_bench_json_of_another_config_is_refused(tmp_path, capsys, edit, words):
    d = _bench_copy(tmp_path)
    _edit(d / "gpu.json", edit)
    rc, out, err, _ = _run(capsys, "--bench", str(d))
    assert rc == 2 and out == ""
    assert err.startswith("raydino.plan: error: ") and len(err.strip().splitlines()) == 1
    for w in words:
        assert w in err


def test_missing_measurements_say_which_bench_command_makes_them(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, err, _ = _run(capsys, "--bench", str(empty))
    assert rc == 2 and f"--bench {empty}: holds no `python -m raydino.bench gpu` result" in err
    rc, _, err, _ = _run(capsys, "--bench", str(tmp_path / "nowhere"))
    assert rc == 2 and "no such directory" in err
    # The demo config has no GPU measurement in the repository: say so, do not invent one.
    assert plan.main(["--images", "1000", "--config", "demo", "--gpus", "2"]) == 2
    err = capsys.readouterr().err
    assert "--config demo: no GPU measurement of it" in err and "python -m raydino.bench gpu --config demo --out DIR" in err
    d = _bench_copy(tmp_path)
    (d / "aug.json").unlink()
    _edit(d / "gpu.json", lambda j: j.pop("augmentation"))
    rc, _, err, _ = _run(capsys, "--bench", str(d))
    assert rc == 2 and "no CPU augmentation rate" in err and "python -m raydino.bench aug --size 512" in err


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--images", "0"], "argument --images: '0': must be > 0"),
        (["--images", "10", "--epochs", "-1"], "argument --epochs: '-1': must be > 0"),
        (["--images", "10", "--gpus", "0"], "argument --gpus: '0': must be > 0"),
        (["--images", "10", "--efficiency", "1.5"], "--efficiency=1.5: must be in (0, 1]"),
        (["--images", "10", "--price-gpu-hour", "-2"], "argument --price-gpu-hour: '-2': must be > 0"),
        (["--images", "ten"], "argument --images: 'ten' is not a number"),
    ],
)
def test_non_positive_numbers_exit_2_naming_the_option(capsys, argv, words):
    with pytest.raises(SystemExit) as e:
        plan.main(argv)
    assert e.value.code == 2
    assert words in capsys.readouterr().err


def test_bad_config_cluster_and_prices_exit_2(tmp_path, capsys):
    assert plan.main(["--images", "10", "--config", "nope"]) == 2
    assert "raydino.plan: error: --config nope: unknown config 'nope'" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("just: text\n")
    assert plan.main(["--images", "10", "--cluster", str(bad)]) == 2
    assert f"--cluster {bad}: neither a Ray cluster-launcher file" in capsys.readouterr().err
    bad.write_text("prices: {p4d.24xlarge: -3}\n")
    assert plan.main(["--images", "10", "--prices", str(bad)]) == 2
    assert f"--prices {bad}: p4d.24xlarge: -3 is not a price > 0" in capsys.readouterr().err


def test_prices_user_price_overrides_the_table(tmp_path, capsys):
    _, _, _, table = _run(capsys, "--gpus", "8", out=tmp_path / "t.json")
    aws = _mix(table, "aws.yaml")
    wall = table["wall_hours"]
    p = planning.PRICE_TABLE["prices"]
    assert aws["cost"] == pytest.approx(wall * (p["p4d.24xlarge"] + aws["data_nodes"] * p["c6i.8xlarge"] + p["m6i.2xlarge"]))
    # --price-gpu-hour: the GPU nodes cost GPU-hours x price (8 GPUs fill one 8-GPU node); the rest keeps the table.
    _, _, _, user = _run(capsys, "--gpus", "8", "--price-gpu-hour", "3.5", "--price-cpu-hour", "0.04", out=tmp_path / "u.json")
    aws = _mix(user, "aws.yaml")
    assert aws["prices"]["gpu"]["per_hour"] * user["wall_hours"] == pytest.approx(user["gpu_hours"] * 3.5)
    assert aws["prices"]["data"]["per_hour"] == pytest.approx(0.04 * 32)
    assert aws["cost"] == pytest.approx(user["gpu_hours"] * 3.5 + user["wall_hours"] * (aws["data_nodes"] * 0.04 * 32 + p["m6i.2xlarge"]))
    # KubeRay's cpu-data group names no instance type: unpriced from the table, priced by --price-cpu-hour.
    assert _mix(table, "raycluster.yaml")["unpriced"] == ["cpu-data (no instance type in the file)"]
    assert _mix(user, "raycluster.yaml")["unpriced"] == []
    # --prices FILE replaces the table.
    f = tmp_path / "prices.yaml"
    f.write_text("date: 2026-11-30\nnote: our contract\nprices: {p4d.24xlarge: 10, c6i.8xlarge: 1, m6i.2xlarge: 0.5}\n")
    rc, out, _, mine = _run(capsys, "--gpus", "8", "--prices", str(f), out=tmp_path / "m.json")
    aws = _mix(mine, "aws.yaml")
    assert aws["cost"] == pytest.approx(mine["wall_hours"] * (10 + aws["data_nodes"] * 1 + 0.5))
    assert "table of 2026-11-30: our contract" in out and _mix(mine, "gcp.yaml")["cost"] is None


def test_whole_nodes_are_billed_and_idle_gpus_shown(tmp_path, capsys):
    rc, out, _, r = _run(capsys, "--gpus", "12", "--price-gpu-hour", "2", out=tmp_path / "p.json")
    m = _mix(r, "aws.yaml")
    assert m["gpu_nodes"] == 2 and m["idle_gpus"] == 4 and "4 of them idle" in out
    assert m["prices"]["gpu"]["per_hour"] == 16


def test_help_names_every_source(capsys):
    with pytest.raises(SystemExit) as e:
        plan.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for words in (
        "training.bf16.images_per_s",
        "images_per_s_per_core",
        "cluster/aws.yaml",
        "cluster/kuberay/raycluster.yaml",
        "--efficiency",
        "PRICE_TABLE",
    ):
        assert words in text


def test_format_wall():
    assert planning.format_wall(154.2) == "6 d 10 h"
    assert planning.format_wall(6.585) == "6 h 35 min"
    assert planning.format_wall(0.2) == "12 min"
    assert planning.format_wall(47.99) == "2 d 0 h"
