"""Recipe side (imports Ray): the Ray Data stream of augmented multi-crops from Parquet shards.

shards (local / s3:// / gs://) ──read_parquet (shard order reshuffled every epoch)──▶ rows of encoded
images ──map_batches(tasks)──▶ decode + multi-crop (uint8) ──streaming_split──▶ one stream per
Ray Train worker ──local shuffle buffer (seeded by train.seed, epoch, rank)──▶ batches.

Shuffling, as DINO's DistributedSampler(shuffle=True) + set_epoch: the rows inside the shards are
already in a seeded random order (`raydino.shard`); every epoch the shard files are read in a new
seeded order (`FileShuffleConfig`) and each worker draws its batches through a seeded shuffle
buffer (`iter_batches(local_shuffle_buffer_size=...)`), so no two epochs see the same batches.

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

from raydino.config import AugmentConfig, Config
from raydino.data.loader import PRETRAIN_SPLITS, crop_keys

# One augmenter per (config, splits) in each Ray worker process; reused by every task it runs.
_AUGMENTERS: dict[str, tuple[Any, set[str]]] = {}


def _augmenter(augment: dict[str, Any], splits: tuple[str, ...]) -> tuple[Any, set[str]]:
    key = json.dumps([augment, list(splits)], sort_keys=True)
    if key not in _AUGMENTERS:
        import torch

        from raydino.augment.cpu import MultiCropAugment

        torch.set_num_threads(1)  # one core per task: Ray schedules tasks, not threads
        _AUGMENTERS[key] = (MultiCropAugment(AugmentConfig.model_validate(augment)), set(splits))
    return _AUGMENTERS[key]


def augment_batch(batch: dict[str, np.ndarray], augment: dict[str, Any], splits: tuple[str, ...] = PRETRAIN_SPLITS) -> dict[str, np.ndarray]:
    """`map_batches` function: encoded images of the pretraining splits → uint8 multi-crops."""
    aug, keep_splits = _augmenter(augment, splits)
    keep = [i for i, s in enumerate(batch["split"]) if s in keep_splits]
    return aug.augment_batch([batch["image"][i] for i in keep])


def encoded_batch(batch: dict[str, np.ndarray], splits: tuple[str, ...] = PRETRAIN_SPLITS) -> dict[str, np.ndarray]:
    """`map_batches` function for `augment.device: cuda`: the pretraining rows' encoded images, as they are."""
    keep = np.array([s in splits for s in batch["split"]], dtype=bool)
    return {"image": batch["image"][keep]}


def shuffle_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """A 32-bit seed of its own for every (train.seed, epoch, rank): the same triple, the same order."""
    return int(np.random.SeedSequence([seed % 2**64, epoch, rank]).generate_state(1)[0])


def shuffle_buffer_rows(cfg: Config, epoch_rows: int | None = None) -> int:
    """Rows in a worker's shuffle buffer: `data.shuffle_buffer`, at most a quarter of its epoch.

    Ray's buffer yields its first batch once about 1.5x its size is buffered; a buffer larger than
    the epoch would make every epoch's first step wait for all of that epoch's crops (no overlap of
    augmentation and training on small data sets).
    """
    rows = cfg.data.shuffle_buffer
    if rows and epoch_rows:
        rows = min(rows, max(cfg.train.batch_size, epoch_rows // 4))
    return rows


def local_shuffle_args(cfg: Config, epoch: int, rank: int = 0, epoch_rows: int | None = None) -> dict[str, Any]:
    """`iter_batches`/`iter_torch_batches` arguments for the epoch's seeded local shuffle (empty: off)."""
    rows = shuffle_buffer_rows(cfg, epoch_rows)
    if not rows:
        return {}
    return {"local_shuffle_buffer_size": rows, "local_shuffle_seed": shuffle_seed(cfg.train.seed, epoch, rank)}


def _train_rank() -> int:
    """This process's Ray Train world rank; 0 outside a Train worker (a Tune trial, a test)."""
    try:
        import ray.train

        return int(ray.train.get_context().get_world_rank())
    except Exception:  # noqa: BLE001 - no Train session here
        return 0


def worker_epoch_batches(
    cfg: Config, shard: Any, device: Any, seed: int, *, rank: int | None = None, epoch_rows: int | None = None
) -> Callable[[int], Iterator[list[Any]]]:
    """`epoch -> iterator of crop lists` for a Ray Train worker reading its `get_dataset_shard`
    (or for a one-worker Tune trial reading a whole stream's `DataIterator`).

    augment.device=cpu: the stream carries uint8 crops; they are only batched as tensors here.
    augment.device=cuda: the stream carries encoded images; `DeviceMultiCropAugment` decodes them on
    the CPU and makes every crop of the batch on this worker's GPU (uint8, already on the device).
    Both draw their batches through the epoch's seeded shuffle buffer (`local_shuffle_args`;
    `rank` None: this Train worker's rank; `epoch_rows`: the rows this worker reads per epoch).
    `seed` seeds the device crops (it changes when a worker restarts, so crops are not replayed).
    """
    import torch

    keys = crop_keys(cfg.augment)
    batch_size = cfg.train.batch_size
    rank = _train_rank() if rank is None else rank
    if cfg.augment.device == "cuda":
        from raydino.augment.device import DeviceMultiCropAugment

        aug = DeviceMultiCropAugment(cfg.augment, device=device, seed=seed)

        def on_device(epoch: int):
            shuffle = local_shuffle_args(cfg, epoch, rank, epoch_rows)
            for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=True, **shuffle):
                out = aug.augment_tensors(list(batch["image"]))
                yield [out[k] for k in keys]

        return on_device

    def from_stream(epoch: int):
        shuffle = local_shuffle_args(cfg, epoch, rank, epoch_rows)
        for batch in shard.iter_torch_batches(batch_size=batch_size, drop_last=True, dtypes=torch.uint8, **shuffle):
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


def _data_placement(cfg: Config, in_process: bool) -> tuple[float, int | None, dict[str, str] | None]:
    """(CPUs each data task reserves, tasks at a time per operator, node label selector) of the stream.

    A Ray Train run: `data.augment_cpus` each, on nodes with `data.node_labels` if set.  A process
    that trains by itself (`in_process`, a one-worker Tune trial): its data tasks run on its own
    node and reserve nothing, at most `run.cpus_per_worker` of them at a time, because that trial's
    CPU reservation already pays for its augmentation (it made its crops in-process before).  They
    must not wait for CPUs of their own: concurrent trials can hold every CPU of a small machine,
    and the stream would then wait forever.
    """
    if in_process:
        import ray

        # Ray's own label for "this node" (what Ray Data uses for local:// reads).
        here = {"ray.io/node-id": ray.get_runtime_context().get_node_id()}
        at_once = max(1, int(cfg.run.cpus_per_worker))
        return 0.0, min(at_once, cfg.data.augment_concurrency or at_once), here
    return cfg.data.augment_cpus, cfg.data.augment_concurrency, dict(cfg.data.node_labels) if cfg.data.node_labels else None


def read_shard_rows(batch: Any, filesystem: Any, columns: tuple[str, ...]) -> Iterator[Any]:
    """`map_batches` function: the rows of the shard files named in `batch["path"]`, a row group
    (~32 MB, see the writer) at a time, so a 256 MB shard never sits in one block."""
    import pyarrow.parquet as pq

    for path in batch.column("path").to_pylist():
        with filesystem.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            for i in range(pf.num_row_groups):
                yield pf.read_row_group(i, columns=list(columns))


def pretrain_rows_dataset(cfg: Config, shards: Any, columns: tuple[str, ...] = ("image", "split"), *, in_process: bool = False):
    """Lazy Ray Dataset of the pretraining shards' rows (`columns`), shard order reshuffled every epoch.

    The stream is re-executed once per epoch; with `data.shuffle_files` every execution reads the
    shard files in a new order, seeded by (train.seed, the dataset's execution count): a new order
    each epoch, the same orders for the same seed.  The count starts at 0 for every new stream, so
    a resumed run draws its file orders afresh.  `build_pretrain_dataset` maps these rows to crops;
    tests iterate them with `id`/`label` columns to see which rows each batch holds.

    Ray Train runs read with `read_parquet` (V1 reader) and `FileShuffleConfig(seed,
    reseed_after_execution=True)`, which the V1 reader applies in `get_read_tasks` at the start of
    every execution.  `in_process` streams list the shard files as a dataset of paths instead,
    permuted per execution by `randomize_block_order(RandomSeedConfig(seed, reseed_after_execution=
    True))`, and read them in map tasks: `read_parquet` samples Parquet footers in remote tasks of a
    whole CPU each while it builds the dataset, which would wait forever where trials hold every CPU.
    """
    import ray

    cpus, at_once, labels = _data_placement(cfg, in_process)
    seed = cfg.train.seed % 2**32
    if in_process:
        from ray.data import RandomSeedConfig, TaskPoolStrategy

        paths = pretrain_shard_paths(shards)
        ds = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=len(paths))
        if cfg.data.shuffle_files:
            ds = ds.randomize_block_order(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))
        return ds.map_batches(
            read_shard_rows, fn_kwargs={"filesystem": shards.location.fs, "columns": tuple(columns)},
            batch_size=1, batch_format="pyarrow", num_cpus=cpus, compute=TaskPoolStrategy(size=at_once), label_selector=labels,
        )  # fmt: skip
    from ray.data import FileShuffleConfig

    with _parquet_reader_v1():
        return ray.data.read_parquet(
            pretrain_shard_paths(shards),
            filesystem=shards.location.fs,
            columns=list(columns),
            shuffle=FileShuffleConfig(seed=seed, reseed_after_execution=True) if cfg.data.shuffle_files else None,
            # Reads only move bytes; reserving a whole CPU each (Ray's default) can leave them unplaceable
            # next to fractional training workers, and Ray Data would then wait forever.
            num_cpus=cpus,
            label_selector=labels,
        )


def build_pretrain_dataset(cfg: Config, shards: Any, *, in_process: bool = False):
    """Lazy Ray Dataset of augmented crops (nothing is read until a worker iterates).

    Every data task (Parquet reads, augmentation) reserves `data.augment_cpus`
    logical CPUs and, with `data.node_labels`, runs only on nodes carrying those labels.
    `in_process`: for a process that iterates the whole stream itself (see `_data_placement`).
    """
    from ray.data import TaskPoolStrategy

    cpus, at_once, labels = _data_placement(cfg, in_process)
    ds = pretrain_rows_dataset(cfg, shards, in_process=in_process)
    on_gpu = cfg.augment.device == "cuda"
    return ds.map_batches(
        encoded_batch if on_gpu else augment_batch,
        fn_kwargs={} if on_gpu else {"augment": cfg.augment.model_dump(mode="json")},
        batch_size=cfg.data.decode_batch_size,
        batch_format="numpy",
        num_cpus=cpus,
        compute=TaskPoolStrategy(size=at_once),  # size None: as many tasks as free CPUs allow
        label_selector=labels,
    )
