"""`python -m raydino.bench data`: memory and throughput of the Ray Data training stream.

For each dataset size (default 1,000 and 20,000 synthetic fundus images of 96 px, drawn once with
`raydino.data.synth.generate_dataset` and cached), the images are sharded at a fixed shard size
(`--shard-mb`, like a real dataset: a bigger dataset has more shards, not bigger ones; the
embedded default's `synthetic_shards` instead cuts every set into ~5 shards), and one epoch of
`streaming.build_pretrain_dataset` is consumed through `iter_torch_batches` by a stand-in trainer that takes `--batch` images every
`batch / rate` seconds (it sleeps, so it does not compete with the pipeline for the CPU).  Meanwhile
a sampler records, every `--interval` seconds:

  * the driver's memory (USS: pages only this process holds),
  * the Ray processes' memory: every process of this Ray instance (GCS, raylet, data workers), USS,
  * the Ray object store's use (plasma, shared memory; Ray's memory summary).

The streaming pipeline should hold a bounded window of batches, so the peak must not grow with the
dataset.  The data-wait fraction is the share of the epoch the trainer spent waiting for a batch;
"steady" leaves out the first batch (the pipeline's start-up).  Before the memory runs, one epoch of
the smallest set runs unthrottled: the pipeline's own images/s on this machine.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

MB = 2**20


def bench_shards(n: int, size: int, shard_mb: float, cache: Path) -> str:
    """Synthetic fundus JPEGs (n, size px) sharded at `shard_mb` MB per shard, built once under cache."""
    from raydino.data.shards import MANIFEST_NAME
    from raydino.data.synth import generate_dataset
    from raydino.data.writer import ShardJobOptions, shard_dataset

    root = cache / "bench-data" / f"n{n}-s{size}"
    images, shards = root / "images", root / f"shards-{shard_mb:g}mb"
    if not (shards / MANIFEST_NAME).exists():
        if not (images / "synth.json").exists():
            generate_dataset(str(images), n, size, seed=0, progress=False)
        shard_dataset(str(images), str(shards), options=ShardJobOptions(target_shard_mb=shard_mb, dataset="synthetic", progress=False))
    return str(shards)


class MemorySampler(threading.Thread):
    """Background sampling of driver + Ray processes + object store memory (MB)."""

    def __init__(self, gcs_address: str, interval: float) -> None:
        super().__init__(daemon=True)
        self.gcs_address, self.interval = gcs_address, interval
        self.samples: list[dict[str, float]] = []
        self.images = 0  # set by the consumer, recorded with each sample
        self._stop_event = threading.Event()

    @staticmethod
    def _uss(proc: Any) -> float:
        try:
            return proc.memory_full_info().uss / MB
        except Exception:  # the process ended between listing and reading it
            return 0.0

    def _plasma_mb(self) -> float | None:
        from raydino.distributed.cluster import object_store_used_mb

        return object_store_used_mb(self.gcs_address)

    def sample(self) -> dict[str, float]:
        import psutil

        me = psutil.Process()
        ray_procs = me.children(recursive=True)  # a local Ray started by this driver: all its processes
        plasma = self._plasma_mb()
        s = {
            "t": time.perf_counter(),
            "images": self.images,
            "driver_mb": self._uss(me),
            "ray_processes_mb": sum(self._uss(p) for p in ray_procs),
            "object_store_mb": plasma or 0.0,
            "n_ray_processes": len(ray_procs),
        }
        s["total_mb"] = s["driver_mb"] + s["ray_processes_mb"] + s["object_store_mb"]
        s["driver_and_store_mb"] = s["driver_mb"] + s["object_store_mb"]  # what the data itself occupies
        self.samples.append(s)
        return s

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(self.interval)

    def stop(self) -> list[dict[str, float]]:
        self._stop_event.set()
        self.join()
        return self.samples


def consume_epoch(ds: Any, batch: int, rate: float, sampler: MemorySampler | None, expected: int, progress_label: str) -> dict[str, Any]:
    """Iterate one epoch of ds at `rate` images/s (0: as fast as it comes); time spent waiting."""
    import torch

    step_s = batch / rate if rate > 0 else 0.0
    images, waits = 0, []
    t0 = last_print = time.perf_counter()
    it = iter(ds.iter_torch_batches(batch_size=batch, dtypes=torch.uint8, drop_last=False))
    while True:
        t = time.perf_counter()
        try:
            b = next(it)
        except StopIteration:
            break
        waits.append(time.perf_counter() - t)
        images += len(next(iter(b.values())))
        if sampler is not None:
            sampler.images = images
        if step_s:
            time.sleep(step_s)  # the stand-in trainer's step
        now = time.perf_counter()
        if now - last_print > 5:
            eta = (now - t0) / images * max(expected - images, 0)
            print(f"[bench data] {progress_label}: {images}/{expected} images, {images / (now - t0):.0f} img/s, ETA {eta:.0f}s", flush=True)
            last_print = now
    seconds = time.perf_counter() - t0
    steady_seconds = seconds - (waits[0] if waits else 0.0)
    try:  # how Ray Data cut the epoch into tasks and blocks ("ReadParquet: 6 tasks executed, 6 blocks ...")
        operators = [line.strip() for line in ds.stats().splitlines() if "tasks executed" in line]
    except Exception:  # stats are diagnostics; never fail the benchmark on them
        operators = []
    return {
        "images": images,
        "operators": operators,
        "seconds": seconds,
        "images_per_s": images / max(seconds, 1e-9),
        "first_batch_s": waits[0] if waits else None,
        "wait_s": sum(waits),
        "data_wait_fraction": sum(waits) / max(seconds, 1e-9),
        "data_wait_fraction_steady": sum(waits[1:]) / max(steady_seconds, 1e-9) if len(waits) > 1 else None,
    }


def _peaks(samples: list[dict[str, float]], baseline: dict[str, float]) -> dict[str, float]:
    keys = ("driver_mb", "ray_processes_mb", "object_store_mb", "total_mb", "driver_and_store_mb")
    out = {f"peak_{k}": round(max(s[k] for s in samples), 1) for k in keys}
    out.update({f"baseline_{k}": round(baseline[k], 1) for k in keys})
    out["growth_total_mb"] = round(out["peak_total_mb"] - baseline["total_mb"], 1)
    return out


def bench_data(args: Any) -> dict[str, Any]:
    import platform

    import ray
    import ray.data

    from raydino.config import load_config
    from raydino.data.loader import pretrain_rows
    from raydino.distributed.cluster import init_ray, quiet_ray_data
    from raydino.distributed.streaming import build_pretrain_dataset, pretrain_shard_paths
    from raydino.progress import Progress
    from raydino.runs.storage import open_dataset

    cfg = load_config(args.config, list(args.set))
    sizes = sorted(args.sizes)
    progress = Progress(unit="runs", stream=sys.stdout, min_interval_s=0, label="bench data", total=2 * len(sizes) + 1)
    uris = {}
    for n in sizes:
        uris[n] = bench_shards(n, args.image_size, args.shard_mb, Path(args.cache))
        progress.step(f"synthetic set of {n} images at {args.image_size} px, {args.shard_mb:g} MB shards: {uris[n]}")
    started_ray = False
    if not ray.is_initialized():
        init_ray(os.cpu_count() or 2, dashboard=False, log_to_driver=False)
        started_ray = True
    quiet_ray_data()  # raydino prints its own progress; one "execution finished" line per epoch otherwise
    ctx = ray.data.DataContext.get_current()
    default_block = ctx.target_max_block_size
    if args.target_block_mb:
        # Ray Data packs files into read tasks and map output into blocks up to this size (128 MB by
        # default): a small dataset then becomes one read task and one augmentation task, whose whole
        # output lands in the object store at once.  Smaller blocks make the stream stream.
        ctx.target_max_block_size = int(args.target_block_mb * MB)
    gcs = ray.get_runtime_context().gcs_address
    runs: list[dict[str, Any]] = []
    try:
        shards = open_dataset(uris[sizes[0]], cfg)
        rows = pretrain_rows(shards)
        free = consume_epoch(build_pretrain_dataset(cfg, shards), args.batch, 0.0, None, rows, f"{sizes[0]} images, unthrottled")
        progress.step(f"unthrottled epoch of {rows} rows: {free['images_per_s']:.0f} img/s from the stream")
        for n in sizes:
            shards = open_dataset(uris[n], cfg)
            rows = pretrain_rows(shards)
            sampler = MemorySampler(gcs, args.interval)
            baseline = sampler.sample()
            sampler.samples.clear()
            sampler.start()
            epoch = consume_epoch(build_pretrain_dataset(cfg, shards), args.batch, args.rate, sampler, rows, f"{n} images at {args.rate:g} img/s")
            samples = sampler.stop()
            t0 = samples[0]["t"] if samples else 0.0
            run = {
                "dataset_images": n,
                "pretrain_rows": rows,
                "shards": len(pretrain_shard_paths(shards)),
                **epoch,
                **_peaks(samples or [baseline], baseline),
                "samples": [{**s, "t": round(s["t"] - t0, 3)} for s in samples],
            }
            runs.append(run)
            progress.step(
                f"{n} images: peak {run['peak_total_mb']:.0f} MB (+{run['growth_total_mb']:.0f} MB), "
                f"data-wait {100 * epoch['data_wait_fraction']:.1f}%"
            )
    finally:
        ctx.target_max_block_size = default_block
        if started_ray:
            ray.shutdown()
    small, large = runs[0], runs[-1]
    result = {
        "bench": "data",
        "config": args.config,
        "overrides": list(args.set),
        "image_size": args.image_size,
        "crops": f"2x{cfg.augment.global_crop_size} + {cfg.augment.n_local_crops}x{cfg.augment.local_crop_size}",
        "batch": args.batch,
        "trainer_rate_images_per_s": args.rate,
        "shard_mb": args.shard_mb,
        "interval_s": args.interval,
        "target_block_mb": args.target_block_mb or (default_block / MB if default_block else None),
        "decode_batch_size": cfg.data.decode_batch_size,
        "augment_concurrency": cfg.data.augment_concurrency,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_count": os.cpu_count(),
        "unthrottled": free,
        "runs": runs,
        "peak_ratio_large_over_small": large["peak_total_mb"] / small["peak_total_mb"],
        "driver_and_store_ratio_large_over_small": large["peak_driver_and_store_mb"] / small["peak_driver_and_store_mb"],
        "images_ratio_large_over_small": large["pretrain_rows"] / max(small["pretrain_rows"], 1),
    }
    print_data(result)
    return result


def print_data(r: dict[str, Any]) -> None:
    print(
        f"\nraydino bench data: config {r['config']} ({r['crops']} crops) from {r['image_size']} px synthetic JPEGs, "
        f"batches of {r['batch']}, stand-in trainer at {r['trainer_rate_images_per_s']:g} img/s, "
        f"{r['shard_mb']:g} MB shards, Ray Data blocks up to {r['target_block_mb']:g} MB"
    )
    u = r["unthrottled"]
    print(
        f"  pipeline unthrottled: {u['images_per_s']:.0f} img/s ({u['images']} images in {u['seconds']:.1f} s, "
        f"first batch after {u['first_batch_s']:.1f} s)"
    )
    for run in r["runs"]:
        steady = run["data_wait_fraction_steady"]
        print(
            f"  {run['dataset_images']:>6} images ({run['pretrain_rows']} rows, {run['shards']} shards): peak {run['peak_total_mb']:.0f} MB "
            f"= driver {run['peak_driver_mb']:.0f} + Ray processes {run['peak_ray_processes_mb']:.0f} + object store "
            f"{run['peak_object_store_mb']:.0f} (max of each; +{run['growth_total_mb']:.0f} MB over the idle "
            f"baseline); {run['images_per_s']:.0f} img/s, data-wait {100 * run['data_wait_fraction']:.1f}% "
            f"(steady {'n/a' if steady is None else f'{100 * steady:.1f}%'})"
        )
        for op in run.get("operators", []):
            print(f"      {op}")
    print(
        f"\npeak memory, largest / smallest dataset: {r['peak_ratio_large_over_small']:.2f} in all, "
        f"{r['driver_and_store_ratio_large_over_small']:.2f} for driver + object store, "
        f"for {r['images_ratio_large_over_small']:.0f}x the images (flat = about 1)"
    )


def plot_data(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    colors = plt.cm.viridis(np.linspace(0.1, 0.8, len(r["runs"])))
    for run, c in zip(r["runs"], colors):
        s = run["samples"]
        t = [x["t"] for x in s]
        ax.plot(t, [x["total_mb"] for x in s], "-", color=c, label=f"{run['dataset_images']} images: total")
        ax.plot(t, [x["object_store_mb"] for x in s], ":", color=c, label=f"{run['dataset_images']} images: object store")
    ax.set_xlabel("seconds into the epoch")
    ax.set_ylabel("memory (MB)")
    ax.set_title("driver + Ray processes (USS) + object store")
    ax.legend(fontsize=8)
    x = np.arange(len(r["runs"]))
    bx.bar(x, [run["peak_total_mb"] for run in r["runs"]], color=colors)
    for i, run in enumerate(r["runs"]):
        bx.text(
            i,
            run["peak_total_mb"],
            f"{run['peak_total_mb']:.0f} MB\nwait {100 * run['data_wait_fraction']:.0f}%",
            ha="center",
            va="bottom",
            fontsize=8,
        )
    bx.set_xticks(x, [str(run["dataset_images"]) for run in r["runs"]])
    bx.set_xlabel("dataset images")
    bx.set_ylabel("peak memory (MB)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
