"""Config: presets, overrides, and bad input that stops before any work with a message that helps."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from raydino.config import AUGMENT_PRESETS, ConfigError, load_config, preset_names, resume_changes


def test_shipped_presets_load_and_carry_the_papers_numbers():
    assert {"demo", "smoke", "vits16-paper", "resnet50"} <= set(preset_names())
    for name in preset_names():
        load_config(name)
    strong = load_config("demo", ["augment.preset=strong"]).augment
    weak = load_config("demo", ["augment.preset=weak"]).augment
    med = load_config("demo", ["augment.preset=weak_med"]).augment
    assert (strong.global_crop_scale, strong.local_crop_scale) == ((0.4, 1.0), (0.05, 0.4))
    assert (strong.jitter_brightness, strong.jitter_contrast) == (0.4, 0.4)
    assert (weak.global_crop_scale, weak.local_crop_scale) == ((0.5, 1.0), (0.2, 0.5))
    assert (weak.jitter_brightness, weak.jitter_contrast) == (0.2, 0.2)
    assert (med.med_blur_sigma, med.noise_std, med.bias_field) == (0.1, 0.1, 0.1)
    assert (med.med_blur_p, med.noise_p, med.bias_field_p) == (0.5, 0.5, 0.5)
    assert weak.noise_p == 0 and strong.bias_field_p == 0
    # everything else is DINO's default
    for a in (strong, weak, med):
        assert (a.jitter_saturation, a.jitter_hue, a.jitter_p, a.grayscale_p) == (0.2, 0.1, 0.8, 0.2)
        assert (a.blur_p_global1, a.blur_p_global2, a.blur_p_local, a.blur_sigma) == (1.0, 0.1, 0.5, (0.1, 2.0))
        assert a.solarize_p_global2 == 0.2 and a.flip_p == 0.5 and a.interpolation == "bicubic"
    assert set(AUGMENT_PRESETS) == {"strong", "weak", "weak_med"}


def test_paper_config_is_dinos_vits16_recipe():
    c = load_config("vits16-paper")
    assert c.model.arch == "vit_small_patch16_224" and c.model.out_dim == 65536
    assert (c.model.head_hidden_dim, c.model.head_bottleneck_dim, c.model.head_layers) == (2048, 256, 3)
    assert (c.augment.global_crop_size, c.augment.local_crop_size, c.augment.n_local_crops) == (224, 96, 8)
    assert (c.loss.student_temp, c.loss.teacher_temp, c.loss.center_momentum) == (0.1, 0.04, 0.9)
    assert (c.optim.lr, c.optim.min_lr, c.optim.warmup_epochs) == (5e-4, 1e-6, 10)
    assert (c.optim.weight_decay, c.optim.weight_decay_end, c.optim.momentum_teacher) == (0.04, 0.4, 0.996)
    assert (c.optim.clip_grad, c.optim.freeze_last_layer_epochs) == (3.0, 1)
    r = load_config("resnet50")
    assert r.optim.optimizer == "sgd" and r.optim.lr == 0.03 and r.optim.weight_decay == 1e-4
    assert r.augment.global_crop_scale == (0.14, 1.0) and r.augment.local_crop_scale == (0.05, 0.14)


def test_explicit_fields_override_the_preset(tmp_path):
    c = load_config("demo", ["augment.preset=weak", "augment.local_crop_scale=[0.1, 0.3]"])
    assert c.augment.local_crop_scale == (0.1, 0.3) and c.augment.global_crop_scale == (0.5, 1.0)
    # the resolved config round-trips through YAML unchanged
    f = tmp_path / "resolved.yaml"
    f.write_text(c.to_yaml())
    assert load_config(str(f)) == c


def test_config_file_can_extend_a_preset(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text(yaml.safe_dump({"base": "smoke", "train": {"epochs": 7}}))
    c = load_config(str(f))
    assert c.train.epochs == 7 and c.augment.global_crop_size == load_config("smoke").augment.global_crop_size


@pytest.mark.parametrize(
    "override, expected",
    [
        ("model.arch=vit_tiny_patch16", ["model.arch", "vit_tiny_patch16", "vit_tiny_patch16_224"]),
        ("augment.global_crop_scale=[0.9, 0.5]", ["augment.global_crop_scale", "0.9", "greater than max"]),
        ("augment.local_crop_scale=[0.0, 0.5]", ["augment.local_crop_scale", "(0, 1]"]),
        ("augment.local_crop_scale=[0.2, 1.5]", ["augment.local_crop_scale", "(0, 1]"]),
        ("augment.n_local_crops=-1", ["augment.n_local_crops", "-1", "greater than or equal to 0"]),
        ("augment.preset=weakest", ["augment.preset", "weakest", "'strong', 'weak' or 'weak_med'"]),
        ("augment.n_local_crop=4", ["augment.n_local_crop", "unknown", "augment.n_local_crops"]),
        ("train.epoch=3", ["train.epoch", "unknown", "train.epochs"]),
        ("optim.optimizer=lamb", ["optim.optimizer", "lamb", "'adamw' or 'sgd'"]),
        ("probe.monitor=on", ["probe.monitor=True", "'fast', 'knn' or 'off'", "quote the word"]),
        # pydantic alone reads true as 1 and 1.0
        ("train.batch_size=true", ["train.batch_size=True", "a number is expected, not a boolean"]),
        ("augment.flip_p=yes", ["augment.flip_p=True", "a number is expected"]),
        ("run.max_node_wait_s=false", ["run.max_node_wait_s=False", "a number is expected"]),
        # a run name is one folder under run.storage
        ("run.name=../elsewhere", ["run.name='../elsewhere'", "a name is one folder"]),
        ("run.name=a/b", ["run.name='a/b'", "a name is one folder"]),
        ("run.name=.hidden", ["run.name='.hidden'", "starting with a letter or digit"]),
    ],
)
def test_bad_input_names_field_value_and_what_is_allowed(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config("demo", [override])
    for fragment in expected:
        assert fragment in str(err.value), f"{fragment!r} missing from: {err.value}"


def test_booleans_and_names_that_are_fine_still_load():
    c = load_config("smoke", ["train.compile=true", "run.name=dino-smoke_1.2", "model.init=null", "train.max_steps=null"])
    assert c.train.compile is True and c.run.name == "dino-smoke_1.2" and c.train.max_steps is None


def test_a_files_base_is_read_beside_it_and_a_base_loop_is_named(tmp_path, monkeypatch):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "parent.yaml").write_text("base: smoke\ntrain: {epochs: 7}\n")
    (tmp_path / "cfg" / "child.yaml").write_text("base: parent.yaml\ntrain: {batch_size: 4}\n")
    monkeypatch.chdir(tmp_path)  # parent.yaml is not in the working directory: only beside child.yaml
    c = load_config("cfg/child.yaml")
    assert (c.train.epochs, c.train.batch_size, c.model.arch) == (7, 4, load_config("smoke").model.arch)
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"config 'a.yaml': its base: chain comes back to it .*a.yaml -> .*b.yaml -> .*a.yaml"):
        load_config("a.yaml")


def test_a_bare_off_turns_the_monitor_off_from_the_command_line_and_a_file(tmp_path):
    """YAML 1.1 reads `off` as false; for `probe.monitor` that can only mean "off"."""
    assert load_config("smoke", ["probe.monitor=off"]).probe.monitor == "off"
    f = tmp_path / "quiet.yaml"
    f.write_text("base: smoke\nprobe:\n  monitor: off\n")
    assert load_config(str(f)).probe.monitor == "off"
    assert load_config("smoke", ["probe.monitor=knn"]).probe.monitor == "knn"


def test_unknown_key_in_a_yaml_file_is_named(tmp_path):
    f = tmp_path / "typo.yaml"
    f.write_text(yaml.safe_dump({"augment": {"global_crop_scal": [0.5, 1.0]}}))
    with pytest.raises(ConfigError, match=r"augment.global_crop_scal: unknown key; did you mean global_crop_scale"):
        load_config(str(f))


def test_unknown_preset_name_suggests_close_ones():
    with pytest.raises(ConfigError, match=r"unknown config 'smok'.*did you mean smoke"):
        load_config("smok")


@pytest.mark.slow  # `python -m raydino.pretrain` in a subprocess
def test_pretrain_cli_rejects_bad_config_before_any_work(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "raydino.pretrain", "--config", "smoke", "--set", "augment.n_local_crops=-2", "--storage", str(tmp_path / "runs")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "augment.n_local_crops" in proc.stderr and "-2" in proc.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / ".raydino").exists()  # nothing was started


def test_synthetic_set_settings_are_validated_with_the_field_named():
    cfg = load_config("demo", ["data.synthetic_splits=[0.3, 0.1, 0.6]", "data.synthetic_lesion_size=3"])
    assert cfg.data.synthetic_splits == (0.3, 0.1, 0.6) and cfg.data.synthetic_lesion_size == 3
    bad_values = {
        "data.synthetic_splits=[0.5, 0.5, 0.5]": "synthetic_splits",
        "data.synthetic_splits=[0, 0.5, 0.5]": "synthetic_splits",
        "data.synthetic_lesion_size=0": "synthetic_lesion_size",
        "data.synthetic_lesion_count=-1": "synthetic_lesion_count",
    }
    for bad, field in bad_values.items():
        with pytest.raises(ConfigError, match=field):
            load_config("demo", [bad])


def test_resume_refuses_schedule_changes_and_lists_the_allowed_ones():
    old = load_config("smoke").to_dict()
    new = load_config("smoke", ["train.log_every=1", "run.max_failures=10", "probe.monitor=knn"])
    refused, allowed = resume_changes(old, new)
    assert refused == []
    assert allowed == {
        "train.log_every": {"old": 2, "new": 1},
        "run.max_failures": {"old": 3, "new": 10},
        "probe.monitor": {"old": "fast", "new": "knn"},
    }
    # A key the old run's config lacks (added by a later raydino) was never chosen: allowed, recorded.
    del old["loss"]["koleo_weight"]
    assert resume_changes(old, load_config("smoke"))[1] == {"loss.koleo_weight": {"old": None, "new": 0.1}}
    refused, _ = resume_changes(load_config("smoke").to_dict(), load_config("smoke", ["augment.preset=strong", "optim.lr=0.1"]))
    assert any(r.startswith("augment.global_crop_scale:") for r in refused) and any(r.startswith("optim.lr:") for r in refused)


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.uri=gs:/bucket/shards", r"data\.uri='gs:/bucket/shards': gs: needs two slashes \(gs://bucket/shards\)"),
        ("data.uri=gs://", r"data\.uri='gs://': no bucket; expected gs://bucket/prefix"),
        ("run.storage=gs:///runs", r"run\.storage='gs:///runs': no bucket"),
        ("probe.data=s3:bucket/x", r"probe\.data='s3:bucket/x': s3: needs two slashes"),
        (
            "run.storage=http://host/runs",
            r"scheme http:// is not supported; allowed: a local path, file:///abs/path, s3://bucket/prefix, gs://bucket/prefix",
        ),
        ("data.uri=file://data/x", r"file:///absolute/path"),
        ("data.uri=gs://user:hunter2secret@bucket/x", r"data\.uri='gs://bucket/x': credentials in a URI are refused"),
        ("data.uri=gs://bucket/x?access_token=hunter2secret", r"data\.uri='gs://bucket/x': unknown query key\(s\) \['access_token'\]"),
        ("data.gcs_endpoint=ftp://host", r"data\.gcs_endpoint='ftp://host': expected http\(s\)://host\[:port\]"),
        ("data.gcs_endpoint=http://u:hunter2secret@host:1", r"data\.gcs_endpoint='http://host:1': expected"),
        ("data.s3_endpoint=http://host:9000/path", r"data\.s3_endpoint="),
    ],
)
def test_storage_uris_and_endpoints_are_checked_with_the_field_named(override, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config("smoke", [override])
    assert "hunter2secret" not in str(err.value)


def test_gcs_uris_and_endpoints_that_are_fine():
    cfg = load_config("smoke", ["data.uri=gs://bkt/shards", "run.storage=gcs://bkt/runs", "probe.data=gs://bkt/labelled",
                                "data.gcs_endpoint=http://127.0.0.1:9023"])  # fmt: skip
    assert (cfg.data.uri, cfg.run.storage, cfg.data.gcs_endpoint) == ("gs://bkt/shards", "gcs://bkt/runs", "http://127.0.0.1:9023")
    for ok in ("data.uri=shards", "data.uri=file:///abs/shards", "run.storage=runs:2024", "data.gcs_endpoint=gcs.internal:443",
               "data.uri=s3://b/p?endpoint_override=h:9000&scheme=http"):  # fmt: skip
        load_config("smoke", [ok])
