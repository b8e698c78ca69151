"""Process-group setup from the launcher's environment (torchrun, the DeepSpeed launcher or Ray Train)."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def nccl_debug_env(trace_dir: str) -> dict[str, str]:
    """Environment that makes a hung NCCL collective visible: the watchdog tears the process down with
    an error naming the collective, and each rank dumps its flight-recorder ring buffer to
    ``<trace_dir>/nccl_trace_rank_<r>`` (read with ``torchfrtrace <trace_dir>``). Must be set before the
    process group is created (Ray creates it before the training function runs: the launcher passes it
    in the runtime environment)."""
    return {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "3", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
            "TORCH_FR_BUFFER_SIZE": "2000", "TORCH_FR_DUMP_TEMP_FILE": os.path.join(trace_dir, "nccl_trace_rank_"),
            "TORCH_NCCL_ENABLE_MONITORING": "1"}


def init_distributed(timeout_s: float, device: torch.device | None = None) -> DistContext:
    """Join (or create) the default process group: NCCL on GPUs, gloo on CPU.

    Ray Train initializes the group itself and knows each worker's GPU (`device`, from
    ``ray.train.torch.get_device()``); torchrun only sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* and one GPU
    per local rank is assumed. A single process without those variables gets a one-rank group so the
    same code path runs.
    """
    use_cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        device = device if device is not None else torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())))
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device)


def free_port() -> int:
    """A free TCP port on the loopback interface (single-process groups, local test servers)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def all_gather_object(obj: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def on_rank0(fn: Callable[[], T], share: bool = True) -> T | None:
    """Run `fn` on rank 0 only; every rank returns its result (with ``share=False`` only rank 0, the others
    get None), or raises its exception: no rank is left waiting in a collective because rank 0 failed."""
    result: Any = None
    outcome: tuple[bool, Any] | None = None
    if dist.get_rank() == 0:
        try:
            result = fn()
            outcome = (True, result if share else None)
        except Exception as exc:
            outcome = (False, exc)
    ok, value = broadcast_object(outcome)
    if not ok:
        raise value
    return result if dist.get_rank() == 0 else value


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is true on any rank (one tiny all-reduce)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_reduce_sum(values: list[float], device: torch.device, tail: torch.Tensor | None = None) -> list[float]:
    """Sum host `values` (then the device tensor `tail`, flattened) over all ranks: one collective and one
    read to the host. The host values reach a GPU through pinned memory, so the copy does not wait for the
    GPU's queue; the only synchronization is the final read."""
    t = torch.tensor(values, dtype=torch.float64)
    if device.type == "cuda":
        t = t.pin_memory().to(device, non_blocking=True)
    if tail is not None:
        t = torch.cat([t, tail.detach().to(device=device, dtype=torch.float64).reshape(-1)])
    dist.all_reduce(t)
    return t.tolist()


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
