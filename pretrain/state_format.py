"""The checkpoint's tensor format: fragments of flat parameters, addressed by name and offset, not by rank.

A rank owns the slice ``[start, start + numel)`` of each flattened parameter whose fp32 master (and
Adam moments, and EMA) it updates under ZeRO (see :mod:`pretrain.engine.deepspeed`). Its checkpoint
file holds, per owned fragment, tensors named ``<kind>/<param name>#<start>`` for kinds ``master``,
``ema`` and each optimizer state (``exp_avg``, ``exp_avg_sq``), plus ``rng/*`` and the model's persistent
buffers whole (``buffer/<name>``: e.g. BatchNorm statistics, which are not parameters, are not sharded
and, without SyncBN, differ per rank). The fragment table
(:class:`FragmentEntry` per fragment) is stored with every rank and copied into the manifest, so:

- an **exact** resume (same world size, same partition) copies each tensor back in place;
- a **resharded** resume (other world size or ZeRO stage) fills each new fragment from whichever saved
  fragments overlap it;
- **export** consolidates full tensors from every rank's fragments.

The last two share :func:`overlaps`. This module owns every name and layout; nothing else builds or
parses fragment keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Protocol

import numpy as np
import torch

MASTER = "master"
EMA = "ema"
BUFFER = "buffer"


class StateFormatError(ValueError):
    """Saved fragments do not cover what is being loaded (another model, or a damaged table)."""


@dataclass(frozen=True)
class FragmentEntry:
    name: str
    shape: tuple[int, ...]
    start: int
    numel: int

    def to_json(self) -> list:
        return [self.name, list(self.shape), self.start, self.numel]

    @classmethod
    def from_json(cls, row: list) -> "FragmentEntry":
        name, shape, start, numel = row
        return cls(str(name), tuple(int(s) for s in shape), int(start), int(numel))


class LocalFragment(Protocol):
    """What a live fragment offers (``pretrain.engine.deepspeed.Fragment``)."""

    name: str
    shape: tuple[int, ...]
    start: int
    numel: int
    master: torch.Tensor
    states: dict[str, torch.Tensor]


def key(kind: str, name: str, start: int) -> str:
    """The tensor name of one fragment of one kind in a rank file."""
    return f"{kind}/{name}#{start}"


def entry_of(fragment: LocalFragment) -> FragmentEntry:
    return FragmentEntry(fragment.name, tuple(fragment.shape), fragment.start, fragment.numel)


def table(fragments: Iterable[LocalFragment]) -> list[list]:
    """The JSON fragment table of a rank."""
    return [entry_of(f).to_json() for f in fragments]


def parse_table(rows: list[list]) -> list[FragmentEntry]:
    return [FragmentEntry.from_json(r) for r in rows]


def parameter_shapes(tables: Iterable[list[FragmentEntry]]) -> dict[str, tuple[int, ...]]:
    """Full parameter shapes named in the fragment tables of all ranks."""
    return {e.name: e.shape for rows in tables for e in rows}


def snapshot(fragments: list[LocalFragment], emas: list[torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """Host copies of this rank's master, optimizer-state and EMA fragments."""
    tensors: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for i, f in enumerate(fragments):
            tensors[key(MASTER, f.name, f.start)] = f.master.detach().to("cpu", copy=True)
            for kind, value in f.states.items():
                tensors[key(kind, f.name, f.start)] = value.detach().to("cpu", copy=True)
            if emas is not None:
                tensors[key(EMA, f.name, f.start)] = emas[i].detach().to("cpu", copy=True)
    return tensors


def buffer_names(module: torch.nn.Module) -> list[str]:
    """`module`'s persistent buffers (those its state_dict saves)."""
    params = {name for name, _ in module.named_parameters()}
    return [name for name in module.state_dict() if name not in params]


def buffer_snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Host copies of `module`'s persistent buffers."""
    state = module.state_dict()
    with torch.no_grad():
        return {f"{BUFFER}/{name}": state[name].detach().to("cpu", copy=True) for name in buffer_names(module)}


def buffers_in(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The buffers of a rank file, by their module name."""
    return {k[len(BUFFER) + 1:]: t for k, t in tensors.items() if k.startswith(f"{BUFFER}/")}


def check_buffers(module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Raise unless a rank file holds every persistent buffer of `module` (checked before anything is copied)."""
    missing = sorted(set(buffer_names(module)) - set(buffers_in(tensors)))
    if missing:
        raise StateFormatError(f"the checkpoint lacks the model's buffers {missing[:8]}")


def load_buffers(module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy a rank file's buffers (see :func:`check_buffers`) into `module`."""
    saved, state = buffers_in(tensors), module.state_dict()
    with torch.no_grad():
        for name in buffer_names(module):
            state[name].copy_(saved[name])


def is_exact(saved: list[FragmentEntry], fragments: list[LocalFragment]) -> bool:
    """Whether a saved table is this rank's partition fragment for fragment (same world and stage)."""
    return saved == [entry_of(f) for f in fragments]


def check_complete(tensors: dict[str, torch.Tensor], entries: list[FragmentEntry], kinds: list[str]) -> None:
    """Raise unless a rank file holds every `kind` of every fragment it lists, with the right sizes."""
    for entry in entries:
        for kind in kinds:
            found = tensors.get(key(kind, entry.name, entry.start))
            if found is None and kind == EMA:
                continue  # written with the EMA off: it restarts from the weights
            if found is None or found.numel() != entry.numel:
                raise StateFormatError(f"{key(kind, entry.name, entry.start)}: "
                                       f"{'missing' if found is None else f'{found.numel()} elements'}, "
                                       f"the table says {entry.numel}")


def _targets(fragment: LocalFragment, ema: torch.Tensor | None) -> Iterator[tuple[str, torch.Tensor]]:
    yield MASTER, fragment.master
    yield from fragment.states.items()
    if ema is not None:
        yield EMA, ema


def _source(tensors: dict[str, torch.Tensor], kind: str, entry: FragmentEntry) -> torch.Tensor:
    found = tensors.get(key(kind, entry.name, entry.start))
    if found is None and kind == EMA:  # checkpoints written without an EMA start it from the weights
        found = tensors[key(MASTER, entry.name, entry.start)]
    if found is None:
        raise StateFormatError(f"the checkpoint has no {kind!r} tensor for {entry.name}[{entry.start}:]")
    return found


@torch.no_grad()
def load_exact(fragments: list[LocalFragment], emas: list[torch.Tensor] | None,
               tensors: dict[str, torch.Tensor]) -> None:
    """Copy a rank file written by the same partition back in place."""
    for i, f in enumerate(fragments):
        entry = entry_of(f)
        for kind, target in _targets(f, emas[i] if emas is not None else None):
            target.copy_(_source(tensors, kind, entry))


@dataclass(frozen=True)
class Piece:
    """Elements [lo, hi) of a flat parameter: at `dst` in the target, at `src` in saved fragment `entry`."""

    rank: int
    entry: FragmentEntry
    dst: slice
    src: slice


def overlaps(saved: dict[int, list[FragmentEntry]], name: str, start: int, numel: int) -> list[Piece]:
    """The saved fragments covering ``name[start:start+numel]``; raises if they leave a gap or overlap."""
    pieces, spans = [], []
    for rank, rows in saved.items():
        for entry in rows:
            if entry.name != name:
                continue
            lo, hi = max(entry.start, start), min(entry.start + entry.numel, start + numel)
            if lo < hi:
                pieces.append(Piece(rank, entry, slice(lo - start, hi - start), slice(lo - entry.start, hi - entry.start)))
                spans.append((lo, hi))
    spans.sort()
    total = sum(hi - lo for lo, hi in spans)
    disjoint = all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    if total != numel or not disjoint:
        raise StateFormatError(f"{name}[{start}:{start + numel}]: saved fragments cover {total} of {numel} elements"
                               f"{'' if disjoint else ' and overlap'} (is the checkpoint from another model?)")
    return pieces


def resharding_plan(saved: dict[int, list[FragmentEntry]], fragments: list[LocalFragment]) -> list[list[Piece]]:
    """Per local fragment, the saved pieces that fill it (checked before anything is copied)."""
    return [overlaps(saved, f.name, f.start, f.numel) for f in fragments]


def ranks_needed(plan: list[list[Piece]]) -> list[int]:
    return sorted({p.rank for pieces in plan for p in pieces})


@torch.no_grad()
def load_resharded(fragments: list[LocalFragment], emas: list[torch.Tensor] | None, plan: list[list[Piece]],
                   tensors_by_rank: dict[int, dict[str, torch.Tensor]]) -> None:
    """Fill this rank's fragments from the saved fragments that overlap them (elastic resume)."""
    for i, (f, pieces) in enumerate(zip(fragments, plan)):
        for kind, target in _targets(f, emas[i] if emas is not None else None):
            for p in pieces:
                target[p.dst] = _source(tensors_by_rank[p.rank], kind, p.entry)[p.src]


def consolidate(saved: dict[int, list[FragmentEntry]], tensors_by_rank: Callable[[int], dict[str, torch.Tensor]],
                kind: str) -> dict[str, torch.Tensor]:
    """Full fp32 tensors of `kind` (``master`` or ``ema``) from every rank's fragments (export, tests)."""
    shapes = parameter_shapes(saved.values())
    out: dict[str, torch.Tensor] = {}
    order = sorted(shapes)  # group reads by rank: a loader that caches one rank file at a time reads each once
    pieces = {name: overlaps(saved, name, 0, int(np.prod(shapes[name]))) for name in order}
    flats = {name: torch.empty(int(np.prod(shapes[name])), dtype=torch.float32) for name in order}
    for rank in sorted({p.rank for ps in pieces.values() for p in ps}):
        tensors = tensors_by_rank(rank)
        for name in order:
            for p in pieces[name]:
                if p.rank == rank:
                    flats[name][p.dst] = _source(tensors, kind, p.entry)[p.src]
    for name in order:
        out[name] = flats[name].view(shapes[name])
    return out


def rank_tables(rows_by_rank: Iterable[Any]) -> dict[int, list[FragmentEntry]]:
    """{rank: entries} from the manifest's per-rank JSON fragment tables."""
    return {rank: parse_table(rows) for rank, rows in enumerate(rows_by_rank)}
