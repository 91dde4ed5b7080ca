"""`python -m raydino.pretrain` options and bad input that must fail before any training.

Data and storage problems are found before Ray starts (checked here in-process, with a real moto S3
server on loopback for the s3:// cases); more workers than a local machine can ever host is found
right after the local Ray starts (checked in a subprocess, as a user would run it).
"""

from __future__ import annotations

import os
import stat

import pytest
import yaml

pytest.importorskip("moto.server")
from raydino.config import build_config, load_config  # noqa: E402
from raydino.data.synth import synthetic_shards  # noqa: E402
from raydino.pretrain import main  # noqa: E402

from helpers.recipes import run_recipe
from helpers.s3 import KEY_ID, SECRET  # noqa: E402

BUCKET = "raydino-cli"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return synthetic_shards(96, 64, seed=5, cache_root=str(tmp_path_factory.mktemp("synth")), workers=1, progress=False)


def fails_before_training(argv: list[str], capsys) -> str:
    """Run the CLI in-process; it must exit 2 without ever starting Ray.  Returns its stderr."""
    import ray

    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert not ray.is_initialized()
    assert err.startswith("raydino.pretrain: error: ")
    return err


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for option in (
        "--config",
        "--set",
        "--data",
        "--storage",
        "--workers",
        "--gpus-per-worker",
        "--name",
        "--resume",
        "--no-probe",
        "--print-config",
        "--s3-endpoint",
        "--s3-region",
        "--gcs-endpoint",
    ):
        assert option in out
    assert "smoke" in out and "s3://" in out and "exit status" in out


def test_print_config_applies_flags_and_overrides(capsys):
    argv = ["--config", "smoke", "--set", "train.epochs=3", "--workers", "3", "--gpus-per-worker", "0.5", "--name", "x1", "--print-config"]
    assert main(argv) == 0
    printed = build_config(yaml.safe_load(capsys.readouterr().out))
    assert printed == load_config("smoke", ["train.epochs=3", "run.workers=3", "run.gpus_per_worker=0.5", "run.name=x1"])
    assert (printed.train.epochs, printed.run.workers, printed.run.gpus_per_worker) == (3, 3, 0.5)


def test_no_probe_turns_off_the_epoch_end_probe_too(capsys):
    assert main(["--config", "smoke", "--print-config"]) == 0
    assert build_config(yaml.safe_load(capsys.readouterr().out)).probe.monitor == "fast"
    assert main(["--config", "smoke", "--no-probe", "--print-config"]) == 0
    assert build_config(yaml.safe_load(capsys.readouterr().out)).probe.monitor == "off"


def test_a_cuda_graph_run_with_batchnorm_stops_before_ray_starts(capsys, tmp_path):
    flags = ["--storage", str(tmp_path / "runs"), "--cache", str(tmp_path / "cache")]
    err = fails_before_training(["--config", "smoke", *flags, "--set", "train.cuda_graph=true"], capsys)
    assert "model.head_use_bn=true" in err  # the config's own check
    err = fails_before_training(["--config", "smoke", *flags, "--set", "train.cuda_graph=true", "--set", "model.head_use_bn=false",
                                 "--set", "model.arch=resnet18"], capsys)  # fmt: skip
    assert "train.cuda_graph=true: model.arch='resnet18' has BatchNorm" in err


@pytest.mark.parametrize(
    "sets, message",
    [
        (["augment.global_crop_size=40"], "augment.global_crop_size=40: not a multiple of vit_tiny_patch16_224's 16 px patches (e.g. 32, 48)"),
        (["augment.local_crop_size=20"], "augment.local_crop_size=20: not a multiple"),
        (["probe.image_size=50"], "probe.image_size=50: not a multiple"),
        (["model.init=/nonexistent/weights.pth"], "model.init='/nonexistent/weights.pth': file does not exist"),
    ],
)
def test_what_the_workers_would_fail_on_stops_before_ray_starts(sets, message, capsys, tmp_path):
    flags = ["--storage", str(tmp_path / "runs"), "--cache", str(tmp_path / "cache"), "--no-probe"]
    err = fails_before_training(["--config", "smoke", *flags, *[a for s in sets for a in ("--set", s)]], capsys)
    assert message in err, err


def test_storage_flags_are_the_data_sections_endpoints(capsys):
    flags = ["--s3-endpoint", "http://127.0.0.1:9000", "--s3-region", "eu-west-2", "--gcs-endpoint", "http://127.0.0.1:9023"]
    assert main(["--config", "smoke", *flags, "--print-config"]) == 0
    data = build_config(yaml.safe_load(capsys.readouterr().out)).data
    assert (data.s3_endpoint, data.s3_region, data.gcs_endpoint) == ("http://127.0.0.1:9000", "eu-west-2", "http://127.0.0.1:9023")
    err = fails_before_training(["--config", "smoke", "--s3-endpoint", "http://key:hunter2@127.0.0.1:9000/x"], capsys)
    assert "data.s3_endpoint" in err and "expected http(s)://host[:port]" in err and "hunter2" not in err


def test_bad_override_names_the_key(capsys):
    err = fails_before_training(["--config", "smoke", "--set", "train.epoch=3"], capsys)
    assert "train.epoch" in err and "train.epochs" in err


@pytest.mark.parametrize("case", ["missing", "no_manifest"])
def test_local_data_without_shards(case, tmp_path, capsys):
    data = tmp_path / "data"
    if case == "no_manifest":
        data.mkdir()
        (data / "image.jpg").write_bytes(b"not shards")
    err = fails_before_training(["--config", "smoke", "--data", str(data), "--storage", str(tmp_path / "runs"), "--name", "d"], capsys)
    assert f"data.uri='{data}'" in err and "manifest.json" in err and "python -m raydino.shard" in err
    assert not (tmp_path / "runs").exists()  # the storage check created the run folder and removed it again


@pytest.mark.slow
def test_s3_data_without_manifest(s3, tmp_path, capsys):
    err = fails_before_training(
        [
            "--config",
            "smoke",
            "--data",
            f"s3://{BUCKET}/nothing-here",
            "--storage",
            str(tmp_path / "runs"),
            "--set",
            f"data.s3_endpoint={s3.endpoint}",
        ],
        capsys,
    )
    assert f"s3://{BUCKET}/nothing-here" in err and "manifest.json" in err
    assert SECRET not in err and KEY_ID not in err


@pytest.mark.parametrize("case", ["under_a_file", "read_only_dir"])
def test_local_storage_not_writable(case, shards, tmp_path, capsys):
    if case == "under_a_file":
        (tmp_path / "a-file").write_text("")
        storage = tmp_path / "a-file" / "runs"  # no one can create a directory inside a regular file
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only directories")
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(stat.S_IRUSR | stat.S_IXUSR)
        storage = tmp_path / "ro" / "runs"
    err = fails_before_training(["--config", "smoke", "--data", shards, "--storage", str(storage), "--name", "w"], capsys)
    assert "run.storage" in err and "not writable" in err and str(storage) in err


@pytest.mark.slow
def test_s3_storage_bucket_missing(s3, shards, capsys):
    err = fails_before_training(
        ["--config", "smoke", "--data", shards, "--storage", "s3://no-such-bucket-x/runs", "--set", f"data.s3_endpoint={s3.endpoint}", "--name", "b"],
        capsys,
    )
    assert "s3://no-such-bucket-x/runs" in err and "not writable" in err and "bucket exist" in err
    assert SECRET not in err and KEY_ID not in err


def test_resume_needs_an_existing_run(shards, tmp_path, capsys):
    err = fails_before_training(["--config", "smoke", "--data", shards, "--storage", str(tmp_path / "runs"), "--resume"], capsys)
    assert "--resume" in err and "no runs" in err
    err = fails_before_training(
        ["--config", "smoke", "--data", shards, "--storage", str(tmp_path / "runs"), "--resume", "--name", "never-ran"], capsys
    )
    assert "no run named 'never-ran'" in err


def fake_checkpointed_run(storage, name, cfg):
    """A run directory as a first start leaves it: config.yaml and a checkpoint folder."""
    run_dir = storage / name
    (run_dir / "checkpoint_00000004").mkdir(parents=True)
    (run_dir / "checkpoint_00000004" / "state.pt").write_bytes(b"x")
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    return run_dir


def test_a_resume_that_would_change_the_schedule_is_refused_naming_each_field(shards, tmp_path, capsys):
    storage = tmp_path / "runs"
    run_dir = fake_checkpointed_run(storage, "r", load_config("smoke", [f"data.uri={shards}", f"run.storage={storage}", "run.name=r"]))
    first = (run_dir / "config.yaml").read_text()
    err = fails_before_training(
        ["--config", "smoke", "--data", shards, "--storage", str(storage), "--name", "r", "--workers", "1", "--set", "train.batch_size=16"], capsys
    )
    assert "run.workers: this run started with 2, now 1" in err and "train.batch_size: this run started with 8, now 16" in err
    assert "another --name" in err
    assert (run_dir / "config.yaml").read_text() == first  # the run's record is untouched
    assert not (run_dir / "config_changes.jsonl").exists()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_more_workers_than_this_machine_can_host(shards, tmp_path):
    """64 workers on a local Ray (capped at 2× the cores): refused once Ray is up, instead of waiting forever."""
    done = run_recipe(
        "pretrain", "--config", "smoke", "--data", shards, "--storage", str(tmp_path / "runs"), "--name", "many",
        "--workers", "64", "--set", "train.batch_size=1", "--no-probe", cwd=tmp_path, timeout=170, local_ray=True,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    assert "run.workers=64" in done.stderr and "room for" in done.stderr and "Lower --workers" in done.stderr
    assert not (tmp_path / "runs" / "many" / "workers").exists()


@pytest.mark.slow
def test_with_an_autoscaler_a_run_that_never_fits_gives_up_after_max_node_wait(shards, tmp_path):
    """An autoscaled cluster (assumed here) may add nodes, so nothing is refused up front; but a request no
    node will ever satisfy must not wait forever: after run.max_node_wait_s the run ends with a clear error."""
    done = run_recipe(
        "pretrain", "--config", "smoke", "--data", shards, "--storage", str(tmp_path / "runs"), "--name", "wait",
        "--workers", "64", "--set", "train.batch_size=1", "--set", "run.max_node_wait_s=6", "--set", "run.shared_fs=true", "--no-probe",
        cwd=tmp_path, timeout=240, local_ray=True, RAYDINO_ASSUME_AUTOSCALER="1",
    )  # fmt: skip
    assert done.returncode == 1, done.stderr[-3000:]
    assert "the training workers never started" in done.stderr and "run.max_node_wait_s=6.0" in done.stderr
    assert "run.workers=64" in done.stderr
    assert not (tmp_path / "runs" / "wait" / "workers").exists()


def kuberay_v2_cluster_config():
    """What KubeRay's autoscaler v2 publishes for cluster/kuberay/raycluster.yaml (Ray's own protobuf)."""
    from ray.core.generated import autoscaler_pb2

    config = autoscaler_pb2.ClusterConfig()
    for name, resources, max_count in (("headgroup", {"CPU": 0}, 1), ("gpu-train", {"CPU": 90, "GPU": 8}, 4), ("cpu-data", {"CPU": 30}, 8)):
        group = config.node_group_configs.add(name=name, max_count=max_count)
        for k, v in resources.items():
            group.resources[k] = int(v)
    return config


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["run.workers=32", "run.gpus_per_worker=1", "run.cpus_per_worker=8"], None),  # the paper's 4 nodes x 8 GPUs
        (["run.workers=33", "run.gpus_per_worker=1", "run.cpus_per_worker=8"], "hold at most 32"),
        (["run.workers=2", "run.gpus_per_worker=16"], "no node type the autoscaler can launch fits one worker of 8 CPU and 16 GPU"),
        (["run.workers=8", "run.cpus_per_worker=100"], "fits one worker of 100 CPU"),
    ],
)
def test_autoscaled_cluster_that_can_never_fit_is_refused(overrides, message):
    from raydino.distributed.capacity import autoscaled_fit_problems, node_groups_of

    groups = node_groups_of(kuberay_v2_cluster_config())
    assert [g[0] for g in groups] == ["headgroup", "gpu-train", "cpu-data"] and groups[1][1] == {"CPU": 90.0, "GPU": 8.0}
    problems = autoscaled_fit_problems(load_config("vits16-paper", overrides), groups)
    if message is None:
        assert problems == []
    else:
        assert len(problems) == 1 and message in problems[0] and "gpu-train: CPU 90, GPU 8 x up to 4" in problems[0]
    from ray.core.generated import autoscaler_pb2

    assert node_groups_of(None) is None and node_groups_of(autoscaler_pb2.ClusterConfig()) is None  # v1: unknown
