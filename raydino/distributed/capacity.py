"""Can this cluster ever host the run?  Checked before training, so a run that can never start fails
with a reason instead of hanging (Ray Train retries a worker group's start; Ray Data waits for nodes).

Autoscaler detection reads the autoscaler's published state through Ray's private modules
(`ray._private.state`, `ray._private.ray_constants`): checked against Ray 2.60, each use guarded so
that a changed Ray answers "no autoscaler", the conservative choice.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from raydino.config import Config, ConfigError
from raydino.search.spec import SearchSpec

# Ray Train's time limit for one attempt to start the worker group, and its default (Ray 2.60).
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"  # seconds one worker-group start may wait
DEFAULT_START_TIMEOUT_S = 60.0  # Ray Train's default for it


def autoscaler_present() -> bool:
    """True when an autoscaler can add nodes to this cluster.

    A head started by `ray start` runs Ray's monitor too, in read-only mode: it publishes a status
    whose node types merely mirror the running nodes (`node_<node id>`), so a status alone proves
    nothing.  A real autoscaler maps nodes to its configured types (v1, cluster launcher), or
    reports its node groups to the GCS (v2, e.g. KubeRay).  RAYDINO_ASSUME_AUTOSCALER=1 overrides.
    """
    if os.environ.get("RAYDINO_ASSUME_AUTOSCALER") == "1":
        return True
    try:
        from ray._private import ray_constants
        from ray._private.state import state
        from ray.experimental.internal_kv import _internal_kv_get

        if state.get_cluster_config() is not None:
            return True
        raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
        report = (json.loads(raw).get("autoscaler_report") or {}) if raw else {}
        mapping = report.get("node_type_mapping") or {}
        return any(node_type != f"node_{node_id}" for node_id, node_type in mapping.items())
    except Exception:
        return False


def autoscaler_node_groups() -> list[tuple[str, dict[str, float], int]] | None:
    """The node types an autoscaler v2 (KubeRay's, with `autoscalerOptions.version: v2`) may launch:
    (name, resources per node, max count; -1 = no limit).  None where Ray does not publish them (v1)."""
    try:
        from ray._private.state import state

        return node_groups_of(state.get_cluster_config())
    except Exception:
        return None


def node_groups_of(cluster_config: Any) -> list[tuple[str, dict[str, float], int]] | None:
    """(name, resources, max count) of each node group of a Ray `autoscaler_pb2.ClusterConfig`."""
    if cluster_config is None or not cluster_config.node_group_configs:
        return None
    return [(g.name, {k: float(v) for k, v in g.resources.items()}, int(g.max_count)) for g in cluster_config.node_group_configs]


def autoscaled_fit_problems(cfg: Config, groups: list[tuple[str, dict[str, float], int]]) -> list[str]:
    """Why the node types an autoscaler may launch can never host the run's workers (empty: they can).

    Counted generously (any group may host workers, labels aside), so a run is refused only when no
    number of nodes would do: then waiting for the autoscaler is pointless.
    """
    per_worker = {"CPU": cfg.run.cpus_per_worker, "GPU": cfg.run.gpus_per_worker}

    def per_node(resources: dict[str, float]) -> int:
        return min(int(resources.get(k, 0) // v) if v else 10**9 for k, v in per_worker.items())

    fitting = [(name, per_node(res), count) for name, res, count in groups if count != 0 and per_node(res) > 0]
    types = "; ".join(
        f"{name}: " + ", ".join(f"{k} {v:g}" for k, v in sorted(res.items()) if k in ("CPU", "GPU")) + f" x up to {'any' if count < 0 else count}"
        for name, res, count in groups
    )
    want = f"{per_worker['CPU']:g} CPU and {per_worker['GPU']:g} GPU"
    if not fitting:
        return [
            f"no node type the autoscaler can launch fits one worker of {want} ({types}). Lower "
            f"--gpus-per-worker / run.cpus_per_worker, or add such a node type to the cluster"
        ]
    if all(count >= 0 for _, _, count in fitting):
        room = sum(n * count for _, n, count in fitting)
        if room < cfg.run.workers:
            return [
                f"run.workers={cfg.run.workers} with {want} each: the autoscaler's node types hold at most "
                f"{room} ({types}). Lower --workers, or raise the node types' max count"
            ]
    return []


def start_attempts(cfg: Config) -> int:
    """How many worker-group start timeouts Ray Train may retry over the run (its `controller_failure_limit`).

    Ray counts these over the run's whole life, never resetting, so a limit there is a budget per run.
    raydino makes it a bound per wait instead: with an autoscaler, one attempt lasts the whole
    `run.max_node_wait_s` (`start_timeout_s`) and the first wait that outlasts it ends the run (limit 0);
    a replacement node that comes in 20 minutes costs nothing, however often it happens in a day.
    Without an autoscaler, a worker group that cannot be placed (fragmented nodes, a node lost for good)
    will not become placeable by waiting: three attempts of Ray's 60 s, not forever.
    """
    if not autoscaler_present():
        return 3
    return -1 if cfg.run.max_node_wait_s is None else 0


def start_timeout_s(cfg: Config) -> float | None:
    """Seconds one worker-group start may wait for nodes (Ray's RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S):
    `run.max_node_wait_s` with an autoscaler, else Ray's default (None: leave it)."""
    if autoscaler_present() and cfg.run.max_node_wait_s is not None:
        return float(cfg.run.max_node_wait_s)
    return None


def never_started(cfg: Config) -> str:
    """What to tell a user whose worker group never got placed (Ray Train gave up starting it)."""
    need = (
        f"the training workers never started: no room for run.workers={cfg.run.workers} x "
        f"(CPU {cfg.run.cpus_per_worker:g}, GPU {cfg.run.gpus_per_worker:g})"
    )
    if autoscaler_present():
        return (
            f"{need} appeared within run.max_node_wait_s={cfg.run.max_node_wait_s} s. Check that the autoscaler has "
            f"a node type that fits one worker and room for all of them (`ray status`), or raise "
            f"run.max_node_wait_s; rerun the same command to resume"
        )
    return (
        f"{need} after {start_attempts(cfg)} attempts of {DEFAULT_START_TIMEOUT_S:.0f} s, although the nodes' totals fit (CPUs or GPUs spread over "
        f"nodes, or a node lost). Lower --workers / run.cpus_per_worker, or free the cluster; rerun the same "
        f"command to resume"
    )


def _has_labels(node: dict[str, Any], labels: dict[str, str] | None) -> bool:
    node_labels = node.get("Labels") or {}
    return bool(labels) and all(node_labels.get(k) == v for k, v in labels.items())


def _describe_node(node: dict[str, Any]) -> str:
    res = node.get("Resources", {})
    labels = {k: v for k, v in (node.get("Labels") or {}).items() if not k.startswith("ray.io/")}
    return f"{res.get('CPU', 0):g} CPU/{res.get('GPU', 0):g} GPU" + (f" {labels}" if labels else "")


def training_label_selector(cfg: Config) -> dict[str, str] | None:
    """Keep training workers off the nodes reserved for data (`data.node_labels`), if any.

    With several labels this keeps them off nodes carrying any one of the values (a selector
    cannot say "not all of"); the usual single `raydino/role` label is exact.
    """
    labels = cfg.data.node_labels
    return {k: f"!{v}" for k, v in labels.items()} if labels else None


def check_resources(cfg: Config, nodes: list[dict[str, Any]] | None = None) -> None:
    """Fail before training when the cluster can never host the run: its nodes cannot (and no
    autoscaler can add nodes), or, under an autoscaler that publishes its node types (v2), no
    number of those nodes could.

    Without this, Ray Train retries the worker-group start forever and Ray Data waits forever for a
    node to run its tasks: a run that can never start would just hang.
    """
    import ray

    if autoscaler_present():
        groups = autoscaler_node_groups()
        problems = autoscaled_fit_problems(cfg, groups) if groups else []
        if problems:
            raise ConfigError("the cluster's autoscaler can never add nodes for this job:\n  " + "\n  ".join(problems))
        return  # it may add the nodes; run.max_node_wait_s bounds the wait
    nodes = [n for n in (nodes if nodes is not None else ray.nodes()) if n.get("Alive")]
    data_labels = cfg.data.node_labels
    per_worker = {"CPU": cfg.run.cpus_per_worker, "GPU": cfg.run.gpus_per_worker}
    train_nodes = [n for n in nodes if not _has_labels(n, data_labels)]
    fits = sum(min(int(n["Resources"].get(k, 0) // v) if v else 10**9 for k, v in per_worker.items()) for n in train_nodes)
    have = "; ".join(_describe_node(n) for n in nodes) or "none alive"
    problems = []
    if fits < cfg.run.workers:
        where = " not labelled for data" if data_labels else ""
        problems.append(
            f"run.workers={cfg.run.workers} with {per_worker['CPU']:g} CPU and {per_worker['GPU']:g} GPU each cannot fit "
            f"on the nodes{where} (room for {fits} workers; nodes: {have}). Lower --workers / --gpus-per-worker / "
            f"run.cpus_per_worker, or use a cluster with more nodes"
        )
    data_nodes = [n for n in nodes if _has_labels(n, data_labels)] if data_labels else nodes
    if data_labels and not data_nodes:
        problems.append(f"data.node_labels={data_labels}: no node carries these labels (add such nodes, or unset it)")
    elif data_nodes and not problems:
        # Reads and augmentation tasks each reserve data.augment_cpus; they need CPUs left over after the
        # training workers, which hold theirs for the whole run.
        free = sum(n["Resources"].get("CPU", 0) for n in data_nodes)
        held = cfg.run.workers * cfg.run.cpus_per_worker if not data_labels else 0.0
        if free - held < cfg.data.augment_cpus or max(n["Resources"].get("CPU", 0) for n in data_nodes) < cfg.data.augment_cpus:
            problems.append(
                f"no CPU left for the data pipeline: its tasks need data.augment_cpus={cfg.data.augment_cpus:g} CPU "
                f"each beyond the {held:g} CPU the training workers hold (nodes: {have}). Lower "
                f"run.cpus_per_worker / data.augment_cpus or add CPU nodes"
            )
    if problems:
        raise ConfigError(
            "the cluster cannot run this job and no autoscaler can add nodes:\n  "
            + "\n  ".join(problems)
            + "\n(if an autoscaler does manage this cluster, set RAYDINO_ASSUME_AUTOSCALER=1)"
        )


def local_uris(uris: dict[str, str | None]) -> list[str]:
    """The `what URI` of each local path (plain or file://) among `uris`."""
    return [f"{what}={uri}" for what, uri in uris.items() if uri and ("://" not in uri or uri.startswith("file://"))]


def check_locality(cfg: Config, uris: dict[str, str | None], nodes: list[dict[str, Any]] | None = None) -> None:
    """On a cluster of several nodes (or one an autoscaler can grow), local paths are an error unless
    `run.shared_fs` says every node mounts them: a worker on another node would find an empty directory,
    write checkpoints nobody reads back, or fail mid-run (ConfigError, before training)."""
    if cfg.run.shared_fs:
        return
    if nodes is None:
        import ray

        nodes = ray.nodes()
    alive = [n for n in nodes if n.get("Alive")]
    local = local_uris(uris)
    if not local or (len(alive) < 2 and not autoscaler_present()):
        return
    where = f"{len(alive)} nodes" if len(alive) >= 2 else "an autoscaler that adds nodes"
    raise ConfigError(
        f"this cluster has {where}, and {', '.join(local)} is a local path that other nodes cannot see: use s3:// "
        f"or gs://, or --set run.shared_fs=true if every node mounts it at the same path (NFS, EFS, Filestore)"
    )


# ---------------------------------------------------------------- search trials


def trial_cpus(spec: SearchSpec, base: Config) -> float:
    """Logical CPUs one trial occupies: its workers, plus Ray Data's augmentation actors and one read
    token for a multi-worker trial (without that token the read tasks wait forever)."""
    r = spec.resources
    if r.workers == 1:
        return r.cpus_per_worker
    return r.workers * r.cpus_per_worker + (base.data.augment_concurrency or 1) * base.data.augment_cpus + 1


def search_cpus(spec: SearchSpec, base: Config, concurrency: int) -> int:
    """Logical CPUs of a local Ray for the search: `concurrency` trials at once, at least the cores."""
    return max(os.cpu_count() or 1, int(math.ceil(trial_cpus(spec, base) * concurrency)))


def trial_concurrency(spec: SearchSpec, base: Config) -> int:
    """max_concurrent_trials, or what the cluster holds now (GPUs first: they are what trials wait for)."""
    import ray

    if spec.max_concurrent_trials:
        return spec.max_concurrent_trials
    r = spec.resources
    have = ray.cluster_resources()
    if r.gpus_per_worker > 0:
        fit = int(have.get("GPU", 0) // (r.workers * r.gpus_per_worker))
    else:
        fit = int(have.get("CPU", 0) // trial_cpus(spec, base))
    if fit < 1:
        if autoscaler_present():
            groups = autoscaler_node_groups()
            one_trial = base.model_copy(
                update={
                    "run": base.run.model_copy(
                        update={"workers": r.workers, "cpus_per_worker": r.cpus_per_worker, "gpus_per_worker": r.gpus_per_worker}
                    )
                }
            )
            problems = autoscaled_fit_problems(one_trial, groups) if groups else []
            if problems:
                raise ConfigError("resources: the cluster's autoscaler can never add nodes for one trial:\n  " + "\n  ".join(problems))
            return 1
        raise ConfigError(
            f"resources: a trial needs {r.workers} worker(s) × {r.cpus_per_worker:g} CPU × {r.gpus_per_worker:g} GPU "
            f"but the cluster has {have.get('CPU', 0):g} CPU and {have.get('GPU', 0):g} GPU and no autoscaler"
        )
    return fit
