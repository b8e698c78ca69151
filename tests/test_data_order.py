"""The sample-order arithmetic behind exact and elastic mid-epoch resume (pure, no I/O)."""

from __future__ import annotations

import numpy as np
import pytest

from pretrain.data.order import LoaderState, RemainingPositions, SampleOrder, Topology


def emitted(state: LoaderState, stream: int, count: int) -> list[int]:
    """The next `count` S positions `stream` emits from its cursor."""
    topo, plan = state.topology, state.plan
    out: list[int] = []
    k, skip = divmod(state.cursors[stream], topo.window)
    while len(out) < count:
        order = plan.window_order(plan.stream_window(stream, k, topo), topo, state.seed)
        out.extend(order[skip:].tolist())
        k, skip = k + 1, 0
    return out[:count]


def consume(state: LoaderState, per_stream: list[int]) -> list[int]:
    got = []
    for stream, n in enumerate(per_stream):
        got += emitted(state, stream, n)
        state.cursors[stream] += n
    return got


def fresh(num_samples: int, topo: Topology, seed: int = 0) -> LoaderState:
    return LoaderState(seed, num_samples, topo, RemainingPositions(), [0] * topo.num_streams)


def test_one_epoch_visits_every_sample_once_across_ranks_and_workers():
    counts = [37, 40, 40, 11]  # uneven shards, N = 128
    order = SampleOrder(counts, seed=7)
    state = fresh(order.num_samples, Topology(world_size=2, streams_per_rank=2, window=8), seed=7)
    positions = consume(state, [32] * 4)  # 2 ranks x 2 workers x 32
    assert sorted(positions) == list(range(128))
    shards, samples = order.locate(np.array(positions))
    assert len(set(zip(shards.tolist(), samples.tolist()))) == 128  # every (shard, sample) exactly once


def test_epochs_reshuffle_shards_and_windows():
    order = SampleOrder([16] * 8, seed=1)
    first, _ = order.locate(np.arange(0, 128))
    second, _ = order.locate(np.arange(128, 256))
    assert not np.array_equal(first, second)
    topo = Topology(1, 1, 16)
    state = fresh(128, topo)
    assert emitted(state, 0, 16) != list(range(16))  # a window is emitted shuffled


def test_remainder_carries_into_the_next_epoch_without_loss_or_repeat():
    n = 50  # not a multiple of anything below
    state = fresh(n, Topology(2, 1, 8))
    positions = consume(state, [60, 60])  # 120 positions: 2 full epochs + 20
    assert len(set(positions)) == 120
    epochs = np.array(positions) // n
    for e in (0, 1):
        assert (epochs == e).sum() == n  # every sample of the first two epochs seen exactly once


def test_same_topology_resume_is_exact():
    topo = Topology(2, 2, 8)
    a = fresh(200, topo, seed=3)
    straight = [emitted(a, s, 40) for s in range(4)]
    b = fresh(200, topo, seed=3)
    consume(b, [13, 13, 12, 12])
    restored = LoaderState.from_dict(b.to_dict()).resumed_on(topo, 3, 200)
    rest = [emitted(restored, s, 40 - c) for s, c in zip(range(4), [13, 13, 12, 12])]
    for s, c in enumerate([13, 13, 12, 12]):
        assert straight[s][c:] == rest[s]


@pytest.mark.parametrize("old,new", [((2, 2), (1, 2)), ((1, 2), (2, 2)), ((2, 1), (3, 3)), ((1, 1), (2, 1))])
def test_elastic_resume_neither_repeats_nor_skips(old, new):
    n, seed = 97, 5
    state = fresh(n, Topology(*old, window=8), seed)
    seen = consume(state, [11 + 3 * s for s in range(state.topology.num_streams)])
    resumed = LoaderState.from_dict(state.to_dict()).resumed_on(Topology(*new, window=6), seed, n)
    assert resumed.consumed() == len(seen)
    # Keep reading on the new topology until the first epoch is complete.
    while not set(range(n)) <= set(seen):
        seen += consume(resumed, [1] * resumed.topology.num_streams)
    assert len(seen) == len(set(seen)), "a sample was read twice"
    # The epoch boundary is soft by at most one shuffle window per stream.
    assert len(seen) - n <= resumed.topology.num_streams * resumed.topology.window


def test_elastic_resume_is_exact_at_window_granularity():
    n, seed = 96, 2
    state = fresh(n, Topology(2, 2, 8), seed)
    first = consume(state, [8, 8, 8, 8])  # 32
    resumed = state.resumed_on(Topology(1, 4, 4), seed, n)
    second = consume(resumed, [16] * 4)  # the remaining 64, window-aligned
    assert sorted(first + second) == list(range(n))


def test_resume_rejects_a_different_shard_set_or_seed():
    state = fresh(100, Topology(1, 1, 8), seed=1)
    with pytest.raises(ValueError, match="shard set changed"):
        state.resumed_on(state.topology, 1, 101)
    with pytest.raises(ValueError, match="run.seed changed"):
        state.resumed_on(state.topology, 2, 100)
