"""Rank-0 observability: TensorBoard scalars/images under <run.url>/tb/, a console line, MFU.

TensorBoard's writer only writes local files, so for remote run URLs events are written to a local
directory and mirrored to ``<run.url>/tb/`` every ``sync_every_s`` and at close (event files are
small and append-only, so re-uploading them whole is cheap). ``tensorboard --logdir`` then reads
either the local mirror or the remote copy.
"""

from __future__ import annotations

import logging
import os
import re
import resource
import tempfile
import time
from dataclasses import dataclass

import torch

from pretrain import storage
from pretrain.config import LoggingConfig, StorageConfig

log = logging.getLogger(__name__)

# Dense (no sparsity) bf16 tensor-core peaks in FLOP/s, as (regex that must match the WHOLE
# torch.cuda.get_device_name() string, case-insensitive, peak); first match wins, most specific first.
# Whole-name matching keeps "NVIDIA L40" from reading as an L4, "NVIDIA H100 PCIe" / "H100 NVL" from
# reading as an SXM part, "NVIDIA GB200" from reading as a B200 and "NVIDIA GH200" as an H200. A name
# that matches nothing gets no peak (MFU is then not reported rather than wrong); set
# logging.peak_tflops for such devices. Figures: NVIDIA datasheets / whitepapers, sparse figures halved.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    (r"NVIDIA H100 NVL", 835e12),
    (r"NVIDIA H100 PCIe", 756e12),
    (r"NVIDIA H100 (80GB HBM3|SXM5?( \d+GB)?)", 989e12),  # SXM5; torch reports "NVIDIA H100 80GB HBM3"
    (r"NVIDIA H200 NVL", 835e12),
    (r"NVIDIA H200( \d+GB( HBM3e)?)?", 989e12),  # SXM
    (r"NVIDIA GH200( .*)?", 989e12),  # Grace Hopper: the H100 SXM tensor-core peak
    (r"NVIDIA A100([- ].*)?", 312e12),  # 40/80 GB, SXM4 and PCIe
    (r"NVIDIA L40S", 362e12),
    (r"NVIDIA L40", 181e12),
    (r"NVIDIA L4", 121e12),
    (r"NVIDIA A10G", 70e12),  # UNCERTAIN: AWS-only part, no NVIDIA datasheet (the A10 is 125e12)
    (r"NVIDIA GB200", 2.5e15),  # per GPU: GB200 NVL72 = 180 PF dense bf16 / 72 GPUs
    (r"NVIDIA B200", 2.25e15),  # HGX B200
    (r"NVIDIA GeForce RTX 4090", 165e12),  # fp32 accumulate (what torch uses); 330e12 is fp16-accumulate
    (r"NVIDIA GeForce RTX 3090", 71e12),  # fp32 accumulate; not the 3090 Ti
    (r"(NVIDIA )?Tesla V100-SXM2-\d+GB", 125e12),  # fp16 tensor cores: V100 has no bf16 tensor cores
    (r"(NVIDIA )?Tesla V100-PCIE-\d+GB", 112e12),
)


def peak_for_device_name(name: str) -> float | None:
    """Dense bf16 peak FLOP/s for a ``torch.cuda.get_device_name()`` string; None if not known."""
    name = " ".join(name.split())
    return next((peak for pattern, peak in PEAK_BF16_FLOPS if re.fullmatch(pattern, name, re.IGNORECASE)),
                None)


def device_peak_flops(cfg: LoggingConfig, device: torch.device) -> float | None:
    """Peak FLOP/s for MFU: the configured value, else (``logging.measure_peak``) a measured bf16 matmul,
    else the table on CUDA (None: unknown GPU), else None (CPU)."""
    if cfg.peak_tflops > 0:
        return cfg.peak_tflops * 1e12
    if device.type != "cuda":
        return None
    if cfg.measure_peak:
        return measured_matmul_peak(device)
    return peak_for_device_name(torch.cuda.get_device_name(device))


def measured_matmul_peak(device: torch.device, n: int = 8192, reps: int = 20) -> float:
    """FLOP/s of a large bf16 matmul on `device` (the best of `reps`): what the GPU really sustains."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return 2 * n**3 / best


class InputStall:
    """Time the GPU had nothing to do because the next micro-batch was not there yet (CUDA events).

    An event is recorded when a micro-step's work is queued (``work_queued``) and when the next input is in
    hand (``input_ready``, before its host-to-device copy); on the stream, the gap between the two is the
    input stall. The host timer of ``next(batches)`` cannot tell it: that wait overlaps the queued
    backward. Events are read only at logging steps (``take``), when the host has synchronised anyway.
    """

    def __init__(self) -> None:
        self._last_done: torch.cuda.Event | None = None
        self._pairs: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def input_ready(self) -> None:
        if self._last_done is not None:
            ready = torch.cuda.Event(enable_timing=True)
            ready.record()
            self._pairs.append((self._last_done, ready))
            self._last_done = None

    def work_queued(self) -> None:
        self._last_done = torch.cuda.Event(enable_timing=True)
        self._last_done.record()

    def take(self) -> float:
        """Seconds of input stall since the last call."""
        pairs, self._pairs = self._pairs, []
        if pairs:
            pairs[-1][1].synchronize()
        return sum(a.elapsed_time(b) for a, b in pairs) / 1e3


def memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


@dataclass
class StepTimes:
    data_s: float = 0.0
    compute_s: float = 0.0
    checkpoint_s: float = 0.0

    def reset(self) -> None:
        self.data_s = self.compute_s = self.checkpoint_s = 0.0


class MetricsSink:
    """TensorBoard + console on rank 0; every call is a no-op elsewhere."""

    def __init__(self, run_url: str, cfg: LoggingConfig, storage_cfg: StorageConfig | None, enabled: bool,
                 sync_every_s: float = 30.0):
        self.cfg, self.storage_cfg, self.enabled = cfg, storage_cfg, enabled
        self.remote = storage.join(run_url, "tb") if storage.is_remote(run_url) else None
        self.sync_every_s = sync_every_s
        self._last_sync = time.monotonic()
        self.writer = None
        self.run_url = run_url

    def start(self, step: int) -> None:
        """Open the event writer; on resume, events after `step` from the interrupted attempt are purged."""
        if not (self.enabled and self.cfg.tensorboard) or self.writer is not None:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.local_dir = tempfile.mkdtemp(prefix="tb-") if self.remote else storage.join(self.run_url, "tb")
        os.makedirs(self.local_dir, exist_ok=True)
        self.writer = SummaryWriter(self.local_dir, purge_step=step or None)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is None:
            return
        for key, value in values.items():
            if value is not None:
                self.writer.add_scalar(key, value, step)
        if self.remote and time.monotonic() - self._last_sync > self.sync_every_s:
            self.sync()

    def image_grid(self, step: int, images: torch.Tensor, mean: tuple, std: tuple, tag: str = "train/augmented") -> None:
        if self.writer is None or not self.cfg.image_grid:
            return
        from torchvision.utils import make_grid

        x = images[:32].float().cpu() * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
        self.writer.add_image(tag, make_grid(x.clamp(0, 1), nrow=8), step)

    def text(self, tag: str, text: str) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, 0)

    def console(self, line: str) -> None:
        if self.enabled:
            print(line, flush=True)

    def sync(self) -> None:
        if self.writer is None or not self.remote:
            return
        self.writer.flush()
        try:
            for name in os.listdir(self.local_dir):
                storage.upload_file(os.path.join(self.local_dir, name), storage.join(self.remote, name),
                                    self.storage_cfg)
        except Exception as exc:  # logging must never kill training
            log.warning("could not mirror TensorBoard events to %s: %s", self.remote, exc)
        self._last_sync = time.monotonic()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.sync()
            self.writer.close()
            self.writer = None


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
