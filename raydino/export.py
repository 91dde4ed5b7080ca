"""`python -m raydino.export RUN_OR_CKPT --out backbone.safetensors`: the teacher backbone for timm users.

Writes the frozen teacher backbone with timm's own key names, so that plain timm loads it with
nothing of raydino installed:

    timm.create_model("vit_small_patch16_224", num_classes=0, checkpoint_path="backbone.safetensors",
                      img_size=224, dynamic_img_size=True)

and a sidecar `backbone.json` (arch, img_size, step, the exact create_model call, the resolved
pretraining config).  For ViTs pass the `img_size` the sidecar names: the position embedding is
saved for that grid, and `checkpoint_path` loads strictly (no resampling).  `checkpoint_path`, not
`pretrained=True` with `pretrained_cfg_overlay=dict(file=...)`: timm 1.0.29 routes a ViT's
pretrained `file` to its JAX .npz loader and refuses a safetensors file there (1.0.31 accepts it),
while `checkpoint_path` loads safetensors the same way in both (tests/test_export.py ran on both).
The export checks itself: it rebuilds the model through that very call and compares features on
a fixed input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import timm
import torch

from raydino.cli import USER_ERRORS, add_storage_arguments, local_file, user_error
from raydino.cli import storage_options as cli_storage_options
from raydino.config import ConfigError
from raydino.core.model import is_vit
from raydino.eval.backbones import LoadedBackbone, add_backbone_arguments, load_teacher_backbone

FORMAT = "raydino-backbone"


class ExportCheckFailed(RuntimeError):
    """timm alone did not rebuild the exported teacher: nothing is left at the output path."""


def create_model_call(arch: str, path: str | Path, img_size: int | None, vit: bool) -> str:
    """The one-line timm call that rebuilds the exported backbone."""
    extra = f", img_size={img_size}, dynamic_img_size=True" if vit and img_size else ""
    return f'timm.create_model("{arch}", num_classes=0, checkpoint_path="{path}"{extra})'


def timm_model(arch: str, path: str | Path, img_size: int | None, vit: bool) -> torch.nn.Module:
    """What `create_model_call` says, executed (used by the self-check)."""
    kwargs: dict[str, Any] = {"num_classes": 0, "checkpoint_path": str(path)}
    if vit and img_size:
        kwargs.update(img_size=img_size, dynamic_img_size=True)
    return timm.create_model(arch, **kwargs)


def verify_export(loaded: LoadedBackbone, path: Path, atol: float = 1e-5) -> float:
    """Rebuild through timm alone and compare pooled features on a fixed input; returns the max difference."""
    size = loaded.image_size or 224
    try:
        model = timm_model(loaded.arch, path, loaded.image_size, is_vit(loaded.backbone)).eval()
    except (RuntimeError, ValueError) as e:  # missing/unexpected keys, shape mismatches, a refused file
        raise ExportCheckFailed(f"export check failed: timm could not load the exported {loaded.arch}: {e}") from None
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = loaded.backbone.eval()(x)
        theirs = model(x)
    diff = float((ours - theirs).abs().max())
    if ours.shape != theirs.shape or diff > atol:
        raise ExportCheckFailed(
            f"export check failed: timm's {loaded.arch} built from the exported weights differs from the teacher "
            f"(shapes {tuple(ours.shape)} / {tuple(theirs.shape)}, max |diff| {diff:.2e})"
        )
    return diff


def export_backbone(source: str, out: str | Path, arch: str | None = None, verify: bool = True, storage_options: Any = None) -> dict[str, Any]:
    """Write `out` (.safetensors) and its `.json` sidecar; returns the sidecar's content."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.suffix != ".safetensors":
        raise ConfigError(f"--out {out}: the file name must end in .safetensors")
    loaded = load_teacher_backbone(source, arch=arch, storage_options=storage_options)
    # clone + contiguous: safetensors refuses tensors that share storage or are views.
    state = {k: v.detach().cpu().contiguous().clone() for k, v in loaded.backbone.state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    vit = is_vit(loaded.backbone)
    meta = {"format": FORMAT, "arch": loaded.arch, "img_size": str(loaded.image_size), "step": str(loaded.step)}
    # Written beside the target and moved into place only once checked, so a failed check leaves no
    # new weights next to an older sidecar (and an older export, if any, stays whole).
    tmp = out.with_name(f".{out.name}.partial.safetensors")
    save_file(state, str(tmp), metadata=meta)
    sidecar = {
        "format": FORMAT,
        "arch": loaded.arch,
        "img_size": loaded.image_size,
        "dynamic_img_size": vit,
        "num_features": int(getattr(loaded.backbone, "num_features", 0)),
        "step": loaded.step,
        "epoch": loaded.epoch,
        "source": loaded.source,
        "create_model": create_model_call(loaded.arch, out.resolve(), loaded.image_size, vit),
        "timm_version": timm.__version__,
        "torch_version": torch.__version__,
        "config": loaded.config,
    }
    try:
        if verify:
            sidecar["verified_max_abs_diff"] = verify_export(loaded, tmp)
        tmp_json = tmp.with_suffix(".json")
        tmp_json.write_text(json.dumps(sidecar, indent=2) + "\n")
        os.replace(tmp, out)
        os.replace(tmp_json, out.with_suffix(".json"))
    finally:
        tmp.unlink(missing_ok=True)
        tmp.with_suffix(".json").unlink(missing_ok=True)
    return sidecar


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m raydino.export", description=__doc__.split("\n\n")[0])
    add_backbone_arguments(p, positional=True, device=False)
    p.add_argument("--out", type=local_file, required=True, help="output file, e.g. backbone.safetensors (a .json sidecar goes beside it)")
    p.add_argument("--no-verify", action="store_true", help="skip reloading through timm and comparing features")
    add_storage_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        info = export_backbone(args.checkpoint, args.out, arch=args.arch, verify=not args.no_verify, storage_options=cli_storage_options(args))
    except (*USER_ERRORS, ExportCheckFailed) as e:
        return user_error("raydino.export", e)
    print(f"[raydino.export] {info['arch']} teacher backbone (step {info['step']}) → {args.out} (+ .json sidecar)")
    if "verified_max_abs_diff" in info:
        print(f"[raydino.export] checked: timm alone reproduces the features (max |diff| {info['verified_max_abs_diff']:.1e})")
    print("Load it with timm only:\n\n    import timm\n    model = " + info["create_model"] + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
