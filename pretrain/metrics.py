"""Rank-0 observability: TensorBoard scalars/images under <run.url>/tb/, a console line, MFU.

TensorBoard's writer only writes local files, so for remote run URLs events are written to a local
directory and mirrored to ``<run.url>/tb/`` every ``sync_every_s`` and at close (event files are
small and append-only, so re-uploading them whole is cheap). ``tensorboard --logdir`` then reads
either the local mirror or the remote copy.
"""

from __future__ import annotations

import logging
import os
import resource
import tempfile
import time
from dataclasses import dataclass

import torch

from pretrain import storage
from pretrain.config import LoggingConfig, StorageConfig

log = logging.getLogger(__name__)

# Dense bf16 tensor-core peaks (FLOP/s) by device-name substring; torchtitan uses the same figures.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12,
                   "L4": 121e12, "B200": 2.25e15, "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12}


def device_peak_flops(cfg: LoggingConfig, device: torch.device) -> float | None:
    """Peak FLOP/s for MFU: the configured value, else a table lookup on CUDA, else None (CPU)."""
    if cfg.peak_tflops > 0:
        return cfg.peak_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


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
