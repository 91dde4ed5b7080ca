"""A run's directory in storage (raydino.runs.storage): log uploads."""

from __future__ import annotations

import os

from raydino.runs.storage import RunStorage


def test_log_upload_copies_only_files_new_or_changed_since_the_last_one(tmp_path):
    staged = tmp_path / "staging"
    (staged / "tensorboard").mkdir(parents=True)
    (staged / "metrics.jsonl").write_text('{"step": 1}\n')
    (staged / "tensorboard" / "events.out").write_bytes(b"e1")
    storage = RunStorage.open(str(tmp_path / "runs"))
    assert storage.upload_logs("r", staged) == 2
    assert storage.upload_logs("r", staged) == 0  # nothing changed: a checkpoint uploads no log
    with (staged / "metrics.jsonl").open("a") as f:
        f.write('{"step": 2}\n')
    assert storage.upload_logs("r", staged) == 1
    assert (tmp_path / "runs" / "r" / "logs" / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'
    # Same size, new content (a rewritten file): the mtime tells.
    events = staged / "tensorboard" / "events.out"
    before = events.stat().st_mtime_ns
    events.write_bytes(b"e2")
    os.utime(events, ns=(before + 10**9, before + 10**9))
    assert storage.upload_logs("r", staged) == 1
    assert (tmp_path / "runs" / "r" / "logs" / "tensorboard" / "events.out").read_bytes() == b"e2"
