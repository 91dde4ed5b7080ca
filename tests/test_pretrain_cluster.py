"""`raydino.pretrain` against a real Ray head started with `ray start --head` on this machine.

One head per module (4 logical CPUs, token auth off, dashboard on 127.0.0.1, its own temp dir and
ports, so other Ray users on the machine are untouched).  On it: a job submitted with
`ray job submit --working-dir`, a training worker SIGKILLed mid-run, a driver killed mid-run and the
same command rerun against S3 storage (a moto server on loopback), a non-finite loss, and resource
requests the cluster can never satisfy.  No mocks: real Ray, real processes, real HTTP.

Every training run has a driver process of its own (`python -m raydino.pretrain`, as users run it);
only the resource checks that fail before training run in this test's process.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("moto.server")
from raydino.data.synth import synthetic_shards  # noqa: E402
from raydino.pretrain import main  # noqa: E402

from helpers.ray_cluster import VENV_BIN, RayHead  # noqa: E402
from helpers.s3 import KEY_ID, SECRET  # noqa: E402
from helpers.train_runs import latest_registered  # noqa: E402

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BUCKET = "raydino-pretrain"
PLANNED_STEPS = 8  # smoke: 67 training rows // (2 workers × batch 8) = 4 steps/epoch × 2 epochs
KILL_RUN_EPOCHS, KILL_RUN_STEPS = 5, 20  # the killed-worker run: 4 steps/epoch as above
CKPT = re.compile(r"checkpoint_(\d{8})$")


@pytest.fixture(scope="module")
def head(s3):
    """The head inherits the dummy AWS credentials: its nodes' credential chain, as an instance role would be."""
    import ray

    node = RayHead.start(["--num-cpus=4"], dict(os.environ))
    try:
        ray.init(address=node.address, log_to_driver=True)
        yield node
    finally:
        ray.shutdown()
        node.stop()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return synthetic_shards(96, 64, seed=3, cache_root=str(tmp_path_factory.mktemp("synth")), workers=1, progress=False)


def driver_env(head: RayHead, **extra: str) -> dict[str, str]:
    return head.driver_env(PYTHONUNBUFFERED="1", **extra)


def pretrain_cmd(shards: str, storage: str, name: str, *flags: str) -> list[str]:
    """`python -m raydino.pretrain` as its own driver process, as users run it (never this test's
    process: a driver of its own per run keeps each test's Ray job separate)."""
    return [
        sys.executable,
        "-m",
        "raydino.pretrain",
        "--config",
        "smoke",
        "--data",
        shards,
        "--storage",
        storage,
        "--name",
        name,
        "--no-probe",
        *flags,
    ]


def checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(m.group(1)) for p in run_dir.iterdir() if (m := CKPT.match(p.name)))


def _load_ckpt(path: Path) -> dict:
    return torch.load(path / "state.pt", map_location="cpu", weights_only=False)


# ---------------------------------------------------------------- job submission


@pytest.mark.timeout(300)
def test_job_submission_trains_and_checkpoints(head, shards, tmp_path):
    storage = tmp_path / "runs"
    cmd = [
        str(VENV_BIN / "ray"),
        "job",
        "submit",
        "--address",
        head.dashboard,
        "--working-dir",
        str(REPO),
        # What a user does for a bucket outside us-east-1: the driver inherits the variable, and init_ray
        # must not restate it (ray.init refused the merge: "Failed to merge the Job's runtime env").
        "--runtime-env-json",
        json.dumps({"env_vars": {"AWS_REGION": "eu-west-2"}}),
        "--",
        "python",
        "-m",
        "raydino.pretrain",
        "--config",
        "smoke",
        "--set",
        "train.epochs=1",
        "--data",
        shards,
        "--storage",
        str(storage),
        "--name",
        "job1",
        "--no-probe",
    ]
    done = subprocess.run(cmd, env=head.env, capture_output=True, text=True, timeout=280)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "succeeded" in out and "[raydino] done: job1" in out
    assert checkpoint_steps(storage / "job1") == [4]
    assert _load_ckpt(storage / "job1" / "checkpoint_00000004")["step"] == 4
    assert (storage / "job1" / "logs" / "metrics.jsonl").exists() and (storage / "job1" / "logs" / "loss.png").exists()
    # Each progress line once (Ray Train's print patch used to echo every line twice).
    assert out.count("[raydino] finished 4 steps") == 1
    # The working dir went up without the gitignored virtualenv.
    packages = {p.resolve() for p in Path(head.temp_dir).glob("session_*/runtime_resources/working_dir_files/*") if p.is_dir()}
    assert packages and all((p / "raydino" / "pretrain.py").exists() for p in packages)
    assert not any((p / ".venv").exists() for p in packages)


# ---------------------------------------------------------------- a worker dies mid-run


@pytest.mark.timeout(300)
def test_killed_worker_is_replaced_and_run_completes(head, shards, tmp_path):
    run_dir = tmp_path / "runs" / "fault"
    killed: dict = {}
    stop = threading.Event()

    def kill_rank1_after_first_checkpoint() -> None:
        snapshot = run_dir / "checkpoint_manager_snapshot.json"
        while not stop.is_set():
            at = latest_registered(snapshot.read_text() if snapshot.exists() else None)
            rank1 = sorted((run_dir / "workers").glob("rank1-pid*.json")) if at else []
            if rank1:
                info = json.loads(rank1[0].read_text())
                os.kill(info["pid"], signal.SIGKILL)  # a real worker process of the head's node
                killed.update(info, after=at)
                return
            stop.wait(0.1)

    killer = threading.Thread(target=kill_rank1_after_first_checkpoint, daemon=True)
    killer.start()
    try:
        # Five epochs, not the smoke's two: with two, rank 1 could finish its last steps before the first
        # checkpoint was registered (asynchronously) and the kill landed on a finished worker.
        cmd = pretrain_cmd(shards, str(tmp_path / "runs"), "fault", "--set", f"train.epochs={KILL_RUN_EPOCHS}")
        done = subprocess.run(cmd, env=driver_env(head), capture_output=True, text=True, timeout=280, cwd=tmp_path)
    finally:
        stop.set()
        killer.join()
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert killed, "the first checkpoint never appeared"
    assert summary["final_metrics"]["step"] == KILL_RUN_STEPS
    # Checkpoints at every epoch end (4, 8, ...) and every 5 steps; the newest three kept (keep_checkpoints=3).
    assert checkpoint_steps(run_dir) == [15, 16, 20]
    assert _load_ckpt(run_dir / "checkpoint_00000020")["step"] == KILL_RUN_STEPS
    # A new rank-1 process took over from the checkpoint registered before the kill (or a later one).
    ranks1 = [json.loads(p.read_text()) for p in (run_dir / "workers").glob("rank1-pid*.json")]
    replacement = [w for w in ranks1 if w["pid"] != killed["pid"]]
    assert len(replacement) == 1
    assert replacement[0]["start_step"] >= int(CKPT.match(killed["after"]).group(1))
    assert replacement[0]["end_step"] == KILL_RUN_STEPS
    assert "end_step" not in next(w for w in ranks1 if w["pid"] == killed["pid"])


# ---------------------------------------------------------------- S3 storage, interrupted driver, resume


@pytest.mark.timeout(400)
def test_s3_run_interrupted_then_resumed_by_the_same_command(head, s3, shards, tmp_path):
    prefix = "runs/r1/"
    env = driver_env(head, AWS_ENDPOINT_URL=s3.endpoint)
    cmd = pretrain_cmd(shards, f"s3://{BUCKET}/runs", "r1")
    log1 = (tmp_path / "first.log").open("w+")
    first = subprocess.Popen(cmd, env=env, stdout=log1, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 240
        interrupted_after = None
        while first.poll() is None and time.monotonic() < deadline and interrupted_after is None:
            if f"{prefix}checkpoint_manager_snapshot.json" in s3.keys(BUCKET, prefix):
                body = s3.client().get_object(Bucket=BUCKET, Key=f"{prefix}checkpoint_manager_snapshot.json")["Body"]
                interrupted_after = latest_registered(body.read().decode())
            time.sleep(0.2)
        assert interrupted_after, "no checkpoint reached S3 before the driver ended"
        first.kill()  # the driver dies without warning; the cluster ends its job
        first.wait(30)
    finally:
        if first.poll() is None:
            first.kill()
    log1.seek(0)
    first_out = log1.read()
    assert "[raydino] done: r1" not in first_out  # it really was interrupted
    saved_at = int(CKPT.match(interrupted_after).group(1))

    config_yaml = s3.client().get_object(Bucket=BUCKET, Key=f"{prefix}config.yaml")["Body"].read()
    # The same command, plus a setting a resume may change (logging): recorded, the run's config.yaml kept.
    second = subprocess.run([*cmd, "--set", "train.log_every=1"], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-4000:]
    resumed = re.search(r"\[raydino\] resumed from step (\d+)", out)
    assert resumed and int(resumed.group(1)) >= saved_at > 0
    assert "with changed settings (recorded in config_changes.jsonl): train.log_every" in out
    assert s3.client().get_object(Bucket=BUCKET, Key=f"{prefix}config.yaml")["Body"].read() == config_yaml
    (change,) = [json.loads(x) for x in s3.client().get_object(Bucket=BUCKET, Key=f"{prefix}config_changes.jsonl")["Body"].read().splitlines()]
    assert change["changes"] == {"train.log_every": {"old": 2, "new": 1}}, change
    keys = s3.keys(BUCKET, prefix)
    steps = sorted({int(m.group(1)) for k in keys if (m := re.search(r"checkpoint_(\d{8})/state\.pt$", k))})
    assert steps == [4, 5, 8]  # the interrupted run's checkpoints are kept next to the new ones (keep 3)
    state = s3.client().get_object(Bucket=BUCKET, Key=f"{prefix}checkpoint_00000008/state.pt")["Body"].read()
    (tmp_path / "state.pt").write_bytes(state)
    assert torch.load(tmp_path / "state.pt", map_location="cpu", weights_only=False)["step"] == PLANNED_STEPS
    assert {f"{prefix}logs/metrics.jsonl", f"{prefix}logs/loss.png", f"{prefix}summary.json"} <= set(keys)
    metrics = [
        json.loads(line) for line in s3.client().get_object(Bucket=BUCKET, Key=f"{prefix}logs/metrics.jsonl")["Body"].read().decode().splitlines()
    ]
    logged_steps = [m["step"] for m in metrics]
    assert logged_steps == sorted(set(logged_steps)) and logged_steps[-1] == PLANNED_STEPS  # no step twice
    stored = b"".join(s3.client().get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in keys if not k.endswith(".pt"))
    for text in (first_out, out, stored.decode("latin-1")):
        assert SECRET not in text and KEY_ID not in text


# ---------------------------------------------------------------- non-finite loss


@pytest.mark.timeout(300)
def test_non_finite_loss_stops_with_step_and_keeps_last_good_checkpoint(head, shards, tmp_path):
    """A teacher temperature of 1e-50 (after a one-epoch warm-up at 0.04) underflows to 0 in float32,
    so the first step of epoch 2 divides by zero: an honest config mistake, no test-only code."""
    run_dir = tmp_path / "runs" / "nan"
    seen: dict[str, str] = {}
    stop = threading.Event()

    def hash_first_checkpoint() -> None:
        while not stop.is_set():
            f = run_dir / "checkpoint_00000004" / "state.pt"
            snapshot = run_dir / "checkpoint_manager_snapshot.json"
            if latest_registered(snapshot.read_text() if snapshot.exists() else None) and f.exists():
                seen["sha"] = hashlib.sha256(f.read_bytes()).hexdigest()
                return
            stop.wait(0.05)

    watcher = threading.Thread(target=hash_first_checkpoint, daemon=True)
    watcher.start()
    try:
        done = subprocess.run(
            pretrain_cmd(
                shards,
                str(tmp_path / "runs"),
                "nan",
                "--set",
                "loss.teacher_temp=1e-50",
                "--set",
                "loss.warmup_teacher_temp_epochs=1",
                "--set",
                "train.checkpoint_every=100",
            ),
            env=driver_env(head),
            capture_output=True,
            text=True,
            timeout=280,
            cwd=tmp_path,
        )
    finally:
        stop.set()
        watcher.join()
    err = done.stderr
    assert done.returncode == 3, (done.stdout + err)[-4000:]
    assert "stopped at step 4" in err and "checkpoint_00000004" in err
    assert checkpoint_steps(run_dir) == [4]  # nothing written after the bad step
    assert hashlib.sha256((run_dir / "checkpoint_00000004" / "state.pt").read_bytes()).hexdigest() == seen["sha"]
    ckpt = _load_ckpt(run_dir / "checkpoint_00000004")
    assert all(torch.isfinite(t).all() for part in ("student", "teacher") for t in ckpt[part].values())
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "non_finite_loss"


# ---------------------------------------------------------------- requests this cluster can never satisfy


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--workers", "5"], "run.workers=5 "),
        (["--gpus-per-worker", "1"], "1 GPU each cannot fit"),
        (["--set", "data.node_labels={raydino/role: cpu-data}"], "no node carries these labels"),
        (["--set", "run.cpus_per_worker=2"], "no CPU left for the data pipeline"),
    ],
)
def test_impossible_resources_fail_before_training(head, shards, tmp_path, capsys, flags, message):
    code = main(["--config", "smoke", "--data", shards, "--storage", str(tmp_path / "runs"), "--name", "big", "--no-probe", *flags])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and "no autoscaler" in err
    assert not (tmp_path / "runs" / "big" / "workers").exists()  # no worker ever started (and no hang: timeout)
