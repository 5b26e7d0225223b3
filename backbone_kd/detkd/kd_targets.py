"""Targets for response KD on a detection head: TaskAligned assignment and the teacher's NMS pseudo labels."""

from __future__ import annotations

from typing import Any

import torch
from ultralytics.utils.nms import non_max_suppression
from ultralytics.utils.ops import xyxy2xywh


def tal_assign(
    assigner: Any,
    scores: torch.Tensor,
    boxes_grid: torch.Tensor,
    gt_labels: torch.Tensor,
    gt_bboxes: torch.Tensor,
    mask_gt: torch.Tensor,
    anchor_points: torch.Tensor,
    stride_tensor: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``assigner`` (a TaskAlignedAssigner) on (B, A, nc) logits and (B, A, 4) grid-unit xyxy boxes against
    (B, M, 1) labels, (B, M, 4) pixel xyxy boxes and (B, M, 1) validity; anchors (A, 2) grid units, strides (A, 1).

    Returns:
        Target boxes (B, A, 4) in pixels, target scores (B, A, nc), foreground mask (B, A) bool.
    """
    _, t_bboxes, t_scores, fg, _ = assigner(
        scores.detach().float().sigmoid(),
        (boxes_grid.detach() * stride_tensor).to(gt_bboxes.dtype),
        anchor_points * stride_tensor,
        gt_labels,
        gt_bboxes,
        mask_gt,
    )
    return t_bboxes, t_scores, fg


def pseudo_targets(
    opt: dict, t_scores: torch.Tensor, t_boxes: torch.Tensor, stride_tensor: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher detections after NMS as padded targets.

    Args:
        opt: The recipe's ``losses.pseudo`` block (``conf``, ``iou``).
        t_scores: (B, A, nc) teacher logits.
        t_boxes: (B, A, 4) teacher xyxy boxes in grid units.
        stride_tensor: (A, 1) stride of each anchor.

    Returns:
        Labels (B, M, 1), pixel xyxy boxes (B, M, 4) and validity (B, M, 1), M = most detections in one image.
    """
    pred = torch.cat([xyxy2xywh(t_boxes * stride_tensor), t_scores.sigmoid()], -1).permute(0, 2, 1)
    dets = non_max_suppression(pred, conf_thres=opt.get("conf", 0.25), iou_thres=opt.get("iou", 0.7))
    n = max(max(len(d) for d in dets), 1)
    bs = len(dets)
    gt_bboxes = t_scores.new_zeros(bs, n, 4, dtype=torch.float)
    gt_labels = t_scores.new_zeros(bs, n, 1, dtype=torch.float)
    mask_gt = t_scores.new_zeros(bs, n, 1, dtype=torch.float)
    for i, d in enumerate(dets):
        gt_bboxes[i, : len(d)], gt_labels[i, : len(d), 0], mask_gt[i, : len(d)] = d[:, :4], d[:, 5], 1.0
    return gt_labels, gt_bboxes, mask_gt
