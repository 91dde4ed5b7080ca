"""raydino's rules for a cluster file (launcher YAML or KubeRay manifest), and Ray's own validators.

`tools/cluster_check.py` is the command line; the rule set is split by concern:
  * `cluster_files.py`: reading a file into node types, typed field readers, `ClusterCheckError`;
  * this module: `check_rules`, which runs every rule on a file: its own (the head does not train, a
    GPU worker type scales from zero, a CPU worker type carries the data label, every node has a
    bucket role, no Ray port faces the internet, one Ray version everywhere, declared resources fit
    the machine type, a RayJob's entrypoint (a raydino command, read by `parse_command`) can resume
    its run) and those of
  * `cluster_security.py`: token authentication on every node, SSH only from a named address range
    (never 0.0.0.0/0), placeholders filled in;
  * `cluster_pins.py`: every Ray version in cluster/ inside pyproject.toml's ray range, torch
    installed only as an exact version of a CUDA build;
and Ray's and KubeRay's own validators (`ray_view`, `crd_problems`).  The imports go one way only:
cluster_files <- cluster_security, cluster_pins <- cluster_rules <- cluster_check.

Ray's autoscaler schema code is imported only inside `ray_view`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.metadata
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from packaging.specifiers import SpecifierSet

from cluster_files import ClusterSpec, as_mapping, as_string, strings_with_fields
from cluster_pins import image_ray_versions, pin_problems, supported_ray_range
from cluster_security import auth_problems, network_problems, placeholder_problems

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
# Kubernetes label key: optional DNS-subdomain prefix + "/", then a name of <= 63 characters.
_LABEL_KEY = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)


# ---------------------------------------------------------------- rules for a cluster file


def check_rules(cluster: ClusterSpec, *, allow_placeholders: bool = True, ray_range: SpecifierSet | None = None) -> list[str]:
    """raydino's requirements on a cluster file; returns problems (empty: fine).

    `allow_placeholders=False` is for a filled-in copy about to be launched: every YOUR-... left is a
    problem.  `ray_range` defaults to the ray requirement of pyproject.toml.  A field of the wrong
    type raises ClusterCheckError.
    """
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
    p += auth_problems(cluster)
    p += network_problems(cluster)
    if not allow_placeholders:
        p += placeholder_problems(cluster)
    p += pin_problems(cluster, supported_ray_range() if ray_range is None else ray_range)
    return list(dict.fromkeys(p))


def ray_versions(cluster: ClusterSpec) -> set[str]:
    """Ray versions named by images (rayproject/ray:X, ...-rayX-...) and KubeRay's rayVersion."""
    found = {v for _, text in strings_with_fields(cluster.doc) for v in image_ray_versions(text)}
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
    autoscaler = as_mapping(spec.get("autoscalerOptions") or {}, cluster.path, f"{cluster.spec_field}.autoscalerOptions")
    if "idleTimeoutSeconds" not in autoscaler:
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
        entry = parse_command(as_string(job.get("entrypoint", ""), cluster.path, "spec.entrypoint"))
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
