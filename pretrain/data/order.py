"""Which sample every reader stream reads, as a pure function of (manifest, seed, topology, cursors).

Nothing here does I/O: it is the arithmetic that makes mid-epoch resume exact, which neither
WebDataset (its issues #234/#271 call it a non-goal) nor OpenCLIP's resampling offers.

Definitions
- The **global stream** S is the concatenation of epoch orders: position ``p`` belongs to epoch
  ``p // N``. Epoch ``e`` lists the shards in a seeded permutation (new each epoch) and each shard's
  samples in tar order. Shards are globally shuffled when built, so every shard mixes classes.
- A **plan** is the sequence V of S positions still to be read: ``pending`` ranges (left over by a
  resume on a different topology) followed by every position from ``base`` on.
- V is cut into **windows** of ``window`` positions. Window ``i`` goes to stream ``i % T`` where
  ``T = world_size x streams_per_rank`` (one stream per DataLoader worker). A stream emits each
  window in a seeded permutation: the window is the shuffle buffer, and because its order is a pure
  function of the window index, a stream's position is a single integer, its **cursor**.

Consequences
- Every position of S is read by exactly one stream, so each epoch visits every sample exactly once
  and no sample is dropped: the remainder of an epoch that does not fill a global batch simply
  continues into the next step. Streams are infinite, so every rank runs the same number of steps.
- Same topology: restoring the cursors reproduces the uninterrupted order exactly.
- Different topology: :meth:`RemainingPositions.after` turns the consumed set into a new plan whose ``pending``
  ranges are exactly the unread positions, so the rest of the epoch is covered once, in a new order.
- Augmentation randomness is seeded by S position (see loader), so it does not depend on topology.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from any parts (stable across processes and Python versions)."""
    digest = hashlib.blake2b("/".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass(frozen=True)
class Topology:
    world_size: int
    streams_per_rank: int
    window: int

    @property
    def num_streams(self) -> int:
        return self.world_size * self.streams_per_rank

    def stream_id(self, rank: int, local_stream: int) -> int:
        return rank * self.streams_per_rank + local_stream


class SampleOrder:
    """Maps global stream positions to (shard, sample-in-shard)."""

    def __init__(self, shard_counts: list[int] | np.ndarray, seed: int):
        self.counts = np.asarray(shard_counts, dtype=np.int64)
        if len(self.counts) == 0 or self.counts.sum() == 0:
            raise ValueError("the shard set holds no samples")
        self.num_samples = int(self.counts.sum())
        self.seed = seed
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        cached = self._epochs.get(epoch)
        if cached is None:
            perm = np.random.default_rng(derive_seed(self.seed, "shards", epoch)).permutation(len(self.counts))
            cached = (perm, np.cumsum(self.counts[perm]))
            if len(self._epochs) > 4:
                self._epochs.pop(next(iter(self._epochs)))
            self._epochs[epoch] = cached
        return cached

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard index, sample index within shard) for each S position."""
        positions = np.asarray(positions, dtype=np.int64)
        shards = np.empty_like(positions)
        samples = np.empty_like(positions)
        epochs = positions // self.num_samples
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            perm, cum = self._epoch(int(epoch))
            offset = positions[mask] - epoch * self.num_samples
            k = np.searchsorted(cum, offset, side="right")
            shards[mask] = perm[k]
            samples[mask] = offset - (cum[k] - self.counts[perm[k]])
        return shards, samples


@dataclass(frozen=True)
class RemainingPositions:
    """What an epoch has left to emit: V = pending ranges of S, then every position from `base` on."""

    base: int = 0
    pending: tuple[tuple[int, int], ...] = ()

    @property
    def pending_total(self) -> int:
        return sum(end - start for start, end in self.pending)

    @property
    def ident(self) -> int:
        return derive_seed("plan", self.base, *[x for r in self.pending for x in r])

    @cached_property
    def _pending_starts(self) -> np.ndarray:
        """V index at which each pending range begins (plus the total at the end)."""
        lengths = [end - start for start, end in self.pending]
        return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])

    def positions(self, start: int, stop: int) -> np.ndarray:
        """S positions at V indices [start, stop)."""
        out = []
        starts = self._pending_starts
        total = int(starts[-1])
        if start < total:
            first = int(np.searchsorted(starts, start, side="right")) - 1
            for i in range(first, len(self.pending)):
                if starts[i] >= stop:
                    break
                a, b = self.pending[i]
                lo, hi = max(start - int(starts[i]), 0), min(stop - int(starts[i]), b - a)
                out.append(np.arange(a + lo, a + hi, dtype=np.int64))
        lo, hi = max(start - total, 0), stop - total
        if lo < hi:
            out.append(np.arange(self.base + lo, self.base + hi, dtype=np.int64))
        return np.concatenate(out) if out else np.empty(0, dtype=np.int64)

    def window_order(self, window_index: int, topo: Topology, seed: int) -> np.ndarray:
        """S positions of window `window_index`, in the order its stream emits them."""
        start = window_index * topo.window
        positions = self.positions(start, start + topo.window)
        rng = np.random.default_rng(derive_seed(seed, "window", self.ident, window_index))
        return positions[rng.permutation(len(positions))]

    def stream_window(self, stream: int, k: int, topo: Topology) -> int:
        """V window index of the k-th window of `stream`."""
        return k * topo.num_streams + stream

    def after(self, topo: Topology, cursors: list[int], seed: int) -> "RemainingPositions":
        """The plan of what is left once each stream has emitted `cursors[stream]` samples.

        Windows before the slowest stream's first unfinished one are wholly consumed; only the few
        windows after that (about one per stream) are expanded position by position.
        """
        if len(cursors) != topo.num_streams:
            raise ValueError(f"expected {topo.num_streams} stream cursors, got {len(cursors)}")
        fulls = [int(c) // topo.window for c in cursors]
        first_open = min(fulls) * topo.num_streams  # every V window below this one is consumed
        consumed: list[np.ndarray] = []
        last_window = first_open - 1
        for stream, cursor in enumerate(cursors):
            full, part = divmod(int(cursor), topo.window)
            for k in range(min(fulls), full):
                w = self.stream_window(stream, k, topo)
                consumed.append(self.positions(w * topo.window, (w + 1) * topo.window))
                last_window = max(last_window, w)
            if part:
                w = self.stream_window(stream, full, topo)
                consumed.append(self.window_order(w, topo, seed)[:part])
                last_window = max(last_window, w)
        end = (last_window + 1) * topo.window  # V indices below `end` were handed out
        touched = self.positions(first_open * topo.window, end)
        done = np.concatenate(consumed) if consumed else np.empty(0, dtype=np.int64)
        remaining = np.setdiff1d(touched, done, assume_unique=True)
        remaining = np.concatenate([remaining, self.positions(end, max(end, self.pending_total))])
        new_base = self.base + max(0, end - self.pending_total)
        return RemainingPositions(base=new_base, pending=_to_ranges(np.sort(remaining)))

    def to_dict(self) -> dict:
        return {"base": self.base, "pending": [list(r) for r in self.pending]}

    @classmethod
    def from_dict(cls, data: dict) -> "RemainingPositions":
        return cls(base=int(data["base"]), pending=tuple((int(a), int(b)) for a, b in data["pending"]))


def _to_ranges(sorted_positions: np.ndarray) -> tuple[tuple[int, int], ...]:
    if len(sorted_positions) == 0:
        return ()
    breaks = np.nonzero(np.diff(sorted_positions) != 1)[0]
    starts = np.concatenate([[sorted_positions[0]], sorted_positions[breaks + 1]])
    ends = np.concatenate([sorted_positions[breaks] + 1, [sorted_positions[-1] + 1]])
    return tuple((int(a), int(b)) for a, b in zip(starts, ends))


@dataclass
class LoaderState:
    """Everything needed to continue reading: plain data, stored in checkpoints as JSON."""

    seed: int
    num_samples: int
    topology: Topology
    plan: RemainingPositions = field(default_factory=RemainingPositions)
    cursors: list[int] = field(default_factory=list)
    next_stream: list[int] = field(default_factory=list)
    """Per rank: the local stream whose batch comes next (DataLoader workers take turns)."""

    def __post_init__(self) -> None:
        if not self.next_stream:
            self.next_stream = [0] * self.topology.world_size

    def consumed(self) -> int:
        """Samples read since the start of training (including ones skipped as corrupt)."""
        return self.plan.base - self.plan.pending_total + sum(self.cursors)

    def to_dict(self) -> dict:
        t = self.topology
        return {"seed": self.seed, "num_samples": self.num_samples,
                "topology": {"world_size": t.world_size, "streams_per_rank": t.streams_per_rank, "window": t.window},
                "plan": self.plan.to_dict(), "cursors": list(self.cursors), "next_stream": list(self.next_stream)}

    @classmethod
    def from_dict(cls, data: dict) -> "LoaderState":
        return cls(seed=int(data["seed"]), num_samples=int(data["num_samples"]),
                   topology=Topology(**data["topology"]), plan=RemainingPositions.from_dict(data["plan"]),
                   cursors=[int(c) for c in data["cursors"]],
                   next_stream=[int(n) for n in data.get("next_stream", [])])

    def resumed_on(self, topo: Topology, seed: int, num_samples: int) -> "LoaderState":
        """This state continued on `topo`: exact when nothing changed, else re-planned."""
        if num_samples != self.num_samples:
            raise ValueError(f"the shard set changed ({self.num_samples} samples in the checkpoint, "
                             f"{num_samples} now); resume needs the same shard set")
        if seed != self.seed:
            raise ValueError(f"run.seed changed ({self.seed} -> {seed}); the data order depends on it")
        if topo == self.topology:
            return LoaderState(seed, num_samples, topo, self.plan, list(self.cursors), list(self.next_stream))
        plan = self.plan.after(self.topology, self.cursors, seed)
        return LoaderState(seed, num_samples, topo, plan, [0] * topo.num_streams)
