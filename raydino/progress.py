"""The one progress/ETA helper: counts, rate and ETA for long jobs (synth, shard, bench, tune, training).

Hand-written rather than tqdm: tqdm is not a declared dependency, and this needs two
behaviours that matter for cluster jobs: a redrawn bar on a terminal, and plain
time-spaced lines (no carriage returns) in log files and CI.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import TextIO

# Where a component's progress lines go: print, a logger's info, list.append, or None (silent).
# Probes report through one so that the recipe (pretraining on Ray, a search trial) chooses.
LinePrinter = Callable[[str], None] | None


def say(line: str) -> None:
    """Print one line to stdout, once.

    Inside Ray Train workers `print` is patched to go both to the worker's stdout and to a logger,
    and Ray forwards both to the driver, so every progress line appeared twice.  Writing to the
    stream directly goes around the patch (the line still reaches the driver through the worker log).
    """
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def format_duration(seconds: float) -> str:
    """``1h02m03s`` / ``4m05s``; ``?`` for an unknown (nan, inf or negative) duration."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


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
        sink: LinePrinter = None,
    ):
        self.total = max(0, int(total))
        self.label = label
        self.unit = unit
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.sink = sink  # lines go to this callback instead of the stream (never redrawn in place)
        self.tty = sink is None and bool(getattr(self.stream, "isatty", lambda: False)())
        self.min_interval_s = min_interval_s if min_interval_s is not None else (0.2 if self.tty else 5.0)
        self.done = 0
        self.note = ""
        self.start = time.monotonic()
        # A terminal or log gets a first line at once; a callback (a probe inside a job) only after
        # min_interval_s, so short extractions stay silent.
        self._last = self.start if sink is not None else 0.0
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
        note = f" | {self.note}" if self.note else ""
        return (
            f"{self.label}: {bar}{self.done}/{self.total} {self.unit} ({pct:.0f}%) "
            f"{rate:.1f} {self.unit}/s, elapsed {format_duration(elapsed)}, ETA {format_duration(eta)}{note}"
        )

    def _draw(self, final: bool) -> None:
        if not self.enabled or (final and not self.tty and self._drawn_done == self.done):
            return
        self._drawn_done = self.done
        if self.sink is not None:
            self.sink(self.line())
            return
        if self.tty:
            self.stream.write("\r\x1b[2K" + self.line() + ("\n" if final else ""))
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def step(self, note: str) -> None:
        """One finished item of a short list (a benchmark run): always drawn, on its own line."""
        self.update(1, note=note)
        if self.tty:
            self.stream.write("\n")

    def close(self) -> None:
        self._draw(final=True)
