"""What a pretraining run will take before it starts: GPU-hours, wall time, CPU cores, nodes and cost.

Pure arithmetic over files: the JSON that `python -m raydino.bench gpu` / `aug` wrote (the measured
training rate of one config on one GPU, the multi-crop rate per CPU core), the node types of the
cluster files (`cluster/aws.yaml`, `gcp.yaml`, `kuberay/*.yaml`), and a price table.  No Ray, no
torch.  `raydino.plan` is its command line; every number it prints names its source here.

The model, stated once:
  GPU-hours      = images x epochs / (measured images/s per GPU x efficiency) / 3600
  wall time      = GPU-hours / GPUs                       (linear data-parallel scaling)
  cores per GPU  = ceil(measured images/s per GPU / augmentation images/s per core)
  GPU nodes      = ceil(GPUs / GPUs per node of the GPU worker type)
  data nodes     = ceil((cores per GPU x GPUs - CPUs the GPU nodes can spare) / CPUs per data node)
  cost           = wall time x sum(nodes x node price per hour)   (whole nodes are billed)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# Example on-demand prices, USD per node-hour, Linux, for the instance / machine types that the
# cluster files name.  NOT a quote: prices differ by region, change over time (AWS cut its P4/P5
# on-demand prices in 2025) and spot / committed-use prices are often half or less.  The AWS
# figures are the ones cluster/README.md (section 4) assumes; the GCP ones are us-central1 list
# prices as the author knew them.  None was checked against a live price list when recorded.
# Pass your own with --prices FILE or --price-gpu-hour / --price-cpu-hour.
PRICE_TABLE: dict[str, Any] = {
    "date": "2026-12-03",
    "currency": "USD",
    "note": "example on-demand list prices, not checked live; they vary by region, over time, and spot is often 50-70 % lower",
    "prices": {
        "p4d.24xlarge": 25.00,  # AWS, 8x A100 40 GB, 96 vCPU (cluster/README.md section 4: "$25/h (A)")
        "c6i.8xlarge": 1.36,  # AWS, 32 vCPU, 64 GiB
        "m6i.2xlarge": 0.384,  # AWS, 8 vCPU, 32 GiB (the head)
        "a2-highgpu-8g": 29.39,  # GCP us-central1, 8x A100 40 GB, 96 vCPU
        "n2-highcpu-32": 1.15,  # GCP us-central1, 32 vCPU, 32 GB
        "n2-standard-8": 0.39,  # GCP us-central1, 8 vCPU, 32 GB (the head)
    },
    "gpus": {"p4d.24xlarge": "A100 40GB", "a2-highgpu-8g": "A100 40GB"},
}

# The rows of `bench aug` that Ray Data runs: the default backend ("fused" with Numba installed;
# "opencv" in bench files written before it existed), the first found in this order.
AUG_PIPELINES = ("raydino augment_batch, fused backend", "raydino augment_batch, opencv backend")
REPO = Path(__file__).resolve().parents[2]
DEFAULT_BENCH = REPO / "docs" / "gpu"
DEFAULT_CLUSTERS = [REPO / "cluster" / "aws.yaml", REPO / "cluster" / "gcp.yaml", REPO / "cluster" / "kuberay" / "raycluster.yaml"]


class PlanError(ValueError):
    """An input the plan cannot use; the message names the option and its value."""


# ---------------------------------------------------------------- measured rates


@dataclass
class TrainRate:
    images_per_s: float  # per GPU, model only (uint8 crops already on the GPU)
    precision: str
    device: str
    source: str  # "FILE: key"
    batch_size: int
    crops: str


@dataclass
class AugRate:
    images_per_s_per_core: float
    size: int  # side of the JPEG it was measured on, px
    source: str
    preset: str | None


def display_path(path: Path) -> str:
    """The path relative to the working directory when it is under it (as a user typed it), else as given."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def bench_files(directory: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Every `raydino.bench` result (a JSON object with a "bench" key) directly in `directory`."""
    if not directory.is_dir():
        raise PlanError(f"--bench {display_path(directory)}: no such directory (it should hold the JSON of `python -m raydino.bench ... --out DIR`)")
    found = []
    for path in sorted(directory.glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise PlanError(f"--bench {display_path(directory)}: {path.name} is not readable JSON ({e})") from None
        if isinstance(doc, dict) and isinstance(doc.get("bench"), str):
            found.append((path, doc))
    return found


def set_flags(overrides: list[str]) -> str:
    """The overrides as the command line spells them: " --set a=1 --set b=2"."""
    return "".join(f" --set {o}" for o in overrides)


def train_rate(
    files: list[tuple[Path, dict[str, Any]]], directory: Path, config: str, overrides: list[str], batch_size: int, crops: str, precision: str
) -> TrainRate:
    """The training images/s per GPU measured by `bench gpu` for exactly this config (name and --set overrides)."""
    measure = (
        f"python -m raydino.bench gpu --config {config}{set_flags(overrides)} --out DIR (on one GPU of the type you will rent), then --bench DIR"
    )
    gpu = [(p, d) for p, d in files if d["bench"] == "gpu"]
    if not gpu:
        raise PlanError(
            f'--bench {display_path(directory)}: holds no `python -m raydino.bench gpu` result (a JSON with "bench": "gpu"); measure it: {measure}'
        )
    same = [(p, d) for p, d in gpu if d.get("config") == config and sorted(d.get("overrides") or []) == sorted(overrides)]
    if not same:
        seen = "; ".join(f"{p.name}: config {d.get('config')!r}{set_flags(d.get('overrides') or []) or ', no overrides'}" for p, d in gpu)
        raise PlanError(
            f"--config {config}{set_flags(overrides)}: no GPU measurement of it in --bench {display_path(directory)} ({seen}); measure it: {measure}"
        )
    key = "fp32" if precision == "fp32" else "bf16"  # train.precision auto = bf16 on CUDA
    rates = []
    for path, d in same:
        if d.get("batch_size") != batch_size or d.get("crops") != crops:
            raise PlanError(
                f"--bench {display_path(directory)}: {path.name} measured config {config!r} at batch {d.get('batch_size')}, crops {d.get('crops')}, "
                f"but --config {config}{set_flags(overrides)} is now batch {batch_size}, crops {crops} (the preset changed since): "
                f"measure it again: {measure}"
            )
        run = (d.get("training") or {}).get(key) or {}
        rate = run.get("images_per_s")
        if not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate <= 0 or run.get("error") or run.get("all_finite") is False:
            raise PlanError(
                f"--bench {display_path(directory)}: {path.name} has no valid training.{key}.images_per_s (got {rate!r}, error {run.get('error')!r})"
            )
        rates.append(TrainRate(float(rate), key, str(d.get("device", "?")), f"{display_path(path)}: training.{key}.images_per_s", batch_size, crops))
    return min(rates, key=lambda r: r.images_per_s)  # several runs of the same config: the slowest, so nothing is promised twice


def aug_rates(files: list[tuple[Path, dict[str, Any]]], crops: str) -> list[AugRate]:
    """Multi-crop images/s per CPU core at each measured source size, for these crops: `bench aug`
    results (the row of the default backend, what Ray Data runs: `AUG_PIPELINES`), then the `bench gpu`
    result's own CPU measurement (the config's augmentation, on a 512 px JPEG)."""
    out = []
    for path, d in files:
        if d["bench"] == "aug" and d.get("crops") == crops:
            # `--size 512,1024,...` writes one result per size under by_size; one size, the result itself
            for prefix, one in [(f"by_size[{j}].", r) for j, r in enumerate(d["by_size"])] if "by_size" in d else [("", d)]:
                rows = list(enumerate(one.get("results") or []))
                for pipeline in AUG_PIPELINES:
                    found = [(i, row) for i, row in rows if str(row.get("pipeline", "")).startswith(pipeline) and _positive(row.get("images_per_s_per_core"))]
                    for i, row in found:
                        key = f'{prefix}results[{i}].images_per_s_per_core ("{row["pipeline"]}")'
                        out.append(AugRate(float(row["images_per_s_per_core"]), int(one.get("size", 0)), f"{display_path(path)}: {key}", d.get("preset")))
                    if found:
                        break
    for path, d in files:
        a = d.get("augmentation") or {}
        if d["bench"] == "gpu" and d.get("crops") == crops and _positive(a.get("raydino_cpu_images_per_s_per_core")):
            size = 512  # bench gpu augments raydino.bench.common.fundus_jpeg(512) (its "input" says so)
            out.append(
                AugRate(
                    float(a["raydino_cpu_images_per_s_per_core"]), size, f"{display_path(path)}: augmentation.raydino_cpu_images_per_s_per_core", None
                )
            )
    return out


def _positive(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def nearest_aug(rates: list[AugRate], image_size: int, directory: Path, crops: str) -> AugRate:
    if not rates:
        raise PlanError(
            f"--bench {display_path(directory)}: no CPU augmentation rate for {crops} crops (neither a `bench aug` result with these crops nor "
            f"the `augmentation` section of a `bench gpu` result); measure it: python -m raydino.bench aug --size {image_size} --out DIR"
        )
    return min(rates, key=lambda r: abs(r.size - image_size))  # the first (a `bench aug` file) wins a tie


# ---------------------------------------------------------------- cluster files


@dataclass
class NodeType:
    name: str
    cpus: float
    gpus: float
    max_workers: int | None
    labels: dict[str, str]
    machine: str | None  # instance / machine type, when the file names it


@dataclass
class Cluster:
    path: str
    kind: str
    head: NodeType | None
    workers: list[NodeType]


def _cpu(v: Any) -> float:
    s = str(v)
    return float(s[:-1]) / 1000 if s.endswith("m") else float(s)


def read_cluster(path: Path) -> Cluster:
    """Node types of a Ray cluster-launcher YAML or a KubeRay RayCluster / RayJob manifest."""
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise PlanError(f"--cluster {path}: cannot read it ({' '.join(str(e).split())})") from None
    try:
        if isinstance(doc, dict) and "available_node_types" in doc:
            types = []
            for name, t in doc["available_node_types"].items():
                res, conf = t.get("resources") or {}, t.get("node_config") or {}
                machine = conf.get("InstanceType") or conf.get("machineType")
                types.append(
                    NodeType(name, float(res.get("CPU", 0)), float(res.get("GPU", 0)), t.get("max_workers"), dict(t.get("labels") or {}), machine)
                )
            head = next((t for t in types if t.name == doc.get("head_node_type")), None)
            return Cluster(display_path(path), str((doc.get("provider") or {}).get("type", "launcher")), head, [t for t in types if t is not head])
        if isinstance(doc, dict) and doc.get("kind") in ("RayCluster", "RayJob"):
            spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]

            def group(g: dict[str, Any], name: str, max_workers: int | None) -> NodeType:
                pod = g["template"]["spec"]
                limits = (pod["containers"][0].get("resources") or {}).get("limits") or {}
                start = g.get("rayStartParams") or {}
                cpus = _cpu(start.get("num-cpus", limits.get("cpu", 0)))
                gpus = float(start.get("num-gpus", limits.get("nvidia.com/gpu", 0)))
                machine = (pod.get("nodeSelector") or {}).get("node.kubernetes.io/instance-type")
                return NodeType(name, cpus, gpus, max_workers, dict(g.get("labels") or {}), machine)

            head = group(spec["headGroupSpec"], "head", None)
            workers = [group(g, g["groupName"], g.get("maxReplicas")) for g in spec.get("workerGroupSpecs") or []]
            return Cluster(display_path(path), doc["kind"], head, workers)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise PlanError(f"--cluster {path}: unexpected layout ({type(e).__name__}: {e})") from None
    raise PlanError(f"--cluster {path}: neither a Ray cluster-launcher file (available_node_types) nor a KubeRay RayCluster / RayJob")


# ---------------------------------------------------------------- prices


def load_prices(path: Path | None) -> dict[str, Any]:
    """The example table, or a YAML/JSON file: {date, note, prices: {instance type: USD per node-hour}}
    (or just the mapping).  A file replaces the table."""
    if path is None:
        return PRICE_TABLE
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise PlanError(f"--prices {path}: cannot read it ({' '.join(str(e).split())})") from None
    if not isinstance(doc, dict):
        raise PlanError(f"--prices {path}: expected a mapping of instance type to USD per hour (or a 'prices:' key holding one)")
    prices = (
        doc.get("prices", doc)
        if isinstance(doc.get("prices"), dict)
        else {k: v for k, v in doc.items() if k not in ("date", "note", "currency", "gpus")}
    )
    for k, v in prices.items():
        if not _positive(v):
            raise PlanError(f"--prices {path}: {k}: {v!r} is not a price > 0 per hour")
    return {
        "date": str(doc.get("date", "?")),
        "currency": doc.get("currency", "USD"),
        "note": doc.get("note", f"from {path}"),
        "prices": prices,
        "gpus": doc.get("gpus") or {},
    }


# ---------------------------------------------------------------- the plan


@dataclass
class Inputs:
    images: int
    epochs: int
    gpus: int
    efficiency: float
    image_size: int
    cpus_per_worker: float
    gpus_per_worker: float
    augment_cpus: float
    augment_concurrency: int | None
    node_labels: dict[str, str] | None


@dataclass
class Mix:
    cluster: str
    gpu_type: str | None = None
    gpu_machine: str | None = None
    gpus_per_node: float = 0
    gpu_nodes: int = 0
    idle_gpus: int = 0
    data_type: str | None = None
    data_machine: str | None = None
    data_cpus_per_node: float = 0
    data_nodes: int = 0
    spare_cpus_on_gpu_nodes: float = 0
    head_machine: str | None = None
    prices: dict[str, Any] = field(default_factory=dict)  # role -> {"per_hour", "source"} or None
    cost: float | None = None
    unpriced: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def gpu_hours(images: int, epochs: int, rate: float, efficiency: float) -> float:
    return images * epochs / (rate * efficiency) / 3600


def cores_per_gpu(train: float, aug: float) -> int:
    return math.ceil(train / aug - 1e-9)


def _has(labels: dict[str, str], want: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in want.items())


def node_mix(cluster: Cluster, inp: Inputs, cores_needed: int) -> Mix:
    """How many nodes of each worker type the run needs: GPU nodes for the workers, then CPU-only data
    nodes for the augmentation cores the GPU nodes cannot spare (all of them when data.node_labels pins
    the data pipeline to labelled nodes, as the GPU presets do)."""
    mix = Mix(cluster.path, head_machine=cluster.head.machine if cluster.head else None)
    labels = inp.node_labels or {}
    gpu_types = [t for t in cluster.workers if t.gpus > 0 and not (labels and _has(t.labels, labels))]
    if not gpu_types:
        mix.notes.append("no GPU worker type in this file")
        return mix
    g = max(gpu_types, key=lambda t: t.gpus)
    mix.gpu_type, mix.gpu_machine, mix.gpus_per_node = g.name, g.machine, g.gpus
    workers_per_node = int(g.gpus // inp.gpus_per_worker)
    if workers_per_node < 1 or workers_per_node * inp.cpus_per_worker > g.cpus:
        mix.notes.append(
            f"{g.name} ({g.gpus:g} GPU, {g.cpus:g} CPU) cannot host a training worker of {inp.gpus_per_worker:g} GPU + {inp.cpus_per_worker:g} CPU"
        )
        return mix
    workers = math.ceil(inp.gpus / inp.gpus_per_worker)
    mix.gpu_nodes = math.ceil(workers / workers_per_node)
    mix.idle_gpus = int(mix.gpu_nodes * g.gpus - inp.gpus)
    if g.max_workers is not None and mix.gpu_nodes > g.max_workers:
        mix.notes.append(f"{g.name}: {mix.gpu_nodes} nodes needed, the file allows max {g.max_workers}: raise it")
    if labels:
        data_types = [t for t in cluster.workers if _has(t.labels, labels) and t.cpus > 0]
        where = f"data.node_labels {labels} pins augmentation to those nodes"
    else:
        mix.spare_cpus_on_gpu_nodes = mix.gpu_nodes * g.cpus - workers * inp.cpus_per_worker
        data_types = [t for t in cluster.workers if t.gpus == 0 and t.cpus > 0]
        where = f"the GPU nodes spare {mix.spare_cpus_on_gpu_nodes:g} CPUs"
    extra = max(0.0, cores_needed * inp.augment_cpus - mix.spare_cpus_on_gpu_nodes)
    if extra > 0:
        if not data_types:
            mix.notes.append(f"{where}, and no CPU worker type can take the other {extra:g} cores")
            return mix
        d = max(data_types, key=lambda t: t.cpus)
        mix.data_type, mix.data_machine, mix.data_cpus_per_node = d.name, d.machine, d.cpus
        mix.data_nodes = math.ceil(extra / d.cpus - 1e-9)
        mix.notes.append(f"{where}: {mix.data_nodes} x {d.name} for {extra:g} cores")
        if d.max_workers is not None and mix.data_nodes > d.max_workers:
            mix.notes.append(f"{d.name}: {mix.data_nodes} nodes needed, the file allows max {d.max_workers}: raise it")
    else:
        mix.notes.append(f"{where}: enough, no data nodes needed")
    return mix


def price_mix(mix: Mix, prices: dict[str, Any], wall_h: float, price_gpu_hour: float | None, price_cpu_hour: float | None) -> None:
    """Fill mix.prices and mix.cost: whole nodes for the wall time; a node without a price is listed in
    mix.unpriced and left out of the cost."""
    table = prices["prices"]
    where = f"price table of {prices['date']}"
    roles = []
    if mix.gpu_nodes:
        if price_gpu_hour is not None:
            p = {"per_hour": price_gpu_hour * mix.gpus_per_node, "source": f"--price-gpu-hour {price_gpu_hour:g} x {mix.gpus_per_node:g} GPUs"}
        else:
            p = {"per_hour": table[mix.gpu_machine], "source": f"{mix.gpu_machine} in the {where}"} if mix.gpu_machine in table else None
        roles.append(("gpu", mix.gpu_nodes, p, f"{mix.gpu_type} ({mix.gpu_machine or 'no instance type in the file'})"))
    if mix.data_nodes:
        if price_cpu_hour is not None:
            p = {
                "per_hour": price_cpu_hour * mix.data_cpus_per_node,
                "source": f"--price-cpu-hour {price_cpu_hour:g} x {mix.data_cpus_per_node:g} CPUs",
            }
        else:
            p = {"per_hour": table[mix.data_machine], "source": f"{mix.data_machine} in the {where}"} if mix.data_machine in table else None
        roles.append(("data", mix.data_nodes, p, f"{mix.data_type} ({mix.data_machine or 'no instance type in the file'})"))
    if mix.gpu_nodes and mix.head_machine:
        p = {"per_hour": table[mix.head_machine], "source": f"{mix.head_machine} in the {where}"} if mix.head_machine in table else None
        roles.append(("head", 1, p, f"head ({mix.head_machine})"))
    total = 0.0
    for role, n, p, name in roles:
        mix.prices[role] = None if p is None else {**p, "nodes": n}
        if p is None:
            mix.unpriced.append(name)
        else:
            total += n * p["per_hour"] * wall_h
    mix.cost = total if mix.gpu_nodes and "gpu" in mix.prices and mix.prices["gpu"] is not None else None


def gpu_name(device: str) -> str:
    """ "NVIDIA H200, 140 GiB" -> "H200"."""
    return device.split(",")[0].replace("NVIDIA ", "").strip() or "GPU"


def other_gpu(mix: Mix, prices: dict[str, Any], device: str) -> str | None:
    """The GPU model of the mix's GPU instance when the price table knows it and it is not the measured one."""
    model = (prices.get("gpus") or {}).get(mix.gpu_machine or "")
    return model if model and model.split()[0].lower() not in device.lower() else None


def format_wall(hours: float) -> str:
    """ "6 d 10 h", "6 h 35 min", "12 min"."""
    minutes = round(hours * 60)
    d, rem = divmod(minutes, 24 * 60)
    h, m = divmod(rem, 60)
    if d:
        return f"{d} d {h + (m >= 30)} h" if h + (m >= 30) < 24 else f"{d + 1} d 0 h"
    return f"{h} h {m} min" if h else f"{m} min"
