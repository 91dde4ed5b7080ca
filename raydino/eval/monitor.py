"""Learning visible during a run: a cheap probe of the teacher at each epoch end.

`ProbeMonitor` decodes a labelled set's train and val splits once, then scores a backbone's frozen
features by the validation macro AUROC of the fast probe (logistic regression, C chosen on val: the
search's own objective) or of DINO's weighted kNN.  The test split is never touched: a number a user
watches while training must not be one they could tune on.
"""

from __future__ import annotations

import time
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

    def val_auroc(self, backbone: nn.Module) -> tuple[float | None, float]:
        """Validation macro AUROC of the probe on `backbone`'s frozen features, and the seconds it took."""
        t0 = time.perf_counter()
        feats = {s: extract_features(backbone, self.images[s], self.size, self.batch_size, progress=None) for s in ("train", "val")}
        t_fit = time.perf_counter()
        n = self.data.n_classes
        if self.kind == "knn":
            scores = knn_scores(feats["train"], self.labels["train"], feats["val"], n, self.knn["k"], self.knn["temperature"])
            value = macro_auroc(self.labels["val"], scores, n)
        else:
            # fast_probe reports a test split too; here it is the val split again, so nothing of test is read.
            run = fast_probe({**feats, "test": feats["val"]}, {**self.labels, "test": self.labels["val"]}, n)
            value = run.val["auroc"]
        done = time.perf_counter()
        # By part: a GPU node once spent 42 s here, and which part it was is the first thing to know.
        self.last_seconds = {"features": t_fit - t0, "fit": done - t_fit}
        return value, done - t0

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "dataset": self.data.name, "image_size": self.size, "n_train": len(self.labels["train"]), "n_val": self.n_val}
