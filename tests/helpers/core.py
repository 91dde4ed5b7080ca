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


def graph_cfg(*extra: str):
    """`tiny_cfg` as a CUDA-graph step accepts it: fused AdamW, no freeze, no BatchNorm head; with
    stochastic depth and DINO's per-parameter clipping, so the graph body's versions of both are exercised."""
    return tiny_cfg(
        "optim.fused=true", "optim.freeze_last_layer_epochs=0", "model.drop_path_rate=0.1", "optim.clip_grad=0.3", "model.head_use_bn=false", *extra
    )


def graph_body_vs_ddp_worker(rank: int, world: int, port: int, out_dir: str, steps: int) -> None:
    """One rank of tests/test_step_speed.py's two-process check: on each rank's own crops, a DDP
    `train_step(defer=True)` beside the CUDA-graph body run eagerly (its own all-reduce, DDP's hooks
    idle), from the same weights; saves both sides' metrics and weights to out_dir/rank{rank}.pt."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from raydino.core.graphstep import GraphedStep
    from raydino.core.step import build_train_state, train_step

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        cfg = graph_cfg("optim.weight_decay=0.1")
        states = []
        for _ in range(2):
            torch.manual_seed(0)
            state = build_train_state(cfg, steps_per_epoch=steps, world_size=world)
            state.student = DistributedDataParallel(state.student)
            states.append(state)
        plain, graphed = states
        batches = [random_crops(cfg, 2, seed=100 * rank + i) for i in range(steps)]
        metrics: dict[str, list] = {"plain": [], "graphed": []}
        step = None
        for i, b in enumerate(batches):
            torch.manual_seed(7 + i)
            metrics["plain"].append(train_step(plain, b, defer=True))
            torch.manual_seed(7 + i)
            if i == 0:  # as in `fit`: the first steps go through DDP, the graph step takes over after
                metrics["graphed"].append(train_step(graphed, b, defer=True))
                step = GraphedStep(graphed, b, capture=False)
            else:
                metrics["graphed"].append(step(b))
        agreed = [step.capture_failed_anywhere(failed) for failed in (rank == 0, False)]
        result = {
            "capture_failed_anywhere": agreed,
            **{
                side: {
                    "loss": [float(m["loss"]) for m in metrics[side]],
                    "grad_norm_max": [float(m["grad_norm_max"]) for m in metrics[side]],
                    "student": [p.detach().clone() for p in state.student_module.parameters()],
                    "teacher": [p.detach().clone() for p in state.teacher.parameters()],
                    "center": state.loss_fn.center.clone(),
                }
                for side, state in (("plain", plain), ("graphed", graphed))
            },
        }
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
