"""The DINO core on a real CUDA GPU: bf16 autocast, NCCL + DDP, the device augmentation.

Skipped where no GPU is visible (CI, the 2-core dev machines); run on a GPU node with
`python -m pytest tests/test_gpu.py`.  Imports no Ray.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from raydino.augment.cpu import MultiCropAugment
from raydino.augment.device import DeviceMultiCropAugment
from raydino.config import AugmentConfig, load_config
from raydino.core.step import autocast_dtype, build_train_state, train_step
from raydino.distributed.cluster import free_port

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def cfg_for(*extra: str):
    return load_config(
        "smoke",
        [
            "model.out_dim=256",
            "model.head_hidden_dim=64",
            "model.head_bottleneck_dim=32",
            "model.drop_path_rate=0.0",
            "augment.n_local_crops=2",
            "train.batch_size=8",
            *extra,
        ],
    )


def crops_for(cfg, seed: int = 0, device: str = "cuda") -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = cfg.augment
    sizes = [a.global_crop_size] * 2 + [a.local_crop_size] * a.n_local_crops
    return [torch.randint(0, 256, (cfg.train.batch_size, 3, s, s), generator=g, dtype=torch.uint8).to(device) for s in sizes]


@pytest.fixture(scope="module")
def nccl_group():
    """A one-rank NCCL process group: the backend Ray Train's TorchConfig picks on GPU workers."""
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    yield
    dist.destroy_process_group()


def test_bf16_autocast_trains_and_keeps_fp32_weights():
    cfg = cfg_for()  # precision auto
    torch.manual_seed(0)
    state = build_train_state(cfg, steps_per_epoch=20, device="cuda")
    assert autocast_dtype(cfg, state.device) == torch.bfloat16
    assert autocast_dtype(cfg_for("train.precision=fp32"), state.device) is None
    crops = crops_for(cfg)
    losses = [train_step(state, crops)["loss"] for _ in range(20)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.1  # it learns (the same batch 20 times)
    # Master weights stay fp32 under autocast, student and teacher alike.
    for module in (state.student, state.teacher):
        assert {p.dtype for p in module.parameters()} == {torch.float32}


def test_bf16_loss_close_to_fp32_loss_on_the_same_weights():
    losses = {}
    for precision in ("bf16", "fp32"):
        cfg = cfg_for(f"train.precision={precision}")
        torch.manual_seed(0)
        state = build_train_state(cfg, steps_per_epoch=5, device="cuda")
        losses[precision] = train_step(state, crops_for(cfg))["loss"]
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.02)


def test_cuda_fp32_steps_match_cpu_steps(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # the patch-embedding conv in full fp32
    matmul_precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # and every matmul
    try:
        cfg = cfg_for("train.precision=fp32")
        losses = {}
        for device in ("cpu", "cuda"):
            torch.manual_seed(0)
            state = build_train_state(cfg, steps_per_epoch=5, device=device)
            crops = crops_for(cfg, device=device)
            losses[device] = [train_step(state, crops)["loss"] for _ in range(3)]
    finally:
        torch.set_float32_matmul_precision(matmul_precision)
    assert losses["cuda"] == pytest.approx(losses["cpu"], rel=1e-3)
    assert losses["cpu"][2] != losses["cpu"][0]  # the steps changed the weights


def test_ddp_over_nccl_matches_a_plain_step(nccl_group):
    """One rank: DDP's NCCL all-reduce of gradients (and the loss's centre all-reduce) changes nothing."""
    cfg = cfg_for("train.precision=fp32")
    torch.manual_seed(0)
    plain = build_train_state(cfg, steps_per_epoch=5, device="cuda")
    wrapped = copy.deepcopy(plain)
    wrapped.student = DistributedDataParallel(wrapped.student, device_ids=[0])
    crops = crops_for(cfg)
    for _ in range(2):
        a, b = train_step(plain, crops), train_step(wrapped, crops)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    for p, q in zip(plain.student.parameters(), wrapped.student_module.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_resnet_trains_in_bf16_under_ddp_over_nccl(nccl_group):
    """BatchNorm under autocast and DDP (SyncBatchNorm itself needs 2+ GPUs: NCCL refuses two ranks on one)."""
    cfg = cfg_for("model.arch=resnet18")
    torch.manual_seed(0)
    state = build_train_state(cfg, steps_per_epoch=10, device="cuda")
    state.student = DistributedDataParallel(state.student, device_ids=[0])
    crops = crops_for(cfg)
    losses = [train_step(state, crops)["loss"] for _ in range(10)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


def test_device_augmentation_on_cuda_matches_cpu_with_the_same_draws():
    from raydino.bench.common import fundus_jpeg

    jpeg, _ = fundus_jpeg(256)
    results = {}
    for noise_p in (0.0, 1.0):
        cfg = AugmentConfig(preset="weak_med", global_crop_size=64, local_crop_size=32, n_local_crops=3, noise_p=noise_p)
        cpu = MultiCropAugment(cfg, backend="torch")
        gpu = DeviceMultiCropAugment(cfg, device="cuda")
        params = cpu.sample_params([(256, 256)] * 8, generator=3)
        a = cpu.augment_tensors([jpeg] * 8, params=params)
        b = gpu.augment_tensors([jpeg] * 8, params=params)
        assert set(a) == set(b)
        for k in a:
            assert b[k].is_cuda and b[k].dtype == torch.uint8 and b[k].shape == a[k].shape
        results[noise_p] = {k: (a[k].int() - b[k].cpu().int()).float() for k in a}
    for k, diff in results[0.0].items():
        # Same draws, no noise: CUDA resizes in float, the CPU in uint8, so a level here and there.
        assert diff.abs().mean() < 0.5 and diff.abs().max() <= 8, (k, diff.abs().mean(), diff.abs().max())
    for k, diff in results[1.0].items():
        # Additive noise (std 0.1 x 255) comes from each device's own generator: independent draws,
        # so the difference is noise of std ~sqrt(2) x 25.5 (less where clipped at 0 or 255).
        assert 15 < diff.std() < 45, (k, diff.std())
