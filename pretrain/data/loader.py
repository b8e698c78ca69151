"""Streaming train/eval loaders over shard sets, with exact mid-epoch resume.

``TrainLoader`` wraps a ``torch.utils.data.DataLoader`` whose workers are the reader streams of
:mod:`pretrain.data.order`. Each worker yields whole micro-batches tagged with its stream id and
cursor; the wrapper records the cursor of every batch it hands to the trainer, so
``state_dict()`` describes exactly what training consumed (prefetched batches are not counted).

What a sample becomes is the task's business (:class:`pretrain.data.decoder.SampleDecoder`: decode, augment,
collate); the loaders only read, seed and batch. Augmentation randomness is seeded from each sample's
global stream position, so a sample gets the same crop/flip/RandAugment whichever rank or worker reads
it, and resume reproduces it bit for bit.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import logging
import math
import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pretrain.config import DataConfig, StorageConfig
from pretrain.data.batch import Batch
from pretrain.data.decoder import SampleDecoder
from pretrain.data.order import LoaderState, RemainingPositions, SampleOrder, Topology, derive_seed
from pretrain.data.reader import RawSample, ShardReader, Skipped
from pretrain.data.shards import Manifest

log = logging.getLogger(__name__)


def worker_context() -> multiprocessing.context.BaseContext:
    """DataLoader workers fork from a single-threaded forkserver, never from the trainer itself.

    Forking a process that runs DeepSpeed, gloo, TensorBoard and (under Ray) gRPC threads can
    deadlock the child on a lock held at fork time; the forkserver has preloaded this module once.
    """
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx


@contextlib.contextmanager
def _seeded(seed: int, restore: bool) -> Iterator[None]:
    """Seed python/numpy/torch RNGs for one sample; restore them when running in the trainer."""
    saved = (random.getstate(), np.random.get_state(), torch.get_rng_state()) if restore else None
    random.seed(seed)
    np.random.seed(seed % 2**32)
    # not torch.manual_seed: without CUDA initialised it queues a CUDA re-seed with a formatted stack
    # trace (~1 ms per sample); the transforms only draw from the CPU generator
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        if saved is not None:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])


def _decode_sample(raw: RawSample | Skipped, decoder: SampleDecoder, seed: int | None,
                   in_worker: bool) -> tuple[torch.Tensor, Any] | Skipped:
    """The task's `decoder(raw)`, with the RNGs seeded from the sample's position (None: eval, no randomness)."""
    if isinstance(raw, Skipped):
        return raw
    if seed is None:
        return decoder(raw)
    with _seeded(seed, restore=not in_worker):
        return decoder(raw)


class _TrainStreams(IterableDataset):
    """One infinite stream of micro-batches per DataLoader worker (or one if num_workers == 0)."""

    def __init__(self, reader: ShardReader, order: SampleOrder, state: LoaderState, rank: int,
                 micro_batch: int, decoder: SampleDecoder, image_shape: tuple[int, int, int]):
        self.reader, self.order, self.state, self.rank = reader, order, state, rank
        self.micro_batch, self.decoder, self.image_shape = micro_batch, decoder, image_shape

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        topo, plan, seed = self.state.topology, self.state.plan, self.state.seed
        # The DataLoader always asks worker 0 first; rotate so the stream due next comes first.
        local = ((info.id if info is not None else 0) + self.state.next_stream[self.rank]) % topo.streams_per_rank
        stream = topo.stream_id(self.rank, local)
        cursor = self.state.cursors[stream]
        window_k, skip = divmod(cursor, topo.window)
        images, labels, keys, positions = [], [], [], []
        skipped: Counter = Counter()
        last_cursor = cursor
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") as pool:
            pending = pool.submit(self._fetch, plan, stream, window_k, skip)
            while True:
                order, raws = pending.result()
                pending = pool.submit(self._fetch, plan, stream, window_k + 1, 0)
                yielded = False
                for i in range(skip, len(order)):
                    position = int(order[i])
                    result = _decode_sample(raws[position], self.decoder, derive_seed(seed, "augment", position),
                                            info is not None)
                    cursor = window_k * topo.window + i + 1
                    if isinstance(result, Skipped):
                        skipped[result.reason] += 1
                        continue
                    images.append(result[0])
                    labels.append(result[1])
                    keys.append(raws[position].key)  # type: ignore[union-attr]
                    positions.append(position)
                    if len(images) == self.micro_batch:
                        # collated straight into shared memory in a worker: one copy fewer
                        yield Batch(*self.decoder.collate(images, labels), keys, positions, stream, cursor,
                                    dict(skipped))
                        images, labels, keys, positions, skipped = [], [], [], [], Counter()
                        last_cursor, yielded = cursor, True
                if not yielded and skipped:
                    # A whole window without a batch: report the skips anyway (an empty batch at the last
                    # yielded cursor), so that the trainer's skip threshold sees them instead of this
                    # stream searching the shard set forever. On resume they are read and counted again.
                    yield Batch.empty(self.image_shape, self.decoder.empty_target(), stream=stream,
                                      cursor=last_cursor, skipped=dict(skipped))
                    skipped = Counter()
                window_k, skip = window_k + 1, 0

    def _fetch(self, plan: RemainingPositions, stream: int, k: int, skip: int) -> tuple[np.ndarray, dict]:
        """Emission order of the stream's k-th window and the raw samples from `skip` on."""
        topo = self.state.topology
        order = plan.window_order(plan.stream_window(stream, k, topo), topo, self.state.seed)
        needed = order[skip:]
        shards, samples = self.order.locate(needed)
        return order, _read_by_shard(self.reader, needed, shards, samples)


def _read_by_shard(reader: ShardReader, positions: np.ndarray, shards: np.ndarray,
                   samples: np.ndarray) -> dict[int, RawSample | Skipped]:
    """The samples at `positions` (shard `shards[i]`, sample `samples[i]`), one ranged read per shard."""
    raws: dict[int, RawSample | Skipped] = {}
    for shard in np.unique(shards):
        mask = shards == shard
        got = reader.read(int(shard), samples[mask])
        raws.update({int(p): got[int(s)] for p, s in zip(positions[mask], samples[mask])})
    return raws


class TrainLoader:
    """Infinite, resumable stream of training micro-batches for one rank."""

    def __init__(self, url: str, manifest: Manifest, cfg: DataConfig, storage_cfg: StorageConfig | None,
                 rank: int, world_size: int, seed: int, decoder: SampleDecoder, pin_memory: bool = False):
        self.cfg, self.rank, self.pin_memory = cfg, rank, pin_memory
        self.reader = ShardReader(url, manifest, storage_cfg)
        self.order = SampleOrder([s.num_samples for s in manifest.shards], seed)
        self.topology = Topology(world_size, max(cfg.num_workers, 1), cfg.shuffle_window)
        self.state = LoaderState(seed, manifest.num_samples, self.topology, RemainingPositions(), [0] * self.topology.num_streams)
        self.decoder = decoder

    @property
    def num_samples(self) -> int:
        return self.state.num_samples

    def __iter__(self) -> Iterator[Batch]:
        dataset = _TrainStreams(self.reader, self.order, self.state, self.rank, self.cfg.micro_batch_size,
                                self.decoder, (self.cfg.image_size, self.cfg.image_size, 3))
        per_rank = self.topology.streams_per_rank
        for batch in build_dataloader(dataset, self.cfg, self.state.seed, self.pin_memory):
            self.state.cursors[batch.stream] = batch.cursor
            self.state.next_stream[self.rank] = (batch.stream - self.rank * per_rank + 1) % per_rank
            yield batch

    def shared_state(self) -> dict:
        """The part of the loader state that is the same on every rank (seed, set size, topology, plan)."""
        full = self.state.to_dict()
        return {k: full[k] for k in ("seed", "num_samples", "topology", "plan")}

    def state_dict(self) -> dict:
        """This rank's own part: the cursors of its streams and the stream due next."""
        per_rank = self.topology.streams_per_rank
        own = slice(self.rank * per_rank, (self.rank + 1) * per_rank)
        return {"rank": self.rank, "cursors": self.state.cursors[own], "next_stream": self.state.next_stream[self.rank]}

    def load_state_dict(self, shared: dict, ranks: list[dict]) -> None:
        """Continue from every rank's saved part; re-plans the rest of the epoch if the topology changed."""
        saved = LoaderState.from_dict(merge_rank_states(shared, ranks))
        self.state = saved.resumed_on(self.topology, self.state.seed, self.state.num_samples)


def merge_rank_states(shared: dict, ranks: list[dict]) -> dict:
    """The global loader state (``LoaderState.to_dict``) from the shared part and every rank's own part."""
    cursors = [int(c) for part in sorted(ranks, key=lambda p: p["rank"]) for c in part["cursors"]]
    next_stream = [int(part["next_stream"]) for part in sorted(ranks, key=lambda p: p["rank"])]
    return {**shared, "cursors": cursors, "next_stream": next_stream}


def build_dataloader(dataset: IterableDataset, cfg: DataConfig, seed: int, pin_memory: bool = False) -> DataLoader:
    """The one DataLoader construction: batches come whole from the dataset; workers from the forkserver."""
    workers = cfg.num_workers
    return DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                      prefetch_factor=cfg.prefetch_factor if workers else None,
                      multiprocessing_context=worker_context() if workers else None,
                      generator=torch.Generator().manual_seed(seed))


class _EvalStreams(IterableDataset):
    """Natural-order reading of a contiguous block of the eval set, split over DataLoader workers."""

    def __init__(self, reader: ShardReader, manifest: Manifest, block: tuple[int, int], batch_size: int,
                 decoder: SampleDecoder, window: int):
        self.reader, self.block, self.batch_size = reader, block, batch_size
        self.decoder, self.window = decoder, window
        counts = np.array([s.num_samples for s in manifest.shards])
        self.cum = np.concatenate([[0], np.cumsum(counts)])

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        lo, hi = self.block
        bounds = np.linspace(lo, hi, nw + 1).astype(np.int64)
        start, stop = int(bounds[wid]), int(bounds[wid + 1])
        for chunk_start in range(start, stop, self.window):
            positions = np.arange(chunk_start, min(chunk_start + self.window, stop))
            shards = np.searchsorted(self.cum, positions, side="right") - 1
            raws = _read_by_shard(self.reader, positions, shards, positions - self.cum[shards])
            for batch_start in range(0, len(positions), self.batch_size):
                images, labels = [], []
                for position in positions[batch_start:batch_start + self.batch_size]:
                    result = _decode_sample(raws[int(position)], self.decoder, None, True)
                    if not isinstance(result, Skipped):
                        images.append(result[0])
                        labels.append(result[1])
                if images:
                    yield Batch(*self.decoder.collate(images, labels))


class EvalLoader:
    """Held-out evaluation: every rank yields the same number of batches (padding with empty ones),
    because under ZeRO-3 every forward pass is a collective."""

    def __init__(self, url: str, manifest: Manifest, cfg: DataConfig, storage_cfg: StorageConfig | None,
                 rank: int, world_size: int, batch_size: int, decoder: SampleDecoder, max_samples: int = 0):
        total = manifest.num_samples if max_samples <= 0 else min(max_samples, manifest.num_samples)
        bounds = np.linspace(0, total, world_size + 1).astype(np.int64)
        self.block = (int(bounds[rank]), int(bounds[rank + 1]))
        self.num_samples = total
        largest = int(np.max(np.diff(bounds)))
        workers = max(cfg.num_workers, 1)
        # Upper bound on batches any rank yields: each worker's share may end in a partial batch.
        self.num_batches = math.ceil(largest / batch_size) + workers
        self.dataset = _EvalStreams(ShardReader(url, manifest, storage_cfg), manifest,
                                    self.block, batch_size, decoder, window=max(batch_size, cfg.shuffle_window))
        self.cfg = cfg
        self.image_shape = (cfg.image_size, cfg.image_size, 3)
        self.empty_target = decoder.empty_target()

    def __iter__(self) -> Iterator[Batch]:
        count = 0
        for batch in build_dataloader(self.dataset, self.cfg, 0):
            count += 1
            yield batch
        for _ in range(self.num_batches - count):
            yield Batch.empty(self.image_shape, self.empty_target)
