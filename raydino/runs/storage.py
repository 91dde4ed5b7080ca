"""Where a pretraining run lives (local directory, s3:// or gs://), and the embedded default dataset.

No Ray here: the recipe asks this module for paths and filesystems and hands them to Ray Train.
Only the URI, endpoints and region travel to workers; credentials stay in each node's own chain
(AWS's, or Google's Application Default Credentials).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from raydino.config import Config, ConfigError
from raydino.data import storage as st
from raydino.runs.tracking import plot_loss


@dataclass
class RunStorage:
    location: st.Location
    endpoint: str | None = None
    region: str | None = None
    gcs_endpoint: str | None = None
    # (size, mtime) of each log file at its last upload: a checkpoint re-uploads only what changed.
    uploaded: dict[str, tuple[int, int]] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def open(cls, uri: str, endpoint: str | None = None, region: str | None = None, gcs_endpoint: str | None = None) -> RunStorage:
        """`endpoint` / `region`: S3's (data.s3_endpoint, data.s3_region); `gcs_endpoint`: GCS's (data.gcs_endpoint)."""
        try:
            loc = st.resolve(uri, st.StorageOptions(endpoint=endpoint, region=region, gcs_endpoint=gcs_endpoint))
        except st.StorageError as e:
            raise ConfigError(f"run.storage={st.display_uri(uri)!r}: {e}") from None
        return cls(loc, endpoint, region, gcs_endpoint)

    @classmethod
    def for_config(cls, uri: str, cfg: Config) -> RunStorage:
        """`open` with the storage endpoints and region of `cfg.data`."""
        return cls.open(uri, cfg.data.s3_endpoint, cfg.data.s3_region, cfg.data.gcs_endpoint)

    @property
    def uri(self) -> str:
        return self.location.uri

    @property
    def is_remote(self) -> bool:
        return self.location.is_remote

    @property
    def filesystem(self) -> pafs.FileSystem:
        return self.location.fs

    @property
    def train_storage_path(self) -> str:
        """What Ray Train's RunConfig.storage_path takes: an absolute local path or bucket/prefix."""
        return self.location.path

    def exists(self, name: str) -> bool:
        return st.exists(self.location, self.location.join(name))

    def latest_run(self) -> str | None:
        """The run whose newest file is the most recent (for --resume without --name)."""
        newest: dict[str, float] = {}
        for info in st.list_files(self.location):
            rel = info.path[len(self.location.path) :].strip("/")
            if "/" in rel and info.mtime is not None:
                run = rel.split("/", 1)[0]
                newest[run] = max(newest.get(run, 0.0), info.mtime.timestamp())
        return max(newest, key=newest.get) if newest else None

    def folders(self, name: str) -> set[str]:
        """Names of the folders directly inside run (or experiment) `name` that hold files."""
        base = self.location.join(name)
        return {
            info.path[len(base) :].strip("/").split("/", 1)[0]
            for info in st.list_files(self.location, base)
            if "/" in info.path[len(base) :].strip("/")
        }

    def check_writable(self, name: str) -> None:
        try:
            st.check_writable(self.location.child(name))
        except st.StorageError as e:
            raise ConfigError(f"run.storage={self.uri!r}: {e}") from None

    def write_text(self, name: str, filename: str, text: str) -> None:
        st.write_bytes(self.location, self.location.join(name, filename), text.encode())

    def read_text(self, name: str, filename: str) -> str | None:
        path = self.location.join(name, filename)
        return st.read_bytes(self.location, path).decode() if st.exists(self.location, path) else None

    def delete(self, name: str, filename: str) -> None:
        st.delete_file(self.location, self.location.join(name, filename))

    def local_log_dir(self, name: str) -> Path:
        """Rank 0 writes metrics here: the run directory itself when local, a staging dir otherwise."""
        if self.is_remote:
            where = hashlib.sha256(self.location.uri_of(name).encode()).hexdigest()[:10]
            return Path(tempfile.gettempdir()) / "raydino-logs" / f"{name}-{where}"
        return Path(self.location.join(name, "logs"))

    def upload_logs(self, name: str, local_dir: str | Path) -> int:
        """Copy rank 0's staged log files (metrics.jsonl, TensorBoard events) into the remote run: those
        new or changed since this object's last upload (by size and mtime).  Returns how many were copied."""
        local_dir = Path(local_dir)
        copied = 0
        for f in sorted(local_dir.rglob("*")):
            if not f.is_file():
                continue
            rel = f.relative_to(local_dir).as_posix()
            stat = f.stat()
            if self.uploaded.get(rel) == (stat.st_size, stat.st_mtime_ns):
                continue
            st.write_bytes(self.location, self.location.join(name, "logs", rel), f.read_bytes())
            self.uploaded[rel] = (stat.st_size, stat.st_mtime_ns)
            copied += 1
        return copied

    def prepare_logs(self, name: str, local_dir: str | Path, resume_step: int) -> None:
        """Before rank 0 logs: keep only the metrics up to the step training (re)starts from.

        A restarted or resumed run trains the steps after its checkpoint again; their old lines
        would otherwise appear twice in metrics.jsonl and zig-zag the loss plot.  For remote runs
        the staging directory may be on a fresh node, so the stored metrics are fetched first.
        """
        local = Path(local_dir) / "metrics.jsonl"
        if self.is_remote and resume_step == 0:
            shutil.rmtree(local_dir, ignore_errors=True)  # staging left by an earlier run of this name
        text = self.read_text(name, "logs/metrics.jsonl") if self.is_remote else None
        if text is None and local.exists():
            text = local.read_text()
        if text is None:
            return
        # From step 0 nothing is kept: the starting point's probe (step 0) is logged again as well.
        kept = [line for line in text.splitlines() if line.strip() and 0 < _step_of(line) <= resume_step]
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text("".join(line + "\n" for line in kept))

    def checkpoint_uri(self, checkpoint: Any) -> str | None:
        """Where a Ray Train checkpoint lives, as a URI (Ray drops the s3:// / gs:// of remote paths)."""
        if checkpoint is None:
            return None
        path = str(checkpoint.path)
        return path if not self.is_remote or "://" in path else f"{self.location.scheme}://{path.lstrip('/')}"

    def finish_logs(self, name: str, local_dir: str | Path) -> str | None:
        """Plot the loss curve beside metrics.jsonl, wherever the run lives; returns its URI."""
        text = self.read_text(name, "logs/metrics.jsonl")
        if text is None:
            return None
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "metrics.jsonl").write_text(text)
            png = plot_loss(Path(tmp) / "metrics.jsonl", Path(tmp) / "loss.png", title=f"DINO pretraining: {name}")
            if png is None:
                return None
            target = self.location.join(name, "logs", "loss.png")
            st.write_bytes(self.location, target, png.read_bytes())
        return self.location.uri_of(name, "logs", "loss.png")

    def to_dict(self, name: str) -> dict[str, Any]:
        return {"uri": self.location.uri, "endpoint": self.endpoint, "region": self.region, "gcs_endpoint": self.gcs_endpoint}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunStorage:
        return cls.open(d["uri"], d.get("endpoint"), d.get("region"), d.get("gcs_endpoint"))


def _step_of(line: str) -> float:
    try:
        return float(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return float("inf")  # a torn last line (killed mid-write): drop it


def ensure_dataset(cfg: Config, cache: Path) -> str:
    """The embedded default: synthetic fundus images, sharded locally, cached by their parameters."""
    from raydino.data.fundus import LesionScale
    from raydino.data.synth import synthetic_shards

    d = cfg.data
    lesions = LesionScale(d.synthetic_lesion_size, d.synthetic_lesion_count)
    return synthetic_shards(
        d.synthetic_n, d.synthetic_size, d.synthetic_seed, cache_root=str(cache / "synthetic"), task=d.synthetic_task,
        lesions=lesions, split_fractions=d.synthetic_splits,
    )  # fmt: skip


def open_dataset(uri: str, cfg: Config, check_sizes: bool = False) -> Any:
    """The shard set at `uri` (manifest read and validated), or a ConfigError saying what to do.
    `check_sizes`: the pretraining shards must also be there at their manifest sizes (one listing)."""
    from raydino.data.loader import PRETRAIN_SPLITS
    from raydino.data.shards import ShardError, open_shards

    opts = st.StorageOptions.from_config(cfg.data)
    try:
        shards = open_shards(uri, opts)
    except ShardError as e:
        raise ConfigError(f"data.uri={st.display_uri(uri)!r}: {e}; make shards with `python -m raydino.shard IMAGES DEST`") from None
    except st.StorageError as e:
        raise ConfigError(f"data.uri={st.display_uri(uri)!r}: {e}") from None
    if check_sizes:
        try:
            shards.check_sizes(PRETRAIN_SPLITS)
        except (ShardError, st.StorageError) as e:
            raise ConfigError(f"data.uri={st.display_uri(uri)!r}: {e}") from None
    return shards
