"""What a user's terminal shows of `python -m raydino.pretrain`: raydino's progress lines once each,
Ray's warnings, and not Ray Train's per-report dumps (those stay in Ray's log files)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from helpers.recipes import run_recipe

pytestmark = pytest.mark.slow


@pytest.mark.timeout(400)
def test_terminal_shows_progress_once_and_no_report_dumps(tmp_path):
    started = time.time()
    done = run_recipe(
        "pretrain", "--config", "smoke", "--no-probe", "--storage", str(tmp_path / "runs"), "--name", "terminal",
        "--cache", str(tmp_path / "cache"), cwd=tmp_path, timeout=380, local_ray=True,
    )  # fmt: skip
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert "TrainingReport(" not in out and "Reporting training result" not in out, out[-3000:]
    assert "Checkpoint successfully created" not in out and "Execution plan of Dataset" not in out, out[-3000:]
    steps = re.findall(r"\[raydino\] epoch \d+/\d+ step (\d+)/\d+", out)
    assert steps and len(steps) == len(set(steps)), f"progress lines repeated: {steps}"
    assert "[raydino] done: terminal" in out
    # The dumps are still written to Ray Train's log files of this session.
    logs = [p for p in Path("/tmp/ray").glob("session_*/logs/train/ray-train-app-worker-*.log") if p.stat().st_mtime >= started]
    assert any("Reporting training result" in p.read_text(errors="replace") for p in logs), [str(p) for p in logs]
