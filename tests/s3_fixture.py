"""A real S3-protocol server (moto in server mode) on 127.0.0.1 for tests, plus dummy credentials.

No mocks: pyarrow, boto3 and Ray workers talk HTTP to it.  Used by the pretraining tests; the
credentials are fake and live only in the environment, so a test can assert they never show up.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

from moto.server import ThreadedMotoServer

KEY_ID, SECRET = "AKIDRAYDINOPRETRAIN1", "pretrain-secret-Vq93kPz0Lm"  # fake: must never appear in any output
CREDENTIAL_ENV = {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1"}


class LoopbackS3:
    """A moto S3 server on 127.0.0.1 (a free port), started on construction."""

    def __init__(self) -> None:
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        self.host, self.port = self.server.get_host_and_port()

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
        self.server.stop()


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
