"""What `init_ray` sends to every node, and local paths on a multi-node cluster, without starting Ray
(the real `ray job submit` is in test_pretrain_cluster, a real multi-node refusal in test_pretrain_multinode)."""

from __future__ import annotations

import json
import os

import pytest

from raydino.config import ConfigError, load_config
from raydino.distributed.capacity import check_locality, start_attempts, start_timeout_s
from raydino.distributed.cluster import JOB_CONFIG_ENV, driver_env_vars
from raydino.distributed.trainer import torch_trainer


def test_aws_settings_are_forwarded_without_credentials(monkeypatch):
    monkeypatch.delenv(JOB_CONFIG_ENV, raising=False)
    monkeypatch.setenv("AWS_REGION", "eu-west-2")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG")
    env = driver_env_vars()
    assert env["AWS_REGION"] == "eu-west-2" and env["AWS_ENDPOINT_URL_S3"] == "http://127.0.0.1:9000"
    assert "AWS_SECRET_ACCESS_KEY" not in env


def test_settings_the_submitted_jobs_runtime_env_carries_are_not_sent_again(monkeypatch):
    # What Ray's job supervisor gives the driver of `ray job submit --runtime-env-json '{"env_vars": {...}}'`:
    # the variable itself, and the job's config; restating the variable makes ray.init refuse to merge.
    monkeypatch.setenv("AWS_REGION", "eu-west-2")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9000")
    job = {"runtime_env": {"env_vars": {"AWS_REGION": "eu-west-2"}, "working_dir": "gcs://_ray_pkg_x.zip"}, "metadata": {}}
    monkeypatch.setenv(JOB_CONFIG_ENV, json.dumps(job))
    env = driver_env_vars()
    assert "AWS_REGION" not in env and env["AWS_ENDPOINT_URL_S3"] == "http://127.0.0.1:9000"
    monkeypatch.setenv(JOB_CONFIG_ENV, json.dumps({"runtime_env": None}))  # a job without a runtime env
    assert driver_env_vars()["AWS_REGION"] == "eu-west-2"


# ---------------------------------------------------------------- local paths on a multi-node cluster

TWO_NODES = [{"Alive": True, "NodeID": "a"}, {"Alive": True, "NodeID": "b"}, {"Alive": False, "NodeID": "c"}]


def test_local_paths_on_several_nodes_are_refused_naming_each_path(monkeypatch):
    monkeypatch.delenv("RAYDINO_ASSUME_AUTOSCALER", raising=False)
    cfg = load_config("smoke")
    uris = {"--storage": "/home/me/runs", "--data": "s3://bucket/shards", "probe.data": "file:///data/messidor2"}
    with pytest.raises(ConfigError, match=r"2 nodes.*--storage=/home/me/runs, probe.data=file:///data/messidor2 is a local path.*run.shared_fs=true"):
        check_locality(cfg, uris, TWO_NODES)
    check_locality(cfg, uris, TWO_NODES[:1] + TWO_NODES[2:])  # one live node: local paths are fine
    check_locality(cfg, {"--storage": "s3://b/runs", "--data": "s3://b/shards", "probe.data": None}, TWO_NODES)
    shared = load_config("smoke", ["run.shared_fs=true"])
    check_locality(shared, uris, TWO_NODES)  # the user says every node mounts them


def test_an_autoscaling_cluster_counts_as_several_nodes_for_local_paths(monkeypatch):
    monkeypatch.setenv("RAYDINO_ASSUME_AUTOSCALER", "1")
    with pytest.raises(ConfigError, match="an autoscaler that adds nodes"):
        check_locality(load_config("smoke"), {"--storage": "runs"}, TWO_NODES[:1])


# ---------------------------------------------------------------- waiting for nodes, failure budgets


def test_with_an_autoscaler_node_waits_are_bounded_each_not_over_the_run(monkeypatch):
    """Ray counts worker-group start timeouts over the run's life: one attempt lasting the whole
    run.max_node_wait_s and no retry make the bound per wait (slow spot replacements cost nothing)."""
    monkeypatch.setenv("RAYDINO_ASSUME_AUTOSCALER", "1")
    cfg = load_config("smoke", ["run.max_node_wait_s=1200"])
    assert (start_attempts(cfg), start_timeout_s(cfg)) == (0, 1200.0)
    forever = load_config("smoke", ["run.max_node_wait_s=null"])
    assert (start_attempts(forever), start_timeout_s(forever)) == (-1, None)
    monkeypatch.delenv("RAYDINO_ASSUME_AUTOSCALER")
    assert (start_attempts(cfg), start_timeout_s(cfg)) == (3, None)  # no autoscaler: no node will come


def test_preemptions_have_their_own_budget_in_ray_trains_failure_config(monkeypatch):
    monkeypatch.delenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", raising=False)
    cfg = load_config("smoke", ["run.max_failures=0", "run.max_preemptions=5"])
    trainer = torch_trainer(
        lambda conf: None, {}, cfg.run, name="t", storage_path="/tmp/x", max_failures=cfg.run.max_failures,
        max_preemptions=cfg.run.max_preemptions, start_attempts=0, start_timeout_s=900.0,
    )  # fmt: skip
    failure = trainer.run_config.failure_config
    assert (failure.max_failures, failure.max_preemption_failures, failure.controller_failure_limit) == (0, 5, 0)
    assert os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] == "900"  # Ray hands it to Train's controller


def test_train_controller_polls_every_half_second_unless_the_user_sets_it(monkeypatch):
    """Ray Train's controller registers at most one report per worker per poll: at Ray's 2 s a run that
    checkpoints often ended long after its last step (raydino.distributed.trainer.TRAIN_POLL_ENV)."""
    from ray.train.v2._internal.constants import get_env_vars_to_propagate

    cfg = load_config("smoke")
    monkeypatch.delenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", raising=False)
    torch_trainer(lambda conf: None, {}, cfg.run, name="t", storage_path="/tmp/x")
    # What Ray Train hands from the driver to its controller actor at fit().
    assert get_env_vars_to_propagate()["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.5"
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "5")
    torch_trainer(lambda conf: None, {}, cfg.run, name="t", storage_path="/tmp/x")
    assert get_env_vars_to_propagate()["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "5"
