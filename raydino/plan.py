"""`python -m raydino.plan`: GPU-hours, wall time, CPU cores, nodes and cost of a pretraining run, from measured throughput.

    python -m raydino.plan --images 1400000 --epochs 100 --config vits16-paper [--gpus 8] [--bench DIR]

Nothing is assumed about speed: the training rate is what `python -m raydino.bench gpu` measured for
this very config (name and --set overrides) and the augmentation rate what `bench aug` (or `bench
gpu`) measured per CPU core; without such a measurement the plan stops and says which bench command
makes it.  The arithmetic lives in `raydino.runs.planning`.  No Ray is started.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from raydino.cli import USER_ERRORS, local_file, user_error
from raydino.config import ConfigError, load_config
from raydino.runs import planning as P

SOURCES = f"""where each number comes from:
  training images/s per GPU   --bench DIR (default {P.display_path(P.DEFAULT_BENCH)}): the `bench gpu` JSON whose "config" and
                              "overrides" equal --config and --set: key training.bf16.images_per_s (training.fp32 when
                              train.precision is fp32); its "batch_size" and "crops" must equal the config's.  Measured
                              on one GPU with the crops already on it (model only); "device" names the GPU.
  augmentation images/s/core  the `bench aug` JSON (same "crops") whose "size" is nearest --image-size: the row
                              of the default backend ("{P.AUG_PIPELINES[0]} ...", in older files
                              "{P.AUG_PIPELINES[1]} ...") key images_per_s_per_core; else the `bench gpu`
                              JSON's augmentation.raydino_cpu_images_per_s_per_core (512 px)
  GPU-hours                   images x epochs / (training images/s x --efficiency) / 3600
  wall time                   GPU-hours / --gpus: linear data-parallel scaling at --efficiency (default 0.9, an
                              assumption: one H200 under Ray Train measured 733-797 images/s, 0.89-0.97 of the
                              model-only 820 (docs/performance.md); scaling across GPUs and nodes is not measured)
  cores per GPU               ceil(training images/s / augmentation images/s per core)
  node mix                    --cluster FILE (default cluster/aws.yaml, cluster/gcp.yaml, cluster/kuberay/raycluster.yaml):
                              the GPU worker type's resources {{CPU, GPU}} (KubeRay: the pod's limits) and the CPU worker
                              type's; the config's run.cpus_per_worker, run.gpus_per_worker, data.node_labels
  cost                        wall time x whole nodes x price per node-hour: --price-gpu-hour x GPUs per node,
                              --price-cpu-hour x CPUs per data node, else --prices FILE, else the example table
                              PRICE_TABLE of {P.PRICE_TABLE["date"]} in raydino/runs/planning.py ({", ".join(P.PRICE_TABLE["prices"])}):
                              {P.PRICE_TABLE["note"]}
Not counted: node start-up, each epoch's stream start, checkpoints, the epoch-end probe."""


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (math.isfinite(v) and v > 0):
            raise argparse.ArgumentTypeError(f"{text!r}: must be > 0")
        return v

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m raydino.plan", description=__doc__.split("\n\n")[0], epilog=SOURCES, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--images", type=_positive(int), required=True, help="pretraining images per epoch")
    p.add_argument("--epochs", type=_positive(int), default=None, help="epochs (default: the config's train.epochs)")
    p.add_argument("--config", default="vits16-paper", help="preset or YAML file measured by `bench gpu` (default vits16-paper)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override; the bench JSON must have the same ones")
    p.add_argument("--gpus", type=_positive(int), default=None, help="GPUs (default: the config's run.workers x run.gpus_per_worker)")
    p.add_argument(
        "--efficiency", type=_positive(float), default=0.9, help="share of the measured one-GPU rate each GPU keeps in the run (default 0.9)"
    )
    p.add_argument(
        "--image-size", type=_positive(int), default=512, help="side of your images in px; the nearest measured size is used (default 512)"
    )
    p.add_argument("--bench", type=Path, default=P.DEFAULT_BENCH, help="folder of `python -m raydino.bench ... --out DIR` JSON (default docs/gpu)")
    p.add_argument(
        "--cluster", type=Path, action="append", default=None, help="cluster file (repeatable; default aws.yaml, gcp.yaml, kuberay/raycluster.yaml)"
    )
    p.add_argument("--price-gpu-hour", type=_positive(float), default=None, help="USD per GPU-hour of the GPU nodes (overrides the table)")
    p.add_argument("--price-cpu-hour", type=_positive(float), default=None, help="USD per vCPU-hour of the CPU data nodes (overrides the table)")
    p.add_argument(
        "--prices", type=Path, default=None, help="YAML {date, note, prices: {instance type: USD per node-hour}} replacing the example table"
    )
    p.add_argument("--json", type=local_file, default=None, help="write the plan as JSON here and a PNG (wall time vs GPUs) beside it")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.efficiency > 1:
        build_parser().error(f"--efficiency={args.efficiency}: must be in (0, 1]")
    return args


def make_plan(args: argparse.Namespace) -> dict[str, Any]:
    try:
        cfg = load_config(args.config, list(args.set))
    except ConfigError as e:
        raise P.PlanError(f"--config {args.config}{P.set_flags(args.set)}: {e}") from None
    aug = cfg.augment
    crops = f"2x{aug.global_crop_size} + {aug.n_local_crops}x{aug.local_crop_size}"
    files = P.bench_files(args.bench)
    train = P.train_rate(files, args.bench, args.config, list(args.set), cfg.train.batch_size, crops, cfg.train.precision)
    gpus = args.gpus or int(cfg.run.workers * cfg.run.gpus_per_worker)
    if not gpus:
        raise P.PlanError(f"--config {args.config}: trains on CPU (run.gpus_per_worker={cfg.run.gpus_per_worker:g}); pass --gpus N")
    gpus_per_worker = cfg.run.gpus_per_worker or 1.0
    epochs = args.epochs or cfg.train.epochs
    cpu = P.nearest_aug(P.aug_rates(files, crops), args.image_size, args.bench, crops)
    inp = P.Inputs(
        args.images, epochs, gpus, args.efficiency, args.image_size, cfg.run.cpus_per_worker, gpus_per_worker,
        cfg.data.augment_cpus, cfg.data.augment_concurrency, dict(cfg.data.node_labels) if cfg.data.node_labels else None,
    )  # fmt: skip
    hours = P.gpu_hours(args.images, epochs, train.images_per_s, args.efficiency)
    wall_h = hours / gpus
    per_gpu = P.cores_per_gpu(train.images_per_s, cpu.images_per_s_per_core)
    notes = []
    if cpu.size != args.image_size:
        notes.append(
            f"augmentation measured at {cpu.size} px, the nearest to --image-size {args.image_size}: decoding grows with the pixels, so "
            + ("your larger images will need more cores than this says" if args.image_size > cpu.size else "your smaller images will need fewer")
            + f"; measure: python -m raydino.bench aug --size {args.image_size} --out DIR"
        )
    if cpu.preset and cpu.preset != aug.preset:
        notes.append(
            f"augmentation measured with preset {cpu.preset!r}, the config uses {aug.preset!r} (same crops; scales and probabilities differ)"
        )
    cap = cfg.data.augment_concurrency
    if cap is not None and cap * cfg.data.augment_cpus < per_gpu * gpus:
        notes.append(
            f"data.augment_concurrency={cap} runs at most {cap} augmentation tasks, fewer than the {per_gpu * gpus} cores {gpus} GPUs need: "
            f"--set data.augment_concurrency={per_gpu * gpus}"
        )
    prices = P.load_prices(args.prices)
    mixes = []
    for path in args.cluster or P.DEFAULT_CLUSTERS:
        mix = P.node_mix(P.read_cluster(path), inp, per_gpu * gpus)
        P.price_mix(mix, prices, wall_h, args.price_gpu_hour, args.price_cpu_hour)
        other = P.other_gpu(mix, prices, train.device)
        if other:
            mix.notes.append(
                f"its GPUs are {other}, not the measured {P.gpu_name(train.device)}: wall time and cost hold only at the measured rate; "
                f"measure on one of them (python -m raydino.bench gpu --config {args.config}{P.set_flags(args.set)} --out DIR) and pass --bench DIR"
            )
        mixes.append(mix)
    return {
        "config": args.config,
        "overrides": list(args.set),
        "images": args.images,
        "epochs": epochs,
        "crops": crops,
        "batch_size": cfg.train.batch_size,
        "gpus": gpus,
        "efficiency": args.efficiency,
        "image_size": args.image_size,
        "training": vars(train),
        "augmentation": vars(cpu),
        "gpu_hours_at_measured_rate": P.gpu_hours(args.images, epochs, train.images_per_s, 1.0),
        "gpu_hours": hours,
        "wall_hours": wall_h,
        "images_per_s_total": gpus * train.images_per_s * args.efficiency,
        "cores_per_gpu_exact": train.images_per_s / cpu.images_per_s_per_core,
        "cores_per_gpu": per_gpu,
        "cores_total": per_gpu * gpus,
        "prices": {k: prices[k] for k in ("date", "currency", "note", "prices")},
        "price_gpu_hour": args.price_gpu_hour,
        "price_cpu_hour": args.price_cpu_hour,
        "clusters": [vars(m) for m in mixes],
        "notes": notes,
    }


def _money(v: float) -> str:
    return f"${v:,.0f}" if v >= 100 else f"${v:,.2f}"


def print_plan(r: dict[str, Any]) -> None:
    t, a = r["training"], r["augmentation"]
    gpu = P.gpu_name(t["device"])
    sets = P.set_flags(r["overrides"])
    print(
        f"raydino plan: --config {r['config']}{sets}, {r['images']:,} images x {r['epochs']} epochs = {r['images'] * r['epochs']:,} images "
        f"({t['precision']}, batch {r['batch_size']} per GPU, {r['crops']} crops)"
    )
    print(f"  training rate    {t['images_per_s']:.1f} images/s per GPU on {t['device']}  [{t['source']}]")
    print(f"  scaling          linear data-parallel, efficiency {r['efficiency']:g} (--efficiency; an assumption, see --help)")
    print(f"  GPU-hours        {r['gpu_hours_at_measured_rate']:,.1f} at the measured rate; {r['gpu_hours']:,.1f} at efficiency {r['efficiency']:g}")
    print(
        f"  wall time        {P.format_wall(r['wall_hours'])} ({r['wall_hours']:,.1f} h) on {r['gpus']} GPUs, "
        f"{r['images_per_s_total']:,.0f} images/s, {P.format_wall(r['wall_hours'] / r['epochs'])} per epoch"
    )
    print(
        f"  augmentation     {a['images_per_s_per_core']:.1f} images/s per CPU core at {a['size']} px "
        f"(--image-size {r['image_size']})  [{a['source']}]"
    )
    print(
        f"  CPU cores        {r['cores_per_gpu']} per GPU ({t['images_per_s']:.1f} / {a['images_per_s_per_core']:.1f} = "
        f"{r['cores_per_gpu_exact']:.2f}, rounded up), {r['cores_total']} for {r['gpus']} GPUs"
    )
    for note in r["notes"]:
        print(f"  note: {note}")
    print(f"  nodes and cost   (prices: {_price_source(r)})")
    for m in r["clusters"]:
        parts = []
        if m["gpu_nodes"]:
            idle = f", {m['idle_gpus']} of them idle" if m["idle_gpus"] else ""
            parts.append(f"{m['gpu_nodes']} x {m['gpu_type']} {m['gpu_machine'] or ''} ({m['gpus_per_node']:g} GPU{idle})".replace("  ", " "))
        if m["data_nodes"]:
            parts.append(f"{m['data_nodes']} x {m['data_type']} {m['data_machine'] or ''} ({m['data_cpus_per_node']:g} CPU)".replace("  ", " "))
        if m["gpu_nodes"] and m["head_machine"]:
            parts.append(f"head {m['head_machine']}")
        print(f"    {m['cluster']}: {' + '.join(parts) or 'no fit'}")
        priced = [f"{p['nodes']} x {_money(p['per_hour'])}/h" for p in m["prices"].values() if p]
        if m["cost"] is not None:
            print(
                f"      cost {'at least ' if m['unpriced'] else ''}{_money(m['cost'])} = ({' + '.join(priced)}) x {r['wall_hours']:,.1f} h"
                + (f"; no price for {', '.join(m['unpriced'])}" if m["unpriced"] else "")
            )
        elif m["gpu_nodes"]:
            print(f"      cost: no price for {', '.join(m['unpriced'])} (pass --price-gpu-hour / --price-cpu-hour or --prices FILE)")
        for note in m["notes"]:
            print(f"      {note}")
    print(f"GPU-hours: {r['gpu_hours']:,.1f} ({r['gpus']} x {gpu}, {P.format_wall(r['wall_hours'])} wall)")


def _price_source(r: dict[str, Any]) -> str:
    given = [
        f"--price-gpu-hour {r['price_gpu_hour']:g}" if r["price_gpu_hour"] else "",
        f"--price-cpu-hour {r['price_cpu_hour']:g}" if r["price_cpu_hour"] else "",
    ]
    given = [g for g in given if g]
    table = f"{r['prices']['currency']} per node-hour, table of {r['prices']['date']}: {r['prices']['note']}"
    return "; ".join([*given, f"else {table}" if given else table])


def plot_plan(r: dict[str, Any], path: Path) -> None:
    """Wall time against the number of GPUs (linear scaling at the plan's efficiency), the plan's point marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = sorted({2**k for k in range(0, 8)} | {r["gpus"]})
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for eff, style in ((1.0, ":"), (r["efficiency"], "-")):
        hours = [P.gpu_hours(r["images"], r["epochs"], r["training"]["images_per_s"], eff) / n for n in counts]
        ax.plot(counts, hours, style, marker="o", ms=3, label=f"efficiency {eff:g}")
    ax.plot([r["gpus"]], [r["wall_hours"]], "r*", ms=12, label=f"{r['gpus']} GPUs: {P.format_wall(r['wall_hours'])}")
    ax.set(xscale="log", yscale="log", xlabel="GPUs", ylabel="wall time (h)")
    ax.set_title(
        f"{r['config']}: {r['images']:,} images x {r['epochs']} epochs at "
        f"{r['training']['images_per_s']:.0f} img/s per {P.gpu_name(r['training']['device'])}",
        fontsize=9,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        plan = make_plan(args)
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(plan, indent=2) + "\n")
            plot_plan(plan, args.json.with_suffix(".png"))
    except USER_ERRORS as e:
        return user_error("raydino.plan", e)
    if args.json is not None:
        print(f"wrote {args.json} and {args.json.with_suffix('.png')}")
    print_plan(plan)
    return 0


if __name__ == "__main__":
    sys.exit(main())
