"""Helpers of the GPU tests."""

from __future__ import annotations

import torch


def busy(device: int, seconds: float) -> None:
    """Queue about ``seconds`` of GPU work on ``device``'s current stream (``torch.cuda._sleep``)."""
    with torch.cuda.device(device):
        props = torch.cuda.get_device_properties(device)
        rate_khz = getattr(props, "clock_rate", 0) or 1_500_000  # kHz; absent in some builds
        torch.cuda._sleep(int(seconds * rate_khz * 1000))
