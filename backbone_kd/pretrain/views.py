"""What the teacher is fed: the student's [0, 1] view (YOLO's convention, what the student sees as is), resized to the
teacher's patch grid and cast to its dtype; the teacher normalises on its own."""

from __future__ import annotations

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
