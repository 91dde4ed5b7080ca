"""`python -m raydino.pretrain`: distributed DINO pretraining on Ray Train over Parquet shards.

With no arguments it runs the embedded default: synthetic fundus images → local shards → a local
Ray → the `demo` config on 2 DDP workers → a linear probe of the teacher against a random backbone.
On a cluster: `ray job submit --working-dir . -- python -m raydino.pretrain --config vits16-paper
--data s3://bucket/fundus --storage s3://bucket/runs --name vits16-weak`.

Reading order: `main` → `run` (validate everything, then start Ray, check the cluster can host the
run, build the Ray Data stream and the TorchTrainer) → `train_worker` (what every DDP rank does).
Everything that can be checked is checked before training starts; the same command with the same
`--name` resumes from the run's latest checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .config import Config, ConfigError, build_config, load_config, preset_names
from .data.storage import StorageError, redact
from .run_storage import RunStorage, ensure_dataset, open_dataset

DEFAULT_CACHE = Path(".raydino")

EXIT_BAD_INPUT = 2  # config, data, storage or cluster cannot work: nothing was trained
EXIT_TRAINING_FAILED = 1  # Ray Train gave up (more failures than run.max_failures)
EXIT_NON_FINITE = 3  # the loss became NaN/inf: stopped, the last good checkpoint is kept
# Ray Train's time limit for one attempt to start the worker group, and its default (Ray 2.60).
START_TIMEOUT_ENV, DEFAULT_START_TIMEOUT_S = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", 60.0
NON_FINITE_FILE = "non_finite.json"  # in the run directory: step and message of a non-finite stop


class NonFiniteLossStop(RuntimeError):
    """Training stopped because the loss became non-finite; carries the step and the good checkpoint."""

    def __init__(self, message: str, step: int, checkpoint: str | None) -> None:
        super().__init__(message)
        self.step = step
        self.checkpoint = checkpoint


def say(line: str) -> None:
    """Print one line, once.

    Inside Ray Train workers `print` is patched to go both to the worker's stdout and to a logger,
    and Ray forwards both to the driver, so every progress line appeared twice.  Writing to the
    stream directly goes around the patch (the line still reaches the driver through the worker log).
    """
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------- command line

EPILOG = """\
examples:
  python -m raydino.pretrain                                   # the embedded demo (~4 min on 2 cores)
  python -m raydino.pretrain --config smoke --no-probe         # a 1-minute end-to-end check
  python -m raydino.pretrain --config vits16-paper --data s3://bucket/fundus \\
      --storage s3://bucket/runs --name vits16-weak            # on a cluster, via `ray job submit`
  python -m raydino.pretrain --config smoke --print-config     # show the resolved config

resuming: run the same command with the same --name; training continues from the newest checkpoint
in STORAGE/NAME (also after Ctrl-C, a crash or a lost cluster).  Inside a run, a lost worker or node
is restarted from the last checkpoint by Ray Train, up to run.max_failures times.

cluster: set RAY_ADDRESS (done by `ray job submit`) to join a cluster; otherwise a local Ray starts.
On a multi-node cluster --data and --storage must be visible from every node (s3:// or a shared
filesystem).  S3 credentials come from the standard AWS chain (environment, ~/.aws, instance role);
a custom endpoint from --set data.s3_endpoint=URL or AWS_ENDPOINT_URL.

exit status: 0 done; 2 bad input (config, data, storage, or a cluster that can never host the run);
1 training failed more often than run.max_failures; 3 the loss became non-finite.
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m raydino.pretrain",
        description="DINO self-supervised pretraining on Ray Train (DDP) with a Ray Data multi-crop stream. "
        "With no arguments: the embedded demo on synthetic fundus images, then a linear probe.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", default="demo", metavar="NAME|FILE",
                   help=f"preset ({', '.join(preset_names())}) or a YAML file (may say `base: PRESET`); default: demo")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config field, e.g. --set train.epochs=10 --set augment.preset=weak (repeatable)")
    p.add_argument("--data", metavar="URI",
                   help="shards made by `python -m raydino.shard`: a directory, file:// or s3://bucket/prefix holding "
                        "manifest.json (default: synthetic images, generated once under ./.raydino)")
    p.add_argument("--storage", metavar="URI",
                   help="where runs live: a directory or s3://bucket/prefix; the run goes to STORAGE/NAME (default: ./runs)")
    p.add_argument("--workers", type=int, metavar="N", help="DDP training workers (default: run.workers of the config)")
    p.add_argument("--gpus-per-worker", type=float, metavar="G",
                   help="GPUs per worker: 0 trains on CPU with gloo, >0 on GPU with NCCL and bf16 (default: run.gpus_per_worker)")
    p.add_argument("--name", help="run name; the same name resumes that run (default: dino-CONFIG-PRESET-TIMESTAMP)")
    p.add_argument("--resume", action="store_true",
                   help="resume the run given by --name, or without --name the most recently written run in --storage")
    p.add_argument("--no-probe", action="store_true", help="skip the linear probe after training the demo")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    return p.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> Config:
    overrides = list(args.set)
    flag_map = {"data": "data.uri", "storage": "run.storage", "workers": "run.workers",
                "gpus_per_worker": "run.gpus_per_worker", "name": "run.name"}
    for attr, key in flag_map.items():
        value = getattr(args, attr)
        if value is not None:
            overrides.append(f"{key}={value}")
    return load_config(args.config, overrides)


def default_run_name(cfg: Config, config_name: str) -> str:
    stem = Path(config_name).stem.replace("_", "-")
    return f"dino-{stem}-{cfg.augment.preset}-{time.strftime('%Y%m%d-%H%M%S')}"


# ---------------------------------------------------------------- Ray parts

_SECRET_ENV = {"AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECURITY_TOKEN"}


def local_cpu_tokens(cfg: Config) -> int:
    """Logical CPUs of a local Ray: enough for the run's workers and data tasks, at most 2× the cores.

    Logical CPUs are scheduling tokens: a small machine runs the demo's workers and augmentation
    side by side, plus one token for a second data task (reads next to augmentation).  The cap keeps
    `--workers 64` on a laptop from starting 64 processes: it fails the resource check instead.
    """
    need = cfg.run.workers * cfg.run.cpus_per_worker + cfg.data.augment_cpus + 1
    cores = os.cpu_count() or 1
    return max(cores, min(math.ceil(need), max(4, 2 * cores)))


def init_ray(cfg: Config) -> None:
    """Join the cluster of `ray job submit` / RAY_ADDRESS, or start a local Ray sized for the run."""
    import ray

    if ray.is_initialized():
        return
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_") and k not in _SECRET_ENV}
    runtime_env = {"env_vars": env} if env else None  # endpoint/region reach every node; secrets come from the node's chain
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=runtime_env, log_to_driver=True)
        return
    # address="local": never join whatever /tmp/ray/ray_current_cluster points at (maybe long dead).
    # include_dashboard=None: the dashboard (with the State API that frees a failed worker group's
    # placement group) wherever ray[default] is installed, as raydino's dependencies ask; where only
    # minimal Ray is (a bare GPU image, say), Ray's minimal API server instead of a start-up error.
    ray.init(address="local", num_cpus=local_cpu_tokens(cfg), include_dashboard=None, dashboard_host="127.0.0.1",
             runtime_env=runtime_env, log_to_driver=True)


def quiet_ray_data() -> None:
    """Ray Data's per-operator progress bars flood the driver log; raydino prints its own progress."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False


def autoscaler_present() -> bool:
    """True when an autoscaler can add nodes to this cluster.

    A head started by `ray start` runs Ray's monitor too, in read-only mode: it publishes a status
    whose node types merely mirror the running nodes (`node_<node id>`), so a status alone proves
    nothing.  A real autoscaler maps nodes to its configured types (v1, cluster launcher), or
    reports its node groups to the GCS (v2, e.g. KubeRay).  RAYDINO_ASSUME_AUTOSCALER=1 overrides.
    """
    if os.environ.get("RAYDINO_ASSUME_AUTOSCALER") == "1":
        return True
    try:
        from ray._private import ray_constants
        from ray._private.state import state
        from ray.experimental.internal_kv import _internal_kv_get

        if state.get_cluster_config() is not None:
            return True
        raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
        report = (json.loads(raw).get("autoscaler_report") or {}) if raw else {}
        mapping = report.get("node_type_mapping") or {}
        return any(node_type != f"node_{node_id}" for node_id, node_type in mapping.items())
    except Exception:
        return False


def autoscaler_node_groups() -> list[tuple[str, dict[str, float], int]] | None:
    """The node types an autoscaler v2 (KubeRay's, with `autoscalerOptions.version: v2`) may launch:
    (name, resources per node, max count; -1 = no limit).  None where Ray does not publish them (v1)."""
    try:
        from ray._private.state import state

        return node_groups_of(state.get_cluster_config())
    except Exception:
        return None


def node_groups_of(cluster_config: Any) -> list[tuple[str, dict[str, float], int]] | None:
    """(name, resources, max count) of each node group of a Ray `autoscaler_pb2.ClusterConfig`."""
    if cluster_config is None or not cluster_config.node_group_configs:
        return None
    return [(g.name, {k: float(v) for k, v in g.resources.items()}, int(g.max_count))
            for g in cluster_config.node_group_configs]


def autoscaled_fit_problems(cfg: Config, groups: list[tuple[str, dict[str, float], int]]) -> list[str]:
    """Why the node types an autoscaler may launch can never host the run's workers (empty: they can).

    Counted generously (any group may host workers, labels aside), so a run is refused only when no
    number of nodes would do: then waiting for the autoscaler is pointless.
    """
    per_worker = {"CPU": cfg.run.cpus_per_worker, "GPU": cfg.run.gpus_per_worker}

    def per_node(resources: dict[str, float]) -> int:
        return min(int(resources.get(k, 0) // v) if v else 10**9 for k, v in per_worker.items())

    fitting = [(name, per_node(res), count) for name, res, count in groups if count != 0 and per_node(res) > 0]
    types = "; ".join(f"{name}: " + ", ".join(f"{k} {v:g}" for k, v in sorted(res.items()) if k in ("CPU", "GPU"))
                      + f" x up to {'any' if count < 0 else count}" for name, res, count in groups)
    want = f"{per_worker['CPU']:g} CPU and {per_worker['GPU']:g} GPU"
    if not fitting:
        return [f"no node type the autoscaler can launch fits one worker of {want} ({types}). Lower "
                f"--gpus-per-worker / run.cpus_per_worker, or add such a node type to the cluster"]
    if all(count >= 0 for _, _, count in fitting):
        room = sum(n * count for _, n, count in fitting)
        if room < cfg.run.workers:
            return [f"run.workers={cfg.run.workers} with {want} each: the autoscaler's node types hold at most "
                    f"{room} ({types}). Lower --workers, or raise the node types' max count"]
    return []


def start_attempts(cfg: Config) -> int:
    """How many worker-group start timeouts Ray Train may retry (its `controller_failure_limit`).

    Without an autoscaler, a worker group that cannot be placed (fragmented nodes, a node lost for
    good) will not become placeable by waiting: a few attempts, not forever.  With one, nodes may
    come: wait about `run.max_node_wait_s` (one attempt lasts RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S,
    Ray's default 60 s), so a request no node type can ever satisfy ends instead of hanging.
    """
    if not autoscaler_present():
        return 3
    if cfg.run.max_node_wait_s is None:
        return -1
    per_attempt = float(os.environ.get(START_TIMEOUT_ENV, DEFAULT_START_TIMEOUT_S))
    return max(1, math.ceil(cfg.run.max_node_wait_s / per_attempt))


def never_started(cfg: Config) -> str:
    """What to tell a user whose worker group never got placed (Ray Train gave up starting it)."""
    need = (f"the training workers never started: no room for run.workers={cfg.run.workers} x "
            f"(CPU {cfg.run.cpus_per_worker:g}, GPU {cfg.run.gpus_per_worker:g})")
    if autoscaler_present():
        return (f"{need} appeared within run.max_node_wait_s={cfg.run.max_node_wait_s} s. Check that the autoscaler has "
                f"a node type that fits one worker and room for all of them (`ray status`), or raise "
                f"run.max_node_wait_s; rerun the same command to resume")
    return (f"{need} after {start_attempts(cfg)} attempts, although the nodes' totals fit (CPUs or GPUs spread over "
            f"nodes, or a node lost). Lower --workers / run.cpus_per_worker, or free the cluster; rerun the same "
            f"command to resume")


def _has_labels(node: dict[str, Any], labels: dict[str, str] | None) -> bool:
    node_labels = node.get("Labels") or {}
    return bool(labels) and all(node_labels.get(k) == v for k, v in labels.items())


def _describe_node(node: dict[str, Any]) -> str:
    res = node.get("Resources", {})
    labels = {k: v for k, v in (node.get("Labels") or {}).items() if not k.startswith("ray.io/")}
    return f"{res.get('CPU', 0):g} CPU/{res.get('GPU', 0):g} GPU" + (f" {labels}" if labels else "")


def training_label_selector(cfg: Config) -> dict[str, str] | None:
    """Keep training workers off the nodes reserved for data (`data.node_labels`), if any.

    With several labels this keeps them off nodes carrying any one of the values (a selector
    cannot say "not all of"); the usual single `raydino/role` label is exact.
    """
    labels = cfg.data.node_labels
    return {k: f"!{v}" for k, v in labels.items()} if labels else None


def check_resources(cfg: Config, nodes: list[dict[str, Any]] | None = None) -> None:
    """Fail before training when the cluster can never host the run: its nodes cannot (and no
    autoscaler can add nodes), or, under an autoscaler that publishes its node types (v2), no
    number of those nodes could.

    Without this, Ray Train retries the worker-group start forever and Ray Data waits forever for a
    node to run its tasks: a run that can never start would just hang.
    """
    import ray

    if autoscaler_present():
        groups = autoscaler_node_groups()
        problems = autoscaled_fit_problems(cfg, groups) if groups else []
        if problems:
            raise ConfigError("the cluster's autoscaler can never add nodes for this job:\n  " + "\n  ".join(problems))
        return  # it may add the nodes; run.max_node_wait_s bounds the wait
    nodes = [n for n in (nodes if nodes is not None else ray.nodes()) if n.get("Alive")]
    data_labels = cfg.data.node_labels
    per_worker = {"CPU": cfg.run.cpus_per_worker, "GPU": cfg.run.gpus_per_worker}
    train_nodes = [n for n in nodes if not _has_labels(n, data_labels)]
    fits = sum(min(int(n["Resources"].get(k, 0) // v) if v else 10**9 for k, v in per_worker.items())
               for n in train_nodes)
    have = "; ".join(_describe_node(n) for n in nodes) or "none alive"
    problems = []
    if fits < cfg.run.workers:
        where = " not labelled for data" if data_labels else ""
        problems.append(
            f"run.workers={cfg.run.workers} with {per_worker['CPU']:g} CPU and {per_worker['GPU']:g} GPU each cannot fit "
            f"on the nodes{where} (room for {fits} workers; nodes: {have}). Lower --workers / --gpus-per-worker / "
            f"run.cpus_per_worker, or use a cluster with more nodes"
        )
    data_nodes = [n for n in nodes if _has_labels(n, data_labels)] if data_labels else nodes
    if data_labels and not data_nodes:
        problems.append(f"data.node_labels={data_labels}: no node carries these labels (add such nodes, or unset it)")
    elif data_nodes and not problems:
        # Reads and augmentation tasks each reserve data.augment_cpus; they need CPUs left over after the
        # training workers, which hold theirs for the whole run.
        free = sum(n["Resources"].get("CPU", 0) for n in data_nodes)
        held = cfg.run.workers * cfg.run.cpus_per_worker if not data_labels else 0.0
        if free - held < cfg.data.augment_cpus or \
                max(n["Resources"].get("CPU", 0) for n in data_nodes) < cfg.data.augment_cpus:
            problems.append(
                f"no CPU left for the data pipeline: its tasks need data.augment_cpus={cfg.data.augment_cpus:g} CPU "
                f"each beyond the {held:g} CPU the training workers hold (nodes: {have}). Lower "
                f"run.cpus_per_worker / data.augment_cpus or add CPU nodes"
            )
    if problems:
        raise ConfigError("the cluster cannot run this job and no autoscaler can add nodes:\n  " + "\n  ".join(problems)
                          + "\n(if an autoscaler does manage this cluster, set RAYDINO_ASSUME_AUTOSCALER=1)")


def warn_about_locality(cfg: Config, storage: RunStorage, data_uri: str) -> None:
    """On a multi-node cluster, local paths must be a shared filesystem: say so once, before training."""
    import ray

    if len([n for n in ray.nodes() if n.get("Alive")]) < 2:
        return
    local = [f"{what} {uri}" for what, uri in (("--storage", storage.uri), ("--data", data_uri)) if "://" not in uri
             or uri.startswith("file://")]
    if local:
        say(f"[raydino] note: this cluster has several nodes; {' and '.join(local)} must be on a filesystem every "
            f"node mounts (else use s3://)")


def worker_state(cfg: Config, steps_per_epoch: int) -> tuple[Any, int, int, Any, bool]:
    """On a Ray Train worker: the DINO state on this worker's device (student in DDP when there are
    several workers), restored from Ray Train's latest checkpoint if there is one.

    Returns (state, rank, world size, device, whether it was restored).
    """
    import ray.train
    import ray.train.torch
    import torch
    from torch.nn.parallel import DistributedDataParallel

    from .checkpoint import load_checkpoint, restore_state
    from .engine import build_train_state

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.train.threads or max(1, int(cfg.run.cpus_per_worker)))
    device = ray.train.torch.get_device()
    state = build_train_state(cfg, steps_per_epoch, world, device)
    if world > 1:
        state.student = DistributedDataParallel(state.student, device_ids=[device] if device.type == "cuda" else None)
    resumed = ray.train.get_checkpoint()
    if resumed:
        with resumed.as_directory() as d:
            restore_state(state, load_checkpoint(d), restore_rng=False)
    return state, rank, world, device, resumed is not None


def worker_seed(cfg: Config, rank: int, step: int) -> int:
    """A seed of its own per rank and per (re)start, so a replaced worker does not replay its crops."""
    return cfg.train.seed * 1_000_003 + rank * 10_007 + step


def train_worker(conf: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: build state, restore, stream crops, fit, report."""
    import ray.train

    from .checkpoint import save_checkpoint
    from .engine import NonFiniteLossError
    from .streaming import worker_epoch_batches
    from .tracking import RunTracker
    from .trainer import LoopHooks, fit

    cfg = build_config(conf["config"])
    state, rank, world, device, resumed = worker_state(cfg, conf["steps_per_epoch"])
    storage = RunStorage.from_dict(conf["storage"])
    if resumed and rank == 0:
        say(f"[raydino] resumed from step {state.step} (epoch {state.epoch})"
            + (" — the run is already complete, nothing to train" if state.done else ""))
    if rank == 0:
        # Drop metrics logged after the checkpoint we resume from: they are trained again.
        storage.prepare_logs(cfg.run.name, conf["log_dir"], state.step)

    spe = state.schedules.steps_per_epoch
    tracker = RunTracker(conf["log_dir"] if rank == 0 else None, state.schedules.total_steps,
                         -(-state.schedules.total_steps // spe), printer=say)
    epoch_batches = worker_epoch_batches(cfg, ray.train.get_dataset_shard("train"), device,
                                         seed=worker_seed(cfg, rank, state.step), rank=rank,
                                         epoch_rows=spe * cfg.train.batch_size)

    def on_log(state, metrics):
        if rank == 0:
            tracker.log(state.step, state.epoch, metrics)

    def on_checkpoint(state, metrics, epoch_end):
        metrics = {**metrics, "epoch_end": epoch_end, "world_size": world}
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                save_checkpoint(state, tmp)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
                if storage.is_remote:
                    storage.upload_logs(cfg.run.name, conf["log_dir"])
            # A barrier: every rank reports equally often; only rank 0 hands over a checkpoint.
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"checkpoint_{state.step:08d}")

    worker_info = {"rank": rank, "world_size": world, "node_id": ray.get_runtime_context().get_node_id(),
                   "pid": os.getpid(), "device": str(device), "start_step": state.step}
    # One small file per rank and process: which node trained what (diagnostics; the tests read it).
    info_file = f"workers/rank{rank}-pid{os.getpid()}.json"
    storage.write_text(cfg.run.name, info_file, json.dumps(worker_info))
    try:
        summary = fit(state, epoch_batches, LoopHooks(on_log, on_checkpoint), world_size=world)
    except NonFiniteLossError as e:
        # Every rank sees the same non-finite step (the engine all-reduces the check), so all stop
        # together and report once more (a barrier); no checkpoint is written, the last good one stays.
        ray.train.report({"non_finite_step": e.step, "error": str(e)})
        if rank == 0:
            # Result.metrics only carries checkpoint reports, so the driver learns of the stop from this file.
            storage.write_text(cfg.run.name, NON_FINITE_FILE, json.dumps({"step": e.step, "error": str(e)}))
            if storage.is_remote:
                storage.upload_logs(cfg.run.name, conf["log_dir"])
        tracker.close()
        return
    worker_info.update(end_step=summary.steps, images=summary.images, seconds=round(summary.seconds, 3),
                       data_wait_seconds=round(summary.data_wait_seconds, 3))
    storage.write_text(cfg.run.name, info_file, json.dumps(worker_info))
    if rank == 0 and summary.first_loss is not None:  # None: resumed a complete run, nothing trained
        if storage.is_remote:
            storage.upload_logs(cfg.run.name, conf["log_dir"])
        say(f"[raydino] finished {summary.steps} steps in {summary.seconds:.0f}s, loss {summary.first_loss:.4f} → "
            f"{summary.last_loss:.4f}, data-wait {summary.data_wait_seconds / max(summary.seconds, 1e-9):.0%}"
            f"{', collapsed: ' + summary.collapse if summary.collapse else ''}")
    tracker.close()


def run(cfg: Config, config_name: str = "demo", resume: bool = False, probe: bool = True,
        cache: Path = DEFAULT_CACHE) -> dict[str, Any]:
    """Validate, start Ray, train, report.  Returns a summary dict (also written as summary.json).

    Raises ConfigError (bad input, before any training), NonFiniteLossStop, or Ray Train's
    TrainingFailedError when workers failed more than `run.max_failures` times.
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from .streaming import build_pretrain_dataset, data_execution_options, pretrain_rows

    # 1. Everything that needs no cluster: storage, run name, data, batch arithmetic.
    storage = RunStorage.open(cfg.run.storage, cfg.data.s3_endpoint, cfg.data.s3_region)
    name = cfg.run.name
    if resume and not name:
        name = storage.latest_run()
        if name is None:
            raise ConfigError(f"--resume without --name: no runs in {storage.uri} (pass --name, or drop --resume)")
    name = name or default_run_name(cfg, config_name)
    if resume and not storage.exists(name):
        raise ConfigError(f"--resume: no run named {name!r} in {storage.uri}")
    cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"name": name})})
    storage.check_writable(name)
    data_uri = cfg.data.uri or ensure_dataset(cfg, cache)
    shards = open_dataset(data_uri, cfg)
    rows = pretrain_rows(shards)
    global_batch = cfg.train.batch_size * cfg.run.workers
    steps_per_epoch = cfg.train.steps_per_epoch or rows // global_batch
    if steps_per_epoch < 1:
        raise ConfigError(f"data has {rows} training rows, fewer than one global batch "
                          f"(train.batch_size={cfg.train.batch_size} × run.workers={cfg.run.workers})")

    # 2. The cluster: join or start it, and make sure it can ever host this run.
    init_ray(cfg)
    check_resources(cfg)
    quiet_ray_data()
    warn_about_locality(cfg, storage, data_uri)
    log_dir = storage.local_log_dir(name)
    storage.write_text(name, "config.yaml", cfg.to_yaml())
    say(f"[raydino] run {name}: {cfg.model.arch}, preset {cfg.augment.preset}, {rows} images, "
        f"{cfg.run.workers} workers × batch {cfg.train.batch_size}, {steps_per_epoch} steps/epoch; "
        f"storage {storage.uri}/{name}")
    if not shards.rows_shuffled:
        say(f"[raydino] note: {shards.uri} stores its rows in source order (sharded by an older raydino, or with "
            f"--no-shuffle): on a class-sorted tree each shard holds one class, which the per-epoch shuffle of shard "
            f"order and data.shuffle_buffer only partly mix. Shard it again with `python -m raydino.shard` for "
            f"well-mixed batches")

    # 3. Train.
    gpus = cfg.run.gpus_per_worker
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": cfg.to_dict(), "steps_per_epoch": steps_per_epoch, "log_dir": str(log_dir),
                           "storage": storage.to_dict(name)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.run.workers, use_gpu=gpus > 0,
            resources_per_worker={"CPU": cfg.run.cpus_per_worker, **({"GPU": gpus} if gpus else {})},
            label_selector=training_label_selector(cfg),
        ),
        torch_config=TorchConfig(backend="nccl" if gpus > 0 else "gloo"),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage.train_storage_path,
            storage_filesystem=storage.filesystem if storage.is_remote else None,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures,
                                                   controller_failure_limit=start_attempts(cfg)),
        ),
        datasets={"train": build_pretrain_dataset(cfg, shards)},
        # Train replaces the dataset's execution options; this carries data.node_labels through.
        dataset_config=ray.train.DataConfig(execution_options=data_execution_options(cfg)),
    )
    storage.delete(name, NON_FINITE_FILE)  # left by an earlier attempt of this run, if any
    t0 = time.perf_counter()
    result = trainer.fit()
    metrics = dict(result.metrics or {})  # those of the latest checkpoint
    non_finite = storage.read_text(name, NON_FINITE_FILE)
    checkpoint = storage.checkpoint_uri(result.checkpoint)
    summary: dict[str, Any] = {"run": name, "storage": storage.uri, "checkpoint": checkpoint, "final_metrics": metrics,
                               "seconds": time.perf_counter() - t0, "config": cfg.to_dict()}
    summary["loss_plot"] = storage.finish_logs(name, log_dir)
    if non_finite is not None:
        stop = json.loads(non_finite)
        summary.update(status="non_finite_loss", non_finite_step=stop["step"])
        storage.write_text(name, "summary.json", json.dumps(summary, indent=2, default=str))
        raise NonFiniteLossStop(f"{stop['error']}; latest good checkpoint: {checkpoint or 'none'}", int(stop["step"]),
                                checkpoint)
    summary["status"] = "finished"
    if probe and result.checkpoint is not None and cfg.data.uri is None:
        summary["probe"] = probe_demo(result.checkpoint, cfg, data_uri)
    storage.write_text(name, "summary.json", json.dumps(summary, indent=2, default=str))
    say(f"[raydino] done: {name}; checkpoint {checkpoint}; loss plot {summary['loss_plot']}")
    return summary


def probe_demo(checkpoint: Any, cfg: Config, data_uri: str) -> dict[str, Any]:
    """Linear probe (fast) of the trained teacher next to a randomly initialised backbone of the same arch."""
    from .probe import load_labelled, load_teacher_backbone, probe_backbone

    data = load_labelled(data_uri, dataset="synthetic")
    size = cfg.probe.image_size or cfg.augment.global_crop_size
    results = {}
    with checkpoint.as_directory() as d:
        trained = load_teacher_backbone(d)
    random_init = load_teacher_backbone("random", arch=cfg.model.arch, image_size=cfg.augment.global_crop_size)
    for label, loaded in (("pretrained", trained), ("random_init", random_init)):
        r = probe_backbone(loaded.backbone, data, "fast", image_size=size, batch_size=cfg.probe.batch_size,
                           n_bootstrap=200, progress=None)
        results[label] = {"auroc": r["mean"]["auroc"], "aupr": r["mean"]["aupr"], "ci95_auroc": r.get("ci95", {}).get("auroc")}
    fmt = lambda v: "undefined" if v is None else f"{v:.3f}"  # noqa: E731
    say(f"[raydino] linear probe on the synthetic DR-grading test split ({len(data.splits['test'])} images): "
        f"test AUROC {fmt(results['pretrained']['auroc'])} pretrained vs {fmt(results['random_init']['auroc'])} "
        f"random init (AUPR {fmt(results['pretrained']['aupr'])} vs {fmt(results['random_init']['aupr'])})")
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = resolve_config(args)
        if args.print_config:
            say(cfg.to_yaml().rstrip())
            return 0
        run(cfg, args.config, resume=args.resume, probe=not args.no_probe)
    except (ConfigError, StorageError) as e:
        print(f"raydino.pretrain: error: {redact(str(e))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except NonFiniteLossStop as e:
        print(f"raydino.pretrain: stopped at step {e.step}: {e}. Lower optim.lr or raise optim.warmup_epochs, "
              f"then rerun the same command to continue from that checkpoint.", file=sys.stderr)
        return EXIT_NON_FINITE
    except Exception as e:
        import ray.train

        if not isinstance(e, ray.train.TrainingFailedError):
            raise
        if "startup timed out" in str(e) or "StartupTimeout" in repr(e):  # Ray Train 2.60's wording
            print(f"raydino.pretrain: {never_started(cfg)} ({e})", file=sys.stderr)
            return EXIT_TRAINING_FAILED
        print(f"raydino.pretrain: training failed more than run.max_failures times: {e}\n"
              f"Fix the cause above, then rerun the same command (same --name) to resume from the latest checkpoint.",
              file=sys.stderr)
        return EXIT_TRAINING_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
