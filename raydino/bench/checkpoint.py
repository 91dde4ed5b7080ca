"""`python -m raydino.bench ckpt`: how long a checkpoint holds training back, synchronous vs asynchronous upload.

Each run is a `TorchTrainer` (`--workers` CPU workers) that builds the DINO state of `--config` and
takes `--checkpoints` checkpoints through `raydino.distributed.trainer.report_checkpoint`, the very
function `python -m raydino.pretrain` calls: rank 0 saves the state, every rank reports it.  Between
two checkpoints each worker sleeps `--gap` seconds, a stand-in for training steps that keep a GPU busy
and leave the CPU to an upload in the background.  The stall of one checkpoint is the time from
entering that function to leaving it, on the slowest rank (DDP makes the others wait for it).

Runs alternate SYNC (Ray Train uploads inside report()) and ASYNC (`train.async_checkpoint`, the
default: the upload continues while training does) in ABBA order, so slow drift of a shared machine
hits both; the figure is the median stall per mode and their ratio.  The first checkpoint of a run
is left out (it pays one-off start-up costs).  `--storage` is where the checkpoints go: a local
directory (the default, a temporary one), `s3://bucket/prefix` (with `--set data.s3_endpoint=...`) or `gs://bucket/prefix`.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

MODES = ("sync", "async")


def _ckpt_loop(conf: dict[str, Any]) -> None:
    """Ray Train worker: build the DINO state, then checkpoint every `gap` seconds."""
    import ray.train
    import torch

    from raydino.config import build_config
    from raydino.core.step import build_train_state
    from raydino.distributed.trainer import report_checkpoint

    cfg = build_config(conf["config"])
    torch.set_num_threads(1)
    rank = ray.train.get_context().get_world_rank()
    state = build_train_state(cfg, steps_per_epoch=1000)
    stalls = []
    for i in range(conf["checkpoints"]):
        time.sleep(conf["gap"])
        state.step = i + 1
        stalls.append(report_checkpoint(state, {"step": state.step}, rank, conf["asynchronous"]))
    Path(conf["out_dir"], f"rank{rank}.json").write_text(json.dumps({"rank": rank, "stalls": stalls}))


def _checkpoint_bytes(run_dir: Path) -> int | None:
    """Size of the newest checkpoint in a local run directory (None for remote storage)."""
    ckpts = sorted(p for p in run_dir.glob("checkpoint_[0-9]*") if p.is_dir()) if run_dir.is_dir() else []
    return sum(f.stat().st_size for f in ckpts[-1].rglob("*") if f.is_file()) if ckpts else None


def _one_run(cfg: Any, mode: str, index: int, args: Any, storage: str, work: Path) -> dict[str, Any]:
    from raydino.distributed.trainer import torch_trainer
    from raydino.runs.storage import RunStorage

    out_dir = work / f"{index:02d}-{mode}"
    out_dir.mkdir(parents=True)
    run_storage = RunStorage.for_config(storage, cfg)
    conf = {"config": cfg.to_dict(), "checkpoints": args.checkpoints, "gap": args.gap, "asynchronous": mode == "async", "out_dir": str(out_dir)}
    name = f"bench-ckpt-{index:02d}-{mode}"
    trainer = torch_trainer(
        _ckpt_loop,
        conf,
        cfg.run.model_copy(update={"workers": args.workers, "cpus_per_worker": 1}),
        name=name,
        storage_path=run_storage.train_storage_path,
        storage_filesystem=run_storage.filesystem if run_storage.is_remote else None,
        keep_checkpoints=2,
    )
    t0 = time.perf_counter()
    trainer.fit()
    wall = time.perf_counter() - t0
    ranks = [json.loads(p.read_text()) for p in sorted(out_dir.glob("rank*.json"))]
    per_checkpoint = [max(r["stalls"][i] for r in ranks) for i in range(args.checkpoints)]
    size = None if run_storage.is_remote else _checkpoint_bytes(Path(run_storage.location.join(name)))
    return {"mode": mode, "stalls_s": per_checkpoint, "wall_s": wall, "checkpoint_bytes": size}


def bench_checkpoint(args: Any) -> dict[str, Any]:
    import ray

    from raydino.config import load_config
    from raydino.distributed.cluster import init_ray
    from raydino.progress import format_duration

    cfg = load_config(args.config, list(args.set))
    order = [MODES[(i // 2 + i) % 2] for i in range(2 * args.rounds)]  # sync async async sync ...
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="raydino-bench-ckpt-") as tmp:
        storage = args.storage or str(Path(tmp) / "storage")
        started = not ray.is_initialized()  # an instance already up (another bench, a test) is left running
        init_ray(max(args.workers, os.cpu_count() or 1), dashboard=False, log_to_driver=False)
        t0 = time.perf_counter()
        try:
            for i, mode in enumerate(order):
                results.append(_one_run(cfg, mode, i, args, storage, Path(tmp) / "work"))
                done = time.perf_counter() - t0
                eta = done / (i + 1) * (len(order) - i - 1)
                r = results[-1]
                print(
                    f"[bench ckpt] run {i + 1}/{len(order)} {mode}: median stall {statistics.median(r['stalls_s'][1:]):.3f} s; "
                    f"elapsed {format_duration(done)}, ETA {format_duration(eta)}",
                    flush=True,
                )
        finally:
            if started:
                ray.shutdown()
    summary: dict[str, Any] = {}
    for mode in MODES:
        stalls = [s for r in results if r["mode"] == mode for s in r["stalls_s"][1:]]
        summary[mode] = {"median_stall_s": statistics.median(stalls), "max_stall_s": max(stalls), "n": len(stalls)}
    sizes = [r["checkpoint_bytes"] for r in results if r["checkpoint_bytes"]]
    out = {
        "bench": "ckpt",
        "config": args.config,
        "model": cfg.model.arch,
        "workers": args.workers,
        "checkpoints_per_run": args.checkpoints,
        "gap_s": args.gap,
        "storage": "local directory" if not args.storage else args.storage.split("://")[0] + "://",
        "checkpoint_mb": round(statistics.median(sizes) / 1e6, 1) if sizes else None,
        "runs": results,
        **summary,
        "ratio_sync_over_async": summary["sync"]["median_stall_s"] / max(summary["async"]["median_stall_s"], 1e-9),
    }
    print_checkpoint(out)
    return out


def print_checkpoint(r: dict[str, Any]) -> None:
    size = f"{r['checkpoint_mb']} MB checkpoints" if r["checkpoint_mb"] else "checkpoints"
    print(
        f"[bench ckpt] {r['model']}, {size} to {r['storage']}, {r['workers']} worker(s): median stall per checkpoint "
        f"{r['sync']['median_stall_s']:.3f} s synchronous vs {r['async']['median_stall_s']:.3f} s asynchronous upload: "
        f"{r['ratio_sync_over_async']:.1f}x shorter",
        flush=True,
    )


def plot_checkpoint(r: dict[str, Any], path: Path) -> None:
    from raydino.eval.report import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    for x, mode in enumerate(MODES):
        stalls = [s for run in r["runs"] if run["mode"] == mode for s in run["stalls_s"][1:]]
        ax.scatter([x] * len(stalls), stalls, alpha=0.6)
        ax.plot([x - 0.2, x + 0.2], [r[mode]["median_stall_s"]] * 2, color="black")
    ax.set_xticks(range(len(MODES)), ["synchronous upload", "asynchronous upload"])
    ax.set_ylabel("seconds training waits per checkpoint")
    ax.set_title(f"checkpoint stall, {r['model']} ({r['ratio_sync_over_async']:.1f}x)", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    save_figure(plt, fig, path)
