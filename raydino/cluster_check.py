"""Offline checks of the cluster configurations in `cluster/` (launcher YAML and KubeRay manifests).

    python -m raydino.cluster_check                          # every file in cluster/, every command in it
    python -m raydino.cluster_check cluster/aws.yaml --config vits16-paper --set run.gpus_per_worker=16

What it checks, without a cloud account or a Kubernetes cluster:
  * Ray's own view: launcher YAML through Ray's `prepare_config` + `validate_config` (its JSON
    schema), KubeRay manifests through the function Ray's KubeRay autoscaler uses to read a
    RayCluster, and (when the CRD files are at hand) the KubeRay CRD OpenAPI schemas;
  * raydino's rules: the head does not train, a GPU worker type scales from zero, a CPU worker type
    carries the data label, every node has a bucket role, no Ray port faces the internet, one Ray
    version everywhere, declared resources fit the machine type;
  * consistency: every `python -m raydino.X` in `cluster/` exists and parses, every `--config` is a
    preset, and each pretraining command's workers (run.workers x GPUs/CPUs each) fit a node type.

Ray's autoscaler schema code is imported only inside `ray_view` (`--no-ray` skips it); the cluster
files themselves are read as YAML.  Checking a `python -m raydino.tune` command imports
`raydino.tune` to parse its arguments with the recipe's own parser, and that imports Ray Tune.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import importlib
import importlib.metadata
import importlib.util
import io
import math
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import Config, ConfigError, load_config

# The node label the cluster configs put on node types, and that the data pipeline can select.
ROLE_LABEL = "raydino/role"
TRAIN_ROLE, DATA_ROLE = "gpu-train", "cpu-data"
DATA_NODE_SELECTOR = {ROLE_LABEL: DATA_ROLE}  # e.g. map_batches(..., label_selector=DATA_NODE_SELECTOR)

DEFAULT_CRD_DIR = Path("../shared/schemas/kuberay")  # relative to the repository root

# (vCPUs, GPUs) of the machine types the configs and their comments mention, so a changed
# instance type with stale `resources` is caught.  Unknown types are reported, not guessed.
MACHINES: dict[str, tuple[int, int]] = {
    "p4d.24xlarge": (96, 8), "p4de.24xlarge": (96, 8), "p5.48xlarge": (192, 8), "p5e.48xlarge": (192, 8),
    "g5.12xlarge": (48, 4), "g5.48xlarge": (192, 8), "g6e.12xlarge": (48, 4), "g6e.48xlarge": (192, 8),
    "m6i.xlarge": (4, 0), "m6i.2xlarge": (8, 0), "c6i.8xlarge": (32, 0), "c6i.16xlarge": (64, 0),
    "a2-highgpu-8g": (96, 8), "a2-ultragpu-8g": (96, 8), "a3-highgpu-8g": (208, 8),
    "n2-standard-8": (8, 0), "n2-highcpu-32": (32, 0), "n2-highcpu-64": (64, 0),
}
_INTERNET = {"0.0.0.0/0", "::/0"}
# Kubernetes label key: optional DNS-subdomain prefix + "/", then a name of <= 63 characters.
_LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                        r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")


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
            nodes.append(NodeType(g["groupName"], cpus, gpus, int(g.get("minReplicas", 0)) * hosts,
                                  int(g.get("maxReplicas", 0)) * hosts, dict(g.get("labels") or {}), False,
                                  _selector_machine(g)))
        return ClusterSpec(path, kind, doc, nodes)
    if "provider" in doc and "available_node_types" in doc:
        head_type = doc.get("head_node_type")
        nodes = []
        for name, nt in doc["available_node_types"].items():
            res = nt.get("resources") or {}
            is_head = name == head_type
            conf = nt.get("node_config") or {}
            nodes.append(NodeType(name, float(res.get("CPU", 0)), float(res.get("GPU", 0)),
                                  0 if is_head else int(nt.get("min_workers", 0)),
                                  1 if is_head else int(nt.get("max_workers", doc.get("max_workers", 0))),
                                  dict(nt.get("labels") or {}), is_head,
                                  conf.get("InstanceType") or conf.get("machineType")))
        return ClusterSpec(path, str(doc["provider"].get("type")), doc, nodes)
    raise ClusterCheckError(f"{path}: neither a Ray cluster launcher YAML (provider + available_node_types) "
                            f"nor a KubeRay RayCluster/RayJob")


def _selector_machine(group: dict[str, Any]) -> str | None:
    return ((group["template"]["spec"].get("nodeSelector") or {}).get("node.kubernetes.io/instance-type"))


# ---------------------------------------------------------------- does a config fit?


@dataclass
class Fit:
    config: str
    workers: int
    request: dict[str, float]
    places: list[tuple[str, int, int]] = field(default_factory=list)  # (node type, workers per node, nodes)

    @property
    def capacity(self) -> int:
        return sum(per * n for _, per, n in self.places)

    def describe(self) -> str:
        where = ", ".join(f"{t}: {per}/node x {n} nodes" for t, per, n in self.places) or "nowhere"
        return f"{self.config}: {self.workers} workers x {_fmt(self.request)} -> {where} (room for {self.capacity})"


def _fmt(request: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in request.items()) + "}"


def check_fit(label: str, cfg: Config, cluster: ClusterSpec) -> Fit:
    """Where the config's Ray Train workers (and its augmentation actors) go; raises if they cannot."""
    request = {"GPU": cfg.run.gpus_per_worker, "CPU": cfg.run.cpus_per_worker}
    fit = Fit(label, cfg.run.workers, request)
    for nt in cluster.node_types:
        have = {"GPU": nt.gpus, "CPU": nt.cpus}
        per_node = min(int(have[k] / v + 1e-9) for k, v in request.items() if v > 0)
        if per_node > 0 and nt.max_nodes > 0:
            fit.places.append((nt.name, per_node, nt.max_nodes))
    types = "; ".join(nt.describe() for nt in cluster.node_types)
    if not fit.places:
        raise ClusterCheckError(
            f"config {label!r} asks {cfg.run.workers} workers x {_fmt(request)} (run.workers x run.gpus_per_worker / "
            f"run.cpus_per_worker), but no node type in {cluster.path} can hold even one worker: {types}")
    if fit.capacity < cfg.run.workers:
        raise ClusterCheckError(
            f"config {label!r} asks {cfg.run.workers} workers x {_fmt(request)}, but {cluster.path} holds at most "
            f"{fit.capacity} ({fit.describe()}); node types: {types}")
    # Augmentation actors take the CPUs left over at full scale (Ray places them on any node).
    actors, actor_cpus = cfg.data.augment_concurrency or 1, cfg.data.augment_cpus
    spare = sum(nt.cpus * nt.max_nodes for nt in cluster.node_types) - cfg.run.workers * cfg.run.cpus_per_worker
    if actors * actor_cpus > spare + 1e-9 or not any(nt.cpus >= actor_cpus and nt.max_nodes for nt in cluster.node_types):
        raise ClusterCheckError(
            f"config {label!r}: data.augment_concurrency={actors} actors x {actor_cpus:g} CPU do not fit the "
            f"{spare:g} CPUs {cluster.path} has left beside {cfg.run.workers} training workers; node types: {types}")
    return fit


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
        p.append(f"{where}: needs a worker type labelled {ROLE_LABEL}={TRAIN_ROLE} with GPUs, "
                 f"min 0 (scale from zero), max > 0")
    if not any(nt.gpus == 0 and nt.cpus > 0 and nt.max_nodes > 0 for nt in data):
        p.append(f"{where}: needs a CPU-only worker type labelled {ROLE_LABEL}={DATA_ROLE}")
    for nt in cluster.node_types:
        for key, value in nt.labels.items():
            if key.startswith("ray.io/") or not _LABEL_KEY.match(key) or not isinstance(value, str):
                p.append(f"{where}: {nt.name} label {key}={value!r}: custom label keys are "
                         f"Kubernetes-style and may not use ray.io/")
        if nt.machine in MACHINES:
            vcpus, gpus = MACHINES[nt.machine]
            if nt.cpus > vcpus or nt.gpus > gpus:
                p.append(f"{where}: {nt.name} declares CPU {nt.cpus:g} / GPU {nt.gpus:g} but {nt.machine} has "
                         f"{vcpus} vCPUs / {gpus} GPUs; change `resources` with the machine type")
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
            p.append(f"{where}: security_group opens ports {rule.get('FromPort')}-{rule.get('ToPort')} to the internet; "
                     f"reach Ray through `ray dashboard` (SSH) instead")
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


# ---------------------------------------------------------------- commands written in cluster/


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
_COMMAND = re.compile(r"python3? -m (raydino(?:\.[A-Za-z_]\w*)+)")


def parse_command(text: str, source: str = "") -> Command | None:
    """The first `python -m raydino.X ...` in one logical line, split like a shell would."""
    m = _COMMAND.search(text)
    if not m:
        return None
    rest = text[m.end():].split("`", 1)[0]
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


def find_commands(paths: list[Path]) -> list[Command]:
    """Every raydino command in the given files: shell lines (with `\\` continuations) and YAML strings."""
    found: dict[tuple[str, tuple[str, ...]], Command] = {}
    for path in paths:
        text = path.read_text()
        # Join `\` continuations, also inside YAML/markdown comments ("#   --set ...").
        chunks = re.sub(r"\\\n[ \t]*(#[ \t]*)?", " ", text).splitlines()
        if path.suffix in (".yaml", ".yml"):
            chunks += [s.replace("\n", " ") for s in _strings(yaml.safe_load(text))]
        for chunk in chunks:
            while chunk:
                cmd = parse_command(chunk, str(path))
                if cmd is None:
                    break
                found.setdefault((cmd.module, tuple(cmd.args)), cmd)
                chunk = chunk[_COMMAND.search(chunk).end():]  # type: ignore[union-attr]
    return list(found.values())


def _strings(node: Any) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return []


@dataclass
class Report:
    errors: list[str] = field(default_factory=list)
    fits: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def check_commands(commands: list[Command], clusters: list[ClusterSpec], root: Path) -> Report:
    """Modules exist and accept the arguments; configs exist and validate; pretraining fits every cluster."""
    rep = Report()
    for cmd in commands:
        where = f"{cmd.source}: python -m {cmd.module} {' '.join(cmd.args)}".strip()
        short = cmd.module.removeprefix("raydino.")
        if importlib.util.find_spec(cmd.module) is None:
            rep.errors.append(f"{where}: module {cmd.module} does not exist")
            continue
        if short == "tune":
            _check_tuning_files(cmd, root, rep, where)
        module = importlib.import_module(cmd.module)
        # Recipes expose their argparse parser as parse_args(argv) or build_parser().
        parse = getattr(module, "parse_args", None) or (
            (lambda argv: module.build_parser().parse_args(argv)) if hasattr(module, "build_parser") else None)
        if parse is None:
            rep.notes.append(f"{where}: {cmd.module} has neither parse_args() nor build_parser(); arguments not checked")
            continue
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
                args = parse(cmd.args)
        except SystemExit as e:
            if e.code not in (0, None):  # --help exits 0
                last = (stderr.getvalue().strip().splitlines() or ["?"])[-1]
                rep.errors.append(f"{where}: {cmd.module} rejects these arguments: {last}")
            continue
        cfg_name = cmd.options.get("--config", "demo")
        try:
            if short != "pretrain":
                if "--config" in cmd.options:
                    load_config(cfg_name, cmd.sets)
                continue
            # The recipe's own flag -> config mapping when it has one (--workers, --data, ...).
            resolve = getattr(module, "resolve_config", None)
            cfg = resolve(args) if resolve else load_config(cfg_name, cmd.sets)
        except ConfigError as e:
            rep.errors.append(f"{where}: {e}")
            continue
        label = " ".join([cfg_name, *[f"--set {s}" for s in cmd.sets],
                          *[f"{k} {cmd.options[k]}" for k in ("--workers", "--gpus-per-worker") if k in cmd.options]])
        for cluster in clusters:
            try:
                rep.fits.append(f"{cluster.path}: {check_fit(label, cfg, cluster).describe()}")
            except ClusterCheckError as e:
                rep.errors.append(f"{where}: {e}")
    return rep


def _check_tuning_files(cmd: Command, root: Path, rep: Report, where: str) -> None:
    for arg in cmd.positional:
        if not arg.endswith((".yaml", ".yml")):
            continue
        path = root / arg
        if not path.exists():
            rep.errors.append(f"{where}: tuning file {arg} does not exist")
            continue
        try:
            spec = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            rep.errors.append(f"{where}: {arg} is not valid YAML: {e}")
            continue
        for name in _config_refs(spec):
            try:
                load_config(name if not name.endswith((".yaml", ".yml")) else str(root / name))
            except ConfigError as e:
                rep.errors.append(f"{where}: {arg} names config {name!r}: {e}")


def _config_refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [v for k, v in node.items() if k in ("config", "base") and isinstance(v, str)]
        return own + [s for v in node.values() for s in _config_refs(v)]
    if isinstance(node, list):
        return [s for v in node for s in _config_refs(v)]
    return []


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

        cr = {"metadata": {"namespace": "default", "name": cluster.doc["metadata"]["name"]},
              "spec": copy.deepcopy(cluster.ray_cluster_spec)}
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
    return [f"{cluster.path}: {'.'.join(str(x) for x in e.absolute_path) or '(top)'}: {e.message}"
            for e in sorted(validator.iter_errors(cluster.doc), key=lambda e: list(map(str, e.absolute_path)))]


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


# ---------------------------------------------------------------- command line


def default_files(root: Path) -> list[Path]:
    files = sorted([*root.glob("cluster/*.yaml"), *root.glob("cluster/kuberay/*.yaml")])
    return [f.relative_to(Path.cwd()) if f.is_relative_to(Path.cwd()) else f for f in files]


def default_docs(root: Path) -> list[Path]:
    docs = sorted(root.glob("cluster/*.md"))
    return [f.relative_to(Path.cwd()) if f.is_relative_to(Path.cwd()) else f for f in docs]


def repo_root() -> Path:
    here = Path.cwd()
    return here if (here / "cluster").is_dir() else Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m raydino.cluster_check", description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="*", help="cluster files (default: cluster/*.yaml cluster/kuberay/*.yaml)")
    p.add_argument("--config", action="append", default=[],
                   help="check this config's fit instead of the commands in cluster/ (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for the --config configs")
    p.add_argument("--crd-dir", type=Path, help=f"KubeRay CRD files (default: {DEFAULT_CRD_DIR} from the repository)")
    p.add_argument("--no-ray", action="store_true", help="skip Ray's own schema validation")
    return p.parse_args(argv)


def run_checks(args: argparse.Namespace, root: Path) -> Report:
    files = [Path(f) for f in args.files] or default_files(root)
    rep = Report()
    if not files:
        rep.errors.append(f"no cluster files under {root / 'cluster'}; run from the repository root or name the files")
    clusters = []
    for f in files:
        try:
            clusters.append(load_cluster(f))
        except ClusterCheckError as e:
            rep.errors.append(str(e))
    for c in clusters:
        rep.errors += check_rules(c)
        if not args.no_ray:
            try:
                ray_view(c)
            except Exception as e:  # Ray raises ValueError / jsonschema errors / KeyError
                rep.errors.append(f"{c.path}: Ray's validation: {type(e).__name__}: {str(e).splitlines()[0]}")
        if c.is_kuberay:
            crd_dir = args.crd_dir or root / DEFAULT_CRD_DIR
            if crd_dir.is_dir():
                rep.errors += crd_problems(c, crd_dir)
            else:
                rep.notes.append(f"{c.path}: KubeRay CRD schemas not found at {crd_dir}; CRD check skipped")
    if args.config:
        for name in args.config:
            try:
                cfg = load_config(name, args.set)
            except ConfigError as e:
                rep.errors.append(str(e))
                continue
            label = " ".join([name, *[f"--set {s}" for s in args.set]])
            for c in clusters:
                try:
                    rep.fits.append(f"{c.path}: {check_fit(label, cfg, c).describe()}")
                except ClusterCheckError as e:
                    rep.errors.append(str(e))
    else:
        texts = [*files, *default_docs(root)] if not args.files else files
        found = check_commands(find_commands([Path(t) for t in texts]), clusters, root)
        for k in ("errors", "fits", "notes"):
            getattr(rep, k).extend(getattr(found, k))
    return rep


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rep = run_checks(args, repo_root())
    sections = (("fits", list(dict.fromkeys(rep.fits))), ("notes", rep.notes),
                ("ERRORS", rep.errors))
    for title, items in sections:
        if items:
            print(f"{title}:")
            print("\n".join(f"  {line}" for line in items))
    print("cluster_check: " + (f"{len(rep.errors)} error(s)" if rep.errors else "ok"))
    return 1 if rep.errors else 0


if __name__ == "__main__":
    sys.exit(main())
