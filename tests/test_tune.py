"""The augmentation search on a real local Ray Tune (dashboard on, as users run it), plus its trial loop.

Slow tests: resume after SIGKILL of the driver (its own Ray, so it runs first), the smoke search
(ASHA stops trials, every trial listed with status and AUROC, the best config trains), and
multi-worker trials (a TorchTrainer inside each trial) that Tune stops at ASHA's max_t: the next
trial must still get the CPUs, and a trial whose loss goes non-finite ends diverged, never retried.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
import yaml

from raydino import tune
from raydino.config import load_config
from raydino.core.step import build_train_state
from raydino.data.loader import local_epoch_batches, pretrain_rows
from raydino.data.shards import open_shards
from raydino.data.synth import synthetic_shards
from raydino.search.results import STATUSES, trial_status
from raydino.search.spec import check_space, load_spec, parse_spec, trial_config
from raydino.search.trial import TrialEvaluator, train_and_report

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "tuning" / "smoke.yaml"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One synthetic data set for the module (the smoke spec's size)."""
    root = tmp_path_factory.mktemp("tune-cache")
    spec = load_spec(SMOKE)
    d = check_space(spec).data
    synthetic_shards(d.synthetic_n, d.synthetic_size, d.synthetic_seed, cache_root=str(root / "synthetic"), workers=2, progress=False)
    return root


# ---------------------------------------------------------------- the trial loop, in process


@pytest.fixture
def one_thread():
    """As in a trial (train.threads: 1): two intra-op threads on a busy 2-core machine thrash."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def loop_setup(cache, sets):
    spec = load_spec(SMOKE, sets)
    base, ctx = tune.prepare(spec, cache)
    cfg = trial_config(spec, {"augment.global_crop_scale.min": 0.4}, ctx["steps_per_epoch"])
    state = build_train_state(cfg, ctx["steps_per_epoch"])
    batches = local_epoch_batches(open_shards(ctx["data_uri"]), cfg.augment, cfg.train.batch_size, seed=0)
    return spec, cfg, ctx, state, batches


def test_collapsed_teacher_stops_the_trial_after_a_report(cache, one_thread):
    # A teacher temperature of 5 makes the teacher's output uniform from the first step.
    spec, cfg, ctx, state, batches = loop_setup(
        cache, ["loss.teacher_temp=5", "loss.warmup_teacher_temp=5", "train.log_every=1", "collapse_patience=2", "budget.epochs=3"]
    )
    reports = []

    def report(metrics, ckpt_dir):
        reports.append((dict(metrics), sorted(os.listdir(ckpt_dir)) if ckpt_dir else None))

    assert train_and_report(state, spec, batches, report, TrialEvaluator(cfg, ctx)) == "collapsed"
    assert len(reports) == 1, "the trial must end at the first epoch end that sees the collapse"
    metrics, files = reports[0]
    assert metrics["collapsed"] == 1 and metrics["final"] == 0 and metrics["collapse"] == "uniform"
    assert metrics["epoch"] == 1 < cfg.train.epochs
    assert 0.0 <= metrics["val_auroc"] <= 1.0 and "final_val_auroc" not in metrics and "test_auroc" not in metrics
    assert "state.pt" in files
    assert trial_status([metrics], None, 3)[0] == "collapsed"


def test_every_report_scores_the_same_probe(cache, one_thread):
    """val_auroc is the objective probe's, intermediate and final alike; the final probe has its own key."""
    from raydino.eval.metrics import selection_auroc
    from raydino.eval.probes import probe_backbone

    spec, cfg, ctx, state, _ = loop_setup(cache, ["evaluation.objective=fast", "evaluation.kind=knn", "evaluation.bootstrap=0"])
    evaluator = TrialEvaluator(cfg, ctx)
    backbone = state.teacher.backbone
    mid, end = evaluator.evaluate(backbone, final=False), evaluator.evaluate(backbone, final=True)
    assert mid["val_auroc"] == end["val_auroc"], "intermediate and final reports must carry the same metric"
    feats = evaluator._features(backbone, ("train", "val", "test"))
    expected = {
        kind: selection_auroc(
            probe_backbone(backbone, evaluator.data, kind, image_size=evaluator.size, n_bootstrap=0, feats=feats, progress=None)["per_seed"][0]["val"]
        )
        for kind in ("fast", "knn")
    }
    assert end["val_auroc"] == pytest.approx(expected["fast"])
    assert end["final_val_auroc"] == pytest.approx(expected["knn"])  # the final probe, under its own key
    assert expected["fast"] != expected["knn"], "the two probes must differ for this test to mean anything"
    assert end["probe_seeds"] == 1 and "test_auroc" in end and "test_auroc" not in mid


def test_driver_progress_speaks_at_least_once_a_minute_while_trials_are_silent(capsys):
    """A trial in its final probe reports nothing for minutes; the driver's line must not go quiet."""
    from types import SimpleNamespace

    progress = tune.SearchProgress(total_trials=3, budget_epochs=4, time_budget_s=None)
    progress.setup()
    trials = [SimpleNamespace(trial_id="a", status="RUNNING"), SimpleNamespace(trial_id="b", status="TERMINATED")]
    progress.on_step_end(0, trials)  # the first step speaks
    progress.on_step_end(1, trials)
    assert capsys.readouterr().out.count("[raydino.tune]") == 1  # then not again within the minute
    progress.printed -= tune.HEARTBEAT_S + 1
    progress.on_step_end(1, trials)
    assert "1/3 trials ended, 1 running" in capsys.readouterr().out


def test_old_intermediate_probe_setting_is_refused_with_the_new_names():
    with pytest.raises(Exception, match="objective: knn"):
        load_spec(SMOKE, ["evaluation.intermediate=knn"])
    with pytest.raises(Exception, match="intermediate: false"):
        load_spec(SMOKE, ["evaluation.intermediate=none", "scheduler.kind=fifo"])


def test_cli_refuses_bad_input_without_starting_ray(cache, tmp_path, capsys):
    assert tune.main([str(SMOKE), "--storage", str(tmp_path), "--cache", str(cache), "--resume"]) == 2
    assert "no experiment 'smoke'" in capsys.readouterr().err
    assert tune.main([str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert tune.main([str(SMOKE), "--set", "budget.epoch=2"]) == 2
    assert "budget.epoch" in capsys.readouterr().err
    graph_on_batchnorm = ["train.cuda_graph=true", "model.head_use_bn=false", "model.arch=resnet18"]
    assert tune.main([str(SMOKE), "--storage", str(tmp_path), "--cache", str(cache), *(a for kv in graph_on_batchnorm for a in ("--set", kv))]) == 2
    assert "model.arch='resnet18' has BatchNorm" in capsys.readouterr().err
    import ray

    assert not ray.is_initialized()  # every refusal came before Ray started


# ---------------------------------------------------------------- resume (its own Ray, before the module's)


def finished_results(exp: Path) -> dict[str, str]:
    out = {}
    for f in exp.glob("trial_*/result.json"):
        text = f.read_text()
        if '"final": 1' in text:
            out[f.parent.name] = text
    return out


RESUME_TRIALS = 3  # one finishes before the kill, the others are resumed or replaced


@pytest.mark.slow
def test_resume_after_killing_the_driver(cache, tmp_path):
    storage = tmp_path / "runs"
    cmd = [
        sys.executable,
        "-m",
        "raydino.tune",
        str(SMOKE),
        "--storage",
        str(storage),
        "--cache",
        str(cache),
        "--set",
        "name=resume",
        "--set",
        f"num_samples={RESUME_TRIALS}",
    ]
    log = open(tmp_path / "first.log", "w")
    # A session of its own: the driver and the local Ray it starts are killed together, by this group id.
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    exp = storage / "resume"
    try:
        deadline = time.monotonic() + 300  # generous: a loaded 2-core machine is slow, a hang is not
        while not finished_results(exp):
            assert proc.poll() is None, f"driver ended before any trial finished: {(tmp_path / 'first.log').read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no trial finished in 300 s"
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        log.close()
    before = finished_results(exp)
    assert not (exp / "results.csv").exists(), "the driver was killed before it wrote its report"

    rerun = subprocess.run([*cmd, "--resume"], cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "resuming resume" in rerun.stdout
    for trial, text in before.items():
        assert (exp / trial / "result.json").read_text() == text, f"{trial} had finished but was run again"
    rows = pcsv.read_csv(exp / "results.csv").to_pylist()
    assert len(rows) == RESUME_TRIALS and all(r["status"] in STATUSES for r in rows)
    # Every trial folder is in the results, or named in the summary as left by the killed driver before
    # Tune recorded it (a kill can land between the two; the resumed search then samples a replacement).
    orphans = json.loads((exp / "summary.json").read_text())["orphaned_trial_folders"]
    assert {f"trial_{r['trial_id']}" for r in rows} | set(orphans) == {p.name for p in exp.glob("trial_*")}
    assert not {f"trial_{r['trial_id']}" for r in rows} & set(orphans)
    assert all(o in (exp / "summary.md").read_text() for o in orphans)

    # Made certain: a folder Tune never recorded, then the same command once more (nothing left to run).
    (exp / "trial_0rphan00").mkdir()
    (exp / "trial_0rphan00" / "params.json").write_text("{}")
    again = subprocess.run([*cmd, "--resume"], cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "trial_0rphan00" in json.loads((exp / "summary.json").read_text())["orphaned_trial_folders"]
    assert "trial_0rphan00" in (exp / "summary.md").read_text()
    assert len(pcsv.read_csv(exp / "results.csv").to_pylist()) == RESUME_TRIALS


# ---------------------------------------------------------------- the smoke search on the module's Ray


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from raydino.distributed.cluster import init_ray

    init_ray(num_cpus=4)  # a local Ray, dashboard on at 127.0.0.1, State API pinned: what `python -m raydino.tune` starts
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def smoke(ray_local, cache, tmp_path_factory):
    storage = tmp_path_factory.mktemp("tune-runs")
    # The shipped 280 s budget, doubled: other jobs can load this 2-core machine; a hang still ends the search.
    spec = load_spec(SMOKE, [f"storage={storage}", "time_budget_s=600"])
    summary = tune.run_search(spec, cache=cache)
    return spec, summary, storage / spec.name


@pytest.mark.slow
def test_smoke_search_lists_every_trial_with_status_and_auroc(smoke):
    spec, summary, exp = smoke
    trial_dirs = {p.name.removeprefix("trial_") for p in exp.glob("trial_*")}
    assert len(trial_dirs) == spec.num_samples >= 4
    for name in ("results.csv", "results.parquet"):
        rows = (pcsv.read_csv if name.endswith("csv") else pq.read_table)(exp / name).to_pylist()
        assert {r["trial_id"] for r in rows} == trial_dirs
        for r in rows:
            assert r["status"] in STATUSES
            if r["status"] not in ("errored", "diverged"):
                assert 0.0 <= r["val_auroc"] <= 1.0, r
    statuses = [r["status"] for r in summary["rows"]]
    assert "stopped" in statuses, f"ASHA stopped no trial: {statuses}"
    assert not summary["hit_time_budget"]
    finished = [r for r in summary["rows"] if r["status"] == "finished"]
    assert all(r["test_auroc"] is not None and r["epoch"] == spec.budget.epochs for r in finished)
    history = pcsv.read_csv(exp / "metrics.csv").to_pylist()
    assert {h["trial_id"] for h in history} == trial_dirs
    for name in ("summary.md", "summary.json", "plots/auroc_vs_params.png", "plots/scale_heatmap.png"):
        assert (exp / name).stat().st_size > 0, name
    assert len(list((exp / "trials").glob("*.yaml"))) == len(trial_dirs)


@pytest.mark.slow
def test_later_trials_start_after_early_stops(smoke):
    """The hang to avoid: trials stopped by ASHA must free their resources for the ones after them.

    Only a trial that ended while others still waited can show it: when ASHA stopped just the last
    trials to start (one CI run stopped the 5th and 6th of 6), the trials that ended before them are
    checked instead, as any trial's resources must be freed."""
    spec, summary, exp = smoke
    history = pcsv.read_csv(exp / "metrics.csv").to_pylist()
    first = {t: min(h["timestamp"] for h in history if h["trial_id"] == t) for t in {h["trial_id"] for h in history}}
    last = {t: max(h["timestamp"] for h in history if h["trial_id"] == t) for t in first}
    assert len(first) == spec.num_samples, f"only {len(first)} of {spec.num_samples} trials reported"
    stopped = [r["trial_id"] for r in summary["rows"] if r["status"] == "stopped"]
    assert stopped, "ASHA stopped no trial"
    waited_on = set(sorted(first, key=first.get)[: -spec.max_concurrent_trials])
    ended = [s for s in stopped if s in waited_on] or sorted(waited_on)
    later = [t for s in ended for t in first if t != s and first[t] >= last[s]]
    assert later, f"no trial started after one that ended while others waited (stopped: {stopped}, checked: {ended})"


@pytest.mark.slow
def test_best_config_yaml_trains_as_a_pretraining_config(smoke, cache, one_thread):
    spec, summary, exp = smoke
    cfg = load_config(str(exp / "best.yaml"), ["train.max_steps=2"])
    best = summary["best"]
    assert best is not None and best["status"] in ("finished", "stopped")
    assert cfg.augment.global_crop_scale[0] == pytest.approx(best["augment.global_crop_scale.min"])
    assert cfg.augment.n_local_crops == best["augment.n_local_crops"]
    d = cfg.data
    shards = open_shards(synthetic_shards(d.synthetic_n, d.synthetic_size, d.synthetic_seed, cache_root=str(cache / "synthetic"), progress=False))
    from raydino.core.loop import fit

    state = build_train_state(cfg, pretrain_rows(shards) // cfg.train.batch_size)
    out = fit(state, local_epoch_batches(shards, cfg.augment, cfg.train.batch_size, seed=0))
    assert out.steps == 2 and out.last_loss is not None


@pytest.mark.slow
def test_multi_worker_trials_free_their_workers_and_report_non_finite_loss(ray_local, cache, tmp_path):
    """Each trial runs a 2-worker TorchTrainer; ASHA stops the first at max_t (Tune kills a trial that
    runs Train), the second must still get the CPUs, and its non-finite loss ends it diverged: a normal
    end, so Tune does not spend `resources.max_failures` (meant for crashes) rerunning it."""
    from ray.util import placement_group_table

    data = yaml.safe_load(SMOKE.read_text())
    data.update(
        name="multi",
        storage=str(tmp_path),
        num_samples=1,
        max_concurrent_trials=1,
        time_budget_s=600,
        budget={"epochs": 1, "report_every": 1},
        space={"loss.student_temp": {"grid": [0.1, 1e-40]}},
        searcher={"kind": "grid"},
        resources={"workers": 2, "cpus_per_worker": 1},
    )
    summary = tune.run_search(parse_spec(data), cache=cache)
    rows = sorted(summary["rows"], key=lambda r: r["trial_id"])
    assert [r["status"] for r in rows] == ["finished", "diverged"], rows
    assert rows[0]["val_auroc"] is not None and rows[0]["test_auroc"] is not None
    assert "loss became" in rows[1]["reason"] and rows[1]["restarts"] == 0
    assert not summary["hit_time_budget"]
    deadline = time.monotonic() + 60  # Train's cleaner removes worker groups asynchronously
    while any(pg["state"] != "REMOVED" for pg in placement_group_table().values()) and time.monotonic() < deadline:
        time.sleep(1)
    assert [pg for pg in placement_group_table().values() if pg["state"] != "REMOVED"] == []
    summary_json = json.loads((tmp_path / "multi" / "summary.json").read_text())
    assert summary_json["counts"]["diverged"] == 1 and summary_json["counts"]["errored"] == 0


@pytest.mark.slow
def test_searched_lesion_size_trains_and_scores_each_trial_on_its_own_synthetic_set(ray_local, cache, tmp_path):
    """Lesion size x minimum crop scale: one synthetic set per size, each trial streams and probes its own,
    and the report says where each size's validation AUROC peaks (the crop-scale-vs-lesion-size figure)."""
    data = yaml.safe_load(SMOKE.read_text())
    data.update(
        name="lesions",
        storage=str(tmp_path),
        num_samples=1,
        max_concurrent_trials=2,
        time_budget_s=600,
        budget={"epochs": 1},
        evaluation={"kind": "fast", "objective": "fast", "intermediate": False, "bootstrap": 20},
        space={"data.synthetic_lesion_size": {"grid": [1, 4]}, "augment.global_crop_scale.min": {"grid": [0.2, 0.6]}},
        searcher={"kind": "grid"},
        scheduler={"kind": "fifo"},
    )
    summary = tune.run_search(parse_spec(data), cache=cache)
    assert summary["counts"]["finished"] == 4, summary["rows"]
    history = pcsv.read_csv(tmp_path / "lesions" / "metrics.csv").to_pylist()
    final = {h["trial_id"]: h for h in history if h["final"]}
    for r in summary["rows"]:
        h = final[r["trial_id"]]
        # The synthetic cache names a set by its lesion scale (none for the default 1x1).
        want = "lesions4x1" if r["data.synthetic_lesion_size"] == 4 else None
        assert h["pretrain_data"] == h["probe_data"], h
        assert (want in h["pretrain_data"]) if want else ("lesions" not in h["pretrain_data"]), h
    table = summary["scale_by_data"]["table"]
    assert len(table) == 4 and sum(e["best"] for e in table) == 2
    assert (tmp_path / "lesions" / "plots" / "scale_by_data.png").stat().st_size > 0
    assert "against data.synthetic_lesion_size" in (tmp_path / "lesions" / "summary.md").read_text()
