"""One search trial's work, without Ray: pretrain, probe at every report, report through a callback.

`train_and_report` runs the DINO loop and calls `report(metrics, checkpoint_dir)` at every
`budget.report_every`-th epoch end, at a collapse, at a non-finite loss and at the end; `TrialEvaluator` scores the frozen
teacher with the one objective probe (`val_auroc`) and, at the end, the final probe's test metrics.
`raydino.distributed.trials` connects both to Ray Tune and Ray Train.
"""

from __future__ import annotations

import tempfile
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from raydino.config import Config
from raydino.data import storage as st
from raydino.eval.metrics import METRICS
from raydino.search.results import METRIC
from raydino.search.spec import Evaluation, SearchSpec


class _Collapsed(Exception):
    """Raised from the loop's hook to end a trial whose teacher collapsed (after it reported)."""


class TrialEvaluator:
    """Probe data decoded once per trial; kNN between epochs, the configured probe at the end."""

    def __init__(self, cfg: Config, ctx: dict[str, Any]) -> None:
        from raydino.data.labelled import SPLITS, decode_split, load_labelled

        self.cfg, self.evaluation = cfg, Evaluation.model_validate(ctx["spec"]["evaluation"])
        opts = st.StorageOptions.from_config(cfg.data)
        self.data = load_labelled(ctx["probe_uri"], dataset=ctx["probe_dataset"], storage_options=opts)
        self.size = cfg.probe.image_size or cfg.augment.global_crop_size
        self.images = {s: decode_split(self.data.splits[s], self.size) for s in SPLITS}
        # Named in the final report (without user info or query: `display_uri`): with searched lesion sizes
        # every trial has its own synthetic set, and metrics.csv shows which one it trained and was scored on.
        self.sources = {k: st.display_uri(str(ctx[f"{k}_uri"])) for k in ("data", "probe")}

    def _features(self, backbone: Any, splits: tuple[str, ...]) -> dict[str, Any]:
        from raydino.eval.features import extract_features

        p = self.cfg.probe
        return {s: extract_features(backbone, self.images[s], self.size, p.batch_size, progress=None, dtype=p.feature_dtype) for s in splits}

    def _probe(self, backbone: Any, feats: dict[str, Any], kind: str, bootstrap: int) -> dict[str, Any]:
        from raydino.eval.probes import probe_backbone

        return probe_backbone(
            backbone, self.data, kind, image_size=self.size, n_bootstrap=bootstrap, feats=feats, progress=None, **self.cfg.probe.probe_kwargs()
        )

    def evaluate(self, backbone: Any, final: bool) -> dict[str, Any]:
        """Metrics of the frozen backbone.

        Every call: `val_auroc` (METRIC), the objective probe's validation AUROC, the same probe at
        every report.  Final call also: the `kind` probe's `final_val_auroc` and `test_*` (mean over
        probe seeds, 95% bootstrap interval, std over probe seeds).  The test split's features are
        only extracted for the final call, and nothing computed on them is compared by the search.
        """
        was_training = backbone.training
        backbone.eval()
        try:
            ev = self.evaluation
            feats = self._features(backbone, ("train", "val", "test"))
            same = ev.kind == ev.objective  # then the final probe is the objective's own run, computed once
            objective = self._probe(backbone, feats, ev.objective, ev.bootstrap if final and same else 0)
            out: dict[str, Any] = {METRIC: self._val(objective)}
            if not final:
                return out
            result = objective if same else self._probe(backbone, feats, ev.kind, ev.bootstrap)
            out["final_val_auroc"] = self._val(result)
            out["pretrain_data"], out["probe_data"] = self.sources["data"], self.sources["probe"]
            out["probe_seeds"] = len(result["per_seed"])
            for m in METRICS:
                out[f"test_{m}"] = result["mean"].get(m)
                out[f"test_{m}_std"] = (result.get("std") or {}).get(m)
                ci = (result.get("ci95") or {}).get(m) or {}
                out[f"test_{m}_low"], out[f"test_{m}_high"] = ci.get("low"), ci.get("high")
            return out
        finally:
            backbone.train(was_training)

    @staticmethod
    def _val(result: dict[str, Any]) -> float:
        """Validation AUROC averaged over probe seeds (the mean over defined classes where a class is absent)."""
        from raydino.eval.metrics import selection_auroc

        return float(sum(selection_auroc(r["val"]) for r in result["per_seed"]) / len(result["per_seed"]))


def train_and_report(
    state: Any,
    spec: SearchSpec,
    epoch_batches: Callable[[int], Any],
    report: Callable[[dict[str, Any], str | None], None],
    evaluator: TrialEvaluator | None,
    agree: Callable[[bool], bool] = bool,
    rank: int = 0,
    world: int = 1,
) -> str:
    """Run the DINO loop and report at every `report_every`-th epoch end, at a collapse and at the end.

    Every rank calls `report` equally often (Ray Train's report is a barrier); only rank 0 has an
    evaluator and writes the checkpoint.  Returns "finished", "collapsed" or "diverged".  Timers live
    in `state.extra` so they survive a resume.

    A non-finite loss ends the trial *normally*, with a last report marked ``diverged`` (no checkpoint:
    the last good one stays).  Raising instead would make Tune retry it under
    `resources.max_failures`, a budget meant for crashes such as a lost node, and it would diverge again.
    """
    from raydino.core.checkpoint import save_checkpoint
    from raydino.core.loop import LoopHooks, fit
    from raydino.core.step import NonFiniteLossError

    timers = state.extra.setdefault("tune_timers", {"train": 0.0, "probe": 0.0, "checkpoint": 0.0})
    recent: deque[str | None] = deque(maxlen=spec.collapse_patience)
    mark = [time.perf_counter()]

    def on_log(s: Any, metrics: dict[str, Any]) -> None:
        recent.append(metrics.get("collapse"))

    def on_checkpoint(s: Any, metrics: dict[str, Any], epoch_end: bool) -> None:
        if not epoch_end:
            return
        now = time.perf_counter()
        timers["train"] += now - mark[0]
        collapsed = agree(spec.stop_on_collapse and len(recent) == recent.maxlen and all(recent))
        due = s.epoch % spec.budget.report_every == 0 and spec.evaluation.intermediate
        if not (collapsed or s.done or due):
            mark[0] = time.perf_counter()
            return
        final = s.done and not collapsed
        out: dict[str, Any] = {
            "epoch": s.epoch,
            "step": s.step,
            "loss": metrics.get("loss"),
            "teacher_entropy": metrics.get("teacher_entropy"),
            "entropy_gap": metrics.get("entropy_gap"),
            "collapse": next((c for c in reversed(recent) if c), "") if collapsed else "",
            "collapsed": int(collapsed),
            "final": int(final),
        }
        if evaluator is not None:
            t = time.perf_counter()
            out.update(evaluator.evaluate(s.teacher.backbone, final))
            timers["probe"] += time.perf_counter() - t
        t = time.perf_counter()
        out.update(train_seconds=timers["train"], probe_seconds=timers["probe"], checkpoint_seconds=timers["checkpoint"])
        with tempfile.TemporaryDirectory() as tmp:
            ckpt_dir = None
            if rank == 0:
                save_checkpoint(s, tmp)
                ckpt_dir = tmp
            report(out, ckpt_dir)
        timers["checkpoint"] += time.perf_counter() - t
        mark[0] = time.perf_counter()
        if collapsed:
            raise _Collapsed()

    try:
        fit(state, epoch_batches, LoopHooks(on_log, on_checkpoint), world_size=world)
    except _Collapsed:
        return "collapsed"
    except NonFiniteLossError as e:
        # Every rank sees the same non-finite step (the step all-reduces its check), so all report here.
        timers["train"] += time.perf_counter() - mark[0]
        out = {
            "epoch": state.epoch,
            "step": e.step,
            "diverged": 1,
            "diverged_reason": str(e),
            "collapsed": 0,
            "final": 0,
            METRIC: float("nan"),  # Tune wants the objective in every report; NaN ranks nowhere
            "train_seconds": timers["train"],
            "probe_seconds": timers["probe"],
            "checkpoint_seconds": timers["checkpoint"],
        }
        report(out, None)
        return "diverged"
    return "finished"
