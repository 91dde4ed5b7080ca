"""A head-only Ray cluster with a real (fake-provider) autoscaler, on this machine, for tests.

Ray's `fake_multinode` node provider "launches" a worker node by starting another raylet on the same
machine; everything else is Ray's ordinary autoscaler (v1, the one `ray up` runs on a head node): it
reads resource demand from the GCS, launches node types from `available_node_types`, and terminates
nodes idle for longer than `idle_timeout_minutes`.

Why not `ray.cluster_utils.AutoscalingCluster`: its `start()`/`shutdown()` run `ray stop --force`,
which kills every Ray process on the machine (other test sessions share it), and its constructor
reads `fake_multi_node/example.yaml`, which the Ray 2.60 wheel does not ship.  So the head is a
`RayHead` (helpers/ray_cluster.py: `ray start --head --block` in its own process group, temp dir and
ports, stopped by signalling exactly that group).  The cluster is observed over the head's dashboard
HTTP API only (node list and autoscaler status), so the test process never connects a Ray driver.
"""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from helpers.ray_cluster import RayHead

# The fake provider always calls the head's node type this (and starts the head's id with fffff...).
HEAD_NODE_TYPE = "ray.head.default"


def autoscaling_config(
    gcs_address: str, worker_types: dict[str, dict[str, Any]], idle_timeout_minutes: float, head_object_store_bytes: int
) -> dict[str, Any]:
    """The cluster-launcher YAML the head's autoscaler reads, for the `fake_multinode` provider.

    `worker_types` maps a node type name to {"resources": {...}, "min_workers": m, "max_workers": n};
    an `object_store_memory` resource (bytes) sizes that type's object store; unset, every fake node
    would reserve ~30% of this machine's RAM for one.
    """
    types: dict[str, Any] = {
        HEAD_NODE_TYPE: {"resources": {"CPU": 0, "object_store_memory": head_object_store_bytes}, "node_config": {}, "max_workers": 0}
    }
    for name, spec in worker_types.items():
        types[name] = {"node_config": {}, "min_workers": 0, **spec}
    return {
        "cluster_name": "raydino-fake-autoscaling",
        "max_workers": sum(int(t.get("max_workers", 0)) for t in types.values()),
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": {
            "type": "fake_multinode",
            # Without it, fake nodes dial the GCS at <this machine's IP>:6379, i.e. whichever Ray
            # happens to listen on the default port.
            "gcs_address": gcs_address,
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "head_node_type": HEAD_NODE_TYPE,
        "available_node_types": types,
        "auth": {},
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


class FakeAutoscalingCluster(RayHead):
    """`ray start --head` with CPU 0 and an autoscaler that adds/removes fake worker nodes on demand.

    Use as a context manager; `stop()` ends the head, its autoscaler and every node it launched.
    """

    poll_s = 1.0
    stop_grace_s = 5.0  # the GCS and the autoscaler take >10 s to honour SIGTERM; the cluster is thrown away

    def __init__(
        self,
        worker_types: dict[str, dict[str, Any]],
        *,
        idle_timeout_minutes: float = 0.1,
        head_object_store_bytes: int = 200 * 2**20,
        start_timeout_s: float = 120.0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.worker_types, self.idle_timeout_minutes = worker_types, idle_timeout_minutes
        self.head_object_store_bytes = head_object_store_bytes
        base = dict(os.environ if env is None else env)
        super().__init__(
            ["--num-cpus=0", f"--object-store-memory={head_object_store_bytes}"],
            {**base, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"},
            node_ip_address=None,
            export_address=False,
            start_timeout_s=start_timeout_s,
            temp_prefix="rdas-",
        )

    def extra_args(self) -> list[str]:
        config = autoscaling_config(self.address, self.worker_types, self.idle_timeout_minutes, self.head_object_store_bytes)
        config_file = Path(self.temp_dir, "autoscaling.yaml")
        config_file.write_text(yaml.safe_dump(config))
        return [f"--autoscaling-config={config_file}"]

    def ready(self) -> bool:
        # The autoscaler has published a status that maps the head to its configured type: that is also
        # what `raydino.pretrain.autoscaler_present()` looks for before it trusts that a run bigger than
        # the cluster will get nodes.
        return self.node_type_mapping().get(self.head_node_id()) == HEAD_NODE_TYPE

    # ---------------------------------------------------------------- observing (HTTP only)

    def _get_json(self, path: str) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.dashboard}{path}", timeout=10) as r:
            return json.loads(r.read())

    def nodes(self) -> list[dict[str, Any]]:
        """Every node the GCS knows (alive and dead), from the State API: node_id, state, is_head_node, ..."""
        body = self._get_json("/api/v0/nodes?limit=1000&detail=true&timeout=10")
        return body["data"]["result"]["result"]

    def alive_nodes(self) -> list[dict[str, Any]]:
        return [n for n in self.nodes() if n["state"] == "ALIVE"]

    def head_node_id(self) -> str | None:
        return next((n["node_id"] for n in self.nodes() if n.get("is_head_node")), None)

    def autoscaler_report(self) -> dict[str, Any]:
        """The autoscaler's latest report (the JSON behind `ray status`; the dashboard camelCases its
        keys: activeNodes, pendingLaunches, nodeTypeMapping, ...), {} before the first one."""
        status = self._get_json("/api/cluster_status")["data"].get("clusterStatus") or {}
        return status.get("autoscalerReport") or {}

    def node_type_mapping(self) -> dict[str, str]:
        """Node id → configured node type, as the autoscaler sees it."""
        return self.autoscaler_report().get("nodeTypeMapping") or {}

    def log_tail(self, chars: int = 3000) -> str:
        parts = [super().log_tail(chars)]
        monitor_logs = sorted(Path(self.temp_dir).glob("session_*/logs/monitor.log"))
        if monitor_logs:
            parts.append("--- monitor.log ---\n" + monitor_logs[-1].read_text(errors="replace")[-chars:])
        return "\n".join(parts)

    def __enter__(self) -> FakeAutoscalingCluster:
        return self
