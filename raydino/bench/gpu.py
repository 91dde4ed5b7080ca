"""`python -m raydino.bench gpu`: DINO on one real GPU -- throughput, FLOP utilisation, the official recipe.

Needs CUDA (`--device cpu` runs the same rows on the CPU as a dry run); imports no Ray.  In one
process, one run:

  1. FLOPs of one training step of `--config` (default: the paper's ViT-S/16 at 224 px, 2x224 + 8x96
     crops, batch 64 per GPU as in DINO), counted once with torch's FlopCounterMode on the `meta`
     device (`raydino.core.flops`), and the GPU's dense bf16 peak (by name, or `--peak-tflops`).
  2. NCCL: a one-rank process group with the NCCL backend (what Ray Train sets up on each GPU worker),
     an all-reduce checked against its known answer; the student of every timed step is wrapped in
     `DistributedDataParallel`, so the gradient all-reduce is NCCL's.
  3. Numerics: the loss of the same weights on the same crops in fp32 and in bf16 (the head's last
     layer in bf16, then in fp32).
  4. The ablation (`ROWS`): each row adds one change to the one before it -- fused AdamW, the deferred
     finite check, fewer kernel launches, torch.compile (compile time measured), twice the batch --
     then on their own: compiled as CUDA graphs, the whole step as one CUDA graph (`core/graphstep.py`),
     fp32 head logits and fp32, then the official DINO recipe's step (`bench/reference_dino.py`: its own
     attention, fp16 autocast + GradScaler) from the same initial weights on the same crops.  Per row:
     median step, images/s, achieved TFLOP/s, MFU, peak GPU memory, whether every loss was finite, and
     the kernel ops one step dispatches from the host (`core.flops.KernelOpCounter`; eager rows and
     the recipe).  Crops are made once and already on the GPU, so only the model is timed.
  5. Augmentation: raydino's batched device pipeline on the GPU (images/s) against, per CPU core,
     DINO's reference pipeline and raydino's CPU pipeline; from these, how many CPU cores each CPU
     pipeline needs to keep up with the fastest training row.

Writes JSON (and a PNG beside it, `bench/gpu_report.py`) with `--json FILE` or `--out DIR`.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from raydino.bench.gpu_report import print_gpu, row_line


def _nccl_version() -> str:
    import torch

    v = torch.cuda.nccl.version()  # a tuple in recent torch, an int in older ones
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


def init_nccl_group() -> None:
    """A one-rank NCCL process group on GPU 0 (what Ray Train sets up per GPU worker), its all-reduce checked."""
    import torch
    import torch.distributed as dist

    from raydino.distributed.cluster import free_port

    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    x = torch.arange(4, dtype=torch.float32, device="cuda")
    dist.all_reduce(x)
    torch.cuda.synchronize()
    if not torch.equal(x.cpu(), torch.arange(4, dtype=torch.float32)):
        raise RuntimeError(f"NCCL all_reduce returned {x.tolist()}, expected [0, 1, 2, 3]")


# The ablation: each row adds one change to the row before it (all bf16 unless named), so each
# change is measured on its own.  "baseline" is the step's settings before issue 14: foreach AdamW,
# eager, the loss checked and the metrics read on the host every step, bf16 logits in the head's
# last layer, timm's drop path and autocast's per-forward casts of the teacher's weights.  (Its code
# already clips on the device: the ~150 `.item()` calls per step of the old per-tensor clipping are
# gone from every row, as are the per-pair loss loop and the per-crop normalisation, ~150 kernels:
# docs/performance.md has the counts.)
ROWS: dict[str, dict[str, Any]] = {
    "baseline": {
        "set": {"optim.fused": False, "train.compile": False, "train.fp32_head_logits": False, "train.fewer_launches": False},
        "defer": False,
    },
    "fused_adamw": {"set": {"optim.fused": True}, "defer": False},
    "deferred_check": {"set": {}, "defer": True},
    "fewer_launches": {"set": {"train.fewer_launches": True}, "defer": True},
    "compile": {"set": {"train.compile": True}, "defer": True},
    "batch_x2": {"set": {}, "defer": True, "batch_factor": 2},
}


def row_overrides(rows: list[str]) -> dict[str, tuple[dict[str, Any], bool, int]]:
    """Cumulative overrides of each selected ablation row: {row: (config overrides, defer, batch factor)}.

    A row adds its change to those of the selected rows above it (`--rows baseline batch_x2` times
    the baseline at twice the batch)."""
    out, acc = {}, {}
    for name, row in ROWS.items():
        if name not in rows:
            continue
        acc = {**acc, **row["set"]}
        out[name] = (dict(acc), row["defer"], row.get("batch_factor", 1))
    # Beside the ablation: one change against the eager, fused, deferred step.
    eager = {"optim.fused": True, "train.compile": False, "train.fp32_head_logits": False}
    if "fp32_head_logits" in rows:
        out["fp32_head_logits"] = ({**eager, "train.fp32_head_logits": True}, True, 1)
    if "compile_cudagraphs" in rows:  # for a host-bound step: one replay instead of every kernel's launch
        out["compile_cudagraphs"] = ({**eager, "train.compile": True, "train.compile_mode": "reduce-overhead"}, True, 1)
    if "cuda_graph" in rows:  # the whole step replayed; it starts after the last-layer freeze (graphstep.py)
        out["cuda_graph"] = ({**eager, "train.fewer_launches": True, "optim.freeze_last_layer_epochs": 0}, True, 1)
    if "fp32" in rows:
        out["fp32"] = ({**eager, "train.precision": "fp32"}, True, 1)
    return out


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_loop(step: Any, device: Any, warmup: int, steps: int) -> dict[str, Any]:
    """Wall time of each call of `step()` (device synchronised around each); median over the timed ones.

    `compile_s`: what the warm-up steps took beyond `warmup` median steps (compilation, autotuning and
    allocator warm-up); 0 for an eager step up to noise."""

    seconds, outputs, error = [], [], None
    for _ in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        try:
            outputs.append(step())
        except Exception as e:  # a non-finite loss (either step's error) ends the row, reported
            error = e
            break
        _sync(device)
        seconds.append(time.perf_counter() - t0)
    timed = seconds[warmup:]
    median = statistics.median(timed) if timed else float("nan")
    losses = [float(o) for o in outputs]  # read after the loop: a deferred step's loss is a device tensor
    return {
        "median_step_s": median,
        "step_s": timed,
        "warmup_s": seconds[:warmup],
        "compile_s": max(0.0, sum(seconds[:warmup]) - warmup * median) if timed else float("nan"),
        "losses": losses,
        "all_finite": error is None and bool(np.all(np.isfinite(losses))),
        **error_fields(error),
    }


def error_fields(e: BaseException | None) -> dict[str, Any]:
    """A row's error and where it was raised (the last frames: a failed CUDA-graph capture names the op
    that broke it there, and the lease that saw it may be the only one)."""
    if e is None:
        return {"error": None, "error_where": None}
    frames = traceback.extract_tb(e.__traceback__)[-6:]
    where = [f"{'/'.join(Path(f.filename).parts[-2:])}:{f.lineno} {f.name}" for f in frames]
    return {"error": f"{type(e).__name__}: {e}", "error_where": where}


def failed_row(cfg: Any, e: BaseException, graph: bool) -> dict[str, Any]:
    """A row that raised before or after its timed steps: reported with its error; the other rows still run."""
    nan = float("nan")
    return {"median_step_s": nan, "images_per_s": nan, "batch_size": cfg.train.batch_size, "all_finite": False,
            "cuda_graph": graph, "kernel_ops_per_step": None, **error_fields(e)}  # fmt: skip


def bench_state(cfg: Any, device: Any, ddp: bool, steps: int) -> Any:
    """A fresh DINO state of `cfg` on `device` (seed 0), the student in DDP when `ddp`: the timed step's state."""
    import torch
    from torch.nn.parallel import DistributedDataParallel

    from raydino.core.step import build_train_state

    torch.manual_seed(0)
    state = build_train_state(cfg, steps_per_epoch=steps, world_size=1, device=device)
    if ddp:
        state.student = DistributedDataParallel(state.student, device_ids=[device.index or 0])
    return state


def time_row(cfg: Any, crops: list[Any], device: Any, warmup: int, steps: int, defer: bool, ddp: bool, graph: bool = False) -> dict[str, Any]:
    """Median step of raydino's `train_step` for `cfg` on the given crops (already on the device);
    with `graph`, of the whole step captured as a CUDA graph (`core.graphstep`; eager off CUDA)."""
    import torch

    from raydino.core.step import autocast_dtype, check_finite, train_step

    state = bench_state(cfg, device, ddp, warmup + steps)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if graph:
        from raydino.core.graphstep import GraphedStep, GraphedStepError, graph_step_problems

        problems = graph_step_problems(state)
        if problems:  # reported as the row's error, the other rows still run
            return failed_row(cfg, GraphedStepError("cannot run as a CUDA graph: " + "; ".join(problems)), graph=True)
        graphed = GraphedStep(state, crops, capture=device.type == "cuda")  # elsewhere its body runs eagerly
        warmup = max(warmup, graphed.warmup + 1)  # the eager warm-up calls and the capture are not timed

        def step():
            return graphed(crops)["loss"]
    else:

        def step():
            out = train_step(state, crops, defer=defer)
            return out["loss"]

    result = timed_loop(step, device, warmup, steps)
    if defer and result["error"] is None:
        try:
            check_finite(state)
        except Exception as e:
            result.update(all_finite=False, error=str(e))
    # One more step, counted (not timed).  Not for a compiled step: dispatch modes and dynamo's graphs do not mix.
    result["kernel_ops_per_step"] = None
    if not (cfg.train.compile or result["error"]):
        try:
            result["kernel_ops_per_step"] = count_kernel_ops(step)
        except Exception as e:  # the timing stands; the count's failure is reported beside it
            result["kernel_ops_error"] = error_fields(e)["error"]
    dtype = autocast_dtype(cfg, device)
    result.update(
        cuda_graph=graph,
        captured=bool(graph and graphed.captured),
        precision=cfg.train.precision,
        autocast=str(dtype) if dtype else "none",
        batch_size=cfg.train.batch_size,
        images_per_s=cfg.train.batch_size / result["median_step_s"],
        peak_gpu_mem_gb=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        fused_optimizer=all(g.get("fused") for g in state.optimizer.param_groups),
        compiled=cfg.train.compile,
        compile_mode=cfg.train.compile_mode if cfg.train.compile else None,
        deferred=defer,
        fp32_head_logits=cfg.train.fp32_head_logits,
    )
    state = None  # frees the row's GPU memory (the closure holds the same cell)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def count_kernel_ops(step: Any) -> int:
    """Ops that run a kernel in one call of `step()` (`raydino.core.flops.KernelOpCounter`)."""
    from raydino.core.flops import KernelOpCounter

    with KernelOpCounter() as ops:
        step()
    return ops.total


def time_reference(cfg: Any, crops: list[Any], device: Any, warmup: int, steps: int, ddp: bool) -> dict[str, Any]:
    """The official recipe's step (raydino/bench/reference_dino.py) from raydino's initial weights, same crops."""
    import torch
    from torch.nn.parallel import DistributedDataParallel

    from raydino.bench.reference_dino import ReferenceDINO, load_from_raydino
    from raydino.core.step import normalize_on_device

    state = bench_state(cfg.model_copy(update={"train": cfg.train.model_copy(update={"compile": False})}), device, False, warmup + steps)
    # The recipe's fp16 + GradScaler on CUDA, and on the CPU when raydino's rows autocast there too
    # (train.precision=bf16: what counts the ops a GPU step would launch, on a CPU).
    precision = "fp16" if device.type == "cuda" or cfg.train.precision == "bf16" else "fp32"
    ref = ReferenceDINO(cfg, device, precision=precision, teacher_temps=state.schedules.teacher_temp)
    load_from_raydino(ref, state.student, state.teacher)
    schedules = state.schedules
    del state
    if ddp:
        ref.student = DistributedDataParallel(ref.student, device_ids=[device.index or 0])
    images = [normalize_on_device(c) for c in crops]  # the recipe's data loader hands over normalised floats
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    it = iter(range(warmup + steps))

    def step():
        i = next(it)
        lr, wd, m = schedules.at(i)
        return ref.step(images, lr, wd, m, epoch=0, freeze_last_layer=i < schedules.freeze_last_layer_steps)

    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True  # as main_dino.py sets it
    try:
        result = timed_loop(step, device, warmup, steps)
        it = iter([warmup + steps - 1])  # the last step's schedules again, counted
        result["kernel_ops_per_step"] = None if result["error"] else count_kernel_ops(step)
    finally:
        torch.backends.cudnn.benchmark = benchmark
    result.update(
        precision=precision,
        autocast="torch.float16" if precision == "fp16" else "none",
        batch_size=cfg.train.batch_size,
        images_per_s=cfg.train.batch_size / result["median_step_s"],
        peak_gpu_mem_gb=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
    )
    ref = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def numerics(cfg: Any, crops: list[Any], device: Any) -> dict[str, Any]:
    """The loss of the same weights on the same crops in fp32 and under bf16 autocast, with the head's
    last layer in bf16 and in fp32: relative differences (the goal: within 2 %)."""
    import torch

    from raydino.core.step import forward_loss

    state = bench_state(cfg.model_copy(update={"train": cfg.train.model_copy(update={"compile": False})}), device, False, 10)
    heads = [state.student.head, state.teacher.head]

    def loss(st: Any, dtype: Any) -> float:
        torch.manual_seed(0)  # the same stochastic-depth draws in every precision (CPU and CUDA generators)
        return forward_loss(st, crops, dtype)

    out: dict[str, Any] = {"fp32": loss(state, None)}
    for fp32_logits in (False, True):
        for head in heads:
            head.fp32_last_layer = fp32_logits
        key = "bf16_fp32_logits" if fp32_logits else "bf16"
        out[key] = loss(state, torch.bfloat16)
        out[f"rel_diff_{key}"] = abs(out[key] - out["fp32"]) / abs(out["fp32"])
    del state
    return out


def summarise(result: dict[str, Any], peak: float | None) -> None:
    """Fill in TFLOP/s, MFU and the ratios the issue asks for (in place), from rows and the FLOP count."""
    flops_per_image = result["flops"]["per_image"]
    runs = result["rows"]
    for r in runs.values():
        achieved = flops_per_image * r["images_per_s"] / 1e12
        r["tflops"] = achieved
        r["mfu"] = achieved / peak if peak else None
    ratios: dict[str, Any] = {}
    base = runs.get("baseline", {}).get("images_per_s")
    ref = runs.get("reference", {}).get("images_per_s")
    batch_rows = [
        n
        for n in (*ROWS, "fp32_head_logits", "compile_cudagraphs", "cuda_graph")
        if n in runs and n != "batch_x2" and math.isfinite(runs[n]["images_per_s"])
    ]
    best = max(batch_rows, key=lambda n: runs[n]["images_per_s"]) if batch_rows else None
    if best:
        ratios["best_at_config_batch"] = best
        if base:
            ratios["best_over_baseline"] = runs[best]["images_per_s"] / base
        if ref:
            ratios["best_over_reference"] = runs[best]["images_per_s"] / ref
    ref_ops = runs.get("reference", {}).get("kernel_ops_per_step")
    ops_rows = [n for n in runs if n != "reference" and runs[n].get("kernel_ops_per_step")]
    if ref_ops and ops_rows:
        fewest = min(ops_rows, key=lambda n: runs[n]["kernel_ops_per_step"])
        ratios["fewest_kernel_ops"] = fewest
        ratios["reference_over_fewest_kernel_ops"] = ref_ops / runs[fewest]["kernel_ops_per_step"]
    if "batch_x2" in runs and ref:
        ratios["batch_x2_over_reference"] = runs["batch_x2"]["images_per_s"] / ref
    if base and "fp32" in runs:
        ratios["baseline_over_fp32"] = base / runs["fp32"]["images_per_s"]
    for name in (*ROWS, "compile_cudagraphs"):
        if name in runs and runs[name]["compiled"]:
            eager = runs.get("fewer_launches") or runs.get("deferred_check")  # the same step eager, at the same batch
            gain = (eager["median_step_s"] - runs[name]["median_step_s"]) if eager and name in ("compile", "compile_cudagraphs") else None
            runs[name]["compile_break_even_steps"] = runs[name]["compile_s"] / gain if gain and gain > 0 else None
    result["ratios"] = ratios


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

    from raydino.config import load_config
    from raydino.core.flops import peak_tflops, step_flops
    from raydino.progress import Progress

    device = torch.device(getattr(args, "device", "cuda") or "cuda")
    on_cuda = device.type == "cuda"
    if on_cuda and not torch.cuda.is_available():
        print(
            "python -m raydino.bench gpu: error: no CUDA device is visible here (torch.cuda.is_available() is False); "
            "run it on a GPU node (or pass --device cpu for a dry run of the rows)",
            file=sys.stderr,
        )
        raise SystemExit(2)
    cfg = load_config(args.config, list(args.set))
    rows = list(getattr(args, "rows", None) or [*ROWS, "fp32_head_logits", "compile_cudagraphs", "cuda_graph", "fp32", "reference"])
    plan = row_overrides(rows)
    with_aug = on_cuda and not getattr(args, "no_augment", False)
    progress = Progress(unit="runs", stream=sys.stdout, min_interval_s=0, label="bench gpu", total=len(plan) + ("reference" in rows) + 2 + with_aug)
    name = torch.cuda.get_device_name(0) if on_cuda else "cpu"
    peak = getattr(args, "peak_tflops", None) or (peak_tflops(name) if on_cuda else None)
    flops = step_flops(cfg)
    progress.step(f"FLOPs per step counted (torch FlopCounterMode, meta device): {flops['per_image'] / 1e9:.1f} GFLOP per image")
    if on_cuda:
        init_nccl_group()
        progress.step(f"NCCL {_nccl_version()}: one-rank all_reduce correct")
    else:
        progress.step("no NCCL on cpu: rows run without DDP")
    runs: dict[str, Any] = {}
    configured = None  # the row that trains `--config` + `--set` as `raydino.pretrain` would
    try:
        # The config's batch always: the numerics use it, also when every row runs at another batch.
        crops_by_batch = {cfg.train.batch_size: make_crops(cfg, cfg.train.batch_size, device)}
        for _, _, factor in plan.values():
            b = cfg.train.batch_size * factor
            if b not in crops_by_batch:
                crops_by_batch[b] = make_crops(cfg, b, device)
        crops = crops_by_batch[cfg.train.batch_size]
        numbers = numerics(cfg, crops, device)
        for row, (overrides, defer, factor) in plan.items():
            # Only the cuda_graph row steps as a graph: the others run train_step, whatever --set says
            # (and a compiled row with train.cuda_graph=true would be refused by the config).
            graph = {} if row == "cuda_graph" else {"train.cuda_graph": False}
            conf = load_config(args.config, [*args.set, *(f"{k}={_yaml(v)}" for k, v in {**overrides, **graph}.items())])
            if factor != 1:
                conf = conf.model_copy(update={"train": conf.train.model_copy(update={"batch_size": cfg.train.batch_size * factor})})
            try:
                r = time_row(
                    conf, crops_by_batch[conf.train.batch_size], device, args.warmup, args.steps, defer, ddp=on_cuda, graph=row == "cuda_graph"
                )
            except Exception as e:
                r = failed_row(conf, e, graph=row == "cuda_graph")
            runs[row] = r
            progress.step(row_line(row, r))
            if configured is None and defer and _effective(conf, device) == _effective(cfg, device):
                configured = row
        if "reference" in rows:
            r = runs["reference"] = time_reference(cfg, crops, device, args.warmup, args.steps, ddp=on_cuda)
            progress.step(row_line("reference", r))
    finally:
        if on_cuda:
            dist.destroy_process_group()
    result = {
        "bench": "gpu",
        "config": args.config,
        "overrides": list(args.set),
        "model": cfg.model.arch,
        "batch_size": cfg.train.batch_size,
        "warmup_steps": args.warmup,
        "steps": args.steps,
        "crops": f"2x{cfg.augment.global_crop_size} + {cfg.augment.n_local_crops}x{cfg.augment.local_crop_size}",
        "device": f"{name}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB" if on_cuda else "cpu",
        "cpu_count": os.cpu_count(),
        "machine": f"{platform.machine()}, torch {torch.__version__}" + (f", CUDA {torch.version.cuda}" if on_cuda else ""),
        "nccl": _nccl_version() if on_cuda else None,
        "fused_attention": _fused_attention(cfg),
        "flops": flops,
        "peak_tflops": peak,
        "peak_source": "--peak-tflops"
        if getattr(args, "peak_tflops", None)
        else ("raydino.core.flops.PEAK_BF16_TFLOPS (dense bf16, NVIDIA data sheets)" if peak else None),
        "numerics": numbers,
        "rows": runs,
    }
    summarise(result, peak)
    # What `raydino.plan` reads: the rate of the config as given (training.bf16; training.fp32 for fp32 runs).
    precision_key = "fp32" if cfg.train.precision == "fp32" else "bf16"
    training = {precision_key: {**runs[configured], "row": configured}} if configured else {}
    if "fp32" in runs and precision_key != "fp32":
        training["fp32"] = {**runs["fp32"], "row": "fp32"}
    result["training"] = training
    if "bf16" in training and "fp32" in training:
        result["ratio_bf16_over_fp32"] = training["bf16"]["images_per_s"] / training["fp32"]["images_per_s"]
    if with_aug:
        augment = time_augmentation(cfg.augment, args.aug_images, cfg.train.batch_size, args.cpu_images)
        best = result["ratios"].get("best_at_config_batch")
        train_rate = runs[best]["images_per_s"] if best else float("nan")
        augment["training_rate_fed"] = {"row": best, "images_per_s": train_rate}
        augment["cores_to_feed_training"] = {
            "reference_dino": train_rate / augment["reference_dino_images_per_s_per_core"],
            "raydino_cpu": train_rate / augment["raydino_cpu_images_per_s_per_core"],
        }
        augment["gpu_augment_share_of_step"] = train_rate / (train_rate + augment["gpu_images_per_s"])
        progress.step(
            f"augmentation on the GPU {augment['gpu_images_per_s']:.0f} images/s; per core: reference "
            f"{augment['reference_dino_images_per_s_per_core']:.0f}, raydino "
            f"{augment['raydino_cpu_images_per_s_per_core']:.0f}"
        )
        result["augmentation"] = augment
    print_gpu(result)
    return result


def _effective(cfg: Any, device: Any) -> dict[str, Any]:
    """The config as a step on `device` runs it: optim.fused resolved (None = fused on CUDA)."""
    from raydino.core.step import use_fused_optimizer

    d = cfg.to_dict()
    d["optim"]["fused"] = use_fused_optimizer(cfg, device)
    return d


def _yaml(v: Any) -> str:
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def _fused_attention(cfg: Any) -> bool | None:
    import torch

    from raydino.core.model import build_backbone, fused_attention

    with torch.device("meta"):
        return fused_attention(build_backbone(cfg.model, img_size=cfg.augment.global_crop_size))


def make_crops(cfg: Any, batch: int, device: Any) -> list[Any]:
    """uint8 multi-crops of the bench's fundus JPEG for `batch` images, on the device (GPU augmentation on
    CUDA, the CPU pipeline elsewhere): made once, so only the model is timed."""
    from raydino.bench.common import fundus_jpeg
    from raydino.data.loader import crop_keys

    jpeg = fundus_jpeg(512)[0]
    if device.type == "cuda":
        from raydino.augment.device import DeviceMultiCropAugment

        out = DeviceMultiCropAugment(cfg.augment, device=device, seed=1).augment_tensors([jpeg] * batch)
    else:
        from raydino.augment.cpu import MultiCropAugment

        out = MultiCropAugment(cfg.augment, seed=1).augment_tensors([jpeg] * batch)
    return [out[k].contiguous().to(device) for k in crop_keys(cfg.augment)]
