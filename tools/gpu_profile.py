"""Where a training step's time goes on one GPU: the host (Python, launches) or the device (kernels).

    python tools/gpu_profile.py [--config vits16-paper] [--batch 64] [--compile | --cuda-graph] [--steps 10]

For `bench gpu`'s step (DDP over a one-rank NCCL group, bf16, fused AdamW, deferred check), prints:
  * host ms per step: how long `train_step` takes to return without waiting for the GPU, against the
    wall ms per step with the GPU synchronised.  host ~ wall means the step is host-bound (the GPU
    waits for launches): a bigger batch, CUDA graphs or fewer kernels help, faster kernels do not;
  * from torch.profiler over 3 steps: kernels launched per step, GPU busy ms per step (the sum of
    kernel times), and the ops that took the most host time;
  * with --compile: torch._dynamo's counters (graphs, graph breaks, recompiles).
`--device cpu --config smoke` runs it on the CPU (to test the script, not to measure).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="vits16-paper")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--cuda-graph", action="store_true", help="the whole step as one CUDA graph (train.cuda_graph, core/graphstep.py)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--set", action="append", default=[])
    args = p.parse_args()
    for name in ("batch", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name}={getattr(args, name)}: must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible here (torch.cuda.is_available() is False); run it on a GPU node or pass --device cpu")

    from raydino.bench.gpu import bench_state, init_nccl_group, make_crops
    from raydino.config import load_config
    from raydino.core.step import train_step

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sets = [*args.set, f"train.batch_size={args.batch}", f"train.compile={str(args.compile).lower()}", "optim.fused=true"]
    if args.cuda_graph:  # the graph starts after the last-layer freeze: none here
        sets += ["train.cuda_graph=true", "optim.freeze_last_layer_epochs=0"]
    cfg = load_config(args.config, sets)
    if cuda:
        init_nccl_group()
    crops = make_crops(cfg, args.batch, device)
    state = bench_state(cfg, device, ddp=cuda, steps=1000)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    if args.cuda_graph:
        from raydino.core.graphstep import GraphedStep

        graphed = GraphedStep(state, crops, capture=cuda)  # 3 eager warm-up calls, then the capture

        def one_step() -> None:
            graphed(crops)
    else:

        def one_step() -> None:
            train_step(state, crops, defer=True)

    t0 = time.perf_counter()
    for _ in range(5):  # warm-up: compile, autotuning, allocator, a graph's capture
        one_step()
    sync()
    print(f"warm-up (5 steps): {time.perf_counter() - t0:.1f} s", flush=True)

    host, wall = [], []
    for _ in range(args.steps):
        sync()
        t = time.perf_counter()
        one_step()
        host.append(time.perf_counter() - t)
        sync()
        wall.append(time.perf_counter() - t)
    h, w = statistics.median(host) * 1e3, statistics.median(wall) * 1e3
    kind = "as one CUDA graph" if args.cuda_graph and cuda else "compiled" if args.compile else "eager"
    label = f"{cfg.model.arch} batch {args.batch} {kind} on {device.type}"
    print(f"{label}: host {h:.1f} ms per step, wall {w:.1f} ms ({args.batch / w * 1e3:.0f} images/s); host/wall {h / w:.2f}")

    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(3):
            one_step()
        sync()
    events = prof.key_averages()
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx"))
    gpu_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA) if cuda else 0
    print(f"per step: {launches / 3:.0f} kernel launches, GPU busy {gpu_us / 3 / 1e3:.1f} ms (sum of kernel times) of {w:.1f} ms wall")
    print(events.table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=48))
    if args.compile:
        from torch._dynamo.utils import counters

        for name in ("stats", "graph_break", "recompiles"):
            if counters[name]:
                print(name, dict(counters[name]))


if __name__ == "__main__":
    main()
