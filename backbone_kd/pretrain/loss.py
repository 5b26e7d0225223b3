"""Spatial alignment and the distillation loss (per-token cosine per level, and the global CLS term).

All terms are computed in fp32 (inputs are upcast): cosines and centring statistics are not fp16-safe.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from backbone_kd.pretrain.centering import TargetCenter

ALIGN_MODES = ("student_to_teacher", "resize_first", "teacher_to_student")
BATCH_NORMS = ("none", "center")  # stateless: each batch's own statistics
TARGET_NORMS = (*BATCH_NORMS, "ema_center")  # ema_center: a running centre (pretrain/centering.py)


def pair_levels(student_strides: list[int], teacher_strides: list[int]) -> list[int]:
    """Which teacher level supervises each student level.

    A single-level teacher (ViT patch grid) supervises every student level; a multi-level teacher with as many levels
    as the student pairs them in order when its levels share one stride (a ViT's per-level token grids) or when the
    strides match the student's level for level (a CNN teacher); other strides are an error.

    Returns:
        Teacher level index per student level.
    """
    if len(teacher_strides) == 1:
        return [0] * len(student_strides)
    if len(teacher_strides) == len(student_strides):
        # A ViT's per-level targets share one token grid (every stride equal): the grids are resampled to each level,
        # so pairing in order is intended. A multi-scale CNN teacher must match stride for stride: a stride-4/8/16
        # teacher paired with P3-P5 would pull each student level toward a map of another scale.
        if len(set(teacher_strides)) == 1 or list(teacher_strides) == list(student_strides):
            return list(range(len(student_strides)))
        raise ValueError(
            f"teacher level strides {list(teacher_strides)} do not match the student's {list(student_strides)}; "
            "choose teacher_indices (CNN out_indices / YOLO taps) whose strides equal the student taps' strides"
        )
    raise ValueError(
        f"cannot pair {len(student_strides)} student levels (strides {student_strides}) with {len(teacher_strides)} "
        f"teacher levels (strides {teacher_strides}); choose teacher_indices so the counts match or use a ViT teacher"
    )


def align(
    student: torch.Tensor, teacher: torch.Tensor, mode: str = "student_to_teacher"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize one map so both share a grid (bilinear).

    Args:
        student: (B, D, hs, ws) projected student map.
        teacher: (B, D, ht, wt) teacher tokens.
        mode: ``student_to_teacher`` resizes the student map to the teacher grid (default: the loss is counted over
            teacher tokens); ``resize_first``
            is ``student_to_teacher`` for maps that :meth:`DistillationLoss.head_grids` already shrank to the grid
            before their projection head (what is left here is upsampling the smaller levels);
            ``teacher_to_student`` resizes the targets to each student map's grid instead (antialiased where it
            shrinks them): the loss is counted over student locations, and with a teacher cache encoded above
            ``image_size`` the finest level's targets carry detail finer than the teacher's patch grid
            (:func:`backbone_kd.pretrain.build.build_run` sets the cache's crop size to that grid).
    """
    if student.shape[-2:] == teacher.shape[-2:]:
        return student, teacher
    if mode in ("student_to_teacher", "resize_first"):
        return F.interpolate(student, size=teacher.shape[-2:], mode="bilinear", align_corners=False), teacher
    if mode == "teacher_to_student":
        size = student.shape[-2:]
        shrink = size[0] < teacher.shape[-2] or size[1] < teacher.shape[-1]
        return student, F.interpolate(teacher, size=size, mode="bilinear", align_corners=False, antialias=shrink)
    raise ValueError(f"align must be one of {ALIGN_MODES}, got {mode!r}")


def normalize_targets(teacher: torch.Tensor, mode: str = "none") -> torch.Tensor:
    """Per-channel normalisation of a teacher map with its own batch statistics (over batch and tokens).

    Why: DINOv2 patch tokens share a large common component (on COCO images the mean cosine between a token and the
    batch's mean token is ~0.6), so under a plain per-token cosine a student that outputs that constant already
    scores ~0.6 and the loss says little about what differs between tokens. ``center`` removes the common component;
    Stateless, so resume and DDP need nothing extra.

    Args:
        teacher: (B, D, h, w) teacher tokens.
        mode: ``none`` (as is) or ``center`` (minus the per-channel mean).

    Returns:
        (B, D, h, w) fp32 map.
    """
    if mode not in BATCH_NORMS:
        raise ValueError(f"target_norm {mode!r} is not a batch mode {BATCH_NORMS}; ema_center is DistillationLoss's")
    t = teacher.float()
    if mode == "none":
        return t
    return t - t.mean(dim=(0, 2, 3), keepdim=True)


def cosine_token_loss(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``1 - cos(s, t)`` over channels, averaged over tokens.

    Args:
        student, teacher: (B, D, h, w), same shape.

    Returns:
        (loss in [0, 2], mean cosine similarity in [-1, 1]); both scalars. Invariant to per-token scaling.
    """
    cos = F.cosine_similarity(student.float(), teacher.float(), dim=1, eps=1e-6)  # (B, h, w)
    mean_cos = cos.mean()
    return 1.0 - mean_cos, mean_cos.detach()


class DistillationLoss(nn.Module):
    """Weighted sum over student levels of the per-token cosine loss, plus the global term.

    Args:
        level_weights: One weight per student level (normalised to sum 1).
        pairing: Teacher level per student level (:func:`pair_levels`).
        align_mode: See :func:`align`.
        global_weight: Weight of ``1 - cos(pooled student prediction, teacher CLS)`` (0 disables).
        target_norm: :func:`normalize_targets` mode applied to every teacher map before the per-level terms
            (default ``center``, as the config's), or ``ema_center``: the running centre ``center``.
        center: The :class:`TargetCenter` of ``target_norm=ema_center`` (built from ``teacher_channels`` when None).
        teacher_channels: Channels per teacher level (only for ``ema_center`` without ``center``).
        center_momentum: Its EMA momentum (only for ``ema_center`` without ``center``).
    """

    def __init__(
        self,
        level_weights: list[float],
        pairing: list[int],
        align_mode: str = "student_to_teacher",
        global_weight: float = 0.0,
        level_names: list[str] | None = None,
        target_norm: str = "center",
        center: TargetCenter | None = None,
        teacher_channels: list[int] | None = None,
        center_momentum: float = 0.99,
    ) -> None:
        super().__init__()
        if target_norm not in TARGET_NORMS:
            raise ValueError(f"target_norm must be one of {TARGET_NORMS}, got {target_norm!r}")
        self.target_norm = target_norm
        if target_norm == "ema_center" and center is None:
            if teacher_channels is None:
                raise ValueError("target_norm=ema_center needs teacher_channels (or a TargetCenter) to size its centre")
            center = TargetCenter(teacher_channels, center_momentum)
        self.center = center if target_norm == "ema_center" else None
        if align_mode not in ALIGN_MODES:
            raise ValueError(f"align must be one of {ALIGN_MODES}, got {align_mode!r}")
        if len(level_weights) != len(pairing) or any(w < 0 for w in level_weights) or sum(level_weights) <= 0:
            raise ValueError(f"level_weights must be {len(pairing)} non-negative numbers with a positive sum")
        total = float(sum(level_weights))
        self.level_weights = [float(w) / total for w in level_weights]
        self.pairing, self.align_mode = pairing, align_mode
        self.global_weight = global_weight
        self.level_names = level_names or [f"l{i}" for i in range(len(pairing))]

    def head_grids(self, teacher: list[torch.Tensor]) -> list[tuple[int, int]] | None:
        """Per student level, the grid its map is resized to *before* its projection head, or None.

        Only with ``align_mode="resize_first"``: the loss compares maps on the teacher grid anyway, so a student map
        larger than that grid (P3 at 28x28 vs a 16x16 ViT grid at 224 px) can be shrunk first, and its head runs on
        ~3x fewer tokens (less compute and activation memory than projecting at 28x28 and resizing afterwards).

        Args:
            teacher: Teacher maps [(B, D, h, w)] (only their sizes are read).
        """
        if self.align_mode != "resize_first":
            return None
        return [(int(teacher[j].shape[-2]), int(teacher[j].shape[-1])) for j in self.pairing]

    def targets(self, teacher: list[torch.Tensor]) -> list[torch.Tensor]:
        """Normalised teacher maps [(B, D_j, h, w)] fp32, without updating any state (what validation scores).

        ``ema_center`` subtracts the current (frozen) centre, so an image's targets do not depend on its batch.
        """
        if self.center is not None:
            return self.center.apply(teacher)
        return [normalize_targets(t, self.target_norm) for t in teacher]

    def forward(
        self,
        student: list[torch.Tensor],
        teacher: list[torch.Tensor],
        student_global: torch.Tensor | None = None,
        teacher_global: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Args: projected student maps [(B, D, h_i, w_i)], teacher maps [(B, D, h, w)], globals (B, D_g).

        Returns:
            (scalar loss, detached per-term logs: ``loss_<level>``, ``cos_<level>``,
            ``loss_global``, ``loss``).
        """
        total = student[0].new_zeros((), dtype=torch.float32)
        logs: dict[str, torch.Tensor] = {}
        raw = teacher
        teacher = self.targets(raw)
        if self.center is not None and self.training:
            self.center.observe(raw)  # moves the centre at the optimizer step (step.py), not per micro-batch
        for i, (s, w) in enumerate(zip(student, self.level_weights)):
            s_al, t_al = align(s, teacher[self.pairing[i]], self.align_mode)
            loss, cos = cosine_token_loss(s_al, t_al)
            name = self.level_names[i]
            logs[f"loss_{name}"], logs[f"cos_{name}"] = loss.detach(), cos
            total = total + w * loss
        if self.global_weight > 0:
            if student_global is None or teacher_global is None:
                raise ValueError("global_weight > 0 needs a teacher with a CLS token (ViT) and a global head")
            g_loss, g_cos = cosine_token_loss(student_global[..., None, None], teacher_global[..., None, None])
            logs["loss_global"], logs["cos_global"] = g_loss.detach(), g_cos
            total = total + self.global_weight * g_loss
        logs["loss"] = total.detach()
        return total, logs
