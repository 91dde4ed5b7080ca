"""Where data lives: a URI becomes a pyarrow filesystem plus a path on it.

Every raydino location is one of

* a plain path (``data/shards``) or ``file:///abs/path`` -> ``pyarrow.fs.LocalFileSystem``
* ``s3://bucket/prefix``                                 -> ``pyarrow.fs.S3FileSystem``

S3-compatible endpoints (MinIO, Ceph, moto, ...) come from, in order: an explicit
``StorageOptions.endpoint`` (the config field ``data.s3_endpoint``), the URI query
(``s3://b/p?endpoint_override=host:port&scheme=http``), then the standard AWS variables
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``.  Credentials are never passed around by raydino:
pyarrow and boto3 both read the standard AWS chain (environment, ``~/.aws``, instance role),
so they cannot end up in a manifest, a log line or a pickled task.  Text that might contain
them (error messages, URIs) goes through `redact` / `display_uri` before it is shown.

pyarrow already retries S3 requests (``retry_strategy``); `with_retries` adds a second,
slower layer with exponential backoff around whole operations (one shard upload, one file
read) so that a short outage of the endpoint does not end a long job, while a long one ends
it with a message that says what failed and that rerunning resumes.
"""

from __future__ import annotations

import os
import random
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import pyarrow.fs as pafs

T = TypeVar("T")

# The one list of credential variables: `redact` hides their values, `forwardable_env` never sends
# them to other nodes (each node reads its own credential chain).  AWS_SECURITY_TOKEN is the older
# name of AWS_SESSION_TOKEN that boto and some SDKs still read.
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ACCESS_KEY_ID")


class StorageError(OSError):
    """A storage operation failed for good (after retries, or not worth retrying)."""


class TransientStorageError(StorageError):
    """The endpoint stayed unreachable or overloaded through every retry."""


@dataclass(frozen=True)
class StorageOptions:
    """How to reach object storage.  Picklable and free of secrets by construction."""

    endpoint: str | None = None  # e.g. "http://127.0.0.1:9000"; None: AWS_ENDPOINT_URL(_S3) or AWS
    region: str | None = None  # None: AWS_REGION / AWS_DEFAULT_REGION, else us-east-1
    max_attempts: int = 5  # raydino-level attempts per operation (each has pyarrow's own retries)
    backoff_s: float = 0.5  # first wait; doubles each attempt, capped by backoff_max_s
    backoff_max_s: float = 8.0
    connect_timeout_s: float = 5.0
    request_timeout_s: float = 60.0
    # From the URI query (endpoint_override, scheme, region); pairs, so the options stay hashable.
    extra: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_config(cls, data_cfg: Any, **kw: Any) -> StorageOptions:
        """Build from a `raydino.config.DataConfig` (fields s3_endpoint, s3_region)."""
        return cls(endpoint=getattr(data_cfg, "s3_endpoint", None), region=getattr(data_cfg, "s3_region", None), **kw)

    def resolved_endpoint(self) -> str | None:
        extra = dict(self.extra)
        if self.endpoint:
            return self.endpoint
        if "endpoint_override" in extra:
            return f"{extra.get('scheme', 'https')}://{extra['endpoint_override']}"
        return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None

    def resolved_region(self) -> str | None:
        """The configured region, or None (pyarrow and boto3 then use us-east-1)."""
        return self.region or dict(self.extra).get("region") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None


@dataclass(frozen=True)
class Location:
    """A directory-like place on a filesystem: ``fs`` + ``path`` (no scheme, no trailing slash)."""

    fs: pafs.FileSystem
    path: str
    scheme: str  # "file" or "s3"
    options: StorageOptions

    @property
    def uri(self) -> str:
        """Display-safe URI of this location."""
        return self.path if self.scheme == "file" else f"s3://{self.path}"

    def join(self, *parts: str) -> str:
        """Path on ``fs`` of a child (``parts`` are POSIX-relative)."""
        rel = "/".join(p.strip("/") for p in parts if p)
        return f"{self.path.rstrip('/')}/{rel}" if rel else self.path

    def child(self, *parts: str) -> Location:
        return replace(self, path=self.join(*parts))

    def uri_of(self, *parts: str) -> str:
        p = self.join(*parts)
        return p if self.scheme == "file" else f"s3://{p}"


# ------------------------------------------------------------------ resolving


def _s3_filesystem(opts: StorageOptions) -> pafs.S3FileSystem:
    endpoint = opts.resolved_endpoint()
    # No automatic bucket-region lookup: offline or off-AWS it costs seconds of DNS retries on
    # every resolve.  Buckets outside us-east-1 need a region setting (`with_retries` says so when AWS redirects).
    kwargs: dict[str, Any] = {
        "region": opts.resolved_region() or "us-east-1",
        "connect_timeout": opts.connect_timeout_s,
        "request_timeout": opts.request_timeout_s,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=3),
    }
    if endpoint:
        parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise StorageError(f"S3 endpoint {display_uri(endpoint)!r}: expected http(s)://host[:port]")
        kwargs["endpoint_override"] = parts.netloc.rsplit("@", 1)[-1]
        kwargs["scheme"] = parts.scheme
    # No access/secret keys here on purpose: pyarrow reads the standard AWS chain itself.
    return pafs.S3FileSystem(**kwargs)


S3_URI_QUERY_KEYS = ("endpoint_override", "scheme", "region")


def resolve(uri: str, options: StorageOptions | None = None) -> Location:
    """Turn a path or ``file://`` / ``s3://`` URI into a `Location`."""
    if not isinstance(uri, str) or not uri.strip():
        raise StorageError(f"storage URI {uri!r}: expected a path, file:// or s3://bucket/prefix")
    opts = options or StorageOptions()
    uri = uri.strip()
    if "://" not in uri:
        return Location(pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri)), "file", opts)
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):  # file://data/x would silently mean /x
            raise StorageError(
                f"storage URI {uri!r}: {parts.netloc!r} would be read as a host name; use file:///absolute/path or a plain (relative) path"
            )
        return Location(pafs.LocalFileSystem(), os.path.abspath(unquote(parts.path)), "file", opts)
    if scheme in ("s3", "s3a"):
        if parts.username or parts.password:
            raise StorageError(
                f"storage URI {display_uri(uri)!r} embeds credentials; remove them and use the AWS "
                "environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws or an instance role)"
            )
        bucket = parts.netloc  # not .hostname: that lower-cases and drops a port, hiding a typo
        if not re.fullmatch(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]", bucket):
            raise StorageError(
                f"storage URI {display_uri(uri)!r}: {bucket!r} is not a valid S3 bucket name "
                "(3-63 lower-case letters, digits, dots and hyphens; an endpoint goes in "
                "?endpoint_override= or AWS_ENDPOINT_URL)"
            )
        given = parse_qs(parts.query, keep_blank_values=True)
        unknown = sorted(set(given) - set(S3_URI_QUERY_KEYS))
        if unknown:
            raise StorageError(f"storage URI {display_uri(uri)!r}: unknown query key(s) {unknown}; allowed: {', '.join(S3_URI_QUERY_KEYS)}")
        query = {k: v[-1] for k, v in given.items()}
        if query:
            opts = replace(opts, extra=tuple(sorted({**dict(opts.extra), **query}.items())))
        path = f"{bucket}/{parts.path.strip('/')}".rstrip("/")
        return Location(_s3_filesystem(opts), path, "s3", opts)
    raise StorageError(f"storage URI {display_uri(uri)!r}: scheme {scheme!r} is not supported (allowed: a local path, file://, s3://)")


def s3_client(options: StorageOptions | None = None) -> Any:
    """A boto3 S3 client for the same endpoint and region (for bucket-level calls pyarrow lacks)."""
    import boto3  # local import: only S3 users pay for it

    opts = options or StorageOptions()
    endpoint = opts.resolved_endpoint()
    if endpoint and "://" not in endpoint:
        endpoint = f"https://{endpoint}"
    return boto3.client("s3", endpoint_url=endpoint, region_name=opts.resolved_region() or "us-east-1")


# ------------------------------------------------------------------ secrets


def display_uri(uri: str) -> str:
    """The URI without user info or query string, safe to print or save."""
    if "://" not in uri:
        return uri
    parts = urlsplit(uri)
    host = parts.netloc.rsplit("@", 1)[-1]
    return f"{parts.scheme}://{host}{parts.path}"


def redact(text: str) -> str:
    """Remove credential values (from the environment) and URI user info from a message."""
    out = str(text)
    for name in SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            out = out.replace(value, "***")
    out = re.sub(r"(\w+://)[^/@\s]+@", r"\1***@", out)
    return out


def forwardable_env() -> dict[str, str]:
    """The AWS_* settings (endpoint, region, profile...) every node of a run needs, without a credential."""
    return {k: v for k, v in os.environ.items() if k.startswith("AWS_") and k not in SECRET_ENV}


# ------------------------------------------------------------------ retries

# Markers pyarrow (AWS SDK) and botocore put in messages of errors worth retrying.
_TRANSIENT_MARKERS = (
    "NETWORK_CONNECTION",
    "curlCode",
    "SLOW_DOWN",
    "SlowDown",
    "SERVICE_UNAVAILABLE",
    "ServiceUnavailable",
    "INTERNAL_FAILURE",
    "InternalError",
    "REQUEST_TIMEOUT",
    "RequestTimeout",
    "THROTTLING",
    "Throttling",
    "Connection reset",
    "Connection refused",
    "timed out",
    "Could not connect",
)


def is_transient(exc: BaseException) -> bool:
    """True for errors that a later attempt may not see (network, throttling, 5xx)."""
    if isinstance(exc, (StorageError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False  # StorageError: already retried by an inner with_retries
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    name = type(exc).__name__
    if name in ("EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError"):
        return True
    if isinstance(exc, OSError) or name == "ClientError":
        return any(m in str(exc) for m in _TRANSIENT_MARKERS)
    return False


def with_retries(fn: Callable[[], T], *, what: str, options: StorageOptions | None = None) -> T:
    """Run ``fn``; retry transient storage errors with exponential backoff and jitter.

    ``what`` names the operation for the final error ("writing shard s3://b/p/shard-00003.parquet").
    """
    opts = options or StorageOptions()
    delay = opts.backoff_s
    for attempt in range(1, max(1, opts.max_attempts) + 1):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified right below
            if not is_transient(e):
                msg = str(e)
                if isinstance(e, OSError) and ("HTTP status 301" in msg or "PermanentRedirect" in msg):
                    raise StorageError(
                        f"{what}: the bucket is in another region ({redact(msg).splitlines()[0]}); "
                        "set data.s3_region / --s3-region / AWS_REGION to the bucket's region"
                    ) from None
                raise
            if attempt >= opts.max_attempts:
                raise TransientStorageError(f"{what}: storage unreachable after {attempt} attempts ({redact(str(e)).splitlines()[0]})") from None
            time.sleep(delay * (0.75 + 0.5 * random.random()))
            delay = min(delay * 2, opts.backoff_max_s)
    raise AssertionError("unreachable")


# ------------------------------------------------------------------ small file helpers


def read_bytes(loc: Location, path: str) -> bytes:
    """Whole file at ``path`` (a path on ``loc.fs``), with retries."""

    def _read() -> bytes:
        with loc.fs.open_input_stream(path) as f:
            return f.read()

    return with_retries(_read, what=f"reading {_show(loc, path)}", options=loc.options)


def write_bytes(loc: Location, path: str, data: bytes) -> None:
    """Write ``data`` so that readers never see a partial file.

    Local: write a temporary sibling, then rename (atomic on POSIX).  S3: an object only
    appears when its upload completes, so a direct write is already all-or-nothing.
    """

    def _write() -> None:
        parent = path.rsplit("/", 1)[0]
        if loc.scheme == "file":
            loc.fs.create_dir(parent, recursive=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                with loc.fs.open_output_stream(tmp) as f:
                    f.write(data)
                loc.fs.move(tmp, path)
            finally:
                if loc.fs.get_file_info(tmp).type != pafs.FileType.NotFound:
                    loc.fs.delete_file(tmp)
        else:
            with loc.fs.open_output_stream(path) as f:
                f.write(data)

    with_retries(_write, what=f"writing {_show(loc, path)}", options=loc.options)


def file_info(loc: Location, path: str) -> pafs.FileInfo:
    return with_retries(lambda: loc.fs.get_file_info(path), what=f"looking up {_show(loc, path)}", options=loc.options)


def exists(loc: Location, path: str) -> bool:
    return file_info(loc, path).type != pafs.FileType.NotFound


def list_files(loc: Location, path: str | None = None) -> list[pafs.FileInfo]:
    """Every file below ``path`` (default: the location itself), recursively, sorted by path."""
    base = path or loc.path
    sel = pafs.FileSelector(base, recursive=True, allow_not_found=True)
    infos = with_retries(lambda: loc.fs.get_file_info(sel), what=f"listing {_show(loc, base)}", options=loc.options)
    return sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path)


def delete_file(loc: Location, path: str) -> None:
    def _delete() -> None:
        try:
            loc.fs.delete_file(path)
        except FileNotFoundError:
            pass

    with_retries(_delete, what=f"deleting {_show(loc, path)}", options=loc.options)


def check_writable(loc: Location) -> None:
    """Fail early, with a clear message, when nothing can be written at ``loc``."""
    probe = loc.join(f".raydino-write-test-{uuid.uuid4().hex[:8]}")
    try:
        if loc.scheme == "file":
            loc.fs.create_dir(loc.path, recursive=True)
        write_bytes(loc, probe, b"ok")
        delete_file(loc, probe)
    except TransientStorageError as e:
        hint = " Check the endpoint (--s3-endpoint / data.s3_endpoint / AWS_ENDPOINT_URL) and the network." if loc.scheme == "s3" else ""
        raise TransientStorageError(f"destination {loc.uri} is unreachable: {str(e).split(': ', 1)[-1]}{hint}") from None
    except Exception as e:  # noqa: BLE001 - turned into one clear message
        hint = ""
        if loc.scheme == "s3":
            hint = " (does the bucket exist, and do the AWS credentials allow writing to it?)"
        raise StorageError(f"destination {loc.uri} is not writable: {redact(str(e)).splitlines()[0]}{hint}") from None


def _show(loc: Location, path: str) -> str:
    return path if loc.scheme == "file" else f"s3://{path}"
