"""What Ray Train has committed in a run directory: its checkpoint snapshot file, read by the fault tests."""

from __future__ import annotations

import json
from pathlib import Path


def latest_registered(snapshot_text: str | None) -> str | None:
    """The newest checkpoint Ray Train has registered, from `checkpoint_manager_snapshot.json`'s text."""
    try:
        return json.loads(snapshot_text or "")["latest_checkpoint_result"]["checkpoint_dir_name"]
    except (ValueError, KeyError, TypeError):
        return None  # not written yet, or caught mid-write


def registered_step(run_dir: Path) -> int | None:
    """Step of the newest committed checkpoint of a local run (a folder can exist before its async
    upload is committed; only a committed one is what a restart resumes from)."""
    try:
        name = latest_registered((Path(run_dir) / "checkpoint_manager_snapshot.json").read_text())
    except OSError:
        return None
    return int(name.rsplit("_", 1)[-1]) if name else None
