"""Learning visible during a run: a cheap probe of the teacher at each epoch end.

`ProbeMonitor` decodes a labelled set's train and val splits once, then scores a backbone's frozen
features by the validation macro AUROC of the fast probe (logistic regression, C chosen on val: the
search's own objective) or of DINO's weighted kNN.  The test split is never touched: a number a user
watches while training must not be one they could tune on.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
from torch import nn

from raydino.data.labelled import LabelledData, decode_split
from raydino.eval.features import extract_features
from raydino.eval.metrics import macro_auroc
from raydino.eval.probes import fast_probe, knn_scores

MONITOR_KINDS = ("fast", "knn")


class ProbeMonitor:
    """`ProbeMonitor(data, image_size, "fast").val_auroc(backbone)` -> (val AUROC, seconds)."""

    def __init__(self, data: LabelledData, image_size: int, kind: str = "fast", batch_size: int = 64, knn_k: int = 20, knn_temperature: float = 0.07):
        if kind not in MONITOR_KINDS:
            raise ValueError(f"probe.monitor={kind!r}: allowed {', '.join(MONITOR_KINDS)} or off")
        self.data, self.size, self.kind, self.batch_size = data, image_size, kind, batch_size
        self.knn = {"k": knn_k, "temperature": knn_temperature}
        self.images = {s: decode_split(data.splits[s], image_size) for s in ("train", "val")}
        self.labels = {s: np.asarray(data.splits[s].labels) for s in ("train", "val")}
        self.last_seconds: dict[str, float] = {}  # the last call's time by part: features, fit

    @property
    def n_val(self) -> int:
        return len(self.labels["val"])

    def features(self, backbone: nn.Module) -> dict[str, np.ndarray]:
        """The train and val splits' frozen features of `backbone` (on its device; the part that needs it)."""
        return {s: extract_features(backbone, self.images[s], self.size, self.batch_size, progress=None) for s in ("train", "val")}

    def score(self, feats: dict[str, np.ndarray]) -> float | None:
        """Validation macro AUROC of the probe fitted on `feats` (CPU only: can run on another thread)."""
        n = self.data.n_classes
        if self.kind == "knn":
            scores = knn_scores(feats["train"], self.labels["train"], feats["val"], n, self.knn["k"], self.knn["temperature"])
            return macro_auroc(self.labels["val"], scores, n)
        # fast_probe reports a test split too; here it is the val split again, so nothing of test is read.
        run = fast_probe({**feats, "test": feats["val"]}, {**self.labels, "test": self.labels["val"]}, n)
        return run.val["auroc"]

    def val_auroc(self, backbone: nn.Module) -> tuple[float | None, float]:
        """Validation macro AUROC of the probe on `backbone`'s frozen features, and the seconds it took."""
        t0 = time.perf_counter()
        feats = self.features(backbone)
        t_fit = time.perf_counter()
        value = self.score(feats)
        done = time.perf_counter()
        self.last_seconds = {"features": t_fit - t0, "fit": done - t_fit}
        return value, done - t0

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "dataset": self.data.name, "image_size": self.size, "n_train": len(self.labels["train"]), "n_val": self.n_val}


class BackgroundProbe:
    """Epoch-end probes whose fit runs on a background thread while training goes on.

    The features must come from the teacher as it is at the epoch's end, so `submit` extracts them
    at once (seconds on a GPU); the fit needs only them.  The fast probe's fit took 39 s on 5,601
    training images of a randomly initialised ViT-S/16 (docs/performance.md), and every worker of a
    run waits at the epoch's report while rank 0 probes: on one thread of its own the fit overlaps
    the next epoch instead.  `finished()` hands back, in order, the probes whose fit is done (a fit's
    exception is raised there); `finished(wait=True)` waits for all of them.
    """

    def __init__(self, monitor: ProbeMonitor) -> None:
        self.monitor = monitor
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raydino-probe")
        self._pending: list[tuple[int, int, Future]] = []

    def submit(self, backbone: nn.Module, step: int, epoch: int) -> None:
        t0 = time.perf_counter()
        feats = self.monitor.features(backbone)
        self._pending.append((step, epoch, self._pool.submit(self._fit, feats, time.perf_counter() - t0)))

    def _fit(self, feats: dict[str, np.ndarray], extract_seconds: float) -> dict[str, Any]:
        t0 = time.perf_counter()
        value = self.monitor.score(feats)
        fit = time.perf_counter() - t0
        m = self.monitor
        return {
            "probe_val_auroc": value,
            "probe_kind": m.kind,
            "probe_n_val": m.n_val,
            "probe_seconds": round(extract_seconds + fit, 2),
            "probe_features_seconds": round(extract_seconds, 2),  # what training waited for
            "probe_fit_seconds": round(fit, 2),  # on the background thread, beside training
        }

    def finished(self, wait: bool = False) -> list[tuple[int, int, dict[str, Any]]]:
        """(step, epoch, probe metrics) of each probe done so far, oldest first, each handed back once."""
        out = []
        while self._pending and (wait or self._pending[0][2].done()):
            step, epoch, future = self._pending.pop(0)
            out.append((step, epoch, future.result()))
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
