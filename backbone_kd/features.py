"""The one feature contract shared by teachers and students.

A feature extractor is an ``nn.Module`` with ``features(x) -> list[Tensor]`` (NCHW maps, one per level) and two lists
stating, per level, the channel count and the stride in input pixels — the same contract as timm's
``features_only`` models (``feature_info.channels()`` / ``feature_info.reduction()``).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class FeatureExtractor(Protocol):
    """Structural type: anything with ``features``, ``channels`` and ``strides``."""

    channels: list[int]
    strides: list[int]

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Map images (B, 3, H, W) to feature maps [(B, channels[i], H / strides[i], W / strides[i]), ...]."""
        ...


@torch.no_grad()
def probe_strides(module: nn.Module, size: int = 256, in_channels: int = 3) -> tuple[list[int], list[int]]:
    """Measure ``channels`` and ``strides`` of a module's ``features`` with one dummy forward on CPU-sized input.

    Deriving them from a forward pass (rather than from architecture names or version checks) keeps this correct for
    any YOLO family or timm model. Training/eval mode is restored afterwards.

    Args:
        module: Object with ``features(x)``.
        size: Side of the dummy square input; must be divisible by the largest stride.

    Returns:
        (channels, strides), one entry per level.
    """
    was_training = module.training
    module.eval()
    try:
        param = next(module.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        feats = module.features(torch.zeros(1, in_channels, size, size, device=device, dtype=dtype))
    finally:
        module.train(was_training)
    channels = [int(f.shape[1]) for f in feats]
    strides = [int(round(size / f.shape[-1])) for f in feats]
    return channels, strides
