"""The two ways tests start Ray on this machine: a local Ray in the test process, or a head of its own.

`local_ray()` is `ray.init(address="local")` for a block (tests/conftest.py's `local_ray` fixture, one per
module).  `RayHead` is `ray start --head --block` as a subprocess in its own process group, temp dir and
ports: a cluster that drivers join by address, as on a real cluster, and that `stop()` ends without
touching any other Ray on the machine (other test sessions share it; `ray stop` would end them all).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from raydino.distributed.cluster import free_port

VENV_BIN = Path(sys.executable).parent


@contextmanager
def local_ray(num_cpus: int = 2) -> Iterator[None]:
    """A local Ray (no dashboard, workers' output not echoed, no Ray Data progress bars) for the block."""
    import ray

    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield
    finally:
        ray.shutdown()


class RayHead:
    """`ray start --head --block` in its own process group, temp dir and ports; stop() ends exactly it.

    `ray_args` are the node's own flags (--num-cpus, --object-store-memory, ...); a subclass that needs
    the address first (an autoscaling config names it) adds flags in `extra_args()`.  The head is up
    when `ready()` holds: by default, when its dashboard answers.
    """

    poll_s = 0.5  # how often start-up and wait_for look again
    stop_grace_s = 3.0  # SIGTERM, then this long before SIGKILL: the cluster is thrown away anyway

    def __init__(
        self,
        ray_args: Sequence[str],
        env: Mapping[str, str],
        *,
        node_ip_address: str | None = "127.0.0.1",
        export_address: bool = True,
        start_timeout_s: float = 120.0,
        temp_prefix: str = "rdh-",
    ) -> None:
        # A short temp dir: Ray's unix socket paths must stay under ~100 characters.
        self.temp_dir = tempfile.mkdtemp(prefix=temp_prefix, dir="/tmp")
        self.added_nodes: list[subprocess.Popen] = []  # worker nodes started by add_node
        self.node_dirs: list[str] = []
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.env = {**env, "RAY_AUTH_MODE": "disabled", "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"}
        if export_address:
            # RAY_ADDRESS in the node's environment: Ray Train's placement-group cleaner looks the cluster up by
            # "auto", which fails when several Ray instances run on one machine (as here, other tests' too).
            self.env["RAY_ADDRESS"] = self.address
        else:
            self.env.pop("RAY_ADDRESS", None)
        # Without --node-ip-address Ray uses this machine's IP; its GCS listens on every interface, so
        # 127.0.0.1:PORT still reaches it and all traffic stays on this machine.
        ip = [f"--node-ip-address={node_ip_address}"] if node_ip_address else []
        cmd = [
            str(VENV_BIN / "ray"),
            "start",
            "--head",
            "--block",
            *ip,
            f"--port={self.gcs_port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            *ray_args,
            *self.extra_args(),
            f"--temp-dir={self.temp_dir}",
            "--disable-usage-stats",
        ]
        self.log = Path(self.temp_dir, "head.log")
        with self.log.open("w") as log:  # the child keeps its own copy of the file descriptor
            self.proc = subprocess.Popen(cmd, env=self.env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
        try:
            self.wait_for(self.ready, start_timeout_s, "the Ray head to come up")
        except BaseException:
            self.stop()
            raise

    def extra_args(self) -> list[str]:
        """More `ray start` flags, made once temp_dir and the ports exist."""
        return []

    def ready(self) -> bool:
        urllib.request.urlopen(f"{self.dashboard}/api/version", timeout=2).read()
        return True

    @classmethod
    def start(cls, *args, attempts: int = 2, **kwargs) -> RayHead:
        """A started head; when one does not come up (e.g. another process took a free port meanwhile),
        another try with new ports."""
        for attempt in range(attempts):
            try:
                return cls(*args, **kwargs)
            except (RuntimeError, TimeoutError):
                if attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    # ---------------------------------------------------------------- addresses

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def driver_env(self, **extra: str) -> dict[str, str]:
        """Environment for a process that joins this cluster (e.g. `python -m raydino.pretrain`)."""
        return {**self.env, "RAY_ADDRESS": self.address, **extra}

    # ---------------------------------------------------------------- more nodes

    def add_node(self, ray_args: Sequence[str]) -> subprocess.Popen:
        """`ray start --address=<this head> --block` as a process group of its own (a machine of the
        cluster): `os.killpg(node.pid, SIGKILL)` takes the whole node away at once, as a lost machine."""
        ports = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port", "metrics-export-port", "runtime-env-agent-port")
        # A temp dir of its own: two nodes started at once on one machine otherwise wait on each other's.
        temp = tempfile.mkdtemp(prefix="rdn-", dir="/tmp")
        self.node_dirs.append(temp)
        cmd = [str(VENV_BIN / "ray"), "start", f"--address={self.address}", "--block", "--node-ip-address=127.0.0.1",
               *(f"--{p}={free_port()}" for p in ports), *ray_args, f"--temp-dir={temp}", "--disable-usage-stats"]  # fmt: skip
        log = Path(self.temp_dir, f"node-{len(self.added_nodes)}.log").open("w")
        node = subprocess.Popen(cmd, env=self.env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
        self.added_nodes.append(node)
        return node

    def alive_nodes(self) -> int:
        out = json.loads(urllib.request.urlopen(f"{self.dashboard}/nodes?view=summary", timeout=5).read())
        return sum(n["raylet"]["state"] == "ALIVE" for n in out["data"]["summary"])

    # ---------------------------------------------------------------- waiting

    def wait_for(self, condition: Callable[[], bool], timeout_s: float, what: str) -> float:
        """Poll `condition` until true; return the seconds waited.  Raises TimeoutError (with the head's
        log tail) after `timeout_s`, or RuntimeError at once if the head process died."""
        t0 = time.monotonic()
        while True:
            try:
                if condition():
                    return time.monotonic() - t0
            except (OSError, KeyError, ValueError):
                pass  # dashboard not up yet, or restarting
            if self.proc.poll() is not None:
                raise RuntimeError(f"the Ray head exited ({self.proc.returncode}) while waiting for {what}:\n{self.log_tail()}")
            if time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"waited {timeout_s:.0f}s for {what}:\n{self.log_tail()}{self.nodes_report()}")
            time.sleep(self.poll_s)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def nodes_report(self, chars: int = 1500) -> str:
        """Each added node: running or its exit status, and its log's tail (a node that never joined, e.g. a
        port taken between free_port() and its start, says why here)."""
        out = []
        for i, node in enumerate(self.added_nodes):
            code = node.poll()
            log = Path(self.temp_dir, f"node-{i}.log")
            tail = log.read_text(errors="replace")[-chars:] if log.exists() else ""
            out.append(f"\n--- node {i} (pid {node.pid}): {'running' if code is None else f'exited {code}'}\n{tail}")
        return "".join(out)

    # ---------------------------------------------------------------- teardown

    def processes_left(self) -> list[str]:
        """Live (non-zombie) processes of this head: its process group (whatever it starts belongs to it,
        an autoscaler's fake nodes too) and anything naming its temp dir."""
        out = subprocess.run(["ps", "-eo", "pid=,pgid=,stat=,args="], capture_output=True, text=True).stdout
        left = []
        for line in out.splitlines():
            fields = line.split(None, 3)
            if len(fields) == 4 and not fields[2].startswith("Z") and (fields[1] == str(self.proc.pid) or self.temp_dir in fields[3]):
                left.append(line.strip()[:300])
        return left

    def stop(self) -> None:
        """SIGTERM the head's process group, SIGKILL what is left after a grace period (never `ray stop`:
        that would stop every Ray on the machine), then remove the temp dir.  Added nodes go first."""
        for node in self.added_nodes:
            try:
                os.killpg(node.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            node.wait()
        for d in self.node_dirs:
            shutil.rmtree(d, ignore_errors=True)
        for sig, grace in ((signal.SIGTERM, self.stop_grace_s), (signal.SIGKILL, 10.0)):
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

    def __enter__(self) -> RayHead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
