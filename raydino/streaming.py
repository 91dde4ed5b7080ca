"""Recipe side (imports Ray): the Ray Data stream of augmented multi-crops from Parquet shards.

shards (local / s3://) ──read_parquet──▶ rows of encoded images ──map_batches(actor pool)──▶
decode + multi-crop (uint8) ──streaming_split──▶ one stream per Ray Train worker.

The augmentation runs in Ray Data actors, so CPU-only nodes (labelled by the cluster configs) can
do it while GPU nodes train; `map_batches` re-runs every epoch, so every epoch gets fresh crops.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .config import AugmentConfig, Config
from .data.loader import PRETRAIN_SPLITS, crop_keys, pretrain_rows  # noqa: F401 (re-exported for recipes)


class AugmentBatch:
    """Callable class for `map_batches`: each actor builds its augmentation once and reuses it."""

    def __init__(self, augment: dict[str, Any], splits: tuple[str, ...] = PRETRAIN_SPLITS) -> None:
        import torch

        from .augment import MultiCropAugment

        torch.set_num_threads(1)  # one core per actor: Ray schedules actors, not threads
        self.aug = MultiCropAugment(AugmentConfig.model_validate(augment))
        self.splits = set(splits)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keep = [i for i, s in enumerate(batch["split"]) if s in self.splits]
        return self.aug.augment_batch([batch["image"][i] for i in keep])


def pretrain_shard_paths(shards: Any, splits: tuple[str, ...] = PRETRAIN_SPLITS) -> list[str]:
    present = [s for s in splits if shards.rows(s) > 0]
    return sorted({p for s in present for p in shards.shard_paths(s)})


def build_pretrain_dataset(cfg: Config, shards: Any, label_selector: dict[str, str] | None = None):
    """Lazy Ray Dataset of augmented crops (nothing is read until a worker iterates)."""
    import ray

    ds = ray.data.read_parquet(
        pretrain_shard_paths(shards),
        filesystem=shards.location.fs,
        columns=["image", "split"],
        file_extensions=None,
    )
    concurrency = cfg.data.augment_concurrency or 1
    remote_args: dict[str, Any] = {}
    if label_selector:
        remote_args["label_selector"] = label_selector
    return ds.map_batches(
        AugmentBatch,
        fn_constructor_kwargs={"augment": cfg.augment.model_dump()},
        batch_size=cfg.data.decode_batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_cpus=cfg.data.augment_cpus,
        **remote_args,
    )
