"""Offline checks of the cluster configurations in `cluster/` (launcher YAML and KubeRay manifests).

    python tools/cluster_check.py                          # every file in cluster/, every command in it
    python tools/cluster_check.py cluster/aws.yaml --config vits16-paper --set run.gpus_per_worker=16
    python tools/cluster_check.py cluster/aws.yaml --no-placeholders    # your filled-in copy, before `ray up`

What it checks, without a cloud account or a Kubernetes cluster:
  * Ray's own view: launcher YAML through Ray's `prepare_config` + `validate_config` (its JSON
    schema), KubeRay manifests through the function Ray's KubeRay autoscaler uses to read a
    RayCluster, and (when the CRD files are at hand) the KubeRay CRD OpenAPI schemas;
  * raydino's rules: the head does not train, a GPU worker type scales from zero, a CPU worker type
    carries the data label, every node has a bucket role, no Ray port faces the internet, one Ray
    version everywhere, declared resources fit the machine type;
  * security and pins: token authentication on every node, SSH only from metadata.ssh_source_range
    (never 0.0.0.0/0), every Ray version in cluster/ and the runbook inside pyproject.toml's ray
    range, torch installed only as an exact version of a CUDA build, one torch build everywhere;
  * consistency: every `python -m raydino.X` in `cluster/` exists and parses, every `--config` is a
    preset, and each pretraining command's workers (run.workers x GPUs/CPUs each) fit a node type.

Reading cluster files lives in `tools/cluster_files.py`, the rules for them in `tools/cluster_rules.py`
(which runs those of `cluster_security.py` and `cluster_pins.py` too); this file checks the fit of
configs, finds and checks the commands, and is the command line.  Ray's autoscaler schema code is
imported only inside `cluster_rules.ray_view` (`--no-ray` skips it); the cluster files
themselves are read as YAML.  Checking a `python -m raydino.tune` command imports `raydino.tune`
to parse its arguments with the recipe's own parser, and that imports Ray Tune.  A malformed file
(`resources: {CPU: lots}`) is reported as an error naming the file, the field and the value.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raydino.config import Config, ConfigError, load_config

from cluster_files import ClusterCheckError, ClusterSpec, load_cluster
from cluster_pins import doc_lines, supported_ray_range, text_lines, text_pin_problems, torch_pins
from cluster_rules import COMMAND_RE, DEFAULT_CRD_DIR, Command, check_rules, crd_problems, parse_command, ray_view

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
    """Where the config's Ray Train workers (and its augmentation tasks) go; raises if they cannot.

    With `data.node_labels` the run keeps its workers off the nodes carrying those labels and its data
    tasks on them (raydino.distributed.capacity), so each is counted on its own node types."""
    request = {"GPU": cfg.run.gpus_per_worker, "CPU": cfg.run.cpus_per_worker}
    fit = Fit(label, cfg.run.workers, request)
    data_labels = dict(cfg.data.node_labels or {})

    def for_data(nt: Any) -> bool:
        return bool(data_labels) and all(nt.labels.get(k) == v for k, v in data_labels.items())

    for nt in cluster.node_types:
        if for_data(nt):
            continue
        have = {"GPU": nt.gpus, "CPU": nt.cpus}
        per_node = min(int(have[k] / v + 1e-9) for k, v in request.items() if v > 0)
        if per_node > 0 and nt.max_nodes > 0:
            fit.places.append((nt.name, per_node, nt.max_nodes))
    types = "; ".join(nt.describe() for nt in cluster.node_types)
    if not fit.places:
        raise ClusterCheckError(
            f"config {label!r} asks {cfg.run.workers} workers x {_fmt(request)} (run.workers x run.gpus_per_worker / "
            f"run.cpus_per_worker), but no node type in {cluster.path} can hold even one worker: {types}"
        )
    if fit.capacity < cfg.run.workers:
        raise ClusterCheckError(
            f"config {label!r} asks {cfg.run.workers} workers x {_fmt(request)}, but {cluster.path} holds at most "
            f"{fit.capacity} ({fit.describe()}); node types: {types}"
        )
    # Augmentation tasks take the labelled nodes' CPUs, or without labels those left over at full scale.
    tasks, task_cpus = cfg.data.augment_concurrency or 1, cfg.data.augment_cpus
    hosts = [nt for nt in cluster.node_types if for_data(nt)] if data_labels else list(cluster.node_types)
    spare = sum(nt.cpus * nt.max_nodes for nt in hosts)
    if data_labels:
        where = f"the node types labelled {data_labels} (data.node_labels) hold"
    else:
        spare -= cfg.run.workers * cfg.run.cpus_per_worker
        where = f"{cluster.path} has left beside {cfg.run.workers} training workers:"
    if tasks * task_cpus > spare + 1e-9 or not any(nt.cpus >= task_cpus and nt.max_nodes for nt in hosts):
        raise ClusterCheckError(
            f"config {label!r}: data.augment_concurrency={tasks} tasks x {task_cpus:g} CPU (data.augment_cpus) do not fit "
            f"the {spare:g} CPUs {where} at most; node types: {types}"
        )
    return fit


# ---------------------------------------------------------------- commands written in cluster/ and docs


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
                chunk = chunk[COMMAND_RE.search(chunk).end() :]  # type: ignore[union-attr]
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
        if hasattr(module, "__path__"):  # a package run with -m (raydino.bench): its parser is in __main__
            module = importlib.import_module(f"{cmd.module}.__main__")
        # Recipes expose their argparse parser as parse_args(argv) or build_parser().
        parse = getattr(module, "parse_args", None) or (
            (lambda argv: module.build_parser().parse_args(argv)) if hasattr(module, "build_parser") else None
        )
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
        label = " ".join(
            [cfg_name, *[f"--set {s}" for s in cmd.sets], *[f"{k} {cmd.options[k]}" for k in ("--workers", "--gpus-per-worker") if k in cmd.options]]
        )
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
    p = argparse.ArgumentParser(prog="python tools/cluster_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="*", help="cluster files (default: cluster/*.yaml cluster/kuberay/*.yaml)")
    p.add_argument("--config", action="append", default=[], help="check this config's fit instead of the commands in cluster/ (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for the --config configs")
    p.add_argument("--crd-dir", type=Path, help=f"KubeRay CRD files (default: {DEFAULT_CRD_DIR} from the repository)")
    p.add_argument("--no-ray", action="store_true", help="skip Ray's own schema validation")
    p.add_argument(
        "--no-placeholders",
        action="store_true",
        help="the files are your filled-in copies about to be launched: any YOUR-... placeholder left is an error",
    )
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
        try:
            rep.errors += check_rules(c, allow_placeholders=not args.no_placeholders)
        except ClusterCheckError as e:  # a field of the wrong type, or pyproject.toml unreadable
            rep.errors.append(str(e))
            continue
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
    docs = default_docs(root) if not args.files else []
    rep.errors += pin_agreement(clusters, docs)
    return rep


def pin_agreement(clusters: list[ClusterSpec], docs: list[Path]) -> list[str]:
    """The pin rules on the runbooks, and one torch build across all cluster files and runbooks.

    Each cluster file is checked on its own by `check_rules`; this adds what only shows between files:
    the KubeRay image tag (`...-torch2.14.1-cu128`) against the runbook's Dockerfile and the launcher
    configs' pip lines.
    """
    try:
        ray_range = supported_ray_range()
    except ClusterCheckError as e:
        return [str(e)]
    errors: list[str] = []
    pins: dict[tuple[str, str], list[str]] = {}
    for doc in docs:
        lines = doc_lines(doc)
        errors += text_pin_problems(str(doc), lines, ray_range)
        for build, where in torch_pins(lines).items():
            pins.setdefault(build, []).extend(f"{doc} {w}" for w in where)
    for c in clusters:
        for build, where in torch_pins(text_lines(c)).items():
            pins.setdefault(build, []).extend(f"{c.path} {w}" for w in where)
    if len(pins) > 1:
        found = "; ".join(
            f"torch {version} {cuda} ({', '.join(where[:3])}{', ...' if len(where) > 3 else ''})" for (version, cuda), where in sorted(pins.items())
        )
        errors.append(f"cluster/: several torch builds: {found}; images, setup commands and the runbook's Dockerfile must install one")
    return errors


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rep = run_checks(args, repo_root())
    sections = (("fits", list(dict.fromkeys(rep.fits))), ("notes", rep.notes), ("ERRORS", rep.errors))
    for title, items in sections:
        if items:
            print(f"{title}:")
            print("\n".join(f"  {line}" for line in items))
    print("cluster_check: " + (f"{len(rep.errors)} error(s)" if rep.errors else "ok"))
    return 1 if rep.errors else 0


if __name__ == "__main__":
    sys.exit(main())
