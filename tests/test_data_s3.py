"""Sharding to and from a real S3-protocol server on loopback (moto in server mode).

No mocks: pyarrow's S3 client and boto3 talk HTTP to a moto server on 127.0.0.1 (tests/conftest.py's
`s3`, one for this module).  Stopping that server mid-run is a real outage as the code sees it.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

pytest.importorskip("moto.server")
from raydino.data.shards import open_shards  # noqa: E402
from raydino.data.storage import StorageOptions, s3_client  # noqa: E402
from raydino.data.synth import generate_dataset  # noqa: E402
from raydino.data.writer import ShardingError, ShardJobOptions, shard_dataset  # noqa: E402

from helpers.recipes import run_recipe
from helpers.s3 import KEY_ID, SECRET, LoopbackS3  # noqa: E402

BUCKET = "raydino-test"
N_IMAGES = 30

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("s3src") / "tree"
    generate_dataset(str(root), N_IMAGES, 48, seed=5, workers=1, progress=False)
    return root


def _opts(s3: LoopbackS3) -> StorageOptions:
    return StorageOptions(endpoint=s3.endpoint, max_attempts=2, backoff_s=0.05, connect_timeout_s=1, request_timeout_s=5)


def _expected(source: Path) -> dict[str, tuple[bytes, str, str]]:
    return {r["path"]: ((source / r["path"]).read_bytes(), r["label"], r["split"]) for r in csv.DictReader(open(source / "labels.csv"))}


def test_shard_to_s3_and_read_back(s3, source):
    summary = shard_dataset(
        str(source), f"s3://{BUCKET}/run1", options=ShardJobOptions(target_shard_mb=0.02, workers=2, progress=False),
        storage_options=_opts(s3),
    )  # fmt: skip
    assert summary.shards > 2 and summary.rows == N_IMAGES
    ds = open_shards(f"s3://{BUCKET}/run1", _opts(s3))
    assert ds.verify(deep=True)["rows"] == N_IMAGES
    got = {r["id"]: (r["image"], r["label"], r["split"]) for r in ds.iter_rows(columns=["id", "image", "label", "split"])}
    assert got == _expected(source)
    # The standard AWS environment alone is enough to find the endpoint.
    os.environ["AWS_ENDPOINT_URL"] = s3.endpoint
    try:
        assert len(open_shards(f"s3://{BUCKET}/run1")) == N_IMAGES
    finally:
        os.environ.pop("AWS_ENDPOINT_URL")


def test_outage_mid_run_fails_clearly_and_rerun_completes(s3, source):
    dest = f"s3://{BUCKET}/run2"
    opts = ShardJobOptions(target_shard_mb=0.02, workers=1, progress=False)

    def outage_after_two_shards(index: int, receipt: dict) -> None:
        if index == 1:
            s3.stop()

    try:
        with pytest.raises(ShardingError) as err:
            shard_dataset(str(source), dest, options=opts, storage_options=_opts(s3), on_shard_written=outage_after_two_shards)
    finally:
        s3.start()
    message = str(err.value)
    assert "shard-00002.parquet" in message and "rerun the same command to resume" in message
    assert SECRET not in message

    summary = shard_dataset(str(source), dest, options=opts, storage_options=_opts(s3))
    assert summary.reused_shards == 2 and summary.written_shards == summary.shards - 2
    ds = open_shards(dest, _opts(s3))
    ds.verify(deep=True)
    ids = [r["id"] for r in ds.iter_rows(columns=["id"])]
    assert len(ids) == len(set(ids)) == N_IMAGES  # no duplicate, no missing row


def test_rerun_trusts_finished_s3_shards_by_etag_without_downloading_them(s3, source, monkeypatch):
    from raydino.data import storage

    dest, opts = f"s3://{BUCKET}/run-etag", ShardJobOptions(target_shard_mb=0.02, workers=1, progress=False)
    first = shard_dataset(str(source), dest, options=opts, storage_options=_opts(s3))
    reads: list[str] = []
    real = storage.read_bytes
    monkeypatch.setattr(storage, "read_bytes", lambda loc, path: reads.append(path) or real(loc, path))
    again = shard_dataset(str(source), dest, options=opts, storage_options=_opts(s3))
    assert again.reused_shards == first.shards and not [p for p in reads if "/shards/" in p], reads

    # Same size, other bytes (a bad copy into the bucket): the ETag differs, so the shard is redone.
    client, key = s3_client(_opts(s3)), "run-etag/shards/shard-00001.parquet"
    body = bytearray(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    body[len(body) // 2] ^= 0xFF
    client.put_object(Bucket=BUCKET, Key=key, Body=bytes(body))
    redone = shard_dataset(str(source), dest, options=opts, storage_options=_opts(s3))
    assert (redone.written_shards, redone.reused_shards) == (1, first.shards - 1)
    open_shards(dest, _opts(s3)).verify(deep=True)


def test_s3_source_to_local(s3, source, tmp_path):
    client = s3_client(_opts(s3))
    uploaded = {}
    for path in sorted(source.glob("val/*/*.jpg")):
        key = f"raw/{path.relative_to(source).as_posix()}"
        client.put_object(Bucket=BUCKET, Key=key, Body=path.read_bytes())
        uploaded[path.relative_to(source).as_posix()] = path.read_bytes()
    client.put_object(Bucket=BUCKET, Key="raw/val/anodr/broken.jpg", Body=b"\xff\xd8\xff\xe0 cut short")
    summary = shard_dataset(f"s3://{BUCKET}/raw", str(tmp_path / "local"), options=ShardJobOptions(workers=2, progress=False),
                            storage_options=_opts(s3))  # fmt: skip
    assert summary.rows == len(uploaded) and summary.rejected == 1
    got = {r["id"]: r["image"] for r in open_shards(str(tmp_path / "local")).iter_rows(columns=["id", "image"])}
    assert got == uploaded


def test_cli_against_s3_never_shows_credentials(s3, source, tmp_path):
    env = {"AWS_ENDPOINT_URL": s3.endpoint}
    run = lambda *a: run_recipe("shard", *a, "--retries", "2", timeout=180, **env)  # noqa: E731
    ok = run(str(source), f"s3://{BUCKET}/cli", "--workers", "1", "--target-shard-mb", "0.05")
    assert ok.returncode == 0, ok.stderr
    assert run("--verify", f"s3://{BUCKET}/cli").returncode == 0
    no_bucket = run(str(source), "s3://no-such-bucket-here/x", "--workers", "1")
    assert no_bucket.returncode == 2 and "not writable" in no_bucket.stderr
    env["AWS_ENDPOINT_URL"] = "http://127.0.0.1:9"  # nothing listens there
    down = run(str(source), f"s3://{BUCKET}/down", "--workers", "1")
    assert down.returncode == 2 and "error:" in down.stderr
    client = s3_client(_opts(s3))
    stored = b"".join(
        client.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read() for o in client.list_objects_v2(Bucket=BUCKET, Prefix="cli/")["Contents"]
    )
    for text in (ok.stdout, ok.stderr, no_bucket.stderr, down.stderr, stored.decode("latin-1")):
        assert SECRET not in text and KEY_ID not in text
