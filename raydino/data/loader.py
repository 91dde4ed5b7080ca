"""In-process multi-crop batches from shards: the single-process twin of the Ray Data stream.

Used where pretraining runs in one process without Ray (unit tests, notebooks); a one-worker Tune
trial reads the Ray Data stream itself.  Same shuffle as that stream: every epoch the shards in a
new order seeded by (seed, epoch), then a bounded shuffle buffer.  It reads one shard at a time and
augments batch by batch, so memory stays flat whatever the dataset size.  Same crop keys and dtype
as `raydino.distributed.streaming`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from raydino.augment.cpu import MultiCropAugment
from raydino.augment.device import build_augment
from raydino.config import AugmentConfig
from raydino.data.shards import ShardSet

PRETRAIN_SPLITS = ("train", "unlabelled")  # never val/test: the probe measures on those


def crop_keys(aug: AugmentConfig) -> list[str]:
    return ["global_0", "global_1"] + [f"local_{i}" for i in range(aug.n_local_crops)]


def pretrain_rows(shards: ShardSet, splits: Sequence[str] = PRETRAIN_SPLITS) -> int:
    return sum(shards.rows(s) for s in splits)


def local_epoch_batches(
    shards: ShardSet,
    augment: AugmentConfig,
    batch_size: int,
    seed: int = 0,
    splits: Sequence[str] = PRETRAIN_SPLITS,
    shuffle_buffer: int = 1024,
    device: str | torch.device | None = None,
) -> Callable[[int], Iterator[list[torch.Tensor]]]:
    """`epoch -> iterator of crop lists` (uint8 [B,3,S,S], globals first), reshuffled per epoch.

    With `augment.device: cuda` the crops are made on `device` (default: the current CUDA device)
    by the batched device pipeline, and arrive there; otherwise on the CPU.
    """
    aug = build_augment(augment, seed=seed, device=device) if augment.device == "cuda" else MultiCropAugment(augment, seed=seed)
    keys = crop_keys(augment)
    present = [s for s in splits if shards.rows(s) > 0]

    def epoch_batches(epoch: int) -> Iterator[list[torch.Tensor]]:
        rng = np.random.default_rng([seed, epoch])
        buffer: list[bytes] = []
        # Shards of every pretraining split, in a fresh order each epoch (raydino shards hold one split each).
        entries = [e for e in shards.manifest.shards if any(e.splits.get(s, 0) for s in present)]
        order = rng.permutation(len(entries))

        def drain(min_left: int) -> Iterator[list[torch.Tensor]]:
            while len(buffer) >= batch_size + min_left:
                idx = rng.choice(len(buffer), size=batch_size, replace=False)
                picked = [buffer[i] for i in idx]
                for i in sorted(idx, reverse=True):
                    buffer[i] = buffer[-1]
                    buffer.pop()
                out = aug.augment_tensors(picked)
                yield [out[k] for k in keys]

        for i in order:
            pf = shards.read_shard(entries[i], verify=False)
            for batch in pf.iter_batches(columns=["image", "split"]):
                buffer.extend(img for img, split in zip(batch.column("image").to_pylist(), batch.column("split").to_pylist()) if split in present)
                yield from drain(shuffle_buffer)
        yield from drain(0)  # the rest, full batches only (drop_last, as the Ray stream)

    return epoch_batches
