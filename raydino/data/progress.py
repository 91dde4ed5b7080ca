"""A progress line with counts, rate and ETA for long data jobs (synth, shard).

Hand-written rather than tqdm: tqdm is not a declared dependency, and this needs two
behaviours that matter for cluster jobs: a redrawn bar on a terminal, and plain
time-spaced lines (no carriage returns) in log files and CI.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """``Progress(total, "shard", unit="images")``; call ``update(n, note=...)``; then ``close()``."""

    def __init__(
        self,
        total: int,
        label: str,
        unit: str = "items",
        stream: TextIO | None = None,
        enabled: bool = True,
        min_interval_s: float | None = None,
    ):
        self.total = max(0, int(total))
        self.label = label
        self.unit = unit
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.min_interval_s = min_interval_s if min_interval_s is not None else (0.2 if self.tty else 5.0)
        self.done = 0
        self.note = ""
        self.start = time.monotonic()
        self._last = 0.0
        self._drawn_done = -1

    def update(self, n: int = 1, note: str | None = None) -> None:
        self.done += n
        if note is not None:
            self.note = note
        now = time.monotonic()
        if now - self._last >= self.min_interval_s or self.done >= self.total:
            self._last = now
            self._draw(final=False)

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        bar = ""
        if self.tty:
            width = 24
            filled = int(width * min(1.0, pct / 100))
            bar = "[" + "#" * filled + "." * (width - filled) + "] "
        eta_s = format_duration(eta) if eta == eta else "?"
        note = f" | {self.note}" if self.note else ""
        return (
            f"{self.label}: {bar}{self.done}/{self.total} {self.unit} ({pct:.0f}%) "
            f"{rate:.1f} {self.unit}/s, elapsed {format_duration(elapsed)}, ETA {eta_s}{note}"
        )

    def _draw(self, final: bool) -> None:
        if not self.enabled or (final and not self.tty and self._drawn_done == self.done):
            return
        self._drawn_done = self.done
        if self.tty:
            self.stream.write("\r\x1b[2K" + self.line() + ("\n" if final else ""))
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def close(self) -> None:
        self._draw(final=True)
