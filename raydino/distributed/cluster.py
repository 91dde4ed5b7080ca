"""Start or join a Ray cluster, once, the same way for every recipe.

`init_ray` joins the cluster of `ray job submit` (RAY_ADDRESS) or starts a local Ray sized for the
job.  Only non-secret storage settings (AWS_*, the GCS emulator and project) travel to the other
nodes (`data.storage.forwardable_env`): each node reads credentials from its own chain.  Under `ray job submit`, settings the job's own runtime env
already carries are not sent again (`driver_env_vars`): Ray refuses a driver that restates them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import socket
from pathlib import Path

from raydino.config import Config
from raydino.data.storage import forwardable_env

RAY_DATA_LOGGING = Path(__file__).with_name("ray_data_logging.yaml")


def local_cpu_tokens(cfg: Config) -> int:
    """Logical CPUs of a local Ray for one pretraining run: its workers and data tasks, at most 2x the cores.

    Logical CPUs are scheduling tokens: a small machine runs the demo's workers and augmentation
    side by side, plus one token for a second data task (reads next to augmentation).  The cap keeps
    `--workers 64` on a laptop from starting 64 processes: it fails the resource check instead.
    """
    need = cfg.run.workers * cfg.run.cpus_per_worker + cfg.data.augment_cpus + 1
    cores = os.cpu_count() or 1
    return max(cores, min(math.ceil(need), max(4, 2 * cores)))


# Ray's job supervisor hands the submitted job's config (its runtime env) to the driver in this variable
# (ray._private.runtime_env.constants, Ray 2.60); `ray.init` then merges the driver's runtime env into it.
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def driver_env_vars() -> dict[str, str]:
    """The storage settings to forward to every node: `forwardable_env` less what the job's runtime env sets.

    A job submitted with `--runtime-env-json '{"env_vars": {"AWS_REGION": ...}}'` runs its driver with
    that variable set; forwarding it again makes `ray.init` fail ("Failed to merge the Job's runtime env
    ... because of a conflict"), and it reaches every node through the job's runtime env anyway.
    """
    env = forwardable_env()
    raw = os.environ.get(JOB_CONFIG_ENV)
    if not raw:
        return env
    try:
        job_vars = (json.loads(raw).get("runtime_env") or {}).get("env_vars") or {}
    except (ValueError, AttributeError):
        job_vars = {}
    return {k: v for k, v in env.items() if k not in job_vars}


def free_port() -> int:
    """A TCP port free on loopback now (a dashboard, a torch.distributed rendezvous, a test server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_ray(num_cpus: int, *, dashboard: bool | None = None, log_to_driver: bool = True) -> None:
    """Join RAY_ADDRESS's cluster, or start a local Ray with `num_cpus` logical CPUs.  No-op if Ray is up.

    The local Ray:
    * never joins whatever /tmp/ray/ray_current_cluster points at (`address="local"`: maybe long dead);
    * has its dashboard where ray[default] is installed (`include_dashboard=None`; a bare GPU image with
      minimal Ray gets Ray's minimal API server instead of a start-up error), on a port chosen here and
      pinned for every process of this cluster through RAY_API_SERVER_ADDRESS.  Ray Train frees a
      stopped worker group's placement group through that State API; without the pin it scans the
      machine for Ray instances and fails when it finds two (parallel test runs, a second search), and
      the leaked group starves later runs;
    * keeps Ray Data's per-epoch INFO lines in its log file, off the terminal (`ray_data_logging.yaml`);
    * keeps up to max(8, 2 x CPUs) idle worker processes (`num_workers_soft_limit`; Ray keeps only as many
      as CPUs): when trials or workers hold every CPU, the data tasks' workers were killed between
      epochs and every epoch paid ~4 s of torch imports (2 cores: smoke search 72 s -> 31-42 s).

    The benchmarks pass `dashboard=False, log_to_driver=False`: fewer processes in what they measure.
    """
    import ray

    if ray.is_initialized():
        return
    env = driver_env_vars()
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env={"env_vars": env} if env else None, log_to_driver=log_to_driver)
        return
    port = free_port()
    api = f"http://127.0.0.1:{port}"
    before = os.environ.get("RAY_API_SERVER_ADDRESS")
    os.environ["RAY_API_SERVER_ADDRESS"] = api  # inherited by the raylet Ray starts now
    try:
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=dashboard,
            dashboard_host="127.0.0.1",
            dashboard_port=port,
            runtime_env={"env_vars": {**env, "RAY_API_SERVER_ADDRESS": api, "RAY_DATA_LOGGING_CONFIG": str(RAY_DATA_LOGGING)}},
            log_to_driver=log_to_driver,
            _system_config={"num_workers_soft_limit": max(8, 2 * num_cpus)},
        )
    finally:
        # Not left behind in this process: a later Ray started here must not point at this dashboard.
        if before is None:
            os.environ.pop("RAY_API_SERVER_ADDRESS", None)
        else:
            os.environ["RAY_API_SERVER_ADDRESS"] = before


def quiet_ray_data() -> None:
    """Ray Data's per-operator progress bars and start/finish lines flood the driver; raydino prints its own progress."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


class _NoReportDumps(logging.Filter):
    """Drops Ray Train's per-report INFO lines (`Reporting training result N: TrainingReport(...)`,
    `Checkpoint successfully created at: ...`).

    Ray Train 2.60 logs one for every `ray.train.report` on every worker, through a logger named by
    its file path (so `RunConfig(logging_config=...)`, which filters `ray.train.*`, cannot reach it)
    into the root logger's console handler, which Ray forwards to the driver's terminal.
    """

    _PER_REPORT = ("Reporting training result", "Checkpoint successfully created")

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not str(record.msg).startswith(self._PER_REPORT)


def hide_report_dumps() -> None:
    """On a Ray Train worker: keep the report dumps in Ray Train's log files, off the console (and so the driver)."""
    # Ray Train's worker logging: the root logger (the report dumps) and `ray.train` (checkpoint lines),
    # each with a console handler and file handlers.
    for handler in logging.getLogger().handlers + logging.getLogger("ray.train").handlers:
        if "File" not in type(handler).__name__ and not any(isinstance(f, _NoReportDumps) for f in handler.filters):
            handler.addFilter(_NoReportDumps())


def object_store_used_mb(gcs_address: str) -> float | None:
    """MiB of the object store in use (Ray's `ray memory --stats-only` figure); None where Ray does not say.

    Ray has no public API for this: `ray._private.internal_api.memory_summary`, checked against Ray 2.60.
    """
    try:
        from ray._private.internal_api import memory_summary

        text = memory_summary(address=gcs_address, stats_only=True)
    except Exception:
        return None
    m = re.search(r"Plasma memory usage (\d+) MiB", text)
    return float(m.group(1)) if m else None
