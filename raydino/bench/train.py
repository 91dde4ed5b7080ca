"""`python -m raydino.bench train`: the cost of Ray Train around a DINO step.

Two runs of the same training steps, on the same machine, in alternating order (ABBA, so slow
drift of a shared machine hits both equally):

  * plain PyTorch DDP: `torch.multiprocessing.spawn`, `init_process_group("gloo")`, the student in
    `DistributedDataParallel`, a loop of `raydino.core.step.train_step`;
  * Ray Train: `ray.train.torch.TorchTrainer` with the same number of CPU workers (gloo), running
    the very same function inside each worker.

Both build the model with `core.step.build_train_state` from the same config and seed, and both feed
the same pre-generated uint8 multi-crop batches (augmented once in memory, before timing), so the
only difference is what surrounds the step.  Per step, the slowest rank's time counts (DDP's
all-reduce makes the ranks wait for each other anyway); the figure is the median after warm-up.
Each worker also reports its CPU time per step (`time.process_time`, all threads of the worker
process: on a shared machine, wall time includes waiting for a core, CPU time does not) and its
peak RSS (`getrusage`).

Optionally (`--smoke`, on by default) it runs `raydino.pretrain` with the `smoke` config from the
Ray Data stream and reads the data-wait fraction from the run's logs/metrics.jsonl.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from raydino.distributed.cluster import free_port

N_DISTINCT_BATCHES = 4  # batches are reused cyclically: their pixel values do not change a step's cost


# ------------------------------------------------------------------ the timed steps (run in every worker)


def make_batches(cfg_dict: dict[str, Any], rank: int, n: int) -> list[list[Any]]:
    """n batches of uint8 crops (globals first) for this rank, made by raydino's augmentation of a fundus JPEG."""
    from raydino.augment.cpu import MultiCropAugment
    from raydino.bench.common import fundus_jpeg
    from raydino.config import build_config
    from raydino.data.loader import crop_keys

    cfg = build_config(cfg_dict)
    jpeg, _ = fundus_jpeg(max(2 * cfg.augment.global_crop_size, 128))
    aug = MultiCropAugment(cfg.augment, seed=1000 + rank)
    keys = crop_keys(cfg.augment)
    batches = []
    for _ in range(n):
        out = aug.augment_tensors([jpeg] * cfg.train.batch_size)
        batches.append([out[k].contiguous() for k in keys])
    return batches


def timed_steps(cfg_dict: dict[str, Any], rank: int, world: int, warmup: int, steps: int, threads: int) -> dict[str, Any]:
    """Build the DINO state (DDP-wrapped when world > 1) and time warmup + steps calls of train_step."""
    import torch
    from torch.nn.parallel import DistributedDataParallel

    from raydino.config import build_config
    from raydino.core.step import build_train_state, train_step

    torch.set_num_threads(threads)
    cfg = build_config(cfg_dict)
    batches = make_batches(cfg_dict, rank, N_DISTINCT_BATCHES)
    state = build_train_state(cfg, steps_per_epoch=warmup + steps, world_size=world)
    if world > 1:
        state.student = DistributedDataParallel(state.student)
    seconds, cpu = [], []
    for i in range(warmup + steps):
        t0, c0 = time.perf_counter(), time.process_time()
        train_step(state, batches[i % len(batches)])
        seconds.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)  # every thread of the process: torch, gloo, and Ray's own
    return {
        "rank": rank,
        "pid": os.getpid(),
        "threads": torch.get_num_threads(),
        "warmup_s": seconds[:warmup],
        "step_s": seconds[warmup:],
        "cpu_s": cpu[warmup:],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


# ------------------------------------------------------------------ plain DDP


def _ddp_worker(rank: int, world: int, port: int, conf: dict[str, Any], out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        result = timed_steps(conf["config"], rank, world, conf["warmup"], conf["steps"], conf["threads"])
    finally:
        dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def run_ddp(conf: dict[str, Any], out_dir: Path) -> list[dict[str, Any]]:
    import torch.multiprocessing as mp

    out_dir.mkdir(parents=True, exist_ok=True)
    mp.spawn(_ddp_worker, args=(conf["workers"], free_port(), conf, str(out_dir)), nprocs=conf["workers"], join=True)
    return [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(conf["workers"])]


# ------------------------------------------------------------------ Ray Train


def _ray_train_loop(conf: dict[str, Any]) -> None:
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    result = timed_steps(conf["config"], rank, world, conf["warmup"], conf["steps"], conf["threads"])
    Path(conf["out_dir"], f"rank{rank}.json").write_text(json.dumps(result))
    ray.train.report({"median_step_s": statistics.median(result["step_s"])})


def run_ray_train(conf: dict[str, Any], out_dir: Path, storage: Path) -> list[dict[str, Any]]:
    from raydino.config import build_config
    from raydino.distributed.trainer import torch_trainer

    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = build_config(conf["config"])
    run = cfg.run.model_copy(update={"workers": conf["workers"], "cpus_per_worker": conf["cpus_per_worker"], "gpus_per_worker": 0.0})
    trainer = torch_trainer(_ray_train_loop, {**conf, "out_dir": str(out_dir)}, run, name=f"bench-train-{out_dir.name}", storage_path=str(storage))
    trainer.fit()
    return [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(conf["workers"])]


# ------------------------------------------------------------------ data-wait of the smoke config


def data_wait_from_metrics(rows: list[dict[str, Any]], batch_size: int, workers: int) -> dict[str, Any]:
    """Data-wait fraction of a run from its metrics.jsonl rows (one row per logging window).

    Each row holds the window's `data_wait_fraction` and `images_per_s`; the window's length is
    its images / images_per_s, with images = steps since the previous row x global batch.
    `overall` weights windows by length; `after_start` leaves out the run's first window (the
    workers' and the stream's one-time start-up); `steady` leaves out each epoch's first window
    (Ray Data restarts its pipeline at every epoch).
    """
    windows, prev_step, prev_epoch = [], 0, None
    for r in rows:
        if "data_wait_fraction" not in r or "step" not in r:
            continue
        images = (r["step"] - prev_step) * batch_size * workers
        seconds = images / r["images_per_s"] if r.get("images_per_s") else 0.0
        windows.append(
            {
                "step": r["step"],
                "epoch": r.get("epoch"),
                "seconds": seconds,
                "wait_s": seconds * r["data_wait_fraction"],
                "first_of_epoch": r.get("epoch") != prev_epoch,
            }
        )
        prev_step, prev_epoch = r["step"], r.get("epoch")
    steady = [w for w in windows if not w["first_of_epoch"]]

    def frac(ws: list[dict[str, Any]]) -> float | None:
        total = sum(w["seconds"] for w in ws)
        return sum(w["wait_s"] for w in ws) / total if total > 0 else None

    return {
        "windows": len(windows),
        "overall": frac(windows),
        "after_start": frac(windows[1:]),
        "steady": frac(steady),
        "train_seconds": sum(w["seconds"] for w in windows),
    }


def run_smoke(work: Path, cache: Path, overrides: list[str]) -> dict[str, Any]:
    """`python -m raydino.pretrain` with the smoke config from the Ray Data stream; its data-wait fraction.

    Run as the user runs it, in its own process with its own local Ray (recipes do not import each other).
    """
    import subprocess

    from raydino.config import load_config
    from raydino.runs.tracking import read_metrics

    name = f"bench-smoke-{int(time.time())}"
    sets = [f"run.storage={work / 'runs'}", f"run.name={name}", *overrides]
    cfg = load_config("smoke", sets)
    t0 = time.perf_counter()
    cmd = [
        sys.executable,
        "-m",
        "raydino.pretrain",
        "--config",
        "smoke",
        "--no-probe",
        "--cache",
        str(cache),
        *[a for s in sets for a in ("--set", s)],
    ]
    subprocess.run(cmd, check=True)
    rows = read_metrics(work / "runs" / name / "logs" / "metrics.jsonl")
    out = data_wait_from_metrics(rows, cfg.train.batch_size, cfg.run.workers)
    out.update(
        config="smoke",
        overrides=overrides,
        wall_seconds=time.perf_counter() - t0,
        command=f"python -m raydino.pretrain --config smoke --no-probe {' '.join('--set ' + o for o in overrides)}".strip(),
    )
    return out


# ------------------------------------------------------------------ the benchmark


def _summary(runs: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """Per-step time of the job (slowest rank) pooled over rounds; per-rank peak RSS (max over rounds)."""
    steps = [max(per_rank) for ranks in runs for per_rank in zip(*(r["step_s"] for r in ranks))]
    rss: dict[int, float] = {}
    for ranks in runs:
        for r in ranks:
            rss[r["rank"]] = max(rss.get(r["rank"], 0.0), r["peak_rss_mb"])
    cpu = [float(np.mean(per_rank)) for ranks in runs for per_rank in zip(*(r["cpu_s"] for r in ranks))]
    return {
        "median_step_s": statistics.median(steps),
        "p10_step_s": float(np.percentile(steps, 10)),
        "median_cpu_s_per_worker": statistics.median(cpu),
        "cpu_s": cpu,
        "p90_step_s": float(np.percentile(steps, 90)),
        "step_s": steps,
        "round_medians_s": [statistics.median([max(s) for s in zip(*(r["step_s"] for r in ranks))]) for ranks in runs],
        "peak_rss_mb_per_worker": [round(rss[k], 1) for k in sorted(rss)],
        "threads": runs[0][0]["threads"],
    }


def bench_train(args: Any) -> dict[str, Any]:
    import platform

    import ray

    from raydino.config import load_config
    from raydino.distributed.cluster import init_ray
    from raydino.progress import Progress

    cfg = load_config(args.config, list(args.set))
    conf = {
        "config": cfg.to_dict(),
        "workers": args.workers,
        "warmup": args.warmup,
        "steps": args.steps,
        "threads": args.threads,
        "cpus_per_worker": args.threads,
    }
    work = Path(tempfile.mkdtemp(prefix="raydino-bench-train-"))
    order = [m for _ in range(args.rounds) for m in ("ddp", "ray")]
    order = [m for i in range(0, len(order), 4) for m in (order[i : i + 2] + order[i + 2 : i + 4][::-1])]  # ABBA
    started_ray = False
    if not ray.is_initialized():
        init_ray(max(args.workers * args.threads, os.cpu_count() or 1), dashboard=False, log_to_driver=False)
        started_ray = True
    progress = Progress(unit="runs", stream=sys.stdout, min_interval_s=0, label="bench train", total=len(order) + (1 if args.smoke else 0))
    runs: dict[str, list[list[dict[str, Any]]]] = {"ddp": [], "ray": []}
    try:
        for i, mode in enumerate(order):
            out = work / f"{mode}{i}"
            ranks = run_ddp(conf, out) if mode == "ddp" else run_ray_train(conf, out, work / "ray")
            runs[mode].append(ranks)
            med = statistics.median(max(s) for s in zip(*(r["step_s"] for r in ranks)))
            progress.step(
                f"{'plain DDP' if mode == 'ddp' else 'Ray Train'} round {len(runs[mode])}: median step {1000 * med:.1f} ms over {args.steps} steps"
            )
    finally:
        if started_ray:
            ray.shutdown()
    ddp, ray_train = _summary(runs["ddp"]), _summary(runs["ray"])
    result: dict[str, Any] = {
        "bench": "train",
        "config": args.config,
        "overrides": list(args.set),
        "workers": args.workers,
        "threads_per_worker": args.threads,
        "warmup_steps": args.warmup,
        "steps": args.steps,
        "rounds": args.rounds,
        "order": order,
        "model": cfg.model.arch,
        "batch_size_per_worker": cfg.train.batch_size,
        "crops": f"2x{cfg.augment.global_crop_size} + {cfg.augment.n_local_crops}x{cfg.augment.local_crop_size}",
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_count": os.cpu_count(),
        "plain_ddp": ddp,
        "ray_train": ray_train,
        "ratio_ray_over_ddp": ray_train["median_step_s"] / ddp["median_step_s"],
        "target_ratio": 1.03,
        "cpu_ratio_ray_over_ddp": ray_train["median_cpu_s_per_worker"] / ddp["median_cpu_s_per_worker"],
    }
    if args.smoke:
        result["smoke_data_wait"] = run_smoke(work, Path(args.cache), list(args.smoke_set))
        progress.step(f"smoke pretraining from the Ray Data stream: data-wait {_pct(result['smoke_data_wait']['overall'])}")
    print_train(result)
    return result


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def print_train(r: dict[str, Any]) -> None:
    print(
        f"\nraydino bench train: {r['model']}, batch {r['batch_size_per_worker']} per worker of {r['crops']} crops, "
        f"{r['workers']} CPU workers x {r['threads_per_worker']} thread(s), gloo, {r['steps']} steps after "
        f"{r['warmup_steps']} warm-up, {r['rounds']} round(s) each ({' '.join(r['order'])})"
    )
    for label, key in (("plain PyTorch DDP", "plain_ddp"), ("Ray Train TorchTrainer", "ray_train")):
        s = r[key]
        print(
            f"  {label:<24} median step {1000 * s['median_step_s']:8.1f} ms  (p10 {1000 * s['p10_step_s']:.1f}, "
            f"p90 {1000 * s['p90_step_s']:.1f}; rounds {', '.join(f'{1000 * m:.1f}' for m in s['round_medians_s'])}); "
            f"CPU {1000 * s['median_cpu_s_per_worker']:.1f} ms per worker; "
            f"peak RSS per worker {', '.join(f'{m:.0f}' for m in s['peak_rss_mb_per_worker'])} MB"
        )
    if "smoke_data_wait" in r:
        w = r["smoke_data_wait"]
        print(
            f"  smoke config from the Ray Data stream: data-wait {_pct(w['overall'])} of {w['train_seconds']:.1f} s "
            f"training; {_pct(w['after_start'])} after the first logging window; {_pct(w['steady'])} "
            f"leaving out each epoch's first window"
        )
    print(
        f"\nRay Train / plain DDP step time: {r['ratio_ray_over_ddp']:.3f} (target <= {r['target_ratio']}); "
        f"CPU time per step: {r['cpu_ratio_ray_over_ddp']:.3f}"
    )


def plot_train(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    for label, key, color in (("plain DDP", "plain_ddp", "#7f7f7f"), ("Ray Train", "ray_train", "#1f77b4")):
        s = r[key]
        ax.plot(
            np.arange(len(s["step_s"])),
            1000 * np.array(s["step_s"]),
            ".",
            color=color,
            alpha=0.6,
            label=f"{label}: median {1000 * s['median_step_s']:.1f} ms",
        )
        ax.axhline(1000 * s["median_step_s"], color=color, lw=1)
    ax.set_xlabel("step (after warm-up, rounds concatenated)")
    ax.set_ylabel("step time, slowest rank (ms)")
    ax.set_title(
        f"{r['model']}, {r['workers']} CPU workers: Ray/DDP step {r['ratio_ray_over_ddp']:.3f}, CPU {r['cpu_ratio_ray_over_ddp']:.3f}", fontsize=10
    )
    ax.legend()
    n = len(r["plain_ddp"]["peak_rss_mb_per_worker"])
    x = np.arange(n)
    bx.bar(x - 0.2, r["plain_ddp"]["peak_rss_mb_per_worker"], 0.4, color="#7f7f7f", label="plain DDP")
    bx.bar(x + 0.2, r["ray_train"]["peak_rss_mb_per_worker"], 0.4, color="#1f77b4", label="Ray Train")
    bx.set_xticks(x, [f"rank {i}" for i in x])
    bx.set_ylabel("peak RSS (MB)")
    bx.set_title("memory per worker")
    bx.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
