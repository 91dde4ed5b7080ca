"""Recipe side (imports Ray): the Ray Data stream of augmented multi-crops from Parquet shards.

shards (local / s3://) ──read_parquet──▶ rows of encoded images ──map_batches(tasks)──▶
decode + multi-crop (uint8) ──streaming_split──▶ one stream per Ray Train worker.

The augmentation runs in Ray Data tasks, so CPU-only nodes (labelled by the cluster configs) can
do it while GPU nodes train; `map_batches` re-runs every epoch, so every epoch gets fresh crops.
With `augment.device: cuda` the tasks only filter the rows and pass the encoded images on; each
training worker then makes its crops on its own GPU (`worker_epoch_batches`).

Why tasks and not an actor pool: Ray Data tears an actor pool down at the end of every epoch and
starts new actors (a fresh Python process that imports torch) at the next one.  Tasks run in Ray's
pooled worker processes, which survive between epochs, and `augment_batch` keeps one
`MultiCropAugment` per process in a module-level cache.  Measured with the smoke config on the
2-core dev machine: the second epoch's pipeline start fell from ~8 s to ~3 s (docs/pretrain.md).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from .config import AugmentConfig, Config
from .data.loader import PRETRAIN_SPLITS, crop_keys, pretrain_rows  # noqa: F401 (re-exported for recipes)

# One augmenter per (config, splits) in each Ray worker process; reused by every task it runs.
_AUGMENTERS: dict[str, tuple[Any, set[str]]] = {}


def _augmenter(augment: dict[str, Any], splits: tuple[str, ...]) -> tuple[Any, set[str]]:
    key = json.dumps([augment, list(splits)], sort_keys=True)
    if key not in _AUGMENTERS:
        import torch

        from .augment import MultiCropAugment

        torch.set_num_threads(1)  # one core per task: Ray schedules tasks, not threads
        _AUGMENTERS[key] = (MultiCropAugment(AugmentConfig.model_validate(augment)), set(splits))
    return _AUGMENTERS[key]


def augment_batch(
    batch: dict[str, np.ndarray], augment: dict[str, Any], splits: tuple[str, ...] = PRETRAIN_SPLITS
) -> dict[str, np.ndarray]:
    """`map_batches` function: encoded images of the pretraining splits → uint8 multi-crops."""
    aug, keep_splits = _augmenter(augment, splits)
    keep = [i for i, s in enumerate(batch["split"]) if s in keep_splits]
    return aug.augment_batch([batch["image"][i] for i in keep])


def encoded_batch(batch: dict[str, np.ndarray], splits: tuple[str, ...] = PRETRAIN_SPLITS) -> dict[str, np.ndarray]:
    """`map_batches` function for `augment.device: cuda`: the pretraining rows' encoded images, as they are."""
    keep = np.array([s in splits for s in batch["split"]], dtype=bool)
    return {"image": batch["image"][keep]}


def worker_epoch_batches(cfg: Config, shard: Any, device: Any, seed: int) -> Callable[[int], Iterator[list[Any]]]:
    """`epoch -> iterator of crop lists` for a Ray Train worker reading its `get_dataset_shard`.

    augment.device=cpu: the stream carries uint8 crops; they are only batched as tensors here.
    augment.device=cuda: the stream carries encoded images; `DeviceMultiCropAugment` decodes them on
    the CPU and makes every crop of the batch on this worker's GPU (uint8, already on the device).
    """
    import torch

    keys = crop_keys(cfg.augment)
    batch_size = cfg.train.batch_size
    if cfg.augment.device == "cuda":
        from .augment_gpu import DeviceMultiCropAugment

        aug = DeviceMultiCropAugment(cfg.augment, device=device, seed=seed)

        def on_device(epoch: int):
            for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=True):
                out = aug.augment_tensors(list(batch["image"]))
                yield [out[k] for k in keys]

        return on_device

    def from_stream(epoch: int):
        for batch in shard.iter_torch_batches(batch_size=batch_size, drop_last=True, dtypes=torch.uint8):
            yield [batch[k] for k in keys]

    return from_stream


def pretrain_shard_paths(shards: Any, splits: tuple[str, ...] = PRETRAIN_SPLITS) -> list[str]:
    present = [s for s in splits if shards.rows(s) > 0]
    return sorted({p for s in present for p in shards.shard_paths(s)})


def data_execution_options(cfg: Config) -> Any:
    """Ray Data options for the training ingest, carrying `data.node_labels` to every data task.

    Ray Train replaces a dataset's execution options with its own defaults (which drop
    `label_selector`), so the selector must also reach Train through `DataConfig(execution_options=...)`.
    """
    from ray.data import DataContext, ExecutionOptions

    # The fields of Train's `DataConfig.default_ingest_options()`, minus the deprecated exclude_resources.
    current = DataContext.get_current().execution_options
    return ExecutionOptions(
        resource_limits=current.resource_limits,
        preserve_order=current.preserve_order,
        verbose_progress=current.verbose_progress,
        label_selector=dict(cfg.data.node_labels) if cfg.data.node_labels else None,
    )


@contextmanager
def _parquet_reader_v1() -> Iterator[None]:
    """Build `read_parquet` with Ray Data's V1 Parquet reader, not the V2 default of Ray 2.60.

    V2 starts every execution (every epoch) with a `ListFiles` task that costs over 2 s of idle
    waiting (its thread pool shuts down with a 2 s join timeout) and reserves a whole CPU.  V1 plans
    the read tasks once on the driver from the explicit shard list: on the smoke config the
    second epoch's stream started in ~0.2 s instead of ~3-4 s (docs/pretrain.md).  The dataset
    keeps the context it was built with, so the switch only needs to hold while it is built.
    """
    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved = ctx.use_datasource_v2
    ctx.use_datasource_v2 = False
    try:
        yield
    finally:
        ctx.use_datasource_v2 = saved


def build_pretrain_dataset(cfg: Config, shards: Any):
    """Lazy Ray Dataset of augmented crops (nothing is read until a worker iterates).

    Every data task (Parquet reads, augmentation) reserves `data.augment_cpus`
    logical CPUs and, with `data.node_labels`, runs only on nodes carrying those labels.
    """
    import ray

    labels = dict(cfg.data.node_labels) if cfg.data.node_labels else None
    placement: dict[str, Any] = {"label_selector": labels} if labels else {}
    with _parquet_reader_v1():
        ds = ray.data.read_parquet(
            pretrain_shard_paths(shards),
            filesystem=shards.location.fs,
            columns=["image", "split"],
            # Reads only move bytes; reserving a whole CPU each (Ray's default) can leave them unplaceable
            # next to fractional training workers, and Ray Data would then wait forever.
            num_cpus=cfg.data.augment_cpus,
            ray_remote_args=placement or None,
        )
    on_gpu = cfg.augment.device == "cuda"
    return ds.map_batches(
        encoded_batch if on_gpu else augment_batch,
        fn_kwargs={} if on_gpu else {"augment": cfg.augment.model_dump(mode="json")},
        batch_size=cfg.data.decode_batch_size,
        batch_format="numpy",
        num_cpus=cfg.data.augment_cpus,
        concurrency=cfg.data.augment_concurrency,  # None: as many tasks as free CPUs allow
        **placement,
    )
