"""Frozen features of a labelled image list: one pooled vector per image and level, computed once per backbone."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as TF

from backbone_kd.images import load_rgb


class ProbeImages(Dataset):
    """Images squash-resized to ``size`` x ``size``, as (3, size, size) float in [0, 1] (what YOLO sees).

    Squash, not crop: the probe images are object crops or whole photos whose label is about the entire frame.
    """

    def __init__(self, paths: list[Path], size: int) -> None:
        self.paths, self.size = list(paths), int(size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        img = load_rgb(str(self.paths[i]), draft_size=2 * self.size)
        x = TF.to_dtype(TF.to_image(img), torch.float32, scale=True)
        return TF.resize(x, [self.size, self.size], antialias=True)


@torch.no_grad()
def pooled_features(
    backbone: torch.nn.Module, paths: list[Path], size: int = 160, batch_size: int = 64, workers: int = 0
) -> list[torch.Tensor]:
    """Global-average-pooled features of every tapped level.

    Args:
        backbone: Feature-contract module (``features(x) -> [(B, C_i, h_i, w_i)]``), frozen, eval mode.
        paths: Image files.
        size: Square input size (a multiple of the largest stride keeps every level aligned).

    Returns:
        One ``(N, C_i)`` float32 CPU tensor per level, in ``paths`` order.
    """
    loader = DataLoader(ProbeImages(paths, size), batch_size=batch_size, num_workers=workers)
    device = next(backbone.parameters()).device
    chunks: list[list[torch.Tensor]] = []
    for x in loader:
        maps = backbone.features(x.to(device))
        chunks.append([m.float().mean(dim=(2, 3)).cpu() for m in maps])
    return [torch.cat(level) for level in zip(*chunks)]


def combine_levels(levels: list[torch.Tensor]) -> torch.Tensor:
    """``(N, sum C_i)``: each level L2-normalised before concatenation, so no level dominates by its scale."""
    return torch.cat([F.normalize(level, dim=1) for level in levels], dim=1)
