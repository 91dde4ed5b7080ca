"""A real GCS-protocol server (gcp-storage-emulator) on 127.0.0.1 for tests, in its own process.

No mocks: pyarrow's GcsFileSystem (google-cloud-cpp) and Ray workers talk HTTP (the GCS JSON API) to
it.  tests/conftest.py's `gcs` fixture is one server per module, holding the module's BUCKET.

Why not the emulator's own `create_server`:

* it runs in this process, and pyarrow calls the network from some Python methods without releasing
  the GIL (`NativeFile.closed` of a GCS input file, which `pq.ParquetFile(f)` reads, opens the download):
  a server thread in the same interpreter then never runs, a deadlock.  So the server is a subprocess;
* its HTTPServer answers one request at a time, and google-cloud-cpp keeps a download open while it
  sends the next request: here a ThreadingHTTPServer serves the emulator's own request handler, and a
  lock keeps the emulator's storage (not thread-safe: one JSON index rewritten on every change)
  consistent;
* its objects live in memory (its on-disk store cannot hold a folder marker ``a/`` next to ``a/b``,
  which pyarrow's ``copy_files`` and so Ray Train's checkpoint upload write), and an outage is the
  server process closing its port and every open connection (SIGUSR1), then listening on the same port
  again (SIGUSR2) with every bucket and object still there: a real outage as the code sees it.

Run as a script it is the server: ``python tests/helpers/gcs.py --data DIR --bucket B`` prints
``ready PORT`` once it listens, ``stopped`` after SIGUSR1 (DIR holds only the fault file); it exits
on SIGTERM, or when the process that started it is gone.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager

EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
FAULTS = "faults"  # in the data folder: "STATUS COUNT", the next COUNT requests answered with STATUS


class LoopbackGCS:
    """The emulator on 127.0.0.1 (a free port), started on construction, holding `buckets`; it can be
    stopped and restarted on the same port."""

    def __init__(self, *buckets: str, data_dir: str | None = None) -> None:
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="raydino-gcs-")
        self._own_dir = data_dir is None
        self.buckets = buckets
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.up = False
        self.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start the server (its first time), or end an outage: listen on the same port again."""
        if self.proc is None:
            cmd = [sys.executable, __file__, "--data", self.data_dir]
            for b in self.buckets:
                cmd += ["--bucket", b]
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        elif self.up:
            return
        else:
            self.proc.send_signal(signal.SIGUSR2)
        line = self.proc.stdout.readline()  # "ready PORT", or "" if it died
        if not line.startswith("ready "):
            self.close()
            raise RuntimeError(f"the GCS emulator did not start (said {line!r})")
        self.port, self.up = int(line.split()[1]), True

    def stop(self) -> None:
        """An outage: the port closes (connections refused) and every open connection is cut."""
        if self.proc is not None and self.up:
            self.proc.send_signal(signal.SIGUSR1)
            assert self.proc.stdout.readline().strip() == "stopped"
            self.up = False

    def close(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc.stdout.close()
            self.proc, self.up = None, False
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def fail_next(self, status: int, count: int = 1) -> None:
        """The next `count` requests get HTTP `status` (429, 503: transient; 403: permanent) instead of an answer."""
        with open(os.path.join(self.data_dir, FAULTS), "w") as f:
            f.write(f"{status} {count}")

    def filesystem(self):
        """A pyarrow GcsFileSystem on this server (anonymous), for tests that look at what was stored."""
        from datetime import timedelta

        import pyarrow.fs as pafs

        return pafs.GcsFileSystem(anonymous=True, endpoint_override=f"127.0.0.1:{self.port}", scheme="http",
                                  retry_time_limit=timedelta(seconds=5))  # fmt: skip

    def objects(self, bucket: str, prefix: str = "") -> dict[str, bytes]:
        """Every object under gs://bucket/prefix, name -> bytes."""
        import pyarrow.fs as pafs

        fs = self.filesystem()
        infos = fs.get_file_info(pafs.FileSelector(f"{bucket}/{prefix}".rstrip("/"), recursive=True, allow_not_found=True))
        out = {}
        for info in infos:
            if info.type == pafs.FileType.File:
                with fs.open_input_stream(info.path) as f:
                    out[info.path.split("/", 1)[1]] = f.read()
        return out


@contextmanager
def loopback_gcs(*buckets: str) -> Iterator[LoopbackGCS]:
    """The emulator holding `buckets`, with no Google credential or emulator variable in os.environ for
    the block (tests name the endpoint themselves); stopped and its folder removed on exit, whatever happens."""
    names = ["STORAGE_EMULATOR_HOST", "CLOUD_STORAGE_EMULATOR_ENDPOINT", "GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_OAUTH_ACCESS_TOKEN"]
    saved = {k: os.environ.pop(k, None) for k in names}
    server = LoopbackGCS(*buckets)
    try:
        yield server
    finally:
        server.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _serve(port: int, data_dir: str, buckets: list[str]) -> None:
    from functools import partial
    from http.server import ThreadingHTTPServer

    from gcp_storage_emulator.handlers import buckets as bucket_handlers
    from gcp_storage_emulator.server import RequestHandler
    from gcp_storage_emulator.storage import Storage

    storage = Storage(use_memory_fs=True)
    for b in buckets:
        bucket_handlers.create_bucket(b, storage)
    faults, lock = os.path.join(data_dir, FAULTS), threading.Lock()
    connections: set[socket.socket] = set()

    class Handler(RequestHandler):
        def setup(self) -> None:
            super().setup()
            with lock:
                connections.add(self.connection)

        def finish(self) -> None:
            with lock:
                connections.discard(self.connection)
            super().finish()

        def handle_one_request(self) -> None:
            with lock:
                status = _take_fault(faults)
            if status is None:
                return super().handle_one_request()
            self.raw_requestline = self.rfile.readline(65537)
            if not self.raw_requestline or not self.parse_request():
                return
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            body = b'{"error": {"code": %d, "message": "injected by the test"}}' % status
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True

    server: dict[str, ThreadingHTTPServer] = {}

    def up(*_: object) -> None:
        httpd = ThreadingHTTPServer(("127.0.0.1", port), partial(Handler, _Locked(storage)))
        httpd.daemon_threads = True
        server["httpd"] = httpd
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        print(f"ready {httpd.server_address[1]}", flush=True)

    def down(*_: object) -> None:
        httpd = server.pop("httpd")
        httpd.shutdown()
        httpd.server_close()
        with lock:
            for conn in list(connections):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        print("stopped", flush=True)

    def orphaned(parent: int = os.getppid()) -> None:  # the test process died (SIGKILL, timeout): end too
        while os.getppid() == parent:
            threading.Event().wait(1.0)
        os._exit(0)

    threading.Thread(target=orphaned, daemon=True).start()
    up()
    port = server["httpd"].server_address[1]  # the same port after every outage
    signal.signal(signal.SIGUSR1, down)
    signal.signal(signal.SIGUSR2, up)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        signal.pause()


def _take_fault(path: str) -> int | None:
    """Consume one injected failure, if any is left."""
    try:
        with open(path) as f:
            status, count = (int(x) for x in f.read().split())
    except (FileNotFoundError, ValueError):
        return None
    if count <= 0:
        return None
    with open(path, "w") as f:
        f.write(f"{status} {count - 1}")
    return status


class _Locked:
    """The emulator's Storage with every method call under one lock (its index is one shared dict, saved
    to disk on every change).  Only storage calls hold it: a slow client reading a download does not."""

    def __init__(self, storage) -> None:
        self._storage, self._lock = storage, threading.RLock()

    def __getattr__(self, name):
        value = getattr(self._storage, name)
        if not callable(value):
            return value

        def locked(*a, **kw):
            with self._lock:
                return value(*a, **kw)

        return locked


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--data", required=True)
    p.add_argument("--bucket", action="append", default=[])
    a = p.parse_args()
    _serve(a.port, a.data, a.bucket)
