"""`python -m raydino.X ARGS` as a user runs it: its own process, output captured as text."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_recipe(
    module: str, *args: str, cwd: str | Path | None = None, timeout: float = 300, local_ray: bool = False, **env: str
) -> subprocess.CompletedProcess:
    """Run `python -m raydino.<module> ARGS`; `env` adds variables, `local_ray` drops RAY_ADDRESS so a
    recipe that needs Ray starts its own local one instead of joining a cluster this test started."""
    environ = {k: v for k, v in os.environ.items() if not (local_ray and k == "RAY_ADDRESS")}
    environ.update(env)
    return subprocess.run([sys.executable, "-m", f"raydino.{module}", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=environ)
