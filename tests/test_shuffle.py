"""The pretraining stream is shuffled as DINO's DistributedSampler(shuffle=True) + set_epoch shuffles.

A class-sorted RETFound tree (`train/<class>/...`, listed class by class) is sharded and read
through the stream's own read + shuffle (`pretrain_rows_dataset` with `id`/`label` columns, and
`local_shuffle_args`, the arguments every worker's iterator gets), on a real local Ray (the slow tests):

* batches mix classes as a random permutation does (and the order of before, source order with no
  shuffle in the stream, does not);
* every epoch has a new order, the same seed gives the same orders (Ray's file shuffle and the
  shuffle buffer each, and both together);
* split across two workers, an epoch delivers every row exactly once.

Each holds for both read stages: Ray Train's (`read_parquet` + `FileShuffleConfig`) and the one of a
process that iterates the stream itself, a one-worker Tune trial (`in_process`: a dataset of shard
paths, `randomize_block_order`, map tasks that read).  The last test shows why the latter exists:
it runs while other actors hold every CPU.

Ray Data is told to preserve order here, so every comparison is exact; in training it does not, and
the parallel read and augmentation tasks interleave their blocks as they finish.
"""

from __future__ import annotations

import threading
from math import comb

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray

from raydino.config import ConfigError, load_config
from raydino.data.shards import ShardSet, open_shards
from raydino.data.synth import generate_dataset
from raydino.data.writer import ShardJobOptions, shard_dataset
from raydino.distributed.streaming import (
    build_pretrain_dataset,
    local_shuffle_args,
    pretrain_rows_dataset,
    shuffle_buffer_rows,
    worker_epoch_batches,
)

BATCH = 8
COLUMNS = ("id", "label")


@pytest.fixture(scope="module")
def ordered_ray(local_ray):
    """The module's local Ray (conftest's `local_ray`), told to preserve order: datasets built from here on
    keep it, so comparisons are exact."""
    ctx = ray.data.DataContext.get_current()
    saved = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True
    yield
    ctx.execution_options.preserve_order = saved


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """200 tiny synthetic photographs in RETFound layout: train has 140 rows in 5 classes (68/14/39/8/11)."""
    root = tmp_path_factory.mktemp("tree") / "retfound"
    generate_dataset(str(root), 200, 16, seed=3, workers=1, progress=False)
    return root


def shard(tree, dest, seed: int | None) -> ShardSet:
    # ~10 KB shards: a dozen train shards, so the shard order can change.
    shard_dataset(str(tree), str(dest), options=ShardJobOptions(target_shard_mb=0.01, workers=1, progress=False, shuffle_seed=seed))
    return open_shards(str(dest))


@pytest.fixture(scope="module")
def shards(tree, tmp_path_factory) -> ShardSet:
    return shard(tree, tmp_path_factory.mktemp("shuffled"), seed=0)


@pytest.fixture(scope="module")
def sorted_shards(tree, tmp_path_factory) -> ShardSet:
    """The shards of before: rows in source order (split, then path: class by class)."""
    return shard(tree, tmp_path_factory.mktemp("sorted"), seed=None)


@pytest.fixture(params=[False, True], ids=["train-reader", "in-process-reader"])
def in_process(request) -> bool:
    return request.param


def cfg_for(*extra: str):
    return load_config("smoke", [f"train.batch_size={BATCH}", *extra])


def epoch_batches(it, cfg, epoch: int, rank: int = 0, drop_last: bool = True) -> list[list[tuple[str, str]]]:
    """One epoch of (id, label) batches, drawn as a training worker draws its crops."""
    return [
        list(zip(b["id"], b["label"]))
        for b in it.iter_batches(batch_size=BATCH, batch_format="numpy", drop_last=drop_last, **local_shuffle_args(cfg, epoch, rank))
    ]


def ids(batches: list[list[tuple[str, str]]]) -> list[str]:
    return [i for b in batches for i, _ in b]


def expected_distinct(counts: dict[str, int], b: int) -> float:
    """E[#classes in a batch of b] for a uniformly random order: sum over classes of P(class present)."""
    n = sum(counts.values())
    return sum(1 - comb(n - c, b) / comb(n, b) for c in counts.values())


def mean_distinct(batches: list[list[tuple[str, str]]]) -> float:
    return float(np.mean([len({label for _, label in b}) for b in batches]))


def test_shards_record_their_row_order(shards, sorted_shards):
    assert shards.manifest.row_order == {"shuffled": True, "seed": 0} and shards.rows_shuffled
    assert sorted_shards.manifest.row_order == {"shuffled": False, "seed": None} and not sorted_shards.rows_shuffled
    assert shards.rows("train") == 140 and len(shards.shard_paths("train")) >= 8


@pytest.mark.slow
@pytest.mark.usefixtures("ordered_ray")
def test_batches_mix_classes_like_a_random_permutation(shards, sorted_shards, in_process):
    counts = shards.manifest.totals.by_split_label["train"]
    assert len(counts) == 5
    expected = expected_distinct(counts, BATCH)  # 3.38 for 68/14/39/8/11
    # Over 3 epochs (51 batches) of random permutations the mean has a standard deviation of 0.07.
    tolerance = 0.3

    cfg = cfg_for()
    it = pretrain_rows_dataset(cfg, shards, COLUMNS, in_process=in_process).iterator()
    now = [b for e in range(3) for b in epoch_batches(it, cfg, e)]
    assert len(now) == 3 * (140 // BATCH)
    assert abs(mean_distinct(now) - expected) < tolerance, (mean_distinct(now), expected)

    # Before: rows in source order and no shuffle in the stream; batches hold one class, rarely two.
    before = cfg_for("data.shuffle_files=false", "data.shuffle_buffer=0")
    it = pretrain_rows_dataset(before, sorted_shards, COLUMNS, in_process=in_process).iterator()
    old = [b for e in range(3) for b in epoch_batches(it, before, e)]
    assert mean_distinct(old) < 1.5 and abs(mean_distinct(old) - expected) > tolerance


@pytest.mark.slow
@pytest.mark.usefixtures("ordered_ray")
def test_every_epoch_a_new_order_and_the_same_seed_the_same(shards, in_process):
    cfg = cfg_for()
    runs = []
    for _ in range(2):  # two streams built alike: the same orders, epoch by epoch
        it = pretrain_rows_dataset(cfg, shards, COLUMNS, in_process=in_process).iterator()
        runs.append([ids(epoch_batches(it, cfg, e, drop_last=False)) for e in range(3)])
    first, again = runs
    assert first == again
    assert first[0] != first[1] != first[2] != first[0]
    assert all(sorted(e) == sorted(first[0]) and len(set(e)) == 140 for e in first)  # the same rows, reordered

    other = cfg_for("train.seed=1")
    it = pretrain_rows_dataset(other, shards, COLUMNS, in_process=in_process).iterator()
    assert ids(epoch_batches(it, other, 0, drop_last=False)) != first[0]


def shard_order(shards: ShardSet, row_ids: list[str]) -> list[int]:
    """The order in which the shard files were read, from the rows' order."""
    where = {i: k for k, path in enumerate(shards.shard_paths("train")) for i in pq.read_table(path, columns=["id"]).column("id").to_pylist()}
    order: list[int] = []
    for i in row_ids:
        if not order or order[-1] != where[i]:
            order.append(where[i])
    return order


@pytest.mark.slow
@pytest.mark.usefixtures("ordered_ray")
def test_each_mechanism_alone_reshuffles_every_epoch(shards, in_process):
    # The file shuffle alone (reseeded per execution of the stream = per epoch).
    files = cfg_for("data.shuffle_buffer=0")
    orders = []
    for _ in range(2):
        it = pretrain_rows_dataset(files, shards, COLUMNS, in_process=in_process).iterator()
        orders.append([shard_order(shards, ids(epoch_batches(it, files, e, drop_last=False))) for e in range(2)])
    n = len(shards.shard_paths("train"))
    assert orders[0] == orders[1]  # same seed, same shard orders
    assert orders[0][0] != orders[0][1]
    assert all(sorted(o) == list(range(n)) for o in orders[0])  # each shard read once, whole

    # The shuffle buffer alone (files in manifest order): seeded by the epoch.
    buffer = cfg_for("data.shuffle_files=false")
    it = pretrain_rows_dataset(buffer, shards, COLUMNS, in_process=in_process).iterator()
    e0, e1 = (ids(epoch_batches(it, buffer, e, drop_last=False)) for e in range(2))
    assert e0 != e1 and sorted(e0) == sorted(e1)
    plain = cfg_for("data.shuffle_files=false", "data.shuffle_buffer=0")
    it = pretrain_rows_dataset(plain, shards, COLUMNS, in_process=in_process).iterator()
    assert ids(epoch_batches(it, plain, 0, drop_last=False)) == ids(epoch_batches(it, plain, 1, drop_last=False))


@pytest.mark.slow
@pytest.mark.usefixtures("ordered_ray")
def test_two_workers_see_every_row_exactly_once_per_epoch(shards, in_process):
    cfg = cfg_for()
    # As Ray Train splits the stream: streaming_split(world size, equal=True); ranks consume concurrently.
    splits = pretrain_rows_dataset(cfg, shards, COLUMNS, in_process=in_process).streaming_split(2, equal=True)
    seen: list[dict[int, list[str]]] = []
    for epoch in range(2):
        got: dict[int, list[str]] = {}

        def consume(rank: int) -> None:
            got[rank] = ids(epoch_batches(splits[rank], cfg, epoch, rank=rank, drop_last=False))

        threads = [threading.Thread(target=consume, args=(r,)) for r in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        union = got[0] + got[1]
        assert len(got[0]) == len(got[1]) == 70
        assert len(union) == len(set(union)) == 140 and set(union) == {i for i, _ in ids_and_labels(shards)}
        seen.append(got)
    assert seen[0][0] != seen[1][0]  # rank 0's epoch differs from its previous one


def ids_and_labels(shards: ShardSet) -> list[tuple[str, str]]:
    return [(r["id"], r["label"]) for r in shards.iter_rows(split="train", columns=["id", "label"])]


class RecordingIterator:
    """Stands in for a worker's `DataIterator`: records what each epoch's iteration asked for."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def iter_torch_batches(self, **kwargs):
        self.calls.append(kwargs)
        return iter(())

    def iter_batches(self, **kwargs):
        self.calls.append(kwargs)
        return iter(())


@pytest.mark.parametrize("extra", [(), ("augment.device=cuda", "run.gpus_per_worker=1")], ids=["cpu", "cuda"])
def test_worker_buffer_is_seeded_by_seed_epoch_and_rank(extra):
    cfg = cfg_for(*extra)
    seeds = {}
    for rank in (0, 1):
        it = RecordingIterator()
        batches = worker_epoch_batches(cfg, it, "cpu", seed=0, rank=rank, epoch_rows=400)
        for epoch in (0, 1, 0):
            list(batches(epoch))
        assert all(c["local_shuffle_buffer_size"] == 100 and c["drop_last"] for c in it.calls)  # capped: 400 // 4
        first, second, replay = (c["local_shuffle_seed"] for c in it.calls)
        assert first == replay != second
        seeds[rank] = first
    assert seeds[0] != seeds[1]
    other = RecordingIterator()
    list(worker_epoch_batches(cfg_for(*extra, "train.seed=5"), other, "cpu", seed=0, rank=0)(0))
    assert other.calls[0]["local_shuffle_seed"] != seeds[0] and other.calls[0]["local_shuffle_buffer_size"] == 1024
    off = RecordingIterator()
    list(worker_epoch_batches(cfg_for(*extra, "data.shuffle_buffer=0"), off, "cpu", seed=0, rank=0)(0))
    assert "local_shuffle_buffer_size" not in off.calls[0]


def test_shuffle_config_fields():
    cfg = cfg_for()
    assert (cfg.data.shuffle_buffer, cfg.data.shuffle_files) == (1024, True)
    assert shuffle_buffer_rows(cfg) == 1024 and shuffle_buffer_rows(cfg, 100_000) == 1024
    assert shuffle_buffer_rows(cfg, 200) == 50 and shuffle_buffer_rows(cfg, 10) == BATCH  # never below a batch
    with pytest.raises(ConfigError, match=r"data.shuffle_buffer=-1"):
        cfg_for("data.shuffle_buffer=-1")
    with pytest.raises(ConfigError, match=r"data.shuffle_files"):
        cfg_for("data.shuffle_files=sometimes")


@ray.remote(num_cpus=2)
class CpuHolder:
    """Holds every CPU of the module's Ray, as concurrent one-worker Tune trials do on a 2-core machine."""

    def ready(self) -> bool:
        return True


@pytest.mark.slow
@pytest.mark.usefixtures("ordered_ray")
def test_in_process_stream_needs_no_free_cpu(shards):
    """A one-worker Tune trial iterates the crop stream itself; its data tasks must run in its own CPUs."""
    holder = CpuHolder.remote()
    ray.get(holder.ready.remote())
    try:
        cfg = cfg_for("augment.n_local_crops=2")
        it = build_pretrain_dataset(cfg, shards, in_process=True).iterator()
        got: list = []
        # A stream that waited for a free CPU would never finish: give up after a generous while.
        t = threading.Thread(target=lambda: got.extend(worker_epoch_batches(cfg, it, "cpu", seed=0, rank=0, epoch_rows=140)(0)), daemon=True)
        t.start()
        t.join(timeout=300)
        assert not t.is_alive(), "the in-process stream waited for CPUs that concurrent trials hold"
        assert len(got) == 140 // BATCH and len(got[0]) == 4 and tuple(got[0][0].shape)[0] == BATCH
    finally:
        ray.kill(holder)
