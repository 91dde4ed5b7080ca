"""Autoscaling for real, on this machine: a head-only cluster grows for a pretraining run and shrinks after it.

The cluster is Ray's own autoscaler (v1, as `ray up` runs it) with the `fake_multinode` provider,
whose "nodes" are extra raylets on this machine (see tests/helpers/fake_cluster.py).  The head has no CPU,
so the smoke pretraining (2 DDP workers × 1 CPU, plus Ray Data's reading and augmentation) can only
run on nodes the autoscaler launches; `raydino.pretrain` must see that an autoscaler manages the
cluster (no RAYDINO_ASSUME_AUTOSCALER here) and wait for nodes instead of refusing the run.  After
the run the idle nodes must be terminated (idle timeout 15 s), leaving the head alone again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from raydino.config import load_config
from raydino.core.checkpoint import load_checkpoint
from raydino.data.loader import pretrain_rows
from raydino.data.synth import synthetic_shards
from raydino.runs.storage import open_dataset

from helpers.fake_cluster import FakeAutoscalingCluster

pytestmark = pytest.mark.slow

WORKER_TYPE = "cpu2"
# Two such nodes hold the 2 training workers (1 CPU each), the augmentation actor (data.augment_cpus=1)
# and Ray Data's file listing / read tasks (1 CPU each).  max_workers 3 works too, but Ray Data's bursty
# read demand then launches a third node that idles out and comes back: more processes on 2 cores, slower.
WORKER_NODE = {"resources": {"CPU": 2, "object_store_memory": 200 * 2**20}, "min_workers": 0, "max_workers": 2}
RUN = "auto1"
WORKERS = 2  # DDP ranks, 1 CPU each (run.cpus_per_worker of the smoke config)
# Bounds that only stop a broken run from hanging; a healthy scenario takes ~1.5 min in all.
HEAD_START_S, RUN_S, SCALE_DOWN_S = 90, 180, 60
# Short enough to see the scale-down soon after the run; long enough that the node launched for Ray Data's
# file listing survives until the training workers claim it (with 6 s it was often removed and relaunched
# under load: ~15 s lost).
IDLE_TIMEOUT_MINUTES = 0.25


class NodeWatcher:
    """Polls the cluster every second from a thread: every node seen alive, its configured type, the peak count."""

    def __init__(self, cluster: FakeAutoscalingCluster) -> None:
        self.cluster = cluster
        self.seen_alive: set[str] = set()
        self.node_types: dict[str, str] = {}
        self.max_alive = 0
        self.timeline: list[tuple[float, int]] = []  # (seconds since start, nodes alive) at every change
        self._t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                alive = {n["node_id"] for n in self.cluster.alive_nodes()}
                self.node_types.update(self.cluster.node_type_mapping())
            except (OSError, KeyError, ValueError):
                alive = set()  # the dashboard missed one poll under load: try again
            self.seen_alive |= alive
            self.max_alive = max(self.max_alive, len(alive))
            if alive and (not self.timeline or self.timeline[-1][1] != len(alive)):
                self.timeline.append((round(time.monotonic() - self._t0, 1), len(alive)))
            self._stop.wait(1.0)

    def __enter__(self) -> NodeWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=15)


def run_pretrain(args: list[str], env: dict[str, str], cwd: Path, timeout_s: float) -> subprocess.CompletedProcess:
    """`python -m raydino.pretrain ARGS` as its own process group, killed whole if it outlives `timeout_s`."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "raydino.pretrain", *args],
        env=env,
        cwd=cwd,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"pretraining did not finish within {timeout_s}s:\n{out[-4000:]}")
    finally:
        if proc.poll() is None:  # interrupted (pytest-timeout, Ctrl-C): never leave the driver behind
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, None)


@pytest.mark.timeout(HEAD_START_S + RUN_S + SCALE_DOWN_S + 60)
def test_smoke_pretraining_scales_a_head_only_cluster_up_and_back_down(tmp_path):
    shards = synthetic_shards(96, 64, seed=0, cache_root=str(tmp_path / "synth"), workers=1, progress=False)
    storage = tmp_path / "runs"
    cfg = load_config("smoke", [f"data.uri={shards}"])
    planned_steps = pretrain_rows(open_dataset(shards, cfg)) // (cfg.train.batch_size * WORKERS) * cfg.train.epochs

    env = {k: v for k, v in os.environ.items() if k != "RAYDINO_ASSUME_AUTOSCALER"}
    t0 = time.monotonic()
    with FakeAutoscalingCluster(
        {WORKER_TYPE: WORKER_NODE}, idle_timeout_minutes=IDLE_TIMEOUT_MINUTES, start_timeout_s=HEAD_START_S, env=env
    ) as cluster:
        head_s = time.monotonic() - t0
        head = cluster.head_node_id()
        assert [n["node_id"] for n in cluster.alive_nodes()] == [head], "the cluster must start with the head only"

        t0 = time.monotonic()
        with NodeWatcher(cluster) as watcher:
            done = run_pretrain(
                # The fake nodes share this machine's disk: local paths are shared here, as an NFS mount would be.
                [
                    "--config",
                    "smoke",
                    "--workers",
                    str(WORKERS),
                    "--data",
                    shards,
                    "--storage",
                    str(storage),
                    "--name",
                    RUN,
                    "--no-probe",
                    "--set",
                    "run.shared_fs=true",
                ],  # fmt: skip
                cluster.driver_env(),
                tmp_path,
                RUN_S,
            )
        run_s = time.monotonic() - t0
        assert done.returncode == 0, f"pretraining failed ({done.returncode}):\n{done.stdout[-4000:]}"

        # The run finished and left its final checkpoint in storage.
        summary = json.loads((storage / RUN / "summary.json").read_text())
        assert summary["status"] == "finished"
        assert Path(summary["checkpoint"]).parent == storage / RUN
        assert load_checkpoint(summary["checkpoint"])["step"] == planned_steps

        # Both ranks trained on nodes the autoscaler launched, none on the head.
        ranks = [json.loads(p.read_text()) for p in sorted((storage / RUN / "workers").glob("rank*.json"))]
        assert sorted(r["rank"] for r in ranks) == list(range(WORKERS))
        trained_on = {r["node_id"] for r in ranks}
        assert head not in trained_on
        assert trained_on <= watcher.seen_alive
        assert {watcher.node_types.get(n) for n in trained_on} == {WORKER_TYPE}
        assert watcher.max_alive >= 2, "no node was ever added to the head"
        launched = {n for n, t in watcher.node_types.items() if t == WORKER_TYPE}

        # Idle again: the autoscaler terminates every node it launched, leaving the head alone.
        idle_s = cluster.wait_for(
            lambda: [n["node_id"] for n in cluster.alive_nodes()] == [head], SCALE_DOWN_S, "the idle worker nodes to be removed"
        )
        dead = {n["node_id"] for n in cluster.nodes() if n["state"] == "DEAD"}
        assert launched <= dead
        print(
            f"\n[autoscaling] head up in {head_s:.0f}s; run {run_s:.0f}s, {len(launched)} node(s) launched, "
            f"(seconds, nodes alive): {watcher.timeline}; back to the head only {idle_s:.0f}s after the run ended"
        )
    assert cluster.processes_left() == [], "processes of the fake cluster survived its teardown"
