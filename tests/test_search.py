"""The search component without Ray: spec validation, trial configs, statuses, tables, statistics, plots."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
from scipy import stats

from raydino.config import ConfigError, load_config
from raydino.eval.metrics import METRICS
from raydino.search.report import (
    HEATMAP_KEYS,
    best_config_yaml,
    data_sweep_report,
    paper_report,
    plot_auroc_vs_params,
    plot_presets,
    plot_scale_by_data,
    plot_scale_heatmap,
    preset_table_markdown,
    summary_markdown,
)
from raydino.search.results import best_row, history_table, paired_test, preset_table, results_table, table_bytes, trial_status
from raydino.search.spec import check_space, data_variant_key, data_variants, load_spec, parse_spec, trial_config, trial_data

TUNING = Path(__file__).resolve().parents[1] / "tuning"

MINIMAL = {
    "name": "t",
    "base": "smoke",
    "budget": {"epochs": 3},
    "space": {"augment.global_crop_scale.min": {"uniform": [0.2, 0.5]}},
}


def spec_with(**changes):
    data = json.loads(json.dumps(MINIMAL))
    data.update(changes)
    return parse_spec(data)


@pytest.mark.parametrize("name", sorted(p.name for p in TUNING.glob("*.yaml")))
def test_shipped_specs_validate_and_every_corner_is_a_valid_config(name):
    spec = load_spec(TUNING / name)
    base = check_space(spec)
    assert base.run.workers == spec.resources.workers
    assert base.train.epochs == spec.budget.epochs


def test_smoke_spec_fits_a_small_machine():
    spec = load_spec(TUNING / "smoke.yaml")
    assert spec.num_samples >= 4 and spec.scheduler.kind == "asha" and spec.resources.workers == 1
    assert spec.time_budget_s and spec.time_budget_s < 300
    base = check_space(spec)
    assert base.augment.global_crop_size == 32 and base.data.uri is None


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"budgett": {"epochs": 1}}, ["budgett", "did you mean budget"]),
        ({"budget": {"epochs": 1, "steps": 5}}, ["exactly one of budget.epochs or budget.steps"]),
        ({"space": {"augment.n_local_crops": {"uniform": [4, 2]}}}, ["space.augment.n_local_crops", "low < high"]),
        ({"space": {"augment.noise_p": {"loguniform": [0, 0.5]}}}, ["loguniform", "must be > 0"]),
        ({"space": {"augment.noise_p": {"uniform": [0, 1], "choice": [0.1]}}}, ["exactly one of"]),
        ({"space": {"augment.preset": {"grid": ["weak", "strong"]}}}, ["optuna cannot search grid", "augment.preset"]),
        ({"searcher": {"kind": "grid"}}, ["every parameter as grid", "augment.global_crop_scale.min"]),
        ({"evaluation": {"intermediate": False}}, ["asha needs intermediate reports"]),
        ({"name": "has space"}, ["name"]),
        ({"space": {}}, ["at least one parameter"]),
        ({"space": {"augment.noise_p": {"unifrom": [0, 0.5]}}}, ["augment.noise_p.unifrom", "did you mean uniform"]),
    ],
)
def test_bad_specs_name_the_field(changes, words):
    with pytest.raises(ConfigError) as e:
        spec_with(**changes)
    for w in words:
        assert w in str(e.value)


def test_set_assigns_spec_fields_and_config_overrides():
    spec = parse_spec(MINIMAL, sets=["num_samples=3", "budget.epochs=2", "optim.lr=0.002", "searcher.kind=random"])
    assert (spec.num_samples, spec.budget.epochs, spec.searcher.kind) == (3, 2, "random")
    assert "optim.lr=0.002" in spec.override_list()
    cfg = trial_config(spec, {"augment.global_crop_scale.min": 0.3})
    assert cfg.optim.lr == 0.002 and cfg.train.epochs == 2
    with pytest.raises(ConfigError, match="optim.lrr"):
        parse_spec(MINIMAL, sets=["optim.lrr=1"])
    with pytest.raises(ConfigError, match="num_sample"):
        parse_spec(MINIMAL, sets=["num_sample=3"])


def test_storage_flags_of_a_search_reach_every_trials_config():
    from raydino.cli import storage_overrides
    from raydino.tune import parse_args

    args = parse_args(["tuning/smoke.yaml", "--s3-endpoint", "http://127.0.0.1:9000", "--gcs-endpoint", "http://127.0.0.1:9023"])
    spec = parse_spec(MINIMAL, sets=storage_overrides(args))
    cfg = trial_config(spec, {"augment.global_crop_scale.min": 0.3})
    assert (cfg.data.s3_endpoint, cfg.data.s3_region, cfg.data.gcs_endpoint) == ("http://127.0.0.1:9000", None, "http://127.0.0.1:9023")


def test_trial_config_sets_range_ends_presets_and_jitter_strength():
    spec = spec_with(
        space={
            "augment.preset": {"choice": ["strong", "weak"]},
            "augment.local_crop_scale.max": {"uniform": [0.3, 0.6]},
            "augment.jitter_strength": {"uniform": [0.1, 0.4]},
        }
    )
    strong = trial_config(spec, {"augment.preset": "strong", "augment.local_crop_scale.max": 0.45, "augment.jitter_strength": 0.3})
    # the preset chose the range's other end (strong: local min 0.05); the searched end overrides the preset's
    assert strong.augment.local_crop_scale == (0.05, 0.45)
    assert strong.augment.global_crop_scale == (0.4, 1.0)
    assert strong.augment.jitter_brightness == strong.augment.jitter_contrast == 0.3
    weak = trial_config(spec, {"augment.preset": "weak", "augment.local_crop_scale.max": 0.45, "augment.jitter_strength": 0.3})
    assert weak.augment.local_crop_scale == (0.2, 0.45) and weak.augment.global_crop_scale == (0.5, 1.0)


def test_trial_config_applies_budget_and_resources():
    spec = spec_with(budget={"steps": 25, "report_every": 1}, resources={"workers": 2, "cpus_per_worker": 0.5})
    cfg = trial_config(spec, {"augment.global_crop_scale.min": 0.3}, steps_per_epoch=10)
    assert (cfg.train.max_steps, cfg.train.epochs) == (25, 3)
    assert (cfg.run.workers, cfg.run.cpus_per_worker) == (2, 0.5)
    assert cfg.augment.global_crop_scale == (0.3, 1.0)


def test_check_space_rejects_crossing_ranges_unknown_keys_and_invalid_values():
    crossing = spec_with(space={"augment.local_crop_scale.min": {"uniform": [0.1, 0.5]}, "augment.local_crop_scale.max": {"uniform": [0.4, 0.6]}})
    with pytest.raises(ConfigError, match="min > max"):
        check_space(crossing)
    with pytest.raises(ConfigError, match="augment.global_crop_scal.min: not a config key"):
        check_space(spec_with(space={"augment.global_crop_scal.min": {"uniform": [0.1, 0.5]}}))
    with pytest.raises(ConfigError, match=r"space.augment.n_local_crops=-1 gives an invalid trial config"):
        check_space(spec_with(space={"augment.n_local_crops": {"choice": [2, -1]}}))
    with pytest.raises(ConfigError, match=r"space.augment.global_crop_scale.min=1.5"):
        check_space(spec_with(space={"augment.global_crop_scale.min": {"uniform": [0.2, 1.5]}}))
    # Data sets are built before any trial: any other searched data.* value would silently change nothing.
    with pytest.raises(ConfigError, match=r"space.data.synthetic_n: data settings cannot be searched.*--set"):
        check_space(spec_with(space={"data.synthetic_n": {"choice": [100, 200]}}))


def test_lesion_size_and_count_may_be_searched_on_the_synthetic_set_only_as_a_finite_set():
    spec = spec_with(
        searcher={"kind": "grid"},
        scheduler={"kind": "fifo"},
        space={
            "data.synthetic_lesion_size": {"grid": [1.5, 6]},
            "data.synthetic_lesion_count": {"grid": [1, 2]},
            "augment.global_crop_scale.min": {"grid": [0.2, 0.5]},
        },
    )
    check_space(spec)
    variants = data_variants(spec)
    assert len(variants) == 4 and {"data.synthetic_lesion_size": 6, "data.synthetic_lesion_count": 1} in variants
    cfg = trial_config(spec, {"data.synthetic_lesion_size": 6, "augment.global_crop_scale.min": 0.2})
    assert cfg.data.synthetic_lesion_size == 6 and cfg.augment.global_crop_scale[0] == 0.2
    assert data_variants(spec_with()) == [{}]
    with pytest.raises(ConfigError, match=r"space.data.synthetic_lesion_size: uniform is not allowed here; use grid or choice"):
        check_space(spec_with(space={"data.synthetic_lesion_size": {"uniform": [1, 3]}}))
    outside = spec_with(space={"data.synthetic_lesion_size": {"choice": [1, 3]}}, overrides={"data.uri": "/some/shards"})
    with pytest.raises(ConfigError, match=r"space.data.synthetic_lesion_size: only the embedded synthetic set can vary"):
        check_space(outside)
    with pytest.raises(ConfigError, match=r"space.data.synthetic_lesion_size=30 gives an invalid trial config"):
        check_space(spec_with(space={"data.synthetic_lesion_size": {"choice": [1, 30]}}))


def test_a_trial_gets_the_synthetic_set_of_its_own_lesion_values():
    ctx = {"data_uri": "/c/base", "probe_uri": "/c/base", "data_variants": {}}
    size = {"data.synthetic_lesion_size": 1.5}, {"data.synthetic_lesion_size": np.float64(6.0)}
    ctx["data_variants"] = {data_variant_key(v): f"/c/{i}" for i, v in enumerate(size)}
    got = trial_data(ctx, {**size[1], "augment.global_crop_scale.min": 0.2, "train.seed": 1})
    assert (got["data_uri"], got["probe_uri"]) == ("/c/1", "/c/1")
    assert trial_data(ctx, {**size[0], "train.seed": 0})["data_uri"] == "/c/0"
    assert trial_data(ctx, {"train.seed": 0}) is ctx  # nothing searched: the base set
    external_probe = {**ctx, "probe_uri": "/labelled"}
    assert trial_data(external_probe, size[0])["probe_uri"] == "/labelled"


def report(epoch, auroc, **kw):
    return {"epoch": epoch, "val_auroc": auroc, "collapsed": 0, "final": 0, **kw}


TRIALS = [
    {
        "trial_id": "a",
        "params": {"p": 0.1},
        "error": None,
        "history": [report(1, 0.6), report(2, 0.62, final=1, test_auroc=0.7, train_seconds=8.0, probe_seconds=1.0)],
    },
    {"trial_id": "b", "params": {"p": 0.2}, "error": None, "history": [report(1, 0.9, train_seconds=4.0, probe_seconds=0.5)]},
    {
        "trial_id": "c",
        "params": {"p": 0.3},
        "error": None,
        "history": [report(1, 0.95, collapsed=1, collapse="uniform", train_seconds=4.0, probe_seconds=0.5)],
    },
    {
        "trial_id": "d",
        "params": {"p": "x"},
        "history": [],
        "error": "Traceback (most recent call last):\n  ...\nRuntimeError: non-finite loss: loss became nan at step 3; stopping",
    },
]


def test_statuses_reasons_and_best_is_a_finished_trial():
    rows = results_table(TRIALS, ["p"], budget_epochs=2, wall_seconds={"a": 10.0, "b": 5.0})
    by = {r["trial_id"]: r for r in rows}
    assert [by[t]["status"] for t in "abcd"] == ["finished", "stopped", "collapsed", "errored"]
    assert "epoch 1 of 2" in by["b"]["reason"]
    assert "uniform" in by["c"]["reason"]
    assert "loss became nan at step 3" in by["d"]["reason"] and by["d"]["val_auroc"] is None
    # b's 0.9 is from an earlier report (a stopped trial); the best is the best *finished* trial
    assert best_row(rows)["trial_id"] == "a"
    assert by["a"]["overhead_fraction"] == pytest.approx((10.0 - 9.0) / 10.0)
    assert best_row([r for r in rows if r["trial_id"] != "a"])["trial_id"] == "b"
    assert best_row([by["c"], by["d"]]) is None
    assert trial_status([], None, 2)[0] == "stopped"


def test_tables_round_trip_through_csv_and_parquet():
    rows = results_table(TRIALS, ["p"], budget_epochs=2)
    for fmt, read in (("csv", lambda b: pcsv.read_csv(io.BytesIO(b))), ("parquet", lambda b: pq.read_table(io.BytesIO(b)))):
        table = read(table_bytes(rows, fmt))
        assert table.column("trial_id").to_pylist() == ["a", "b", "c", "d"]
        assert table.column("status").to_pylist() == ["finished", "stopped", "collapsed", "errored"]
        assert table.column("p").to_pylist() == ["0.1", "0.2", "0.3", "x"]  # mixed types become text
        assert table.column("val_auroc").to_pylist()[:3] == [0.62, 0.9, 0.95]
    history = history_table(TRIALS)
    assert len(history) == 4 and {h["trial_id"] for h in history} == {"a", "b", "c"}


def test_best_config_yaml_loads_as_the_trial_config(tmp_path):
    spec = spec_with(space={"augment.local_crop_scale.min": {"uniform": [0.05, 0.3]}, "augment.n_local_crops": {"choice": [2, 4]}})
    params = {"augment.local_crop_scale.min": 0.123, "augment.n_local_crops": 4}
    row = {"trial_id": "t1", "val_auroc": 0.7, "test_auroc": 0.65}
    path = tmp_path / "best.yaml"
    path.write_text(best_config_yaml(spec, params, 10, row))
    loaded = load_config(str(path))
    expected = trial_config(spec, params, 10).to_dict()
    expected["run"]["name"] = None
    assert loaded.to_dict() == expected
    assert loaded.augment.local_crop_scale[0] == 0.123 and loaded.augment.n_local_crops == 4


def preset_rows(values):
    """values[preset] = test AUROCs per seed."""
    rows = []
    for preset, aurocs in values.items():
        for seed, a in enumerate(aurocs):
            rows.append(
                {
                    "status": "finished",
                    "augment.preset": preset,
                    "train.seed": seed,
                    "probe_seeds": 5,
                    **{f"test_{m}": a - 0.1 for m in METRICS},
                    "test_auroc": a,
                    "test_auroc_std": 0.01 * (seed + 1),
                }
            )
    return rows


def test_preset_table_gives_mean_and_t_interval_over_seeds():
    values = {"strong": [0.80, 0.82, 0.81, 0.79, 0.83], "weak": [0.84, 0.85, 0.83, 0.86, 0.84]}
    rows = preset_rows(values) + [{"status": "stopped", "augment.preset": "weak", "train.seed": 9, "test_auroc": 0.0}]
    table = {e["augment.preset"]: e for e in preset_table(rows)}
    for preset, v in values.items():
        lo, hi = stats.t.interval(0.95, len(v) - 1, loc=np.mean(v), scale=stats.sem(v))
        e = table[preset]
        assert e["n"] == len(v)  # the stopped trial is left out
        assert e["auroc"] == pytest.approx(np.mean(v))
        assert (e["auroc_low"], e["auroc_high"]) == (pytest.approx(lo), pytest.approx(hi))
        # the second axis, kept apart: the mean over checkpoints of the std over probe seeds
        assert e["auroc_probe_std"] == pytest.approx(np.mean([0.01 * (s + 1) for s in range(len(v))]))
        assert e["probe_seeds"] == 5 and e["aupr_probe_std"] is None
    md = preset_table_markdown(preset_table(rows))
    assert "| weak | 5 | 5 |" in md and "AUROC" in md and "± 0.030" in md


def test_paired_test_pairs_by_seed():
    values = {"strong": [0.80, 0.82, 0.81, 0.79, 0.83], "weak": [0.84, 0.85, 0.83, 0.86, 0.84]}
    rows = preset_rows(values)
    rows = rows[::-1]  # order must not matter: pairs are by seed
    res = paired_test(rows, "weak", "strong")["metrics"]["auroc"]
    t = stats.ttest_rel(values["weak"], values["strong"])
    assert res["n"] == 5
    assert res["mean_difference"] == pytest.approx(np.mean(np.subtract(values["weak"], values["strong"])))
    assert res["p_t"] == pytest.approx(t.pvalue) and res["t"] == pytest.approx(t.statistic)
    assert res["p_wilcoxon"] == pytest.approx(stats.wilcoxon(values["weak"], values["strong"]).pvalue)
    missing = paired_test(preset_rows({"weak": [0.8], "strong": [0.7]}), "weak", "strong")["metrics"]["auroc"]
    assert "at least 2 seeds" in missing["note"]
    report_ = paper_report(rows)
    assert report_ and [p["a"] for p in report_["paired"]] == ["weak"]
    assert paper_report([{"status": "finished", "augment.preset": "weak"}]) is None


def test_preset_plot_draws_every_seed_and_refuses_an_empty_table(tmp_path):
    from PIL import Image

    rows = preset_rows({"strong": [0.80, 0.82, 0.81], "weak": [0.84, 0.85, 0.83], "weak_med": [0.79, 0.9, 0.7]})
    with Image.open(plot_presets(rows, preset_table(rows), tmp_path / "both.png", "t")) as im:
        both = im.size[0]
    auroc_only = [{k: v for k, v in r.items() if k != "test_aupr"} for r in rows]
    with Image.open(plot_presets(auroc_only, preset_table(auroc_only), tmp_path / "auroc.png", "t")) as im:
        assert im.size[0] < 0.6 * both  # one panel per metric measured
    assert plot_presets(rows, [], tmp_path / "none.png", "t") is None and not (tmp_path / "none.png").exists()


def sweep_rows(val, test):
    """val[size][crop] = validation AUROCs per seed; test the same shape."""
    rows = []
    for size, by_crop in val.items():
        for crop, seeds in by_crop.items():
            for seed, v in enumerate(seeds):
                t = test[size][crop][seed]
                rows.append(
                    {"trial_id": f"{size}-{crop}-{seed}", "status": "finished", "data.synthetic_lesion_size": size,
                     "augment.global_crop_scale.min": crop, "train.seed": seed, "val_auroc": v, "test_auroc": t, "test_aupr": t - 0.2}
                )  # fmt: skip
    return rows


def test_crop_scale_against_lesion_size_picks_by_validation_within_each_size(tmp_path):
    from PIL import Image

    # Small lesions peak at the largest crops, large ones at the smallest; the test AUROC disagrees
    # at size 6 on purpose: the pick must follow validation, never test.
    val = {1.5: {0.2: [0.60, 0.62], 0.8: [0.70, 0.72]}, 6: {0.2: [0.90, 0.92], 0.8: [0.80, 0.82]}}
    test = {1.5: {0.2: [0.61, 0.63], 0.8: [0.69, 0.73]}, 6: {0.2: [0.70, 0.72], 0.8: [0.95, 0.97]}}
    rows = sweep_rows(val, test) + [{"status": "errored", "data.synthetic_lesion_size": 6, "augment.global_crop_scale.min": 0.5, "val_auroc": None}]
    keys = ["data.synthetic_lesion_size", "augment.global_crop_scale.min", "train.seed"]
    sweep = data_sweep_report(rows, keys)
    picked = {e["data.synthetic_lesion_size"]: e["augment.global_crop_scale.min"] for e in sweep["table"] if e["best"]}
    assert picked == {1.5: 0.8, 6: 0.2}
    cell = next(e for e in sweep["table"] if (e["data.synthetic_lesion_size"], e["augment.global_crop_scale.min"]) == (6, 0.8))
    assert cell["n"] == 2 and cell["val_auroc"] == pytest.approx(0.81) and cell["auroc"] == pytest.approx(0.96)
    lo, hi = stats.t.interval(0.95, 1, loc=0.96, scale=stats.sem([0.95, 0.97]))
    assert (cell["auroc_low"], cell["auroc_high"]) == (pytest.approx(lo), pytest.approx(min(hi, 1.0)))
    assert len(sweep["table"]) == 4  # the errored trial is in no cell
    assert "| 6 | 0.200 | 2 | 0.910 |" in sweep["table_md"] and sweep["table_md"].count("**best**") == 2
    with Image.open(plot_scale_by_data(rows, sweep, tmp_path / "s.png", "t")) as im:
        assert im.size[0] > 2 * im.size[1]  # three panels side by side
    spec = spec_with(searcher={"kind": "grid"}, scheduler={"kind": "fifo"}, space={k: {"grid": [1]} for k in keys})
    md = summary_markdown(spec, rows, best_row(rows), keys, sweep=sweep)
    assert "## augment.global_crop_scale.min against data.synthetic_lesion_size" in md and "plots/scale_by_data.png" in md
    # Only one data key against one augmentation key (and the seed) makes that figure.
    assert data_sweep_report(rows, keys[1:]) is None
    assert data_sweep_report(rows, [*keys, "augment.n_local_crops"]) is None


def test_plots_and_summary(tmp_path):
    spec = spec_with(space={k: {"uniform": [0.05, 0.3]} for k in HEATMAP_KEYS} | {"augment.n_local_crops": {"choice": [2, 4]}})
    rng = np.random.default_rng(0)
    trials = [
        {
            "trial_id": f"t{i}",
            "error": None,
            "params": {
                HEATMAP_KEYS[0]: float(rng.uniform(0.1, 0.3)),
                HEATMAP_KEYS[1]: float(rng.uniform(0.05, 0.3)),
                "augment.n_local_crops": int(rng.choice([2, 4])),
            },
            "history": [report(2, float(rng.uniform(0.5, 0.9)), final=int(i % 2 == 0))],
        }
        for i in range(8)
    ]
    keys = list(spec.space)
    rows = results_table(trials, keys, budget_epochs=2)
    png = plot_auroc_vs_params(rows, keys, tmp_path / "a.png", "t")
    heat = plot_scale_heatmap(rows, tmp_path / "h.png", "t")
    for p in (png, heat):
        assert p is not None and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_scale_heatmap(rows[:1], tmp_path / "none.png", "t") is None
    best = best_row(rows)
    md = summary_markdown(spec, rows, best, keys, {"search time": "1m"})
    assert f"`{best['trial_id']}`" in md and "4 finished, 4 stopped" in md and "scale_heatmap.png" in md


def test_test_metrics_never_choose_the_best_trial():
    """The best trial is the one the search objective ranks first, whatever its test metrics say."""
    trials = [
        {
            "trial_id": t,
            "params": {"p": i},
            "error": None,
            "history": [{"epoch": 2, "val_auroc": val, "final": 1, "final_val_auroc": fval, "test_auroc": test}],
        }
        for i, (t, val, fval, test) in enumerate([("hi-val", 0.80, 0.60, 0.55), ("hi-test", 0.70, 0.90, 0.95)])
    ]
    rows = results_table(trials, ["p"], budget_epochs=2)
    assert best_row(rows)["trial_id"] == "hi-val"
    assert {r["trial_id"]: r["final_val_auroc"] for r in rows} == {"hi-val": 0.60, "hi-test": 0.90}


# ---------------------------------------------------------------- a diverged trial is not a crash


def test_diverged_trial_has_its_own_status_and_never_ranks():
    nan_report = {"epoch": 1, "step": 3, "diverged": 1, "diverged_reason": "loss became nan at step 3; stopping", "val_auroc": float("nan")}
    trials = [*TRIALS, {"trial_id": "e", "params": {"p": 0.5}, "error": None, "history": [nan_report], "restarts": 2}]
    rows = {r["trial_id"]: r for r in results_table(trials, ["p"], budget_epochs=2)}
    assert (rows["e"]["status"], rows["e"]["val_auroc"], rows["e"]["restarts"]) == ("diverged", None, 2)
    assert "step 3" in rows["e"]["reason"] and rows["a"]["restarts"] == 0
    assert best_row([rows["e"], rows["c"]]) is None and best_row(list(rows.values()))["trial_id"] == "a"


def test_non_finite_loss_ends_the_trial_with_a_diverged_report_not_an_error():
    """Tune retries a trial that raises (resources.max_failures, for lost nodes): a diverging trial must
    return normally, with one last report that says why, and no checkpoint (the last good one stays)."""
    import torch

    from raydino.core.step import build_train_state
    from raydino.search.trial import train_and_report

    spec = spec_with(budget={"epochs": 2, "report_every": 1}, evaluation={"intermediate": True})
    cfg = load_config(
        "smoke", ["model.out_dim=64", "model.head_hidden_dim=32", "model.head_bottleneck_dim=16", "augment.n_local_crops=2", "train.epochs=2"]
    )
    state = build_train_state(cfg, steps_per_epoch=2)
    a = cfg.augment
    sizes = [a.global_crop_size] * 2 + [a.local_crop_size] * 2

    def epoch_batches(epoch):  # epoch 0 trains; epoch 1's first batch is NaN
        for _ in range(2):
            crops = [torch.rand(2, 3, s, s) * 255 for s in sizes]
            if epoch == 1:
                crops[0][0, 0, 0, 0] = float("nan")
            yield crops

    reports = []
    outcome = train_and_report(state, spec, epoch_batches, lambda m, ckpt: reports.append((m, ckpt)), evaluator=None)
    assert outcome == "diverged"
    assert [m.get("diverged", 0) for m, _ in reports] == [0, 1]  # the epoch-0 report, then the divergence
    last, ckpt = reports[-1]
    assert ckpt is None and last["step"] == 2 and "step 2" in last["diverged_reason"] and np.isnan(last["val_auroc"])
    assert reports[0][1] is not None  # the good epoch's report carried a checkpoint; the diverged one none
