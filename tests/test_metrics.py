"""MFU peak lookup: every known GPU name maps to its own dense bf16 peak; look-alikes and unknowns do not."""

from __future__ import annotations

import pytest
import torch

from pretrain.config import LoggingConfig
from pretrain.metrics import PEAK_BF16_FLOPS, device_peak_flops, peak_for_device_name

KNOWN = {
    "NVIDIA H100 80GB HBM3": 989e12,  # SXM
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12,
    "NVIDIA H200 NVL": 835e12,
    "NVIDIA GH200 480GB": 989e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA L4": 121e12,
    "NVIDIA L40": 181e12,
    "NVIDIA L40S": 362e12,
    "NVIDIA A10G": 70e12,
    "NVIDIA B200": 2.25e15,
    "NVIDIA GB200": 2.5e15,
    "NVIDIA GeForce RTX 4090": 165e12,
    "NVIDIA GeForce RTX 3090": 71e12,
    "Tesla V100-SXM2-16GB": 125e12,
    "Tesla V100-SXM2-32GB": 125e12,
    "Tesla V100-PCIE-32GB": 112e12,
}

UNKNOWN = (
    "",
    "NVIDIA H100",  # variant not in the name: SXM (989) or PCIe (756) cannot be told apart
    "NVIDIA H800",
    "NVIDIA A10",
    "NVIDIA A800-SXM4-80GB",
    "NVIDIA GeForce RTX 3090 Ti",
    "NVIDIA GeForce RTX 4090 D",
    "NVIDIA L40G",
    "Tesla T4",
    "AMD Instinct MI300X",
)


@pytest.mark.unit
@pytest.mark.parametrize("name,peak", sorted(KNOWN.items()))
def test_known_names(name, peak):
    assert peak_for_device_name(name) == peak


@pytest.mark.unit
@pytest.mark.parametrize("name", UNKNOWN)
def test_unknown_names_have_no_peak(name):
    assert peak_for_device_name(name) is None


@pytest.mark.unit
def test_look_alikes_are_told_apart():
    assert peak_for_device_name("NVIDIA L40") != peak_for_device_name("NVIDIA L4")
    assert peak_for_device_name("NVIDIA L40S") not in (peak_for_device_name("NVIDIA L40"),
                                                       peak_for_device_name("NVIDIA L4"))
    assert peak_for_device_name("NVIDIA H100 PCIe") != peak_for_device_name("NVIDIA H100 80GB HBM3")
    assert peak_for_device_name("NVIDIA H100 NVL") != peak_for_device_name("NVIDIA H100 80GB HBM3")
    assert peak_for_device_name("NVIDIA H200 NVL") != peak_for_device_name("NVIDIA H200")
    assert peak_for_device_name("NVIDIA GB200") != peak_for_device_name("NVIDIA B200")


@pytest.mark.unit
@pytest.mark.parametrize("name", sorted(KNOWN))
def test_each_known_name_matches_exactly_one_entry(name):
    """The table does not depend on its order for the names it knows."""
    import re

    assert sum(bool(re.fullmatch(p, name, re.IGNORECASE)) for p, _ in PEAK_BF16_FLOPS) == 1


@pytest.mark.unit
def test_case_and_whitespace_do_not_matter():
    assert peak_for_device_name("  NVIDIA H100 PCIE ") == 756e12
    assert peak_for_device_name("nvidia l40s") == 362e12


@pytest.mark.unit
def test_device_peak_flops(monkeypatch):
    assert device_peak_flops(LoggingConfig(peak_tflops=500.0), torch.device("cuda")) == 500e12
    assert device_peak_flops(LoggingConfig(), torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA L40")
    assert device_peak_flops(LoggingConfig(), torch.device("cuda", 0)) == 181e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert device_peak_flops(LoggingConfig(), torch.device("cuda", 0)) is None
