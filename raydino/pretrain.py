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
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from raydino.cli import EXIT_NON_FINITE, EXIT_TRAINING_FAILED, USER_ERRORS, add_storage_arguments, local_folder, storage_overrides, user_error
from raydino.config import Config, ConfigError, build_config, load_config, preset_names, resume_changes
from raydino.data import storage as st
from raydino.distributed.capacity import (
    check_locality,
    check_resources,
    never_started,
    start_attempts,
    start_timeout_s,
    training_label_selector,
)
from raydino.distributed.cluster import init_ray, local_cpu_tokens, quiet_ray_data
from raydino.distributed.trainer import report_checkpoint, torch_trainer, worker_seed, worker_state
from raydino.progress import say
from raydino.runs.storage import RunStorage, ensure_dataset, open_dataset

DEFAULT_CACHE = Path(".raydino")

NON_FINITE_FILE = "non_finite.json"  # in the run directory: step and message of a non-finite stop
PREEMPTIONS_FILE = "preemptions.jsonl"  # one line per announced preemption: the step of its just-in-time checkpoint
CONFIG_CHANGES_FILE = "config_changes.jsonl"  # one line per resumed start that changed an allowed setting


class NonFiniteLossStop(RuntimeError):
    """Training stopped because the loss became non-finite; carries the step and the good checkpoint."""

    def __init__(self, message: str, step: int, checkpoint: str | None) -> None:
        super().__init__(message)
        self.step = step
        self.checkpoint = checkpoint


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
On a multi-node cluster --data and --storage must be visible from every node (s3://, gs:// or a
shared filesystem).  S3 credentials come from the standard AWS chain (environment, ~/.aws, instance
role), a custom endpoint from --set data.s3_endpoint=URL or AWS_ENDPOINT_URL; GCS credentials from
Application Default Credentials (the VM's service account on GCP), an emulator from --set
data.gcs_endpoint=URL or STORAGE_EMULATOR_HOST.

exit status (the same for every raydino command): 0 done; 2 bad input (config, data, storage, or a
cluster that can never host the run); 1 training failed more often than run.max_failures, or the
workers never started; 3 the loss became non-finite.
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m raydino.pretrain",
        description="DINO self-supervised pretraining on Ray Train (DDP) with a Ray Data multi-crop stream. "
        "With no arguments: the embedded demo on synthetic fundus images, then a linear probe.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config",
        default="demo",
        metavar="NAME|FILE",
        help=f"preset ({', '.join(preset_names())}) or a YAML file (may say `base: PRESET`); default: demo",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config field, e.g. --set train.epochs=10 --set augment.preset=weak (repeatable)",
    )
    p.add_argument(
        "--data",
        metavar="URI",
        help="shards made by `python -m raydino.shard`: a directory, file://, s3:// or gs://bucket/prefix holding "
        "manifest.json (default: synthetic images, generated once under ./.raydino)",
    )
    p.add_argument(
        "--storage", metavar="URI", help="where runs live: a directory, s3:// or gs://bucket/prefix; the run goes to STORAGE/NAME (default: ./runs)"
    )
    p.add_argument("--workers", type=int, metavar="N", help="DDP training workers (default: run.workers of the config)")
    p.add_argument(
        "--gpus-per-worker",
        type=float,
        metavar="G",
        help="GPUs per worker: 0 trains on CPU with gloo, >0 on GPU with NCCL and bf16 (default: run.gpus_per_worker)",
    )
    p.add_argument("--name", help="run name; the same name resumes that run (default: dino-CONFIG-PRESET-TIMESTAMP)")
    p.add_argument(
        "--resume", action="store_true", help="resume the run given by --name, or without --name the most recently written run in --storage"
    )
    p.add_argument(
        "--no-probe", action="store_true", help="probe nothing: no epoch-end probe of the teacher (probe.monitor=off), no linear probe after the demo"
    )
    p.add_argument(
        "--cache",
        type=local_folder,
        default=str(DEFAULT_CACHE),
        metavar="DIR",
        help="where the synthetic demo data set is generated once and reused (default: ./.raydino)",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    add_storage_arguments(p)  # the same as --set data.s3_endpoint=URL, data.s3_region=R, data.gcs_endpoint=URL
    return p.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> Config:
    overrides = list(args.set) + storage_overrides(args)
    flag_map = {"data": "data.uri", "storage": "run.storage", "workers": "run.workers", "gpus_per_worker": "run.gpus_per_worker", "name": "run.name"}
    for attr, key in flag_map.items():
        value = getattr(args, attr)
        if value is not None:
            overrides.append(f"{key}={value}")
    if getattr(args, "no_probe", False):
        overrides.append("probe.monitor=off")  # the epoch-end probe is a probe too (its features hold rank 0 at each epoch's end)
    return load_config(args.config, overrides)


def default_run_name(cfg: Config, config_name: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9.-]+", "-", Path(config_name).stem).strip("-.") or "config"  # a valid run.name
    return f"dino-{stem}-{cfg.augment.preset}-{time.strftime('%Y%m%d-%H%M%S')}"


def monitor_source(cfg: Config, data_uri: str) -> dict[str, Any] | None:
    """The labelled set the epoch-end probe reads (`probe.data`, else the synthetic set's own labels), or None."""
    if cfg.probe.monitor == "off":
        return None
    if cfg.probe.data:
        return {"uri": cfg.probe.data, "dataset": None}
    return {"uri": data_uri, "dataset": "synthetic"} if cfg.data.uri is None else None


def build_monitor(cfg: Config, source: dict[str, Any]) -> Any:
    """The epoch-end probe on the labelled set `source` names (decoded once; raises DataError when unusable)."""
    from raydino.data.labelled import load_labelled
    from raydino.eval.monitor import ProbeMonitor

    opts = st.StorageOptions.from_config(cfg.data)
    data = load_labelled(source["uri"], dataset=source["dataset"], storage_options=opts)
    p = cfg.probe
    return ProbeMonitor(data, p.image_size or cfg.augment.global_crop_size, p.monitor, p.batch_size, p.knn_k, p.knn_temperature)


def train_worker(conf: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: build state, restore, stream crops, fit, report."""
    import ray.train

    from raydino.core.loop import LoopHooks, checkpoint_follows, fit
    from raydino.core.step import NonFiniteLossError
    from raydino.distributed.streaming import worker_epoch_batches
    from raydino.eval.monitor import BackgroundProbe
    from raydino.runs.tracking import RunTracker

    cfg = build_config(conf["config"])
    state, rank, world, device, resumed = worker_state(cfg, conf["steps_per_epoch"])
    storage = RunStorage.from_dict(conf["storage"])
    if resumed and rank == 0:
        say(
            f"[raydino] resumed from step {state.step} (epoch {state.epoch})"
            + (" — the run is already complete, nothing to train" if state.done else "")
        )
    if rank == 0:
        # Drop metrics logged after the checkpoint we resume from: they are trained again.
        storage.prepare_logs(cfg.run.name, conf["log_dir"], state.step)

    spe = state.schedules.steps_per_epoch
    tracker = RunTracker(conf["log_dir"] if rank == 0 else None, state.schedules.total_steps, -(-state.schedules.total_steps // spe), printer=say)
    epoch_batches = worker_epoch_batches(
        cfg, ray.train.get_dataset_shard("train"), device, seed=worker_seed(cfg, rank, state.step), rank=rank, epoch_rows=spe * cfg.train.batch_size
    )
    monitor = build_monitor(cfg, conf["monitor"]) if rank == 0 and conf.get("monitor") else None
    probes = BackgroundProbe(monitor) if monitor is not None else None

    def log_probes(wait: bool = False) -> None:
        """The epoch-end probes whose background fit is done, logged in order (all of them with `wait`)."""
        for step, epoch, probe in probes.finished(wait) if probes is not None else []:
            tracker.log_probe(step, epoch, probe)

    preempted = {"saved": False}

    def on_log(state, metrics):
        if rank == 0:
            tracker.log(state.step, state.epoch, metrics)
            log_probes()
        # A spot node announced its reclaim (Ray's drain with a preemption reason): save a checkpoint now,
        # once, so the restart loses at most the steps since this log line.  A barrier across workers,
        # which is why it runs at log steps only; every rank reaches it at the same steps.  When the
        # loop checkpoints after this step anyway, that checkpoint is the one: a second save under the
        # same checkpoint_{step} name made Ray Train fail deleting it.
        info = None if preempted["saved"] or state.done else ray.train.get_preemption_info()
        if info is not None:
            preempted["saved"] = True
            regular = checkpoint_follows(state)
            if rank == 0:
                say(f"[raydino] a node is being preempted: checkpoint at step {state.step}" + (" (its regular one)" if regular else ""))
                record = {"step": state.step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "regular": regular, "info": repr(info)}
                old = storage.read_text(cfg.run.name, PREEMPTIONS_FILE) or ""
                storage.write_text(cfg.run.name, PREEMPTIONS_FILE, old + json.dumps(record) + "\n")
            if not regular:
                on_checkpoint(state, {"loss": metrics.get("loss"), "step": state.step, "epoch": state.epoch, "preemption": True}, False)

    if probes is not None and state.step == 0:
        probes.submit(state.teacher.backbone, 0, 0)  # the starting point: the randomly initialised teacher, the curve's reference

    stalls: list[float] = []  # seconds each checkpoint held this worker back from training

    def upload_logs() -> None:
        if storage.is_remote:
            storage.upload_logs(cfg.run.name, conf["log_dir"])

    def on_checkpoint(state, metrics, epoch_end):
        metrics = {**metrics, "epoch_end": epoch_end, "world_size": world}
        if probes is not None and epoch_end:
            # rank 0 extracts the teacher's features while the others wait at the report's barrier; the fit runs beside training
            probes.submit(state.teacher.backbone, state.step, state.epoch)
        # Every rank reports equally often (a barrier); only rank 0 hands over a checkpoint.
        stalls.append(report_checkpoint(state, metrics, rank, cfg.train.async_checkpoint, upload_logs))

    worker_info = {
        "rank": rank,
        "world_size": world,
        "node_id": ray.get_runtime_context().get_node_id(),
        "pid": os.getpid(),
        "device": str(device),
        "start_step": state.step,
    }
    # One small file per rank and process: which node trained what (diagnostics; the tests read it).
    info_file = f"workers/rank{rank}-pid{os.getpid()}.json"
    storage.write_text(cfg.run.name, info_file, json.dumps(worker_info))
    try:
        summary = fit(state, epoch_batches, LoopHooks(on_log, on_checkpoint), world_size=world)
    except NonFiniteLossError as e:
        # Every rank sees the same non-finite step (the step all-reduces the check), so all stop
        # together and report once more (a barrier); no checkpoint is written, the last good one stays.
        ray.train.report({"non_finite_step": e.step, "error": str(e)})
        log_probes(wait=True)  # the epochs trained before it: their probes stand
        if rank == 0:
            # Result.metrics only carries checkpoint reports, so the driver learns of the stop from this file.
            storage.write_text(cfg.run.name, NON_FINITE_FILE, json.dumps({"step": e.step, "error": str(e)}))
            if storage.is_remote:
                storage.upload_logs(cfg.run.name, conf["log_dir"])
        tracker.close()
        return
    except BaseException:
        if probes is not None:
            probes.close()  # a crash: the fits still pending are dropped, not waited for
        raise
    worker_info.update(
        end_step=summary.steps,
        images=summary.images,
        seconds=round(summary.seconds, 3),
        data_wait_seconds=round(summary.data_wait_seconds, 3),
        checkpoints=len(stalls),
        checkpoint_stall_seconds=round(sum(stalls), 3),  # saving + handing over to Ray Train (+ the upload when SYNC)
    )
    storage.write_text(cfg.run.name, info_file, json.dumps(worker_info))
    log_probes(wait=True)  # the last epoch's probe: logged before the run's logs are uploaded
    if rank == 0 and summary.first_loss is not None:  # None: resumed a complete run, nothing trained
        if storage.is_remote:
            storage.upload_logs(cfg.run.name, conf["log_dir"])
        say(
            f"[raydino] finished {summary.steps} steps in {summary.seconds:.0f}s, loss {summary.first_loss:.4f} → "
            f"{summary.last_loss:.4f}, data-wait {summary.data_wait_seconds / max(summary.seconds, 1e-9):.0%}"
            f"{', collapsed: ' + summary.collapse if summary.collapse else ''}"
        )
    tracker.close()


def resume_check(storage: RunStorage, name: str, cfg: Config) -> dict[str, dict[str, Any]] | None:
    """None for a run without a checkpoint (its config.yaml is written now); for a resumed run, the
    settings this start changes, after refusing any change of model, data, batch or schedule
    (`config.resume_changes`).  The run's first config.yaml is never overwritten."""
    first = storage.read_text(name, "config.yaml") if storage.exists(name) else None
    if first is None or not any(f.startswith("checkpoint_") for f in storage.folders(name)):
        return None
    try:
        old = yaml.safe_load(first) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{storage.uri}/{name}/config.yaml is not valid YAML ({e}); it is the run's record, fix or restore it") from None
    refused, allowed = resume_changes(old, cfg)
    if refused:
        raise ConfigError(
            f"run {name!r} resumes from its latest checkpoint, and these settings decide its data, model, steps and "
            f"schedules, so they cannot change mid-run:\n  "
            + "\n  ".join(refused)
            + f"\nRestore them (the run's settings are {storage.uri}/{name}/config.yaml), or start a new run with another --name"
        )
    return allowed


def run(cfg: Config, config_name: str = "demo", resume: bool = False, probe: bool = True, cache: Path = DEFAULT_CACHE) -> dict[str, Any]:
    """Validate, start Ray, train, report.  Returns a summary dict (also written as summary.json).

    Raises ConfigError (bad input, before any training), NonFiniteLossStop, or Ray Train's
    TrainingFailedError when workers failed more than `run.max_failures` times.
    """
    from raydino.core.graphstep import graph_config_problem
    from raydino.core.model import model_config_problems
    from raydino.data.loader import pretrain_rows
    from raydino.distributed.streaming import build_pretrain_dataset

    # 1. Everything that needs no cluster: the model's fit to the step, storage, run name, data, batch arithmetic.
    if problem := graph_config_problem(cfg):
        raise ConfigError(problem)
    if problems := model_config_problems(cfg):
        raise ConfigError("; ".join(problems))
    storage = RunStorage.for_config(cfg.run.storage, cfg)
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
    changes = resume_check(storage, name, cfg)
    data_uri = cfg.data.uri or ensure_dataset(cfg, cache)
    shards = open_dataset(data_uri, cfg, check_sizes=True)
    rows = pretrain_rows(shards)
    monitor = monitor_source(cfg, data_uri)
    if monitor and cfg.probe.data:  # a probe.data that cannot be read fails now, not at the first epoch's end
        from raydino.data.labelled import load_labelled

        load_labelled(monitor["uri"], storage_options=st.StorageOptions.from_config(cfg.data))
    global_batch = cfg.train.batch_size * cfg.run.workers
    steps_per_epoch = cfg.train.steps_per_epoch or rows // global_batch
    if steps_per_epoch < 1:
        raise ConfigError(
            f"data has {rows} training rows, fewer than one global batch (train.batch_size={cfg.train.batch_size} × run.workers={cfg.run.workers})"
        )

    # 2. The cluster: join or start it, and make sure it can ever host this run.
    init_ray(local_cpu_tokens(cfg))
    check_resources(cfg)
    quiet_ray_data()
    check_locality(cfg, {"--storage": storage.uri, "--data": data_uri, "probe.data": cfg.probe.data})
    log_dir = storage.local_log_dir(name)
    if changes is None:
        storage.write_text(name, "config.yaml", cfg.to_yaml())  # a new run (or one that never checkpointed)
    elif changes:
        record = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "changes": changes}, default=str)
        storage.write_text(name, CONFIG_CHANGES_FILE, (storage.read_text(name, CONFIG_CHANGES_FILE) or "") + record + "\n")
        say(f"[raydino] resuming {name} with changed settings (recorded in {CONFIG_CHANGES_FILE}): {', '.join(changes)}")
    say(
        f"[raydino] run {name}: {cfg.model.arch}, preset {cfg.augment.preset}, {rows} images, "
        f"{cfg.run.workers} workers × batch {cfg.train.batch_size}, {steps_per_epoch} steps/epoch; "
        f"storage {storage.uri}/{name}"
    )
    if not shards.rows_shuffled:
        say(
            f"[raydino] note: {shards.uri} stores its rows in source order (sharded by an older raydino, or with "
            f"--no-shuffle): on a class-sorted tree each shard holds one class, which the per-epoch shuffle of shard "
            f"order and data.shuffle_buffer only partly mix. Shard it again with `python -m raydino.shard` for "
            f"well-mixed batches"
        )

    # 3. Train.
    trainer = torch_trainer(
        train_worker,
        {"config": cfg.to_dict(), "steps_per_epoch": steps_per_epoch, "log_dir": str(log_dir), "storage": storage.to_dict(name), "monitor": monitor},
        cfg.run,
        name=name,
        storage_path=storage.train_storage_path,
        storage_filesystem=storage.filesystem if storage.is_remote else None,
        keep_checkpoints=cfg.train.keep_checkpoints,
        max_failures=cfg.run.max_failures,
        max_preemptions=cfg.run.max_preemptions,
        start_attempts=start_attempts(cfg),
        start_timeout_s=start_timeout_s(cfg),
        label_selector=training_label_selector(cfg),
        dataset=build_pretrain_dataset(cfg, shards),
        data_cfg=cfg,
    )
    storage.delete(name, NON_FINITE_FILE)  # left by an earlier attempt of this run, if any
    t0 = time.perf_counter()
    result = trainer.fit()
    metrics = dict(result.metrics or {})  # those of the latest checkpoint
    non_finite = storage.read_text(name, NON_FINITE_FILE)
    checkpoint = storage.checkpoint_uri(result.checkpoint)
    summary: dict[str, Any] = {
        "run": name,
        "storage": storage.uri,
        "checkpoint": checkpoint,
        "final_metrics": metrics,
        "seconds": time.perf_counter() - t0,
        "config": cfg.to_dict(),
    }
    summary["loss_plot"] = storage.finish_logs(name, log_dir)
    if non_finite is not None:
        stop = json.loads(non_finite)
        summary.update(status="non_finite_loss", non_finite_step=stop["step"])
        storage.write_text(name, "summary.json", json.dumps(summary, indent=2, default=str))
        raise NonFiniteLossStop(f"{stop['error']}; latest good checkpoint: {checkpoint or 'none'}", int(stop["step"]), checkpoint)
    summary["status"] = "finished"
    if probe and result.checkpoint is not None and cfg.data.uri is None:
        summary["probe"] = probe_demo(result.checkpoint, cfg, data_uri)
    storage.write_text(name, "summary.json", json.dumps(summary, indent=2, default=str))
    say(f"[raydino] done: {name}; checkpoint {checkpoint}; loss plot {summary['loss_plot']}")
    return summary


def probe_demo(checkpoint: Any, cfg: Config, data_uri: str) -> dict[str, Any]:
    """The demo's evidence: a linear probe (fast) of the trained teacher beside a randomly initialised backbone
    of the same architecture and the raw pixels, on the synthetic set's val/test splits (never trained on)."""
    from raydino.data.labelled import load_labelled
    from raydino.eval.backbones import load_teacher_backbone
    from raydino.eval.compare import compare_backbones, comparison_line

    data = load_labelled(data_uri, dataset="synthetic")
    size = cfg.probe.image_size or cfg.augment.global_crop_size
    with checkpoint.as_directory() as d:
        trained = load_teacher_backbone(d)
    random_init = load_teacher_backbone("random", arch=cfg.model.arch, image_size=cfg.augment.global_crop_size, seed=cfg.train.seed)
    result = compare_backbones(trained.backbone, random_init.backbone, data, size, batch_size=cfg.probe.batch_size)
    rows = result["rows"]
    task = {"dr": "DR grade", "glaucoma": "glaucoma (cup-to-disc)"}[cfg.data.synthetic_task]
    say(
        f"[raydino] linear probe (fast) on the synthetic {task} labels, {size} px, {result['n']['test']} test images "
        f"never trained on: raw pixels test AUROC {rows['raw_pixels']['auroc']:.3f}; AUPR "
        f"{rows['pretrained']['aupr']:.3f} pretrained vs {rows['random_init']['aupr']:.3f} random init"
    )
    say(f"[raydino] {comparison_line(result)}")
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = resolve_config(args)
        if args.print_config:
            say(cfg.to_yaml().rstrip())
            return 0
        run(cfg, args.config, resume=args.resume, probe=not args.no_probe, cache=Path(args.cache))
    except USER_ERRORS as e:
        return user_error("raydino.pretrain", e)
    except NonFiniteLossStop as e:
        print(
            f"raydino.pretrain: stopped at step {e.step}: {e}. Lower optim.lr or raise optim.warmup_epochs, "
            f"then rerun the same command to continue from that checkpoint.",
            file=sys.stderr,
        )
        return EXIT_NON_FINITE
    except Exception as e:
        import ray.train

        if not isinstance(e, ray.train.TrainingFailedError):
            raise
        if "startup timed out" in str(e) or "StartupTimeout" in repr(e):  # Ray Train 2.60's wording
            print(f"raydino.pretrain: {never_started(cfg)} ({e})", file=sys.stderr)
            return EXIT_TRAINING_FAILED
        print(
            f"raydino.pretrain: training failed more than run.max_failures times: {e}\n"
            f"Fix the cause above, then rerun the same command (same --name) to resume from the latest checkpoint.",
            file=sys.stderr,
        )
        return EXIT_TRAINING_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
