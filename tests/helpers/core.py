"""The DINO core's test fixtures: a tiny config and random uint8 multi-crops (tests/test_core.py,
tests/test_step_speed.py)."""

from __future__ import annotations

import torch

from raydino.config import load_config


def tiny_cfg(*extra: str):
    """The smoke config (ViT-Tiny, 32/16 px crops) with a small head, no stochastic depth, two local crops."""
    return load_config(
        "smoke",
        [
            "model.out_dim=64",
            "model.head_hidden_dim=32",
            "model.head_bottleneck_dim=16",
            "model.drop_path_rate=0.0",
            "augment.n_local_crops=2",
            *extra,
        ],
    )


def random_crops(cfg, batch: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = cfg.augment
    sizes = [a.global_crop_size] * 2 + [a.local_crop_size] * a.n_local_crops
    return [torch.randint(0, 256, (batch, 3, s, s), generator=g, dtype=torch.uint8) for s in sizes]
