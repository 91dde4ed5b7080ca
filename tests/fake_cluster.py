"""A head-only Ray cluster with a real (fake-provider) autoscaler, on this machine, for tests.

Ray's `fake_multinode` node provider "launches" a worker node by starting another raylet on the same
machine; everything else is Ray's ordinary autoscaler (v1, the one `ray up` runs on a head node): it
reads resource demand from the GCS, launches node types from `available_node_types`, and terminates
nodes idle for longer than `idle_timeout_minutes`.

Why not `ray.cluster_utils.AutoscalingCluster`: its `start()`/`shutdown()` run `ray stop --force`,
which kills every Ray process on the machine (other test sessions share it), and its constructor
reads `fake_multi_node/example.yaml`, which the Ray 2.60 wheel does not ship.  So the head is started
here with `ray start --head --block` in its own process group, temp dir and ports, and stopped by
signalling exactly that group.  The cluster is observed over the head's dashboard HTTP API only
(node list and autoscaler status), so the test process never connects a Ray driver.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

import yaml

VENV_BIN = Path(sys.executable).parent
# The fake provider always calls the head's node type this (and starts the head's id with fffff...).
HEAD_NODE_TYPE = "ray.head.default"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def autoscaling_config(gcs_address: str, worker_types: dict[str, dict[str, Any]], idle_timeout_minutes: float,
                       head_object_store_bytes: int) -> dict[str, Any]:
    """The cluster-launcher YAML the head's autoscaler reads, for the `fake_multinode` provider.

    `worker_types` maps a node type name to {"resources": {...}, "min_workers": m, "max_workers": n};
    an `object_store_memory` resource (bytes) sizes that type's object store; unset, every fake node
    would reserve ~30% of this machine's RAM for one.
    """
    types: dict[str, Any] = {HEAD_NODE_TYPE: {"resources": {"CPU": 0, "object_store_memory": head_object_store_bytes},
                                             "node_config": {}, "max_workers": 0}}
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


class FakeAutoscalingCluster:
    """`ray start --head` with CPU 0 and an autoscaler that adds/removes fake worker nodes on demand.

    Use as a context manager; `stop()` ends the head, its autoscaler and every node it launched.
    """

    def __init__(self, worker_types: dict[str, dict[str, Any]], *, idle_timeout_minutes: float = 0.1,
                 head_object_store_bytes: int = 200 * 2**20, start_timeout_s: float = 120.0,
                 env: dict[str, str] | None = None) -> None:
        # A short temp dir: Ray's unix socket paths must stay under ~100 characters.
        self.temp_dir = tempfile.mkdtemp(prefix="rdas-", dir="/tmp")
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        config = autoscaling_config(self.address, worker_types, idle_timeout_minutes, head_object_store_bytes)
        config_file = Path(self.temp_dir, "autoscaling.yaml")
        config_file.write_text(yaml.safe_dump(config))
        base = dict(os.environ if env is None else env)
        self.env = {**base, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_AUTH_MODE": "disabled",
                    "PATH": f"{VENV_BIN}{os.pathsep}{base.get('PATH', '')}"}
        self.env.pop("RAY_ADDRESS", None)
        # No --node-ip-address: Ray replaces 127.0.0.1 by this machine's IP anyway (its GCS listens on
        # every interface, so 127.0.0.1:PORT still reaches it); all traffic stays on this machine.
        cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block",
               f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
               f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
               "--num-cpus=0", f"--object-store-memory={head_object_store_bytes}", f"--temp-dir={self.temp_dir}",
               f"--autoscaling-config={config_file}", "--disable-usage-stats"]
        self.log = Path(self.temp_dir, "head.log")
        with self.log.open("w") as log:  # the child keeps its own copy of the file descriptor
            self.proc = subprocess.Popen(cmd, env=self.env, start_new_session=True, stdout=log,
                                         stderr=subprocess.STDOUT)
        try:
            # Ready = the autoscaler has published a status that maps the head to its configured type:
            # that is also what `raydino.pretrain.autoscaler_present()` looks for before it trusts that
            # a run bigger than the cluster will get nodes.
            self.wait_for(lambda: self.node_type_mapping().get(self.head_node_id()) == HEAD_NODE_TYPE,
                          start_timeout_s, "the head and its autoscaler to come up")
        except BaseException:
            self.stop()
            raise

    # ---------------------------------------------------------------- addresses

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def driver_env(self) -> dict[str, str]:
        """Environment for a process that joins this cluster (e.g. `python -m raydino.pretrain`)."""
        return {**self.env, "RAY_ADDRESS": self.address}

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

    def wait_for(self, condition: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 1.0) -> float:
        """Poll `condition` until true; return the seconds waited.  Raises TimeoutError (with the head's
        log tail) after `timeout_s`, or at once if the head process died."""
        t0 = time.monotonic()
        while True:
            try:
                if condition():
                    return time.monotonic() - t0
            except (OSError, KeyError, ValueError):
                pass  # dashboard not up yet, or restarting
            if self.proc.poll() is not None:
                raise RuntimeError(f"the Ray head exited ({self.proc.returncode}) while waiting for {what}:\n"
                                   f"{self.log_tail()}")
            if time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"waited {timeout_s:.0f}s for {what}:\n{self.log_tail()}")
            time.sleep(poll_s)

    def log_tail(self, chars: int = 3000) -> str:
        parts = [self.log.read_text(errors="replace")[-chars:]] if self.log.exists() else []
        monitor_logs = sorted(Path(self.temp_dir).glob("session_*/logs/monitor.log"))
        if monitor_logs:
            parts.append("--- monitor.log ---\n" + monitor_logs[-1].read_text(errors="replace")[-chars:])
        return "\n".join(parts)

    # ---------------------------------------------------------------- teardown

    def processes_left(self) -> list[str]:
        """Live (non-zombie) processes of this cluster: the head's process group (the fake nodes are
        started by its autoscaler, so they belong to it too) and anything naming its temp dir."""
        out = subprocess.run(["ps", "-eo", "pid=,pgid=,stat=,args="], capture_output=True, text=True).stdout
        left = []
        for line in out.splitlines():
            fields = line.split(None, 3)
            if len(fields) == 4 and not fields[2].startswith("Z") and (
                    fields[1] == str(self.proc.pid) or self.temp_dir in fields[3]):
                left.append(line.strip()[:300])
        return left

    def stop(self) -> None:
        """SIGTERM the head's process group, SIGKILL what is left after a grace period (never `ray stop`:
        that would stop every Ray on the machine), then remove the temp dir."""
        # The GCS and the autoscaler take >10 s to honour SIGTERM; the cluster is thrown away, so 5 s will do.
        for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and self.processes_left():
                self.proc.poll()  # reap the leader
                time.sleep(0.2)
        self.proc.poll()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> "FakeAutoscalingCluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
