"""The Ray Data stream a training worker reads, both ways: crops made by CPU data tasks, or (with
`augment.device: cuda`) encoded images streamed as they are and the crops made on the worker's device.

A real local Ray (conftest's `local_ray`); the worker's side (`worker_epoch_batches`) reads a real
`DataIterator`, as `ray.train.get_dataset_shard` hands it over.  On a machine without a GPU the device
pipeline runs on the CPU (the same code; tests/test_gpu.py covers CUDA itself).
"""

from __future__ import annotations

import pytest
import torch

from raydino.config import ConfigError, load_config
from raydino.data.loader import pretrain_rows
from raydino.data.shards import ShardSet, open_shards
from raydino.data.synth import synthetic_shards
from raydino.distributed.streaming import build_pretrain_dataset, worker_epoch_batches

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> ShardSet:
    uri = synthetic_shards(40, 64, seed=11, cache_root=str(tmp_path_factory.mktemp("synth")), workers=1, progress=False)
    return open_shards(uri)


def cfg_for(*extra: str):
    return load_config("smoke", ["train.batch_size=4", "augment.n_local_crops=3", *extra])


def epochs(cfg, shards: ShardSet, n: int = 1) -> list[list[list[torch.Tensor]]]:
    """n epochs of one worker (one `worker_epoch_batches`, as a training worker holds it)."""
    batches = worker_epoch_batches(cfg, build_pretrain_dataset(cfg, shards).iterator(), DEVICE, seed=0)
    return [list(batches(e)) for e in range(n)]


def check_crops(cfg, batches: list[list[torch.Tensor]], shards: ShardSet) -> None:
    a = cfg.augment
    assert len(batches) == pretrain_rows(shards) // cfg.train.batch_size  # every pretraining row, drop_last
    for crops in batches:
        assert [tuple(c.shape) for c in crops] == [(4, 3, a.global_crop_size, a.global_crop_size)] * 2 + [
            (4, 3, a.local_crop_size, a.local_crop_size)
        ] * 3
        assert all(c.dtype == torch.uint8 for c in crops)
        assert crops[0].float().std() > 5  # real image content, not zeros


@pytest.mark.slow
@pytest.mark.usefixtures("local_ray")
def test_crops_made_by_cpu_data_tasks(shards):
    cfg = cfg_for()
    (batches,) = epochs(cfg, shards)
    check_crops(cfg, batches, shards)
    assert all(c.device.type == "cpu" for crops in batches for c in crops)


@pytest.mark.slow
@pytest.mark.usefixtures("local_ray")
def test_gpu_mode_streams_encoded_images_and_the_worker_makes_the_crops(shards):
    cfg = cfg_for("augment.device=cuda", "run.gpus_per_worker=1")
    ds = build_pretrain_dataset(cfg, shards)
    rows = ds.take_all()
    assert len(rows) == pretrain_rows(shards)  # val/test rows never reach pretraining
    assert {tuple(r) for r in rows} == {("image",)}
    assert all(bytes(r["image"][:2]) == b"\xff\xd8" for r in rows)  # JPEG, as stored: no work on the data nodes
    first, second = epochs(cfg, shards, 2)
    for batches in (first, second):
        check_crops(cfg, batches, shards)
        assert all(c.device.type == DEVICE for crops in batches for c in crops)
    assert not torch.equal(first[0][0].cpu(), second[0][0].cpu())  # every epoch new crops


def test_gpu_augmentation_without_gpus_is_refused():
    with pytest.raises(ConfigError, match=r"augment.device='cuda'.*run.gpus_per_worker=0") as err:
        cfg_for("augment.device=cuda")
    assert "\n  augment.device='cuda' makes" in str(err.value)  # one readable line, no empty field prefix
