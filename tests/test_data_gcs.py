"""Data, run storage and pretraining on Google Cloud Storage (gs://), against a real GCS emulator.

No mocks: pyarrow's GcsFileSystem (google-cloud-cpp) talks the GCS JSON API over HTTP to
gcp-storage-emulator on 127.0.0.1 (tests/conftest.py's `gcs`, its own process, one for this module).
Stopping that server mid-run is a real outage; `gcs.fail_next` makes it answer 429 / 503 / 403.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

pytest.importorskip("gcp_storage_emulator")
from raydino.data import storage as st  # noqa: E402
from raydino.data.shards import open_shards  # noqa: E402
from raydino.data.synth import generate_dataset  # noqa: E402
from raydino.data.writer import ShardingError, ShardJobOptions, shard_dataset  # noqa: E402
from raydino.runs.storage import RunStorage  # noqa: E402

from helpers.gcs import LoopbackGCS  # noqa: E402
from helpers.recipes import run_recipe  # noqa: E402

BUCKET = "raydino-gcs-test"
N_IMAGES = 30
# Fake secrets that must never show up anywhere (an OAuth token, a service-account key's JSON).
TOKEN = "ya29.a0RaydinoFakeTokenQz81"
KEY_JSON = '{"type": "service_account", "private_key": "-----BEGIN PRIVATE KEY-----RAYDINOFAKEKEY"}'

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gcssrc") / "tree"
    generate_dataset(str(root), N_IMAGES, 48, seed=5, workers=1, progress=False)
    return root


def _opts(gcs: LoopbackGCS, **kw) -> st.StorageOptions:
    return st.StorageOptions(**{"gcs_endpoint": gcs.endpoint, "max_attempts": 2, "backoff_s": 0.05, "connect_timeout_s": 1, **kw})


def _expected(source: Path) -> dict[str, tuple[bytes, str, str]]:
    return {r["path"]: ((source / r["path"]).read_bytes(), r["label"], r["split"]) for r in csv.DictReader(open(source / "labels.csv"))}


def _rows(ds) -> dict[str, tuple[bytes, str, str]]:
    return {r["id"]: (r["image"], r["label"], r["split"]) for r in ds.iter_rows(columns=["id", "image", "label", "split"])}


def test_shard_to_gcs_verify_and_read_back_as_a_local_shard(gcs, source, tmp_path, monkeypatch):
    job = ShardJobOptions(target_shard_mb=0.02, workers=2, progress=False)
    summary = shard_dataset(str(source), f"gs://{BUCKET}/run1", options=job, storage_options=_opts(gcs))
    assert summary.shards > 2 and summary.rows == N_IMAGES
    local = shard_dataset(str(source), str(tmp_path / "local"), options=job)
    ds = open_shards(f"gs://{BUCKET}/run1", _opts(gcs))
    assert ds.location.uri == f"gs://{BUCKET}/run1"
    assert ds.verify(deep=True)["rows"] == N_IMAGES  # every shard's size and sha256, every image's sha256
    assert _rows(ds) == _rows(open_shards(str(tmp_path / "local"))) == _expected(source)
    # The same shards, byte for byte, as the local run wrote (the manifest's checksums agree).
    assert [s.sha256 for s in ds.manifest.shards] == [s.sha256 for s in open_shards(str(tmp_path / "local")).manifest.shards]
    assert local.shards == summary.shards
    stored = gcs.objects(BUCKET, "run1/")
    assert "run1/manifest.json" in stored and sum(k.startswith("run1/shards/") for k in stored) == summary.shards
    # Google's own emulator variable alone is enough to find the endpoint.
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"127.0.0.1:{gcs.port}")
    assert len(open_shards(f"gs://{BUCKET}/run1")) == N_IMAGES
    # A shard changed in the bucket is caught by its checksum.
    fs, name = gcs.filesystem(), f"{BUCKET}/run1/shards/shard-00001.parquet"
    body = bytearray(stored["run1/shards/shard-00001.parquet"])
    body[len(body) // 2] ^= 0xFF
    with fs.open_output_stream(name) as f:
        f.write(bytes(body))
    with pytest.raises(Exception, match=r"shard gs://raydino-gcs-test/run1/shards/shard-00001\.parquet: sha256 .* does not match"):
        open_shards(f"gs://{BUCKET}/run1").verify()


def test_outage_mid_run_fails_clearly_and_rerun_completes(gcs, source):
    dest = f"gs://{BUCKET}/run2"
    opts = ShardJobOptions(target_shard_mb=0.02, workers=1, progress=False)

    def outage_after_two_shards(index: int, receipt: dict) -> None:
        if index == 1:
            gcs.stop()

    try:
        with pytest.raises(ShardingError) as err:
            shard_dataset(str(source), dest, options=opts, storage_options=_opts(gcs), on_shard_written=outage_after_two_shards)
    finally:
        gcs.start()
    message = str(err.value)
    assert "gs://raydino-gcs-test/run2/shards/shard-00002.parquet" in message and "rerun the same command to resume" in message

    summary = shard_dataset(str(source), dest, options=opts, storage_options=_opts(gcs))
    assert summary.reused_shards == 2 and summary.written_shards == summary.shards - 2
    ds = open_shards(dest, _opts(gcs))
    ds.verify(deep=True)
    ids = [r["id"] for r in ds.iter_rows(columns=["id"])]
    assert len(ids) == len(set(ids)) == N_IMAGES  # no duplicate, no missing row


def test_rerun_trusts_finished_gcs_shards_without_downloading_them(gcs, source, monkeypatch):
    dest, opts = f"gs://{BUCKET}/run-again", ShardJobOptions(target_shard_mb=0.02, workers=1, progress=False)
    first = shard_dataset(str(source), dest, options=opts, storage_options=_opts(gcs))
    reads: list[str] = []
    real = st.read_bytes
    monkeypatch.setattr(st, "read_bytes", lambda loc, path: reads.append(path) or real(loc, path))
    again = shard_dataset(str(source), dest, options=opts, storage_options=_opts(gcs))
    assert again.reused_shards == first.shards and not [p for p in reads if "/shards/" in p], reads
    monkeypatch.undo()
    # Same size, other bytes (a bad copy into the bucket): a new object, so the shard is redone.
    fs, name = gcs.filesystem(), f"{BUCKET}/run-again/shards/shard-00001.parquet"
    with fs.open_input_stream(name) as f:
        body = bytearray(f.read())
    body[len(body) // 2] ^= 0xFF
    time.sleep(0.01)  # GCS times are in milliseconds
    with fs.open_output_stream(name) as f:
        f.write(bytes(body))
    redone = shard_dataset(str(source), dest, options=opts, storage_options=_opts(gcs))
    assert (redone.written_shards, redone.reused_shards) == (1, first.shards - 1)
    open_shards(dest, _opts(gcs)).verify(deep=True)


def test_throttling_and_5xx_are_retried_permission_and_missing_bucket_are_not(gcs):
    loc = st.resolve(f"gs://{BUCKET}/errors", _opts(gcs))
    st.write_bytes(loc, loc.join("a.txt"), b"hello")
    patient = st.resolve(f"gs://{BUCKET}/errors", _opts(gcs, max_attempts=4))
    for status in (429, 503):  # a few refusals: the client's own retries and `with_retries` ride them out
        gcs.fail_next(status, 3)
        assert st.read_bytes(patient, loc.join("a.txt")) == b"hello"
    gcs.fail_next(503, 10_000)  # an outage that outlasts every attempt: a transient error naming the object
    try:
        with pytest.raises(
            st.TransientStorageError, match=r"reading gs://raydino-gcs-test/errors/a\.txt: storage unreachable after 2 attempts \(GCS"
        ):
            st.read_bytes(loc, loc.join("a.txt"))
    finally:
        gcs.fail_next(503, 0)
    gcs.fail_next(403, 10_000)  # permission denied: permanent, so no retry (fails at once)
    try:
        started = time.monotonic()
        with pytest.raises(
            st.StorageError,
            match=r"gs://raydino-gcs-test/errors is not writable: GCS PERMISSION_DENIED \(HTTP 403\).*Application Default Credentials",
        ):
            st.check_writable(loc)
        assert time.monotonic() - started < 2
    finally:
        gcs.fail_next(403, 0)
    with pytest.raises(st.StorageError, match=r"gs://no-such-bucket-here/x is not writable: bucket 'no-such-bucket-here' not found"):
        st.check_writable(st.resolve("gs://no-such-bucket-here/x", _opts(gcs)))
    gcs.stop()
    try:
        with pytest.raises(st.TransientStorageError, match=r"is unreachable.*--gcs-endpoint / data\.gcs_endpoint / STORAGE_EMULATOR_HOST"):
            st.check_writable(loc)
    finally:
        gcs.start()


def test_run_storage_and_a_checkpoint_on_gcs(gcs, tmp_path, monkeypatch):
    from raydino.eval.backbones import fetch_checkpoint

    storage = RunStorage.open(f"gs://{BUCKET}/run-storage", gcs_endpoint=gcs.endpoint)
    assert storage.is_remote and storage.uri == f"gs://{BUCKET}/run-storage" and storage.train_storage_path == f"{BUCKET}/run-storage"
    storage.check_writable("r1")
    assert not storage.exists("r1")
    storage.write_text("r1", "config.yaml", "model: {}\n")
    assert storage.read_text("r1", "config.yaml") == "model: {}\n" and storage.exists("r1")
    staged = tmp_path / "staging"
    (staged / "tensorboard").mkdir(parents=True)
    (staged / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    (staged / "tensorboard" / "events.out").write_bytes(b"e1")
    assert storage.upload_logs("r1", staged) == 2 and storage.upload_logs("r1", staged) == 0
    storage.prepare_logs("r1", tmp_path / "fresh", resume_step=1)  # a resume at step 1 keeps step 1's line only
    assert (tmp_path / "fresh" / "metrics.jsonl").read_text() == '{"step": 1}\n'
    # A checkpoint directory as Ray Train leaves it, then fetched back the way `raydino.evaluate` does.
    ckpt = {"state.pt": bytes(range(256)) * 4000, "extra/meta.json": b'{"step": 4}'}
    for rel, data in ckpt.items():
        st.write_bytes(storage.location, storage.location.join("r1", "checkpoint_00000004", rel), data)
    assert storage.folders("r1") == {"checkpoint_00000004", "logs"}
    assert storage.latest_run() == "r1"

    class _Ckpt:  # what Ray Train hands back: the path without its gs://
        path = f"{BUCKET}/run-storage/r1/checkpoint_00000004"

    assert storage.checkpoint_uri(_Ckpt()) == f"gs://{BUCKET}/run-storage/r1/checkpoint_00000004"
    again = RunStorage.from_dict(storage.to_dict("r1"))  # what every worker opens
    assert again.read_text("r1", "config.yaml") == "model: {}\n"
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs.endpoint)
    local = fetch_checkpoint(f"gs://{BUCKET}/run-storage/r1", cache_dir=tmp_path / "cache")
    assert local.name == "checkpoint_00000004"
    assert {p.relative_to(local).as_posix(): p.read_bytes() for p in local.rglob("*") if p.is_file()} == ckpt


def test_cli_against_gcs_never_shows_credentials(gcs, source, tmp_path):
    env = {"STORAGE_EMULATOR_HOST": gcs.endpoint, "GOOGLE_OAUTH_ACCESS_TOKEN": TOKEN, "GOOGLE_CREDENTIALS": KEY_JSON}
    run = lambda *a, **kw: run_recipe("shard", *a, "--retries", "2", timeout=180, **{**env, **kw})  # noqa: E731
    ok = run(str(source), f"gs://{BUCKET}/cli", "--workers", "1", "--target-shard-mb", "0.05")
    assert ok.returncode == 0, ok.stderr
    assert run("--verify", f"gs://{BUCKET}/cli").returncode == 0
    no_bucket = run(str(source), "gs://no-such-bucket-here/x", "--workers", "1")
    assert no_bucket.returncode == 2 and "not writable" in no_bucket.stderr and "no-such-bucket-here" in no_bucket.stderr
    token_uri = run(str(source), f"gs://{BUCKET}/x?access_token={TOKEN}", "--workers", "1")
    assert token_uri.returncode == 2 and "unknown query key(s) ['access_token']" in token_uri.stderr
    typo = run(str(source), f"gs:/{BUCKET}/x", "--workers", "1")
    assert typo.returncode == 2 and "needs two slashes" in typo.stderr
    down = run(str(source), f"gs://{BUCKET}/down", "--workers", "1", STORAGE_EMULATOR_HOST="127.0.0.1:9")  # nothing listens
    assert down.returncode == 2 and "unreachable" in down.stderr and "STORAGE_EMULATOR_HOST" in down.stderr
    stored = b"".join(gcs.objects(BUCKET, "cli/").values())
    for text in (ok.stdout, ok.stderr, no_bucket.stderr, token_uri.stderr, typo.stderr, down.stderr, stored.decode("latin-1")):
        assert TOKEN not in text and "RAYDINOFAKEKEY" not in text
    manifest = json.loads(gcs.objects(BUCKET, "cli/")["cli/manifest.json"])
    assert sum(s["rows"] for s in manifest["shards"]) == N_IMAGES


# ---------------------------------------------------------------- pretraining on gs://, interrupted and resumed


@pytest.mark.timeout(420)
def test_pretraining_with_data_and_runs_on_gcs_resumes_from_its_gcs_checkpoint(gcs, tmp_path):
    """`python -m raydino.pretrain --data gs://... --storage gs://...` (its own local Ray, as a user runs it):
    stopped by Ctrl-C once a checkpoint is registered in the bucket, then the same command resumes from
    it and finishes; run 1 names the emulator in the config (data.gcs_endpoint), run 2 in
    STORAGE_EMULATOR_HOST, so both reach the Ray workers."""
    import torch

    from helpers.train_runs import latest_registered

    tree = tmp_path / "tree"
    generate_dataset(str(tree), 96, 64, seed=3, workers=1, progress=False)
    shard_dataset(str(tree), f"gs://{BUCKET}/e2e-data", options=ShardJobOptions(workers=1, progress=False), storage_options=_opts(gcs))
    cmd = [
        sys.executable, "-m", "raydino.pretrain", "--config", "smoke", "--data", f"gs://{BUCKET}/e2e-data",
        "--storage", f"gs://{BUCKET}/runs", "--name", "r1", "--no-probe",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONUNBUFFERED": "1", "GOOGLE_OAUTH_ACCESS_TOKEN": TOKEN}
    fs, snapshot = gcs.filesystem(), f"{BUCKET}/runs/r1/checkpoint_manager_snapshot.json"
    log1 = (tmp_path / "first.log").open("w+")
    first = subprocess.Popen([*cmd, "--set", f"data.gcs_endpoint={gcs.endpoint}"], env=env, stdout=log1, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        deadline, saved = time.monotonic() + 240, None
        while first.poll() is None and time.monotonic() < deadline and saved is None:
            if fs.get_file_info(snapshot).type == pafs.FileType.File:
                with fs.open_input_stream(snapshot) as f:
                    saved = latest_registered(f.read().decode())
            time.sleep(0.2)
        if first.poll() is None:
            first.send_signal(signal.SIGINT)  # Ctrl-C: the driver and its local Ray end
        first.wait(60)
    finally:
        if first.poll() is None:
            first.kill()
    log1.seek(0)
    first_out = log1.read()
    assert saved, f"no checkpoint reached the bucket before the driver ended:\n{first_out[-3000:]}"
    saved_at = int(saved.rsplit("_", 1)[1])

    second = subprocess.run(cmd, env=env | {"STORAGE_EMULATOR_HOST": gcs.endpoint}, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-4000:]
    resumed = re.search(r"\[raydino\] resumed from step (\d+)", out)
    assert resumed and int(resumed.group(1)) >= saved_at > 0, out[-3000:]
    assert f"[raydino] done: r1; checkpoint gs://{BUCKET}/runs/r1/checkpoint_00000008" in out
    stored = gcs.objects(BUCKET, "runs/r1/")
    steps = sorted({int(m.group(1)) for k in stored if (m := re.search(r"checkpoint_(\d{8})/state\.pt$", k))})
    assert steps[-1] == 8 and len(steps) <= 3  # keep_checkpoints
    (tmp_path / "state.pt").write_bytes(stored["runs/r1/checkpoint_00000008/state.pt"])
    assert torch.load(tmp_path / "state.pt", map_location="cpu", weights_only=False)["step"] == 8
    logged = [json.loads(line)["step"] for line in stored["runs/r1/logs/metrics.jsonl"].decode().splitlines()]
    assert logged == sorted(set(logged)) and logged[-1] == 8  # no step twice
    text = b"".join(v for k, v in stored.items() if not k.endswith(".pt")).decode("latin-1")
    for t in (first_out, out, text):
        assert TOKEN not in t


@pytest.mark.timeout(400)
def test_tune_experiment_stored_on_gcs(gcs, tmp_path):
    """`python -m raydino.tune --storage gs://...` (its own local Ray): 2 one-epoch trials of the smoke
    search, their checkpoints, Tune's experiment state and raydino's report all in the bucket.  The
    emulator is named only in STORAGE_EMULATOR_HOST, which the driver forwards to the trials."""
    spec = Path(__file__).resolve().parents[1] / "tuning" / "smoke.yaml"
    done = run_recipe(
        "tune", str(spec), "--storage", f"gs://{BUCKET}/tune", "--set", "num_samples=2", "--set", "budget.epochs=1",
        "--set", "scheduler.kind=fifo", "--set", "time_budget_s=240", cwd=tmp_path, timeout=380, local_ray=True,
        STORAGE_EMULATOR_HOST=gcs.endpoint, GOOGLE_OAUTH_ACCESS_TOKEN=TOKEN,
    )  # fmt: skip
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "2 trials (2 finished" in out and f"config gs://{BUCKET}/tune/smoke/best.yaml" in out, out[-3000:]
    stored = gcs.objects(BUCKET, "tune/smoke/")
    for name in ("best.yaml", "results.csv", "results.parquet", "summary.md", "summary.json", "tuner.pkl", "plots/scale_heatmap.png"):
        assert f"tune/smoke/{name}" in stored, sorted(stored)
    assert sum(k.endswith("/state.pt") for k in stored) == 2  # each trial's checkpoint
    summary = json.loads(stored["tune/smoke/summary.json"])
    assert [r["status"] for r in summary["rows"]] == ["finished", "finished"]
    text = b"".join(v for k, v in stored.items() if not k.endswith((".pt", ".pkl", ".parquet", ".png"))).decode("latin-1")
    assert TOKEN not in out and TOKEN not in text
