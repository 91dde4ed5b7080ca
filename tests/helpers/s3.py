"""A real S3-protocol server (moto in server mode) on 127.0.0.1 for tests, plus dummy credentials.

No mocks: pyarrow, boto3 and Ray workers talk HTTP to it.  The credentials are fake and live only in
the environment, so a test can assert they never show up.  tests/conftest.py's `s3` fixture is one
server per module, holding the module's BUCKET.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

from moto.server import ThreadedMotoServer

KEY_ID, SECRET = "AKIDRAYDINOTESTKEY01", "test-secret-Vq93kPz0Lm"  # fake: must never appear in any output
CREDENTIAL_ENV = {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1"}


class LoopbackS3:
    """A moto S3 server on 127.0.0.1 (a free port), started on construction; it can be stopped and
    restarted on the same port (a real outage, as the code under test sees it)."""

    def __init__(self) -> None:
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        self.host, self.port = self.server.get_host_and_port()
        self.running = True

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def stop(self) -> None:
        if self.running:
            self.server.stop()
            self.running = False

    def start(self) -> None:
        if not self.running:  # moto keeps its state in this process, so the buckets survive
            self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
            self.server.start()
            self.running = True


@contextmanager
def dummy_aws_credentials() -> Iterator[dict[str, str]]:
    """Put the fake credentials in os.environ (and drop any endpoint variables) for the block."""
    names = [*CREDENTIAL_ENV, "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE"]
    saved = {k: os.environ.get(k) for k in names}
    for k in names:
        os.environ.pop(k, None)
    os.environ.update(CREDENTIAL_ENV)
    try:
        yield dict(CREDENTIAL_ENV)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def loopback_bucket(bucket: str) -> Iterator[LoopbackS3]:
    """Dummy credentials + a moto server on 127.0.0.1 holding `bucket`; stopped on exit, whatever happens."""
    with dummy_aws_credentials():
        server = LoopbackS3()
        server.client().create_bucket(Bucket=bucket)
        try:
            yield server
        finally:
            server.stop()
