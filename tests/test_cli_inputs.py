"""Bad input every command must refuse before any work, with one line and exit status 2.

Outputs that are written on this machine (reports, exports, plans, benches, caches) refuse an
object-storage URI (which `Path` would have turned into a local folder named after the bucket, with
any credentials in its name) and a path where a file stands; a search spec's URIs are checked as
the pretraining config's are, and its probe set is read before Ray starts.  Everything runs in this
process: none of these may start Ray.
"""

from __future__ import annotations

import importlib
import os

import pytest
import ray

from raydino.config import ConfigError
from raydino.search.spec import load_spec

SECRET = "topsecretvalue"


@pytest.fixture
def in_the_way(tmp_path, monkeypatch):
    """A working directory holding a file named `afile`."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("not a folder")
    return tmp_path


# (module, argv) pairs; OUT is replaced by the output path under test
OUTPUTS = {
    "export": ("raydino.export", ["random", "--arch", "vit_tiny_patch16_224", "--out", "OUT"], "file"),
    "evaluate": ("raydino.evaluate", ["--checkpoint", "random", "--arch", "vit_tiny_patch16_224", "--data", "x", "--out", "OUT"], "folder"),
    "analyze": ("raydino.analyze", ["--checkpoint", "random", "--arch", "vit_tiny_patch16_224", "--data", "x", "--out", "OUT"], "folder"),
    "synth": ("raydino.synth", ["OUT", "--n", "3"], "folder"),
    "plan": ("raydino.plan", ["--images", "10", "--config", "vits16-paper", "--json", "OUT"], "file"),
    "shard --overlap": ("raydino.shard", ["--overlap", "a", "b", "--out", "OUT"], "folder"),
    "pretrain --cache": ("raydino.pretrain", ["--cache", "OUT", "--print-config"], "folder"),
    "tune --cache": ("raydino.tune", ["tuning/smoke.yaml", "--cache", "OUT", "--print-spec"], "folder"),
    "bench --out": ("raydino.bench.__main__", ["aug", "--out", "OUT"], "folder"),
    "bench --json": ("raydino.bench.__main__", ["aug", "--json", "OUT"], "file"),
}


def refused(module: str, argv: list[str], capsys) -> str:
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    assert not ray.is_initialized()
    return err


@pytest.mark.parametrize("command", list(OUTPUTS))
def test_an_output_written_here_refuses_a_uri_without_echoing_its_credentials(command, in_the_way, capsys):
    module, argv, kind = OUTPUTS[command]
    uri = f"s3://AKIAEXAMPLE:{SECRET}@bucket/out" + (".safetensors" if command == "export" else ".json" if kind == "file" else "")
    err = refused(module, [uri if a == "OUT" else a for a in argv], capsys)
    assert "a local path is expected" in err and SECRET not in err, err
    assert not (in_the_way / "s3:").exists()  # nothing written under a folder named after the scheme


@pytest.mark.parametrize("command", list(OUTPUTS))
def test_an_output_refuses_a_file_standing_where_its_folder_goes(command, in_the_way, capsys):
    module, argv, kind = OUTPUTS[command]
    out = "afile" if kind == "folder" else "afile/out.safetensors" if command == "export" else "afile/out.json"
    err = refused(module, [out if a == "OUT" else a for a in argv], capsys)
    assert ("exists and is not a folder" if kind == "folder" else "afile is a file, not a folder") in err, err


def test_a_file_output_refuses_a_folder():
    from argparse import ArgumentTypeError

    from raydino.cli import local_file, local_folder

    with pytest.raises(ArgumentTypeError, match="is a folder; a file path is expected"):
        local_file(".")
    assert str(local_folder("new/dir")) == "new/dir" and str(local_file("new/x.json")) == "new/x.json"


def test_a_bench_config_mistake_is_one_line_not_a_traceback(capsys):
    from raydino.bench.__main__ import main

    assert main(["gpu", "--device", "cpu", "--config", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("raydino.bench gpu: error: unknown config 'nosuch'") and "Traceback" not in err


@pytest.mark.parametrize(
    "override, message",
    [
        (f"storage=s3://AKIAEXAMPLE:{SECRET}@bucket/tune", "credentials in a URI are refused"),
        ("storage=s3:/bucket/tune", "storage"),
        ("storage=http://host/tune", "storage"),
        (f"evaluation.data=gs://user:{SECRET}@bucket/labelled", "credentials in a URI are refused"),
        ("name=../escape", "a name is one folder"),
        ("num_samples=true", "a number is expected, not a boolean"),
    ],
)
def test_a_search_specs_uris_names_and_numbers_are_checked(override, message):
    with pytest.raises(ConfigError) as err:
        load_spec("tuning/smoke.yaml", [override])
    assert message in str(err.value) and SECRET not in str(err.value), err.value


def test_print_spec_prints_nothing_of_a_spec_it_refuses(capsys):
    from raydino.tune import main

    assert main(["tuning/smoke.yaml", "--storage", f"s3://AKIAEXAMPLE:{SECRET}@bucket/tune", "--print-spec"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and SECRET not in err and "credentials in a URI are refused" in err


def test_the_probes_labelled_set_is_read_before_ray_starts(tmp_path, capsys):
    """A probe set that cannot be read used to fail in every trial, after Ray had started, and leave
    the experiment folder behind so that the corrected command was refused too."""
    from raydino.tune import main

    argv = [
        "tuning/smoke.yaml",
        "--set",
        f"evaluation.data={tmp_path / 'nowhere'}",
        "--storage",
        str(tmp_path / "tune"),
        "--cache",
        str(tmp_path / "cache"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "nowhere: no such directory" in err and not ray.is_initialized()
    assert not (tmp_path / "tune").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--lesion-count", "1e9"], "lesion count=1000000000.0: must be a number > 0 and <= 20"),
        (["--lesion-size", "25"], "lesion size=25.0: must be a number > 0 and <= 20"),
        (["--size", "20000"], "--size 20000: from 16 to 4096 px"),
    ],
)
def test_synth_refuses_what_it_could_not_draw(args, message, tmp_path, capsys):
    from raydino.synth import main

    assert main([str(tmp_path / "out"), "--n", "3", "--size", "32", *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_synth_needs_training_images(tmp_path, capsys):
    err = refused("raydino.synth", [str(tmp_path / "out"), "--splits", "0,0.5,0.5"], capsys)
    assert "with train > 0" in err


def test_shard_names_a_missing_labels_file_in_one_line(tmp_path, capsys):
    from raydino.data.synth import generate_dataset
    from raydino.shard import main

    generate_dataset(tmp_path / "photos", 4, 32, 0, progress=False, workers=1)
    assert main([str(tmp_path / "photos"), str(tmp_path / "shards"), "--labels", str(tmp_path / "none.csv")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("raydino.shard: error: ") and "none.csv" in err and "Traceback" not in err


def test_a_corrupt_checkpoint_or_weights_file_is_named_in_one_line(tmp_path, capsys):
    import torch

    from raydino.evaluate import main as evaluate
    from raydino.export import main as export

    run = tmp_path / "run" / "checkpoint_00000001"
    run.mkdir(parents=True)
    torch.save({"step": 1}, run / "state.pt")
    (run / "state.pt").write_bytes((run / "state.pt").read_bytes()[:100])  # truncated
    (tmp_path / "w.pth").write_text("garbage\n")
    (tmp_path / "w.safetensors").write_text("garbage\n")
    cases = [
        (evaluate, ["--checkpoint", str(tmp_path / "run"), "--data", str(tmp_path)], "state.pt: not a readable checkpoint"),
        (
            export,
            [str(tmp_path / "w.pth"), "--arch", "vit_tiny_patch16_224", "--out", str(tmp_path / "o.safetensors")],
            "w.pth: not a readable checkpoint",
        ),
        (
            export,
            [str(tmp_path / "w.safetensors"), "--arch", "vit_tiny_patch16_224", "--out", str(tmp_path / "o.safetensors")],
            "w.safetensors: not a readable safetensors file",
        ),
    ]
    for main, argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o.safetensors").exists()


def test_shard_refuses_a_dest_inside_its_source_folder_and_leaves_no_folder(tmp_path, capsys):
    from raydino.data.synth import generate_dataset
    from raydino.shard import main

    generate_dataset(tmp_path / "photos", 4, 32, 0, progress=False, workers=1)
    for dest in (tmp_path / "photos", tmp_path / "photos" / "shards"):
        assert main([str(tmp_path / "photos"), str(dest), "--quiet"]) == 2
        assert "is SRC" in capsys.readouterr().err
    assert not (tmp_path / "photos" / "shards").exists()
    # a source that cannot be read leaves no empty DEST behind either
    assert main([str(tmp_path / "nothing"), str(tmp_path / "out"), "--quiet"]) == 2
    assert not (tmp_path / "out").exists()
    assert main([str(tmp_path / "photos"), str(tmp_path / "out"), "--quiet"]) == 0


def test_a_truncated_or_missing_shard_stops_pretraining_before_ray(tmp_path, capsys):
    """Found with one listing of the shard folder, before Ray starts: training used to start and fail,
    or with a rewritten shard of another size, train on it."""
    from raydino.data.shards import open_shards
    from raydino.data.synth import synthetic_shards
    from raydino.pretrain import main

    data = synthetic_shards(40, 32, seed=3, cache_root=str(tmp_path / "synth"), workers=1, progress=False)
    first = sorted(open_shards(data).shard_paths("train"))[0]
    body = open(first, "rb").read()
    argv = ["--config", "smoke", "--data", data, "--storage", str(tmp_path / "runs"), "--no-probe"]
    with open(first, "wb") as f:
        f.write(body[: len(body) // 2])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"size {len(body) // 2} bytes, manifest says {len(body)}" in err and "--verify" in err and not ray.is_initialized()
    os.remove(first)
    assert main(argv) == 2
    assert "listed in the manifest is missing" in capsys.readouterr().err and not ray.is_initialized()
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--data", "s3:/bucket/labelled"], "--data s3:/bucket/labelled: s3: needs two slashes (s3://bucket/labelled)"),
        (["--data", f"gs://user:{SECRET}@bucket/labelled"], "credentials in a URI are refused"),
        (
            ["--data", ".", "--train-crop-scale", "0.9,0.1"],
            "--train-crop-scale (0.9, 0.1): train_crop_scale=[0.9, 0.1]: min 0.9 is greater than max 0.1",
        ),
    ],
)
def test_evaluate_names_a_malformed_data_uri_and_a_bad_probe_option(argv, message, capsys):
    from raydino.evaluate import main

    assert main(["--checkpoint", "random", "--arch", "vit_tiny_patch16_224", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and SECRET not in err and "Value error" not in err, err
