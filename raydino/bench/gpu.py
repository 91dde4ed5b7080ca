"""`python -m raydino.bench gpu`: DINO on one real GPU -- bf16, NCCL, throughput.

Needs CUDA; imports no Ray (a GPU box without Ray can run it).  In one process, one run:

  1. NCCL: a one-rank process group with the NCCL backend (what `TorchConfig(backend="nccl")` sets up
     on each Ray Train GPU worker), an all-reduce checked against its known answer, and the student
     wrapped in `DistributedDataParallel` for every timed step, so the gradient all-reduce is NCCL's.
  2. Training throughput of `--config` (default: the paper's ViT-S/16 at 224 px, 2x224 + 8x96 crops,
     batch 64 per GPU as in DINO) with `train.precision=bf16` (autocast) and the fp32 reference, on
     the same uint8 crops already on the GPU (so only the model is timed): median step, images/s,
     peak GPU memory, and whether every loss was finite.  Ratio: bf16 images/s over fp32.
  3. Augmentation: raydino's batched device pipeline on the GPU (images/s, wall) against, per CPU
     core, DINO's reference pipeline and raydino's CPU pipeline, on the bench's fundus JPEG; from
     these, how many CPU cores each CPU pipeline needs to keep up with the bf16 training rate, and
     what share of a training step the GPU augmentation would add.

Writes JSON (and a PNG beside it) with `--json FILE` or `--out DIR`.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def _nccl_version() -> str:
    import torch

    v = torch.cuda.nccl.version()  # a tuple in recent torch, an int in older ones
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


def _nccl_group() -> None:
    import torch
    import torch.distributed as dist

    from raydino.distributed.cluster import free_port

    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    x = torch.arange(4, dtype=torch.float32, device="cuda")
    dist.all_reduce(x)
    torch.cuda.synchronize()
    if not torch.equal(x.cpu(), torch.arange(4, dtype=torch.float32)):
        raise RuntimeError(f"NCCL all_reduce returned {x.tolist()}, expected [0, 1, 2, 3]")


def time_training(cfg_dict: dict[str, Any], crops: list[Any], warmup: int, steps: int) -> dict[str, Any]:
    """Median step time of `core.step.train_step` (DDP over NCCL) on the given device crops."""
    import torch
    from torch.nn.parallel import DistributedDataParallel

    from raydino.config import build_config
    from raydino.core.step import NonFiniteLossError, autocast_dtype, build_train_state, train_step

    cfg = build_config(cfg_dict)
    torch.manual_seed(0)
    state = build_train_state(cfg, steps_per_epoch=warmup + steps, world_size=1, device="cuda")
    state.student = DistributedDataParallel(state.student, device_ids=[0])
    torch.cuda.reset_peak_memory_stats()
    seconds, losses, error = [], [], None
    for _ in range(warmup + steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            stats = train_step(state, crops)
        except NonFiniteLossError as e:
            error = str(e)
            break
        torch.cuda.synchronize()  # train_step already syncs on the loss value; this is for the optimizer tail
        seconds.append(time.perf_counter() - t0)
        losses.append(stats["loss"])
    timed = seconds[warmup:]
    median = statistics.median(timed) if timed else float("nan")
    dtype = autocast_dtype(cfg, state.device)
    result = {
        "precision": cfg.train.precision,
        "autocast": str(dtype) if dtype else "none",
        "median_step_s": median,
        "images_per_s": cfg.train.batch_size / median,
        "step_s": timed,
        "losses": losses,
        "all_finite": error is None and all(np.isfinite(losses)),
        "error": error,
        "peak_gpu_mem_gb": torch.cuda.max_memory_allocated() / 2**30,
    }
    del state
    torch.cuda.empty_cache()
    return result


def time_augmentation(aug_cfg: Any, images: int, batch: int, cpu_images: int) -> dict[str, Any]:
    """GPU pipeline images/s (wall) and CPU pipelines' images/s per core, on the same fundus JPEG."""
    import torch

    from raydino.augment.cpu import MultiCropAugment
    from raydino.augment.device import DeviceMultiCropAugment
    from raydino.bench.aug import ReferenceDINOAugment
    from raydino.bench.common import fundus_jpeg, time_images

    torch.set_num_threads(1)  # per-core figures for the CPU pipelines
    data, source = fundus_jpeg(512)
    gpu = DeviceMultiCropAugment(aug_cfg, device="cuda", seed=0)
    gpu.augment_tensors([data] * batch)  # warm-up: kernels, allocator
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(0, images, batch):
        gpu.augment_tensors([data] * min(batch, images - i))
    torch.cuda.synchronize()
    gpu_rate = images / (time.perf_counter() - t0)
    ref, ours = ReferenceDINOAugment(aug_cfg), MultiCropAugment(aug_cfg, seed=0)
    ref(data), ours.augment_batch([data] * 4)  # warm-up
    ref_core, _ = time_images(lambda: [ref(data) for _ in range(cpu_images)], cpu_images)
    ours_core, _ = time_images(lambda: [ours.augment_batch([data] * batch) for _ in range(0, cpu_images, batch)], batch * -(-cpu_images // batch))
    return {
        "input": source,
        "batch": batch,
        "gpu_images_per_s": gpu_rate,
        "reference_dino_images_per_s_per_core": ref_core,
        "raydino_cpu_images_per_s_per_core": ours_core,
        "raydino_cpu_backend": ours.backend,
    }


def bench_gpu(args: Any) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    from raydino.augment.device import DeviceMultiCropAugment
    from raydino.bench.common import fundus_jpeg
    from raydino.config import load_config
    from raydino.data.loader import crop_keys
    from raydino.progress import Progress

    if not torch.cuda.is_available():
        print(
            "python -m raydino.bench gpu: error: no CUDA device is visible here (torch.cuda.is_available() is False); run it on a GPU node",
            file=sys.stderr,
        )
        raise SystemExit(2)
    cfg = load_config(args.config, list(args.set))
    progress = Progress(unit="runs", stream=sys.stdout, min_interval_s=0, label="bench gpu", total=4)
    _nccl_group()
    progress.step(f"NCCL {_nccl_version()}: one-rank all_reduce correct")
    try:
        aug = DeviceMultiCropAugment(cfg.augment, device="cuda", seed=1)
        out = aug.augment_tensors([fundus_jpeg(512)[0]] * cfg.train.batch_size)
        crops = [out[k].contiguous() for k in crop_keys(cfg.augment)]
        runs = {}
        for precision in ("bf16", "fp32"):
            conf = cfg.model_copy(update={"train": cfg.train.model_copy(update={"precision": precision})})
            runs[precision] = time_training(conf.to_dict(), crops, args.warmup, args.steps)
            r = runs[precision]
            progress.step(
                f"{precision}: median step {1000 * r['median_step_s']:.1f} ms, "
                f"{r['images_per_s']:.0f} images/s, peak {r['peak_gpu_mem_gb']:.1f} GB, "
                f"finite={r['all_finite']}"
            )
    finally:
        dist.destroy_process_group()
    augment = time_augmentation(cfg.augment, args.aug_images, cfg.train.batch_size, args.cpu_images)
    train_rate = runs["bf16"]["images_per_s"]
    augment["cores_to_feed_bf16_training"] = {
        "reference_dino": train_rate / augment["reference_dino_images_per_s_per_core"],
        "raydino_cpu": train_rate / augment["raydino_cpu_images_per_s_per_core"],
    }
    augment["gpu_augment_share_of_step"] = train_rate / (train_rate + augment["gpu_images_per_s"])
    progress.step(
        f"augmentation on the GPU {augment['gpu_images_per_s']:.0f} images/s; per core: reference "
        f"{augment['reference_dino_images_per_s_per_core']:.0f}, raydino "
        f"{augment['raydino_cpu_images_per_s_per_core']:.0f}"
    )
    props = torch.cuda.get_device_properties(0)
    result = {
        "bench": "gpu",
        "config": args.config,
        "overrides": list(args.set),
        "model": cfg.model.arch,
        "batch_size": cfg.train.batch_size,
        "warmup_steps": args.warmup,
        "steps": args.steps,
        "crops": f"2x{cfg.augment.global_crop_size} + {cfg.augment.n_local_crops}x{cfg.augment.local_crop_size}",
        "device": f"{props.name}, {props.total_memory / 2**30:.0f} GiB",
        "cpu_count": os.cpu_count(),
        "machine": f"{platform.machine()}, torch {torch.__version__}, CUDA {torch.version.cuda}",
        "nccl": _nccl_version(),
        "training": runs,
        "ratio_bf16_over_fp32": runs["bf16"]["images_per_s"] / runs["fp32"]["images_per_s"],
        "augmentation": augment,
    }
    print_gpu(result)
    return result


def print_gpu(r: dict[str, Any]) -> None:
    a = r["augmentation"]
    print(
        f"\nraydino bench gpu on {r['device']} ({r['machine']}, NCCL {r['nccl']}): {r['model']}, "
        f"batch {r['batch_size']}, {r['crops']} crops, DDP over NCCL"
    )
    for p, t in r["training"].items():
        print(
            f"  {p:5s} median step {1000 * t['median_step_s']:7.1f} ms  {t['images_per_s']:7.0f} images/s  "
            f"peak {t['peak_gpu_mem_gb']:5.1f} GB  losses finite: {t['all_finite']}"
        )
    c = a["cores_to_feed_bf16_training"]
    print(
        f"  augmentation: GPU pipeline {a['gpu_images_per_s']:.0f} images/s; per CPU core: DINO reference "
        f"{a['reference_dino_images_per_s_per_core']:.0f}, raydino {a['raydino_cpu_images_per_s_per_core']:.0f} "
        f"({a['raydino_cpu_backend']})"
    )
    print(
        f"  cores to feed bf16 training: DINO reference {c['reference_dino']:.1f}, raydino CPU {c['raydino_cpu']:.1f}; "
        f"augmenting on the GPU adds {100 * a['gpu_augment_share_of_step']:.0f}% to a step"
    )
    print(f"  ratio bf16 / fp32 images/s: {r['ratio_bf16_over_fp32']:.2f}")


def plot_gpu(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = r["augmentation"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.5))
    names = list(r["training"])
    ax1.bar(names, [r["training"][n]["images_per_s"] for n in names], color=["#1f77b4", "#999999"])
    ax1.set_ylabel("training images / s")
    ax1.set_title(f"{r['model']}, batch {r['batch_size']}")
    cores = r["cpu_count"] or 1
    labels = ["GPU pipeline", f"{cores}-core raydino CPU", f"{cores}-core DINO reference"]
    vals = [a["gpu_images_per_s"], cores * a["raydino_cpu_images_per_s_per_core"], cores * a["reference_dino_images_per_s_per_core"]]
    ax2.barh(labels[::-1], vals[::-1], color=["#d62728", "#1f77b4", "#1f77b4"])
    ax2.axvline(r["training"]["bf16"]["images_per_s"], color="k", ls="--", label="bf16 training rate")
    ax2.set_xlabel("augmented images / s")
    ax2.legend(loc="lower right")
    fig.suptitle(r["device"])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
