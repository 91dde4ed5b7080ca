"""A cluster file (launcher YAML or KubeRay manifest) read into node types, and what raydino requires of it.

`tools/cluster_check.py` is the command line; this module holds its rule set:
  * reading: `load_cluster` turns either kind of file into `NodeType`s (CPUs, GPUs, scale limits,
    labels, machine type) without Ray or a network;
  * raydino's rules (`check_rules`): the head does not train, a GPU worker type scales from zero, a
    CPU worker type carries the data label, every node has a bucket role, no Ray port faces the
    internet, one Ray version everywhere, declared resources fit the machine type, and a RayJob's
    entrypoint (a raydino command, read by `parse_command`) can resume its run;
  * Ray's and KubeRay's own validators (`ray_view`, `crd_problems`).

Ray's autoscaler schema code is imported only inside `ray_view`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.metadata
import math
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# The node label the cluster configs put on node types, and that the data pipeline can select.
ROLE_LABEL = "raydino/role"
TRAIN_ROLE, DATA_ROLE = "gpu-train", "cpu-data"
DATA_NODE_SELECTOR = {ROLE_LABEL: DATA_ROLE}  # e.g. map_batches(..., label_selector=DATA_NODE_SELECTOR)

DEFAULT_CRD_DIR = Path("../shared/schemas/kuberay")  # relative to the repository root

# (vCPUs, GPUs) of the machine types the configs and their comments mention, so a changed
# instance type with stale `resources` is caught.  Unknown types are reported, not guessed.
MACHINES: dict[str, tuple[int, int]] = {
    "p4d.24xlarge": (96, 8),
    "p4de.24xlarge": (96, 8),
    "p5.48xlarge": (192, 8),
    "p5e.48xlarge": (192, 8),
    "g5.12xlarge": (48, 4),
    "g5.48xlarge": (192, 8),
    "g6e.12xlarge": (48, 4),
    "g6e.48xlarge": (192, 8),
    "m6i.xlarge": (4, 0),
    "m6i.2xlarge": (8, 0),
    "c6i.8xlarge": (32, 0),
    "c6i.16xlarge": (64, 0),
    "a2-highgpu-8g": (96, 8),
    "a2-ultragpu-8g": (96, 8),
    "a3-highgpu-8g": (208, 8),
    "n2-standard-8": (8, 0),
    "n2-highcpu-32": (32, 0),
    "n2-highcpu-64": (64, 0),
}
_INTERNET = {"0.0.0.0/0", "::/0"}
# Kubernetes label key: optional DNS-subdomain prefix + "/", then a name of <= 63 characters.
_LABEL_KEY = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)


class ClusterCheckError(ValueError):
    """A cluster configuration that cannot do what raydino asks of it."""


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

    @property
    def is_kuberay(self) -> bool:
        return self.kind in ("RayCluster", "RayJob")

    @property
    def ray_cluster_spec(self) -> dict[str, Any]:
        return self.doc["spec"]["rayClusterSpec"] if self.kind == "RayJob" else self.doc["spec"]


# ---------------------------------------------------------------- reading cluster files


def _k8s_quantity(q: Any) -> float:
    """CPU-style Kubernetes quantity ("500m", "8", 8) as a number."""
    text = str(q).strip()
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _group_resources(group: dict[str, Any], name: str) -> tuple[float, float]:
    # Same precedence as Ray's KubeRay autoscaler (autoscaling_config.py); the test compares both.
    top = group.get("resources") or {}
    params = group.get("rayStartParams") or {}
    container = group["template"]["spec"]["containers"][0].get("resources") or {}
    limits, requests = container.get("limits") or {}, container.get("requests") or {}
    if "CPU" in top:
        cpus = math.ceil(_k8s_quantity(top["CPU"]))
    elif "num-cpus" in params:
        cpus = int(params["num-cpus"])
    elif "cpu" in limits or "cpu" in requests:
        cpus = math.ceil(_k8s_quantity(limits.get("cpu", requests.get("cpu"))))
    else:
        raise ClusterCheckError(f"group {name}: no CPU count (set rayStartParams num-cpus or a cpu limit)")
    if "GPU" in top:
        gpus = math.ceil(_k8s_quantity(top["GPU"]))
    elif "num-gpus" in params:
        gpus = int(params["num-gpus"])
    else:
        gpus = next((math.ceil(_k8s_quantity(v)) for k, v in [*limits.items(), *requests.items()] if k.endswith("gpu")), 0)
    return float(cpus), float(gpus)


def load_cluster(path: str | Path) -> ClusterSpec:
    """Read a launcher YAML or a KubeRay RayCluster/RayJob into node types (no Ray, no network)."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ClusterCheckError(f"{path}: cannot read: {e}") from None
    return cluster_from_doc(doc, path)


def cluster_from_doc(doc: Any, path: Path) -> ClusterSpec:
    """Node types of an already-parsed cluster file; `path` only names it in messages."""
    if not isinstance(doc, dict):
        raise ClusterCheckError(f"{path}: not a mapping")
    kind = doc.get("kind")
    if kind in ("RayCluster", "RayJob"):
        spec = (doc.get("spec") or {}).get("rayClusterSpec") if kind == "RayJob" else doc.get("spec")
        if not isinstance(spec, dict) or "headGroupSpec" not in spec:
            raise ClusterCheckError(f"{path}: {kind} without a cluster spec (headGroupSpec)")
        head = spec["headGroupSpec"]
        cpus, gpus = _group_resources(head, "head")
        nodes = [NodeType("head", cpus, gpus, 0, 1, dict(head.get("labels") or {}), True, _selector_machine(head))]
        for g in spec.get("workerGroupSpecs", []):
            cpus, gpus = _group_resources(g, g["groupName"])
            hosts = int(g.get("numOfHosts", 1))
            nodes.append(
                NodeType(
                    g["groupName"],
                    cpus,
                    gpus,
                    int(g.get("minReplicas", 0)) * hosts,
                    int(g.get("maxReplicas", 0)) * hosts,
                    dict(g.get("labels") or {}),
                    False,
                    _selector_machine(g),
                )
            )
        return ClusterSpec(path, kind, doc, nodes)
    if "provider" in doc and "available_node_types" in doc:
        head_type = doc.get("head_node_type")
        nodes = []
        for name, nt in doc["available_node_types"].items():
            res = nt.get("resources") or {}
            is_head = name == head_type
            conf = nt.get("node_config") or {}
            nodes.append(
                NodeType(
                    name,
                    float(res.get("CPU", 0)),
                    float(res.get("GPU", 0)),
                    0 if is_head else int(nt.get("min_workers", 0)),
                    1 if is_head else int(nt.get("max_workers", doc.get("max_workers", 0))),
                    dict(nt.get("labels") or {}),
                    is_head,
                    conf.get("InstanceType") or conf.get("machineType"),
                )
            )
        return ClusterSpec(path, str(doc["provider"].get("type")), doc, nodes)
    raise ClusterCheckError(f"{path}: neither a Ray cluster launcher YAML (provider + available_node_types) nor a KubeRay RayCluster/RayJob")


def _selector_machine(group: dict[str, Any]) -> str | None:
    return (group["template"]["spec"].get("nodeSelector") or {}).get("node.kubernetes.io/instance-type")


# ---------------------------------------------------------------- rules for a cluster file


def check_rules(cluster: ClusterSpec) -> list[str]:
    """raydino's requirements on a cluster file; returns problems (empty: fine)."""
    p: list[str] = []
    where = str(cluster.path)
    heads = [nt for nt in cluster.node_types if nt.is_head]
    if len(heads) != 1:
        p.append(f"{where}: expected one head node type, found {len(heads)}")
    for h in heads:
        if h.cpus != 0 or h.gpus != 0:
            p.append(f"{where}: head {h.name} declares CPU {h.cpus:g} / GPU {h.gpus:g}; set both to 0 so it never trains")
    train = [nt for nt in cluster.node_types if nt.labels.get(ROLE_LABEL) == TRAIN_ROLE]
    data = [nt for nt in cluster.node_types if nt.labels.get(ROLE_LABEL) == DATA_ROLE]
    if not any(nt.gpus > 0 and nt.min_workers == 0 and nt.max_nodes > 0 for nt in train):
        p.append(f"{where}: needs a worker type labelled {ROLE_LABEL}={TRAIN_ROLE} with GPUs, min 0 (scale from zero), max > 0")
    if not any(nt.gpus == 0 and nt.cpus > 0 and nt.max_nodes > 0 for nt in data):
        p.append(f"{where}: needs a CPU-only worker type labelled {ROLE_LABEL}={DATA_ROLE}")
    for nt in cluster.node_types:
        for key, value in nt.labels.items():
            if key.startswith("ray.io/") or not _LABEL_KEY.match(key) or not isinstance(value, str):
                p.append(f"{where}: {nt.name} label {key}={value!r}: custom label keys are Kubernetes-style and may not use ray.io/")
        if nt.machine in MACHINES:
            vcpus, gpus = MACHINES[nt.machine]
            if nt.cpus > vcpus or nt.gpus > gpus:
                p.append(
                    f"{where}: {nt.name} declares CPU {nt.cpus:g} / GPU {nt.gpus:g} but {nt.machine} has "
                    f"{vcpus} vCPUs / {gpus} GPUs; change `resources` with the machine type"
                )
    p += _kuberay_rules(cluster) if cluster.is_kuberay else _launcher_rules(cluster)
    versions = ray_versions(cluster)
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        versions.add(importlib.metadata.version("ray"))  # the laptop's Ray must match the cluster's
    if len(versions) > 1:
        p.append(f"{where}: several Ray versions {sorted(versions)}; images, rayVersion and the installed Ray must agree")
    return p


def ray_versions(cluster: ClusterSpec) -> set[str]:
    """Ray versions named by images (rayproject/ray:X, ...-rayX-...) and KubeRay's rayVersion."""
    text = yaml.safe_dump(cluster.doc)
    found = set(re.findall(r"rayproject/ray:(\d+\.\d+\.\d+)", text)) | set(re.findall(r"[-:]ray(\d+\.\d+\.\d+)", text))
    if cluster.is_kuberay and cluster.ray_cluster_spec.get("rayVersion"):
        found.add(str(cluster.ray_cluster_spec["rayVersion"]))
    return found


def _launcher_rules(cluster: ClusterSpec) -> list[str]:
    p, doc, where = [], cluster.doc, str(cluster.path)
    if "idle_timeout_minutes" not in doc:
        p.append(f"{where}: set idle_timeout_minutes so idle workers go away")
    for nt in cluster.node_types:
        if "CPU" not in (doc["available_node_types"][nt.name].get("resources") or {}):
            p.append(f"{where}: {nt.name}: declare resources.CPU (offline planning; GCP cannot auto-detect)")
    for rule in (doc.get("provider", {}).get("security_group") or {}).get("IpPermissions", []):
        ranges = {r.get("CidrIp") for r in rule.get("IpRanges", [])}
        ranges |= {r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])}
        if ranges & _INTERNET and not (rule.get("FromPort") == 22 and rule.get("ToPort") == 22):
            p.append(
                f"{where}: security_group opens ports {rule.get('FromPort')}-{rule.get('ToPort')} to the internet; "
                f"reach Ray through `ray dashboard` (SSH) instead"
            )
    for name, nt in doc["available_node_types"].items():
        conf = nt.get("node_config") or {}
        if cluster.kind == "aws" and "IamInstanceProfile" not in conf:
            p.append(f"{where}: {name} has no IamInstanceProfile: AWS gives only the head a role, S3 access fails")
        if cluster.kind == "gcp":
            if not conf.get("serviceAccounts"):
                p.append(f"{where}: {name} has no serviceAccounts: the VM would run as the default compute account")
            sched = conf.get("scheduling")
            if sched is not None and not isinstance(sched, dict):
                p.append(f"{where}: {name} scheduling must be a mapping (GCP API), not {type(sched).__name__}")
            sched = sched if isinstance(sched, dict) else {}
            if (nt.get("resources") or {}).get("GPU") and sched.get("onHostMaintenance") != "TERMINATE":
                p.append(f"{where}: {name} has GPUs: scheduling.onHostMaintenance must be TERMINATE")
    return p


def _kuberay_rules(cluster: ClusterSpec) -> list[str]:
    p, where, spec = [], str(cluster.path), cluster.ray_cluster_spec
    if cluster.doc.get("apiVersion") != "ray.io/v1":
        p.append(f"{where}: apiVersion {cluster.doc.get('apiVersion')!r}; use ray.io/v1")
    if spec.get("enableInTreeAutoscaling") is not True:
        p.append(f"{where}: enableInTreeAutoscaling must be true")
    if "idleTimeoutSeconds" not in (spec.get("autoscalerOptions") or {}):
        p.append(f"{where}: set autoscalerOptions.idleTimeoutSeconds so idle workers go away")
    head = spec["headGroupSpec"]
    if head.get("serviceType", "ClusterIP") != "ClusterIP" or head.get("enableIngress"):
        p.append(f"{where}: head service {head.get('serviceType')!r}/ingress exposes Ray; keep ClusterIP, use port-forward")
    for group in [head, *spec.get("workerGroupSpecs", [])]:
        for k, v in (group.get("rayStartParams") or {}).items():
            if not isinstance(v, str):
                p.append(f"{where}: rayStartParams {k}={v!r} must be a string")
        if "labels" in (group.get("rayStartParams") or {}):
            p.append(f"{where}: labels in rayStartParams are rejected by KubeRay >= 1.5; use the group's labels field")
    if cluster.kind == "RayJob":
        job = cluster.doc["spec"]
        if job.get("shutdownAfterJobFinishes") is not True:
            p.append(f"{where}: shutdownAfterJobFinishes must be true (the cluster goes when the job ends)")
        entry = parse_command(job.get("entrypoint", ""))
        if entry is None or "--name" not in entry.options or not re.match(r"^(s3|gs)://", entry.options.get("--storage", "")):
            p.append(f"{where}: the entrypoint needs a fixed --name and --storage s3://... so a retry resumes the run")
    return p


# ---------------------------------------------------------------- a raydino command line
# Here, not in cluster_check.py, because a RayJob's entrypoint is a raydino command the rules read;
# cluster_check.py finds the commands written in files with the same parser.


@dataclass
class Command:
    module: str
    args: list[str]
    source: str
    options: dict[str, str] = field(default_factory=dict)  # last value of each --option
    sets: list[str] = field(default_factory=list)  # every --set
    positional: list[str] = field(default_factory=list)


# Options known to take no value; only `options` (labels, --name/--storage lookups) relies on this,
# the recipe's own argparse parser decides what is valid.
_FLAGS = {"--resume", "--no-probe", "--print-config", "--help", "-h", "--no-ray", "--keep-metadata"}
COMMAND_RE = re.compile(r"python3? -m (raydino(?:\.[A-Za-z_]\w*)+)")


def parse_command(text: str, source: str = "") -> Command | None:
    """The first `python -m raydino.X ...` in one logical line, split like a shell would."""
    m = COMMAND_RE.search(text)
    if not m:
        return None
    rest = text[m.end() :].split("`", 1)[0]
    lexer = shlex.shlex(rest, posix=True, punctuation_chars=";&|()<>")
    lexer.whitespace_split = True
    tokens: list[str] = []
    try:
        for tok in lexer:
            if set(tok) <= set(";&|()<>"):
                break
            tokens.append(tok)
    except ValueError:  # an unbalanced quote in prose after the command: what was read so far
        pass
    cmd = Command(m.group(1), tokens, source)
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok.startswith("--") and "=" in tok:  # --key=value (also --set=k=v)
            key, value = tok.split("=", 1)
        elif tok.startswith("-") and tok not in _FLAGS and i + 1 < len(tokens):
            key, value = tok, tokens[i + 1]
            i += 1
        elif tok.startswith("-"):
            key, value = tok, ""
        else:
            cmd.positional.append(tok)
            i += 1
            continue
        if key == "--set":
            cmd.sets.append(value)
        cmd.options[key] = value
        i += 1
    return cmd


# ---------------------------------------------------------------- Ray's and KubeRay's own validators


def ray_view(cluster: ClusterSpec) -> dict[str, Any]:
    """The config as Ray's autoscaler reads it, validated by Ray's schema; raises what Ray raises.

    Launcher YAML: `prepare_config` (merges the provider's defaults.yaml shipped in the wheel; no
    network) then `validate_config`.  KubeRay: the RayCluster -> autoscaler-config translation of
    Ray's KubeRay autoscaler, which ends in `validate_config` too.  The cloud steps of `ray up`
    (resource auto-detection, IAM, key pair, subnets) need credentials and are not run.
    """
    import logging

    from ray.autoscaler._private.util import prepare_config, validate_config

    logging.getLogger("ray.autoscaler._private.util").setLevel(logging.WARNING)  # "setting max workers ..."
    if cluster.is_kuberay:
        from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

        cr = {"metadata": {"namespace": "default", "name": cluster.doc["metadata"]["name"]}, "spec": copy.deepcopy(cluster.ray_cluster_spec)}
        return _derive_autoscaling_config_from_ray_cr(cr)
    prepared = prepare_config(copy.deepcopy(cluster.doc))
    validate_config(prepared)
    return prepared


def crd_problems(cluster: ClusterSpec, crd_dir: Path) -> list[str]:
    """Validate a KubeRay manifest against the CRD's OpenAPI v3 schema, strictly.

    The API server prunes or (kubectl --validate=strict, the default) rejects unknown fields; a
    plain JSON-schema check would let a typo like `minReplica` pass, so objects that list their
    properties are closed here (additionalProperties: false) unless the CRD marks them open.
    """
    import jsonschema  # installed with ray[default]

    crd_file = crd_dir / {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}[cluster.kind]
    crd = _read_crd(crd_file.resolve())
    version = str(cluster.doc.get("apiVersion", "")).split("/")[-1]
    schemas = [v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"] if v["name"] == version]
    if not schemas:
        return [f"{cluster.path}: {crd_file.name} has no version {version!r}"]
    validator = jsonschema.Draft7Validator(_closed(schemas[0]))
    return [
        f"{cluster.path}: {'.'.join(str(x) for x in e.absolute_path) or '(top)'}: {e.message}"
        for e in sorted(validator.iter_errors(cluster.doc), key=lambda e: list(map(str, e.absolute_path)))
    ]


@functools.lru_cache(maxsize=4)
def _read_crd(path: Path) -> dict[str, Any]:
    # The CRDs are ~1 MB of YAML: the C loader (when PyYAML has it) reads them ~10x faster.
    return yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def _closed(schema: Any) -> Any:
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out
