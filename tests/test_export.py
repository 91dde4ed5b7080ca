"""raydino.export: plain timm (no raydino) reloads the teacher; model.init reads exported and DINO files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from raydino import export
from raydino.config import ConfigError, load_config
from raydino.core.checkpoint import load_checkpoint, save_checkpoint
from raydino.core.model import build_student_teacher
from raydino.core.step import build_train_state
from raydino.core.weights import teacher_backbone_state
from raydino.eval import backbones

# Runs with `python -I` from an empty folder, with raydino made unimportable: only timm and torch.
CLEAN_LOAD = """
import sys
class NoRaydino:
    def find_spec(self, name, path=None, target=None):
        if name == "raydino" or name.startswith("raydino."):
            raise ImportError("raydino must not be needed to load an export")
sys.meta_path.insert(0, NoRaydino())
import json, numpy as np, timm, torch
call = json.load(open(sys.argv[1]))["create_model"]
model = eval(call).eval()
with torch.no_grad():
    np.save("y.npy", model(torch.from_numpy(np.load("x.npy"))).numpy())
assert not [m for m in sys.modules if m.startswith("raydino")]
print("clean load ok")
"""


def make_run(root: Path, overrides=()) -> Path:
    cfg = load_config("smoke", list(overrides))
    state = build_train_state(cfg, steps_per_epoch=2)
    with torch.no_grad():  # a teacher that differs from a fresh init and from the student
        for p in state.teacher.parameters():
            p.add_(0.02 * torch.randn_like(p))
    state.step = 5
    return save_checkpoint(state, root / "checkpoint_00000005")


@pytest.mark.slow  # a fresh Python with timm and torch per case
@pytest.mark.parametrize("arch,size", [("vit_tiny_patch16_224", 32), ("resnet18", 48)])
def test_export_loads_in_plain_timm(tmp_path, arch, size):
    run = tmp_path / "run"
    make_run(run, [f"model.arch={arch}", f"augment.global_crop_size={size}"])
    out = tmp_path / "export" / "backbone.safetensors"
    assert export.main([str(run), "--out", str(out)]) == 0
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["arch"] == arch and sidecar["step"] == 5 and sidecar["img_size"] == size
    assert ("img_size=" in sidecar["create_model"]) == arch.startswith("vit")

    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    clean = tmp_path / "clean"
    clean.mkdir()
    np.save(clean / "x.npy", x.numpy())
    proc = subprocess.run(
        [sys.executable, "-I", "-c", CLEAN_LOAD, str(out.with_suffix(".json"))],
        cwd=clean, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = torch.from_numpy(np.load(clean / "y.npy"))

    ckpt = load_checkpoint(run / "checkpoint_00000005")
    teacher = backbones.new_backbone(arch, size).eval()
    teacher.load_state_dict(teacher_backbone_state(ckpt))
    student = backbones.new_backbone(arch, size).eval()
    student.load_state_dict({k.removeprefix("backbone."): v for k, v in ckpt["student"].items() if k.startswith("backbone.")})
    with torch.no_grad():
        ours, students = teacher(x), student(x)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(theirs, students, atol=1e-3)  # exporting the student would have been caught


def test_export_rejects_bad_output_name(tmp_path, capsys):
    make_run(tmp_path / "run")
    assert export.main([str(tmp_path / "run"), "--out", str(tmp_path / "backbone.pt")]) == 2
    assert "must end in .safetensors" in capsys.readouterr().err


def test_model_init_from_export_and_official_dino(tmp_path):
    ckpt = make_run(tmp_path / "run")
    teacher_sd = teacher_backbone_state(load_checkpoint(ckpt))
    out = tmp_path / "backbone.safetensors"
    export.export_backbone(str(ckpt), out, verify=False)

    student, _ = build_student_teacher(load_config("smoke", [f"model.init={out}"]))
    for k, v in student.backbone.state_dict().items():
        torch.testing.assert_close(v, teacher_sd[k])

    # DINO's own format: the teacher under backbone.*, the DDP student under module.backbone.*, heads beside.
    dino = {
        "teacher": {**{f"backbone.{k}": v for k, v in teacher_sd.items()}, "head.last_layer.weight_g": torch.ones(1)},
        "student": {f"module.backbone.{k}": v + 1 for k, v in teacher_sd.items()},
        "epoch": 100,
    }
    torch.save(dino, tmp_path / "dino_deitsmall16_pretrain_full_checkpoint.pth")
    cfg = load_config("smoke", [f"model.init={tmp_path / 'dino_deitsmall16_pretrain_full_checkpoint.pth'}"])
    student, teacher = build_student_teacher(cfg)
    for k, v in student.backbone.state_dict().items():
        torch.testing.assert_close(v, teacher_sd[k])  # the teacher's weights, as DINO recommends
    torch.testing.assert_close(teacher.backbone.state_dict()["pos_embed"], teacher_sd["pos_embed"])


def _dino_vit_at(tmp_path: Path, img_size: int) -> tuple[Path, dict]:
    torch.manual_seed(0)
    vit = backbones.new_backbone("vit_tiny_patch16_224", img_size)
    sd = vit.state_dict()
    path = tmp_path / f"dino_vit_{img_size}.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in sd.items()}}, path)
    return path, sd


def test_evaluation_resamples_pos_embed_of_another_grid(tmp_path):
    from timm.layers import resample_abs_pos_embed

    path, sd = _dino_vit_at(tmp_path, 64)  # 4x4 grid + [CLS]
    loaded = backbones.load_teacher_backbone(path, arch="vit_tiny_patch16_224", image_size=32)  # 2x2 grid
    got = loaded.backbone.state_dict()["pos_embed"]
    assert got.shape == (1, 5, 192)
    torch.testing.assert_close(got, resample_abs_pos_embed(sd["pos_embed"], [2, 2], num_prefix_tokens=1))
    with pytest.raises(ConfigError, match="needs --arch"):
        backbones.load_teacher_backbone(path)


def test_model_init_resamples_pos_embed_of_another_grid(tmp_path):
    path, _ = _dino_vit_at(tmp_path, 64)  # e.g. official 224-px weights into a 32-px run
    student, _ = build_student_teacher(load_config("smoke", [f"model.init={path}"]))
    assert student.backbone.state_dict()["pos_embed"].shape == (1, 5, 192)


def test_failed_check_leaves_the_earlier_export_whole(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    make_run(run, ["model.arch=vit_tiny_patch16_224", "augment.global_crop_size=32"])
    out = tmp_path / "export" / "backbone.safetensors"
    assert export.main([str(run), "--out", str(out)]) == 0
    before = out.read_bytes(), out.with_suffix(".json").read_text()

    real = export.timm_model

    def drifted(*args, **kwargs):  # what a timm that loads the file differently would give
        model = real(*args, **kwargs)
        with torch.no_grad():
            model.patch_embed.proj.weight.mul_(1.01)  # (a uniform shift of cls_token would vanish in LayerNorm)
        return model

    monkeypatch.setattr(export, "timm_model", drifted)
    assert export.main([str(run), "--out", str(out)]) == 2
    assert "raydino.export: error: export check failed" in capsys.readouterr().err
    assert (out.read_bytes(), out.with_suffix(".json").read_text()) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["backbone.json", "backbone.safetensors"]  # no leftovers


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_backbone_weights_are_found_the_same_way_in_every_format(tmp_path, fmt):
    """`module.backbone.*` next to `module.head.*` (DINO's layout): the backbone alone, in either file format."""
    from safetensors.torch import save_file

    from raydino.core.weights import read_backbone_weights

    backbone = {"blocks.0.w": torch.ones(2), "norm.b": torch.zeros(3)}
    sd = {f"module.backbone.{k}": v for k, v in backbone.items()} | {"module.head.last_layer.w": torch.ones(4)}
    path = tmp_path / f"w.{fmt}"
    save_file(sd, str(path)) if fmt == "safetensors" else torch.save({"teacher": sd}, path)
    got = read_backbone_weights(path)
    assert got.keys() == backbone.keys() and all(torch.equal(got[k], v) for k, v in backbone.items())
