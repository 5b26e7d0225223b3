"""Feature-based KD terms on neck maps (P3/P4/P5) plus the foreground masks that weight them.

Student maps are first projected to the teacher width by learned adapters (see ``adapters.py``); every function here
takes equal-shape (B, C, H, W) maps. ``mask`` arguments are (B, 1, H, W) weights in [0, 1] or None (uniform).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _masked_mean(loss: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of a (B, 1 or C, H, W) loss map, weighted per pixel by ``mask`` (B, 1, H, W) when given."""
    if mask is None:
        return loss.mean()
    mask = mask.detach().to(loss.dtype)
    return (loss * mask).sum() / (mask.sum() * loss.shape[1]).clamp(min=1.0)


def feat_cosine(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """1 − cosine similarity between student and teacher channel vectors per pixel; (B, C, H, W) -> scalar."""
    # normalise with a tiny eps: near-zero maps (e.g. deep levels of a fresh model) must still compare by direction
    cos = (F.normalize(s.float(), dim=1, eps=1e-12) * F.normalize(t.detach().float(), dim=1, eps=1e-12)).sum(1, True)
    return _masked_mean(1.0 - cos, mask)


def feat_l2(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-element squared error, mask-weighted; with teacher-score masks this is ultralytics' score-weighted L2."""
    return _masked_mean((s.float() - t.detach().float()).pow(2), mask)


def feat_cwd(s: torch.Tensor, t: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Channel-wise distillation (Shu et al., 2021): per channel, KL between spatial softmax maps.

    Args:
        s: (B, C, H, W) adapted student map.
        t: (B, C, H, W) teacher map.
        temperature: Softening temperature T > 0.

    Returns:
        Scalar KL · T², averaged over the B·C channel maps.
    """
    b, c, h, w = s.shape
    log_s = F.log_softmax(s.float().reshape(b * c, h * w) / temperature, dim=1)
    log_t = F.log_softmax(t.detach().float().reshape(b * c, h * w) / temperature, dim=1)
    return (log_t.exp() * (log_t - log_s)).sum(1).mean() * temperature**2


def feat_mgd(
    s: torch.Tensor,
    t: torch.Tensor,
    generator: nn.Module,
    mask_ratio: float = 0.65,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Masked generative distillation (Yang et al., 2022): rebuild the teacher map from a randomly masked student map.

    Unlike the other terms this one is not zero when student == teacher: the generator must still learn to fill the
    dropped pixels; that is the point of MGD.

    Args:
        s: (B, C, H, W) adapted student map.
        t: (B, C, H, W) teacher map.
        generator: Module mapping (B, C, H, W) -> (B, C, H, W) (two 3x3 convs).
        mask_ratio: Fraction of pixels dropped.
        mask: Optional (B, 1, H, W) foreground weights for the reconstruction error.
    """
    keep = (torch.rand(s.shape[0], 1, *s.shape[2:], device=s.device) >= mask_ratio).to(s.dtype)
    return _masked_mean((generator(s * keep).float() - t.detach().float()).pow(2), mask)


def _attention(f: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """L2-normalised attention: mean of |f|² over ``dims``, flattened per image."""
    return F.normalize(f.float().pow(2).mean(dims).flatten(1), dim=1)


def feat_at(s: torch.Tensor, t: torch.Tensor, mode: str = "both", mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention transfer (Zagoruyko & Komodakis): match spatial and/or channel attention maps.

    Args:
        s: (B, C, H, W) adapted student map.
        t: (B, C, H, W) teacher map.
        mode: ``"spatial"`` (maps of H·W), ``"channel"`` (vectors of C) or ``"both"``.
        mask: Optional (B, 1, H, W) weights applied to the spatial differences.

    Returns:
        Scalar: squared distance between normalised attentions, summed over positions, averaged over images.
    """
    loss = s.new_zeros((), dtype=torch.float)
    if mode in {"spatial", "both"}:
        diff = (_attention(s, (1,)) - _attention(t.detach(), (1,))).pow(2)  # (B, H*W)
        if mask is not None:
            diff = diff * mask.detach().flatten(1).to(diff.dtype)
        loss = loss + diff.sum(1).mean()
    if mode in {"channel", "both"}:
        loss = loss + (_attention(s, (2, 3)) - _attention(t.detach(), (2, 3))).pow(2).sum(1).mean()
    return loss


def gt_masks(batch: dict, shapes: list[tuple[int, int]], batch_size: int) -> list[torch.Tensor]:
    """Foreground masks from ground-truth boxes: 1 where a cell centre lies inside any GT box of its image.

    Args:
        batch: ultralytics batch with ``bboxes`` (N, 4) normalised xywh and ``batch_idx`` (N,).
        shapes: (H, W) of each level.
        batch_size: B.

    Returns:
        One (B, 1, H, W) float mask per level.
    """
    boxes, idx = batch["bboxes"], batch["batch_idx"].long().view(-1)
    xyxy = torch.cat([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2], 1)  # (N, 4) normalised
    out = []
    for h, w in shapes:
        ys = (torch.arange(h, device=boxes.device, dtype=torch.float) + 0.5) / h
        xs = (torch.arange(w, device=boxes.device, dtype=torch.float) + 0.5) / w
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")
        cx, cy = cx.reshape(1, -1), cy.reshape(1, -1)  # (1, HW)
        inside = (cx > xyxy[:, :1]) & (cx < xyxy[:, 2:3]) & (cy > xyxy[:, 1:2]) & (cy < xyxy[:, 3:4])  # (N, HW)
        m = torch.zeros(batch_size, h * w, device=boxes.device)
        m.index_add_(0, idx, inside.float())
        out.append(m.clamp_(max=1.0).view(batch_size, 1, h, w))
    return out


def teacher_masks(t_scores: torch.Tensor, shapes: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Soft foreground masks from the teacher's max class probability per anchor.

    Args:
        t_scores: (B, A, nc) teacher class logits, anchors ordered level by level.
        shapes: (H, W) of each level (their H·W sum to A).

    Returns:
        One (B, 1, H, W) mask per level.
    """
    conf = t_scores.detach().float().sigmoid().amax(-1)  # (B, A)
    parts = torch.split(conf, [h * w for h, w in shapes], dim=1)
    return [p.view(-1, 1, h, w) for p, (h, w) in zip(parts, shapes)]
