"""Classification KD losses (response KL, feature MSE/cosine, attention transfer) and the criterion combining them.

All terms are computed in float32 whatever the autocast dtype of their inputs, so they are safe under AMP (fp16
softmax at T=4 and squared activations overflow/underflow easily).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from backbone_kd.clskd.config import ClsKDConfig

# Batch keys the trainer fills with the frozen teacher's outputs; absent during validation (student alone).
TEACHER_LOGITS = "kd_teacher_logits"
TEACHER_FEATS = "kd_teacher_feats"


def response_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton KD: ``T^2 * KL(softmax(teacher/T) || softmax(student/T))``, averaged over the batch.

    Args:
        student_logits: (B, C) student logits.
        teacher_logits: (B, C) teacher logits, same class order.
        temperature: T > 0; the ``T^2`` factor keeps gradient magnitudes comparable across temperatures.

    Returns:
        Scalar tensor (float32), 0 when the two distributions are equal.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} != teacher {tuple(teacher_logits.shape)}")
    log_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean") * temperature**2


def _resize_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinearly resize (B, C, H, W) to ``size`` when the spatial sizes differ (student/teacher strides or imgsz)."""
    return (
        x if tuple(x.shape[-2:]) == tuple(size) else F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    )


def feature_distill_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """Feature distillation between an adapted student map and the teacher map.

    Args:
        student_feat: (B, C, h, w) student features already projected to the teacher's C by an adapter.
        teacher_feat: (B, C, H, W) teacher features; the student map is resized to (H, W).
        kind: ``mse`` (mean squared error) or ``cosine`` (1 - cosine similarity over C, averaged over B*H*W).

    Returns:
        Scalar float32 tensor, 0 when the maps are equal.
    """
    if student_feat.shape[:2] != teacher_feat.shape[:2]:
        raise ValueError(
            f"adapted student features {tuple(student_feat.shape)} and teacher {tuple(teacher_feat.shape)} differ in "
            "batch or channels; the adapter must map student channels to teacher channels"
        )
    s = _resize_to(student_feat.float(), teacher_feat.shape[-2:])
    t = teacher_feat.float()
    if kind == "mse":
        return F.mse_loss(s, t)
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(s, t, dim=1, eps=1e-6)).mean()
    raise ValueError(f"unknown feature loss {kind!r}; use 'mse' or 'cosine'")


def attention_map(feat: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Spatial attention map of Zagoruyko & Komodakis: channel-mean of squared activations, L2-normalised.

    Args:
        feat: (B, C, H, W) feature map (any C: attention needs no adapter).
        size: Optional (H', W') to resize the map to before flattening (to compare different resolutions).

    Returns:
        (B, H*W) (or (B, H'*W')) float32 maps with unit L2 norm per sample.
    """
    amap = feat.float().pow(2).mean(dim=1, keepdim=True)  # (B, 1, H, W)
    if size is not None:
        amap = _resize_to(amap, size)
    return F.normalize(amap.flatten(1), dim=1)


def attention_transfer_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
    """Squared L2 distance between normalised attention maps, averaged over the batch (range [0, 4]).

    Args:
        student_feat: (B, Cs, h, w) student features; its map is resized to the teacher's (H, W).
        teacher_feat: (B, Ct, H, W) teacher features.
    """
    size = tuple(teacher_feat.shape[-2:])
    a_s, a_t = attention_map(student_feat, size), attention_map(teacher_feat)
    return (a_s - a_t).pow(2).sum(dim=1).mean()


class ClassificationKDLoss:
    """ultralytics-style criterion: ``loss, items = criterion(preds, batch, student_feats)``.

    A plain object (not an ``nn.Module``) so that assigning it to ``model.criterion`` does not register the adapters
    twice; the adapters it uses are the student model's own ``kd_adapters`` submodule.

    Args:
        config: Loss weights and options.
        adapters: One module per layer pair mapping student channels to teacher channels (needed when
            ``config.feat_weight > 0``).
    """

    def __init__(self, config: ClsKDConfig, adapters: nn.ModuleList | None = None) -> None:
        if config.feat_weight > 0 and adapters is None:
            raise ValueError("feat_weight > 0 needs feature adapters; build the model through the KD trainer")
        self.config = config
        self.adapters = adapters

    @property
    def names(self) -> tuple[str, ...]:
        """Loss item names, one results.csv column each (fixed for a config so train and val columns agree)."""
        c = self.config
        return ("ce",) + ("kd",) * (c.alpha > 0) + ("feat",) * (c.feat_weight > 0) + ("at",) * (c.at_weight > 0)

    def __call__(
        self, preds: Any, batch: dict[str, Any], student_feats: list[torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Compute the weighted total and its detached parts.

        Args:
            preds: (B, C) logits, or ultralytics' eval-mode ``(probs, logits)`` tuple.
            batch: ``cls`` (B,) labels; ``kd_teacher_logits`` (B, C) and ``kd_teacher_feats`` (list of
                (B, Ct, H, W)) when the teacher ran (training); without them only the label term is non-zero.
            student_feats: (B, Cs, h, w) maps of the student layers, paired with the teacher's.

        Returns:
            (total scalar, {name: detached scalar}) with names from :attr:`names`.
        """
        c = self.config
        logits = preds[1] if isinstance(preds, (list, tuple)) else preds
        ce = F.cross_entropy(logits.float(), batch["cls"])
        parts = {"ce": ce, "kd": None, "feat": None, "at": None}
        t_logits, t_feats = batch.get(TEACHER_LOGITS), batch.get(TEACHER_FEATS)
        if t_logits is not None and c.alpha > 0:
            parts["kd"] = response_kd_loss(logits, t_logits, c.temperature)
        if t_feats is not None and c.uses_features:
            if student_feats is None or len(student_feats) != len(t_feats):
                raise ValueError(
                    f"got {0 if student_feats is None else len(student_feats)} student feature maps for "
                    f"{len(t_feats)} teacher maps; run the student through KDClassificationModel.loss()"
                )
            if c.feat_weight > 0:
                terms = [
                    feature_distill_loss(adapter(fs), ft, c.feat_loss)
                    for adapter, fs, ft in zip(self.adapters, student_feats, t_feats)
                ]
                parts["feat"] = torch.stack(terms).mean()
            if c.at_weight > 0:
                parts["at"] = torch.stack([attention_transfer_loss(fs, ft) for fs, ft in zip(student_feats, t_feats)])
                parts["at"] = parts["at"].mean()
        weights = {"ce": c.beta, "kd": c.alpha, "feat": c.feat_weight, "at": c.at_weight}
        total = sum(weights[k] * v for k, v in parts.items() if v is not None)
        zero = ce.detach() * 0  # validation has no teacher: report its KD columns as 0
        items = {k: (parts[k].detach() if parts[k] is not None else zero) for k in self.names}
        return total, items
