"""URIs, endpoints, retries and secret hygiene (raydino.data.storage)."""

from __future__ import annotations

import pyarrow.fs as pafs
import pytest

from raydino.data import storage
from raydino.data.storage import StorageError, StorageOptions, TransientStorageError


def test_local_paths_and_file_uris(tmp_path):
    for uri in (str(tmp_path), f"file://{tmp_path}"):
        loc = storage.resolve(uri)
        assert isinstance(loc.fs, pafs.LocalFileSystem) and loc.scheme == "file" and loc.path == str(tmp_path)
    loc = storage.resolve(str(tmp_path))
    storage.write_bytes(loc, loc.join("a/b.bin"), b"data")
    assert storage.read_bytes(loc, loc.join("a/b.bin")) == b"data"
    assert [i.path for i in storage.list_files(loc)] == [loc.join("a/b.bin")]
    assert not [p for p in (tmp_path / "a").iterdir() if ".tmp-" in p.name]  # no temp files left behind


def test_s3_uris_endpoints_and_regions(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    loc = storage.resolve("s3://my-bucket/some/prefix/", StorageOptions(endpoint="http://127.0.0.1:9000", region="eu-west-1"))
    assert isinstance(loc.fs, pafs.S3FileSystem)
    assert loc.path == "my-bucket/some/prefix" and loc.uri == "s3://my-bucket/some/prefix"
    assert loc.uri_of("shards", "x.parquet") == "s3://my-bucket/some/prefix/shards/x.parquet"
    assert StorageOptions().resolved_endpoint() is None
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    assert StorageOptions().resolved_endpoint() == "http://minio:9000"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-only:9000")
    assert StorageOptions().resolved_endpoint() == "http://s3-only:9000"
    q = storage.resolve("s3://my-bucket/p?endpoint_override=localhost:9000&scheme=http&region=ap-south-1")
    assert q.options.resolved_endpoint() == "http://localhost:9000" and q.options.resolved_region() == "ap-south-1"

    class Data:  # the DataConfig fields this reads
        s3_endpoint = "http://cfg:9000"
        s3_region = "us-west-2"

    opts = StorageOptions.from_config(Data())
    assert (opts.resolved_endpoint(), opts.resolved_region()) == ("http://cfg:9000", "us-west-2")


@pytest.mark.parametrize(
    "uri, message",
    [
        ("gs://bucket/x", "scheme 'gs' is not supported"),
        ("s3://Bad_Bucket/x", "not a valid S3 bucket name"),
        ("s3://AKIAEXAMPLE:hunter2secret@bucket/x", "embeds credentials"),
        ("", "expected a path"),
        ("s3://MyBucket/x", "'MyBucket' is not a valid S3 bucket name"),  # was silently lower-cased
        ("s3://bucket:9000/x", "'bucket:9000' is not a valid S3 bucket name.*endpoint_override"),  # port was dropped
        ("s3://bucket/x?endpoint_overide=http://127.0.0.1:9000", r"unknown query key\(s\) \['endpoint_overide'\]"),
        ("file://data/shards", "'data' would be read as a host name"),  # was silently /shards
    ],
)
def test_bad_uris_are_explained(uri, message):
    with pytest.raises(StorageError, match=message) as err:
        storage.resolve(uri)
    assert "hunter2secret" not in str(err.value)


def test_redaction(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG")
    text = "failed with key wJalrXUtnFEMI/K7MDENG at https://user:pw@host/x"
    out = storage.redact(text)
    assert "wJalrXUtnFEMI" not in out and "user:pw" not in out
    assert storage.display_uri("s3://bucket/x?endpoint_override=h&token=abc") == "s3://bucket/x"


def test_retries_transient_errors_then_gives_up_clearly():
    opts = StorageOptions(max_attempts=3, backoff_s=0.001)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError("AWS Error NETWORK_CONNECTION during PutObject operation: curlCode: 7")
        return "done"

    assert storage.with_retries(flaky, what="writing x", options=opts) == "done" and len(calls) == 3

    def down():
        raise OSError("AWS Error SLOW_DOWN during PutObject")

    with pytest.raises(TransientStorageError, match="writing y: storage unreachable after 3 attempts"):
        storage.with_retries(down, what="writing y", options=opts)

    calls.clear()

    def missing():
        calls.append(1)
        raise FileNotFoundError("no such key")

    with pytest.raises(FileNotFoundError):
        storage.with_retries(missing, what="reading z", options=opts)
    assert len(calls) == 1  # permanent errors are not retried
