"""`python -m raydino.pretrain`: distributed DINO pretraining on Ray Train over Parquet shards.

With no arguments it runs the embedded default: synthetic fundus images → local shards → a local
Ray → the `demo` config on 2 DDP workers → a linear probe of the teacher against a random backbone.
On a cluster: `ray job submit --working-dir . -- python -m raydino.pretrain --config vits16-paper
--data s3://bucket/fundus --storage s3://bucket/runs --name vits16-weak`.

Everything is validated before Ray starts; the same command with the same `--name` resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .config import Config, ConfigError, build_config, load_config
from .run_storage import RunStorage, ensure_dataset, open_dataset

DEFAULT_CACHE = Path(".raydino")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m raydino.pretrain",
        description="DINO pretraining on Ray Train. With no arguments: the embedded demo on synthetic fundus images.",
    )
    p.add_argument("--config", default="demo", help="preset name (demo, smoke, vits16-paper, resnet50) or a YAML file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config field, e.g. --set train.epochs=10 (repeatable)")
    p.add_argument("--data", help="shards to train on: a directory, file:// or s3://bucket/prefix holding manifest.json (default: synthetic)")
    p.add_argument("--storage", help="where runs and checkpoints go: a directory or s3://bucket/prefix (default: ./runs)")
    p.add_argument("--workers", type=int, help="number of DDP training workers (default: config run.workers)")
    p.add_argument("--gpus-per-worker", type=float, help="GPUs per worker; 0 trains on CPU with gloo")
    p.add_argument("--name", help="run name; rerunning with the same name resumes from its latest checkpoint")
    p.add_argument("--resume", action="store_true", help="resume the named run (or the newest run in --storage)")
    p.add_argument("--no-probe", action="store_true", help="skip the linear probe after training")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
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
    need = cfg.run.workers * cfg.run.cpus_per_worker + (cfg.data.augment_concurrency or 1) * cfg.data.augment_cpus
    # Logical CPUs are scheduling tokens: a small machine runs the demo's workers and augmenters side by
    # side, plus one token for Ray Data's file listing and read tasks (else they wait forever).
    ray.init(address="local", num_cpus=max(int(need + 0.999) + 1, os.cpu_count() or 1), include_dashboard=False,
             runtime_env=runtime_env, log_to_driver=True)


_SECRET_ENV = {"AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECURITY_TOKEN"}


def quiet_ray_data() -> None:
    """Ray Data's per-operator progress bars flood the driver log; raydino prints its own progress."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False


def autoscaler_present() -> bool:
    """True when an autoscaler manages this cluster (it publishes its status in the GCS key-value store)."""
    if os.environ.get("RAYDINO_ASSUME_AUTOSCALER") == "1":
        return True
    try:
        from ray._private import ray_constants
        from ray.experimental.internal_kv import _internal_kv_get

        return bool(_internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS))
    except Exception:
        return False


def check_resources(cfg: Config) -> None:
    """Fail before training when the cluster can never host the workers (no autoscaler to add nodes)."""
    import ray

    per_worker = {"CPU": cfg.run.cpus_per_worker, "GPU": cfg.run.gpus_per_worker}
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    fits = sum(min(int(n.get(k, 0) // v) if v else 10**9 for k, v in per_worker.items()) for n in nodes)
    if fits >= cfg.run.workers or autoscaler_present():
        return
    have = ", ".join(f"{n.get('CPU', 0):g} CPU/{n.get('GPU', 0):g} GPU" for n in nodes)
    raise ConfigError(
        f"run.workers={cfg.run.workers} with {per_worker['CPU']:g} CPU and {per_worker['GPU']:g} GPU each cannot fit "
        f"on this cluster (nodes: {have}; room for {fits} workers) and no autoscaler can add nodes. "
        f"Lower --workers / --gpus-per-worker / run.cpus_per_worker, or use a cluster with more nodes."
    )


def train_worker(conf: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: build state, restore, stream crops, fit, report."""
    import ray.train
    import ray.train.torch
    import torch
    from torch.nn.parallel import DistributedDataParallel

    from .checkpoint import load_checkpoint, restore_state, save_checkpoint
    from .engine import NonFiniteLossError, build_train_state
    from .streaming import crop_keys
    from .tracking import RunTracker
    from .trainer import LoopHooks, fit

    cfg = build_config(conf["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.train.threads or max(1, int(cfg.run.cpus_per_worker)))
    device = ray.train.torch.get_device()
    state = build_train_state(cfg, conf["steps_per_epoch"], world, device)
    if world > 1:
        state.student = DistributedDataParallel(state.student, device_ids=[device] if device.type == "cuda" else None)

    resumed = ray.train.get_checkpoint()
    if resumed:
        with resumed.as_directory() as d:
            restore_state(state, load_checkpoint(d), restore_rng=False)
        if rank == 0:
            print(f"[raydino] resumed from step {state.step} (epoch {state.epoch})", flush=True)

    tracker = RunTracker(conf["log_dir"] if rank == 0 else None, state.schedules.total_steps, cfg.train.epochs if not cfg.train.max_steps else state.schedules.total_steps // state.schedules.steps_per_epoch + 1)
    shard = ray.train.get_dataset_shard("train")
    keys = crop_keys(cfg.augment)

    def epoch_batches(epoch: int):
        for batch in shard.iter_torch_batches(batch_size=cfg.train.batch_size, drop_last=True, dtypes=torch.uint8):
            yield [batch[k] for k in keys]

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
                    storage.upload_logs(conf["log_dir"])
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"checkpoint_{state.step:08d}")

    storage = RunStorage.from_dict(conf["storage"])
    worker_info = {"rank": rank, "world_size": world, "node_id": ray.get_runtime_context().get_node_id(),
                   "pid": os.getpid(), "device": str(device), "start_step": state.step}
    # One small file per rank: which node trained what (diagnostics, and the multi-node test reads it).
    storage.write_text(cfg.run.name, f"workers/rank{rank}-pid{os.getpid()}.json", json.dumps(worker_info))
    try:
        summary = fit(state, epoch_batches, LoopHooks(on_log, on_checkpoint), world_size=world)
    except NonFiniteLossError as e:
        # Every rank sees the same non-finite step (the engine all-reduces the check), so all stop
        # together; no checkpoint is written, the last good one stays the latest.
        ray.train.report({"non_finite_step": e.step, "error": str(e)})
        tracker.close()
        return
    worker_info.update(end_step=summary.steps, images=summary.images)
    storage.write_text(cfg.run.name, f"workers/rank{rank}-pid{os.getpid()}.json", json.dumps(worker_info))
    if rank == 0:
        print(f"[raydino] finished {summary.steps} steps in {summary.seconds:.0f}s, loss {summary.first_loss:.4f} → "
              f"{summary.last_loss:.4f}, data-wait {summary.data_wait_seconds / max(summary.seconds, 1e-9):.0%}"
              f"{', collapsed: ' + summary.collapse if summary.collapse else ''}", flush=True)
    tracker.close()


def run(cfg: Config, config_name: str = "demo", resume: bool = False, probe: bool = True,
        cache: Path = DEFAULT_CACHE) -> dict[str, Any]:
    """Validate, start Ray, train, report.  Returns a summary dict (also written as summary.json)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from .streaming import build_pretrain_dataset, pretrain_rows

    storage = RunStorage.open(cfg.run.storage, cfg.data.s3_endpoint, cfg.data.s3_region)
    name = cfg.run.name or (storage.latest_run() if resume else None) or default_run_name(cfg, config_name)
    if resume and not storage.exists(name):
        raise ConfigError(f"--resume: no run named {name!r} in {storage.uri}")
    cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"name": name})})
    data_uri = cfg.data.uri or ensure_dataset(cfg, cache)
    shards = open_dataset(data_uri, cfg)
    rows = pretrain_rows(shards)
    global_batch = cfg.train.batch_size * cfg.run.workers
    steps_per_epoch = cfg.train.steps_per_epoch or rows // global_batch
    if steps_per_epoch < 1:
        raise ConfigError(f"data has {rows} training rows, fewer than one global batch "
                          f"(train.batch_size={cfg.train.batch_size} × run.workers={cfg.run.workers})")
    storage.check_writable(name)

    init_ray(cfg)
    check_resources(cfg)
    quiet_ray_data()
    log_dir = storage.local_log_dir(name)
    storage.write_text(name, "config.yaml", cfg.to_yaml())
    print(f"[raydino] run {name}: {cfg.model.arch}, preset {cfg.augment.preset}, {rows} images, "
          f"{cfg.run.workers} workers × batch {cfg.train.batch_size}, {steps_per_epoch} steps/epoch; "
          f"storage {storage.uri}/{name}", flush=True)

    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": cfg.to_dict(), "steps_per_epoch": steps_per_epoch, "log_dir": str(log_dir),
                           "storage": storage.to_dict(name)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.run.workers, use_gpu=cfg.run.gpus_per_worker > 0,
            resources_per_worker={"CPU": cfg.run.cpus_per_worker, **({"GPU": cfg.run.gpus_per_worker} if cfg.run.gpus_per_worker else {})},
        ),
        torch_config=TorchConfig(backend="nccl" if cfg.run.gpus_per_worker > 0 else "gloo"),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage.train_storage_path,
            storage_filesystem=storage.filesystem if storage.is_remote else None,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
        ),
        datasets={"train": build_pretrain_dataset(cfg, shards)},
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    metrics = dict(result.metrics or {})
    if "non_finite_step" in metrics:
        raise RuntimeError(f"{metrics['error']} — latest good checkpoint: {result.checkpoint.path if result.checkpoint else 'none'}")
    summary: dict[str, Any] = {"run": name, "storage": storage.uri, "checkpoint": result.checkpoint.path if result.checkpoint else None,
                               "final_metrics": metrics, "seconds": time.perf_counter() - t0, "config": cfg.to_dict()}
    png = storage.finish_logs(name, log_dir)
    summary["loss_plot"] = png
    if probe and result.checkpoint is not None and cfg.data.uri is None:
        summary["probe"] = probe_demo(result.checkpoint, cfg, data_uri)
    storage.write_text(name, "summary.json", json.dumps(summary, indent=2, default=str))
    print(f"[raydino] done: {name}; checkpoint {summary['checkpoint']}; loss plot {png}", flush=True)
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
    print(f"[raydino] linear probe on the synthetic DR-grading test split ({len(data.splits['test'])} images): "
          f"test AUROC {fmt(results['pretrained']['auroc'])} pretrained vs {fmt(results['random_init']['auroc'])} "
          f"random init (AUPR {fmt(results['pretrained']['aupr'])} vs {fmt(results['random_init']['aupr'])})", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = resolve_config(args)
        if args.print_config:
            print(cfg.to_yaml())
            return 0
        run(cfg, args.config, resume=args.resume, probe=not args.no_probe)
    except ConfigError as e:
        print(f"raydino.pretrain: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
