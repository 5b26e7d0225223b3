"""Learned adapters that project student neck maps to the teacher's width (and MGD's generators).

They train with the student (their parameters join the optimizer) but are training-only: never part of the saved
checkpoint, only of the resume side file ``weights/kd_state.pt``.
"""

from __future__ import annotations

import torch
from torch import distributed as dist
from torch import nn


class FeatureAdapters(nn.Module):
    """Per-level projections student width -> teacher width, plus optional MGD generators.

    Args:
        student_ch: Student neck widths, e.g. [64, 128, 256] for P3/P4/P5.
        teacher_ch: Teacher neck widths, one per level.
        mgd: Also build the MGD generators (3x3 conv, ReLU, 3x3 conv at teacher width).
        kind: ``"conv"`` (one 1x1 conv, identity-initialised for equal widths) or ``"mlp"`` (1x1 conv, ReLU, 1x1 conv
            with PyTorch's default init: the projector of ultralytics' built-in ``DistillationModel``).
    """

    def __init__(self, student_ch: list[int], teacher_ch: list[int], mgd: bool = False, kind: str = "conv") -> None:
        super().__init__()
        if len(student_ch) != len(teacher_ch):
            raise ValueError(
                f"student has {len(student_ch)} neck levels, teacher {len(teacher_ch)}; feature KD needs equal levels"
            )
        if kind not in {"conv", "mlp"}:
            raise ValueError(f"adapter kind must be 'conv' or 'mlp', got {kind!r}")
        self.student_ch, self.teacher_ch, self.kind = list(student_ch), list(teacher_ch), kind
        if kind == "mlp":
            self.proj = nn.ModuleList(
                nn.Sequential(nn.Conv2d(s, t, 1), nn.ReLU(inplace=True), nn.Conv2d(t, t, 1))
                for s, t in zip(student_ch, teacher_ch)
            )
        else:
            self.proj = nn.ModuleList(nn.Conv2d(s, t, kernel_size=1) for s, t in zip(student_ch, teacher_ch))
            for conv, s, t in zip(self.proj, student_ch, teacher_ch):
                if s == t:  # start from identity so equal-width pairs begin with the raw feature comparison
                    nn.init.zeros_(conv.bias)
                    with torch.no_grad():
                        conv.weight.copy_(torch.eye(t).view(t, t, 1, 1))
        self.generators = (
            nn.ModuleList(
                nn.Sequential(nn.Conv2d(t, t, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(t, t, 3, padding=1))
                for t in teacher_ch
            )
            if mgd
            else None
        )

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """Project student maps: list of (B, Cs_i, H_i, W_i) -> list of (B, Ct_i, H_i, W_i)."""
        return [p(f) for p, f in zip(self.proj, feats)]


@torch.no_grad()
def broadcast_from_rank0(module: nn.Module) -> bool:
    """Copy rank 0's parameters and buffers into ``module`` on every rank of the default process group.

    Modules built outside DistributedDataParallel (the adapters, MGD generators) are initialised from each rank's own
    RNG, and ultralytics seeds rank r with ``seed + 1 + r``: without this every rank would train a different adapter
    (averaging gradients keeps different weights different).

    Returns:
        True when a broadcast happened (a process group with more than one rank is initialised), else False.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return False
    for t in [*module.parameters(), *module.buffers()]:
        dist.broadcast(t.data, src=0)
    return True


@torch.no_grad()
def neck_widths(model: nn.Module, imgsz: int = 64) -> list[int]:
    """Channel widths of the maps feeding the Detect head, read from one dummy forward (mode restored after).

    Args:
        model: ultralytics DetectionModel.
        imgsz: Dummy input size (a multiple of the largest stride).
    """
    from backbone_kd.detkd.teacher import head_dict

    was_training = model.training
    model.eval()  # eval: no BN statistics update from the dummy batch
    p = next(model.parameters())
    ch = getattr(model, "yaml", {}).get("channels", 3)
    try:
        out = model(torch.zeros(1, ch, imgsz, imgsz, device=p.device, dtype=p.dtype))
    finally:
        model.train(was_training)
    return [f.shape[1] for f in head_dict(out)["feats"]]
