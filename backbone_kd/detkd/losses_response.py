"""Response-based KD terms on YOLO head outputs (class scores, DFL box distributions, decoded boxes).

All functions work on anchors that match index for index between student and teacher (equal strides and input size)
and return a per-anchor loss of shape (B, A); :func:`weighted_mean` reduces it with anchor weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from ultralytics.utils.metrics import bbox_iou
from ultralytics.utils.tal import dist2bbox


def weighted_mean(loss: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Reduce a per-anchor loss with anchor weights.

    Args:
        loss: (B, A) per-anchor loss.
        weight: (B, A) non-negative anchor weights (binary masks or confidences), treated as constants.

    Returns:
        Scalar: sum(loss * weight) / max(sum(weight), 1). The clamp keeps batches without positives finite (zero)
        while staying in the graph, as ultralytics does with ``target_scores_sum``.
    """
    weight = weight.detach().to(loss.dtype)
    return (loss * weight).sum() / weight.sum().clamp(min=1.0)


def cls_bce_kd(
    s_logits: torch.Tensor, t_logits: torch.Tensor, temperature: float = 1.0, qfl_beta: float = 0.0
) -> torch.Tensor:
    """Per-class binary KD against the teacher's sigmoid scores.

    The loss is BCE(σ(s/T), σ(t/T)) minus the teacher's binary entropy, i.e. the per-class binary KL: same gradient
    as BCE, but exactly zero when student == teacher. Scaled by T² so gradients keep their size across temperatures.

    Args:
        s_logits: (B, A, nc) student class logits.
        t_logits: (B, A, nc) teacher class logits.
        temperature: Softening temperature T > 0.
        qfl_beta: If > 0, quality-focal weighting |σ(s/T) − σ(t/T)|^β emphasises anchors where the student disagrees.

    Returns:
        (B, A) loss summed over classes.
    """
    s = s_logits.float() / temperature
    t = t_logits.detach().float() / temperature
    p_t = t.sigmoid()
    loss = F.binary_cross_entropy_with_logits(s, p_t, reduction="none")
    loss = loss - F.binary_cross_entropy_with_logits(t, p_t, reduction="none")  # remove the target's entropy
    if qfl_beta > 0:
        loss = loss * (s.sigmoid() - p_t).abs().pow(qfl_beta)
    return loss.sum(-1) * temperature**2


def softmax_kl(s_logits: torch.Tensor, t_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) · T² over the last dimension.

    Args:
        s_logits: (..., K) student logits.
        t_logits: (..., K) teacher logits.
        temperature: Softening temperature T > 0.

    Returns:
        (...) KL per row.
    """
    log_s = F.log_softmax(s_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(t_logits.detach().float() / temperature, dim=-1)
    return (log_t.exp() * (log_t - log_s)).sum(-1) * temperature**2


def cls_kl_kd(s_logits: torch.Tensor, t_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Softmax-over-classes KD, (B, A, nc) logits -> (B, A). Kept as an option; BCE matches YOLO's sigmoid head."""
    return softmax_kl(s_logits, t_logits, temperature)


def dfl_kd(s_dist: torch.Tensor, t_dist: torch.Tensor, reg_max: int, temperature: float = 1.0) -> torch.Tensor:
    """KL between teacher and student box-side distributions (the DFL bins).

    Args:
        s_dist: (B, A, 4 * reg_max) student box logits.
        t_dist: (B, A, 4 * reg_max) teacher box logits (same reg_max).
        reg_max: Number of bins per side.
        temperature: Softening temperature T > 0.

    Returns:
        (B, A) KL averaged over the four sides.
    """
    b, a, _ = s_dist.shape
    kl = softmax_kl(s_dist.view(b, a, 4, reg_max), t_dist.view(b, a, 4, reg_max), temperature)
    return kl.mean(-1)


def decode_boxes(dist: torch.Tensor, anchor_points: torch.Tensor, reg_max: int) -> torch.Tensor:
    """Decode DFL logits into xyxy boxes in grid units.

    Args:
        dist: (B, A, 4 * reg_max) box logits.
        anchor_points: (A, 2) anchor centres in grid units.
        reg_max: Bins per side (1 means direct regression).

    Returns:
        (B, A, 4) xyxy boxes in grid units (multiply by the stride tensor for pixels).
    """
    if reg_max > 1:
        b, a, _ = dist.shape
        proj = torch.arange(reg_max, device=dist.device, dtype=torch.float)
        dist = dist.float().view(b, a, 4, reg_max).softmax(3).matmul(proj)
    return dist2bbox(dist, anchor_points, xywh=False)


def box_kd(s_boxes: torch.Tensor, t_boxes: torch.Tensor, kind: str = "ciou") -> torch.Tensor:
    """Box KD between decoded student and teacher boxes.

    Args:
        s_boxes: (B, A, 4) student xyxy boxes in grid units.
        t_boxes: (B, A, 4) teacher xyxy boxes in grid units.
        kind: ``"ciou"`` (1 − CIoU) or ``"l1"`` (sum of absolute side differences, grid units).

    Returns:
        (B, A) loss.
    """
    t_boxes = t_boxes.detach().float()
    if kind == "ciou":
        return 1.0 - bbox_iou(s_boxes.float(), t_boxes, xywh=False, CIoU=True).squeeze(-1)
    return (s_boxes.float() - t_boxes).abs().sum(-1)
