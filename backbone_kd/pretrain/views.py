"""What teacher and student are fed: the same [0, 1] view, resized to the teacher's patch grid and cast to its dtype
for the teacher, optionally ImageNet-normalised for the student (``student_input``)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


def teacher_input(x: torch.Tensor, teacher: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The student's [0, 1] view for the teacher: resized to a multiple of its patch size if needed, cast to dtype."""
    patch = getattr(teacher, "patch_size", None) or getattr(getattr(teacher, "_orig_mod", None), "patch_size", None)
    if patch:
        h, w = x.shape[-2:]
        th, tw = max(patch, round(h / patch) * patch), max(patch, round(w / patch) * patch)
        if (th, tw) != (h, w):
            x = F.interpolate(x, size=(th, tw), mode="bilinear", align_corners=False, antialias=True)
    return x.to(dtype=dtype, memory_format=torch.contiguous_format)


def student_view(x: torch.Tensor, student_input: str) -> torch.Tensor:
    """What the student is fed: (B, 3, H, W) [0, 1] images as they are (``unit``, YOLO's convention) or
    ImageNet-normalised (``imagenet``, lightly-train's; the exported BN statistics then expect normalised inputs)."""
    if student_input == "unit":
        return x
    mean, std = _imagenet_constants(x.device, x.dtype)
    return (x - mean) / std


@functools.cache
def _imagenet_constants(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean / std as (1, 3, 1, 1) tensors, built once per device and dtype (not a host copy every step)."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    return tuple(
        torch.tensor(v, device=device, dtype=dtype).view(1, 3, 1, 1)
        for v in (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    )
