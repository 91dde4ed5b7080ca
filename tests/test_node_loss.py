"""Losing a whole machine under `ray job submit`, as on a real cluster: the job must still end SUCCEEDED.

A head started with `ray start --head` (1 CPU, loopback, its own temp dir and ports) and worker nodes
started with `ray start --address=...`, each in a process group of its own, so SIGKILL of the group
takes a node away at once, as a lost spot machine.  The smoke run is submitted with
`ray job submit --no-wait`; after its first checkpoint a node is killed and a replacement started.

(a) the training node (2 CPUs): Ray Train restarts the workers on the replacement from the latest
    committed checkpoint; only the steps after it are trained again;
(b) the data node (labelled `raydino/role=cpu-data`, every read and augmentation task): Ray Data
    re-runs the lost tasks on the replacement; training is not restarted.

Both must print `[raydino] done` and reach SUCCEEDED: a job that stayed RUNNING after its run had
finished was seen once after a node loss (issue "long runs on real clusters").

(c) a search trial's node: Tune restarts the trial from its last checkpoint (`resources.max_failures`)
    on the replacement, and the search ends with the trial finished, not errored.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pyarrow.csv as pcsv
import pytest

from helpers.ray_cluster import VENV_BIN, RayHead
from helpers.train_runs import registered_step

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
EPOCHS, STEPS_PER_EPOCH, CHECKPOINT_EVERY = 6, 4, 2  # smoke: 67 rows // (2 workers x batch 8)
DATA_ROLE = "--labels=raydino/role=cpu-data"


@pytest.fixture
def head():
    node = RayHead.start(["--num-cpus=1"], dict(os.environ))
    try:
        yield node
    finally:
        node.stop()


def submit(head: RayHead, tmp: Path, name: str, *sets: str) -> str:
    cmd = [
        str(VENV_BIN / "ray"), "job", "submit", "--address", head.dashboard, "--working-dir", str(REPO), "--no-wait", "--",
        "python", "-m", "raydino.pretrain", "--config", "smoke", "--workers", "2", "--no-probe", "--name", name,
        "--storage", str(tmp / "runs"), "--cache", str(tmp / "cache"),  # outside the job's working_dir copy
        "--set", f"train.epochs={EPOCHS}", "--set", f"train.checkpoint_every={CHECKPOINT_EVERY}", "--set", "train.log_every=1",
        "--set", "run.shared_fs=true",  # every node here shares this machine's disk
        *(a for s in sets for a in ("--set", s)),
    ]  # fmt: skip
    done = subprocess.run(cmd, env=head.env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return re.search(r"raysubmit_[A-Za-z0-9]+", done.stdout + done.stderr).group(0)


def job(head: RayHead, job_id: str, what: str = "") -> dict | str:
    with urllib.request.urlopen(f"{head.dashboard}/api/jobs/{job_id}{what}", timeout=10) as r:
        return json.loads(r.read()) if not what else json.loads(r.read())["logs"]


def logged_steps(run_dir: Path) -> list[int]:
    metrics = run_dir / "logs" / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    return [json.loads(line)["step"] for line in lines if line.strip().endswith("}")]


def run_losing_a_node(head: RayHead, tmp: Path, name: str, node_args: list[str], sets: tuple[str, ...] = ()) -> dict:
    """Submit, kill `node_args`' node after the first checkpoint, start its replacement, wait for the end."""
    node = head.add_node(node_args)
    head.wait_for(lambda: head.alive_nodes() >= 2 + len(head.added_nodes) - 1, 90, "the worker nodes")
    job_id = submit(head, tmp, name, *sets)
    run_dir = tmp / "runs" / name
    # Registered, not only written: an asynchronous upload makes the folder before Ray Train commits it.
    head.wait_for(lambda: registered_step(run_dir) is not None, 240, "the first registered checkpoint")
    killed_after = max(logged_steps(run_dir), default=0)
    committed = registered_step(run_dir)  # what a restart can resume from
    os.killpg(node.pid, signal.SIGKILL)
    node.wait()
    head.add_node(node_args)
    head.wait_for(lambda: "[raydino] done" in job(head, job_id, "/logs"), 300, "the run to finish")
    done_at = time.monotonic()
    status = None
    while time.monotonic() - done_at < 60:
        status = job(head, job_id)["status"]
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(1)
    workers = [json.loads(p.read_text()) for p in (run_dir / "workers").glob("rank*.json")]
    return {
        "status": status,
        "end_s": time.monotonic() - done_at,
        "killed_after": killed_after,
        "committed": committed,
        "workers": workers,
        "logs": job(head, job_id, "/logs"),
    }


@pytest.mark.timeout(600)
def test_losing_the_training_node_restarts_from_the_checkpoint_and_the_job_ends(head, tmp_path):
    train_node = ["--num-cpus=2"]
    head.add_node([DATA_ROLE, "--num-cpus=1"])  # data tasks stay off the training node (data.node_labels)
    out = run_losing_a_node(head, tmp_path, "lose-train", train_node, ("data.node_labels={raydino/role: cpu-data}",))
    assert out["status"] == "SUCCEEDED", f"{out['status']} {out['end_s']:.0f} s after done:\n{out['logs'][-3000:]}"
    restarted = [w for w in out["workers"] if w["start_step"] > 0]
    assert restarted, "no worker was restarted after the training node was lost"
    # What is lost: the steps since the latest committed checkpoint (train.checkpoint_every, plus any trained
    # while the newest checkpoint was still uploading in the background).
    assert min(w["start_step"] for w in restarted) >= out["committed"]
    assert out["killed_after"] - out["committed"] <= 2 * CHECKPOINT_EVERY
    assert max(w.get("end_step", 0) for w in out["workers"]) == EPOCHS * STEPS_PER_EPOCH


@pytest.mark.timeout(600)
def test_losing_the_data_node_reruns_its_tasks_and_the_job_ends(head, tmp_path):
    head.add_node(["--num-cpus=2"])  # the training node, kept
    data_node = [DATA_ROLE, "--num-cpus=1"]
    out = run_losing_a_node(head, tmp_path, "lose-data", data_node, ("data.node_labels={raydino/role: cpu-data}",))
    assert out["status"] == "SUCCEEDED", f"{out['status']} {out['end_s']:.0f} s after done:\n{out['logs'][-3000:]}"
    assert max(w.get("end_step", 0) for w in out["workers"]) == EPOCHS * STEPS_PER_EPOCH


@pytest.mark.timeout(600)
def test_losing_a_search_trials_node_restarts_the_trial_from_its_checkpoint(head, tmp_path):
    """A one-trial search whose trial (2 CPUs) fits only on the worker node; that node is killed after the
    trial's first checkpoint and a replacement started.  The trial must finish, restarted once, without
    training its first epoch again."""
    trial_node = ["--num-cpus=2"]
    node = head.add_node(trial_node)
    head.wait_for(lambda: head.alive_nodes() >= 2, 90, "the worker node")
    sets = ["name=lose", "num_samples=1", "max_concurrent_trials=1", "searcher.kind=random", "scheduler.kind=fifo",
            "resources.cpus_per_worker=2", "time_budget_s=480", "run.shared_fs=true"]  # fmt: skip
    cmd = [str(VENV_BIN / "python"), "-m", "raydino.tune", str(REPO / "tuning" / "smoke.yaml"), "--storage", str(tmp_path / "runs"),
           "--cache", str(tmp_path / "cache"), *(a for s in sets for a in ("--set", s))]  # fmt: skip
    log_path = tmp_path / "tune.log"
    with log_path.open("w") as log:
        driver = subprocess.Popen(cmd, cwd=REPO, env=head.driver_env(), stdout=log, stderr=subprocess.STDOUT)
        try:
            exp = tmp_path / "runs" / "lose"
            head.wait_for(lambda: any(exp.glob("trial_*/checkpoint_*")) or driver.poll() is not None, 300, "the trial's first checkpoint")
            assert driver.poll() is None, log_path.read_text()[-3000:]
            os.killpg(node.pid, signal.SIGKILL)
            node.wait()
            head.add_node(trial_node)
            driver.wait(timeout=420)
        finally:
            if driver.poll() is None:
                driver.kill()
    out = log_path.read_text()
    assert driver.returncode == 0, out[-4000:]
    assert "restarting it from its last checkpoint (restart 1 of 3)" in out, out[-4000:]
    (row,) = pcsv.read_csv(exp / "results.csv").to_pylist()
    assert (row["status"], row["restarts"], row["epoch"]) == ("finished", 1, 4), row
    epochs = [h["epoch"] for h in pcsv.read_csv(exp / "metrics.csv").to_pylist()]
    assert epochs.count(1) == 1, f"the restarted trial trained its first epoch again: reports at epochs {epochs}"
