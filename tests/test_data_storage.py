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
        ("http://bucket/x", r"scheme 'http' is not supported \(allowed: a local path, file://, s3://, gs://\)"),
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


def test_gcs_uris_endpoints_and_the_scheme_table(monkeypatch):
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    loc = storage.resolve("gs://my-bucket/some/prefix/", StorageOptions(gcs_endpoint="http://127.0.0.1:9023"))
    assert isinstance(loc.fs, pafs.GcsFileSystem) and loc.scheme == "gs" and loc.is_remote
    assert loc.path == "my-bucket/some/prefix" and loc.uri == "gs://my-bucket/some/prefix"
    assert loc.uri_of("shards", "x.parquet") == "gs://my-bucket/some/prefix/shards/x.parquet"
    # A plain-http endpoint (an emulator) is reached anonymously: no token ever travels unencrypted.
    assert loc.fs.__reduce__()[1][0]["anonymous"] is True
    assert storage.resolve("gcs://my_bucket.example.com/x").uri == "gs://my_bucket.example.com/x"  # alias, dots, underscore
    assert storage.resolve("gs://my-bucket/x").fs.__reduce__()[1][0]["anonymous"] is False  # Google: default credentials
    assert StorageOptions().resolved_gcs_endpoint() is None
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "localhost:9023")  # Google's clients read it as plain http
    assert StorageOptions().resolved_gcs_endpoint() == "http://localhost:9023"
    assert StorageOptions(gcs_endpoint="https://gcs.internal").resolved_gcs_endpoint() == "https://gcs.internal"
    q = storage.resolve("gs://my-bucket/p?endpoint_override=127.0.0.1:4443&scheme=http")
    assert q.options.resolved_gcs_endpoint() == "http://127.0.0.1:4443"
    assert StorageOptions.from_config({"gcs_endpoint": "http://cfg:1"}).gcs_endpoint == "http://cfg:1"
    assert set(storage.REMOTE_SCHEMES) == {"s3", "gs"} and storage.remote_scheme("GCS").name == "gs"
    with pytest.raises(StorageError, match="GCS endpoint 'ftp://x': expected http"):
        storage.resolve("gs://my-bucket/p", StorageOptions(gcs_endpoint="ftp://x"))


def test_the_config_knows_the_same_schemes_and_query_keys_as_storage():
    from raydino.config import URI_QUERY_KEYS, URI_SCHEMES

    assert URI_SCHEMES == {k: (s.name, *s.aliases) for k, s in storage.REMOTE_SCHEMES.items()}
    assert URI_QUERY_KEYS == {k: s.query_keys for k, s in storage.REMOTE_SCHEMES.items()}


@pytest.mark.parametrize(
    "uri, message",
    [
        ("gs:/bucket/x", r"gs: needs two slashes \(gs://bucket/x\)"),  # was a local folder named gs:
        ("s3:bucket/x", r"s3: needs two slashes"),
        ("gs://", "no bucket; expected gs://bucket/prefix"),
        ("gs:///x", "no bucket"),
        ("gs://Bad-Bucket/x", r"'Bad-Bucket' is not a valid GCS bucket name .*STORAGE_EMULATOR_HOST"),
        ("gs://bucket:4443/x", "'bucket:4443' is not a valid GCS bucket name"),
        ("gs://oauth2accesstoken:ya29.hunter2secret@bucket/x", "embeds credentials; remove them and use Application Default Credentials"),
        ("gs://bucket/x?access_token=ya29.hunter2secret", r"unknown query key\(s\) \['access_token'\]; allowed: endpoint_override, scheme"),
        ("gs://bucket/x?region=eu", r"unknown query key\(s\) \['region'\]"),
    ],
)
def test_bad_gcs_uris_are_explained(uri, message):
    with pytest.raises(StorageError, match=message) as err:
        storage.resolve(uri)
    assert "hunter2secret" not in str(err.value)


def test_gcs_tokens_are_redacted_and_never_forwarded(monkeypatch):
    monkeypatch.setenv("GOOGLE_OAUTH_ACCESS_TOKEN", "opaque-token-value-1")
    monkeypatch.setenv("GOOGLE_CREDENTIALS", '{"private_key": "k"}')
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "127.0.0.1:9023")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", "/etc/gcp/key.json")  # a path: forwarded, never read
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "proj")
    text = ("GET https://storage.googleapis.com/b/o?access_token=ya29.a0AfH6SMB&alt=media failed; Authorization: "
            "Bearer ya29.c.b0AXv0zTN-xyz; token opaque-token-value-1")  # fmt: skip
    out = storage.redact(text)
    assert "a0AfH6SMB" not in out and "b0AXv0zTN" not in out and "opaque-token-value-1" not in out
    assert "access_token=***" in out and "&alt=media" in out
    env = storage.forwardable_env()
    assert {"STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT"} <= set(env)
    assert "GOOGLE_OAUTH_ACCESS_TOKEN" not in env and "GOOGLE_CREDENTIALS" not in env
    assert storage.display_uri("gs://bucket/x?access_token=ya29.abc") == "gs://bucket/x"


# Messages pyarrow's GcsFileSystem (google-cloud-cpp) raised against the emulator (tests/test_data_gcs.py).
_GCS_DOWN = ("google::cloud::Status(UNAVAILABLE: Retry policy exhausted, with a last message of PerformWork() - CURL error [7]=Could "
             "not connect to server error_info={reason=, domain=, metadata={gcloud-cpp.retry.function=GetObjectMetadata}})")  # fmt: skip
_GCS_403 = ('[Errno 13] google::cloud::Status(PERMISSION_DENIED: Permanent error, with a last message of {"error": {"code": 403}} '
            "error_info={reason=, domain=, metadata={gcloud-cpp.retry.reason=permanent-error}}). Detail: [errno 13] Permission denied")  # fmt: skip


def test_gcs_errors_are_classified_and_shortened():
    assert storage.is_transient(OSError(_GCS_DOWN))
    for code in ("RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "INTERNAL", "UNAVAILABLE"):
        assert storage.is_transient(OSError(f"google::cloud::Status({code}: Retry policy exhausted ...)")), code
    assert not storage.is_transient(PermissionError(13, _GCS_403))
    assert not storage.is_transient(OSError("google::cloud::Status(PERMISSION_DENIED: Permanent error ...)"))
    assert not storage.is_transient(OSError("google::cloud::Status(NOT_FOUND: Permanent error ...)"))
    assert storage.brief_error(OSError(_GCS_DOWN)) == "GCS UNAVAILABLE (Could not connect to server)"
    assert storage.brief_error(PermissionError(_GCS_403)) == "GCS PERMISSION_DENIED (HTTP 403)"
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError(_GCS_DOWN)
        return "ok"

    assert storage.with_retries(flaky, what="reading gs://b/x", options=StorageOptions(backoff_s=0.001)) == "ok" and len(calls) == 3
