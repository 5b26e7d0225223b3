"""Learned projection heads: student level i (C_i channels) -> teacher width D.

The heads exist only for pretraining: they absorb the student/teacher width mismatch so that the backbone itself
learns teacher-like features, and they are discarded (saved separately for analysis) afterwards.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PROJECTOR_KINDS = ("mlp", "linear")


class ProjectionHead(nn.Module):
    """(B, C_in, h, w) -> (B, C_out, h, w).

    ``mlp``: conv1x1 -> BN -> GELU -> conv1x1 (hidden width defaults to max(C_in, C_out)); ``linear``: one conv1x1.
    """

    def __init__(self, in_channels: int, out_channels: int, kind: str = "mlp", hidden: int | None = None) -> None:
        super().__init__()
        if kind not in PROJECTOR_KINDS:
            raise ValueError(f"projector must be one of {PROJECTOR_KINDS}, got {kind!r}")
        if kind == "linear":
            self.net = nn.Conv2d(in_channels, out_channels, 1)
        else:
            hidden = hidden or max(in_channels, out_channels)
            self.net = nn.Sequential(
                nn.Conv2d(in_channels, hidden, 1, bias=False),
                nn.BatchNorm2d(hidden),
                nn.GELU(),
                nn.Conv2d(hidden, out_channels, 1),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Projectors(nn.Module):
    """One head per student level plus an optional global head (pooled last level -> teacher global embedding).

    Args:
        student_channels: Channels per student level.
        teacher_channels: Target width per student level (after level pairing).
        kind / hidden: See :class:`ProjectionHead`.
        global_dim: Width of the teacher's global embedding (CLS); None disables the global head.
    """

    def __init__(
        self,
        student_channels: list[int],
        teacher_channels: list[int],
        kind: str = "mlp",
        hidden: int | None = None,
        global_dim: int | None = None,
    ) -> None:
        super().__init__()
        if len(student_channels) != len(teacher_channels):
            raise ValueError(f"{len(student_channels)} student levels but {len(teacher_channels)} teacher targets")
        self.heads = nn.ModuleList(
            ProjectionHead(c_in, c_out, kind, hidden) for c_in, c_out in zip(student_channels, teacher_channels)
        )
        self.global_head = nn.Linear(student_channels[-1], global_dim) if global_dim else None

    def forward(
        self, feats: list[torch.Tensor], grids: list[tuple[int, int]] | None = None
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """feats: [(B, C_i, h_i, w_i)] -> ([(B, D_i, h_i, w_i)], global (B, D_g) or None).

        ``grids``: per level, a grid to shrink the map to before its head when the map is larger (area average,
        i.e. ``adaptive_avg_pool2d``: every student position contributes, and it runs in bf16 on CPUs, where
        antialiased bilinear does not); levels already at or below their grid keep their size.
        """
        if grids is not None:
            feats_in = [
                F.adaptive_avg_pool2d(f, g) if f.shape[-2] > g[0] and f.shape[-1] > g[1] else f
                for f, g in zip(feats, grids)
            ]
        else:
            feats_in = feats
        projected = [head(f) for head, f in zip(self.heads, feats_in)]
        pooled = self.global_head(feats[-1].mean(dim=(2, 3))) if self.global_head is not None else None
        return projected, pooled


class DistillStudent(nn.Module):
    """The trainable module handed to ``accelerator.prepare``: student backbone + projectors (never the teacher).

    ``forward(x)`` returns the projected maps and the pooled global prediction, so DDP sees one module.
    """

    def __init__(self, backbone: nn.Module, projectors: Projectors) -> None:
        super().__init__()
        self.backbone = backbone
        self.projectors = projectors

    def forward(
        self, x: torch.Tensor, grids: list[tuple[int, int]] | None = None
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """x: (B, 3, H, W) in [0, 1] -> ([(B, D_i, H/s_i, W/s_i)], (B, D_g) or None); ``grids``: see Projectors."""
        return self.projectors(self.backbone.features(x), grids)
