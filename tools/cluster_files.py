"""A cluster file (launcher YAML or KubeRay manifest) read into node types, with typed field readers.

The bottom layer of the cluster checks: `load_cluster` turns either kind of file into `NodeType`s
(CPUs, GPUs, scale limits, labels, machine type) without Ray or a network.  The rule modules read
every other field through `as_mapping` / `as_list` / `as_string` / `ray_container`, so a field of the
wrong type (`resources: {CPU: lots}`) is a `ClusterCheckError` naming the file, the field and the
value, never a Python traceback.

Who uses it: `cluster_security.py` (token auth, who may reach the nodes, placeholders) and
`cluster_pins.py` (Ray and torch versions) read files through it; `cluster_rules.py` runs those and
raydino's resource rules; `tools/cluster_check.py` is the command line.  This module imports none of
them, so the imports form no cycle.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


class ClusterCheckError(ValueError):
    """A cluster configuration that cannot do what raydino asks of it, or that cannot be read."""


@dataclass(frozen=True)
class NodeType:
    name: str
    cpus: float
    gpus: float
    min_workers: int
    max_nodes: int  # the head counts as one node; a worker type as its max_workers
    labels: dict[str, str]
    is_head: bool = False
    machine: str | None = None

    def describe(self) -> str:
        return f"{self.name} {{CPU: {self.cpus:g}, GPU: {self.gpus:g}}} (max {self.max_nodes})"


@dataclass
class ClusterSpec:
    path: Path
    kind: str  # "aws", "gcp", ... (launcher provider) or "RayCluster" / "RayJob"
    doc: dict[str, Any]
    node_types: list[NodeType]
    text: str = ""  # the file as written, comments included (empty for a document built in memory)

    @property
    def is_kuberay(self) -> bool:
        return self.kind in ("RayCluster", "RayJob")

    @property
    def ray_cluster_spec(self) -> dict[str, Any]:
        return self.doc["spec"]["rayClusterSpec"] if self.kind == "RayJob" else self.doc["spec"]

    @property
    def spec_field(self) -> str:
        """Where `ray_cluster_spec` sits in the document, for messages."""
        return "spec.rayClusterSpec" if self.kind == "RayJob" else "spec"


# ---------------------------------------------------------------- reading cluster files
# Every field the checks read goes through one of these, so a value of the wrong type is reported
# with the file, the field path (`available_node_types.gpu-train.resources.CPU`) and the value.


def _bad(path: Path, field_path: str, value: Any, expected: str) -> ClusterCheckError:
    return ClusterCheckError(f"{path}: {field_path}: {value!r} is not {expected}")


def as_mapping(value: Any, path: Path, field_path: str) -> dict[str, Any]:
    """`value`, read at `field_path` of `path`, if it is a mapping; else a ClusterCheckError naming all three."""
    if not isinstance(value, dict):
        raise _bad(path, field_path, value, "a mapping")
    return value


def as_list(value: Any, path: Path, field_path: str) -> list[Any]:
    """`value`, read at `field_path` of `path`, if it is a list; else a ClusterCheckError naming all three."""
    if not isinstance(value, list):
        raise _bad(path, field_path, value, "a list")
    return value


def as_string(value: Any, path: Path, field_path: str) -> str:
    """`value`, read at `field_path` of `path`, if it is a string; else a ClusterCheckError naming all three."""
    if not isinstance(value, str):
        raise _bad(path, field_path, value, "a string")
    return value


def _number(value: Any, path: Path, field_path: str) -> float:
    # YAML reads `yes`/`true` as a bool, which Python would happily count as 1.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(path, field_path, value, "a number")
    return float(value)


def _integer(value: Any, path: Path, field_path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(path, field_path, value, "a whole number")
    return value


def _k8s_quantity(q: Any, path: Path, field_path: str) -> float:
    """CPU-style Kubernetes quantity ("500m", "8", 8) as a number."""
    if not isinstance(q, bool):  # YAML's `yes` is no quantity
        text = str(q).strip()
        with contextlib.suppress(ValueError):
            return float(text[:-1]) / 1000 if text.endswith("m") else float(text)
    raise _bad(path, field_path, q, 'a Kubernetes quantity (8, "8", "500m")')


def _labels(value: Any, path: Path, field_path: str) -> dict[str, Any]:
    return dict(as_mapping(value or {}, path, field_path))


def ray_container(group: dict[str, Any], path: Path, field_path: str) -> tuple[dict[str, Any], str]:
    """A KubeRay group's Ray container (KubeRay takes the first) and its field path."""
    template = as_mapping(group.get("template"), path, f"{field_path}.template")
    pod = as_mapping(template.get("spec"), path, f"{field_path}.template.spec")
    containers = as_list(pod.get("containers"), path, f"{field_path}.template.spec.containers")
    if not containers:
        raise _bad(path, f"{field_path}.template.spec.containers", containers, "a list with the Ray container first")
    where = f"{field_path}.template.spec.containers[0]"
    return as_mapping(containers[0], path, where), where


def _group_resources(group: dict[str, Any], path: Path, field_path: str) -> tuple[float, float]:
    # Same precedence as Ray's KubeRay autoscaler (autoscaling_config.py); the test compares both.
    top = as_mapping(group.get("resources") or {}, path, f"{field_path}.resources")
    params = as_mapping(group.get("rayStartParams") or {}, path, f"{field_path}.rayStartParams")
    container, where = ray_container(group, path, field_path)
    container_res = as_mapping(container.get("resources") or {}, path, f"{where}.resources")
    limits = as_mapping(container_res.get("limits") or {}, path, f"{where}.resources.limits")
    requests = as_mapping(container_res.get("requests") or {}, path, f"{where}.resources.requests")

    def quantity(value: Any, at: str) -> float:
        return _k8s_quantity(value, path, at)

    if "CPU" in top:
        cpus = math.ceil(quantity(top["CPU"], f"{field_path}.resources.CPU"))
    elif "num-cpus" in params:
        cpus = int(quantity(params["num-cpus"], f"{field_path}.rayStartParams.num-cpus"))
    elif "cpu" in limits:
        cpus = math.ceil(quantity(limits["cpu"], f"{where}.resources.limits.cpu"))
    elif "cpu" in requests:
        cpus = math.ceil(quantity(requests["cpu"], f"{where}.resources.requests.cpu"))
    else:
        raise ClusterCheckError(f"{path}: {field_path}: no CPU count (set rayStartParams num-cpus or a cpu limit)")
    if "GPU" in top:
        gpus = math.ceil(quantity(top["GPU"], f"{field_path}.resources.GPU"))
    elif "num-gpus" in params:
        gpus = int(quantity(params["num-gpus"], f"{field_path}.rayStartParams.num-gpus"))
    else:  # the first *gpu resource of the container (nvidia.com/gpu, amd.com/gpu, ...)
        gpu_entries = [
            (f"{where}.resources.{kind}.{name}", value)
            for kind, entries in (("limits", limits), ("requests", requests))
            for name, value in entries.items()
            if str(name).endswith("gpu")
        ]
        gpus = math.ceil(quantity(gpu_entries[0][1], gpu_entries[0][0])) if gpu_entries else 0
    return float(cpus), float(gpus)


def load_cluster(path: str | Path) -> ClusterSpec:
    """Read a launcher YAML or a KubeRay RayCluster/RayJob into node types (no Ray, no network)."""
    path = Path(path)
    try:
        text = path.read_text()
        doc = yaml.safe_load(text)
    except (OSError, yaml.YAMLError) as e:
        raise ClusterCheckError(f"{path}: cannot read: {e}") from None
    cluster = cluster_from_doc(doc, path)
    cluster.text = text
    return cluster


def cluster_from_doc(doc: Any, path: Path) -> ClusterSpec:
    """Node types of an already-parsed cluster file; `path` only names it in messages."""
    if not isinstance(doc, dict):
        raise ClusterCheckError(f"{path}: not a mapping")
    kind = doc.get("kind")
    if kind in ("RayCluster", "RayJob"):
        return _kuberay_cluster(doc, path, kind)
    if "provider" in doc and "available_node_types" in doc:
        return _launcher_cluster(doc, path)
    raise ClusterCheckError(f"{path}: neither a Ray cluster launcher YAML (provider + available_node_types) nor a KubeRay RayCluster/RayJob")


def _kuberay_cluster(doc: dict[str, Any], path: Path, kind: str) -> ClusterSpec:
    spec = as_mapping(doc.get("spec") or {}, path, "spec")
    spec_field = "spec"
    if kind == "RayJob":
        spec, spec_field = spec.get("rayClusterSpec"), "spec.rayClusterSpec"
    if not isinstance(spec, dict) or "headGroupSpec" not in spec:
        raise ClusterCheckError(f"{path}: {kind} without a cluster spec (headGroupSpec)")
    head_field = f"{spec_field}.headGroupSpec"
    head = as_mapping(spec["headGroupSpec"], path, head_field)
    cpus, gpus = _group_resources(head, path, head_field)
    labels = _labels(head.get("labels"), path, f"{head_field}.labels")
    nodes = [NodeType("head", cpus, gpus, 0, 1, labels, True, _selector_machine(head, path, head_field))]
    groups = as_list(spec.get("workerGroupSpecs") or [], path, f"{spec_field}.workerGroupSpecs")
    for i, g in enumerate(groups):
        at = f"{spec_field}.workerGroupSpecs[{i}]"
        g = as_mapping(g, path, at)
        name = as_string(g.get("groupName"), path, f"{at}.groupName")
        cpus, gpus = _group_resources(g, path, at)
        hosts = _integer(g.get("numOfHosts", 1), path, f"{at}.numOfHosts")
        nodes.append(
            NodeType(
                name,
                cpus,
                gpus,
                _integer(g.get("minReplicas", 0), path, f"{at}.minReplicas") * hosts,
                _integer(g.get("maxReplicas", 0), path, f"{at}.maxReplicas") * hosts,
                _labels(g.get("labels"), path, f"{at}.labels"),
                False,
                _selector_machine(g, path, at),
            )
        )
    return ClusterSpec(path, kind, doc, nodes)


def _launcher_cluster(doc: dict[str, Any], path: Path) -> ClusterSpec:
    provider = as_mapping(doc["provider"], path, "provider")
    node_types = as_mapping(doc["available_node_types"], path, "available_node_types")
    head_type = doc.get("head_node_type")
    default_max = _integer(doc.get("max_workers", 0), path, "max_workers")
    nodes = []
    for name, nt in node_types.items():
        at = f"available_node_types.{name}"
        nt = as_mapping(nt, path, at)
        res = as_mapping(nt.get("resources") or {}, path, f"{at}.resources")
        conf = as_mapping(nt.get("node_config") or {}, path, f"{at}.node_config")
        machine = conf.get("InstanceType") or conf.get("machineType")
        is_head = name == head_type
        nodes.append(
            NodeType(
                name,
                _number(res.get("CPU", 0), path, f"{at}.resources.CPU"),
                _number(res.get("GPU", 0), path, f"{at}.resources.GPU"),
                0 if is_head else _integer(nt.get("min_workers", 0), path, f"{at}.min_workers"),
                1 if is_head else _integer(nt.get("max_workers", default_max), path, f"{at}.max_workers"),
                _labels(nt.get("labels"), path, f"{at}.labels"),
                is_head,
                None if machine is None else as_string(machine, path, f"{at}.node_config.InstanceType/machineType"),
            )
        )
    return ClusterSpec(path, str(provider.get("type")), doc, nodes)


def _selector_machine(group: dict[str, Any], path: Path, field_path: str) -> str | None:
    pod = group["template"]["spec"]  # checked by ray_container
    selector = as_mapping(pod.get("nodeSelector") or {}, path, f"{field_path}.template.spec.nodeSelector")
    return selector.get("node.kubernetes.io/instance-type")


def strings_with_fields(node: Any, at: str = "") -> Iterator[tuple[str, str]]:
    """Every string in a parsed document, with its field path."""
    if isinstance(node, str):
        yield at, node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from strings_with_fields(v, f"{at}.{k}" if at else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from strings_with_fields(v, f"{at}[{i}]")
