"""Where data lives: a URI becomes a pyarrow filesystem plus a path on it.

Every raydino location is one of (`REMOTE_SCHEMES` is the table of object stores)

* a plain path (``data/shards``) or ``file:///abs/path`` -> ``pyarrow.fs.LocalFileSystem``
* ``s3://bucket/prefix``                                 -> ``pyarrow.fs.S3FileSystem``
* ``gs://bucket/prefix`` (Google Cloud Storage)          -> ``pyarrow.fs.GcsFileSystem``

S3-compatible endpoints (MinIO, Ceph, moto, ...) come from, in order: an explicit
``StorageOptions.endpoint`` (the config field ``data.s3_endpoint``), the URI query
(``s3://b/p?endpoint_override=host:port&scheme=http``), then the standard AWS variables
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``.  A GCS endpoint (an emulator, a private endpoint)
comes from ``StorageOptions.gcs_endpoint`` (``data.gcs_endpoint``), the URI query, then
``STORAGE_EMULATOR_HOST`` (the variable Google's own clients read); none means storage.googleapis.com.
Credentials are never passed around by raydino: pyarrow and boto3 read the standard AWS chain
(environment, ``~/.aws``, instance role), pyarrow's GCS client Google's Application Default
Credentials (``GOOGLE_APPLICATION_CREDENTIALS``, ``gcloud auth application-default login``, the VM's
service account), so they cannot end up in a manifest, a log line or a pickled task.  A plain-http
GCS endpoint (an emulator) is reached anonymously: no token ever travels unencrypted.  Text that
might contain credentials (error messages, URIs) goes through `redact` / `display_uri` before it is shown.

pyarrow already retries S3 and GCS requests (``retry_strategy``, ``retry_time_limit``); `with_retries`
adds a second, slower layer with exponential backoff around whole operations (one shard upload, one
file read) so that a short outage of the endpoint does not end a long job, while a long one ends
it with a message that says what failed and that rerunning resumes.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import pyarrow.fs as pafs

T = TypeVar("T")

# The one list of credential variables: `redact` hides their values, `forwardable_env` never sends
# them to other nodes (each node reads its own credential chain).  AWS_SECURITY_TOKEN is the older
# name of AWS_SESSION_TOKEN that boto and some SDKs still read.  GOOGLE_OAUTH_ACCESS_TOKEN (an OAuth
# token) and GOOGLE_CREDENTIALS (a service-account key's JSON itself) are how some Google tools take
# credentials in the environment; raydino reads neither, but never shows or forwards them.
SECRET_ENV = (
    "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ACCESS_KEY_ID",
    "GOOGLE_OAUTH_ACCESS_TOKEN", "GOOGLE_CREDENTIALS",
)  # fmt: skip

# Non-secret settings every node of a run needs to reach the same storage: every AWS_* variable but
# the secrets above, and these (a GCS emulator; where the service-account key file is, which must then
# exist at that path on every node; the project).
FORWARD_ENV_PREFIXES = ("AWS_",)
FORWARD_ENV = (
    "STORAGE_EMULATOR_HOST", "CLOUD_STORAGE_EMULATOR_ENDPOINT", "GOOGLE_APPLICATION_CREDENTIALS",
    "GOOGLE_CLOUD_PROJECT", "CLOUDSDK_CORE_PROJECT",
)  # fmt: skip


class StorageError(OSError):
    """A storage operation failed for good (after retries, or not worth retrying)."""


class TransientStorageError(StorageError):
    """The endpoint stayed unreachable or overloaded through every retry."""


@dataclass(frozen=True)
class StorageOptions:
    """How to reach object storage.  Picklable and free of secrets by construction."""

    endpoint: str | None = None  # S3, e.g. "http://127.0.0.1:9000"; None: AWS_ENDPOINT_URL(_S3) or AWS
    region: str | None = None  # S3; None: AWS_REGION / AWS_DEFAULT_REGION, else us-east-1
    gcs_endpoint: str | None = None  # GCS, e.g. "http://127.0.0.1:9023"; None: STORAGE_EMULATOR_HOST or Google
    max_attempts: int = 5  # raydino-level attempts per operation (each has pyarrow's own retries)
    backoff_s: float = 0.5  # first wait; doubles each attempt, capped by backoff_max_s
    backoff_max_s: float = 8.0
    connect_timeout_s: float = 5.0
    request_timeout_s: float = 60.0
    # From the URI query (endpoint_override, scheme, region); pairs, so the options stay hashable.
    extra: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_config(cls, data_cfg: Any, **kw: Any) -> StorageOptions:
        """Build from a `raydino.config.DataConfig` (fields s3_endpoint, s3_region, gcs_endpoint) or its dict."""
        get = data_cfg.get if isinstance(data_cfg, dict) else lambda k: getattr(data_cfg, k, None)
        return cls(endpoint=get("s3_endpoint"), region=get("s3_region"), gcs_endpoint=get("gcs_endpoint"), **kw)

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

    def resolved_gcs_endpoint(self) -> str | None:
        """The GCS endpoint as scheme://host[:port], or None (storage.googleapis.com).  STORAGE_EMULATOR_HOST
        without a scheme is plain http, as Google's clients read it."""
        extra = dict(self.extra)
        if self.gcs_endpoint:
            return self.gcs_endpoint if "://" in self.gcs_endpoint else f"https://{self.gcs_endpoint}"
        if "endpoint_override" in extra:
            return f"{extra.get('scheme', 'https')}://{extra['endpoint_override']}"
        env = os.environ.get("STORAGE_EMULATOR_HOST")
        if env:
            return env if "://" in env else f"http://{env}"
        return None


@dataclass(frozen=True)
class Location:
    """A directory-like place on a filesystem: ``fs`` + ``path`` (no scheme, no trailing slash)."""

    fs: pafs.FileSystem
    path: str
    scheme: str  # "file", or a key of REMOTE_SCHEMES ("s3", "gs")
    options: StorageOptions

    @property
    def is_remote(self) -> bool:
        return self.scheme != "file"

    @property
    def uri(self) -> str:
        """Display-safe URI of this location."""
        return self.path if self.scheme == "file" else f"{self.scheme}://{self.path}"

    def join(self, *parts: str) -> str:
        """Path on ``fs`` of a child (``parts`` are POSIX-relative)."""
        rel = "/".join(p.strip("/") for p in parts if p)
        return f"{self.path.rstrip('/')}/{rel}" if rel else self.path

    def child(self, *parts: str) -> Location:
        return replace(self, path=self.join(*parts))

    def uri_of(self, *parts: str) -> str:
        p = self.join(*parts)
        return p if self.scheme == "file" else f"{self.scheme}://{p}"


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


def _gcs_filesystem(opts: StorageOptions) -> pafs.GcsFileSystem:
    # google-cloud-cpp retries transient errors itself for up to retry_time_limit (its default is 15
    # minutes, which would hide an outage from `with_retries`); one connection timeout's worth here, so
    # each `with_retries` attempt lasts about as long as an S3 one.
    kwargs: dict[str, Any] = {"retry_time_limit": timedelta(seconds=max(1.0, opts.connect_timeout_s))}
    endpoint = opts.resolved_gcs_endpoint()
    if endpoint:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path.strip("/"):
            raise StorageError(f"GCS endpoint {display_uri(endpoint)!r}: expected http(s)://host[:port]")
        kwargs["endpoint_override"] = parts.netloc.rsplit("@", 1)[-1]
        kwargs["scheme"] = parts.scheme
        # Plain http is an emulator's: no token is ever sent unencrypted (emulators take none).
        kwargs["anonymous"] = parts.scheme == "http"
    # No token here on purpose: pyarrow reads Application Default Credentials itself.
    return pafs.GcsFileSystem(**kwargs)


def _s3_bucket_ok(name: str) -> bool:
    return re.fullmatch(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]", name) is not None


def _gcs_bucket_ok(name: str) -> bool:
    # https://cloud.google.com/storage/docs/buckets#naming: 3-63 characters, or up to 222 with dots
    # (each dot-separated part at most 63).
    return (
        re.fullmatch(r"[a-z0-9][a-z0-9._\-]*[a-z0-9]", name) is not None
        and 3 <= len(name) <= (222 if "." in name else 63)
        and all(0 < len(part) <= 63 for part in name.split("."))
    )


@dataclass(frozen=True)
class RemoteScheme:
    """One kind of object storage: how its URIs are checked, its filesystem built, its errors explained."""

    name: str  # the URI scheme raydino writes: "s3", "gs"
    aliases: tuple[str, ...]  # other spellings accepted on input ("s3a", "gcs")
    label: str  # for messages: "S3", "GCS"
    filesystem: Callable[[StorageOptions], pafs.FileSystem]
    bucket_ok: Callable[[str], bool]
    bucket_rule: str  # what a valid bucket name is, for the error that refuses one
    query_keys: tuple[str, ...]  # what a URI's ?query may set
    credentials: str  # where credentials come from (never from raydino's arguments)
    endpoint_settings: str  # where a custom endpoint is set


# The object stores raydino speaks.  A new one is a row here (plus its filesystem factory).
REMOTE_SCHEMES: dict[str, RemoteScheme] = {
    "s3": RemoteScheme(
        "s3", ("s3a",), "S3", _s3_filesystem, _s3_bucket_ok,
        "3-63 lower-case letters, digits, dots and hyphens",
        ("endpoint_override", "scheme", "region"),
        "the AWS environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws or an instance role)",
        "--s3-endpoint / data.s3_endpoint / AWS_ENDPOINT_URL",
    ),
    "gs": RemoteScheme(
        "gs", ("gcs",), "GCS", _gcs_filesystem, _gcs_bucket_ok,
        "3-63 lower-case letters, digits, hyphens, underscores and dots (up to 222 with dots)",
        ("endpoint_override", "scheme"),
        "Application Default Credentials (GOOGLE_APPLICATION_CREDENTIALS, "
        "`gcloud auth application-default login` or the VM's service account)",
        "--gcs-endpoint / data.gcs_endpoint / STORAGE_EMULATOR_HOST",
    ),
}  # fmt: skip
_SCHEME_OF = {alias: spec for spec in REMOTE_SCHEMES.values() for alias in (spec.name, *spec.aliases)}
S3_URI_QUERY_KEYS = REMOTE_SCHEMES["s3"].query_keys
ALLOWED = "a local path, file://, " + ", ".join(f"{k}://" for k in REMOTE_SCHEMES)


def remote_scheme(scheme: str) -> RemoteScheme | None:
    """The table row of a URI scheme (its aliases included), None for file or an unknown one."""
    return _SCHEME_OF.get(scheme.lower())


def resolve(uri: str, options: StorageOptions | None = None) -> Location:
    """Turn a path or ``file://`` / ``s3://`` / ``gs://`` URI into a `Location`."""
    if not isinstance(uri, str) or not uri.strip():
        raise StorageError(f"storage URI {uri!r}: expected a path, file:///abs/path, {', '.join(f'{k}://bucket/prefix' for k in REMOTE_SCHEMES)}")
    opts = options or StorageOptions()
    uri = uri.strip()
    if "://" not in uri:
        typo = re.match(r"([A-Za-z][A-Za-z0-9+.\-]+):/*", uri)  # gs:/bucket, s3:bucket (a drive letter C: is one letter)
        if typo and (typo.group(1).lower() == "file" or remote_scheme(typo.group(1))):
            raise StorageError(
                f"storage URI {display_uri(uri)!r}: {typo.group(1)}: needs two slashes "
                f"({typo.group(1)}://{uri[typo.end() :] or 'bucket/prefix'}); a local folder of that name would be ./{uri}"
            )
        return Location(pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri)), "file", opts)
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):  # file://data/x would silently mean /x
            raise StorageError(
                f"storage URI {uri!r}: {parts.netloc!r} would be read as a host name; use file:///absolute/path or a plain (relative) path"
            )
        return Location(pafs.LocalFileSystem(), os.path.abspath(unquote(parts.path)), "file", opts)
    spec = remote_scheme(scheme)
    if spec is None:
        raise StorageError(f"storage URI {display_uri(uri)!r}: scheme {scheme!r} is not supported (allowed: {ALLOWED})")
    if parts.username or parts.password:
        raise StorageError(f"storage URI {display_uri(uri)!r} embeds credentials; remove them and use {spec.credentials}")
    bucket = parts.netloc  # not .hostname: that lower-cases and drops a port, hiding a typo
    if not bucket:
        raise StorageError(f"storage URI {display_uri(uri)!r}: no bucket; expected {spec.name}://bucket/prefix")
    if not spec.bucket_ok(bucket):
        raise StorageError(
            f"storage URI {display_uri(uri)!r}: {bucket!r} is not a valid {spec.label} bucket name "
            f"({spec.bucket_rule}; an endpoint goes in ?endpoint_override= or {spec.endpoint_settings.rsplit(' / ', 1)[-1]})"
        )
    given = parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(given) - set(spec.query_keys))
    if unknown:
        # Only the key names: a value (access_token=...) is never echoed.
        raise StorageError(f"storage URI {display_uri(uri)!r}: unknown query key(s) {unknown}; allowed: {', '.join(spec.query_keys)}")
    query = {k: v[-1] for k, v in given.items()}
    if query:
        opts = replace(opts, extra=tuple(sorted({**dict(opts.extra), **query}.items())))
    path = f"{bucket}/{parts.path.strip('/')}".rstrip("/")
    return Location(spec.filesystem(opts), path, spec.name, opts)


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
    # Google OAuth access tokens (ya29.…), a token in a query string, an Authorization header's value.
    out = re.sub(r"\bya29\.[\w\-.~+/]+=*", "ya29.***", out)
    out = re.sub(r"((?:access_token|token|signature|X-Goog-Signature)=)[^&\s'\"]+", r"\1***", out, flags=re.IGNORECASE)
    out = re.sub(r"(Bearer\s+)[\w\-.~+/]+=*", r"\1***", out)
    return out


def forwardable_env() -> dict[str, str]:
    """The storage settings (endpoint, region, profile, emulator, project...) every node of a run needs,
    without a credential: `FORWARD_ENV_PREFIXES` and `FORWARD_ENV`, less `SECRET_ENV`."""
    return {
        k: v for k, v in os.environ.items()
        if (k.startswith(FORWARD_ENV_PREFIXES) or k in FORWARD_ENV) and k not in SECRET_ENV
    }  # fmt: skip


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
    # google-cloud-cpp (GCS) status codes of errors worth another attempt: 429, 5xx, timeouts, resets.
    "Status(UNAVAILABLE",
    "Status(DEADLINE_EXCEEDED",
    "Status(RESOURCE_EXHAUSTED",
    "Status(INTERNAL",
    "Status(ABORTED",
)


def brief_error(exc: BaseException) -> str:
    """The first line of an error, redacted; google-cloud-cpp's long ``google::cloud::Status(...)``
    (GCS) cut to its code and cause, e.g. ``GCS UNAVAILABLE (Could not connect to server)``."""
    text = redact(str(exc)).strip()
    text = text.splitlines()[0] if text else type(exc).__name__
    m = re.search(r"google::cloud::Status\((\w+):", text)
    if not m:
        return text
    curl = re.search(r"CURL error \[\d+\]=(.+?)(?= error_info=|\}|$)", text)
    http = re.search(r"HTTP status code: (\d+)|\"code\": (\d+)", text)
    cause = curl.group(1).strip() if curl else f"HTTP {http.group(1) or http.group(2)}" if http else ""
    return f"GCS {m.group(1)}" + (f" ({cause})" if cause else "")


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
                raise TransientStorageError(f"{what}: storage unreachable after {attempt} attempts ({brief_error(e)})") from None
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

    Local: write a temporary sibling, then rename (atomic on POSIX).  S3 and GCS: an object only
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
    """Fail early, with a clear message, when nothing can be written at ``loc``; leaves nothing behind
    (local folders it had to create are removed again, so a run refused later leaves no empty folder)."""
    probe = loc.join(f".raydino-write-test-{uuid.uuid4().hex[:8]}")
    created: list[Path] = []
    try:
        if loc.scheme == "file":
            created = [d for d in [Path(loc.path), *Path(loc.path).parents] if not d.exists()]
            loc.fs.create_dir(loc.path, recursive=True)
        write_bytes(loc, probe, b"ok")
        delete_file(loc, probe)
    except TransientStorageError as e:
        spec = REMOTE_SCHEMES.get(loc.scheme)
        hint = f" Check the endpoint ({spec.endpoint_settings}) and the network." if spec else ""
        raise TransientStorageError(f"destination {loc.uri} is unreachable: {str(e).split(': ', 1)[-1]}{hint}") from None
    except Exception as e:  # noqa: BLE001 - turned into one clear message
        spec, reason = REMOTE_SCHEMES.get(loc.scheme), brief_error(e)
        if spec is None:
            raise StorageError(f"destination {loc.uri} is not writable: {reason}") from None
        bucket = loc.path.split("/", 1)[0]
        if isinstance(e, FileNotFoundError):  # a write answered 404: no such bucket
            hint = f"bucket {bucket!r} not found ({reason}): does the bucket exist under that name? Create it, or correct the URI"
        else:
            hint = f"{reason}; does the bucket exist, and may these credentials write to it? {spec.label} credentials come from {spec.credentials}"
        raise StorageError(f"destination {loc.uri} is not writable: {hint}") from None
    finally:
        for d in created:  # deepest first; a folder holding anything stays
            with contextlib.suppress(OSError):
                d.rmdir()


def _show(loc: Location, path: str) -> str:
    return path if loc.scheme == "file" else f"{loc.scheme}://{path}"
