"""Fixtures every test module can use, and the guard that keeps `make test-fast` free of Ray.

The helpers themselves are in tests/helpers/ (one copy each); here they become fixtures:
`local_ray` (one local Ray per module), `s3` (one loopback S3 server per module, holding the
module's BUCKET, with dummy AWS credentials in the environment) and `gcs` (one GCS emulator per module,
holding the module's BUCKET, reached anonymously).

The guard: a test not marked `slow` fails if it leaves Ray initialised in this process or if a
`raylet` or `gcs_server` process appears under this process while it runs (started by a fixture it
uses, by the test, or by a subprocess such as `python -m raydino.pretrain`).
"""

from __future__ import annotations

import os
import sys
import threading

import psutil
import pytest

from helpers.ray_cluster import local_ray as started_local_ray

RAY_PROCESSES = frozenset({"raylet", "gcs_server"})


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray for the whole module (2 CPUs, no dashboard, no Ray Data progress bars), shut down after it.
    Tests that use it are slow: mark them (or the module)."""
    with started_local_ray(num_cpus=2):
        yield


@pytest.fixture(scope="module")
def s3(request):
    """A moto S3 server on 127.0.0.1 holding the bucket named by the module's BUCKET, with dummy AWS
    credentials in os.environ while the module runs.  Tests that use it are slow."""
    pytest.importorskip("moto.server")
    from helpers.s3 import loopback_bucket

    with loopback_bucket(request.module.BUCKET) as server:
        yield server


@pytest.fixture(scope="module")
def gcs(request):
    """A GCS emulator (gcp-storage-emulator, its own process) on 127.0.0.1 holding the bucket named by the
    module's BUCKET; reached anonymously at `gcs.endpoint`.  Tests that use it are slow."""
    pytest.importorskip("gcp_storage_emulator")
    from helpers.gcs import loopback_gcs

    with loopback_gcs(request.module.BUCKET) as server:
        yield server


# ---------------------------------------------------------------- the guard


def _ray_processes_below(pid: int) -> set[tuple[int, str]]:
    found = set()
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return found
    for child in children:
        try:
            name = child.name()
        except psutil.Error:
            continue  # already gone
        if name in RAY_PROCESSES:
            found.add((child.pid, name))
    return found


class RayWatch:
    """Notes every raylet / gcs_server that appears below this process between start() and stop()
    (polled: Ray's processes live for seconds at least, even when a subprocess's Ray is brief)."""

    interval_s = 0.5

    def __init__(self) -> None:
        self.before = _ray_processes_below(os.getpid())
        self.ray_was_up = _ray_initialized()
        self.seen: set[tuple[int, str]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="ray-watch", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while True:
            self.seen |= _ray_processes_below(os.getpid()) - self.before
            if self._stop.wait(self.interval_s):
                return

    def stop(self) -> list[str]:
        """What the test did that only slow tests may do (empty: nothing)."""
        self._stop.set()
        self._thread.join()
        self.seen |= _ray_processes_below(os.getpid()) - self.before
        problems = [f"started a {name} process (pid {pid})" for pid, name in sorted(self.seen)]
        if _ray_initialized() and not self.ray_was_up:
            problems.append("left Ray initialised (ray.is_initialized(); shut down now, so the tests after it are not spoilt)")
            sys.modules["ray"].shutdown()
        return problems


def _ray_initialized() -> bool:
    ray = sys.modules.get("ray")  # never import Ray here: most tests do not need it
    return bool(ray is not None and ray.is_initialized())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    # Watching starts before the test's fixtures are set up: a module fixture that starts Ray counts
    # against the first test that uses it.
    if item.get_closest_marker("slow") is None:
        item.stash[_watch_key] = RayWatch()
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    result = yield
    watch = item.stash.get(_watch_key, None)
    if watch is not None:
        problems = watch.stop()
        if problems:
            pytest.fail(
                f"{item.nodeid} is not marked slow but {'; '.join(problems)}.  Mark it "
                "@pytest.mark.slow (or the module: pytestmark = pytest.mark.slow), so that "
                "`make test-fast` leaves it out.",
                pytrace=False,
            )
    return result


_watch_key = pytest.StashKey[RayWatch]()
